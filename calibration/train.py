"""Train a calibration model: a tiny VLM trained to solve ShapesCalib (``calibration/data.py``).

    python -m calibration.train                    # Qwen2.5-VL -> calibration/qwen2.5-vl-shapes
    python -m calibration.train --family gemma4    # Gemma 4    -> calibration/gemma4-shapes
    python -m calibration.train --family llava-1.5 # LLaVA-1.5  -> calibration/llava-1.5-shapes
    python -m calibration.train --family internvl3 # InternVL3  -> calibration/internvl3-shapes
    python -m calibration.train --family qwen2.5-vl-graded  # six layers -> calibration/qwen2.5-vl-graded
    python -m calibration.train --task video       # video task -> calibration/qwen2.5-vl-motion (calibration/video.py)

A random tiny checkpoint shows that pruning hooks are exact, not whether a method keeps the *right* visual
tokens. These models have the real architectures (``Qwen2_5_VLForConditionalGeneration``,
``Gemma4ForConditionalGeneration``; ~1.2-1.3 M parameters, see ``calibration/models.py``) and are trained
from scratch on a CPU, so accuracy against keep ratio is a real measurement offline. One recipe trains both.

Training uses exactly the evaluation format of VLMEvalKit's model wrapper (Qwen2VLChat, Gemma4): the data set's
MCQ prompt (``calibration_data.mcq_prompt``) after the image, the family's chat template (Qwen2-VL's with its
default system prompt) and the assistant prefix; the target reply is the attribute word (e.g. ``red``) then the
end-of-turn token (``<|im_end|>``, ``<turn|>``), the tokens of the reply loss. Every image is asked one question
of each category, as three separate single-question sequences that share one vision-encoder pass
(``mm_encoder_outputs``), so all training sequences have the layout of the evaluation prompts.

The reply loss alone stayed near chance (25-45 % after up to 1,500 steps of 8 images): the language model has
to find the asked object's token among 64 by its content and carry its attribute ~40 tokens to the reply, and
that two-step circuit did not emerge in the budget, although every visual token's attributes were linearly
readable (measured on Qwen2.5-VL). Training-only losses, which add no parameter (the checkpoint stays a plain
model of its family), build it:

- attention routes (``_routes``): head 0 of layer 1 at the question's last word ("square", "red", "left")
  attends to the asked object's visual token, head 0 of layer 2 at the question mark to that word, head 0 of
  layer 3 at the reply position to the question mark (for position questions, head 0 of layer 0 at "left"
  also attends to "top"); the loss is ``-log`` of each routed attention weight (eager attention during
  training, for the weights); the question's last word and the question mark also predict the reply word;
- visual tokens: each visual token (the LLM input embedding the vision tower returns) is scored against the
  model's own input embeddings of the colour and shape words (as spelt inside the prompt, " red"), with the
  attributes of the object drawn in that token as targets;
- prompt words: the colour and shape words of the question and the options are predicted (they name objects
  of the image);
- a CLIP tower's [CLS] (LLaVA-1.5, ``CalibrationFamily.image_summary``): its state at the feature layer, through the
  projector and scored against the word embeddings, names the colours and shapes present in the image (multi-label),
  as a trained CLIP's [CLS] summarises its image; and the [CLS] attention row the [CLS] methods read there (heads
  averaged; ``cls_row_layer``) goes to the objects (``cls_row_loss``), as a trained CLIP's goes to what its image
  shows, so those methods read a [CLS] that finds the objects.
  The same loss on the [CLS] after the tower's last layer (``last_layer_summary``; the LLM reads the penultimate
  one, PruMerge the last) trains that layer alone: through the whole model it cost the feature layer's summary
  and the shape questions, and without it the layer stayed at its initialisation, its [CLS] row uniform;
- the read-out loss (``--readout-loss``; on by default where the family says so, ``readout_loss``: Gemma 4): the
  asked object's colour and shape decoded from the state of each route's query position after the read and carry
  hops, so that each hop carries every attribute rather than the one most questions ask.

The routes never send the reply position to a visual token, so methods that rank visual tokens by the last
token's attention (FastV reads layer 2) are not handed the answer; and no route reads a visual token at
layer 0, so that an intra-LLM stage at layer 1 still decides what the model sees (the tests check both ways).

Image size: 224 x 224 (8 x 8 = 64 LLM visual tokens in both families), so that keep ratios such as 0.111 (7 of
64 tokens) are meaningful. Measured with Qwen2.5-VL on one thread (AMD EPYC): a step of 32 images (96 sequences)
took 2.3 s, 1.3 s of it in the language model, whose sequences are ~130 tokens of which only 64 are visual; 168 x
168 (36 tokens) would therefore save well under half of the time. 224 is kept with batches of 8 images (~0.5 s a
step); what held training back was the language model's retrieval of the asked object, not the image size.
Gemma 4's step takes about twice as long (~1 s with another training on the second core): its vision tower (4
layers) sees 256 patches of 24 px per image, and it trains with the read-out loss (``CalibrationFamily.readout_loss``).

Reproducibility: data come from ``(seed, index)`` streams (one DataLoader worker builds the batch of each step
from the step number alone) and training runs on one thread (``torch.set_num_threads(1)``); the same seed, steps
and batch size then give bit-identical weights (``weights_checksum``) on the same machine and software.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from calibration import data  # noqa: E402
from calibration.models import IMAGE_MODELS, QWEN, QWEN_DESCRIBE, ROOT, CalibrationFamily, word_token_ids  # noqa: E402

DEFAULT_BATCH_SIZE = 8  # images per step; each gives one sequence per category
LEARNING_RATE = 2e-3
WARMUP_STEPS = 100
AUX_LOSS_WEIGHT = 1.0
PROMPT_WORDS_LOSS_WEIGHT = 0.5
ROUTE_LOSS_WEIGHT = 1.0
ROUTE_HEAD = 0  # the head of each layer that the attention routes supervise (see CalibrationFamily.position_route_head)
MAX_ROUTES = 4  # ShapesDescribe: 5 (see _routes)
MAX_NEW_TOKENS = 4


# ---------------------------------------------------------------- data


def chat_text(sample, family: CalibrationFamily) -> str:
    """The prompt VLMEvalKit's model wrapper generates from: the family's messages for the sample (the image, then
    the data set's or the wrapper's own prompt), the chat template applied, ending with the assistant prefix."""
    return family.build_processor().apply_chat_template([family.conversation(sample)], tokenize=False,
                                                        add_generation_prompt=True)[0]


class _TrainingBatches(torch.utils.data.Dataset):
    """Item ``step`` is the whole batch of that step, a function of (seed, step) only."""

    def __init__(self, family: CalibrationFamily, seed: int, steps: int, batch_size: int, describe: bool = False):
        self.family, self.seed, self.steps, self.batch_size, self.describe = family, seed, steps, batch_size, describe

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict:
        make = data.make_describe_training_scene if self.describe else data.make_training_scene
        scenes = [make(step * self.batch_size + i, self.seed) for i in range(self.batch_size)]
        return collate(scenes, self.family)


def _routes(sample, question_mark: int, reply: int, target: int,
            layers: tuple[int, int, int, int]) -> list[tuple[int, int, int]]:
    """The attention links ``(layer, query position, key position)`` that head ``ROUTE_HEAD`` of ``layer`` is
    trained to follow for one question: find the asked object, then carry its attribute to the reply.

    Every question ends with the word that names the asked object ("... the square?", "... red?", "... top
    left?"). With the default ``layers`` (``CalibrationFamily.route_layers``: gather, read, carry, reply) at layer 1
    that word attends to the object's visual token (a quadrant's second word has gathered the first one at layer 0),
    at layer 2 the question mark attends to that word, and at layer 3 the reply position attends to the question
    mark, which is equally far from it in every category (every option word is one token). Visual tokens are read
    from layer 1 on, so an intra-LLM stage at layer 1 still decides what the model sees; the reply position is never
    routed to a visual token."""
    gather, read, carry, to_reply = layers
    key_word = question_mark - 1
    routes = [(read, key_word, target), (carry, question_mark, key_word), (to_reply, reply, question_mark)]
    if sample["category"] in ("position", "describe"):
        routes.insert(0, (gather, key_word, key_word - 1))  # "left" gathers "top"
    if sample["category"] == "describe":
        # The reply's first word (the colour, an input of the first decode step) finds the object's visual token by
        # its content at the read layer and reads its shape there: the second word needs the image through the KV
        # cache.
        routes.append((read, reply + 1, target))
    return routes


def reply_and_prompt_labels(inputs, replies: list[str], tokenizer, words: list[str]):
    """(labels, prompt_labels) of right-padded sequences that end with ``replies``: the reply tokens, -100 elsewhere;
    and the prompt's tokens of ``words`` (the attribute words of the question and the options name objects of the
    image too: predicting them is an extra training signal for reading the visual tokens; their order is random,
    the set is not)."""
    labels = torch.full_like(inputs["input_ids"], -100)
    lengths = inputs["attention_mask"].sum(1)
    for row, reply in enumerate(replies):
        reply_ids = tokenizer.encode(reply, add_special_tokens=False)
        end = int(lengths[row])
        assert inputs["input_ids"][row, end - len(reply_ids):end].tolist() == reply_ids
        labels[row, end - len(reply_ids):end] = torch.tensor(reply_ids)
    attribute_ids = torch.tensor(word_token_ids(tokenizer, words, prefix=" "))
    prompt_labels = torch.where(torch.isin(inputs["input_ids"], attribute_ids) & (labels == -100),
                                inputs["input_ids"], -100)
    return labels, prompt_labels


def collate(scenes: list[list[dict]], family: CalibrationFamily) -> dict:
    """Processor inputs of all questions (right-padded), labels, attention routes, per-token attributes.

    ``model_inputs`` are the language model's inputs of every question (without pixels); ``vision_inputs`` hold
    each scene's image once, its questions follow each other."""
    processor = family.build_processor()
    tokenizer = processor.tokenizer
    samples = [sample for scene in scenes for sample in scene]
    prompts = [chat_text(sample, family) for sample in samples]
    replies = [sample["answer_text"] + family.end_of_reply for sample in samples]
    inputs = processor(text=[p + r for p, r in zip(prompts, replies)], images=[[s["image"]] for s in samples],
                       padding=True, padding_side="right", return_tensors="pt")
    labels, prompt_labels = reply_and_prompt_labels(inputs, replies, tokenizer, list(data.COLOURS) + list(data.SHAPES))
    # Attention routes (see ``_routes``), padded to MAX_ROUTES per sequence; the question's last word and its
    # question mark predict the reply word too, so what a route carries is read out on the way.
    max_routes = MAX_ROUTES + (samples[0]["category"] == "describe")
    routes = torch.zeros(len(samples), max_routes, 3, dtype=torch.long)
    route_heads = torch.full((len(samples), max_routes), ROUTE_HEAD)
    route_mask = torch.zeros(len(samples), max_routes, dtype=torch.bool)
    image_start = inputs["input_ids"] == processor.image_token_id
    [question_mark_id] = tokenizer.encode("?", add_special_tokens=False)
    for row, sample in enumerate(samples):
        first_visual = int(image_start[row].nonzero()[0])
        question_mark = first_visual + int((inputs["input_ids"][row, first_visual:] == question_mark_id).nonzero()[0])
        reply_start = int((labels[row] != -100).nonzero()[0])
        sample_routes = _routes(sample, question_mark, reply_start - 1, first_visual + sample["target_tokens"][0],
                                family.route_layers)
        routes[row, :len(sample_routes)] = torch.tensor(sample_routes)
        if sample["category"] == "position":  # the positional hop on its own head where the family says so
            read = family.route_layers[1]
            route_heads[row, [r for r, route in enumerate(sample_routes) if route[0] == read]] = \
                family.position_route_head
        route_mask[row, :len(sample_routes)] = True
        labels[row, question_mark] = labels[row, question_mark + 1] = labels[row, reply_start]
    # The asked object's colour and shape, for the optional read-out loss (see _losses).
    asked = [next(o for o in sample["objects"] if o["row"] * data.GRID + o["col"] == sample["target_tokens"][0])
             for sample in samples]
    asked_colour = torch.tensor([list(data.COLOURS).index(o["colour"]) for o in asked])
    asked_shape = torch.tensor([data.SHAPES.index(o["shape"]) for o in asked])
    images = processor.image_processor([scene[0]["image"] for scene in scenes], return_tensors="pt")
    language_keys = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")  # grid: Qwen's M-RoPE
    # Attribute of the object in each visual token (row-major), -100 where there is only background.
    tokens = data.GRID**2
    colour_targets = torch.full((len(scenes), tokens), -100)
    shape_targets = torch.full((len(scenes), tokens), -100)
    for i, scene in enumerate(scenes):
        for obj in scene[0]["objects"]:
            token = obj["row"] * data.GRID + obj["col"]
            colour_targets[i, token] = list(data.COLOURS).index(obj["colour"])
            shape_targets[i, token] = data.SHAPES.index(obj["shape"])
    return {
        "model_inputs": {key: inputs[key] for key in language_keys if key in inputs},
        "vision_inputs": {key: images[key] for key in family.vision_input_keys},
        "labels": labels,
        "prompt_labels": prompt_labels,
        "questions_per_scene": len(scenes[0]),
        "routes": routes,
        "route_mask": route_mask,
        "route_heads": route_heads,
        "colour_targets": colour_targets.flatten(),
        "shape_targets": shape_targets.flatten(),
        "asked_colour": asked_colour,
        "asked_shape": asked_shape,
    }


# ---------------------------------------------------------------- training


def cls_row_loss(attentions: torch.Tensor, object_targets: torch.Tensor) -> torch.Tensor:
    """``-log`` of the share of each image's [CLS] attention row (heads averaged) on its object patches, averaged
    over the images. ``attentions``: one tower layer's weights (images, heads, 1 + patches, 1 + patches), the
    [CLS] first; ``object_targets``: (images * patches,), -100 where a patch shows only background. The [CLS]
    methods read that row: it goes to the objects, as a trained CLIP's goes to what its image shows (the summary
    loss alone left 15-26 % of it on the background once the language model's heads were widened)."""
    row = attentions[:, :, 0, 1:].mean(1)  # (images, patches)
    objects = (object_targets.view(len(row), -1) != -100).float()
    return -(row * objects).sum(1).clamp_min(1e-9).log().mean()


def _losses(model, batch, family: CalibrationFamily, readout: bool = False) -> tuple:
    """Language-model loss (reply, question word, question mark); weighted sum of the visual-token, prompt-word
    and attention-route losses (a family's [CLS] row loss weighted as a route), and with ``readout`` the read-out
    loss: the asked object's colour and shape decoded (against the word embeddings) from the state of each route's
    query position after its layer 1 and 2 hops, so that each hop carries every attribute rather than the one most
    questions ask; then, for a family with a ``last_layer_summary``, that summary's (loss, parameters). Needs eager
    attention (the route loss reads attention weights)."""
    image_outputs = family.image_features(model, batch["vision_inputs"])
    # Each image's (64, hidden) visual tokens: a sequence of them (Qwen2.5-VL, Gemma 4, LLaVA) or one stacked tensor
    # (InternVL, whose forward takes only that).
    per_scene = image_outputs.pooler_output
    visual_tokens = torch.cat(tuple(per_scene))  # (scenes * 64, hidden), scene by scene
    # Every question of a scene reuses that scene's features: one vision pass per image.
    repeated = tuple(features for features in per_scene for _ in range(batch["questions_per_scene"]))
    image_outputs.pooler_output = torch.stack(repeated) if torch.is_tensor(per_scene) else repeated
    output = model(**batch["model_inputs"], labels=batch["labels"], mm_encoder_outputs={"image": image_outputs},
                   output_attentions=True, output_hidden_states=readout)
    tokenizer = family.build_tokenizer()
    embeddings = model.get_input_embeddings().weight

    def word_scores(states, words):
        # Against the words as the question and the options spell them (" red"): what a reply is matched with.
        return states @ embeddings[word_token_ids(tokenizer, words, prefix=" ")].T

    per_token_attributes = ((list(data.COLOURS), batch["colour_targets"]), (data.SHAPES, batch["shape_targets"]))
    visual_token_loss = 0.0
    for words, targets in per_token_attributes:
        visual_token_loss = visual_token_loss + torch.nn.functional.cross_entropy(
            word_scores(visual_tokens, words), targets, ignore_index=-100)

    def summary_loss(summary):  # (scenes, hidden) -> multi-label loss on the colours and shapes present
        loss = 0.0
        for words, targets in per_token_attributes:
            per_token = targets.view(len(summary), -1)
            present = torch.stack([(per_token == index).any(1) for index in range(len(words))], 1).float()
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(word_scores(summary, words), present)
        return loss

    if family.image_summary is not None:
        # CLIP's [CLS] summarises its image: scored against the words, it names the colours and shapes present (a
        # multi-label loss), so its attention goes to the objects as a trained CLIP's does.
        visual_token_loss = visual_token_loss + summary_loss(family.image_summary(model, image_outputs))
    cls_row = 0.0
    if family.cls_row_layer is not None:
        cls_row = cls_row_loss(image_outputs.attentions[family.cls_row_layer], batch["colour_targets"])
    isolated = []  # (loss, the only parameters it trains): see ``optimise``
    if family.last_layer_summary is not None:
        summary, parameters = family.last_layer_summary(model, image_outputs)
        isolated.append((AUX_LOSS_WEIGHT * summary_loss(summary), parameters))
    prompt_loss = torch.nn.functional.cross_entropy(output.logits[:, :-1].flatten(0, 1),
                                                    batch["prompt_labels"][:, 1:].flatten(), ignore_index=-100)
    routes, mask = batch["routes"], batch["route_mask"]
    if readout:
        for hop in family.route_layers[1:3]:  # the read and carry hops; hidden_states[hop + 1]: after that layer
            at_hop = (routes[..., 0] == hop) & mask
            row, slot = at_hop.nonzero(as_tuple=True)
            states = output.hidden_states[hop + 1][row, routes[row, slot, 1]]
            for words, targets in ((list(data.COLOURS), batch["asked_colour"]), (data.SHAPES, batch["asked_shape"])):
                visual_token_loss = visual_token_loss + torch.nn.functional.cross_entropy(
                    word_scores(states, words), targets[row])
    attentions = torch.stack(output.attentions)  # (layers, sequences, heads, query, key)
    rows = torch.arange(len(routes)).unsqueeze(1).expand_as(mask)
    followed = attentions[routes[..., 0], rows, batch["route_heads"], routes[..., 1], routes[..., 2]]
    route_loss = -(followed.clamp_min(1e-9).log() * mask).sum() / mask.sum()
    return (output.loss, AUX_LOSS_WEIGHT * visual_token_loss + PROMPT_WORDS_LOSS_WEIGHT * prompt_loss
            + ROUTE_LOSS_WEIGHT * (route_loss + cls_row), *isolated)


def _learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return LEARNING_RATE * 0.5 * (1.0 + math.cos(math.pi * progress))


def _set_worker_threads(_worker_id: int) -> None:
    torch.set_num_threads(1)


@torch.enable_grad()  # importing vlmeval switches gradients off process-wide
def train(family: CalibrationFamily, steps: int, seed: int, batch_size: int = DEFAULT_BATCH_SIZE,
          log_every: int = 50, workers: int = 1, log=print, readout: bool = False, describe: bool = False):
    """Train from scratch; deterministic for (family, steps, seed, batch_size, readout, describe) on one thread.
    Returns the model in eval mode. ``readout``: add the read-out loss (see ``_losses``); ``describe``: train on
    ShapesDescribe (two-word answers) instead of ShapesCalib."""
    if seed == data.EVAL_SEED:
        raise ValueError("the evaluation seed must not be used for training")
    model = family.build_model(seed)
    return optimise(model, _TrainingBatches(family, seed, steps, batch_size, describe), steps,
                    lambda batch: _losses(model, batch, family, readout), workers, log_every, log)


@torch.enable_grad()
def optimise(model, batches: torch.utils.data.Dataset, steps: int, losses, workers: int = 1, log_every: int = 50,
             log=print):
    """The training loop of every calibration task: ``batches[step]`` is the whole batch of a step, ``losses(batch)``
    its (reply loss, side losses, then any (loss, parameters) pairs: a loss that trains only those parameters,
    which the first two must not reach, with a gradient clip of its own, so the rest trains as without it). AdamW,
    warm-up and cosine decay, gradient clipping, eager attention (the route losses read attention weights), one
    thread (bit-reproducibility needs a fixed thread count; one is as fast as two here). Returns the
    model in eval mode, with sdpa attention."""
    torch.set_num_threads(1)
    model.train()
    model.set_attn_implementation("eager")
    optimiser = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    # One worker builds the next batches on the other core while this process trains.
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers,
                                         worker_init_fn=_set_worker_threads, prefetch_factor=4 if workers else None)
    start = time.perf_counter()
    running = []
    for step, batch in enumerate(loader):
        for group in optimiser.param_groups:
            group["lr"] = _learning_rate(step, steps)
        lm_loss, side_loss, *isolated = losses(batch)
        optimiser.zero_grad()
        (lm_loss + side_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for loss, parameters in isolated:  # parameters the losses above do not reach: their gradients and clipping
            for parameter, gradient in zip(parameters, torch.autograd.grad(loss, parameters)):
                if parameter.grad is not None:
                    raise RuntimeError("an isolated loss's parameter also has a gradient from the main losses")
                parameter.grad = gradient
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        running.append((lm_loss.item(), side_loss.item()))
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            lm, side = (sum(values) / len(running) for values in zip(*running))
            elapsed = time.perf_counter() - start
            log(f"step {step + 1}/{steps}  reply loss {lm:.4f}  side losses {side:.4f}  "
                f"{elapsed / (step + 1):.2f} s/step  {elapsed:.0f} s", flush=True)
            running = []
    model.set_attn_implementation("sdpa")
    return model.eval()


def weights_checksum(model) -> str:
    """sha256 over the state dict's names, shapes and float32 bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def save(model, folder: str | Path, family: CalibrationFamily) -> Path:
    """A normal checkpoint folder: config, float32 safetensors, generation config, tokenizer and processor."""
    folder = Path(folder)
    model.to(torch.float32).save_pretrained(folder)
    family.build_processor().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- evaluation


def score(reply: str, sample) -> bool:
    """VLMEvalKit-style exact matching: right when the reply contains exactly one option's text, the answer's."""
    matched = [letter for letter in "ABCD" if sample[letter].lower() in reply.lower()]
    return matched == [sample["answer"]]


@torch.no_grad()
def predict(model, samples, family: CalibrationFamily, batch_size: int = 32) -> list[str]:
    """Greedy replies (special tokens skipped) to the evaluation prompts, left-padded batches."""
    processor = family.build_processor()
    replies = []
    for first in range(0, len(samples), batch_size):
        chunk = samples[first:first + batch_size]
        inputs = processor(text=[chat_text(s, family) for s in chunk], images=[[s["image"]] for s in chunk],
                           padding=True, padding_side="left", return_tensors="pt")
        output = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        replies += processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:],
                                                    skip_special_tokens=True)
    return replies


def evaluate(model, samples, family: CalibrationFamily) -> dict:
    """Accuracy overall and per category (fractions), with the question counts."""
    replies = predict(model, samples, family)
    right = [score(reply, sample) for reply, sample in zip(replies, samples)]
    result = {"overall": sum(right) / len(right), "n": len(right)}
    for category in dict.fromkeys(s["category"] for s in samples):
        picked = [r for r, s in zip(right, samples) if s["category"] == category]
        if picked:
            result[category] = sum(picked) / len(picked)
    return result


RECORD_FILE = "TRAINING.md"


def write_training_record(folder: str | Path, family: CalibrationFamily, *, steps: int, seed: int, batch_size: int,
                          seconds: float, checksum: str, accuracy: dict, readout: bool = False,
                          describe: bool = False) -> Path:
    """``TRAINING.md`` in the checkpoint folder: how to reproduce it, on what, how long, and what it scores."""
    import transformers

    from scripts.calibration_report import machine

    per_category = ", ".join(f"{key} {value:.1%}" for key, value in accuracy.items() if key not in ("overall", "n"))
    text = "\n".join([
        f"# Calibration model ({family.name}): how it was trained",
        "",
        "Reproduce (bit for bit on the same machine and software; training runs on one thread):",
        "",
        "```bash",
        "python -m calibration.train " + ("--task describe" if describe else f"--family {family.name}")
        + f" --steps {steps} --seed {seed} --batch-size {batch_size}{' --readout-loss' if readout else ''} "
        f"--out {Path(folder).as_posix()}",
        "```",
        "",
        f"- steps {steps}, seed {seed}, batch {batch_size} images "
        f"({data.DESCRIBE_QUESTIONS_PER_IMAGE if describe else len(data.CATEGORIES)} questions each), "
        "1 training thread + 1 data worker"
        + (", read-out loss" if readout else ""),
        f"- training wall time: {seconds / 60:.1f} min",
        f"- machine: {machine()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- weights checksum: `{checksum}`",
        f"- held-out accuracy ({accuracy['n']} {data.DESCRIBE_NAME if describe else data.NAME} questions of seed "
        f"{data.EVAL_SEED}): {accuracy['overall']:.1%} "
        f"({per_category})",
        "",
    ])
    path = Path(folder) / RECORD_FILE
    path.write_text(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("image", "describe", "video"), default="image",
                        help="image: ShapesCalib (--family); describe: ShapesDescribe (two-word answers, Qwen2.5-VL: "
                             "calibration/qwen2.5-vl-describe); video: ShapesMotionCalib, Qwen2.5-VL "
                             "(calibration/video.py)")
    parser.add_argument("--family", choices=sorted(IMAGE_MODELS), default=QWEN.name,
                        help="model family (or variant) to train")
    parser.add_argument("--out", default=None, help="checkpoint folder to write (default: the shipped one's)")
    parser.add_argument("--steps", type=int, default=None, help="default: those of the shipped checkpoint")
    parser.add_argument("--seed", type=int, default=None, help="default: the seed of the shipped checkpoint")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--readout-loss", action="store_true",
                        help="image task: also decode the asked object's colour and shape from the route hops' states "
                             "after layers 1 and 2 (on by default for Gemma 4; the video task always does)")
    parser.add_argument("--eval-questions", type=int, default=data.DEFAULT_EVAL_SIZE,
                        help="held-out questions of EVAL_SEED to score at the end")
    args = parser.parse_args()
    if args.task == "video":
        from calibration import video

        video.main(args)
        return
    describe = args.task == "describe"
    family = QWEN_DESCRIBE if describe else IMAGE_MODELS[args.family]
    seed = family.default_seed if args.seed is None else args.seed
    steps = family.default_steps if args.steps is None else args.steps
    out = Path(args.out or family.checkpoint.relative_to(ROOT))  # relative: TRAINING.md records the command
    start = time.perf_counter()
    readout = args.readout_loss or family.readout_loss
    model = train(family, steps, seed, args.batch_size, readout=readout, describe=describe)
    train_seconds = time.perf_counter() - start
    save(model, out, family)
    make = data.make_describe_sample if describe else data.make_sample
    samples = [make(i, data.EVAL_SEED) for i in range(args.eval_questions)]
    accuracy = evaluate(model, samples, family)
    print("held-out accuracy: " + "  ".join(
        f"{key} {value:.1%}" for key, value in accuracy.items() if key != "n") + f"  ({accuracy['n']} questions)")
    print(f"training wall time {train_seconds:.0f} s")
    checksum = weights_checksum(model)
    print(f"weights checksum {checksum}")
    write_training_record(out, family, steps=steps, seed=seed, batch_size=args.batch_size,
                          seconds=train_seconds, checksum=checksum, accuracy=accuracy, readout=readout,
                          describe=describe)
    print(f"saved to {out} (with {RECORD_FILE})")


if __name__ == "__main__":
    main()
