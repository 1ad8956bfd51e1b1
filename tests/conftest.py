"""Small evaluated work dirs, shared by the runner and results tests (built once per session, offline).

A 10-question multiple-choice set is generated into a temporary LMUData folder. A tiny checkpoint rigged to
always answer "A" is saved to disk and a runner evaluates the set through ``vlmeval.run.main`` stock, with a
pre-LLM method and with an intra-LLM method: ``evaluated`` for Qwen2.5-VL (``run_qwenvl``); the Gemma 4 tests
build theirs with :func:`evaluate` (``run_gemma4``).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import evalkit
from tests.support import shapes_data
from tests.support.tiny_checkpoints import save_checkpoint

QUESTIONS = 10
TOKENS_PER_IMAGE = 24  # a 168 x 112 image: 6 x 4 merged patches
RUNNER_FLAGS = ["--device", "cpu", "--judge", "exact_matching", "--model-kwargs", json.dumps({"max_new_tokens": 1})]
CONFIGS = {  # label -> pruning environment
    "stock": {},
    "divprune": {"PRUNE_METHOD": "divprune_pre_llm", "KEEP_RATIO": "0.5"},
    "fastv": {"PRUNE_METHOD": "fastv_intra_llm", "KEEP_RATIO": "0.25"},
}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): small tensors
    gain nothing from a second thread, and on a busy 2-core machine OpenMP threads stall each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class EvaluatedWorkDir:
    root: Path
    checkpoint: Path
    lmudata: Path
    work_dir: Path
    answers: list[str]
    exit_codes: dict = field(default_factory=dict)
    run_dirs: dict = field(default_factory=dict)  # label -> the run folder its runner call created

    def run_dir(self, label: str) -> Path:
        if label not in self.run_dirs:
            raise AssertionError(f"no run folder for {label} (exit code {self.exit_codes.get(label)})")
        return self.run_dirs[label]


def run_runner(argv: list[str], env: dict[str, str], runner: str = "run_qwenvl") -> int:
    """A runner (``run_qwenvl`` or ``run_gemma4``) in this process; ``env`` holds the pruning variables (read by
    the runner only)."""
    return evalkit.main(importlib.import_module(runner).FAMILY, argv, env=env, prog=f"{runner}.py")


def _run_folders(work_dir: Path) -> set[Path]:
    return {path.parent for path in work_dir.glob(f"*/{evalkit.RUN_CONFIG_FILE}")}


def evaluate(root: Path, lmudata: Path, checkpoint: Path, configs: dict[str, dict], runner: str = "run_qwenvl",
             flags: dict[str, list[str]] | None = None) -> EvaluatedWorkDir:
    """Evaluate the shared data set once per configuration (label -> pruning environment; ``flags``: label -> extra
    runner flags) into ``root/outputs``."""
    result = EvaluatedWorkDir(root, checkpoint, lmudata, root / "outputs",
                              [shapes_data.make_question(i)["answer"] for i in range(QUESTIONS)])
    for label, env in configs.items():
        before = _run_folders(result.work_dir)
        argv = ["--model", str(checkpoint), "--data", shapes_data.NAME, "--work-dir", str(result.work_dir),
                *RUNNER_FLAGS, *(flags or {}).get(label, [])]
        result.exit_codes[label] = run_runner(argv, env, runner)
        created = _run_folders(result.work_dir) - before
        if len(created) == 1:
            result.run_dirs[label] = created.pop()
    return result


@pytest.fixture(scope="session")
def lmudata_env(tmp_path_factory):
    """VLMEvalKit reads its data sets from $LMUData (and falls back to ~/LMUData when the folder is missing); the
    shared data set is written there."""
    lmudata = tmp_path_factory.mktemp("LMUData")
    shapes_data.write_dataset(lmudata, QUESTIONS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMUData", str(lmudata))
        patch.delenv("MMEVAL_ROOT", raising=False)
        yield lmudata


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory, lmudata_env) -> EvaluatedWorkDir:
    root = tmp_path_factory.mktemp("evaluated")
    checkpoint = save_checkpoint(root / "always-a", family="qwen2_5_vl", answers="A")
    return evaluate(root, lmudata_env, checkpoint, CONFIGS)
