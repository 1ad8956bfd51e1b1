"""ShapesMotion: a small local video multiple-choice set of generated clips (the layout of ``video_data.py``).

Each clip is ``FRAMES`` frames of ``SIZE`` x ``SIZE`` pixels at ``CLIP_FPS`` frames per second (2 s), an MPEG-4 file
written with OpenCV (installed with VLMEvalKit; decord, which VLMEvalKit and qwen-vl-utils read videos with, decodes
it). Three kinds of question, four options each, one correct, the options shuffled per question:

* ``direction``: one shape crosses the frame; "Which way does the red square move?" (left / right / up / down);
* ``order``: one shape in the first half of the clip, another colour in the second half; "Which colour appears
  first?" (the two colours and two others);
* ``colour``: one shape that stays put; "What colour is the shape?" (a control: one frame is enough).

Writes ``<lmudata>/<name>.tsv`` and ``<lmudata>/<name>/<video>.mp4``; everything is seeded (the same ``n`` and ``seed``
give the same questions and frames). Evaluate it with a sampling in the name:

    python scripts/make_video_data.py my_data -n 24
    LMUData=$PWD/my_data python run_qwenvl.py --model calibration/qwen2.5-vl-shapes --data ShapesMotion_8frame
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from calibration.data import COLOURS, SHAPES, draw_shape  # noqa: E402

NAME = "ShapesMotion"
FRAMES = 16
CLIP_FPS = 8
SIZE = 112  # 4 x 4 merged patches of 28 px for Qwen2-VL / Qwen2.5-VL at 112 x 112 pixels per frame
CATEGORIES = ("direction", "order", "colour")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def write_mp4(frames: list[np.ndarray], path: str | Path, fps: float = CLIP_FPS) -> Path:
    """RGB frames (H x W x 3, uint8, all the same size) as an MPEG-4 video."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # OpenCV wants BGR
    writer.release()
    return path


def _frame(background, shapes) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    for shape, centre, radius, colour in shapes:
        draw_shape(draw, shape, centre, radius, COLOURS[colour])
    return np.asarray(image)


def _options(rng: np.random.Generator, correct: str, first: list[str], pool) -> tuple[list[str], str]:
    """``correct``, the words of ``first`` (other words the clip shows), then random words of ``pool``: four,
    shuffled; and the correct letter."""
    distractors = [word for word in first if word != correct]
    distractors += [str(word) for word in rng.permutation([w for w in pool if w != correct and w not in distractors])]
    options = [correct] + distractors[:3]
    rng.shuffle(options)
    return options, "ABCD"[options.index(correct)]


def make_clip(index: int, seed: int = 0) -> dict:
    """One question: ``frames`` (FRAMES RGB arrays), ``question``, ``A``-``D``, ``answer`` (a letter), ``category``."""
    rng = np.random.default_rng([seed, index])
    category = CATEGORIES[index % len(CATEGORIES)]
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    shape = str(rng.choice(SHAPES))
    radius = SIZE * 0.14
    if category == "direction":
        direction = str(rng.choice(list(DIRECTIONS)))
        dx, dy = DIRECTIONS[direction]
        across = float(rng.uniform(0.3, 0.7)) * SIZE  # where on the other axis it crosses
        frames = []
        for t in range(FRAMES):
            along = (0.15 + 0.7 * t / (FRAMES - 1)) * SIZE  # 15% -> 85% of the frame
            x = along if dx > 0 else SIZE - along if dx < 0 else across
            y = along if dy > 0 else SIZE - along if dy < 0 else across
            frames.append(_frame(background, [(shape, (x, y), radius, colours[0])]))
        options, answer = _options(rng, direction, [], list(DIRECTIONS))
        question = f"Which way does the {colours[0]} {shape} move?"
    elif category == "order":
        centre = (SIZE / 2, SIZE / 2)
        frames = [_frame(background, [(shape, centre, radius * 1.4, colours[0 if t < FRAMES // 2 else 1])])
                  for t in range(FRAMES)]
        options, answer = _options(rng, colours[0], colours[1:2], list(COLOURS))
        question = "Which colour appears first?"
    else:
        centre = tuple(float(v) * SIZE for v in rng.uniform(0.3, 0.7, size=2))
        frames = [_frame(background, [(shape, centre, radius * 1.4, colours[0])])] * FRAMES
        options, answer = _options(rng, colours[0], [], list(COLOURS))
        question = "What colour is the shape?"
    return {"frames": frames, "question": question, **dict(zip("ABCD", options)), "answer": answer,
            "category": category}


def write_dataset(lmudata: str | Path, n: int = 24, seed: int = 0, name: str = NAME) -> Path:
    """``<lmudata>/<name>.tsv`` with ``n`` questions and their clips ``<lmudata>/<name>/clip<index>.mp4``; returns the
    TSV's path."""
    lmudata = Path(lmudata)
    rows = []
    for index in range(n):
        sample = make_clip(index, seed)
        video = f"clip{index:04d}"
        write_mp4(sample.pop("frames"), lmudata / name / f"{video}.mp4")
        rows.append({"index": index, "video": video, **sample})
    path = lmudata / f"{name}.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lmudata", help="folder to write <name>.tsv and <name>/ into (point $LMUData at it)")
    parser.add_argument("-n", type=int, default=24, help="number of questions (clips)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args()
    print(write_dataset(args.lmudata, args.n, args.seed, args.name))


if __name__ == "__main__":
    main()
