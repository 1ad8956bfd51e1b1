"""Run a runner over methods x keep ratios (plus stock) on one or more data sets, into one work dir.

Each configuration is one runner process (``python run_qwenvl.py ...``) with its pruning environment set
(``PRUNE_METHOD``, ``KEEP_RATIO``; other pruning-selection variables of the calling shell are cleared, method
hyper-parameters and ``PRUNE_METHODS_PATH`` pass through); all data sets go to that one process. Arguments
after ``--`` go to the runner unchanged (runner flags and VLMEvalKit flags). A runner's output goes to
``WORK_DIR/sweep_logs/<config>.log``; a failed configuration is reported and the sweep goes on.

    python scripts/sweep.py --model Qwen2.5-VL-7B-Instruct --data MME MMBench_DEV_EN \\
        --methods divprune_pre_llm fastv_intra_llm --ratios 0.111 0.222 0.5 --work-dir outputs -- --judge exact_matching
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
# Variables that select the pruning stages: the sweep sets them per configuration and clears the rest.
SELECTION_VARS = ("KEEP_RATIO", "PRUNE_METHOD", "PRUNE_METHOD_PRE_LLM", "PRUNE_METHOD_INTRA_LLM",
                  "INTRA_LLM_LAYER_SPECS")


@dataclass(frozen=True)
class Job:
    label: str
    env: dict  # the pruning variables of this configuration
    command: list


def plan(runner: str, models: list[str], datasets: list[str], methods: list[str], ratios: list[float],
         work_dir: str, stock: bool, extra: list[str]) -> list[Job]:
    configs = ([("stock", {})] if stock else []) + [
        (f"{method}-{ratio:g}", {"PRUNE_METHOD": method, "KEEP_RATIO": f"{ratio:g}"})
        for method in methods for ratio in ratios]
    jobs = []
    for model in models:
        for label, env in configs:
            command = [sys.executable, str(ROOT / runner), "--model", model, "--data", *datasets,
                       "--work-dir", work_dir, *extra]
            jobs.append(Job(f"{Path(model).name}__{label}", env, command))
    return jobs


def run(jobs: list[Job], log_dir: Path, base_env: dict | None = None, parallel: int = 1) -> list[str]:
    """Run the jobs with a progress bar, ``parallel`` at a time; returns the labels of those that failed.

    With ``parallel > 1`` each runner gets ``OMP_NUM_THREADS=1`` (unless the caller set it), so that the processes
    do not fight over the cores, and the first job runs alone before the others start: VLMEvalKit writes a data
    set's images into ``$LMUData/images`` on first use, not atomically, so two first runs at once can read a
    half-written image ("cannot identify image file"). Every job evaluates every data set, so after the first
    one the images are all there."""
    base = {k: v for k, v in (os.environ if base_env is None else base_env).items() if k not in SELECTION_VARS}
    if parallel > 1:
        base.setdefault("OMP_NUM_THREADS", "1")
    log_dir.mkdir(parents=True, exist_ok=True)

    def one(job: Job) -> int:
        with open(log_dir / f"{job.label}.log", "w") as out:
            return subprocess.call(job.command, env={**base, **job.env}, stdout=out, stderr=subprocess.STDOUT)

    failed = []
    with tqdm(total=len(jobs), unit="run", desc="sweep") as bar, \
            concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        first = {pool.submit(one, job): job for job in jobs[:1]}
        concurrent.futures.wait(first)
        futures = {**first, **{pool.submit(one, job): job for job in jobs[1:]}}
        for future in concurrent.futures.as_completed(futures):
            job, code = futures[future], future.result()
            bar.update()
            bar.set_postfix_str(job.label)
            if code:
                failed.append(job.label)
                log = log_dir / f"{job.label}.log"
                tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
                tqdm.write(f"{job.label}: runner exited with {code} (log: {log})\n{tail}")
    order = [job.label for job in jobs]
    return sorted(failed, key=order.index)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runner", default="run_qwenvl.py", help="runner script in the repository root")
    parser.add_argument("--model", nargs="+", required=True, help="VLMEvalKit model names or checkpoint folders")
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=[], help="registered method names")
    parser.add_argument("--ratios", nargs="+", type=float, default=[], help="keep ratios")
    parser.add_argument("--work-dir", default="outputs")
    parser.add_argument("--no-stock", action="store_true", help="skip the unpruned reference run")
    parser.add_argument("--parallel", type=int, default=1, help="runner processes at a time (one thread each)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    if bool(args.methods) != bool(args.ratios):
        parser.error("--methods and --ratios go together")
    jobs = plan(args.runner, args.model, args.data, args.methods, args.ratios, args.work_dir, not args.no_stock,
                extra)
    if args.dry_run:
        for job in jobs:
            print(" ".join([*(f"{k}={v}" for k, v in job.env.items()), *job.command]))
        return 0
    failed = run(jobs, Path(args.work_dir) / "sweep_logs", parallel=args.parallel)
    print(f"{len(jobs) - len(failed)}/{len(jobs)} runs finished into {args.work_dir}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
