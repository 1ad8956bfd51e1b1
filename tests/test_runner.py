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
    # The KV stage: its method and budget (a fraction or a count), alone or after token pruning.
    assert evalkit.run_tag(config(KV_METHOD="snapkv_kv", KV_BUDGET=0.25)) == "snapkv_kv-0.25"
    assert evalkit.run_tag(config(KV_METHOD="h2o_kv", KV_BUDGET=512, PRUNE_METHOD="divprune_pre_llm",
                                  KEEP_RATIO=0.5)) == "divprune_pre_llm-0.5+h2o_kv-512"
    assert len({name_of(config(KV_METHOD="snapkv_kv", KV_BUDGET=b)) for b in ("0.25", "0.5", "64")} | {
        name_of(config(KV_METHOD="h2o_kv", KV_BUDGET=0.25)), name_of(stock)}) == 5


def test_runner_flags_are_split_off_and_never_clash_with_vlmeval():
    import vlmeval.run

    vlmeval_flags = inspect.getsource(vlmeval.run.parse_args)
    parser = evalkit.runner_parser("run_qwenvl.py", run_qwenvl.FAMILY)
    ours = [flag for action in parser._actions for flag in action.option_strings]
    assert len(ours) == 9
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


@pytest.mark.parametrize("before", [None, "old"])
@pytest.mark.parametrize("inside", [None, "new"])
def test_a_vlmeval_environment_setting_is_restored_after_its_block(monkeypatch, before, inside):
    name = "PRUNING_TEST_SETTING"
    monkeypatch.delenv(name, raising=False)
    if before is not None:
        monkeypatch.setenv(name, before)
    with pytest.raises(RuntimeError), evalkit._temporarily_env(name, inside):
        assert os.environ.get(name) == inside
        raise RuntimeError  # restored on the way out of a failing block too
    assert os.environ.get(name) == before


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


@pytest.mark.slow
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


def test_a_kv_cache_run_evaluates_and_records_the_cache(evaluated, tmp_path):
    checkpoint = save_checkpoint(tmp_path / "abcd", family="qwen2_5_vl", answers="ABCD")
    argv = ["--model", str(checkpoint), "--data", shapes_data.NAME, "--work-dir", str(tmp_path / "out"),
            "--limit", "2", *RUNNER_FLAGS]
    assert run_runner(argv, {"KV_METHOD": "snapkv_kv", "KV_BUDGET": "0.5", "SNAPKV_WINDOW": "4"}) == 0
    (run_dir,) = [p.parent for p in (tmp_path / "out").glob("*/pruning_config.json")]
    assert "__snapkv_kv-0.5__" in run_dir.name
    records = token_records(run_dir)
    assert len(records) == 2
    for record in records:
        layers = record["kv_cache"]
        assert sorted(layers, key=int) == [str(i) for i in range(len(layers))] and len(layers) >= 2
        assert all(n["after"] == keep_count(n["before"], 0.5) < n["before"] for n in layers.values())
        assert record["cached_tokens_per_layer"] == sum(n["after"] for n in layers.values()) / len(layers)
    assert set(predictions(run_dir)[1]["prediction"]) <= set("ABCD")
    # The results table names the run and its cache size, and prints that column when a KV run is present.
    from scripts import summarize

    table = summarize.collect(tmp_path / "out")
    (row,) = table.to_dict("records")
    assert (row["method"], row["stage"], row["keep_ratio"]) == ("snapkv_kv", "KV cache", 0.5)
    assert row["cached_tokens"] == sum(r["cached_tokens_per_layer"] for r in records) / 2
    assert "cached tokens / layer" in summarize.format_table(table)


# ---------------------------------------------------------------- a run never reports success without a result
@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
    (["--device", "cuda:3"], "--device cuda:3: CUDA is not available on this machine"),
    (["--device", "tpu"], "--device 'tpu': unknown device; allowed: auto, cpu, cuda, cuda:N"),
    (["--device", "cpu", "--attn-implementation", "flash"],
     "--attn-implementation 'flash': unknown attention implementation; allowed: eager, sdpa, flash_attention_2"),
    (["--device", "cpu", "--attn-implementation", "flash_attention_2"], "--attn-implementation flash_attention_2"),
])
def test_an_unusable_device_or_kernel_exits_2_before_vlmeval_starts(evaluated, tmp_path, capsys, flags, message):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["--model", str(evaluated.checkpoint), "--data", shapes_data.NAME, "--work-dir", str(tmp_path / "out"),
            "--judge", "exact_matching", *flags]
    assert run_runner(argv, CONFIGS["divprune"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # VLMEvalKit never started


def test_a_layer_beyond_the_depth_exits_2_before_vlmeval_starts(evaluated, tmp_path, capsys):
    argv = ["--model", str(evaluated.checkpoint), "--data", shapes_data.NAME, "--work-dir", str(tmp_path / "out"),
            *RUNNER_FLAGS]
    assert run_runner(argv, {"INTRA_LLM_LAYER_SPECS": "9:fastv_intra_llm:0.5"}) == 2
    err = capsys.readouterr().err
    assert "INTRA_LLM_LAYER_SPECS: layer 9 (fastv_intra_llm) is beyond the model's depth; allowed: 0..3" in err
    assert not list((tmp_path / "out").glob("*/*.xlsx")) and not list((tmp_path / "out").glob("*/status.json"))


def _fake_run(work_dir: Path, name: str, rows: list[int], predictions: list[str]) -> None:
    import pandas as pd

    run_dir = work_dir / name
    run_dir.mkdir(parents=True)
    path = run_dir / f"{name}_{shapes_data.NAME}.xlsx"
    if rows:
        pd.DataFrame({"index": rows, "prediction": predictions}).to_excel(path, index=False)
    status = {"datasets": {shapes_data.NAME: {"status": "done", "prediction_file": str(path)}}}
    (run_dir / "status.json").write_text(json.dumps(status))


def test_predictions_must_cover_every_row(evaluated, tmp_path):
    """VLMEvalKit can record a data set as done with no predictions (e.g. the model failed to load)."""
    import vlmeval.run

    args = evalkit._parse_vlmeval_args(vlmeval.run, "run_qwenvl.py", ["--data", shapes_data.NAME])
    _fake_run(tmp_path, "complete", list(range(QUESTIONS)), ["A"] * QUESTIONS)
    _fake_run(tmp_path, "missing", [], [])
    _fake_run(tmp_path, "partial", list(range(QUESTIONS - 3)), ["A"] * (QUESTIONS - 3))
    _fake_run(tmp_path, "failed", list(range(QUESTIONS)), ["A"] * (QUESTIONS - 1) + ["Failed to obtain answer"])
    check = evalkit.check_predictions
    assert check(tmp_path, ["complete"], [shapes_data.NAME], args, None) == []
    (missing,) = check(tmp_path, ["missing"], [shapes_data.NAME], args, None)
    assert missing.startswith(f"missing x {shapes_data.NAME}: no prediction file")
    (partial,) = check(tmp_path, ["partial"], [shapes_data.NAME], args, None)
    assert f"3 of {QUESTIONS} rows have no prediction" in partial
    (failed,) = check(tmp_path, ["failed"], [shapes_data.NAME], args, None)
    assert "0 of 10 rows have no prediction and 1 a failed one" in failed
    limited = evalkit._parse_vlmeval_args(vlmeval.run, "run_qwenvl.py", ["--data", shapes_data.NAME, "--limit", "7"])
    assert check(tmp_path, ["partial"], [shapes_data.NAME], limited, None) == []  # --limit: the first rows


def test_a_run_without_predictions_exits_nonzero(evaluated, tmp_path, capsys):
    """A checkpoint whose weights are gone: VLMEvalKit records the data set, the runner reports the failure."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(evaluated.checkpoint, broken)
    (broken / "model.safetensors").unlink()
    argv = ["--model", str(broken), "--data", shapes_data.NAME, "--work-dir", str(tmp_path / "out"), *RUNNER_FLAGS]
    try:
        code = run_runner(argv, {})
    except Exception:  # VLMEvalKit may also let the load error escape; either way no success is reported
        code = 1
    assert code == 1


# ---------------------------------------------------------------- no stale results
METHOD_FILE = '''from methods import register_prune


@register_prune("edited_pre_llm")
def edited_pre_llm(ctx):
    """Keep the first tokens."""
    return list_of(ctx)


def list_of(ctx):
    import torch

    return torch.arange(ctx.keep)  # BODY
'''


def test_a_method_edit_gives_a_new_run_name(tmp_path):
    """The run's identity holds the code of the methods it uses, compared by syntax tree."""
    path = tmp_path / "edited.py"
    path.write_text(METHOD_FILE)
    env = {"PRUNE_METHODS_PATH": str(path), "PRUNE_METHOD": "edited_pre_llm", "KEEP_RATIO": "0.5"}
    name = name_of(config(**env))
    assert str(path.resolve()) in evalkit.run_identity("vlmeval:M", config(**env), {}, "auto")["method_code"]

    def renamed(text: str) -> str:
        import methods

        methods._base._REGISTRY.pop("edited_pre_llm", None)
        methods._loaded_paths.discard(path.resolve())
        path.write_text(text)
        return name_of(config(**env))

    try:
        assert renamed(METHOD_FILE.replace("# BODY", "# a comment only")) == name
        assert renamed(METHOD_FILE.replace('"""Keep the first tokens."""', '"""Other words."""')) == name
        assert renamed(METHOD_FILE.replace("torch.arange(ctx.keep)", "torch.arange(ctx.keep).flip(0)")) != name
    finally:
        import methods

        methods._base._REGISTRY.pop("edited_pre_llm", None)
        methods._loaded_paths.discard(path.resolve())


def test_weights_retrained_into_the_same_folder_give_a_new_run_name(tmp_path):
    """A local checkpoint's files are part of the identity: new weights in the same folder do not reuse the old run's
    predictions, while its documentation (TRAINING.md, README.md) and a copy of the same files elsewhere do not
    change the fingerprint. Large files are read at both ends (a retrain changes every tensor)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    weights = bytearray(range(256)) * (3 * 2**20 // 256)  # 3 MiB: read at both ends
    (folder / "model.safetensors").write_bytes(weights)
    source, cfg = str(folder.resolve()), config()
    name = name_of(cfg, source=source)
    fingerprint = evalkit.checkpoint_fingerprint(folder)
    (folder / "TRAINING.md").write_text("how it was trained")
    assert name_of(cfg, source=source) == name
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert evalkit.checkpoint_fingerprint(copy) == fingerprint
    weights[-1] ^= 1  # the last byte of the last tensor
    (folder / "model.safetensors").write_bytes(weights)
    retrained = name_of(cfg, source=source)
    assert retrained != name
    (folder / "config.json").write_text('{"model_type": "qwen2_5_vl", "vocab_size": 9}')
    assert name_of(cfg, source=source) not in (name, retrained)
    assert "checkpoint_files" not in evalkit.run_identity("vlmeval:M", cfg, {}, "auto")  # a registered name


def test_a_new_revision_of_a_cached_hub_model_gives_a_new_run_name(tmp_path, monkeypatch):
    """A registered name (or a --config model) whose files are in the Hugging Face cache is fingerprinted by the
    snapshot the cache points at: a new revision downloaded there does not reuse the old revision's predictions."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--vlm"

    def download(commit: str, weights: bytes) -> None:  # the cache's layout: refs/main names the snapshot
        folder = repo / "snapshots" / commit
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
        (folder / "model.safetensors").write_bytes(weights)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    entry = evalkit.ModelEntry("vlm", "vlmeval:vlm", object, {"model_path": "org/vlm"})
    cfg = config()

    def name() -> str:
        identity = evalkit.run_identity(entry.source, cfg, {}, "auto", files=evalkit.local_config_dir(entry))
        return evalkit.run_name("vlm", cfg, identity)

    not_cached = name()
    download("a" * 40, b"first weights")
    assert evalkit.local_config_dir(entry) == repo / "snapshots" / ("a" * 40)
    first = name()
    assert name() == first and first != not_cached
    download("b" * 40, b"second weights")
    assert name() not in (first, not_cached)


def test_the_identity_follows_imported_method_code_and_the_machinery():
    identity = evalkit.run_identity("vlmeval:M", config(PRUNE_METHOD="prumerge_plus_pre_llm", KEEP_RATIO=0.5), {},
                                    "auto", run_qwenvl.FAMILY)
    assert {"methods/prumerge_plus.py", "methods/prumerge.py", "methods/_base.py"} <= set(identity["method_code"])
    assert {"hooks.py", "patching.py", "utils.py", "evalkit.py", "custom_qwenvl.py", "run_qwenvl.py"} <= set(
        identity["machinery_code"])
    stock = evalkit.run_identity("vlmeval:M", config(), {}, "auto", run_qwenvl.FAMILY)
    assert stock["method_code"] == {} and stock["machinery_code"] == identity["machinery_code"]


def test_the_machinery_digest_changes_with_code_not_comments(tmp_path):
    path = tmp_path / "module.py"
    path.write_text("def f(x):\n    return x + 1\n")
    digest = evalkit._syntax_digest(path)
    path.write_text('"""Doc."""\n\n# comment\ndef f(x):  # why\n    """What."""\n    return x + 1\n')
    assert evalkit._syntax_digest(path) == digest
    path.write_text("def f(x):\n    return x + 2\n")
    assert evalkit._syntax_digest(path) != digest


# ---------------------------------------------------------------- a checkpoint's own code never runs unasked
REMOTE_MODULE = '''from pathlib import Path

Path({marker_path!r}).touch()

from transformers import {processor} as _Native


class RemoteProcessor(_Native):
    pass
'''


def with_remote_code(checkpoint: Path, folder: Path, processor_class: str) -> tuple[Path, Path]:
    """A copy of ``checkpoint`` whose config files name a module of its own (``auto_map``) that leaves a marker
    file when imported."""
    import shutil

    shutil.copytree(checkpoint, folder)
    marker = folder.parent / f"{folder.name}.imported"
    (folder / "remote.py").write_text(REMOTE_MODULE.format(marker_path=str(marker), processor=processor_class))
    for name in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        file = folder / name
        if file.exists():
            data = json.loads(file.read_text())
            data["auto_map"] = {"AutoProcessor": "remote.RemoteProcessor"}
            file.write_text(json.dumps(data))
    return folder, marker


def test_loading_resolves_trust_remote_code_as_the_runner_says(evaluated, tmp_path):
    """Inside a wrapper's loading, transformers' own trust_remote_code=True (VLMEvalKit's Gemma4 passes it) gives
    way to the runner's setting: the checkpoint's module is imported only with --trust-remote-code."""
    from transformers import AutoProcessor

    load = evalkit.LoadSettings("cpu", "sdpa", "auto")
    for trust in (False, True):
        folder, marker = with_remote_code(evaluated.checkpoint, tmp_path / f"remote-{trust}", "Qwen2_5_VLProcessor")
        with evalkit._loading_with({**load.from_pretrained_kwargs(), "trust_remote_code": trust}):
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert marker.exists() == trust
        assert (type(processor).__name__ == "RemoteProcessor") == trust
