"""ShapesCalib: the synthetic visual task of the calibration model, in VLMEvalKit's custom-MCQ TSV layout.

A 224 x 224 image is split into 2 x 2 quadrants; 2 to 4 of them hold one coloured shape each. Every object is
drawn strictly inside one 28 x 28 cell (a random cell of its quadrant), and a 28 x 28 cell is exactly one LLM
visual token of Qwen2-VL / Qwen2.5-VL (14 px patches, 2 x 2 merge), so the answer to a question lives in one
known visual token (``target_tokens``). Colours and shapes are distinct within an image. Three question types:

- ``colour``: "What colour is the <shape>?" (answer a colour word);
- ``shape``: "Which shape is <colour>?" (answer a shape word);
- ``position``: "What colour is the object in the <top left|...>?" (answer a colour word): only where the
  tokens are tells the objects apart, so scrambling token positions must break it.

The options are attribute words; the distractors are first the attributes of the other objects in the image
(so reading any object other than the asked one is wrong), then random ones. VLMEvalKit's exact matching maps
an answer containing exactly one option's text to its letter, so the model answers with the word.

Everything is seeded: ``make_sample(index, seed)`` depends on nothing else. The evaluation set uses
``EVAL_SEED``; training uses other seeds (``calibration/train.py`` refuses ``EVAL_SEED``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

NAME = "ShapesCalib"
CELL = 28  # pixels per LLM visual token side (patch 14 x merge 2)
GRID = 8  # LLM visual tokens per image side
IMAGE_SIZE = GRID * CELL  # 224: a multiple of 28, so neither processor resizes it
CATEGORIES = ("colour", "shape", "position")
# Palette and shapes (also drawn by the tests' small TinyShapes data set).
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (235, 200, 30),
           "purple": (140, 50, 170), "orange": (245, 130, 20)}
SHAPES = ("square", "circle", "triangle", "diamond")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")  # row-major over the 2 x 2 quadrants
EVAL_SEED = 20_240_917
DEFAULT_EVAL_SIZE = 300

_QUADRANT_CELLS = GRID // 2
_MIN_RADIUS, _MAX_RADIUS = 8, 11  # pixels; with the 2 px margin below an object never leaves its cell
_MARGIN = 2


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float, colour) -> None:
    """Fill ``shape`` inside the box of half-side ``radius`` around ``centre``."""
    x, y = centre
    if shape == "square":
        draw.rectangle([x - radius, y - radius, x + radius, y + radius], fill=colour)
    elif shape == "circle":
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)
    else:
        draw.polygon([(x, y - radius), (x + radius, y), (x, y + radius), (x - radius, y)], fill=colour)


def base64_png(image: Image.Image) -> str:
    """An image as VLMEvalKit's TSV ``image`` column holds it."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(rows: list[dict], lmudata: str | Path, name: str) -> Path:
    """``<lmudata>/<name>.tsv``, where VLMEvalKit looks for a custom data set of that name."""
    path = Path(lmudata) / f"{name}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def _options(rng: np.random.Generator, correct: str, others_in_image: list[str], pool) -> list[str]:
    """The correct word, the other objects' words, then random words of ``pool``: four, shuffled."""
    distractors = [word for word in others_in_image if word != correct]
    spare = [word for word in pool if word != correct and word not in distractors]
    distractors += [str(word) for word in rng.permutation(spare)]
    options = [correct] + distractors[:3]
    rng.shuffle(options)
    return options


def _draw_scene(rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
    n_objects = int(rng.integers(2, 5))
    quadrants = sorted(int(q) for q in rng.choice(len(QUADRANTS), size=n_objects, replace=False))
    colours = [str(c) for c in rng.choice(list(COLOURS), size=n_objects, replace=False)]
    shapes = [str(s) for s in rng.choice(SHAPES, size=n_objects, replace=False)]
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    objects = []
    for quadrant, colour, shape in zip(quadrants, colours, shapes):
        row = (quadrant // 2) * _QUADRANT_CELLS + int(rng.integers(_QUADRANT_CELLS))
        col = (quadrant % 2) * _QUADRANT_CELLS + int(rng.integers(_QUADRANT_CELLS))
        radius = int(rng.integers(_MIN_RADIUS, _MAX_RADIUS + 1))
        low, high = _MARGIN + radius, CELL - 1 - _MARGIN - radius  # centre offsets keeping the box in the cell
        x = col * CELL + int(rng.integers(low, high + 1))
        y = row * CELL + int(rng.integers(low, high + 1))
        draw_shape(draw, shape, (x, y), radius, COLOURS[colour])
        objects.append({"shape": shape, "colour": colour, "row": row, "col": col, "quadrant": QUADRANTS[quadrant]})
    return image, objects


def _ask(rng: np.random.Generator, image: Image.Image, objects: list[dict], category: str) -> dict:
    asked = int(rng.integers(len(objects)))
    target = objects[asked]
    others = [o for i, o in enumerate(objects) if i != asked]
    if category == "colour":
        question = f"What colour is the {target['shape']}?"
        answer_text, options = target["colour"], _options(rng, target["colour"], [o["colour"] for o in others], COLOURS)
    elif category == "shape":
        question = f"Which shape is {target['colour']}?"
        answer_text, options = target["shape"], _options(rng, target["shape"], [o["shape"] for o in others], SHAPES)
    else:
        question = f"What colour is the object in the {target['quadrant']}?"
        answer_text, options = target["colour"], _options(rng, target["colour"], [o["colour"] for o in others], COLOURS)
    return {
        "image": image,
        "question": question,
        **dict(zip("ABCD", options)),
        "answer": "ABCD"[options.index(answer_text)],
        "answer_text": answer_text,
        "category": category,
        "n_objects": len(objects),
        "target_tokens": [target["row"] * GRID + target["col"]],
        "objects": objects,
    }


def make_sample(index: int, seed: int) -> dict:
    """Question ``index`` of the stream ``seed`` (deterministic); see the module docstring for the keys."""
    rng = np.random.default_rng([seed, index])
    image, objects = _draw_scene(rng)
    return _ask(rng, image, objects, CATEGORIES[index % len(CATEGORIES)])


def make_training_scene(index: int, seed: int) -> list[dict]:
    """One image with one question of every category (samples sharing ``image``), for training.

    Drawn from a random stream of its own (a third key), distinct from every ``make_sample`` stream."""
    rng = np.random.default_rng([seed, index, 1])
    image, objects = _draw_scene(rng)
    return [_ask(rng, image, objects, category) for category in CATEGORIES]


# ---------------------------------------------------------------- ShapesDescribe: answers of two words

DESCRIBE_NAME = "ShapesDescribe"
DESCRIBE_QUESTIONS_PER_IMAGE = 2  # training: two of the image's objects (every image holds at least two)


def _ask_describe(rng: np.random.Generator, image: Image.Image, objects: list[dict], asked: int) -> dict:
    """"What is the object in the <quadrant>?", answered with two words, "<colour> <shape>". The options are that
    pair, the same colour with another shape (so the shape decides), the other objects' pairs, then random pairs."""
    target = objects[asked]
    answer_text = f"{target['colour']} {target['shape']}"
    same_colour = [f"{target['colour']} {shape}" for shape in rng.permutation(SHAPES) if shape != target["shape"]][:1]
    others = [f"{o['colour']} {o['shape']}" for i, o in enumerate(objects) if i != asked]
    pool = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    options = _options(rng, answer_text, same_colour + others, pool)
    return {
        "image": image,
        "question": f"What is the object in the {target['quadrant']}?",
        **dict(zip("ABCD", options)),
        "answer": "ABCD"[options.index(answer_text)],
        "answer_text": answer_text,
        "category": "describe",
        "n_objects": len(objects),
        "target_tokens": [target["row"] * GRID + target["col"]],
        "objects": objects,
    }


def make_describe_sample(index: int, seed: int) -> dict:
    """Question ``index`` of the ShapesDescribe stream ``seed`` (deterministic; its own streams, a fourth key)."""
    rng = np.random.default_rng([seed, index, 0, 2])
    image, objects = _draw_scene(rng)
    return _ask_describe(rng, image, objects, int(rng.integers(len(objects))))


def make_describe_training_scene(index: int, seed: int) -> list[dict]:
    """One image with ``DESCRIBE_QUESTIONS_PER_IMAGE`` questions about distinct objects, for training."""
    rng = np.random.default_rng([seed, index, 1, 2])
    image, objects = _draw_scene(rng)
    asked = rng.choice(len(objects), size=DESCRIBE_QUESTIONS_PER_IMAGE, replace=False)
    return [_ask_describe(rng, image, objects, int(i)) for i in asked]


def mcq_prompt(sample) -> str:
    """The text VLMEvalKit puts after the image for a row of this data set: a local TSV is a custom MCQ data
    set, which model wrappers do not re-prompt (Qwen2VLChat's own MCQ prompt is for registered data sets
    only), so the prompt is ``CustomMCQDataset.build_prompt``'s, trailing space and newline included."""
    options = "".join(f"{letter}. {sample[letter]}\n" for letter in "ABCD")
    return (f"Question: {sample['question']}\nOptions:\n{options}"
            "Please select the correct answer from the options above. \n")


def write_dataset(lmudata_dir: str | Path, n: int = DEFAULT_EVAL_SIZE, seed: int = EVAL_SEED,
                  name: str = NAME) -> Path:
    """Write ``<lmudata_dir>/<name>.tsv`` (ShapesCalib, or ShapesDescribe) with questions 0..n-1 of ``seed``;
    returns its path."""
    make = make_describe_sample if name == DESCRIBE_NAME else make_sample
    rows = []
    for index in range(n):
        sample = make(index, seed)
        rows.append({
            "index": index,
            "image": base64_png(sample["image"]),
            "question": sample["question"],
            **{letter: sample[letter] for letter in "ABCD"},
            "answer": sample["answer"],
            "category": sample["category"],
            "n_objects": sample["n_objects"],
            "target_tokens": json.dumps(sample["target_tokens"]),
        })
    return write_tsv(rows, lmudata_dir, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lmudata", help="folder to write ShapesCalib.tsv into (point $LMUData at it)")
    parser.add_argument("-n", type=int, default=DEFAULT_EVAL_SIZE, help="number of questions")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--name", choices=(NAME, DESCRIBE_NAME), default=NAME,
                        help=f"{NAME}: one-word answers; {DESCRIBE_NAME}: two-word answers (colour and shape)")
    args = parser.parse_args()
    print(write_dataset(args.lmudata, args.n, args.seed, args.name))


if __name__ == "__main__":
    main()
