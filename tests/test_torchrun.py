"""Data-parallel evaluation with torchrun on a CPU: two processes give what one gives.

VLMEvalKit's run.py asks torch.distributed for the nccl backend, which needs a GPU; the runner makes it gloo for a
CPU run (``evalkit._gloo_for_nccl``). The shipped calibration model evaluates the calibration set once with one
process and once with ``torchrun --nproc-per-node 2``; predictions, score, per-rank token logs and profiles must
agree (timings aside).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "calibration" / "qwen2.5-vl-shapes"
DATA = "ShapesCalib"
QUESTIONS = 8  # 4 per rank
ENV = {"PRUNE_METHOD": "divprune_pre_llm", "KEEP_RATIO": "0.25", "METHOD_TIME": "True", "PROFILE_WARMUP": "0"}
FLAGS = ["--model", str(CHECKPOINT), "--data", DATA, "--device", "cpu", "--judge", "exact_matching"]

pytestmark = pytest.mark.skipif(not (CHECKPOINT / "model.safetensors").is_file(), reason="no calibration model")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(launcher: list[str], work_dir: Path, env: dict[str, str]) -> Path:
    """Runs the runner, asserts exit 0 and returns the one run folder it wrote."""
    done = subprocess.run([*launcher, str(ROOT / "run_qwenvl.py"), *FLAGS, "--work-dir", str(work_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    (run_dir,) = [path for path in work_dir.iterdir() if path.is_dir() and path.name != "logs"]
    return run_dir


def _predictions(run_dir: Path) -> dict[str, str]:
    from vlmeval.smp import load

    status = json.loads((run_dir / "status.json").read_text())
    frame = load(str(run_dir / status["datasets"][DATA]["prediction_file"]))
    return {str(index): str(prediction) for index, prediction in zip(frame["index"], frame["prediction"])}


def _jsonl(run_dir: Path, pattern: str) -> dict[str, list[dict]]:
    """``file name -> records`` of the files matching ``pattern``."""
    return {path.name: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for path in sorted(run_dir.glob(pattern))}


def _by_key(files: dict[str, list[dict]], value) -> dict[str, object]:
    records = [record for lines in files.values() for record in lines]
    keyed = {record["key"]: value(record) for record in records}
    assert len(keyed) == len(records), "a sample was recorded twice"
    return keyed


def _token_counts(profile: dict) -> dict:
    """The visual-token counts of a profile record (its timings differ from run to run)."""
    return {"metrics": {name: value for name, value in profile["metrics"].items()
                        if name.startswith("visual_tokens/") or name == "equivalent_visual_tokens"},
            "stages": [(s["stage"], s["method"], s["tokens_in"]) for s in profile["stages"]]}


@pytest.mark.slow
def test_torchrun_on_a_cpu_gives_the_single_process_results(tmp_path):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "calibration.data", str(data), "-n", str(QUESTIONS)], cwd=ROOT, check=True,
                   capture_output=True)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PRUNE_", "KEEP_RATIO", "INTRA_LLM_", "METHOD_TIME", "PREFILL_TIME", "PROFILE_"))
           and key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MMEVAL_ROOT")}
    # One thread in every process, as torchrun sets for its workers: the same float reductions in both runs (a
    # different thread count may change a near tie in the pruning or the answer).
    env.update(ENV, LMUData=str(data), OMP_NUM_THREADS="1")

    single = _run([sys.executable], tmp_path / "single", env)
    multi = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                  "--master-addr", "127.0.0.1", "--master-port", str(_free_port())], tmp_path / "multi", env)

    assert multi.name == single.name  # same configuration and code: same hash
    predictions = _predictions(single)
    assert len(predictions) == QUESTIONS
    assert _predictions(multi) == predictions
    scores = [json.loads((run / "status.json").read_text())["datasets"][DATA]["metrics"] for run in (single, multi)]
    assert scores[0] == scores[1] and scores[0]
    assert json.loads((multi / "status.json").read_text())["world_size"] == 2

    tokens = {run: _jsonl(run, f"visual_tokens_{DATA}.rank*.jsonl") for run in (single, multi)}
    assert sorted(tokens[multi]) == [f"visual_tokens_{DATA}.rank0.jsonl", f"visual_tokens_{DATA}.rank1.jsonl"]
    assert all(tokens[multi].values()), "a rank wrote no token record"
    tokens_and_spans = lambda record: (record["tokens"], record["spans"])  # noqa: E731
    assert len(_by_key(tokens[single], tokens_and_spans)) == QUESTIONS
    assert _by_key(tokens[multi], tokens_and_spans) == _by_key(tokens[single], tokens_and_spans)

    profiles = {run: _jsonl(run, f"profile_{DATA}.rank*.jsonl") for run in (single, multi)}
    assert sorted(profiles[multi]) == [f"profile_{DATA}.rank0.jsonl", f"profile_{DATA}.rank1.jsonl"]
    assert all(profiles[multi].values()), "a rank wrote no profile record"
    counts = {run: _by_key(profiles[run], _token_counts) for run in (single, multi)}
    assert counts[multi] == counts[single] and len(counts[single]) == QUESTIONS
    assert all(count["metrics"] for count in counts[single].values())
    summary = json.loads((multi / f"profile_summary_{DATA}.json").read_text())
    assert (summary["samples"], summary["profiled"]) == (QUESTIONS, QUESTIONS)
