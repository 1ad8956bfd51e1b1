"""ShapesMotionCalib: the video calibration task, its Qwen2.5-VL model and its training.

The shipped model answers every question type (100 % of 300 held-out questions at keep 1.0); see
docs/calibration.md ("The video calibration model").

    python -m calibration.train --task video       # -> calibration/qwen2.5-vl-motion
    python -m calibration.video "$LMUData"         # ShapesMotionCalib.tsv + clips (held-out, EVAL_SEED)
    LMUData=... python run_qwenvl.py --model calibration/qwen2.5-vl-motion --data ShapesMotionCalib_8frame

**Clips.** 8 frames of 112 x 112 pixels at 4 fps (an MPEG-4 file, like ``scripts/make_video_data.py``'s
ShapesMotion). Qwen2.5-VL encodes two consecutive frames as one temporal step, so a clip is 4 steps of 4 x 4 LLM
visual tokens (one per 28 x 28 cell): 64 visual tokens, token ``16 * step + 4 * row + col``. Frames ``2k`` and
``2k + 1`` make step ``k``; each step shows exactly one object (one coloured shape, strictly inside one cell),
which moves by ``SHIFT`` pixels left, right, up or down between the step's two frames (the only motion inside a
temporal patch: Qwen2.5-VL's 3D patch embedding sees both frames). The four objects have distinct colours and
distinct shapes (every shape appears once), and each one's own direction.

**Questions** (``category``), four options each, the distractors first the other objects' attributes:

- ``frame``: "What colour is the shape in frame <1-8>?" (the object of step (N - 1) // 2): only *when* a token
  is (its temporal M-RoPE position) tells the objects apart;
- ``order``: "Which colour appears first?" / "... last?" (the object of step 0 / 3; the clip's colours are the
  options);
- ``motion``: "Which way does the <colour> shape move?" (left / right / up / down): the object found by its
  colour, the answer in the motion between its two frames.

``target_tokens`` is the asked object's visual token (one of 64); ``target_frames`` the two clip frames that
show it. Frame shuffling breaks ``frame`` and ``order`` (the object of a step changes) and ``motion`` (the two
frames of a temporal step are no longer consecutive).

**Evaluation pipeline.** The clip goes through VLMEvalKit's LocalVideoMCQ (``video_data.py``) and Qwen2VLChat:
qwen-vl-utils samples ``nframes = 8`` frames (``linspace(0, 7, 8)``: every frame, so ``_8frame`` sees exactly the
clip), resizes them to its minimum video budget (336 x 336, bicubic), and the checkpoint's video processor
resizes them back to 112 x 112 (its ``longest_edge`` is 16 merged patches). No fps reaches the processor, which
assumes 24 fps: ``second_per_grid_ts`` = 2 / 24, so ``tokens_per_second = 13`` makes the temporal positions
of the 4 steps 0, 1, 2, 3 (with Qwen's 2 they would all be 0). Training decodes every clip through exactly that
path (``video_tensor``: the MPEG-4 file, ``qwen_vl_utils.process_vision_info``, the processor), and the prompt is
LocalVideoMCQ's (the image MCQ prompt) after ``<|vision_start|><|video_pad|><|vision_end|>``.

**Training** reuses the image recipe (``calibration/train.py``): reply loss, attention routes (head 0 of layer 1
at the word that names the asked object -- the frame number, "first"/"last", or the colour -- attends to its
visual token, head 0 of layer 2 at the question mark to that word, head 0 of layer 3 at the reply position to
the question mark; none at layer 0, none from the reply to a visual token), that word and the question mark
predicting the answer, each visual token scored against the embeddings of the colour, shape and direction words
(attribute losses), the prompt's attribute words predicted, and every attribute of the asked object read out of
the key word's state after layer 1 and the question mark's after layer 2 (so that both hops carry all of them),
and token hiding: half the sequences see only some of the visual tokens, the asked one always among them
(``hidden_visual_tokens``, ``lm_inputs``), so that the model answers from the asked token whatever else is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from calibration import data, processors  # noqa: E402
from calibration import train as image_train  # noqa: E402
from calibration.models import QWEN, ROOT, _qwen_config, word_token_ids  # noqa: E402

NAME = "ShapesMotionCalib"
FRAMES = 8
CLIP_FPS = 4
CELL = data.CELL
GRID = 4  # LLM visual tokens per frame side
SIZE = GRID * CELL  # 112
STEPS = FRAMES // 2  # temporal steps (temporal patch 2)
TOKENS_PER_STEP = GRID * GRID
CATEGORIES = ("frame", "order", "motion")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
ORDER_WORDS = {"first": 0, "last": STEPS - 1}
EVAL_SEED = 20_240_918
DEFAULT_EVAL_SIZE = 300
RADIUS = (6, 8)  # pixels, inclusive
SHIFT = 8  # pixels an object moves between the two frames of its step
HIDE_SHARE = 0.5  # training sequences that see only some of the visual tokens (hidden_visual_tokens)
_MARGIN = 1
TOKENS_PER_SECOND = 13  # see the module docstring: temporal positions 0, 1, 2, 3
DEFAULT_SEED = 1
DEFAULT_STEPS = 1000
CHECKPOINT = ROOT / "calibration" / "qwen2.5-vl-motion"


# ---------------------------------------------------------------- data


def _draw_clip(rng: np.random.Generator) -> tuple[list[np.ndarray], list[dict]]:
    colours = [str(c) for c in rng.choice(list(data.COLOURS), size=STEPS, replace=False)]
    shapes = [str(s) for s in rng.permutation(list(data.SHAPES))]
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    frames, objects = [], []
    for step in range(STEPS):
        direction = str(rng.choice(list(DIRECTIONS)))
        dx, dy = DIRECTIONS[direction]
        row, col = int(rng.integers(GRID)), int(rng.integers(GRID))
        radius = int(rng.integers(RADIUS[0], RADIUS[1] + 1))
        low, high = _MARGIN + radius, CELL - 1 - _MARGIN - radius  # centre offsets keeping the box in the cell
        # Start so that the end (start + SHIFT along the direction) is still inside the cell.
        x0 = int(rng.integers(low + max(0, -dx) * SHIFT, high - max(0, dx) * SHIFT + 1))
        y0 = int(rng.integers(low + max(0, -dy) * SHIFT, high - max(0, dy) * SHIFT + 1))
        for moved in (0, 1):
            image = Image.new("RGB", (SIZE, SIZE), background)
            centre = (col * CELL + x0 + moved * dx * SHIFT, row * CELL + y0 + moved * dy * SHIFT)
            data.draw_shape(ImageDraw.Draw(image), shapes[step], centre, radius, data.COLOURS[colours[step]])
            frames.append(np.asarray(image))
        objects.append({"step": step, "row": row, "col": col, "colour": colours[step], "shape": shapes[step],
                        "direction": direction})
    return frames, objects


def _ask(rng: np.random.Generator, frames, objects: list[dict], category: str) -> dict:
    if category == "frame":
        frame = int(rng.integers(FRAMES)) + 1
        target = objects[(frame - 1) // 2]
        question = f"What colour is the shape in frame {frame}?"
        attribute, pool = "colour", list(data.COLOURS)
    elif category == "order":
        word = str(rng.choice(list(ORDER_WORDS)))
        target = objects[ORDER_WORDS[word]]
        question = f"Which colour appears {word}?"
        attribute, pool = "colour", list(data.COLOURS)
    else:
        target = objects[int(rng.integers(STEPS))]
        question = f"Which way does the {target['colour']} shape move?"
        attribute, pool = "direction", list(DIRECTIONS)
    others = [o[attribute] for o in objects if o is not target] if attribute != "direction" else []
    options = data._options(rng, target[attribute], others, pool)
    return {
        "frames": frames,
        "question": question,
        **dict(zip("ABCD", options)),
        "answer": "ABCD"[options.index(target[attribute])],
        "answer_text": target[attribute],
        "category": category,
        "target_tokens": [target["step"] * TOKENS_PER_STEP + target["row"] * GRID + target["col"]],
        "target_frames": [2 * target["step"], 2 * target["step"] + 1],
        "objects": objects,
    }


def make_sample(index: int, seed: int) -> dict:
    """Question ``index`` of the stream ``seed`` (deterministic): ``frames`` (8 RGB arrays), the MCQ fields,
    ``answer_text``, ``category``, ``target_tokens``, ``target_frames``, ``objects``."""
    rng = np.random.default_rng([seed, index])
    frames, objects = _draw_clip(rng)
    return _ask(rng, frames, objects, CATEGORIES[index % len(CATEGORIES)])


def make_training_scene(index: int, seed: int) -> list[dict]:
    """One clip with one question of every category, for training (a stream of its own: a third key)."""
    rng = np.random.default_rng([seed, index, 1])
    frames, objects = _draw_clip(rng)
    return [_ask(rng, frames, objects, category) for category in CATEGORIES]


def write_mp4(frames, path) -> Path:
    from scripts.make_video_data import write_mp4 as write

    return write(list(frames), path, fps=CLIP_FPS)


def write_dataset(lmudata_dir: str | Path, n: int = DEFAULT_EVAL_SIZE, seed: int = EVAL_SEED,
                  name: str = NAME, shuffle_frames: bool = False) -> Path:
    """``<lmudata>/<name>.tsv`` and ``<lmudata>/<name>/clipNNNN.mp4`` with questions 0..n-1 of ``seed``.
    ``shuffle_frames`` writes every clip's frames in a seeded random order (the frame-shuffle control)."""
    lmudata_dir = Path(lmudata_dir)
    rows = []
    for index in range(n):
        sample = make_sample(index, seed)
        frames = sample["frames"]
        if shuffle_frames:
            order = np.random.default_rng([seed, index, 2]).permutation(FRAMES)
            frames = [frames[i] for i in order]
        video = f"clip{index:04d}"
        write_mp4(frames, lmudata_dir / name / f"{video}.mp4")
        rows.append({"index": index, "video": video, "question": sample["question"],
                     **{letter: sample[letter] for letter in "ABCD"}, "answer": sample["answer"],
                     "category": sample["category"], "target_tokens": json.dumps(sample["target_tokens"]),
                     "target_frames": json.dumps(sample["target_frames"])})
    path = lmudata_dir / f"{name}.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


# ---------------------------------------------------------------- model


def _corpus() -> list[str]:
    words = list(data.COLOURS) + list(data.SHAPES) + list(DIRECTIONS)
    lines = ["You are a helpful assistant.", "system", "user", "assistant",
             "Please select the correct answer from the options above.", "Question: Options:"]
    lines += [f"{letter}. {word}" for letter in "ABCD" for word in words]
    lines += words
    lines += [f"What colour is the shape in frame {n}?" for n in range(1, FRAMES + 1)]
    lines += [f"Which colour appears {word}?" for word in ORDER_WORDS]
    lines += [f"Which way does the {colour} shape move?" for colour in data.COLOURS]
    return lines * 4


@functools.lru_cache(maxsize=None)
def build_processor() -> Qwen2_5_VLProcessor:
    """Real Qwen2.5-VL processor whose video processor brings qwen-vl-utils' 336 x 336 frames to 112 x 112."""
    factor = 28
    common = dict(patch_size=14, temporal_patch_size=2, merge_size=2)
    image_size = {"shortest_edge": 4 * factor**2, "longest_edge": 64 * factor**2}
    video_size = {"shortest_edge": 4 * factor**2, "longest_edge": TOKENS_PER_STEP * factor**2}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(size=image_size, **common),
        tokenizer=processors.train_qwen_tokenizer(_corpus()),
        video_processor=Qwen2VLVideoProcessor(size=video_size, cap_pixels_per_frame=False, **common),
        chat_template=processors.QWEN2_VL_CHAT_TEMPLATE,
    )


def build_config():
    """The image model's config (``calibration/models.py``) with this tokenizer and ``TOKENS_PER_SECOND``."""
    from transformers import Qwen2_5_VLConfig

    tokenizer = build_processor().tokenizer
    base = _qwen_config()  # built with the image tokenizer; the ids below are replaced
    get = tokenizer.convert_tokens_to_ids
    text = base.text_config.to_dict()
    text.update(vocab_size=-(-len(tokenizer) // 8) * 8, bos_token_id=get("<|endoftext|>"),
                eos_token_id=get("<|im_end|>"), pad_token_id=get("<|endoftext|>"))
    vision = base.vision_config.to_dict()
    vision["tokens_per_second"] = TOKENS_PER_SECOND
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False,
        image_token_id=get("<|image_pad|>"), video_token_id=get("<|video_pad|>"),
        vision_start_token_id=get("<|vision_start|>"), vision_end_token_id=get("<|vision_end|>"),
    )


FAMILY = dataclasses.replace(
    QWEN, name="qwen2.5-vl-video", checkpoint=CHECKPOINT, default_seed=DEFAULT_SEED, default_steps=DEFAULT_STEPS,
    build_processor=build_processor, build_config=build_config,
    vision_input_keys=("pixel_values_videos", "video_grid_thw"))


# ---------------------------------------------------------------- the evaluation pipeline's inputs


def video_message(video_path: str, prompt: str) -> list[dict]:
    """The message Qwen2VLChat builds for a LocalVideoMCQ sample sampled with nframe = 8."""
    return [{"role": "user", "content": [{"type": "video", "video": "file://" + str(video_path), "nframes": FRAMES},
                                         {"type": "text", "text": prompt}]}]


def video_tensor(frames, workdir: str | Path):
    """The clip as Qwen2VLChat hands it to the processor: written as MPEG-4, read back and resized by
    qwen-vl-utils (``process_vision_info``)."""
    from qwen_vl_utils import process_vision_info

    path = Path(workdir) / f"clip{os.getpid()}.mp4"
    write_mp4(frames, path)
    _, videos = process_vision_info([video_message(str(path), "")])
    return videos[0]


def chat_text(sample) -> str:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": data.mcq_prompt(sample)}]}]
    return build_processor().apply_chat_template([messages], tokenize=False, add_generation_prompt=True)[0]


# ---------------------------------------------------------------- training


def _key_word(sample, input_ids, question_mark: int, tokenizer) -> int:
    """Position of the word that names the asked object: the frame number, first/last, or the colour."""
    if sample["category"] == "motion":
        [colour_id] = word_token_ids(tokenizer, [_asked(sample)["colour"]], prefix=" ")
        positions = (input_ids[:question_mark] == colour_id).nonzero().flatten()
        return int(positions[0])  # the question comes before the options
    return question_mark - 1


def _asked(sample) -> dict:
    step = sample["target_tokens"][0] // TOKENS_PER_STEP
    return sample["objects"][step]


class _Batches(torch.utils.data.Dataset):
    def __init__(self, seed: int, steps: int, batch_size: int):
        self.seed, self.steps, self.batch_size = seed, steps, batch_size

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict:
        scenes = [make_training_scene(step * self.batch_size + i, self.seed) for i in range(self.batch_size)]
        return collate(scenes, hide_rng=np.random.default_rng([self.seed, step, 3]))


def hidden_visual_tokens(rng: np.random.Generator, asked: int, tokens: int = STEPS * TOKENS_PER_STEP) -> np.ndarray:
    """Token dropping for training: [tokens] bool, True for the visual tokens one sequence must not see. Half the
    sequences see all of them; the others a random 1..tokens of them, the asked token always among them. So the
    model learns to answer from the asked token whatever else a pruning method leaves (without it, an order question
    failed as soon as any token was removed, the asked one kept)."""
    hidden = np.zeros(tokens, dtype=bool)
    if rng.random() < HIDE_SHARE:
        others = np.delete(np.arange(tokens), asked)
        kept = rng.integers(1, tokens + 1) - 1  # visible tokens besides the asked one
        hidden[rng.permutation(others)[kept:]] = True
    return hidden


def collate(scenes: list[list[dict]], workdir: str | None = None, hide_rng: np.random.Generator | None = None) -> dict:
    processor = build_processor()
    tokenizer = processor.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        videos = [video_tensor(scene[0]["frames"], workdir or tmp) for scene in scenes]
    samples = [s for scene in scenes for s in scene]
    sample_videos = [v for v, scene in zip(videos, scenes) for _ in scene]
    prompts = [chat_text(s) for s in samples]
    replies = [s["answer_text"] + "<|im_end|>" for s in samples]
    inputs = processor(text=[p + r for p, r in zip(prompts, replies)], videos=sample_videos, padding=True,
                       padding_side="right", return_tensors="pt")
    labels, prompt_labels = image_train.reply_and_prompt_labels(
        inputs, replies, tokenizer, list(data.COLOURS) + list(data.SHAPES) + list(DIRECTIONS))
    routes = torch.zeros(len(samples), 3, 3, dtype=torch.long)
    pools = {"colour": list(data.COLOURS), "shape": list(data.SHAPES), "direction": list(DIRECTIONS)}
    # Every attribute of the asked object, to be read at the key word after the route's layer (see _losses).
    key_targets = {name: torch.tensor([pool.index(_asked(s)[name]) for s in samples]) for name, pool in pools.items()}
    video_token = inputs["input_ids"] == processor.video_token_id
    [question_mark_id] = tokenizer.encode("?", add_special_tokens=False)
    for row, sample in enumerate(samples):
        ids = inputs["input_ids"][row]
        first_visual = int(video_token[row].nonzero()[0])
        question_mark = first_visual + int((ids[first_visual:] == question_mark_id).nonzero()[0])
        reply_start = int((labels[row] != -100).nonzero()[0])
        key = _key_word(sample, ids, question_mark, tokenizer)
        target = first_visual + sample["target_tokens"][0]
        routes[row] = torch.tensor([(1, key, target), (2, question_mark, key), (3, reply_start - 1, question_mark)])
        # The word and the question mark predict the answer too (labels are shifted: position i + 1 holds
        # what position i predicts).
        labels[row, key + 1] = labels[row, question_mark + 1] = labels[row, reply_start]
    # Visual tokens hidden from every query of a sequence (the same computation as pruning them, positions kept).
    hidden = torch.zeros_like(labels, dtype=torch.bool)
    if hide_rng is not None:
        for row, sample in enumerate(samples):
            first_visual = int(video_token[row].nonzero()[0])
            drop = torch.from_numpy(hidden_visual_tokens(hide_rng, sample["target_tokens"][0]))
            hidden[row, first_visual:first_visual + drop.numel()] = drop
    video_inputs = processor.video_processor(videos=videos, return_tensors="pt")
    tokens = STEPS * TOKENS_PER_STEP
    targets = {name: torch.full((len(scenes), tokens), -100) for name in pools}
    for i, scene in enumerate(scenes):
        for obj in scene[0]["objects"]:
            token = obj["step"] * TOKENS_PER_STEP + obj["row"] * GRID + obj["col"]
            for name, pool in pools.items():
                targets[name][i, token] = pool.index(obj[name])
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw", "second_per_grid_ts")
    return {
        "model_inputs": {key: inputs[key] for key in keys if key in inputs},
        "vision_inputs": {key: video_inputs[key] for key in ("pixel_values_videos", "video_grid_thw")},
        "labels": labels,
        "prompt_labels": prompt_labels,
        "questions_per_scene": len(scenes[0]),
        "routes": routes,
        "hidden": hidden,
        **{f"{name}_targets": value.flatten() for name, value in targets.items()},
        **{f"key_{name}_targets": value for name, value in key_targets.items()},
    }


def lm_inputs(model, batch) -> dict:
    """The batch's language-model inputs; where visual tokens are hidden (``batch["hidden"]``), a 4-D additive mask
    that hides them from every query (eager attention) and the M-RoPE positions the 2-D mask gives."""
    inputs = dict(batch["model_inputs"])
    if not batch["hidden"].any():
        return inputs
    pad = inputs["attention_mask"].bool()
    inputs["position_ids"], _ = model.model.get_rope_index(
        inputs["input_ids"], video_grid_thw=inputs["video_grid_thw"], attention_mask=inputs["attention_mask"],
        second_per_grid_ts=inputs.get("second_per_grid_ts"), mm_token_type_ids=inputs["mm_token_type_ids"])
    length = pad.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None] & (pad & ~batch["hidden"])[:, None, :]
    inputs["attention_mask"] = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)[:, None]
    return inputs


def _losses(model, batch):
    outputs = model.model.get_video_features(**batch["vision_inputs"], return_dict=True)
    visual_tokens = torch.cat(outputs.pooler_output)
    outputs.pooler_output = tuple(f for f in outputs.pooler_output for _ in range(batch["questions_per_scene"]))
    output = model(**lm_inputs(model, batch), labels=batch["labels"], mm_encoder_outputs={"video": outputs},
                   output_attentions=True, output_hidden_states=True)
    tokenizer = build_processor().tokenizer
    embeddings = model.get_input_embeddings().weight
    routes = batch["routes"]
    rows = torch.arange(len(routes))
    # Where each route lands, after the layer that takes it (hidden_states[0] is the embedding output): the key word
    # after layer 1 (read from the asked token), the question mark after layer 2 (read from the key word).
    hop_states = [output.hidden_states[int(routes[0, hop, 0]) + 1][rows, routes[:, hop, 1]] for hop in (0, 1)]
    visual_loss = 0.0
    for words, name in ((list(data.COLOURS), "colour"), (list(data.SHAPES), "shape"), (list(DIRECTIONS), "direction")):
        word_embeddings = embeddings[word_token_ids(tokenizer, words, prefix=" ")]
        visual_loss = visual_loss + torch.nn.functional.cross_entropy(visual_tokens @ word_embeddings.T,
                                                                      batch[f"{name}_targets"], ignore_index=-100)
        # Every attribute travels with the copy, not only the one most questions ask (which is what a reply loss
        # alone taught: colour only).
        for states in hop_states:
            visual_loss = visual_loss + torch.nn.functional.cross_entropy(states @ word_embeddings.T,
                                                                          batch[f"key_{name}_targets"])
    prompt_loss = torch.nn.functional.cross_entropy(output.logits[:, :-1].flatten(0, 1),
                                                    batch["prompt_labels"][:, 1:].flatten(), ignore_index=-100)
    head = torch.stack([layer[:, image_train.ROUTE_HEAD] for layer in output.attentions])
    route_rows = rows.unsqueeze(1).expand(routes.shape[:2])
    followed = head[routes[..., 0], route_rows, routes[..., 1], routes[..., 2]]
    route_loss = -followed.clamp_min(1e-9).log().mean()
    return output.loss, (image_train.AUX_LOSS_WEIGHT * visual_loss
                         + image_train.PROMPT_WORDS_LOSS_WEIGHT * prompt_loss
                         + image_train.ROUTE_LOSS_WEIGHT * route_loss)


def train(steps: int, seed: int, batch_size: int = image_train.DEFAULT_BATCH_SIZE, log_every: int = 50,
          workers: int = 1, log=print):
    """Train from scratch; deterministic for (steps, seed, batch_size) on one thread (``train.optimise``)."""
    if seed == EVAL_SEED:
        raise ValueError("the evaluation seed must not be used for training")
    model = FAMILY.build_model(seed)
    return image_train.optimise(model, _Batches(seed, steps, batch_size), steps, lambda batch: _losses(model, batch),
                                workers, log_every, log)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model, samples, batch_size: int = 16) -> list[str]:
    """Greedy replies to the evaluation prompts (clips through the evaluation pipeline), left-padded batches."""
    processor = build_processor()
    replies = []
    with tempfile.TemporaryDirectory() as tmp:
        for first in range(0, len(samples), batch_size):
            chunk = samples[first:first + batch_size]
            videos = [video_tensor(s["frames"], tmp) for s in chunk]
            inputs = processor(text=[chat_text(s) for s in chunk], videos=videos, padding=True, padding_side="left",
                               return_tensors="pt")
            output = model.generate(**inputs, do_sample=False, max_new_tokens=image_train.MAX_NEW_TOKENS)
            replies += processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:],
                                                        skip_special_tokens=True)
    return replies


def evaluate(model, samples) -> dict:
    replies = predict(model, samples)
    right = [image_train.score(reply, sample) for reply, sample in zip(replies, samples)]
    result = {"overall": sum(right) / len(right), "n": len(right)}
    for category in CATEGORIES:
        picked = [r for r, s in zip(right, samples) if s["category"] == category]
        if picked:
            result[category] = sum(picked) / len(picked)
    return result


def write_training_record(folder, *, steps, seed, batch_size, seconds, checksum, accuracy) -> Path:
    import transformers

    from scripts.calibration_report import machine

    per_category = ", ".join(f"{key} {value:.1%}" for key, value in accuracy.items() if key not in ("overall", "n"))
    text = "\n".join([
        f"# Calibration model ({FAMILY.name}, {NAME}): how it was trained",
        "",
        "Reproduce (bit for bit on the same machine and software; training runs on one thread):",
        "",
        "```bash",
        f"python -m calibration.train --task video --steps {steps} --seed {seed} --batch-size {batch_size} "
        f"--out {Path(folder).as_posix()}",
        "```",
        "",
        f"- steps {steps}, seed {seed}, batch {batch_size} clips (3 questions each), 1 training thread + 1 data worker",
        f"- training wall time: {seconds / 60:.1f} min",
        f"- machine: {machine()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- weights checksum: `{checksum}`",
        f"- held-out accuracy ({accuracy['n']} questions of seed {EVAL_SEED}, in-process through qwen-vl-utils and "
        f"the processor, keep 1.0): {accuracy['overall']:.1%} ({per_category})",
        "",
    ])
    path = Path(folder) / image_train.RECORD_FILE
    path.write_text(text)
    return path


def main(args) -> None:
    seed = DEFAULT_SEED if args.seed is None else args.seed
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    out = Path(args.out or CHECKPOINT.relative_to(ROOT))
    start = time.perf_counter()
    model = train(steps, seed, args.batch_size)
    seconds = time.perf_counter() - start
    image_train.save(model, out, FAMILY)
    samples = [make_sample(i, EVAL_SEED) for i in range(args.eval_questions)]
    accuracy = evaluate(model, samples)
    print("held-out accuracy: " + "  ".join(
        f"{key} {value:.1%}" for key, value in accuracy.items() if key != "n") + f"  ({accuracy['n']} questions)")
    print(f"training wall time {seconds:.0f} s")
    checksum = image_train.weights_checksum(model)
    print(f"weights checksum {checksum}")
    write_training_record(out, steps=steps, seed=seed, batch_size=args.batch_size, seconds=seconds,
                          checksum=checksum, accuracy=accuracy)
    print(f"saved to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lmudata", help=f"folder to write {NAME}.tsv and {NAME}/ into")
    parser.add_argument("-n", type=int, default=DEFAULT_EVAL_SIZE)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--shuffle-frames", action="store_true")
    parsed = parser.parse_args()
    print(write_dataset(parsed.lmudata, parsed.n, parsed.seed, shuffle_frames=parsed.shuffle_frames))
