"""run_llava.py end to end through ``vlmeval.run.main``, offline, on tiny local checkpoints, and its prompts.

LLaVA-1.5 (the runner's own ``LLaVA_HF`` wrapper) evaluates the shared 10-question set pruned and stock, rigged to
always answer "A": the accuracy is known in advance. LLaVA-NeXT and LLaVA-OneVision (VLMEvalKit's ``LLaVA_Next`` and
``LLaVA_OneVision_HF`` with the runner's fixes) answer two questions each. The prompt tests pin the text the model
sees for a fixed message: VLMEvalKit's LLaVA prompts inside the checkpoint's chat template.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import evalkit
import run_llava
from tests import conftest
from tests.conftest import QUESTIONS, RUNNER_FLAGS, evaluate, run_runner
from tests.support import shapes_data, tiny_llava
from tests.support.tiny_checkpoints import save_checkpoint
from tests.test_runner import predictions, token_records
from utils import keep_count

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"divprune": conftest.CONFIGS["divprune"], "stock": {}, "tome": {"VIT_LAYER_SPECS": "1:tome_vit:0.5"}}
FLAGS = {"stock": ["--limit", "3"], "tome": ["--limit", "3"]}  # the stock reference and the ViT stage: 3 rows
TOKENS, GRID = 36, [1, 6, 6]  # one 84 px CLIP view of 6 x 6 patches per image (padded to a square first)


@pytest.fixture(scope="module")
def evaluated_llava(tmp_path_factory, lmudata_env) -> conftest.EvaluatedWorkDir:
    root = tmp_path_factory.mktemp("evaluated_llava")
    checkpoint = save_checkpoint(root / "always-a", family="llava", answers="A")
    return evaluate(root, lmudata_env, checkpoint, CONFIGS, runner="run_llava", flags=FLAGS)


def llava_hf(processor=None, system_prompt=run_llava.LLAVA_V1_SYSTEM_PROMPT, image=None):
    """The LLaVA-1.5 wrapper without a model: what builds its prompts."""
    wrapper = object.__new__(evalkit.vlmeval_model(run_llava.LLaVA_HF))
    wrapper.processor = processor or tiny_llava.build_processor("llava")
    wrapper.system_prompt, wrapper.pad_to_square = system_prompt, True
    wrapper.dump_image_func = lambda line: [str(image)]
    return wrapper


@pytest.fixture(scope="module")
def rigged(tmp_path_factory):
    """``rigged(family)``: a tiny checkpoint of a LLaVA family that always answers "A" (saved once per module)."""
    saved = {}

    def checkpoint(family: str) -> Path:
        if family not in saved:
            saved[family] = save_checkpoint(tmp_path_factory.mktemp(family) / family, family=family, answers="A")
        return saved[family]

    return checkpoint


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llava_image") / "image.png"
    shapes_data.make_question(0)["image"].save(path)  # 168 x 112
    return path


# ---------------------------------------------------------------- prompts (no model)
MCQ_LINE = pd.Series({"index": 0, "question": "What colour is the shape?", "A": "red", "B": "blue", "C": "green",
                      "D": float("nan"), "answer": "A"})
MCQ_TEXT = ("What colour is the shape?\nA. red\nB. blue\nC. green\n"
            "Answer with the option's letter from the given choices directly.")


def test_llava_1_5_multiple_choice_prompt_is_vlmevalkits_in_the_chat_template(image_file):
    wrapper = llava_hf(image=image_file)
    assert wrapper.use_custom_prompt("MMBench_DEV_EN") and wrapper.use_custom_prompt(shapes_data.NAME)
    message = wrapper.build_prompt(MCQ_LINE, "MMBench_DEV_EN")
    assert message == [{"type": "image", "value": str(image_file)}, {"type": "text", "value": MCQ_TEXT}]
    hinted = wrapper.build_prompt(pd.Series({**MCQ_LINE, "hint": "Look closely."}), "MMBench_DEV_EN")
    assert hinted[-1]["value"] == "Look closely.\n" + MCQ_TEXT
    assert wrapper.prompt([{"role": "user", "content": message}]) == (
        f"{run_llava.LLAVA_V1_SYSTEM_PROMPT} USER: <image>\n{MCQ_TEXT} ASSISTANT:")
    assert llava_hf(system_prompt="", image=image_file).prompt([{"role": "user", "content": message}]) == (
        f"USER: <image>\n{MCQ_TEXT} ASSISTANT:")  # the llava-hf model cards' format


def test_llava_1_5_yes_no_prompt_is_the_data_sets_own(image_file):
    """As VLMEvalKit's LLaVA: no custom prompt for Y/N sets; MME's questions carry "Please answer yes or no."."""
    wrapper = llava_hf(image=image_file)
    assert not wrapper.use_custom_prompt("MME") and not wrapper.use_custom_prompt("POPE")
    question = "Is there a red circle in the image? Please answer yes or no."
    message = [{"type": "image", "value": str(image_file)}, {"type": "text", "value": question}]
    assert wrapper.prompt([{"role": "user", "content": message}]) == (
        f"{run_llava.LLAVA_V1_SYSTEM_PROMPT} USER: <image>\n{question} ASSISTANT:")


def test_llava_1_5_images_are_padded_to_a_square_with_the_image_mean(image_file):
    wrapper = llava_hf(image=image_file)
    image = wrapper._image(str(image_file))
    assert image.size == (168, 168)
    mean = tuple(int(v * 255) for v in wrapper.processor.image_processor.image_mean)
    assert image.getpixel((0, 0)) == mean and image.getpixel((84, 84)) != mean  # padding above, the image inside


def test_llava_next_processor_call_order_is_fixed():
    """VLMEvalKit's LLaVA_Next calls ``processor(prompt, images)``; transformers 5 reads the prompt as images."""
    import torch

    processor = tiny_llava.build_processor("llava_next")
    image = shapes_data.make_question(0)["image"]
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                             "text": "Which?"}]}],
                                           add_generation_prompt=True)
    with pytest.raises(ValueError, match="Incorrect image source"):
        processor(prompt, [image], return_tensors="pt")
    model = type("Model", (), {"device": torch.device("cpu"), "dtype": torch.float32})()
    fixed = run_llava._Processor(processor, model)(prompt, [image], return_tensors="pt").to("cuda", torch.float16)
    expected = processor(text=prompt, images=[image], return_tensors="pt")
    assert torch.equal(fixed["input_ids"], expected["input_ids"])
    assert torch.equal(fixed["pixel_values"], expected["pixel_values"])  # float32 on the CPU: the model's


def test_vlmevalkit_llava_next_loads_where_the_runner_says(rigged, tmp_path, monkeypatch):
    """LLaVA_Next's own loading, flash-attn importable: ``use_flash_attention_2=True`` (a TypeError in transformers 5),
    float16 and ``.cuda()`` give way to the runner's settings; the model keeps its own ``to`` / ``cuda`` after."""
    import types

    import torch
    from vlmeval.vlm import LLaVA_Next

    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))  # the wrapper only imports it
    load = evalkit.LoadSettings("cpu", "eager", "auto")
    run = evalkit.ModelRun(run_llava.FAMILY, load, evalkit.TokenLog(tmp_path, 0))
    wrapper = evalkit.adapt(LLaVA_Next, run_llava.LlavaFixes)(model_path=str(rigged("llava_next")), pruning_run=run)
    model = wrapper.model
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert model.config._attn_implementation == "eager"
    assert "cuda" not in vars(model) and "to" not in vars(model)
    assert isinstance(wrapper.processor, run_llava._Processor)


def test_registered_llava_models_resolve_to_their_wrappers(tmp_path):
    from vlmeval.config import supported_VLM
    from vlmeval.vlm import LLaVA_Next, LLaVA_OneVision_HF

    vlmevalkits = {name for name, entry in supported_VLM.items()  # a runner in this process may have added its own
                   if getattr(getattr(entry, "func", None), "__module__", "").startswith("vlmeval")}
    assert not set(run_llava.LLAVA_HF_CHECKPOINTS) & vlmevalkits  # VLMEvalKit's own names are reused
    supported = {name: supported_VLM[name] for name in vlmevalkits}
    assert evalkit.register_models(run_llava.FAMILY, supported) == list(run_llava.LLAVA_HF_CHECKPOINTS)
    family = run_llava.FAMILY
    entry = evalkit.resolve_model(family, "llava-1.5-7b-hf", supported)
    assert entry.wrapper.__name__ == "LLaVA_HF" and entry.kwargs == {"model_path": "llava-hf/llava-1.5-7b-hf"}
    entry = evalkit.resolve_model(family, "llava_next_vicuna_7b", supported)
    assert entry.wrapper is LLaVA_Next and entry.kwargs["model_path"] == "llava-hf/llava-v1.6-vicuna-7b-hf"
    entry = evalkit.resolve_model(family, "llava-onevision-qwen2-7b-ov-hf", supported)
    assert entry.wrapper is LLaVA_OneVision_HF
    with pytest.raises(evalkit.RunnerError, match="not a LLaVA wrapper"):  # the original LLaVA package's
        evalkit.resolve_model(family, "llava_v1.5_7b", supported)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(evalkit.RunnerError, match="model_type 'qwen2_5_vl' is not a LLaVA model"):
        evalkit.resolve_model(family, str(tmp_path), supported)
    # run.py's JSON --config names the runner's own class too
    entry = evalkit._config_entry(family, "tiny", {"class": "LLaVA_HF", "model_path": "/ckpt"}, supported)
    assert entry.wrapper is evalkit.vlmeval_model(run_llava.LLaVA_HF) and entry.kwargs == {"model_path": "/ckpt"}


# ---------------------------------------------------------------- end to end: LLaVA-1.5 (rigged to answer A)
def test_llava_1_5_scores_exactly_the_share_of_a_answers(evaluated_llava):
    assert evaluated_llava.exit_codes == {label: 0 for label in CONFIGS}
    for label, rows in (("divprune", QUESTIONS), ("stock", 3), ("tome", 3)):
        run_dir = evaluated_llava.run_dir(label)
        _, preds = predictions(run_dir)
        assert list(preds["prediction"]) == ["A"] * rows, label
        expected = evaluated_llava.answers[:rows].count("A") / rows
        assert 0 < expected < 1
        status = json.loads((run_dir / "status.json").read_text())["datasets"][shapes_data.NAME]
        assert status["metrics"]["split=none|Overall"] == pytest.approx(expected, abs=1e-12), label


def test_llava_1_5_records_its_visual_tokens_per_configuration(evaluated_llava):
    expected = {"divprune": ({"input": TOKENS, "pre_llm": keep_count(TOKENS, 0.5)}, QUESTIONS),
                "stock": ({"input": TOKENS}, 3), "tome": ({"input": TOKENS, "vit_1": keep_count(TOKENS, 0.5)}, 3)}
    for label, (tokens, rows) in expected.items():
        records = token_records(evaluated_llava.run_dir(label))
        assert len(records) == rows and all(r["tokens"] == tokens for r in records), label
        assert records[0]["spans"][0]["grid"] == GRID
    assert "__B1-tome_vit-0.5__" in evaluated_llava.run_dir("tome").name
    recorded = json.loads((evaluated_llava.run_dir("divprune") / evalkit.RUN_CONFIG_FILE).read_text())
    assert recorded["wrapper"] == "LLaVA_HF" and recorded["family"] == "LLaVA"
    assert "run_llava.py" in recorded["machinery_code"] and "custom_llava.py" in recorded["machinery_code"]


# ---------------------------------------------------------------- end to end: VLMEvalKit's LLaVA-NeXT / OneVision
@pytest.mark.parametrize("family, wrapper, env", [
    ("llava_next", "LLaVA_Next", conftest.CONFIGS["divprune"]),
    ("llava_onevision", "LLaVA_OneVision_HF", {"INTRA_LLM_LAYER_SPECS": "2:fastv_intra_llm:0.5"}),
])
def test_vlmevalkit_llava_next_and_onevision_run_on_the_cpu_and_prune(lmudata_env, rigged, tmp_path, family, wrapper,
                                                                      env):
    """``.cuda()`` / ``.to('cuda')``, float16, the processor call order and (OneVision) the hard-coded 2048 new tokens
    are fixed: the rigged model answers exactly "A" (not 2048 of them) on the CPU in float32."""
    argv = ["--model", str(rigged(family)), "--data", shapes_data.NAME, "--work-dir", str(tmp_path / "out"),
            "--limit", "2", *RUNNER_FLAGS]
    assert run_runner(argv, env, runner="run_llava") == 0
    (run_dir,) = [p.parent for p in (tmp_path / "out").glob(f"*/{evalkit.RUN_CONFIG_FILE}")]
    recorded = json.loads((run_dir / evalkit.RUN_CONFIG_FILE).read_text())
    assert recorded["wrapper"] == wrapper and recorded["load"]["device"] == "cpu"
    assert list(predictions(run_dir)[1]["prediction"]) == ["A", "A"]
    records = token_records(run_dir)
    assert len(records) == 2
    for record in records:
        tokens = record["tokens"]
        assert tokens["input"] > TOKENS  # any-resolution: the base view and its tiles
        stage = "pre_llm" if "pre_llm" in tokens else "layer_2"
        assert tokens == {"input": tokens["input"], stage: keep_count(tokens["input"], 0.5)}


# ---------------------------------------------------------------- command line
@pytest.mark.slow
def test_help_of_both_new_runners_exits_0():
    """``python run_llava.py --help`` and ``python run_internvl.py --help`` (run side by side: each imports
    VLMEvalKit's run.py for its flags)."""
    runs = {name: subprocess.Popen([sys.executable, str(ROOT / name), "--help"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            for name in ("run_llava.py", "run_internvl.py")}
    for name, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
        assert f"usage: {name}" in out and "--attn-implementation" in out
        assert "VLMEvalKit's flags (passed through)" in out and "--judge" in out
