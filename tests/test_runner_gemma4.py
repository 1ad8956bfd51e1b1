"""run_gemma4.py end to end through ``vlmeval.run.main``, offline, on tiny local Gemma 4 checkpoints.

VLMEvalKit's own Gemma4 wrapper is used, with the runner's fixes: its ``parse_response`` call fails with
transformers 5.23, and it casts the inputs to bfloat16 whatever the model's dtype. The work dir is evaluated with
a tiny E2B-like checkpoint rigged to always answer "A" (exact accuracy), stock, pruned (pre-LLM and intra-LLM)
and at a larger native soft-token budget.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

import evalkit
import run_gemma4
from tests.support import shapes_data
from tests.support.tiny_checkpoints import save_checkpoint
from tests.support.tiny_gemma import build_processor
from tests import conftest
from tests.conftest import QUESTIONS, RUNNER_FLAGS, evaluate, run_runner
from tests.test_runner import predictions, token_records, with_remote_code
from utils import keep_count

CONFIGS = {**conftest.CONFIGS, "budget": {}}
FLAGS = {"budget": ["--max-soft-tokens", "140"]}
# The data set's 168 x 112 images: the tiny checkpoint's budget of 70 soft tokens gives 6 x 10 tokens, 140 gives 9 x 14.
TOKENS, GRID = 60, [1, 6, 10]
BUDGET_TOKENS, BUDGET_GRID = 126, [1, 9, 14]


@pytest.fixture(scope="module")
def evaluated_gemma(tmp_path_factory, lmudata_env) -> conftest.EvaluatedWorkDir:
    root = tmp_path_factory.mktemp("evaluated_gemma")
    checkpoint = save_checkpoint(root / "always-a", family="gemma4_e2b", answers="A")
    return evaluate(root, lmudata_env, checkpoint, CONFIGS, runner="run_gemma4", flags=FLAGS)


def image_message(text="Which letter?"):
    image = shapes_data.make_question(0)["image"]
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


# ---------------------------------------------------------------- the wrapper's problems and the fixes (no runner)
def test_vlmeval_gemma4_wrapper_fails_on_every_answer_without_the_fix(tmp_path):
    """What the fix is for: the unmodified wrapper raises in processor.parse_response (transformers 5.23)."""
    from vlmeval.vlm import Gemma4

    checkpoint = save_checkpoint(tmp_path / "tiny", family="gemma4_e2b", answers="A")
    wrapper = Gemma4(model_path=str(checkpoint), device_map="cpu", torch_dtype=torch.float32, max_new_tokens=1)
    image = tmp_path / "image.png"
    shapes_data.make_question(0)["image"].save(image)
    with pytest.raises(AttributeError, match="response_template"):
        wrapper.generate_inner([{"type": "image", "value": str(image)}, {"type": "text", "value": "Which letter?"}])
    with pytest.raises(ValueError, match="prefix="):  # a tokenizer with a template would fail next
        wrapper.processor.tokenizer.parse_response("A", schema={}, prefix=None)


def test_parse_response_leaves_the_answer_to_the_wrappers_own_post_processing():
    from vlmeval.vlm import Gemma4

    processor = run_gemma4._GemmaProcessor(build_processor(), model=None)

    def wrapper_answer(decoded):  # what Gemma4.generate_inner_transformers does with parse_response's result
        parsed = processor.parse_response(decoded)
        return Gemma4.extract_response_for_eval(parsed.get("answer", parsed.get("response", str(parsed))))

    assert processor.parse_response("B<turn|>") == {"answer": "B"}
    assert wrapper_answer("<|channel>thought\nThe square is red.<channel|>C<turn|><eos>") == "C"
    assert wrapper_answer("<|channel>final\nD<channel|><turn|>") == "D"
    assert wrapper_answer("<pad><|image|>A<|tool_call>") == "A"  # every other special token goes


def test_inputs_follow_the_models_dtype_and_device():
    """Gemma4's ``.to(device, dtype=torch.bfloat16)`` and Qwen2VLChat's ``.to('cuda')`` land on the model's."""
    processor = build_processor()
    for dtype in (torch.float32, torch.bfloat16):
        model = types.SimpleNamespace(device=torch.device("cpu"), dtype=dtype)
        proxy = evalkit.InputsOnModel(processor, model)
        inputs = proxy.apply_chat_template(image_message(), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt").to("cuda", dtype=torch.bfloat16)
        assert inputs["pixel_values"].dtype == dtype and inputs["pixel_values"].device.type == "cpu"
        assert inputs["input_ids"].dtype == torch.long
        called = proxy(text=["<|image|>"], images=[[image_message()[0]["content"][0]["image"]]],
                       return_tensors="pt").to("cuda")
        assert called["pixel_values"].device.type == "cpu" and called["pixel_values"].dtype == torch.float32
    prompt = proxy.apply_chat_template(image_message(), add_generation_prompt=True, tokenize=False)
    assert isinstance(prompt, str) and "<|image|>" in prompt
    # Unadapted, a float32 model would get bfloat16-rounded pixels:
    raw = processor.apply_chat_template(image_message(), add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")
    assert not torch.equal(raw["pixel_values"], raw.to("cpu", dtype=torch.bfloat16)["pixel_values"].float())


def test_registered_gemma4_models_resolve_to_the_gemma4_wrapper(tmp_path):
    from vlmeval.config import supported_VLM
    from vlmeval.vlm import Gemma4

    for name, path in [("Gemma4-E2B-it", "google/gemma-4-E2B-it"), ("Gemma4-E4B-it", "google/gemma-4-E4B-it"),
                       ("Gemma4-31B-it", "google/gemma-4-31B-it"), ("Gemma4-26B-A4B-it", "google/gemma-4-26B-A4B-it")]:
        entry = evalkit.resolve_model(run_gemma4.FAMILY, name, supported_VLM)
        assert entry.wrapper is Gemma4 and entry.kwargs["model_path"] == path
    with pytest.raises(evalkit.RunnerError, match="not a Gemma 4 wrapper"):
        evalkit.resolve_model(run_gemma4.FAMILY, "Qwen2.5-VL-7B-Instruct", supported_VLM)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(evalkit.RunnerError, match="model_type 'qwen2_5_vl' is not a Gemma 4 model"):
        evalkit.resolve_model(run_gemma4.FAMILY, str(tmp_path), supported_VLM)


def test_soft_token_budgets_are_the_ones_transformers_accepts():
    from transformers.models.gemma4 import image_processing_pil_gemma4

    assert run_gemma4.SOFT_TOKEN_BUDGETS == image_processing_pil_gemma4._SUPPORTED_SOFT_TOKENS


def test_a_bad_budget_is_refused_before_anything_loads(tmp_path, capsys):
    argv = ["--model", "Gemma4-E2B-it", "--data", shapes_data.NAME, "--work-dir", str(tmp_path / "out"), *RUNNER_FLAGS]
    with pytest.raises(SystemExit) as exit_info:
        run_runner([*argv, "--max-soft-tokens", "100"], {}, runner="run_gemma4")
    assert exit_info.value.code == 2
    allowed = "argument --max-soft-tokens: invalid choice: 100 (choose from 70, 140, 280, 560, 1120)"
    assert allowed in capsys.readouterr().err
    flags = ["--model-kwargs", json.dumps({"max_soft_tokens": 70})]
    assert run_runner([*argv, *flags], {}, runner="run_gemma4") == 2
    assert "'max_soft_tokens' is set with --max-soft-tokens" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- end to end (rigged E2B-like checkpoint)
def test_every_configuration_evaluates_and_exits_zero(evaluated_gemma):
    assert evaluated_gemma.exit_codes == {label: 0 for label in CONFIGS}


def test_rigged_model_scores_exactly_the_share_of_a_answers(evaluated_gemma):
    expected = evaluated_gemma.answers.count("A") / QUESTIONS
    assert 0 < expected < 1
    for label in CONFIGS:
        run_dir = evaluated_gemma.run_dir(label)
        _, preds = predictions(run_dir)
        assert list(preds["prediction"]) == ["A"] * QUESTIONS, label
        status = json.loads((run_dir / "status.json").read_text())["datasets"][shapes_data.NAME]
        assert status["metrics"]["split=none|Overall"] == pytest.approx(expected, abs=1e-12)


def test_every_configuration_has_its_own_predictions_and_name(evaluated_gemma):
    files = {label: predictions(evaluated_gemma.run_dir(label))[0] for label in CONFIGS}
    assert len({path.parent for path in files.values()}) == len(CONFIGS)
    names = {label: evaluated_gemma.run_dir(label).name for label in CONFIGS}
    assert names["stock"].startswith("always-a__stock__")
    assert names["budget"].startswith("always-a-soft140__stock__")
    assert names["divprune"].startswith("always-a__divprune_pre_llm-0.5__")
    recorded = {label: json.loads((evaluated_gemma.run_dir(label) / evalkit.RUN_CONFIG_FILE).read_text())
                for label in CONFIGS}
    assert recorded["budget"]["wrapper_kwargs"] == {"max_new_tokens": 1, "max_soft_tokens": 140}
    assert recorded["stock"]["wrapper_kwargs"] == {"max_new_tokens": 1}
    assert {r["wrapper"] for r in recorded.values()} == {"Gemma4"}
    assert recorded["budget"]["base_model"] == "always-a-soft140"


def test_recorded_token_counts_follow_the_configuration_and_the_budget(evaluated_gemma):
    expected = {
        "stock": ({"input": TOKENS}, GRID),
        "divprune": ({"input": TOKENS, "pre_llm": keep_count(TOKENS, 0.5)}, GRID),
        "fastv": ({"input": TOKENS, "layer_2": keep_count(TOKENS, 0.25)}, GRID),
        "budget": ({"input": BUDGET_TOKENS}, BUDGET_GRID),
    }
    for label, (tokens, grid) in expected.items():
        records = token_records(evaluated_gemma.run_dir(label))
        assert len(records) == QUESTIONS and len({r["key"] for r in records}) == QUESTIONS
        assert all(r["tokens"] == tokens and len(r["spans"]) == 1 for r in records), label
        assert records[0]["spans"][0]["grid"] == grid


@pytest.mark.parametrize("family", ["gemma4_dense31b", "gemma4_moe26b"])
def test_other_gemma4_variants_load_from_a_folder_and_prune(lmudata_env, tmp_path, family):
    """31B-like (bidirectional vision attention) and 26B-A4B-like (MoE) checkpoints, pre-LLM + intra-LLM."""
    checkpoint = save_checkpoint(tmp_path / family, family=family, answers="ABCD")
    argv = ["--model", str(checkpoint), "--data", shapes_data.NAME, "--work-dir", str(tmp_path / "out"),
            "--limit", "2", *RUNNER_FLAGS]
    env = {"KEEP_RATIO": "0.5", "PRUNE_METHOD_PRE_LLM": "divprune_pre_llm",
           "INTRA_LLM_LAYER_SPECS": "3:fastv_intra_llm"}
    assert run_runner(argv, env, runner="run_gemma4") == 0
    (run_dir,) = [p.parent for p in (tmp_path / "out").glob(f"*/{evalkit.RUN_CONFIG_FILE}")]
    pre = keep_count(TOKENS, 0.5)
    expected = {"input": TOKENS, "pre_llm": pre, "layer_3": keep_count(pre, 0.5)}
    assert [r["tokens"] for r in token_records(run_dir)] == [expected, expected]
    assert set(predictions(run_dir)[1]["prediction"]) <= set("ABCD")


def test_a_checkpoints_own_code_does_not_run_unless_asked(evaluated_gemma, tmp_path):
    """VLMEvalKit's Gemma4 wrapper loads with trust_remote_code=True: a copied checkpoint whose config files name a
    module of its own (auto_map) would have it imported. The runner keeps it off unless --trust-remote-code."""
    folder, marker = with_remote_code(evaluated_gemma.checkpoint, tmp_path / "remote-ckpt", "Gemma4Processor")
    argv = ["--model", str(folder), "--data", shapes_data.NAME, "--work-dir", str(tmp_path / "out"), "--limit", "1",
            *RUNNER_FLAGS]
    assert run_runner(argv, {}, "run_gemma4") == 0
    assert not marker.exists()
    assert run_runner([*argv, "--trust-remote-code"], {}, "run_gemma4") == 0
    assert marker.exists()  # the flag lets it run, so the check above can fail

