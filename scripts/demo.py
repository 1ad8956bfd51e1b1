"""The offline demo: the shipped calibration model, its held-out questions, the real VLMEvalKit pipeline.

On a machine without network or GPU: evaluates the calibration model (``calibration/qwen2.5-vl-shapes``, a
tiny Qwen2.5-VL trained here on coloured shapes, see ``calibration/train.py``) on held-out questions
(``calibration/data.py``) with ``run_qwenvl.py``: stock, then random, DivPrune (pre-LLM) and FastV
(intra-LLM, before layer 2) at a couple of keep ratios, VLMEvalKit's exact-matching judge. The answer to each
question lives in one known visual token, so the table shows real differences between methods. Prints the results
table and writes it, the accuracy plot and the kept-token view into the work dir.

The configurations share one runner process that loads the model once (``scripts/sweep.py --in-process``) and
generates 8 questions per call (``--batch-size 8``); ``--separate-processes --batch-size 1`` runs one process per
configuration and one question at a time, as before, with the same predictions (about 3 minutes).

    python scripts/demo.py                      # about a minute on 2 CPU cores; outputs in demo_outputs/

A second run reuses the predictions already in the work dir (VLMEvalKit resumes); delete it to start over.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from scripts import calibration_report, sweep  # noqa: E402
from calibration import data as calibration_data  # noqa: E402
from calibration.models import QWEN  # noqa: E402

METHODS = ("random_pre_llm", "divprune_pre_llm", "fastv_intra_llm")
RATIOS = (0.25, 0.111)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="demo_outputs")
    parser.add_argument("--checkpoint", default=str(QWEN.checkpoint), help="any Qwen-VL checkpoint folder")
    parser.add_argument("--samples", type=int, default=90, help="held-out questions")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--parallel", type=int, default=None,
                        help="runner processes at a time (one thread each); default: 1 (torch's threads) when the "
                             "configurations share a process, 2 with --separate-processes")
    parser.add_argument("--separate-processes", action="store_true",
                        help="one runner process per configuration (default: configurations share processes that "
                             "load the model once; same run folders and predictions)")
    parser.add_argument("--batch-size", type=int, default=8, help="the runners' --batch-size (same predictions)")
    args = parser.parse_args(argv)
    if args.parallel is None:  # one process pays the start-up (imports) once; a second would only split the cores
        args.parallel = 2 if args.separate_processes else 1
    started = time.time()
    work = Path(args.work_dir).resolve()
    lmudata = work / "LMUData"
    print(f"[1/4] {args.samples} held-out questions in {lmudata}", flush=True)
    checkpoint = Path(args.checkpoint).resolve()
    calibration_data.write_dataset(lmudata, args.samples)

    print("[2/4] VLMEvalKit runs (stock, then each method and keep ratio)", flush=True)
    jobs = calibration_report.plan(checkpoint, args.methods, args.ratios, work / "runs", batch_size=args.batch_size)
    failed = sweep.run(jobs, work / "runs" / "sweep_logs", {**os.environ, "LMUData": str(lmudata)},
                       parallel=args.parallel, in_process=not args.separate_processes)
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
        return 1

    print("[3/4] results", flush=True)
    # Importing vlmeval logs an ERROR when it finds no .env file of API keys; none is needed offline.
    logging.getLogger().addFilter(lambda record: "Did not detect the .env file" not in record.getMessage())
    from scripts import summarize

    table = summarize.collect(work / "runs")
    written = summarize.save_table(table, work) + [summarize.plot_accuracy(table, work / summarize.PLOT_FILE)]
    print(summarize.format_table(table), flush=True)

    print("[4/4] kept-token view", flush=True)
    written.append(kept_token_view(checkpoint, args.methods, min(args.ratios), work / "kept_tokens.png"))
    print("\n".join(f"wrote {path}" for path in written))
    print(f"done in {time.time() - started:.0f} s")
    return 0


def kept_token_view(checkpoint: Path, methods, ratio: float, path: Path) -> Path:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from scripts import kept_tokens

    sample = calibration_data.make_sample(0, calibration_data.EVAL_SEED)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    configs = {"stock": kept_tokens.method_config(None, 1.0)}
    configs.update({f"{m} @ {ratio:g}": kept_tokens.method_config(m, ratio) for m in methods})
    masks, resized = kept_tokens.kept_masks(model, processor, sample["image"], calibration_data.mcq_prompt(sample),
                                             configs)
    return kept_tokens.render(resized, masks, path)


if __name__ == "__main__":
    sys.exit(main())
