"""run_qwenvl.py / evalkit.py end to end through ``vlmeval.run.main``, offline, on tiny local checkpoints.

The shared work dir (conftest.py) is evaluated with a checkpoint rigged to always answer "A", so the accuracy
is known in advance: the fraction of questions whose answer is A.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evalkit
import run_qwenvl
from tests.support import shapes_data
from tests.support.tiny_checkpoints import save_checkpoint
from tests.conftest import CONFIGS, QUESTIONS, RUNNER_FLAGS, TOKENS_PER_IMAGE, run_runner
from utils import PruneConfig, keep_count

ROOT = Path(__file__).resolve().parent.parent


def config(**env) -> PruneConfig:
    return PruneConfig.from_env({k: str(v) for k, v in env.items()})


def name_of(cfg: PruneConfig, source="vlmeval:M", kwargs=None, dtype="auto") -> str:
    return evalkit.run_name("M", cfg, evalkit.run_identity(source, cfg, kwargs or {}, dtype))


# ---------------------------------------------------------------- naming and flags (no model)
def test_run_names_carry_every_setting_that_changes_predictions():
    stock = config()
    divprune = config(PRUNE_METHOD="divprune_pre_llm", KEEP_RATIO=0.5)
    names = {
        name_of(stock),
        name_of(divprune),
        name_of(config(PRUNE_METHOD="divprune_pre_llm", KEEP_RATIO=0.25)),
        name_of(config(PRUNE_METHOD="random_pre_llm", KEEP_RATIO=0.5)),
        name_of(config(PRUNE_METHOD="random_pre_llm", KEEP_RATIO=0.5, PRUNE_RANDOM_SEED=1)),
        name_of(config(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.5;3:random_intra_llm:0.25")),
        name_of(divprune, kwargs={"max_new_tokens": 1}),
        name_of(divprune, dtype="bfloat16"),
        name_of(divprune, source="/other/checkpoint"),
    }
    assert len(names) == 9
    assert name_of(divprune) == name_of(config(PRUNE_METHOD="divprune_pre_llm", KEEP_RATIO="0.50"))
    assert name_of(stock).startswith("M__stock__")
    assert name_of(divprune).startswith("M__divprune_pre_llm-0.5__")
    specs = config(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprune_pre_llm",
                   INTRA_LLM_LAYER_SPECS="3:random_intra_llm:0.25;2:fastv_intra_llm")
    assert evalkit.run_tag(specs) == "divprune_pre_llm-0.5+L2-fastv_intra_llm-0.5+L3-random_intra_llm-0.25"
    # Methods that schedule their own layers (PDrop, SparseVLM, VTW) are named too, never "stock" or blank.
    scheduled = config(PRUNE_METHOD="pdrop_intra_llm", KEEP_RATIO=0.25)
    assert evalkit.run_tag(scheduled) == "pdrop_intra_llm-0.25"
    assert name_of(scheduled).startswith("M__pdrop_intra_llm-0.25__")


def test_runner_flags_are_split_off_and_never_clash_with_vlmeval():
    import vlmeval.run

    vlmeval_flags = inspect.getsource(vlmeval.run.parse_args)
    parser = evalkit.runner_parser("run_qwenvl.py", run_qwenvl.FAMILY)
    ours = [flag for action in parser._actions for flag in action.option_strings]
    assert len(ours) == 6
    for flag in ours:
        assert f"'{flag}'" not in vlmeval_flags or flag in ("-h", "--help")
    options, rest = parser.parse_known_args(
        ["--model", "M", "--device", "cpu", "--data", "D1", "D2", "--mode", "infer", "--dtype", "float32",
         "--attn-implementation", "eager", "--reuse", "--model-kwargs", "{}", "--verbose"])
    assert (options.device, options.dtype, options.attn_implementation) == ("cpu", "float32", "eager")
    assert rest == ["--model", "M", "--data", "D1", "D2", "--mode", "infer", "--reuse", "--verbose"]


def test_replace_option_rewrites_every_spelling():
    argv = ["--model", "a", "b", "--data", "D", "--model=c", "--verbose"]
    assert evalkit._replace_option(argv, "--model", ["x"]) == ["--data", "D", "--verbose", "--model", "x"]


def test_models_resolve_to_their_vlmeval_wrapper(tmp_path):
    from vlmeval.config import supported_VLM
    from vlmeval.vlm import Qwen2VLChat, Qwen3VLChat

    entry = evalkit.resolve_model(run_qwenvl.FAMILY, "Qwen2.5-VL-7B-Instruct", supported_VLM)
    assert entry.wrapper is Qwen2VLChat and entry.kwargs["model_path"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert evalkit.resolve_model(run_qwenvl.FAMILY, "Qwen3-VL-8B-Instruct", supported_VLM).wrapper is Qwen3VLChat
    with pytest.raises(evalkit.RunnerError, match="not a Qwen-VL wrapper"):
        evalkit.resolve_model(run_qwenvl.FAMILY, "Gemma4-E2B-it", supported_VLM)
    with pytest.raises(evalkit.RunnerError, match="did you mean Qwen2.5-VL-7B-Instruct"):
        evalkit.resolve_model(run_qwenvl.FAMILY, "Qwen2.5-VL-7B-Instrct", supported_VLM)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(evalkit.RunnerError, match="model_type 'llama' is not a Qwen-VL model"):
        evalkit.resolve_model(run_qwenvl.FAMILY, str(tmp_path), supported_VLM)


def test_bad_configuration_exits_before_vlmeval_starts(tmp_path):
    env = {**os.environ, "KEEP_RATIO": "2", "PRUNE_METHOD": "divprune_pre_llm"}
    work_dir = tmp_path / "outputs"
    done = subprocess.run([sys.executable, str(ROOT / "run_qwenvl.py"), "--model", "Qwen2.5-VL-7B-Instruct",
                           "--data", "MME", "--work-dir", str(work_dir)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "KEEP_RATIO='2': keep ratio out of range" in done.stderr
    assert "vlmeval" not in done.stderr + done.stdout  # VLMEvalKit was never imported
    assert not work_dir.exists()


# ---------------------------------------------------------------- end to end (shared work dir)
def predictions(run_dir: Path):
    from vlmeval.smp import load

    files = [p for p in run_dir.glob(f"{run_dir.name}_{shapes_data.NAME}.*")]
    assert len(files) == 1, files
    return files[0], load(str(files[0]))


def test_every_configuration_evaluates_and_exits_zero(evaluated):
    assert evaluated.exit_codes == {label: 0 for label in CONFIGS}


def test_rigged_model_scores_exactly_the_share_of_a_answers(evaluated):
    expected = evaluated.answers.count("A") / QUESTIONS
    assert 0 < expected < 1  # the assertion below could fail both ways
    for label in CONFIGS:
        run_dir = evaluated.run_dir(label)
        _, preds = predictions(run_dir)
        assert list(preds["prediction"]) == ["A"] * QUESTIONS
        status = json.loads((run_dir / "status.json").read_text())["datasets"][shapes_data.NAME]
        assert status["metrics"]["split=none|Overall"] == pytest.approx(expected, abs=1e-12)


def test_stock_and_pruned_runs_write_separate_prediction_files(evaluated):
    files = {label: predictions(evaluated.run_dir(label))[0] for label in CONFIGS}
    assert len(set(files.values())) == len(CONFIGS)
    assert len({path.parent for path in files.values()}) == len(CONFIGS)
    recorded = json.loads((evaluated.run_dir("divprune") / evalkit.RUN_CONFIG_FILE).read_text())
    assert recorded["pruning"] == config(**CONFIGS["divprune"]).describe()
    assert recorded["model_source"] == str(evaluated.checkpoint.resolve())
    assert recorded["wrapper"] == "Qwen2VLChat" and recorded["load"]["device"] == "cpu"


def token_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / f"visual_tokens_{shapes_data.NAME}.rank0.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_recorded_token_counts_follow_the_configuration(evaluated):
    expected = {
        "stock": {"input": TOKENS_PER_IMAGE},
        "divprune": {"input": TOKENS_PER_IMAGE, "pre_llm": keep_count(TOKENS_PER_IMAGE, 0.5)},
        "fastv": {"input": TOKENS_PER_IMAGE, "layer_2": keep_count(TOKENS_PER_IMAGE, 0.25)},
    }
    for label, tokens in expected.items():
        records = token_records(evaluated.run_dir(label))
        assert len(records) == QUESTIONS and len({r["key"] for r in records}) == QUESTIONS
        assert all(r["tokens"] == tokens and len(r["spans"]) == 1 for r in records)
        assert records[0]["spans"][0]["grid"] == [1, 4, 6]


def test_a_second_run_resumes_from_the_existing_predictions(evaluated):
    run_dir = evaluated.run_dir("divprune")
    before = (run_dir / f"visual_tokens_{shapes_data.NAME}.rank0.jsonl").read_text()
    argv = ["--model", str(evaluated.checkpoint), "--data", shapes_data.NAME, "--work-dir", str(evaluated.work_dir),
            *RUNNER_FLAGS]
    assert run_runner(argv, CONFIGS["divprune"]) == 0
    assert (run_dir / f"visual_tokens_{shapes_data.NAME}.rank0.jsonl").read_text() == before  # nothing re-generated


def test_a_failed_evaluation_exits_nonzero_with_the_reason(evaluated, tmp_path):
    flags = ["--device", "cpu", "--judge", "exact_matching", "--model-kwargs", '{"max_new_tokens": -1}']
    done = subprocess.run([sys.executable, str(ROOT / "run_qwenvl.py"), "--model", str(evaluated.checkpoint),
                           "--data", shapes_data.NAME, "--work-dir", str(tmp_path), *flags],
                          env={**os.environ, "LMUData": str(evaluated.lmudata)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "run_qwenvl.py: evaluation failed:" in done.stderr
    assert "max_new_tokens` must be greater than 0" in done.stderr.split("evaluation failed:")[-1]
    # VLMEvalKit itself only records it:
    status = json.loads(next(tmp_path.glob("*/status.json")).read_text())
    assert "max_new_tokens" in status["datasets"][shapes_data.NAME]["error_message"]


def test_an_unknown_data_set_is_a_failure(evaluated, tmp_path):
    argv = ["--model", str(evaluated.checkpoint), "--data", "NoSuchSet", "--work-dir", str(tmp_path), *RUNNER_FLAGS]
    assert run_runner(argv, {}) == 1


def test_json_config_models_are_adapted_and_namespaced(evaluated, tmp_path):
    cfg = {"model": {"tiny": {"class": "Qwen2VLChat", "model_path": str(evaluated.checkpoint), "max_new_tokens": 1}},
           "data": {shapes_data.NAME: {"class": "CustomMCQDataset", "dataset": shapes_data.NAME}}}
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(cfg))
    argv = ["--config", str(config_file), "--work-dir", str(tmp_path / "out"), "--device", "cpu",
            "--judge", "exact_matching", "--limit", "2"]
    assert run_runner(argv, CONFIGS["divprune"]) == 0
    (run_dir,) = [p.parent for p in (tmp_path / "out").glob("*/pruning_config.json")]
    assert run_dir.name.startswith("tiny__divprune_pre_llm-0.5__")
    assert [r["tokens"]["pre_llm"] for r in token_records(run_dir)] == [12, 12]


@pytest.mark.parametrize("family, tokens", [("qwen2_vl", 24), ("qwen3_vl", 20)])
def test_other_qwen_families_load_from_a_folder_and_prune(evaluated, tmp_path, family, tokens):
    checkpoint = save_checkpoint(tmp_path / family, family=family, answers="ABCD")
    argv = ["--model", str(checkpoint), "--data", shapes_data.NAME, "--work-dir", str(tmp_path / "out"),
            "--limit", "2", *RUNNER_FLAGS]
    assert run_runner(argv, CONFIGS["fastv"]) == 0
    (run_dir,) = [p.parent for p in (tmp_path / "out").glob("*/pruning_config.json")]
    wrapper = json.loads((run_dir / evalkit.RUN_CONFIG_FILE).read_text())["wrapper"]
    assert wrapper == {"qwen2_vl": "Qwen2VLChat", "qwen3_vl": "Qwen3VLChat"}[family]
    expected = {"input": tokens, "layer_2": keep_count(tokens, 0.25)}
    assert [r["tokens"] for r in token_records(run_dir)] == [expected, expected]
    assert set(predictions(run_dir)[1]["prediction"]) <= set("ABCD")
