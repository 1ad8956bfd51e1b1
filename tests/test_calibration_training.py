"""The calibration task and model: deterministic data, prompts identical to VLMEvalKit's, reproducible training."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from calibration import data
from calibration import train as training
from calibration.models import FAMILIES, GEMMA4, IMAGE_MODELS, INTERNVL, LLAVA, QWEN

def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("index", range(6))
def test_samples_are_deterministic(index):
    first, second = data.make_sample(index, data.EVAL_SEED), data.make_sample(index, data.EVAL_SEED)
    assert _png_bytes(first["image"]) == _png_bytes(second["image"])
    assert {k: v for k, v in first.items() if k != "image"} == {k: v for k, v in second.items() if k != "image"}
    other_seed = data.make_sample(index, data.EVAL_SEED + 1)
    assert _png_bytes(other_seed["image"]) != _png_bytes(first["image"])


@pytest.mark.parametrize("index", range(30))
def test_target_token_holds_the_asked_object_and_only_it(index):
    sample = data.make_sample(index, data.EVAL_SEED)
    pixels = np.asarray(sample["image"]).astype(int)
    assert pixels.shape == (data.IMAGE_SIZE, data.IMAGE_SIZE, 3)
    drawn = np.abs(pixels - pixels[0, 0]).sum(-1) > 0  # the corner is background: objects keep a margin

    def cell(token):
        row, col = divmod(token, data.GRID)
        return drawn[row * data.CELL:(row + 1) * data.CELL, col * data.CELL:(col + 1) * data.CELL]

    object_tokens = [obj["row"] * data.GRID + obj["col"] for obj in sample["objects"]]
    assert len(set(object_tokens)) == sample["n_objects"] == len(sample["objects"])
    # Every drawn pixel lies in an object's cell, so each object is held by exactly one visual token.
    assert sum(cell(token).sum() for token in object_tokens) == drawn.sum()
    [target] = sample["target_tokens"]
    assert target in object_tokens and cell(target).sum() > 20
    asked = sample["objects"][object_tokens.index(target)]
    attribute = "shape" if sample["category"] == "shape" else "colour"
    assert asked[attribute] == sample["answer_text"] == sample[sample["answer"]]
    others = [obj[attribute] for obj in sample["objects"] if obj is not asked]
    assert sample["answer_text"] not in others  # attributes are unique, so the answer names one object
    if sample["category"] == "position":
        assert sample["question"].endswith(f"in the {asked['quadrant']}?")


def test_categories_are_balanced_and_options_distinct():
    samples = [data.make_sample(i, data.EVAL_SEED) for i in range(30)]
    assert [s["category"] for s in samples].count("position") == 10
    for sample in samples:
        assert len({sample[letter] for letter in "ABCD"}) == 4


def test_tsv_columns(tmp_path):
    path = data.write_dataset(tmp_path, n=6)
    assert path == tmp_path / f"{data.NAME}.tsv"
    table = pd.read_csv(path, sep="\t")
    assert list(table.columns) == ["index", "image", "question", "A", "B", "C", "D", "answer", "category",
                                   "n_objects", "target_tokens"]
    first = data.make_sample(0, data.EVAL_SEED)
    assert json.loads(table.loc[0, "target_tokens"]) == first["target_tokens"]
    assert table.loc[0, "question"] == first["question"]


def test_mcq_prompt_is_vlmevalkits(tmp_path, monkeypatch):
    """The prompt VLMEvalKit really sends for this local TSV: Qwen2VLChat leaves a custom data set's prompt to
    the data set (its own MCQ prompt, without the trailing " \\n", is for registered data sets only)."""
    from vlmeval.dataset import build_dataset
    from vlmeval.vlm.qwen2_vl.prompt import Qwen2VLPromptMixin

    data.write_dataset(tmp_path, n=3)
    monkeypatch.setenv("LMUData", str(tmp_path))
    assert not Qwen2VLPromptMixin().use_custom_prompt(data.NAME)
    dataset = build_dataset(data.NAME)
    for index in range(3):
        messages = dataset.build_prompt(dataset.data.iloc[index])
        assert [m["type"] for m in messages] == ["image", "text"]
        assert messages[1]["value"] == data.mcq_prompt(data.make_sample(index, data.EVAL_SEED))


def test_qwen_processor_keeps_the_image_size():
    from qwen_vl_utils import process_vision_info

    sample = data.make_sample(0, data.EVAL_SEED)
    messages = [{"role": "user", "content": [{"type": "image", "image": sample["image"]},
                                             {"type": "text", "text": data.mcq_prompt(sample)}]}]
    images, _ = process_vision_info([messages])
    assert images[0].size == (data.IMAGE_SIZE, data.IMAGE_SIZE)
    inputs = QWEN.build_processor()(text=[training.chat_text(sample, QWEN)], images=images, return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 2 * data.GRID, 2 * data.GRID]]
    assert int((inputs["input_ids"] == QWEN.build_config().image_token_id).sum()) == data.GRID**2


@pytest.mark.parametrize("index", range(10))
def test_gemma_soft_token_of_each_cell_is_its_raster_index(index):
    """Gemma 4 resizes the 224 x 224 image to 384 x 384 (16 x 16 patches of 24 px in the calibration model) and
    pools 2 x 2 patches per soft token, in raster order (``custom_gemma4.pooler_bins``, checked against the real
    pooler in the Gemma tests): every patch that shows part of an object is pooled into that object's
    ``row * GRID + col`` token, so ``target_tokens`` holds for Gemma 4 too."""
    import custom_gemma4

    sample = data.make_sample(index, data.EVAL_SEED)
    inputs = GEMMA4.build_processor().image_processor([sample["image"]], return_tensors="pt")
    assert inputs["num_soft_tokens_per_image"].tolist() == [data.GRID**2]
    bins, kept = custom_gemma4.pooler_bins(inputs["image_position_ids"], data.GRID**2)
    assert kept.all()
    pixels = inputs["pixel_values"][0]  # (patches, 24 * 24 * 3) in [0, 1]
    background = pixels[bins[0] >= 0].mode(dim=0).values  # patches of pure background are the commonest
    # Resizing blurs an object's edge by a pixel or two: its pixels are those clearly off the background.
    drawn = ((pixels - background).abs() > 0.1).any(dim=-1) & (bins[0] >= 0)
    object_tokens = {obj["row"] * data.GRID + obj["col"] for obj in sample["objects"]}
    assert set(bins[0][drawn].tolist()) == object_tokens


def test_mcq_prompt_through_the_gemma_template(tmp_path, monkeypatch):
    """VLMEvalKit's Gemma4 wrapper sends the data set's messages (image, then the prompt) to the chat template,
    which trims the text: the training prompt is exactly that."""
    from vlmeval.dataset import build_dataset
    from vlmeval.vlm import Gemma4

    data.write_dataset(tmp_path, n=2)
    monkeypatch.setenv("LMUData", str(tmp_path))
    dataset = build_dataset(data.NAME)
    wrapper = Gemma4.__new__(Gemma4)
    wrapper._load_image = lambda path: path
    for index in range(2):
        messages = dataset.build_prompt(dataset.data.iloc[index])
        conversation = wrapper.message2pipeline(messages)
        text = GEMMA4.build_processor().apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert text == training.chat_text(data.make_sample(index, data.EVAL_SEED), GEMMA4)
        assert text.endswith("options above.<turn|>\n<|turn>model\n")


def test_llava_prompt_is_what_run_llava_sends(tmp_path, monkeypatch):
    """``run_llava.LLaVA_HF`` re-prompts a multiple-choice data set as VLMEvalKit's LLaVA does (the question, one line
    per option, the instruction) after LLaVA-1.5's system prompt: the training prompt is exactly that, and the image
    becomes 64 visual tokens (the [CLS] dropped) and a 224 x 224 image stays 224 x 224 (CLIP crop, LLaVA's pad)."""
    import evalkit
    import run_llava
    from vlmeval.dataset import build_dataset

    data.write_dataset(tmp_path, n=2)
    monkeypatch.setenv("LMUData", str(tmp_path))
    dataset = build_dataset(data.NAME)
    wrapper = object.__new__(evalkit.vlmeval_model(run_llava.LLaVA_HF))
    wrapper.processor = LLAVA.build_processor()
    wrapper.system_prompt, wrapper.pad_to_square = run_llava.LLAVA_V1_SYSTEM_PROMPT, True
    wrapper.set_dump_image(dataset.dump_image)  # as VLMEvalKit's inference does
    assert wrapper.use_custom_prompt(data.NAME)
    for index in range(2):
        sample = data.make_sample(index, data.EVAL_SEED)
        message = wrapper.build_prompt(dataset.data.iloc[index], data.NAME)
        assert wrapper.prompt([{"role": "user", "content": message}]) == training.chat_text(sample, LLAVA)
        image = wrapper._image(message[0]["value"])
        assert image.size == (data.IMAGE_SIZE, data.IMAGE_SIZE)
        inputs = LLAVA.build_processor()(text=[training.chat_text(sample, LLAVA)], images=[image], return_tensors="pt")
        assert int((inputs["input_ids"] == LLAVA.build_config().image_token_id).sum()) == data.GRID**2
        assert inputs["pixel_values"].shape[-2:] == (data.IMAGE_SIZE, data.IMAGE_SIZE)


def test_internvl_prompt_is_what_run_internvl_sends(tmp_path, monkeypatch):
    """``run_internvl.InternVL_HF`` re-prompts a multiple-choice data set as VLMEvalKit's InternVLChat does (the image,
    then the question, one line per option, the instruction) in the template's default system turn: the training
    prompt is exactly that, and what the wrapper hands to ``generate`` (its own tiling, ``max_num`` 6 here) is the
    training processor's output: one 224 x 224 tile, no thumbnail, 64 visual tokens."""
    import evalkit
    import run_internvl
    from vlmeval.dataset import build_dataset

    data.write_dataset(tmp_path, n=2)
    monkeypatch.setenv("LMUData", str(tmp_path))
    dataset = build_dataset(data.NAME)
    processor = INTERNVL.build_processor()
    sent = []

    class Model:  # stands in for the checkpoint: records what the wrapper generates from
        device, dtype = torch.device("cpu"), torch.float32

        def generate(self, **inputs):
            sent.append(inputs)
            return inputs["input_ids"]

    wrapper = object.__new__(evalkit.vlmeval_model(run_internvl.InternVL_HF))
    wrapper.processor, wrapper.model = processor, Model()
    # What InternVL_HF.__init__ sets, defaults kept.
    wrapper._use_custom_prompt, wrapper.use_mpo_prompt, wrapper.use_cot = True, False, False
    wrapper.use_postprocess, wrapper.cot_prompt, wrapper.screen_parse, wrapper.fixed_max_num = False, None, True, None
    wrapper.kwargs = {"do_sample": False, "max_new_tokens": 4}
    wrapper.set_dump_image(dataset.dump_image)  # as VLMEvalKit's inference does
    assert wrapper.use_custom_prompt(data.NAME)
    for index in range(2):
        sample = data.make_sample(index, data.EVAL_SEED)
        message = wrapper.build_prompt(dataset.data.iloc[index], data.NAME)
        content, _ = wrapper.user_content(message, data.NAME)
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        assert text == training.chat_text(sample, INTERNVL)
        wrapper.generate_inner(message, data.NAME)
        assert wrapper.tiles_per_image(1) == 6
        expected = processor(text=[training.chat_text(sample, INTERNVL)], images=[sample["image"]], return_tensors="pt")
        assert torch.equal(sent[-1]["input_ids"], expected["input_ids"])
        assert sent[-1]["pixel_values"].shape == (1, 3, data.IMAGE_SIZE, data.IMAGE_SIZE)
        assert torch.equal(sent[-1]["pixel_values"], expected["pixel_values"])
        assert int((expected["input_ids"] == INTERNVL.build_config().image_token_id).sum()) == data.GRID**2


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES)
def test_words_are_single_tokens(family):
    words = list(data.COLOURS) + list(data.SHAPES)
    tokenizer = family.build_tokenizer()
    assert len(set(training.word_token_ids(tokenizer, words))) == len(words)  # the replies
    assert len(set(training.word_token_ids(tokenizer, words, prefix=" "))) == len(words)  # inside the prompt


@pytest.mark.parametrize("family", IMAGE_MODELS.values(), ids=IMAGE_MODELS)
def test_training_is_reproducible(family):
    def checksum(seed, readout=False):
        model = training.train(family, steps=3, seed=seed, batch_size=2, log_every=0, workers=0, readout=readout)
        return training.weights_checksum(model)

    first = checksum(1)
    assert checksum(1) == first
    assert checksum(2) != first
    with_readout = checksum(1, readout=True)  # the read-out loss changes the gradients, reproducibly
    assert with_readout != first and checksum(1, readout=True) == with_readout


def test_last_layer_summary_trains_that_layer_alone():
    """LLaVA's last CLIP layer feeds no loss but its [CLS] summary, which trains it and nothing else: every other
    weight is bit-identical to training without that loss, and without it the layer keeps its initialisation."""
    def trained(family):
        return training.train(family, steps=3, seed=1, batch_size=2, log_every=0, workers=0).state_dict()

    last_layer = "model.vision_tower.encoder.layers.3."
    assert LLAVA.build_config().vision_config.num_hidden_layers == 4
    with_summary = trained(LLAVA)
    without = trained(dataclasses.replace(LLAVA, last_layer_summary=None))
    initial = LLAVA.build_model(1).state_dict()
    changed = {name for name in with_summary if not torch.equal(with_summary[name], without[name])}
    assert changed and all(name.startswith(last_layer) for name in changed)
    assert len(changed) == len([name for name in initial if name.startswith(last_layer)])
    assert all(torch.equal(without[name], initial[name]) for name in changed)


def test_cls_row_loss_is_minus_log_the_rows_share_on_the_objects():
    """Hand-made rows over 64 patches with objects at patches 3 and 40: one image's row uniform (share 2/64), the
    other's heads on one object each (share 1, loss 0); a row on the [CLS] itself puts nothing on the objects."""
    patches = 64
    targets = torch.full((2, patches), -100)
    targets[:, [3, 40]] = 1
    attentions = torch.zeros(2, 2, 1 + patches, 1 + patches)
    attentions[0, :, 0, 1:] = 1 / patches
    attentions[1, 0, 0, 1 + 3] = attentions[1, 1, 0, 1 + 40] = 1.0
    loss = training.cls_row_loss(attentions, targets.flatten())
    assert torch.isclose(loss, torch.tensor(math.log(patches / 2) / 2))
    attentions[1] = 0
    attentions[1, :, 0, 0] = 1.0  # the [CLS] on itself
    assert training.cls_row_loss(attentions, targets.flatten()) > 10


# ---------------------------------------------------------------- ShapesDescribe (two-word answers)
@pytest.mark.parametrize("index", range(20))
def test_describe_sample_names_the_asked_object_and_a_same_colour_distractor(index):
    sample = data.make_describe_sample(index, data.EVAL_SEED)
    again = data.make_describe_sample(index, data.EVAL_SEED)
    assert _png_bytes(sample["image"]) == _png_bytes(again["image"]) and sample["answer_text"] == again["answer_text"]
    [target] = sample["target_tokens"]
    asked = next(o for o in sample["objects"] if o["row"] * data.GRID + o["col"] == target)
    assert sample["answer_text"] == f"{asked['colour']} {asked['shape']}" == sample[sample["answer"]]
    assert sample["question"] == f"What is the object in the {asked['quadrant']}?"
    options = [sample[letter] for letter in "ABCD"]
    assert len(set(options)) == 4
    # the colour alone does not answer: an option pairs it with another shape
    assert any(o.split()[0] == asked["colour"] and o != sample["answer_text"] for o in options)
    # an answer containing exactly one option's text is that option (VLMEvalKit's exact matching)
    assert [o for o in options if o in sample["answer_text"]] == [sample["answer_text"]]


def test_describe_tsv_and_training_routes(tmp_path):
    path = data.write_dataset(tmp_path, n=4, name=data.DESCRIBE_NAME)
    table = pd.read_csv(path, sep="\t")
    assert path.name == "ShapesDescribe.tsv" and list(table["category"]) == ["describe"] * 4
    assert table.loc[2, "question"] == data.make_describe_sample(2, data.EVAL_SEED)["question"]
    batch = training._TrainingBatches(QWEN, seed=1, steps=1, batch_size=2, describe=True)[0]
    tokenizer = QWEN.build_tokenizer()
    ids = batch["model_inputs"]["input_ids"]
    assert len(ids) == 2 * data.DESCRIBE_QUESTIONS_PER_IMAGE
    for row in range(len(ids)):
        layer, query, key = batch["routes"][row, -1].tolist()
        reply = [i for i, label in enumerate(batch["labels"][row].tolist()) if label != -100][-3:]  # colour shape end
        assert layer == 1 and query == reply[0] and ids[row, key] == QWEN.build_processor().image_token_id
        assert tokenizer.decode(ids[row, reply[0]:reply[0] + 2]) in {f"{c} {s}" for c in data.COLOURS for s in data.SHAPES}


def test_describe_training_is_reproducible():
    def checksum(seed):
        return training.weights_checksum(
            training.train(QWEN, steps=3, seed=seed, batch_size=2, log_every=0, workers=0, describe=True))

    first = checksum(1)
    assert checksum(1) == first and checksum(2) != first
    assert first != training.weights_checksum(training.train(QWEN, steps=3, seed=1, batch_size=2, log_every=0,
                                                             workers=0))
