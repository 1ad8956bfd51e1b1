"""The video calibration task and model (``calibration/video.py``, ``calibration/qwen2.5-vl-motion``).

Each held-out question is about one object of an 8-frame clip, held by one known visual token of the 64
(``target_tokens``; its frames: ``target_frames``). The prompt and the frames the model is trained on are those
VLMEvalKit's LocalVideoMCQ and Qwen2VLChat produce (checked here); the shipped checkpoint is the recorded
training output; through the real VLMEvalKit pipeline (``--data ShapesMotionCalib_8frame``) it scores at least
95 % at keep 1.0; keeping the asked object's token (oracle) keeps the accuracy, dropping it (anti-oracle) brings
it to about chance, through the pre-LLM and the intra-LLM (layer 1) hooks; shuffling a clip's frames breaks the
frame, order and motion questions.
"""

from __future__ import annotations

import contextvars
import re

import numpy as np
import pytest
import torch

import custom_qwenvl
import methods
from calibration import train as training
from calibration import video
from scripts import summarize
from tests.conftest import run_runner
from tests.oracle import patched

CHANCE = 100.0 / 4
# The question types the shipped model has learned (>= 95 % held-out, TRAINING.md): all of them.
LEARNED = video.CATEGORIES
KEEP = 0.25
QUESTIONS = 36  # held-out questions evaluated in-process per configuration
ASKED_TOKENS: contextvars.ContextVar[list[int]] = contextvars.ContextVar("asked_video_tokens")


# ---------------------------------------------------------------- the task
@pytest.mark.parametrize("index", range(12))
def test_target_token_holds_the_asked_object_and_only_it(index):
    sample = video.make_sample(index, video.EVAL_SEED)
    again = video.make_sample(index, video.EVAL_SEED)
    assert all((a == b).all() for a, b in zip(sample["frames"], again["frames"]))
    frames = np.stack(sample["frames"]).astype(int)
    assert frames.shape == (video.FRAMES, video.SIZE, video.SIZE, 3)
    drawn = np.abs(frames - frames[:, :1, :1]).sum(-1) > 0  # the corner is background
    [token] = sample["target_tokens"]
    step, cell = divmod(token, video.TOKENS_PER_STEP)
    row, col = divmod(cell, video.GRID)
    assert sample["target_frames"] == [2 * step, 2 * step + 1]
    for frame in sample["target_frames"]:
        inside = drawn[frame, row * video.CELL:(row + 1) * video.CELL, col * video.CELL:(col + 1) * video.CELL]
        assert inside.sum() == drawn[frame].sum() > 20  # the object, whole, in that token's cell
    first, second = (np.argwhere(drawn[f]).mean(0) for f in sample["target_frames"])
    dy, dx = np.round(second - first).astype(int)
    asked = sample["objects"][step]
    assert (dx, dy) == tuple(video.SHIFT * v for v in video.DIRECTIONS[asked["direction"]])
    attribute = "direction" if sample["category"] == "motion" else "colour"
    assert asked[attribute] == sample["answer_text"] == sample[sample["answer"]]
    assert len({sample[letter] for letter in "ABCD"}) == 4


def test_prompt_and_frames_are_vlmevalkits(tmp_path, monkeypatch):
    """LocalVideoMCQ's prompt through Qwen2VLChat's message building and the chat template is the training
    text, and qwen-vl-utils' frames of the written clip are the training frames (``video.video_tensor``)."""
    from qwen_vl_utils import process_vision_info
    from vlmeval.vlm import Qwen2VLChat

    import video_data

    video.write_dataset(tmp_path, n=3)
    monkeypatch.setenv("LMUData", str(tmp_path))
    dataset = video_data.LocalVideoMCQ(video.NAME, nframe=video.FRAMES)
    wrapper = Qwen2VLChat.__new__(Qwen2VLChat)
    wrapper.__dict__.update(min_pixels=None, max_pixels=None, total_pixels=None, fps=None, nframe=video.FRAMES,
                            FRAME_FACTOR=2)
    processor = video.build_processor()
    for index in range(3):
        sample = video.make_sample(index, video.EVAL_SEED)
        messages = [{"role": "user", "content": wrapper._prepare_content(dataset.build_prompt(index),
                                                                         dataset=dataset.dataset_name)}]
        assert processor.apply_chat_template([messages], tokenize=False, add_generation_prompt=True) == \
            [video.chat_text(sample)]
        _, videos = process_vision_info([messages])
        assert torch.equal(videos[0], video.video_tensor(sample["frames"], tmp_path))
        inputs = processor(text=[video.chat_text(sample)], videos=videos, return_tensors="pt")
        assert inputs["video_grid_thw"].tolist() == [[video.STEPS, 2 * video.GRID, 2 * video.GRID]]
        temporal = float(inputs["second_per_grid_ts"][0]) * video.TOKENS_PER_SECOND
        assert [int(step * temporal) for step in range(video.STEPS)] == list(range(video.STEPS))


def test_training_is_reproducible():
    def checksum(seed):
        return training.weights_checksum(video.train(steps=2, seed=seed, batch_size=1, log_every=0, workers=0))

    first = checksum(1)
    assert checksum(1) == first
    assert checksum(2) != first


# ---------------------------------------------------------------- the shipped checkpoint
@pytest.fixture(scope="module")
def model_and_processor():
    from transformers import AutoProcessor

    model = video.FAMILY.model_class.from_pretrained(video.CHECKPOINT).eval()
    return model, AutoProcessor.from_pretrained(video.CHECKPOINT)


def test_shipped_checkpoint_is_the_recorded_training_output(model_and_processor):
    model, shipped = model_and_processor
    record = (video.CHECKPOINT / training.RECORD_FILE).read_text()
    assert re.search(r"weights checksum: `([0-9a-f]{64})`", record).group(1) == training.weights_checksum(model)
    from transformers import AutoConfig

    shipped_config = AutoConfig.from_pretrained(video.CHECKPOINT).to_dict()
    assert shipped_config["text_config"] == video.build_config().to_dict()["text_config"]
    assert model.config.vision_config.tokens_per_second == video.TOKENS_PER_SECOND
    assert shipped.tokenizer.get_vocab() == video.build_processor().tokenizer.get_vocab()


def _keep(ctx: methods.PruneContext, keep_asked: bool) -> torch.Tensor:
    asked = torch.tensor(ASKED_TOKENS.get(), dtype=torch.long)
    is_asked = torch.zeros(ctx.num_tokens, dtype=torch.bool)
    is_asked[asked] = True
    others = torch.nonzero(~is_asked).flatten()
    others = others[torch.randperm(others.numel(), generator=ctx.generator(0))]
    return (torch.cat([asked, others]) if keep_asked else others)[:ctx.keep]


ORACLES = {"video_oracle_pre_llm": dict(keep_asked=True), "video_anti_oracle_pre_llm": dict(keep_asked=False),
           "video_oracle_intra_llm": dict(keep_asked=True, default_layer=1),
           "video_anti_oracle_intra_llm": dict(keep_asked=False, default_layer=1)}


@pytest.fixture(scope="module")
def oracle_methods():
    for name, spec in ORACLES.items():
        # video=True: the oracle sees the clip's 64 tokens at once (an image method would see one step at a time).
        methods.register_prune(name, default_layer=spec.get("default_layer"), video=True)(
            lambda ctx, keep_asked=spec["keep_asked"]: _keep(ctx, keep_asked))
    yield
    for name in ORACLES:
        methods._base._REGISTRY.pop(name)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """(sample, intact clip tensor, frame-shuffled clip tensor) through qwen-vl-utils."""
    folder = tmp_path_factory.mktemp("clips")
    result = []
    for index in range(QUESTIONS):
        sample = video.make_sample(index, video.EVAL_SEED)
        order = np.random.default_rng([video.EVAL_SEED, index, 2]).permutation(video.FRAMES)
        shuffled = video.video_tensor([sample["frames"][i] for i in order], folder)
        result.append((sample, video.video_tensor(sample["frames"], folder), shuffled))
    return result


def accuracy(model, processor, held_out, shuffled=False) -> dict[str, float]:
    hits: dict[str, list[bool]] = {}
    for sample, clip, shuffled_clip in held_out:
        if sample["category"] not in LEARNED:
            continue
        inputs = processor(text=[video.chat_text(sample)], videos=[shuffled_clip if shuffled else clip],
                           return_tensors="pt")
        token = ASKED_TOKENS.set(sample["target_tokens"])
        try:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        finally:
            ASKED_TOKENS.reset(token)
        reply = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        correct = training.score(reply, sample)
        hits.setdefault(sample["category"], []).append(correct)
        hits.setdefault("all", []).append(correct)
    return {category: 100.0 * sum(v) / len(v) for category, v in hits.items()}


@pytest.mark.parametrize("stage", ["pre_llm", "intra_llm"])
def test_oracle_keeps_and_anti_oracle_loses_the_accuracy(model_and_processor, held_out, oracle_methods, stage):
    model, processor = model_and_processor
    # Down to 4 of 64 tokens (the asked one and 3 others), the model answers from the asked token alone.
    with patched(custom_qwenvl, PRUNE_METHOD=f"video_oracle_{stage}", KEEP_RATIO=0.05):
        assert min(accuracy(model, processor, held_out).values()) >= 90.0
    with patched(custom_qwenvl, PRUNE_METHOD=f"video_oracle_{stage}", KEEP_RATIO=KEEP):
        oracle = accuracy(model, processor, held_out)
    with patched(custom_qwenvl, PRUNE_METHOD=f"video_anti_oracle_{stage}", KEEP_RATIO=KEEP):
        anti = accuracy(model, processor, held_out)
    assert min(oracle.values()) >= 90.0, oracle
    assert anti["all"] <= CHANCE + 15.0, anti


def test_shuffled_frames_break_frame_order_and_motion_questions(model_and_processor, held_out):
    model, processor = model_and_processor
    intact = accuracy(model, processor, held_out)
    broken = accuracy(model, processor, held_out, shuffled=True)
    assert min(intact.values()) >= 90.0, intact
    for category in LEARNED:
        assert intact[category] - broken[category] >= 35.0, (category, intact, broken)


@pytest.mark.slow
def test_shipped_checkpoint_scores_at_least_95_percent_through_vlmevalkit(tmp_path, lmudata_env):
    video.write_dataset(lmudata_env, n=60)
    argv = ["--model", str(video.CHECKPOINT), "--data", f"{video.NAME}_{video.FRAMES}frame",
            "--work-dir", str(tmp_path), "--device", "cpu", "--model-kwargs", '{"max_new_tokens": 4}']
    assert run_runner(argv, {}) == 0
    table = summarize.collect(tmp_path)
    row = table.iloc[0]
    assert (row["method"], row["samples"]) == ("stock", 60)
    assert min(row[f"cat:{category}"] for category in LEARNED) >= 95.0, table.to_string()


def test_training_hides_tokens_as_pruning_removes_them(model_and_processor):
    """Token hiding in training (``video.lm_inputs``: a 4-D mask, positions kept) is the computation the pre-LLM hook
    does when it removes those tokens; the asked token is never hidden; half the sequences hide nothing."""
    hides = [video.hidden_visual_tokens(np.random.default_rng([7, i]), asked=i % 64) for i in range(200)]
    assert not any(h[i % 64] for i, h in enumerate(hides))
    assert 0.35 < np.mean([h.any() for h in hides]) < 0.65
    assert np.array_equal(video.hidden_visual_tokens(np.random.default_rng([7, 3]), 3), hides[3])

    model, _ = model_and_processor
    model.set_attn_implementation("eager")
    try:
        scene = video.make_training_scene(0, 5)
        batch = video.collate([scene], hide_rng=np.random.default_rng(11))
        row = next(r for r in range(len(scene)) if batch["hidden"][r].any())
        one = {key: (value[row:row + 1] if key in ("input_ids", "attention_mask", "mm_token_type_ids") else value)
               for key, value in batch["model_inputs"].items()}
        hidden = batch["hidden"][row:row + 1]
        with torch.no_grad():
            features = model.model.get_video_features(**batch["vision_inputs"], return_dict=True)
            masked = model(**video.lm_inputs(model, {"model_inputs": one, "hidden": hidden}),
                           mm_encoder_outputs={"video": features}).logits[0]
        visual = torch.nonzero(one["input_ids"][0] == model.config.video_token_id).flatten()
        keep = torch.nonzero(~hidden[0, visual]).flatten()

        def kept_tokens(ctx):
            return keep

        methods.register_prune("hidden_as_pruned_pre_llm", video=True, exact_count=False)(kept_tokens)
        try:
            with patched(custom_qwenvl, PRUNE_METHOD="hidden_as_pruned_pre_llm", KEEP_RATIO="0.5"), torch.no_grad():
                pruned = model(**{**one, **batch["vision_inputs"]}).logits[0]
        finally:
            methods._base._REGISTRY.pop("hidden_as_pruned_pre_llm")
        after = one["input_ids"].shape[1] - int(visual[-1]) - 1  # the text after the video, reply included
        torch.testing.assert_close(pruned[-after:], masked[-after:], rtol=1e-4, atol=1e-4)
    finally:
        model.set_attn_implementation("sdpa")
