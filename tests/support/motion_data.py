"""ShapesMotion, the local video multiple-choice set of the video runner tests: tiny generated clips (16 frames of
112 x 112 pixels at 8 fps) of a shape that moves, changes colour or stays, with four options per question.

The generator is the user tool ``scripts/make_video_data.py`` (``python scripts/make_video_data.py LMUDATA -n N``);
this module names what the tests use from it.
"""

from __future__ import annotations

from scripts.make_video_data import CATEGORIES, CLIP_FPS, FRAMES, NAME, SIZE, make_clip, write_dataset

__all__ = ["CATEGORIES", "CLIP_FPS", "FRAMES", "NAME", "SIZE", "make_clip", "write_dataset", "answers"]


def answers(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``(answer letter, category)`` of the first ``n`` questions."""
    return [(sample["answer"], sample["category"]) for sample in (make_clip(i, seed) for i in range(n))]
