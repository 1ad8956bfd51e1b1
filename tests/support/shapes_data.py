"""A small multiple-choice data set of generated images, in VLMEvalKit's custom-MCQ TSV layout.

Each question is about simple shapes drawn on a plain background, in four categories: ``colour`` (of the
shape), ``shape``, ``position`` (left / right / top / bottom) and ``count`` (1-4 shapes). Four options, one
correct; the order of the options is shuffled per question. Everything is seeded: the same ``n`` and ``seed``
always give the same TSV.

VLMEvalKit loads ``$LMUData/<NAME>.tsv`` as ``CustomMCQDataset`` when NAME is not an official data set name
(columns ``index, image, question, A..D, answer, category``; ``image`` is base64).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from calibration.data import COLOURS, SHAPES, base64_png, draw_shape, write_tsv  # noqa: E402

NAME = "TinyShapes"
SIZE = (168, 112)  # width, height: 6 x 4 merged patches of 28 px for Qwen2-VL / Qwen2.5-VL
CATEGORIES = ("colour", "shape", "position", "count")
POSITIONS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78)}


def _options(rng: np.random.Generator, correct: str, pool) -> tuple[list[str], str]:
    wrong = [o for o in pool if o != correct]
    options = [correct] + [str(o) for o in rng.choice(wrong, size=3, replace=False)]
    rng.shuffle(options)
    return options, "ABCD"[options.index(correct)]


def make_question(index: int, seed: int = 0) -> dict:
    """One question: ``image`` (PIL), ``question``, ``A``-``D``, ``answer`` (a letter) and ``category``."""
    rng = np.random.default_rng([seed, index])
    category = CATEGORIES[index % len(CATEGORIES)]
    width, height = SIZE
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    image = Image.new("RGB", SIZE, background)
    draw = ImageDraw.Draw(image)
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    radius = float(rng.uniform(0.12, 0.18)) * height
    if category == "count":
        count = int(rng.integers(1, 5))
        slots = rng.permutation(list(POSITIONS))[:count]
        for slot in slots:
            fx, fy = POSITIONS[slot]
            draw_shape(draw, shape, (fx * width, fy * height), radius * 0.8, COLOURS[colour])
        options, answer = _options(rng, str(count), ["1", "2", "3", "4"])
        question = "How many shapes are in the image?"
    else:
        position = str(rng.choice(list(POSITIONS)))
        fx, fy = POSITIONS[position]
        draw_shape(draw, shape, (fx * width, fy * height), radius, COLOURS[colour])
        correct, pool, question = {
            "colour": (colour, list(COLOURS), "What colour is the shape?"),
            "shape": (shape, list(SHAPES), "Which shape is in the image?"),
            "position": (position, list(POSITIONS), "Where in the image is the shape?"),
        }[category]
        options, answer = _options(rng, correct, pool)
    return {"image": image, "question": question, **dict(zip("ABCD", options)), "answer": answer,
            "category": category}


def write_dataset(lmudata: str | Path, n: int = 32, seed: int = 0, name: str = NAME) -> Path:
    """Write ``<lmudata>/<name>.tsv`` with ``n`` questions; returns its path."""
    rows = []
    for index in range(n):
        question = make_question(index, seed)
        rows.append({"index": index, **question, "image": base64_png(question["image"])})
    return write_tsv(rows, lmudata, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lmudata", help="folder to write <name>.tsv into (point $LMUData at it)")
    parser.add_argument("-n", type=int, default=32, help="number of questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args()
    print(write_dataset(args.lmudata, args.n, args.seed, args.name))


if __name__ == "__main__":
    main()
