"""Evaluation throughput: samples per second vs ``--batch-size``, and a sweep in one process vs one process each.

1. **Batch size.** The runners' generation path on ShapesCalib (VLMEvalKit's prompts, the wrapper's own processor,
   decoding and post-processing, greedy, at most 4 and 32 new tokens: the calibration answers' length, and an
   open-ended answer's; the random model never stops early): ``generate`` one message at a time (batch 1,
   VLMEvalKit's loop) and ``generate_batch`` (batch N, the runner's ``--batch-size`` loop), samples per second over
   the data set, best of ``--rounds`` rounds with the batch sizes interleaved. Two models: the calibration model
   (``calibration/qwen2.5-vl-shapes``, 1.3 M parameters, 64 visual tokens per image) and the benchmark's mid-size
   random Qwen2.5-VL (``scripts/bench_pruning.py``: 8 layers, hidden 512, 40 M parameters; saved with the calibration
   model's processor, images resized to 256 visual tokens); stock, DivPrune (pre-LLM) and FastV (intra-LLM, layer 2)
   at keep 0.25. Every batch size's predictions are compared with batch 1's.
   Target: batch 8 gives at least 2x the samples per second of batch 1 on the mid-size model (stock).
2. **Sweep.** Wall time of the demo's sweep (``scripts/demo.py``: stock, random / DivPrune / FastV at keep 0.25 and
   0.111 = 7 configurations, ``--sweep-samples`` questions, 90 as in the demo) through ``scripts/sweep.py``: one runner process per
   configuration (2 at a time, the demo's former default) vs the configurations sharing one runner process
   (``--in-process``, the demo's default), each at batch size 1 and 8; the predictions of every mode are compared.
   Target: in one process (batch 8), at least 2x faster than one process each (batch 1).

    python scripts/bench_throughput.py --threads 1          # 2-core CPU: about 30 minutes
    python scripts/bench_throughput.py --device cuda         # part 1 on a GPU (part 2 with --device cuda too)

Prints the tables and the targets as PASS/FAIL lines, writes everything to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import evalkit  # noqa: E402
import run_qwenvl  # noqa: E402
from calibration import data as calibration_data  # noqa: E402
from calibration.models import QWEN  # noqa: E402
from scripts import bench_pruning, calibration_report, demo, sweep  # noqa: E402
from utils import PruneConfig  # noqa: E402

BATCH_SIZES = (1, 2, 4, 8)
CONFIGS = {"stock": {}, "divprune 0.25": {"PRUNE_METHOD": "divprune_pre_llm", "KEEP_RATIO": "0.25"},
           "fastv L2 0.25": {"PRUNE_METHOD": "fastv_intra_llm", "KEEP_RATIO": "0.25"}}
MID_SIZE = dict(layers=8, hidden=512, heads=8, kv_heads=2, intermediate=2752)  # bench_pruning.py's model
MID_TOKENS = 256  # visual tokens per image of the mid-size model (ShapesCalib's 224 x 224 images upscaled)
NEW_TOKENS = (4, 32)  # the calibration answers' length (a word and <|im_end|>); an open-ended answer's


# --------------------------------------------------------------------------------------------------
# 1. Samples per second vs batch size
# --------------------------------------------------------------------------------------------------
def mid_size_checkpoint(folder: Path, size: dict = MID_SIZE) -> Path:
    """The benchmark's mid-size random Qwen2.5-VL (``size``: its shape) with the calibration model's tokenizer and
    processor (images resized to ``MID_TOKENS`` visual tokens), saved."""
    calibration = QWEN.build_config()
    text = calibration.get_text_config()
    ids = dict(image_token_id=calibration.image_token_id, video_token_id=calibration.video_token_id,
               vision_start_token_id=calibration.vision_start_token_id,
               vision_end_token_id=calibration.vision_end_token_id, eos_token_id=text.eos_token_id,
               endoftext_id=text.pad_token_id, vocab_size=text.vocab_size)
    model = bench_pruning.build_model(size["layers"], size["hidden"], size["heads"], size["kv_heads"],
                                      size["intermediate"], torch.device("cpu"), torch.float32, ids=ids)
    processor = copy.deepcopy(QWEN.build_processor())  # cached: a copy to resize
    pixels = MID_TOKENS * 28 * 28
    processor.image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def wrapper(checkpoint: Path, device: str, log_dir: Path):
    """The runner's adapted Qwen2VLChat on ``checkpoint`` (as ``run_qwenvl.py --model <folder>`` builds it)."""
    family = run_qwenvl.FAMILY
    model_type = json.loads((checkpoint / "config.json").read_text())["model_type"]
    load = evalkit.LoadSettings.resolve(device, None, "auto")
    run = evalkit.ModelRun(family, load, evalkit.TokenLog(log_dir, 0))
    return evalkit.adapt(family.wrappers()[model_type], family.mixin)(model_path=str(checkpoint), pruning_run=run)


def answer_all(model, messages: list, batch_size: int) -> list[str]:
    if batch_size == 1:
        return [model.generate(message, calibration_data.NAME) for message in messages]
    answers = []
    for first in range(0, len(messages), batch_size):
        answers += model.generate_batch(messages[first:first + batch_size], calibration_data.NAME)
    return answers


def throughput(model, device: str, messages: list, batch_sizes, rounds: int, new_tokens: int) -> dict:
    """Samples per second of the wrapper ``model`` per configuration and batch size (best of ``rounds``; batch
    sizes interleaved), and whether each batch size's answers equal batch 1's."""
    name = Path(model.model_path).name
    model.generate_kwargs["max_new_tokens"] = new_tokens  # Qwen2VLChat's generation settings
    rows = []
    try:
        for label, env in CONFIGS.items():
            run_qwenvl.FAMILY.patches.apply_patches(PruneConfig.from_env(env))
            answer_all(model, messages[:max(batch_sizes)], max(batch_sizes))  # warm-up
            best, answers = {}, {}
            for round_ in range(rounds):
                for batch_size in batch_sizes:
                    print(f"\r  {name}, {new_tokens} new tokens: {label}, round {round_ + 1}/{rounds}, batch {batch_size}   ",
                          end="", file=sys.stderr, flush=True)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    answers[batch_size] = answer_all(model, messages, batch_size)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    rate = len(messages) / (time.perf_counter() - start)
                    best[batch_size] = max(rate, best.get(batch_size, 0.0))
            rows.append({"config": label, "samples_per_s": best,
                         "same_answers": {n: answers[n] == answers[1] for n in batch_sizes}})
    finally:
        run_qwenvl.FAMILY.patches.remove_patches()
    print(file=sys.stderr)
    return {"model": name, "new_tokens": new_tokens, "parameters": sum(p.numel() for p in model.model.parameters()), "rows": rows}


def batch_part(device: str, samples: int, batch_sizes, rounds: int, new_tokens, work: Path,
               mid_size: dict = MID_SIZE) -> list[dict]:
    """Part 1 (also run by ``scripts/gpu_check.py``): one entry per model and ``new_tokens`` value."""
    from vlmeval.dataset import build_dataset

    lmudata = work / "LMUData"
    calibration_data.write_dataset(lmudata, samples)
    with evalkit._temporarily_env("LMUData", str(lmudata)):  # VLMEvalKit reads its data sets from there
        dataset = build_dataset(calibration_data.NAME)
    results = []
    for checkpoint in (QWEN.checkpoint, mid_size_checkpoint(work / "qwen2.5-vl-mid-size-random", mid_size)):
        log_dir = work / f"tokens-{checkpoint.name}"
        log_dir.mkdir()
        model = wrapper(checkpoint, device, log_dir)
        model.set_dump_image(dataset.dump_image)  # the messages as VLMEvalKit's loop builds them
        messages = [evalkit._build_prompt(model, dataset, dataset.data.iloc[i]) for i in range(len(dataset))]
        for n in new_tokens:
            results.append(throughput(model, device, messages, batch_sizes, rounds, n))
        del model
    return results


# --------------------------------------------------------------------------------------------------
# 2. The demo's sweep: in one process vs one process each
# --------------------------------------------------------------------------------------------------
SWEEP_MODES = {  # label -> (in_process, parallel, batch size)
    "one process per configuration, 2 at a time, batch 1": (False, 2, 1),
    "one process per configuration, 2 at a time, batch 8": (False, 2, 8),
    "one process for all, batch 1": (True, 1, 1),
    "one process for all, batch 8": (True, 1, 8),
}


def predictions(runs_dir: Path) -> dict[str, list[str]]:
    from vlmeval.smp import load

    return {path.parent.name: [str(p) for p in load(str(path))["prediction"]]
            for path in runs_dir.glob(f"*/*_{calibration_data.NAME}.xlsx")}


def sweep_part(device: str, samples: int, work: Path) -> dict:
    lmudata = work / "LMUData"
    calibration_data.write_dataset(lmudata, samples)
    env = {**os.environ, "LMUData": str(lmudata)}
    rows, reference = [], None
    for label, (in_process, parallel, batch_size) in SWEEP_MODES.items():
        runs = work / label.replace(" ", "_").replace(",", "")
        jobs = calibration_report.plan(QWEN.checkpoint.resolve(), list(demo.METHODS), list(demo.RATIOS), runs,
                                       batch_size=batch_size)
        if device != "cpu":
            jobs = [sweep.Job(job.label, job.env, [device if previous == "--device" else token
                                                   for previous, token in zip([None, *job.command], job.command)])
                    for job in jobs]
        print(f"  sweep: {label}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        failed = sweep.run(jobs, runs / "sweep_logs", env, parallel=parallel, in_process=in_process)
        seconds = time.perf_counter() - start
        got = predictions(runs)
        reference = reference or got
        rows.append({"mode": label, "seconds": seconds, "runs": len(jobs), "failed": failed,
                     "runner_processes": len(sweep.processes(jobs, parallel, in_process)),
                     "same_predictions": got == reference and len(got) == len(jobs)})
    return {"samples": samples, "configurations": len(jobs), "rows": rows}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def targets(results: dict) -> list[tuple[str, bool | None, str]]:
    out = []
    for part in results.get("batch", [])[len(results["new_tokens"]):]:  # the mid-size model's
        rate = part["rows"][0]["samples_per_s"]  # stock
        if 8 in rate:
            out.append((f"batch 8 >= 2x the samples/s of batch 1 on the mid-size model (stock, {part['new_tokens']} "
                        f"new tokens)", rate[8] >= 2 * rate[1],
                        f"{rate[8]:.2f} vs {rate[1]:.2f} samples/s = {rate[8] / rate[1]:.2f}x"))
    if results.get("sweep"):
        rows = {row["mode"]: row for row in results["sweep"]["rows"]}
        before = rows["one process per configuration, 2 at a time, batch 1"]["seconds"]
        after = rows["one process for all, batch 8"]["seconds"]
        out.append(("the demo's sweep >= 2x faster in one process (batch 8) than one process each (batch 1)",
                    before >= 2 * after, f"{after:.0f} s vs {before:.0f} s = {before / after:.2f}x"))
    same = all(all(row["same_answers"].values()) for part in results.get("batch", []) for row in part["rows"])
    same = same and all(row["same_predictions"] for row in results.get("sweep", {}).get("rows", []))
    out.append(("every batch size and sweep mode gives the predictions of batch 1, one process each", same, ""))
    return out


def batch_tables(parts: list[dict], samples: int) -> list[str]:
    lines = []
    for part in parts:
        sizes = list(part["rows"][0]["samples_per_s"])
        lines += [f"## Samples per second vs batch size: {part['model']} ({part['parameters'] / 1e6:.1f} M parameters,"
                  f" {samples} ShapesCalib questions, at most {part['new_tokens']} new tokens)", "",
                  bench_pruning.table(["configuration"] + [f"batch {n}" for n in sizes]
                                      + [f"batch {sizes[-1]} / batch 1", "same answers"],
                                      [[row["config"]] + [f"{row['samples_per_s'][n]:.1f}" for n in sizes]
                                       + [f"{row['samples_per_s'][sizes[-1]] / row['samples_per_s'][1]:.2f}x",
                                          str(all(row["same_answers"].values()))] for row in part["rows"]]), ""]
    return lines


def report(results: dict) -> str:
    lines = batch_tables(results.get("batch", []), results["samples"])
    if results.get("sweep"):
        sweep_results = results["sweep"]
        first = sweep_results["rows"][0]["seconds"]
        lines += [f"## The demo's sweep ({sweep_results['rows'][0]['runs']} configurations x "
                  f"{sweep_results['samples']} questions)", "",
                  bench_pruning.table(["mode", "runner processes", "wall s", "speed-up", "same predictions"],
                                      [[row["mode"], row["runner_processes"], f"{row['seconds']:.0f}",
                                        f"{first / row['seconds']:.2f}x", str(row["same_predictions"])]
                                       for row in sweep_results["rows"]]), ""]
    lines += ["## Targets", ""]
    for name, passed, detail in targets(results):
        verdict = "NOT MEASURED" if passed is None else "PASS" if passed else "FAIL"
        lines.append(f"{verdict}: {name}" + (f" ({detail})" if detail else ""))
    info = results["machine"]
    lines += ["", f"Machine: {info['cpu']}, {info['cpu_count']} cores, torch threads {info['torch_threads']}, "
                  f"{info.get('gpu', 'no GPU')}, torch {info['torch']}; load average at start / end: "
                  f"{results['load_average'][0]} / {results['load_average'][1]}; {results['seconds']:.0f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads of part 1 (0: torch's default)")
    parser.add_argument("--samples", type=int, default=32, help="ShapesCalib questions of part 1")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=list(NEW_TOKENS),
                        help="most new tokens per answer, part 1")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--rounds", type=int, default=2, help="rounds of part 1 (best of)")
    parser.add_argument("--sweep-samples", type=int, default=90, help="questions of part 2 (the demo's 90)")
    parser.add_argument("--skip", choices=("batch", "sweep"), nargs="*", default=[], help="parts left out")
    parser.add_argument("--out", default="bench_outputs/bench_throughput.json")
    args = parser.parse_args(argv)
    if 1 not in args.batch_sizes:
        parser.error("--batch-sizes must include 1 (the reference)")
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_start = time.time(), os.getloadavg()[0]
    results = {"machine": bench_pruning.machine(torch.device(args.device), torch.get_num_threads()),
               "samples": args.samples, "new_tokens": args.new_tokens}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_throughput_"))
    (work / "batch").mkdir()
    try:
        if "batch" not in args.skip:
            results["batch"] = batch_part(args.device, args.samples, sorted(args.batch_sizes), args.rounds,
                                          args.new_tokens, work / "batch")
            bench_pruning.save_so_far(results, out, started, "batch sizes")
        if "sweep" not in args.skip:
            results["sweep"] = sweep_part(args.device, args.sweep_samples, work / "sweep")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    results["seconds"] = time.time() - started
    results["targets"] = [{"target": t, "passed": p, "detail": d} for t, p, d in targets(results)]
    print(report(results))
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
