"""The frame-level video baselines (uniform_frames_pre_llm, random_frames_pre_llm) on hand-made videos, and through
the Qwen hooks on an image and a video in one prompt."""

import pytest
import torch

import custom_qwenvl
import methods
from methods import PRE_LLM, PruneContext, VideoFrames
from methods.frames import evenly_spaced
from tests.oracle import forward_logits, patched
from tests.support.tiny_models import build_model
from tests.test_qwenvl import inputs_for
from utils import keep_count

REGISTRY = methods.load_methods()

pytestmark = pytest.mark.usefixtures("one_thread")


def video_context(frames, per_frame, ratio, seed=0):
    n = frames * per_frame
    video = VideoFrames(torch.arange(frames).repeat_interleave(per_frame), frames, (1, per_frame))
    return PruneContext(features=torch.randn(n, 4), keep=keep_count(n, ratio), grid=(frames, 1, per_frame),
                        modality="video", stage=PRE_LLM, params={"PRUNE_RANDOM_SEED": seed}, span_key=0, video=video,
                        ratio=ratio)


def frames_of(ctx, kept):
    return sorted(set(ctx.video.frame[kept].tolist()))


@pytest.mark.parametrize("frames, ratio, expected", [(8, 0.25, [0, 4]), (8, 0.5, [0, 2, 4, 6]), (6, 0.5, [0, 2, 4]),
                                                     (5, 0.4, [0, 2]), (4, 1.0, [0, 1, 2, 3]), (3, 0.05, [0])])
def test_uniform_frames_keeps_every_kth_frame_whole(frames, ratio, expected):
    ctx = video_context(frames, 3, ratio)
    kept = REGISTRY["uniform_frames_pre_llm"].fn(ctx)
    assert frames_of(ctx, kept) == expected
    assert kept.numel() == 3 * len(expected)  # whole frames
    assert torch.equal(evenly_spaced(frames, len(expected)), torch.tensor(expected))


def test_random_frames_keeps_whole_frames_reproducibly_and_depends_on_the_seed():
    picks = []
    for seed in range(6):
        ctx = video_context(10, 4, 0.3, seed)
        kept = REGISTRY["random_frames_pre_llm"].fn(ctx)
        chosen = frames_of(ctx, kept)
        assert len(chosen) == 3 and kept.numel() == 12
        assert torch.equal(kept, REGISTRY["random_frames_pre_llm"].fn(video_context(10, 4, 0.3, seed)))
        picks.append(tuple(chosen))
    assert len(set(picks)) > 1


@pytest.mark.parametrize("name", ["uniform_frames_pre_llm", "random_frames_pre_llm"])
def test_an_image_is_one_frame_and_stays_whole(name):
    ctx = video_context(1, 6, 0.1)
    assert REGISTRY[name].fn(ctx).tolist() == list(range(6))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_through_the_qwen_hooks_only_whole_frames_go(family):
    model, inputs = build_model(family), inputs_for(family, "image_video")
    with patched(custom_qwenvl, PRUNE_METHOD="uniform_frames_pre_llm", KEEP_RATIO="0.5"):
        forward_logits(model, inputs)
        record = custom_qwenvl.last_record(model)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    per_frame = (h // 2) * (w // 2)
    spans = record.spans[0]
    assert spans[0].modality == "image" and spans[0].counts["pre_llm"] == spans[0].counts["input"]
    kept = sum(s.counts["pre_llm"] for s in spans if s.modality == "video")
    assert kept == keep_count(t, 0.5) * per_frame
