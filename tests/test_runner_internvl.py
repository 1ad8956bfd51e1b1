"""run_internvl.py end to end through ``vlmeval.run.main``, offline, on a tiny local InternVL3-like checkpoint, and its
prompts and tiles.

The checkpoint, rigged to always answer "A", evaluates the shared 10-question set pruned and (3 rows) stock: the
accuracy is known in advance. The prompt tests pin the text the model sees for a fixed message: VLMEvalKit's
InternVLChat prompts inside the checkpoint's chat template; the tile tests compare the processor's tiling with
VLMEvalKit's ``load_image``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import evalkit
import run_internvl
from tests import conftest
from tests.conftest import QUESTIONS, evaluate
from tests.support import shapes_data, tiny_internvl
from tests.support.tiny_checkpoints import save_checkpoint
from tests.test_runner import predictions, token_records
from utils import keep_count

CONFIGS = {"divprune": conftest.CONFIGS["divprune"], "stock": {}}
FLAGS = {"stock": ["--limit", "3"]}
# A 168 x 112 image with InternVLChat's max_num of 6 (the tiny processor's own max_patches is 4, which would give
# 2 tiles + thumbnail): 3 x 2 tiles + thumbnail, 2 x 2 tokens each.
TILES, TOKENS = 7, 7 * tiny_internvl.TOKENS_PER_TILE
SYSTEM = "<|im_start|>system\nYou are InternVL, a multimodal large language model.<|im_end|>\n"  # the tiny template's


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("internvl") / "always-a", family="internvl", answers="A")


@pytest.fixture(scope="module")
def evaluated_internvl(tmp_path_factory, lmudata_env, checkpoint) -> conftest.EvaluatedWorkDir:
    return evaluate(tmp_path_factory.mktemp("evaluated_internvl"), lmudata_env, checkpoint, CONFIGS,
                    runner="run_internvl", flags=FLAGS)


@pytest.fixture(scope="module")
def wrapper(checkpoint, tmp_path_factory):
    """The wrapper as VLMEvalKit builds it from a registry entry (outside the runner: CPU, checkpoint dtype)."""
    model = evalkit.vlmeval_model(run_internvl.InternVL_HF)(model_path=str(checkpoint))
    image = tmp_path_factory.mktemp("internvl_image") / "image.png"
    shapes_data.make_question(0)["image"].save(image)
    model.set_dump_image(lambda line: [str(image)])
    model.image = str(image)
    return model


def rendered(wrapper, message, dataset):
    content, _ = wrapper.user_content(message, dataset)
    return wrapper.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 tokenize=False)


# ---------------------------------------------------------------- prompts
MCQ_LINE = pd.Series({"index": 0, "question": "What colour is the shape?", "A": "red", "B": "blue", "C": "green",
                      "D": float("nan"), "answer": "A"})
MCQ_TEXT = ("What colour is the shape?\nA. red\nB. blue\nC. green\n"
            "Answer with the option's letter from the given choices directly.")


def test_multiple_choice_prompt_is_internvlchats_in_the_chat_template(wrapper):
    assert wrapper.use_custom_prompt("MMBench_DEV_EN")
    message = wrapper.build_prompt(MCQ_LINE, "MMBench_DEV_EN")
    assert message == [{"type": "text", "value": MCQ_TEXT}, {"type": "image", "value": wrapper.image}]
    assert rendered(wrapper, message, "MMBench_DEV_EN") == (
        f"{SYSTEM}<|im_start|>user\n<IMG_CONTEXT>\n{MCQ_TEXT}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("dataset, suffix", [
    ("MME", " Answer the question using a single word or phrase."),
    ("HallusionBench", " Please answer yes or no. Answer the question using a single word or phrase."),
    ("POPE", ""),
])
def test_yes_no_prompts_are_internvlchats(wrapper, dataset, suffix):
    question = "Is there a red circle in the image?"
    message = wrapper.build_prompt(pd.Series({"index": 0, "question": question}), dataset)
    assert message[0] == {"type": "text", "value": question + suffix}
    assert rendered(wrapper, message, dataset) == (
        f"{SYSTEM}<|im_start|>user\n<IMG_CONTEXT>\n{question}{suffix}<|im_end|>\n<|im_start|>assistant\n")


def test_several_images_are_numbered_as_internvlchat_numbers_them(wrapper):
    message = [{"type": "text", "value": "Compare them."}, {"type": "image", "value": wrapper.image},
               {"type": "image", "value": wrapper.image}]
    assert rendered(wrapper, message, "MMBench_DEV_EN") == (
        f"{SYSTEM}<|im_start|>user\nImage-1: <IMG_CONTEXT>\nImage-2: <IMG_CONTEXT>\nCompare them.<|im_end|>\n"
        "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        run_internvl.split_images("<image>\n<image>\nQ", 1)


# ---------------------------------------------------------------- tiles
def test_tiles_per_image_follow_internvlchats_max_num(wrapper):
    for dataset, max_num in (("MMBench_DEV_EN", 6), ("MME", 6), ("DocVQA_VAL", 18), ("OCRBench", 24),
                             ("ChartQA_TEST", 12)):
        wrapper.set_max_num(dataset)
        assert wrapper.tiles_per_image(1) == max_num, dataset
    wrapper.set_max_num("MMBench_DEV_EN")
    assert wrapper.tiles_per_image(20) == 3  # at most 64 tiles per sample
    wrapper.fixed_max_num = 2
    try:
        wrapper.set_max_num("DocVQA_VAL")
        assert wrapper.tiles_per_image(1) == 2  # --model-kwargs '{"max_num": 2}'
    finally:
        wrapper.fixed_max_num = None


def test_the_processors_tiles_are_vlmevalkits_load_image():
    """GotOcr2's tiling with max_patches = max_num: the same tiles as InternVL's dynamic_preprocess (as VLMEvalKit's
    load_image calls it), for the released 448 px tiles and ImageNet normalisation."""
    from transformers import GotOcr2ImageProcessorPil
    from vlmeval.vlm.internvl.utils import dynamic_preprocess

    processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
                                         max_patches=12, image_mean=[0.485, 0.456, 0.406],
                                         image_std=[0.229, 0.224, 0.225])
    for width, height in [(168, 112), (640, 480), (1000, 300), (300, 1000), (448, 448), (2000, 500), (100, 100)]:
        for max_num in (1, 6, 12, 24):
            tiles = len(dynamic_preprocess(Image.new("RGB", (width, height)), max_num=max_num, image_size=448,
                                           use_thumbnail=True))
            assert processor.get_number_of_image_patches(height, width, {"max_patches": max_num}) == tiles


def test_the_processors_pixels_are_vlmevalkits_load_image(tmp_path):
    from transformers import GotOcr2ImageProcessorPil
    from vlmeval.vlm.internvl.utils import load_image

    processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
                                         max_patches=12, image_mean=[0.485, 0.456, 0.406],
                                         image_std=[0.229, 0.224, 0.225])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    theirs = load_image(str(tmp_path / "image.png"), max_num=6)
    ours = processor(images=[image], max_patches=6, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (7, 3, 448, 448)
    assert torch.allclose(ours, theirs, atol=1e-5)


# ---------------------------------------------------------------- registry
def test_registered_internvl_models_resolve_to_the_runners_wrapper(tmp_path):
    from vlmeval.config import supported_VLM

    vlmevalkits = {name for name, entry in supported_VLM.items()
                   if getattr(getattr(entry, "func", None), "__module__", "").startswith("vlmeval")}
    assert not set(run_internvl.INTERNVL_HF_CHECKPOINTS) & vlmevalkits
    supported = {name: supported_VLM[name] for name in vlmevalkits}
    evalkit.register_models(run_internvl.FAMILY, supported)
    entry = evalkit.resolve_model(run_internvl.FAMILY, "InternVL3-8B-hf", supported)
    assert entry.wrapper.__name__ == "InternVL_HF" and entry.kwargs == {"model_path": "OpenGVLab/InternVL3-8B-hf"}
    with pytest.raises(evalkit.RunnerError, match="InternVLChat, which is not a InternVL wrapper"):
        evalkit.resolve_model(run_internvl.FAMILY, "InternVL3-8B", supported)  # remote code
    with pytest.raises(evalkit.RunnerError, match="did you mean InternVL3-8B-hf"):
        evalkit.resolve_model(run_internvl.FAMILY, "InternVL3-8B-HF", supported)


# ---------------------------------------------------------------- end to end (rigged to answer A)
def test_internvl_scores_exactly_the_share_of_a_answers(evaluated_internvl):
    assert evaluated_internvl.exit_codes == {label: 0 for label in CONFIGS}
    for label, rows in (("divprune", QUESTIONS), ("stock", 3)):
        run_dir = evaluated_internvl.run_dir(label)
        _, preds = predictions(run_dir)
        assert list(preds["prediction"]) == ["A"] * rows, label
        expected = evaluated_internvl.answers[:rows].count("A") / rows
        assert 0 < expected < 1
        status = json.loads((run_dir / "status.json").read_text())["datasets"][shapes_data.NAME]
        assert status["metrics"]["split=none|Overall"] == pytest.approx(expected, abs=1e-12), label


def test_internvl_records_its_tiles_and_visual_tokens(evaluated_internvl):
    expected = {"divprune": ({"input": TOKENS, "pre_llm": keep_count(TOKENS, 0.5)}, QUESTIONS),
                "stock": ({"input": TOKENS}, 3)}
    for label, (tokens, rows) in expected.items():
        records = token_records(evaluated_internvl.run_dir(label))
        assert len(records) == rows and all(r["tokens"] == tokens for r in records), label
        assert records[0]["spans"][0]["grid"] == [TILES, 2, 2]  # one span: the image with all its tiles
    recorded = json.loads((evaluated_internvl.run_dir("divprune") / evalkit.RUN_CONFIG_FILE).read_text())
    assert recorded["wrapper"] == "InternVL_HF" and recorded["family"] == "InternVL"
    assert "run_internvl.py" in recorded["machinery_code"]  # the wrapper's code is part of the run identity
    assert recorded["trust_remote_code"] is False
