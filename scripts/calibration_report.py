"""Calibration report: accuracy vs keep ratio of every registered method on the calibration model.

A calibration model (``calibration/<family>-shapes`` of each family of ``calibration.models.FAMILIES``, or a variant
such as ``calibration/qwen2.5-vl-graded``; trained by ``calibration/train.py``) answers questions about coloured
shapes whose answer lives in one known visual token, so a method that keeps the wrong tokens loses accuracy
visibly. This script evaluates it on the held-out ``ShapesCalib`` data set (``calibration/data.py``) through the
family's real runner and VLMEvalKit's
exact-matching judge: stock, then every registered method (pre-LLM and intra-LLM, random included) at each keep ratio
(by default the configurations share runner processes that load the model once, ``scripts/sweep.py --in-process``,
and generate 8 questions per call, ``--batch-size``: the predictions of one process per configuration and one
question at a time, ``--separate-processes --batch-size 1``). It writes into the work dir: the results table (``summary.csv``/``.json``, ``report.md`` with
the machine and the time it took) and ``calibration_accuracy.png`` (one panel per stage kind).

    python scripts/calibration_report.py                        # every method, keep 0.5 / 0.25 / 0.111
    python scripts/calibration_report.py --methods fastv_intra_llm divprune_pre_llm --ratios 0.25
    python scripts/calibration_report.py --family gemma4 --work-dir calibration_outputs_gemma4
    python scripts/calibration_report.py --family all --intra-layer 1 --work-dir calibration_outputs_all
    python scripts/calibration_report.py --task video --work-dir calibration_outputs_video

On a model whose patches give the [CLS] methods a true [CLS] row (the LLaVA-1.5 one, ``reads_cls_row``) every method
that reads that row runs a second time under ``CLS_SIGNAL=substitute``. ``--family all`` runs the report of every
family's model (variants left out), each into ``<work-dir>/<family>``, then writes ``cross_family.md`` / ``.csv`` /
``.png`` (accuracy on the question types each model has learned, per family and keep ratio).

``--task describe`` evaluates the describe calibration model (``calibration/qwen2.5-vl-describe``) on
``ShapesDescribe``, whose answers take two words ("red square"): the second is produced by a decode step that reads
the image through the KV cache, so the KV-cache methods (``*_kv``, the ratio as ``KV_BUDGET``) are measured too, and
``calibration_cache.png`` plots every run's accuracy against the mean cached tokens per layer (token pruning and KV
compression at equal cache size).

``--task video`` evaluates the video calibration model (``calibration/qwen2.5-vl-motion``, ``calibration/video.py``)
on ``ShapesMotionCalib`` clips sampled with ``nframe = 8`` (``ShapesMotionCalib_8frame``): the video methods see each
clip whole, the image methods frame by frame (``IMAGE_METHODS_ON_VIDEO=frame``, the default), at keep ratios down to
0.05; video sets are generated one question at a time.

Settings fitted to the small model (stated in report.md): VTC-CLS sums the encoder attention of its last
layer only (``VTC_CLS_START_LAYER=-1``, on LLaVA's CLIP ``-2``, the feature layer: the encoders have 3-4 layers, the
official start layer 16 assumes 24), and
PruMerge/PruMerge+ keep the toolkit's keep count (``PRUMERGE_ADAPTIVE=0``) so that every method is compared at
the same ratio; on Qwen, ToMe inside the encoder runs without proportional attention (``TOME_PROP_ATTN=0``: Qwen's
packed vision attention takes no mask). Methods whose count ignores the keep ratio (VTW) run once; methods whose own
schedule does not fit the model's depth are left out, with the reason in report.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from scripts import sweep  # noqa: E402
from calibration import data as calibration_data  # noqa: E402
from calibration.models import FAMILIES, IMAGE_MODELS, LLAVA, QWEN, QWEN_DESCRIBE  # noqa: E402

RATIOS = (0.5, 0.25, 0.111)
VIDEO_RATIOS = (0.5, 0.25, 0.1, 0.05)
PLOT_FILE = "calibration_accuracy.png"
CACHE_PLOT_FILE = "calibration_cache.png"  # --task describe: accuracy vs cached tokens per layer
REPORT_FILE = "report.md"
# Hyper-parameters fitted to the calibration model's size (see the module docstring).
SMALL_MODEL_PARAMS = {"VTC_CLS_START_LAYER": "-1", "PRUMERGE_ADAPTIVE": "0"}
# Per runner: Qwen's packed vision attention takes no mask, so ToMe in its encoder runs without proportional attention;
# on CLIP (LLaVA) VTC-CLS sums the [CLS] rows of layers start..-2 (the last layer unused), so its last layer alone is -2.
RUNNER_PARAMS = {QWEN.runner: {"TOME_PROP_ATTN": "0"}, LLAVA.runner: {"VTC_CLS_START_LAYER": "-2"}}
RATIO_FREE = ("vtw_intra_llm",)  # the method withdraws every visual token: KEEP_RATIO is ignored
RUNNER_FLAGS = ["--device", "cpu", "--judge", "exact_matching",
                "--model-kwargs", json.dumps({"max_new_tokens": 4})]  # an attribute word and <|im_end|>


def registered_methods(kv: bool = False) -> list[str]:
    """The token-pruning methods, and with ``kv`` the KV-cache methods. Those are left out of the one-word tasks:
    their answer is the first generated token, which the prefill decides before any cache compression (every KV
    method would score as stock)."""
    import methods

    return sorted(name for name, spec in methods.load_methods([]).items() if kv or spec.stage != methods.KV)


def unfit_schedules(method_names: list[str], checkpoint: Path, ratio: float) -> dict[str, str]:
    """The methods whose own multi-layer schedule does not fit the checkpoint's decoder depth at ``ratio``, with the
    runner's own refusal (``PruneConfig.resolved_for``; e.g. MustDrop's four stages on a 4-layer calibration model)."""
    from utils import PruneConfig, PruneConfigError

    config = json.loads((checkpoint / "config.json").read_text())
    depth = config.get("text_config", config)["num_hidden_layers"]
    unfit = {}
    for name in (name for name in method_names if not name.endswith("_kv")):  # a KV method has no schedule
        try:
            PruneConfig.from_env({"PRUNE_METHOD": name, "KEEP_RATIO": f"{ratio:g}"}).resolved_for(depth)
        except PruneConfigError as err:
            unfit[name] = str(err)
    return unfit


def plan(checkpoint: Path, method_names: list[str], ratios: list[float], work_dir: Path,
         runner: str = QWEN.runner, intra_layer: int | None = None, batch_size: int = 1,
         dataset: str = calibration_data.NAME) -> list[sweep.Job]:
    """Stock, then every method at every ratio (ratio-free ones once). With ``intra_layer``, intra-LLM methods
    that run at one layer run at that layer (``INTRA_LLM_LAYER_SPECS``) instead of their default one.
    ``batch_size``: the runners' ``--batch-size``."""
    flags = RUNNER_FLAGS + (["--batch-size", str(batch_size)] if batch_size > 1 else [])

    def jobs(names, ratios_, stock):
        return sweep.plan(f"{runner}.py", [str(checkpoint)], [dataset], names, ratios_,
                          str(work_dir), stock=stock, extra=flags)

    with_ratio = [m for m in method_names if m not in RATIO_FREE]
    ratio_free = [m for m in method_names if m in RATIO_FREE]
    planned = jobs(with_ratio, ratios, True) + (jobs(ratio_free, ratios[:1], False) if ratio_free else [])
    if intra_layer is None:
        return planned
    import methods

    # Intra-LLM methods that run at one layer: not stock, a pre-LLM, ViT or KV method, nor one with its own schedule.
    single_layer = {name for name, spec in methods.load_methods([]).items()
                    if spec.stage == methods.INTRA_LLM and spec.default_layer is not None}
    return [_at_layer(job, intra_layer) if job.env.get("PRUNE_METHOD") in single_layer else job
            for job in planned]


def cls_row_methods(method_names: list[str]) -> list[str]:
    """The pre-LLM methods that read a vision encoder's [CLS] row where it has one (PruMerge, PruMerge+, VisionZip,
    VisPruner, VTC-CLS, FasterVLM, ...): those whose signal ``CLS_SIGNAL=substitute`` replaces (HiPrune's official
    CLIP signal is the attention received already)."""
    import methods

    registry = methods.load_methods([])
    chosen = []
    for name in method_names:
        spec = registry[name]
        needs = spec.vision_needs({param.env: param.default for param in spec.params}) if spec.vision else None
        if needs is not None and needs.cls_heads != "received":
            chosen.append(name)
    return chosen


def with_cls_substitute(jobs: list[sweep.Job], names: list[str]) -> list[sweep.Job]:
    """Each job of a method in ``names`` again under ``CLS_SIGNAL=substitute`` (its own run and label)."""
    return [dataclasses.replace(job, label=f"{job.label}+cls_substitute", env={**job.env, "CLS_SIGNAL": "substitute"})
            for job in jobs if job.env.get("PRUNE_METHOD") in names]


def equal_cache_budgets(ratios: list[float], samples: list[dict], family=QWEN_DESCRIBE) -> list[float]:
    """The KV_BUDGET fractions at which a KV method caches, per layer, as many entries as a token-pruning method at
    each keep ratio (which drops ``(1 - ratio) x visual`` of each prompt's entries), over ``samples``' prompts."""
    from calibration import train as training

    processor = family.build_processor()
    lengths, visual = [], []
    for sample in samples:
        ids = processor(text=[training.chat_text(sample, family)], images=[[sample["image"]]])["input_ids"][0]
        lengths.append(len(ids))
        visual.append(sum(1 for i in ids if i == processor.image_token_id))
    length, visual_tokens = sum(lengths) / len(lengths), sum(visual) / len(visual)
    return [round(1 - (1 - ratio) * visual_tokens / length, 3) for ratio in ratios]


def _at_layer(job: sweep.Job, layer: int) -> sweep.Job:
    """The job with its (single-layer intra-LLM) method at ``layer`` through ``INTRA_LLM_LAYER_SPECS``."""
    name, ratio = job.env["PRUNE_METHOD"], job.env["KEEP_RATIO"]
    model, _ = job.label.split("__", 1)
    return dataclasses.replace(job, label=f"{model}__L{layer}-{name}-{ratio}",
                               env={"INTRA_LLM_LAYER_SPECS": f"{layer}:{name}:{ratio}"})


def panel(method: str, stage: str, video: bool) -> str | None:
    """The plot panel of a table row: its stage kind (pre-LLM, intra-LLM; ViT methods are in the table only), and
    for the video task the video methods apart from the image methods (which prune frame by frame)."""
    import methods

    kind = next((k for k in ("pre-LLM", "intra-LLM") if stage.startswith(k)), None)
    if kind is None or not video:
        return kind
    spec = methods.load_methods([]).get(method.split(" + ")[0])
    return "video" if spec is not None and spec.video else f"{kind} image (frame by frame)"


def plot(table, path: Path, title: str, category: str | None = None, video: bool = False) -> Path:
    """Accuracy (overall, or of one question ``category``) vs keep ratio, one panel per stage kind that was run
    (pre-LLM, intra-LLM; with ``video``: video methods, then image methods frame by frame), stock dashed, random
    thick. Methods that ignore the keep ratio (VTW) are in the table only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    column = "score" if category is None else f"cat:{category}"
    curves = table[~table["method"].isin(("stock", *RATIO_FREE))]
    panels = [panel(m, st, video) for m, st in zip(curves["method"], curves["stage"])]
    order = ("video", "pre-LLM", "pre-LLM image (frame by frame)", "intra-LLM", "intra-LLM image (frame by frame)")
    kinds = [kind for kind in order if kind in panels] or ["pre-LLM"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(max(9, 6.5 * len(kinds)), 5), sharey=True, squeeze=False)
    stock = table.loc[table["method"] == "stock", column]
    for ax, kind in zip(axes[0], kinds):
        rows = curves[[p == kind for p in panels]]
        for method, line in rows.groupby("method"):
            line = line.sort_values("keep_ratio")
            is_random = method.startswith("random")
            ax.plot(line["keep_ratio"], line[column], marker="o", linewidth=3 if is_random else 1.3,
                    color="grey" if is_random else None, label=method.removesuffix("_pre_llm").removesuffix("_intra_llm"))
        for score in stock:
            ax.axhline(score, color="black", linestyle="--", linewidth=1, label="stock (keep 1.0)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the measured ratios are labelled
        ax.set_xticks(sorted(set(rows["keep_ratio"])) or [1.0])
        ax.set_xticklabels([f"{r:g}" for r in sorted(set(rows["keep_ratio"]))] or ["1"])
        ax.set_xlabel("keep ratio (KEEP_RATIO)")
        ax.set_title(f"{kind} methods" if kind != "video" else "video methods (each clip whole)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("accuracy (%)" if category is None else f"accuracy on {category} questions (%)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_cache(table, path: Path, title: str) -> Path:
    """Accuracy vs the mean cached tokens per layer of every run: token pruning (pre-LLM, intra-LLM) solid, KV-cache
    methods dashed, stock a star; so methods of both kinds compare at the same cache size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 6))
    for method, line in table[table["method"] != "stock"].groupby("method"):
        line = line.sort_values("cached_tokens")
        kv = line["stage"].str.contains("KV cache").any()
        ax.plot(line["cached_tokens"], line["score"], marker="s" if kv else "o", linestyle="--" if kv else "-",
                linewidth=2.2 if kv else 1.1, label=method)
    stock = table[table["method"] == "stock"]
    ax.scatter(stock["cached_tokens"], stock["score"], marker="*", s=160, color="black", zorder=3, label="stock")
    ax.set_xlabel("cached tokens per layer (mean over layers and questions)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


CROSS_FAMILY_FILE = "cross_family"  # .md / .csv / .png, written by --family all


def learned_score(table):
    """Each run's accuracy on the question types its model has learned (stock >= 95 %), the types weighted alike,
    and the names of those types; the overall score where none is."""
    categories = [c for c in table if c.startswith("cat:")]
    stock = table[table["method"] == "stock"]
    learned = [c for c in categories if not stock.empty and float(stock[c].iloc[0]) >= 95.0]
    if not learned:
        return table["score"], []
    return table[learned].mean(axis=1), [c.removeprefix("cat:") for c in learned]


def cross_family_table(tables: dict):
    """One row per method (and stage), one column per (family, keep ratio): the accuracy on each model's learned
    question types; the stock row first. ``tables``: family name -> its ``summarize.collect`` table."""
    import pandas as pd

    rows, learned = [], {}
    for family, table in tables.items():
        scores, learned[family] = learned_score(table)
        for row, score in zip(table.itertuples(), scores):
            if row.method in RATIO_FREE:
                continue
            keep = "stock" if row.method == "stock" else f"{row.keep_ratio:g}"
            stage = "-" if row.method == "stock" else row.stage
            rows.append({"method": row.method, "stage": stage, "column": f"{family} @ {keep}", "score": score})
    frame = pd.DataFrame(rows)
    wide = frame.pivot_table(index=["method", "stage"], columns="column", values="score", aggfunc="first")
    ordered = [c for family in tables for c in sorted((c for c in wide.columns if c.startswith(f"{family} @ ")),
                                                      key=lambda c: (c.endswith("stock"), c), reverse=True)]
    wide = wide[ordered].reset_index()
    wide["stock_first"] = wide["method"] != "stock"
    wide = wide.sort_values(["stock_first", "stage", "method"]).drop(columns="stock_first").reset_index(drop=True)
    return wide, learned


def plot_cross_family(tables: dict, path: Path, title: str) -> Path:
    """Accuracy (on each model's learned question types) vs keep ratio, one panel per family, every pre-LLM and
    intra-LLM method; a method has one colour in every panel; runs under ``CLS_SIGNAL=substitute`` dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = sorted({m.removesuffix(" ([CLS] substitute)") for t in tables.values() for m in t["method"]
                    if m != "stock" and m not in RATIO_FREE})
    colours = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 6), sharey=True, squeeze=False)
    for ax, (family, table) in zip(axes[0], tables.items()):
        scores, learned = learned_score(table)
        table = table.assign(learned=scores.values)
        for method, line in table[~table["method"].isin(("stock", *RATIO_FREE))].groupby("method"):
            line = line.sort_values("keep_ratio")
            base = method.removesuffix(" ([CLS] substitute)")
            ax.plot(line["keep_ratio"], line["learned"], marker="o", color=colours[base],
                    linestyle="--" if base != method else "-", linewidth=1.2,
                    label=method.replace("_pre_llm", "").replace("_intra_llm", ""))
        for score in table.loc[table["method"] == "stock", "learned"]:
            ax.axhline(score, color="black", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ratios = sorted(set(table.loc[table["method"] != "stock", "keep_ratio"]))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(ratios or [1.0])
        ax.set_xticklabels([f"{r:g}" for r in ratios] or ["1"])
        ax.set_xlabel("keep ratio (KEEP_RATIO)")
        ax.set_title(f"{family} ({', '.join(learned) or 'all'} questions)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    handles = {}  # one legend entry per label over the panels
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def write_cross_family(tables: dict, work: Path, title: str, seconds: float) -> list[Path]:
    """``cross_family.md`` / ``.csv`` / ``.png`` from the per-family tables."""
    from tabulate import tabulate

    wide, learned = cross_family_table(tables)
    csv = work / f"{CROSS_FAMILY_FILE}.csv"
    wide.to_csv(csv, index=False)
    shown = wide.copy()
    for column in shown.columns[2:]:
        shown[column] = shown[column].map(lambda v: "" if v != v else f"{v:.1f}")
    text = "\n".join([
        f"# Calibration report across families: {title}",
        "",
        f"Machine: {machine()}; total time {seconds / 60:.1f} min. Accuracy (%) on the question types each model "
        "has learned (stock >= 95 %): " + "; ".join(f"{family}: {', '.join(types) or 'all'}"
                                                      for family, types in learned.items()) + ".",
        "Each family's own report (every column, per question type) is in its folder.",
        "",
        tabulate(shown, headers="keys", tablefmt="github", showindex=False, disable_numparse=True),
        "",
    ])
    markdown = work / f"{CROSS_FAMILY_FILE}.md"
    markdown.write_text(text)
    return [csv, markdown, plot_cross_family(tables, work / f"{CROSS_FAMILY_FILE}.png", title)]


def machine() -> str:
    """The CPU model (Linux), core count and Python version."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def write_report(table, work: Path, title: str, seconds: float, parallel: int, intra_layer: int | None,
                 in_process: bool = False, batch_size: int = 1, video: bool = False,
                 skipped: dict[str, str] | None = None, params: dict[str, str] | None = None) -> Path:
    from scripts import summarize

    params = SMALL_MODEL_PARAMS if params is None else params
    mode = "configurations sharing runner processes" if in_process else "one runner process per configuration"
    text = "\n".join([
        f"# Calibration report: {title}",
        "",
        f"Machine: {machine()}; {parallel} runner process(es) at a time, {mode}, batch size {batch_size}; "
        f"total time {seconds / 60:.1f} min.",
        f"Settings for the small model: {', '.join(f'{k}={v}' for k, v in params.items())}.",
        "Single-layer intra-LLM methods at " + ("their default layers." if intra_layer is None
                                                 else f"layer {intra_layer} (INTRA_LLM_LAYER_SPECS)."),
        *(["Video methods see each clip whole; the image methods see it frame by frame (IMAGE_METHODS_ON_VIDEO="
           "frame: each temporal step of two frames is an image with its own keep count)."] if video else []),
        *(["Not run (their own schedule does not fit the model's depth): "
           + "; ".join(f"{name} ({why})" for name, why in skipped.items()) + "."] if skipped else []),
        "",
        summarize.format_table(table),
        "",
    ])
    path = work / REPORT_FILE
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("image", "describe", "video"), default="image",
                        help="image: ShapesCalib on --family's model; describe: ShapesDescribe (two-word answers) on "
                             "the describe model (Qwen2.5-VL), KV-cache methods included; video: ShapesMotionCalib "
                             "clips on the video calibration model (Qwen2.5-VL), keep ratios down to 0.05")
    parser.add_argument("--family", choices=[*sorted(IMAGE_MODELS), "all"], default=QWEN.name,
                        help="model family (or variant, e.g. qwen2.5-vl-graded): its shipped checkpoint and runner; "
                             "all: every family's report (each in <work-dir>/<family>), then one cross-family table "
                             "and plot (cross_family.md/.csv/.png)")
    parser.add_argument("--checkpoint", default=None, help="default: the family's shipped calibration model")
    parser.add_argument("--work-dir", default="calibration_outputs")
    parser.add_argument("--samples", type=int, default=None, help="held-out questions (default: 300; video: 150)")
    parser.add_argument("--methods", nargs="+", default=None, help="registered method names (default: all)")
    parser.add_argument("--ratios", nargs="+", type=float, default=None,
                        help=f"default: {' '.join(map(str, RATIOS))}; video: {' '.join(map(str, VIDEO_RATIOS))}")
    parser.add_argument("--parallel", type=int, default=2, help="runner processes at a time (one thread each)")
    parser.add_argument("--separate-processes", action="store_true",
                        help="one runner process per configuration (default: configurations share processes that "
                             "load the model once; same run folders and predictions)")
    parser.add_argument("--batch-size", type=int, default=8, help="the runners' --batch-size (same predictions)")
    parser.add_argument("--intra-layer", type=int, default=None,
                        help="run the single-layer intra-LLM methods at this decoder layer instead of their default "
                             "(the calibration models read the asked object into text tokens at layer 1)")
    parser.add_argument("--plot-category", choices=calibration_data.CATEGORIES, default=None,
                        help="plot the accuracy on this question type instead of the overall accuracy (e.g. colour "
                             "for the Gemma 4 model, which has learned only those)")
    args = parser.parse_args(argv)
    if args.family == "all":
        if args.task != "image" or args.checkpoint:
            parser.error("--family all: the image task on every shipped model; --task and --checkpoint do not apply")
        started, work, failed = time.time(), Path(args.work_dir).resolve(), 0
        for name in FAMILIES:  # each family's report with the same flags, into <work-dir>/<family>
            failed |= report(argparse.Namespace(**{**vars(args), "family": name, "work_dir": str(work / name)}), parser)
        from scripts import summarize

        tables = {name: summarize.collect(work / name / "runs") for name in FAMILIES}
        title = f"{calibration_data.NAME}, {args.samples or 300} held-out questions" + (
            "" if args.intra_layer is None else f", intra-LLM at layer {args.intra_layer}")
        written = write_cross_family(tables, work, title, time.time() - started)
        print("\n".join(f"wrote {path}" for path in written))
        return failed
    return report(args, parser)


def report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """One model's report from the parsed command line (``parser`` reports bad combinations)."""
    video, describe = args.task == "video", args.task == "describe"
    if video or describe:
        if args.family != QWEN.name:
            parser.error(f"--family {args.family}: the {args.task} calibration model is a Qwen2.5-VL; allowed with "
                         f"--task {args.task}: {QWEN.name}")
        args.plot_category = None
    if video:
        from calibration import video as video_task
    family = QWEN_DESCRIBE if describe else IMAGE_MODELS[args.family]
    default_checkpoint = video_task.CHECKPOINT if video else family.checkpoint
    checkpoint = Path(args.checkpoint or default_checkpoint).resolve()
    if not (checkpoint / "config.json").is_file():
        how = f"task {args.task}" if video or describe else f"family {family.name}"
        parser.error(f"--checkpoint {checkpoint}: no model there (config.json missing); train one with "
                     f"python -m calibration.train --{how} --out {checkpoint}")
    samples = args.samples or (150 if video else 300)
    ratios = args.ratios or list(VIDEO_RATIOS if video else RATIOS)
    started = time.time()
    work = Path(args.work_dir).resolve()
    lmudata = work / "LMUData"
    if video:
        video_task.write_dataset(lmudata, n=samples)
        dataset, data_name = f"{video_task.NAME}_{video_task.FRAMES}frame", video_task.NAME
    else:
        dataset = data_name = calibration_data.DESCRIBE_NAME if describe else calibration_data.NAME
        calibration_data.write_dataset(lmudata, n=samples, name=dataset)
    method_names = args.methods or registered_methods(kv=describe)
    skipped = unfit_schedules(method_names, checkpoint, min(ratios))
    for name, why in skipped.items():
        print(f"not run: {name} ({why})", flush=True)
    method_names = [name for name in method_names if name not in skipped]
    batch_size = 1 if video else args.batch_size  # video sets are generated one question at a time
    token_methods = [name for name in method_names if not name.endswith("_kv")]
    jobs = plan(checkpoint, token_methods, ratios, work / "runs", runner=family.runner,
                intra_layer=args.intra_layer, batch_size=batch_size, dataset=dataset)
    if family.reads_cls_row:  # the [CLS] methods read a true [CLS] row: also with the substitute, beside them
        jobs += with_cls_substitute(jobs, cls_row_methods(token_methods))
    kv_methods = [name for name in method_names if name.endswith("_kv")]
    if kv_methods:  # KV budgets that cache as many entries as the token methods at each keep ratio
        sample_prompts = [calibration_data.make_describe_sample(i, calibration_data.EVAL_SEED) for i in range(20)]
        budgets = equal_cache_budgets(ratios, sample_prompts, family)
        print("KV budgets at the token methods' cache sizes: " + ", ".join(
            f"keep {r:g} -> {b:g}" for r, b in zip(ratios, budgets)), flush=True)
        jobs += [job for job in plan(checkpoint, kv_methods, budgets, work / "runs", runner=family.runner,
                                     batch_size=batch_size, dataset=dataset) if job.env]  # stock is planned once
    print(f"{len(jobs)} runs of {samples} questions into {work}", flush=True)
    params = {**SMALL_MODEL_PARAMS, **RUNNER_PARAMS.get(family.runner, {})}
    env = {**os.environ, "LMUData": str(lmudata), **params}
    failed = sweep.run(jobs, work / "runs" / "sweep_logs", env, parallel=args.parallel,
                       in_process=not args.separate_processes)

    # Importing vlmeval logs an ERROR when it finds no .env file of API keys; none is needed offline.
    logging.getLogger().addFilter(lambda record: "Did not detect the .env file" not in record.getMessage())
    from scripts import summarize

    table = summarize.collect(work / "runs")
    named = checkpoint.name if checkpoint.name == family.name else f"{checkpoint.name} ({family.name})"
    title = f"{named} on {data_name}, {samples} held-out questions" + (
        "" if args.intra_layer is None else f", intra-LLM at layer {args.intra_layer}") + (
        f", {video_task.FRAMES} frames per clip" if video else "")
    written = summarize.save_table(table, work) + [
        plot(table, work / PLOT_FILE, title, args.plot_category, video),
        *([plot_cache(table, work / CACHE_PLOT_FILE, title)] if describe else []),
        write_report(table, work, title, time.time() - started, args.parallel, args.intra_layer,
                     not args.separate_processes, batch_size, video, skipped, params)]
    print(summarize.format_table(table), flush=True)
    print("\n".join(f"wrote {path}" for path in written))
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
    print(f"done in {(time.time() - started) / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
