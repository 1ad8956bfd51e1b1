"""The offline demo: tiny local checkpoint, generated multiple-choice data, the real VLMEvalKit pipeline.

On a machine without network or GPU: builds a tiny random Qwen2.5-VL checkpoint (answers restricted to the
letters A-D) and a 32-question data set of generated shape images, evaluates it with ``run_qwenvl.py`` stock
and with a few methods at a couple of keep ratios (one runner process per configuration, VLMEvalKit's
exact-matching judge), then prints the results table and writes the table, the accuracy plot and the
kept-token view into the work dir. The model is random, so its accuracy is chance level: the demo shows the
pipeline, not a method ranking.

    python scripts/demo.py                      # about two minutes on 2 CPU cores; outputs in demo_outputs/

A second run reuses the predictions already in the work dir (VLMEvalKit resumes); delete it to start over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from scripts import shapes_data, sweep  # noqa: E402

METHODS = ("divprune_pre_llm", "fastv_intra_llm")
RATIOS = (0.25, 0.5)


def build_demo_checkpoint(folder: Path) -> Path:
    """The demo's model: a tiny random Qwen2.5-VL that answers with one of A-D. Swap in any Qwen-VL checkpoint
    folder (e.g. a trained calibration model) here."""
    from scripts.tiny_checkpoints import save_checkpoint

    if not (folder / "config.json").exists():
        save_checkpoint(folder, family="qwen2_5_vl", answers="ABCD")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="demo_outputs")
    parser.add_argument("--samples", type=int, default=32, help="questions in the generated data set")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    args = parser.parse_args(argv)
    started = time.time()
    work = Path(args.work_dir).resolve()
    lmudata = work / "LMUData"
    print(f"[1/4] tiny checkpoint and {args.samples}-question data set in {work}", flush=True)
    checkpoint = build_demo_checkpoint(work / "checkpoints" / "tiny-qwen2.5-vl")
    shapes_data.write_dataset(lmudata, args.samples)

    print("[2/4] VLMEvalKit runs (stock, then each method and keep ratio)", flush=True)
    runner_flags = ["--device", "cpu", "--judge", "exact_matching",
                    "--model-kwargs", json.dumps({"max_new_tokens": 1})]  # one letter is the whole answer
    jobs = sweep.plan("run_qwenvl.py", [str(checkpoint)], [shapes_data.NAME], args.methods, args.ratios,
                      str(work / "runs"), stock=True, extra=runner_flags)
    failed = sweep.run(jobs, work / "runs" / "sweep_logs", {**os.environ, "LMUData": str(lmudata)})
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

    question = shapes_data.make_question(0)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    configs = {"stock": kept_tokens.method_config(None, 1.0)}
    configs.update({f"{m} @ {ratio:g}": kept_tokens.method_config(m, ratio) for m in methods})
    masks, resized = kept_tokens.kept_masks(model, processor, question["image"], question["question"], configs)
    return kept_tokens.render(resized, masks, path)


if __name__ == "__main__":
    sys.exit(main())
