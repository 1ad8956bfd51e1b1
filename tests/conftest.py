"""A small evaluated work dir, shared by the runner and results tests (built once per session, offline).

A tiny Qwen2.5-VL checkpoint rigged to always answer "A" is saved to disk, a 10-question multiple-choice set is
generated into a temporary LMUData folder, and ``run_qwenvl`` evaluates it through ``vlmeval.run.main``
stock, with a pre-LLM method and with an intra-LLM method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scripts import shapes_data
from scripts.tiny_checkpoints import save_checkpoint

QUESTIONS = 10
TOKENS_PER_IMAGE = 24  # a 168 x 112 image: 6 x 4 merged patches
RUNNER_FLAGS = ["--device", "cpu", "--judge", "exact_matching", "--model-kwargs", json.dumps({"max_new_tokens": 1})]
CONFIGS = {  # label -> pruning environment
    "stock": {},
    "divprune": {"PRUNE_METHOD": "divprune_pre_llm", "KEEP_RATIO": "0.5"},
    "fastv": {"PRUNE_METHOD": "fastv_intra_llm", "KEEP_RATIO": "0.25"},
}


@dataclass
class EvaluatedWorkDir:
    root: Path
    checkpoint: Path
    lmudata: Path
    work_dir: Path
    answers: list[str]
    exit_codes: dict = field(default_factory=dict)

    def run_dir(self, label: str) -> Path:
        """The run folder of a configuration, found through the configuration it recorded."""
        wanted = CONFIGS[label]
        for config_file in self.work_dir.glob("*/pruning_config.json"):
            recorded = json.loads(config_file.read_text())["pruning_env"]
            if recorded == wanted:
                return config_file.parent
        raise AssertionError(f"no run folder for {label}")


def run_runner(argv: list[str], env: dict[str, str]) -> int:
    """``run_qwenvl.py`` in this process; ``env`` holds the pruning variables (read by the runner only)."""
    import evalkit
    import run_qwenvl

    return evalkit.main(run_qwenvl.FAMILY, argv, env=env, prog="run_qwenvl.py")


@pytest.fixture(scope="session")
def lmudata_env(tmp_path_factory):
    """VLMEvalKit reads its data sets from $LMUData (and falls back to ~/LMUData when the folder is missing)."""
    lmudata = tmp_path_factory.mktemp("LMUData")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMUData", str(lmudata))
        patch.delenv("MMEVAL_ROOT", raising=False)
        yield lmudata


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory, lmudata_env) -> EvaluatedWorkDir:
    root = tmp_path_factory.mktemp("evaluated")
    shapes_data.write_dataset(lmudata_env, QUESTIONS)
    checkpoint = save_checkpoint(root / "always-a", family="qwen2_5_vl", answers="A")
    result = EvaluatedWorkDir(root, checkpoint, lmudata_env, root / "outputs",
                              [shapes_data.make_question(i)["answer"] for i in range(QUESTIONS)])
    for label, env in CONFIGS.items():
        argv = ["--model", str(checkpoint), "--data", shapes_data.NAME, "--work-dir", str(result.work_dir),
                *RUNNER_FLAGS]
        result.exit_codes[label] = run_runner(argv, env)
    return result
