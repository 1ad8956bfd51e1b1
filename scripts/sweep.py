"""Run a runner over methods x keep ratios (plus stock) on one or more data sets, into one work dir.

Each configuration is one runner process (``python run_qwenvl.py ...``) with its pruning environment set
(``PRUNE_METHOD``, ``KEEP_RATIO``; a KV-cache method's: ``KV_METHOD``, ``KV_BUDGET`` = the ratio; other
pruning-selection variables of the calling shell are cleared, method hyper-parameters and ``PRUNE_METHODS_PATH``
pass through); all data sets go to that one process. Arguments
after ``--`` go to the runner unchanged (runner flags and VLMEvalKit flags). A runner's output goes to
``WORK_DIR/sweep_logs/<config>.log``; a failed configuration is reported and the sweep goes on.

With ``--in-process`` the configurations of one model share a runner process (its ``--configurations``): the
model is loaded once and each configuration writes the run folder its own process would (same run name, files and
resume), with the same predictions; the log is ``WORK_DIR/sweep_logs/<model>__in-process*.log``.

    python scripts/sweep.py --model Qwen2.5-VL-7B-Instruct --data MME MMBench_DEV_EN \\
        --methods divprune_pre_llm fastv_intra_llm --ratios 0.111 0.222 0.5 --work-dir outputs -- --judge exact_matching
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from evalkit import SELECTION_VARS  # noqa: E402  (the variables each configuration sets or clears)


@dataclass(frozen=True)
class Job:
    label: str
    env: dict  # the pruning variables of this configuration
    command: list


@dataclass(frozen=True)
class Process:
    """One runner process: one job, or (in-process) several jobs of one command line, passed as
    ``--configurations <log_dir>/<label>.configurations.json``."""

    label: str  # names its log file
    jobs: tuple[Job, ...]
    in_process: bool

    def command(self, log_dir: Path) -> list:
        if not self.in_process:
            return self.jobs[0].command
        runner_call, flags = self.jobs[0].command[:2], self.jobs[0].command[2:]
        return [*runner_call, "--configurations", str(log_dir / f"{self.label}.configurations.json"), *flags]

    def configurations(self) -> list[dict]:
        return [{"label": job.label, "env": job.env} for job in self.jobs]


def plan(runner: str, models: list[str], datasets: list[str], methods: list[str], ratios: list[float],
         work_dir: str, stock: bool, extra: list[str]) -> list[Job]:
    configs = ([("stock", {})] if stock else []) + [
        (f"{method}-{ratio:g}", {"KV_METHOD": method, "KV_BUDGET": f"{ratio:g}"} if method.endswith("_kv")
         else {"PRUNE_METHOD": method, "KEEP_RATIO": f"{ratio:g}"})  # a KV-cache method: the ratio is its budget
        for method in methods for ratio in ratios]
    jobs = []
    for model in models:
        for label, env in configs:
            command = [sys.executable, str(ROOT / runner), "--model", model, "--data", *datasets,
                       "--work-dir", work_dir, *extra]
            jobs.append(Job(f"{Path(model).name}__{label}", env, command))
    return jobs


def processes(jobs: list[Job], parallel: int = 1, in_process: bool = False) -> list[Process]:
    """The runner processes of a sweep, in order. Separate processes: one per job. In-process: the jobs of one
    command line (model, data sets, flags) share a process; with ``parallel > 1`` the very first job runs in a
    process of its own (see :func:`run`) and the other jobs of each command line are dealt round-robin into
    ``parallel`` processes."""
    if not in_process:
        return [Process(job.label, (job,), False) for job in jobs]
    by_command: dict[tuple, list[Job]] = {}
    for job in jobs:
        by_command.setdefault(tuple(job.command), []).append(job)
    out = []
    for same in by_command.values():
        model = same[0].label.split("__")[0]
        if parallel > 1 and not out:
            out.append(Process(f"{model}__in-process-first", tuple(same[:1]), True))
            same = same[1:]
        shares = min(parallel, len(same))
        for i in range(shares):
            suffix = f"-{i + 1}of{shares}" if shares > 1 else ""
            out.append(Process(f"{model}__in-process{suffix}", tuple(same[i::shares]), True))
    return out


def run(jobs: list[Job], log_dir: Path, base_env: dict | None = None, parallel: int = 1,
        in_process: bool = False) -> list[str]:
    """Run the jobs with a progress bar, ``parallel`` runner processes at a time (``in_process``: the jobs of one
    command line share processes, see :func:`processes`); returns the labels of those that failed.

    With ``parallel > 1`` each runner gets ``OMP_NUM_THREADS=1`` (unless the caller set it), so that the processes
    do not fight over the cores, and the first process runs alone before the others start: VLMEvalKit writes a data
    set's images into ``$LMUData/images`` on first use, not atomically, so two first runs at once can read a
    half-written image ("cannot identify image file"). Every job evaluates every data set, so after the first
    one the images are all there."""
    base = {k: v for k, v in (os.environ if base_env is None else base_env).items() if k not in SELECTION_VARS}
    if parallel > 1:
        base.setdefault("OMP_NUM_THREADS", "1")
    log_dir.mkdir(parents=True, exist_ok=True)

    def one(process: Process) -> dict[str, int]:
        """Exit code per job label."""
        if process.in_process:
            (log_dir / f"{process.label}.configurations.json").write_text(
                json.dumps(process.configurations(), indent=2))
        with open(log_dir / f"{process.label}.log", "w") as out:
            env = base if process.in_process else {**base, **process.jobs[0].env}
            code = subprocess.call(process.command(log_dir), env=env, stdout=out, stderr=subprocess.STDOUT)
        if not process.in_process:
            return {process.jobs[0].label: code}
        # The runner prints "<runner>: configuration <label>: exit <code>" after each configuration; a
        # configuration it did not reach failed with the process.
        reported = dict(re.findall(r"^\S+: configuration (.+): exit (\d+)$",
                                   (log_dir / f"{process.label}.log").read_text(), flags=re.MULTILINE))
        return {job.label: int(reported.get(job.label, code or 1)) for job in process.jobs}

    work = processes(jobs, parallel, in_process)
    failed = []
    with tqdm(total=len(jobs), unit="run", desc="sweep") as bar, \
            concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        first = {pool.submit(one, process): process for process in work[:1]}
        concurrent.futures.wait(first)
        futures = {**first, **{pool.submit(one, process): process for process in work[1:]}}
        for future in concurrent.futures.as_completed(futures):
            process, codes = futures[future], future.result()
            bar.update(len(codes))
            bar.set_postfix_str(process.label)
            if any(codes.values()):
                log = log_dir / f"{process.label}.log"
                tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
                for label, code in codes.items():
                    if code:
                        failed.append(label)
                        tqdm.write(f"{label}: runner exited with {code} (log: {log})")
                tqdm.write(tail)
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
    parser.add_argument("--in-process", action="store_true",
                        help="load each model once: its configurations share a runner process (--configurations), "
                             "each writing the run folder of its own process; with --parallel N, N such processes")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    if bool(args.methods) != bool(args.ratios):
        parser.error("--methods and --ratios go together")
    jobs = plan(args.runner, args.model, args.data, args.methods, args.ratios, args.work_dir, not args.no_stock,
                extra)
    if args.dry_run:
        log_dir = Path(args.work_dir) / "sweep_logs"
        for process in processes(jobs, args.parallel, args.in_process):
            if process.in_process:
                print(" ".join(map(str, process.command(log_dir))) + f"    # {json.dumps(process.configurations())}")
            else:
                print(" ".join([*(f"{k}={v}" for k, v in process.jobs[0].env.items()), *process.command(log_dir)]))
        return 0
    failed = run(jobs, Path(args.work_dir) / "sweep_logs", parallel=args.parallel, in_process=args.in_process)
    print(f"{len(jobs) - len(failed)}/{len(jobs)} runs finished into {args.work_dir}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
