"""One table (and a plot) from a work dir of runner outputs.

For every run folder the runners wrote (``<work dir>/<model>__<tag>__<hash>/`` with ``pruning_config.json``) and
every data set VLMEvalKit evaluated there, one row: model, data set, method, stage, effective keep ratio,
visual tokens per sample before -> after pruning (from the recorded token counts), VLMEvalKit's primary
metric, its difference from the stock run of the same model and data set, and the accuracy per category for
categories with at least ``--min-category-samples`` samples (from VLMEvalKit's per-sample judge file).

A metric whose values all lie in [0, 1] (an accuracy) is shown in percent, and differences in points. Runs profiled
with METHOD_TIME / PREFILL_TIME also get the medians of their profile summary (``profile_summary_<data>.json``;
definitions in docs/profiling.md): time to first token, prefill, pruning, decode per token, KV cache, peak
memory and equivalent visual tokens.

    python scripts/summarize.py WORK_DIR            # writes summary.csv, summary.json, accuracy_vs_keep_ratio.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import profiling  # noqa: E402
from evalkit import RUN_CONFIG_FILE, TOKENS_FILE  # noqa: E402

TABLE_FILES = ("summary.csv", "summary.json")
# Profile metrics (medians over the profiled samples): column -> (metric, scale, title in the printed table or None)
PROFILE_COLUMNS = {
    "ttft_ms": ("ttft_ms", 1, "TTFT ms"),
    "prefill_ms": ("prefill_ms", 1, "prefill ms"),
    "pruning_ms": ("pruning_ms", 1, "pruning ms"),
    "vision_encoder_ms": ("vision_encoder_ms", 1, None),
    "llm_prefill_ms": ("llm_prefill_ms", 1, None),
    "decode_ms_per_token": ("decode_ms_per_token", 1, "decode ms/token"),
    "kv_cache_mib": ("kv_cache_bytes", 2 ** -20, "KV MiB"),
    "peak_memory_mib": ("peak_memory_bytes", 2 ** -20, "peak MiB"),
    "equivalent_tokens": ("equivalent_visual_tokens", 1, "equiv. tokens"),
}
PLOT_FILE = "accuracy_vs_keep_ratio.png"


# --------------------------------------------------------------------------------------------------
# Reading one run
# --------------------------------------------------------------------------------------------------
def describe_stages(pruning: dict) -> tuple[str, str, float]:
    """(method, stage, effective keep ratio) of a run's resolved pruning configuration.

    The effective ratio is the fraction of the encoder's visual tokens left after the last stage (intra-LLM
    ratios are fractions of the tokens that entered the language model, so they multiply the pre-LLM one); for a
    KV-cache method alone, its budget as a fraction of each layer's cache entries. A run under
    ``CLS_SIGNAL=substitute`` is labelled "<method> ([CLS] substitute)".
    """
    vit, pre, intra = pruning.get("vit") or [], pruning.get("pre_llm"), pruning.get("intra_llm") or []
    scheduled = pruning.get("scheduled")  # a method that picks its own layers from the model's depth
    kv = pruning.get("kv")  # the KV-cache stage: its budget is a fraction of cache entries, or a count
    if not vit and not pre and not intra and not scheduled:
        if kv:  # KV compression alone: the kept share of each layer's cache stands as the ratio (NaN for a count)
            return kv["method"], "KV cache", kv["fraction"] if kv.get("fraction") is not None else float("nan")
        return "stock", "-", 1.0
    methods = [s["method"] for s in vit] + ([pre["method"]] if pre else []) + [s["method"] for s in intra]
    stages = [f"ViT B{s['layer']}" if s["layer"] is not None else "ViT scheduled" for s in vit] + (["pre-LLM"] if pre else []) + \
        [f"intra-LLM L{s['layer']}" for s in intra]
    # Before the language model: the ViT stages' last ratio, or the pre-LLM one (a fraction of the same tokens).
    before_lm = min([vit[-1]["ratio"] if vit else 1.0] + ([pre["ratio"]] if pre else []))
    ratio = before_lm * (intra[-1]["ratio"] if intra else 1.0)
    if scheduled:
        methods.append(scheduled["method"])
        stages.append("intra-LLM scheduled")
        ratio *= scheduled["ratio"]
    if kv:  # after token pruning: the ratio stays the visual tokens'; the budget is in the method's name
        methods.append(f"{kv['method']} ({kv['fraction'] if kv.get('fraction') is not None else kv['count']})")
        stages.append("KV cache")
    label = " + ".join(dict.fromkeys(methods))
    if pruning.get("cls_signal") == "substitute":  # CLS_SIGNAL=substitute: the [CLS] row replaced by its substitute
        label += " ([CLS] substitute)"
    return label, " + ".join(stages), ratio


def token_means(run_dir: Path, dataset: str) -> tuple[float, float, int, float]:
    """Mean visual tokens per sample entering the model and left after the last stage, the sample count, and the
    mean prompt entries a decoder layer caches (NaN when the records predate it).

    Records are de-duplicated by sample key (a resumed run may repeat a few samples)."""
    records = {}
    for path in sorted(run_dir.glob(TOKENS_FILE.format(dataset=dataset, rank="*"))):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[record["key"]] = record
    if not records:
        return float("nan"), float("nan"), 0, float("nan")
    tokens = [record["tokens"] for record in records.values()]
    before = [t.get("input", 0) for t in tokens]
    after = [list(t.values())[-1] if t else 0 for t in tokens]
    cached = [record.get("cached_tokens_per_layer") for record in records.values()]
    cached_mean = sum(cached) / len(cached) if None not in cached else float("nan")
    return sum(before) / len(before), sum(after) / len(after), len(records), cached_mean


def per_sample_results(run_dir: Path, name: str, dataset: str) -> pd.DataFrame | None:
    """VLMEvalKit's per-sample judge file (``<name>_<dataset>_<judge>_result.<fmt>``) if it has hits."""
    from vlmeval.smp import load

    for path in sorted(run_dir.glob(f"{name}_{dataset}_*_result.*")):
        if path.suffix in (".xlsx", ".tsv", ".csv", ".json"):
            data = load(str(path))
            if isinstance(data, pd.DataFrame) and "hit" in data:
                return data
    return None


def chance_accuracy(results: pd.DataFrame) -> float | None:
    """The accuracy of guessing uniformly among each question's options: the mean of 1 / options over the rows
    of a multiple-choice judge file (VLMEvalKit MCQ data sets keep their options in columns A, B, C, ...; an empty
    cell is no option). None when the file has no option columns."""
    letters = []
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        if letter not in results:
            break
        letters.append(letter)
    if len(letters) < 2:
        return None
    options = results[letters].apply(lambda column: column.map(lambda v: not pd.isna(v) and str(v).strip() != ""))
    counts = options.sum(axis=1)
    counts = counts[counts > 0]
    return float((1.0 / counts).mean()) if len(counts) else None


def _primary_metric(report_row: dict) -> tuple[str, float]:
    name, value = report_row["primary_metric"], report_row["primary_metric_value"]
    if isinstance(value, dict):  # several primary metrics: the first one
        name, value = next(iter(value.items()))
    return str(name), float(value)


def run_rows(run_dir: Path, min_category_samples: int) -> list[dict]:
    from vlmeval.smp import collect_run_benchmark_report

    config = json.loads((run_dir / RUN_CONFIG_FILE).read_text())
    name = config["model_name"]
    method, stage, ratio = describe_stages(config["pruning"])
    rows = []
    for report in collect_run_benchmark_report(run_dir):
        if report["eval_error"] or report["primary_metric_value"] is None:
            continue
        dataset = report["benchmark"]
        metric, score = _primary_metric(report)
        before, after, recorded, cached = token_means(run_dir, dataset)
        row = {"model": config["base_model"], "dataset": dataset, "method": method, "stage": stage,
               "keep_ratio": ratio, "tokens_before": before, "tokens_after": after, "cached_tokens": cached,
               "metric": metric, "score": score, "samples": report["infer_total"], "token_records": recorded,
               "run": name}
        profile = profiling.load_summary(run_dir, dataset)
        if profile is not None:
            row["profiled_samples"] = profile["profiled"]
            for column, (metric, scale, _) in PROFILE_COLUMNS.items():
                if metric in profile["metrics"]:
                    row[column] = profile["metrics"][metric]["median"] * scale
        results = per_sample_results(run_dir, name, dataset)
        chance = None if results is None else chance_accuracy(results)
        if chance is not None:
            row["chance"] = chance
        if results is not None and "category" in results:
            for category, group in results.groupby("category"):
                if len(group) >= min_category_samples:
                    row[f"cat:{category}"] = float(group["hit"].mean())
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
def collect(work_dir: str | Path, min_category_samples: int = 5) -> pd.DataFrame:
    """One row per (run, data set) in ``work_dir``, with ``delta`` against the stock run."""
    rows = []
    for config_file in sorted(Path(work_dir).glob(f"*/{RUN_CONFIG_FILE}")):
        rows += run_rows(config_file.parent, min_category_samples)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    categories = [c for c in table if c.startswith("cat:")]
    table["unit"] = ""
    scaled = categories + (["chance"] if "chance" in table else [])
    for dataset, group in table.groupby("dataset"):
        if group["score"].between(0, 1).all():  # accuracies: percent
            table.loc[group.index, "score"] *= 100
            table.loc[group.index, scaled] *= 100
            table.loc[group.index, "unit"] = "%"
    stock = table[table["method"] == "stock"].groupby(["model", "dataset"])["score"].first()
    table["delta"] = [row.score - stock.get((row.model, row.dataset), float("nan")) for row in table.itertuples()]
    table = table.sort_values(["model", "dataset", "keep_ratio", "method"], ascending=[True, True, False, True])
    profiled = [c for c in [*PROFILE_COLUMNS, "profiled_samples"] if c in table]
    chance = ["chance"] if "chance" in table else []  # the accuracy of guessing (multiple-choice data sets)
    columns = ["model", "dataset", "method", "stage", "keep_ratio", "tokens_before", "tokens_after", "cached_tokens",
               "metric", "score", "unit", "delta", "samples"] + chance + sorted(categories) + profiled + [
               "token_records", "run"]
    return table[columns].reset_index(drop=True)


def format_table(table: pd.DataFrame) -> str:
    """A GitHub-markdown table, as printed by the demo and shown in the README."""
    from tabulate import tabulate

    shown = pd.DataFrame({
        "model": table["model"], "data set": table["dataset"], "method": table["method"], "stage": table["stage"],
        "keep": table["keep_ratio"].map("{:.3g}".format),
        "visual tokens": [f"{b:.1f} → {a:.1f}" for b, a in zip(table["tokens_before"], table["tokens_after"])],
        "score": [f"{score:.1f}{unit}" for score, unit in zip(table["score"], table["unit"])],
        "Δ vs stock": [("" if pd.isna(d) or m == "stock" else f"{d:+.1f}")
                       for d, m in zip(table["delta"], table["method"])],
    })
    if table["stage"].str.contains("KV cache").any():  # KV-cache runs: compare at equal cache size
        shown["cached tokens / layer"] = table["cached_tokens"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
    for column in [c for c in table if c.startswith("cat:")]:
        shown[column[4:]] = table[column].map(lambda v: "" if pd.isna(v) else f"{v:.0f}")
    for column, (_, _, title) in PROFILE_COLUMNS.items():
        if title and column in table:
            shown[title] = table[column].map(lambda v: "" if pd.isna(v) else f"{v:.3f}" if v < 1 else f"{v:.1f}")
    return tabulate(shown, headers="keys", tablefmt="github", showindex=False, disable_numparse=True)


def save_table(table: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / TABLE_FILES[0], out_dir / TABLE_FILES[1]
    table.to_csv(csv_path, index=False)
    json_path.write_text(table.to_json(orient="records", indent=2, force_ascii=False))
    return [csv_path, json_path]


# --------------------------------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------------------------------
STOCK_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.5, "zorder": 5}  # on top of the method lines
CHANCE_STYLE = {"color": "grey", "linestyle": ":", "linewidth": 1.2, "zorder": 1.5}  # under them


def accuracy_figure(table: pd.DataFrame):
    """The figure of :func:`plot_accuracy` (a matplotlib Figure; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(table.groupby(["model", "dataset"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, ((model, dataset), group) in zip(axes[0], panels):
        unit = group["unit"].iloc[0]
        pruned = group[group["method"] != "stock"]
        for (method, stage), line in pruned.groupby(["method", "stage"]):
            line = line.sort_values("keep_ratio")
            # Not clipped: a line at 100 % stays whole on the fixed 0-100 axis.
            ax.plot(line["keep_ratio"], line["score"], marker="o", label=f"{method} ({stage})", clip_on=False)
        for score in group.loc[group["method"] == "stock", "score"]:
            ax.axhline(score, label=f"stock ({score:.1f}{unit})", clip_on=False, **STOCK_STYLE)
        chance = group["chance"].dropna() if "chance" in group and unit == "%" else pd.Series(dtype=float)
        if len(chance):
            ax.axhline(chance.mean(), label=f"chance ({chance.mean():.3g}%)", **CHANCE_STYLE)
        if unit == "%":
            ax.set_ylim(0, 100)
        # The whole keep-ratio range, ticks where there are runs: one ratio is a point, not a 3-point window.
        ratios = sorted({*pruned["keep_ratio"].round(6), 1.0})
        ax.set_xlim(0, 1.05)
        ax.set_xticks(ratios, [f"{r:.3g}" for r in ratios])
        ax.set_xlabel("keep ratio (fraction of visual tokens kept)")
        ax.set_ylabel("accuracy (%)" if unit == "%" else group["metric"].iloc[0])
        ax.set_title(f"{model} — {dataset}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_accuracy(table: pd.DataFrame, path: str | Path) -> Path:
    """Score vs effective keep ratio, one line per method and stage, stock as a dashed black reference drawn on top,
    chance (multiple-choice data sets) as a dotted grey line; one panel per (model, data set). Accuracies are
    shown on a fixed 0-100 % axis, keep ratios on 0-1."""
    fig = accuracy_figure(table)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir", help="the --work-dir of the runs")
    parser.add_argument("--out", default=None, help="where to write the table and plot (default: WORK_DIR)")
    parser.add_argument("--min-category-samples", type=int, default=5,
                        help="show a category's accuracy when it has at least this many samples")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    table = collect(args.work_dir, args.min_category_samples)
    if table.empty:
        sys.exit(f"no evaluated runs under {args.work_dir} (folders with {RUN_CONFIG_FILE} and a status.json)")
    out = Path(args.out or args.work_dir)
    written = save_table(table, out)
    if not args.no_plot:
        written.append(plot_accuracy(table, out / PLOT_FILE))
    print(format_table(table))
    print("\n" + "\n".join(f"wrote {path}" for path in written))


if __name__ == "__main__":
    main()
