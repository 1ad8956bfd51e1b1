"""Calibration report: accuracy vs keep ratio of every registered method on the calibration model.

The calibration model (``calibration/qwen2.5-vl-shapes``, trained by ``scripts/train_calibration.py``) answers
questions about coloured shapes whose answer lives in one known visual token, so a method that keeps the wrong
tokens loses accuracy visibly. This script evaluates it on the held-out ``ShapesCalib`` data set
(``scripts/calibration_data.py``) through the real runner and VLMEvalKit's exact-matching judge: stock, then
every registered method (pre-LLM and intra-LLM, random included) at each keep ratio, one runner process per
configuration. It writes into the work dir: the results table (``summary.csv``/``.json``, ``report.md`` with
the machine and the time it took) and ``calibration_accuracy.png`` (one panel per stage kind).

    python scripts/calibration_report.py                        # every method, keep 0.5 / 0.25 / 0.111
    python scripts/calibration_report.py --methods fastv_intra_llm divprune_pre_llm --ratios 0.25

Settings fitted to the small model (stated in report.md): VTC-CLS sums the encoder attention of its last
layer only (``VTC_CLS_START_LAYER=-1``: the encoder has 3 layers, the official start layer 16 assumes 24), and
PruMerge/PruMerge+ keep the toolkit's keep count (``PRUMERGE_ADAPTIVE=0``) so that every method is compared at
the same ratio. Methods whose count ignores the keep ratio (VTW) run once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from scripts import calibration_data, sweep  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "calibration" / "qwen2.5-vl-shapes"
RATIOS = (0.5, 0.25, 0.111)
PLOT_FILE = "calibration_accuracy.png"
REPORT_FILE = "report.md"
# Hyper-parameters fitted to the calibration model's size (see the module docstring).
SMALL_MODEL_PARAMS = {"VTC_CLS_START_LAYER": "-1", "PRUMERGE_ADAPTIVE": "0"}
RATIO_FREE = ("vtw_intra_llm",)  # the method withdraws every visual token: KEEP_RATIO is ignored
RUNNER_FLAGS = ["--device", "cpu", "--judge", "exact_matching",
                "--model-kwargs", json.dumps({"max_new_tokens": 4})]  # an attribute word and <|im_end|>


def registered_methods() -> list[str]:
    import methods

    return sorted(methods.load_methods([]))


def plan(checkpoint: Path, method_names: list[str], ratios: list[float], work_dir: Path) -> list[sweep.Job]:
    def jobs(names, ratios_, stock):
        return sweep.plan("run_qwenvl.py", [str(checkpoint)], [calibration_data.NAME], names, ratios_,
                          str(work_dir), stock=stock, extra=RUNNER_FLAGS)

    with_ratio = [m for m in method_names if m not in RATIO_FREE]
    ratio_free = [m for m in method_names if m in RATIO_FREE]
    return jobs(with_ratio, ratios, True) + (jobs(ratio_free, ratios[:1], False) if ratio_free else [])


def plot(table, path: Path) -> Path:
    """Accuracy vs keep ratio, pre-LLM and intra-LLM methods in two panels, stock dashed, random thick. Methods
    that ignore the keep ratio (VTW) are in the table only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    stock = table.loc[table["method"] == "stock", "score"]
    for ax, (title, prefix) in zip(axes, (("pre-LLM", "pre-LLM"), ("intra-LLM", "intra-LLM"))):
        rows = table[table["stage"].str.startswith(prefix) & ~table["method"].isin(RATIO_FREE)]
        for method, line in rows.groupby("method"):
            line = line.sort_values("keep_ratio")
            is_random = method.startswith("random")
            ax.plot(line["keep_ratio"], line["score"], marker="o", linewidth=3 if is_random else 1.3,
                    color="grey" if is_random else None, label=method.removesuffix("_pre_llm").removesuffix("_intra_llm"))
        for score in stock:
            ax.axhline(score, color="black", linestyle="--", linewidth=1, label="stock (keep 1.0)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the measured ratios are labelled
        ax.set_xticks(sorted(set(rows["keep_ratio"])) or [1.0])
        ax.set_xticklabels([f"{r:g}" for r in sorted(set(rows["keep_ratio"]))] or ["1"])
        ax.set_xlabel("keep ratio (KEEP_RATIO)")
        ax.set_title(f"{title} methods")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle(f"Calibration model on {calibration_data.NAME}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def machine() -> str:
    """The CPU model (Linux), core count and Python version."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def write_report(table, work: Path, samples: int, seconds: float, parallel: int) -> Path:
    from scripts import summarize

    text = "\n".join([
        f"# Calibration report: {calibration_data.NAME}, {samples} held-out questions",
        "",
        f"Machine: {machine()}; {parallel} runner process(es) at a time; total time {seconds / 60:.1f} min.",
        f"Settings for the small model: {', '.join(f'{k}={v}' for k, v in SMALL_MODEL_PARAMS.items())}.",
        "",
        summarize.format_table(table),
        "",
    ])
    path = work / REPORT_FILE
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--work-dir", default="calibration_outputs")
    parser.add_argument("--samples", type=int, default=300, help="held-out questions")
    parser.add_argument("--methods", nargs="+", default=None, help="registered method names (default: all)")
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--parallel", type=int, default=2, help="runner processes at a time (one thread each)")
    args = parser.parse_args(argv)
    started = time.time()
    work = Path(args.work_dir).resolve()
    lmudata = work / "LMUData"
    calibration_data.write_dataset(lmudata, n=args.samples)
    method_names = args.methods or registered_methods()
    jobs = plan(Path(args.checkpoint).resolve(), method_names, args.ratios, work / "runs")
    print(f"{len(jobs)} runs of {args.samples} questions into {work}", flush=True)
    env = {**os.environ, "LMUData": str(lmudata), **SMALL_MODEL_PARAMS}
    failed = sweep.run(jobs, work / "runs" / "sweep_logs", env, parallel=args.parallel)

    # Importing vlmeval logs an ERROR when it finds no .env file of API keys; none is needed offline.
    logging.getLogger().addFilter(lambda record: "Did not detect the .env file" not in record.getMessage())
    from scripts import summarize

    table = summarize.collect(work / "runs")
    written = summarize.save_table(table, work) + [plot(table, work / PLOT_FILE),
                                                   write_report(table, work, args.samples, time.time() - started,
                                                                args.parallel)]
    print(summarize.format_table(table), flush=True)
    print("\n".join(f"wrote {path}" for path in written))
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
    print(f"done in {(time.time() - started) / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
