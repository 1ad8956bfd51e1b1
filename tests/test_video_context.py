"""The video context: a method registered with ``video=True`` sees one whole video per call (every frame, also
where the model lays frames out as separate spans), an image as a one-frame video; other methods see spans as before.

* what a video method is shown (frames, their tokens, the per-frame grid, separate spans) on Qwen2.5-VL (a video is
  one span of temporal patches) and Qwen3-VL (one span per frame, timestamps between), pre-LLM and intra-LLM;
* the counts recorded per span (per frame on Qwen3-VL) follow what the method kept;
* keep 1.0 is bit-identical, and a pruned video equals the unpatched language model on the hand-shortened sequence
  with the original positions (an image and a video in one prompt, both Qwen families);
* registration refuses a video ViT method.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import custom_qwenvl
import methods
from methods import PruneContext
from tests.oracle import capture_lm_inputs, forward_logits, greedy, patched
from tests.support.tiny_models import build_model
from tests.test_qwenvl import inputs_for, reference_pre_llm

pytestmark = pytest.mark.usefixtures("one_thread")

SEEN: list[PruneContext] = []


@contextlib.contextmanager
def registered(name, fn, **kwargs):
    methods.register_prune(name, **kwargs)(fn)
    try:
        yield
    finally:
        methods._base._REGISTRY.pop(name)


def first_frame(ctx: PruneContext) -> torch.Tensor:
    """Keep every token of frame 0 (and record what was shown)."""
    SEEN.append(ctx)
    return torch.nonzero(ctx.video.frame == 0).flatten()


def every_other_frame(ctx: PruneContext) -> torch.Tensor:
    SEEN.append(ctx)
    return torch.nonzero(ctx.video.frame % 2 == 0).flatten()


@pytest.fixture(scope="module", autouse=True)
def video_methods():
    with registered("firstframe_pre_llm", first_frame, video=True, exact_count=False), \
            registered("otherframes_intra_llm", every_other_frame, video=True, exact_count=False, default_layer=2), \
            registered("firstframe_intra_llm", first_frame, video=True, exact_count=False, default_layer=1):
        yield


def shown(family, env):
    SEEN.clear()
    model, inputs = build_model(family), inputs_for(family, "image_video")
    with patched(custom_qwenvl, **env):
        forward_logits(model, inputs)
        record = custom_qwenvl.last_record(model)
    return list(SEEN), record, inputs


@pytest.mark.parametrize("family, separate", [("qwen2_5_vl", False), ("qwen3_vl", True)])
def test_a_video_method_sees_the_whole_video_and_an_image_as_one_frame(family, separate):
    seen, record, inputs = shown(family, dict(PRUNE_METHOD="firstframe_pre_llm", KEEP_RATIO="0.5"))
    t, h, w = inputs["video_grid_thw"][0].tolist()
    frames, size = t, (h // 2, w // 2)
    assert [ctx.modality for ctx in seen] == ["image", "video"]  # one call per image, one per video
    image, video = seen
    assert image.video.count == 1 and not image.video.separate_spans
    assert video.video.count == frames and video.video.size == size and video.video.separate_spans == separate
    assert video.num_tokens == frames * size[0] * size[1] and video.grid == (frames, *size)
    assert torch.equal(video.video.frame, torch.arange(frames).repeat_interleave(size[0] * size[1]))
    assert torch.equal(video.video.frame_tokens(video.features)[1], video.features[size[0] * size[1]:2 * size[0] * size[1]])
    if separate:  # Qwen3-VL writes its timestamps into the text: no times as numbers
        assert video.video.times is None
    else:  # Qwen2.5-VL: temporal patch t at t * second_per_grid_ts seconds (2 frames at 2 fps: 1 s)
        seconds = float(inputs["second_per_grid_ts"][0])
        assert seconds == 1.0 and torch.equal(video.video.times, torch.arange(frames) * seconds)
    assert image.video.times is None
    video_spans = [s for s in record.spans[0] if s.modality == "video"]
    per_frame = size[0] * size[1]
    if separate:  # Qwen3-VL: one span per frame, each recorded on its own
        assert [s.counts["pre_llm"] for s in video_spans] == [per_frame] + [0] * (frames - 1)
    else:
        assert [s.counts["pre_llm"] for s in video_spans] == [per_frame]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_an_intra_llm_video_method_sees_the_whole_video(family):
    seen, record, inputs = shown(family, dict(INTRA_LLM_LAYER_SPECS="2:otherframes_intra_llm:0.5"))
    t = inputs["video_grid_thw"][0, 0].item()
    video = [ctx for ctx in seen if ctx.modality == "video"]
    assert len(video) == 1 and video[0].video.count == t and video[0].layer == 2
    kept = sum(s.counts["layer_2"] for s in record.spans[0] if s.modality == "video")
    assert kept == ((t + 1) // 2) * video[0].num_tokens // t


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("scope", ["frame", "video"])
def test_an_image_method_sees_a_video_frame_by_frame_or_whole(family, scope):
    """IMAGE_METHODS_ON_VIDEO: "frame" (default) shows every frame alone with its own keep count, whichever way the
    model lays frames out (Qwen2.5-VL: temporal steps of one span; Qwen3-VL: a span per frame); "video" the whole
    video in one call. The kept tokens are those the calls chose, at their own positions."""
    calls = []

    def spy(ctx):  # keeps the last tokens of what it is shown, so each call's choice is visible in the record
        calls.append((ctx.modality, ctx.grid, ctx.video, ctx.span_positions.clone(), ctx.keep))
        return torch.arange(ctx.num_tokens - ctx.keep, ctx.num_tokens)

    with registered("spy_pre_llm", spy):
        env = dict(PRUNE_METHOD="spy_pre_llm", KEEP_RATIO="0.4")
        if scope == "video":
            env["IMAGE_METHODS_ON_VIDEO"] = "video"
        model, inputs = build_model(family), inputs_for(family, "image_video")
        with patched(custom_qwenvl, **env):
            forward_logits(model, inputs)
            record = custom_qwenvl.last_record(model)
            kept = custom_qwenvl.pruning_state(model).pre_map.index[0]
    t, h, w = inputs["video_grid_thw"][0].tolist()
    size = (h // 2) * (w // 2)
    assert [m for m, *_ in calls].count("image") == 1 and all(video is None for _, _, video, *_ in calls)
    video_calls = [c for c in calls if c[0] == "video"]
    all_video = torch.cat([c[3] for c in video_calls])
    if scope == "frame":
        assert len(video_calls) == t and all(grid == (1, h // 2, w // 2) for _, grid, *_ in video_calls)
        assert [c[4] for c in video_calls] == [round(0.4 * size)] * t  # the keep rule per frame
        assert all(c[3].numel() == size for c in video_calls)
    else:
        assert len(video_calls) == 1 and video_calls[0][1] == (t, h // 2, w // 2)
        assert video_calls[0][4] == round(0.4 * t * size)
    # The frames' positions tile the video's, in order; what each call chose is kept.
    assert torch.equal(all_video, all_video.sort().values) and all_video.numel() == t * size
    expected = torch.cat([c[3][-c[4]:] for c in video_calls])
    assert set(expected.tolist()) <= set(kept.tolist())
    assert sum(s.counts["pre_llm"] for s in record.spans[0] if s.modality == "video") == expected.numel()


def test_a_wrong_video_scope_is_refused_before_loading():
    from utils import PruneConfig, PruneConfigError

    with pytest.raises(PruneConfigError, match=r"IMAGE_METHODS_ON_VIDEO='frames'.*allowed: frame .* or video"):
        PruneConfig.from_env({"IMAGE_METHODS_ON_VIDEO": "frames"})


def test_a_video_vit_method_is_refused_at_registration():
    with pytest.raises(methods.RegistrationError, match="video=True on pre-LLM and intra-LLM"):
        methods.register_prune("frames_vit", video=True, default_layer=1)(lambda ctx: None)


# ------------------------------------------------------------------------------------------------------
# Oracles
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_keep_ratio_one_is_bit_identical(family):
    model, inputs = build_model(family), inputs_for(family, "image_video")
    ref_logits, (ref_ids, ref_steps) = forward_logits(model, inputs), greedy(model, inputs)

    def keep_all(ctx):
        return torch.arange(ctx.num_tokens)

    with registered("keepall_pre_llm", keep_all, video=True), \
            patched(custom_qwenvl, PRUNE_METHOD="keepall_pre_llm", KEEP_RATIO="1.0"):
        logits, (ids, steps) = forward_logits(model, inputs), greedy(model, inputs)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_pruned_video_equals_the_hand_shortened_sequence(family):
    """Only the video's first frame stays (and the image whole, as a one-frame video): the unpatched language model
    on exactly those rows at their original 3-D positions gives the same prefill and decode steps."""
    model, inputs = build_model(family), inputs_for(family, "image_video")
    with patched(custom_qwenvl, PRUNE_METHOD="firstframe_pre_llm", KEEP_RATIO="0.5"):
        logits = forward_logits(model, inputs)
        ids, steps = greedy(model, inputs)
        keep = custom_qwenvl.pruning_state(model).pre_map.index
    lm = capture_lm_inputs(model, inputs)
    ids_row = inputs["input_ids"][0]
    video_rows = torch.nonzero(ids_row == model.config.video_token_id).flatten()
    t, h, w = inputs["video_grid_thw"][0].tolist()
    per_frame = (h // 2) * (w // 2)
    dropped = set(video_rows[per_frame:].tolist())  # frames 1.. (contiguous placeholders or per-frame blocks)
    expected = torch.tensor([i for i in range(ids_row.numel()) if i not in dropped])
    assert torch.equal(keep[0], expected)
    with torch.no_grad():
        ref_prefill, ref_steps = reference_pre_llm(model, lm, keep, ids)
    assert torch.equal(logits, ref_prefill) and torch.equal(steps, ref_steps)


# ------------------------------------------------------------------------------------------------------
# Groups passed from one stage to a later one of the same prefill
# ------------------------------------------------------------------------------------------------------
def test_groups_given_by_a_stage_reach_the_later_stages():
    """A pre-LLM method labels the tokens it keeps (PruneResult.groups); a later intra-LLM stage, after another stage
    in between dropped some of them, reads each survivor's label as ctx.groups; spans the pre-LLM method did not
    label read -1."""
    seen = {}

    def label_pre(ctx):  # keep every other token, labelled by its own span-local index + 100
        kept = torch.arange(0, ctx.num_tokens, 2)
        return methods.PruneResult(kept, groups=kept + 100 if ctx.modality == "video" else None)

    def look(ctx):
        seen.setdefault(ctx.layer, []).append((ctx.modality, ctx.groups.clone()))
        return torch.arange(ctx.keep)

    with registered("labels_pre_llm", label_pre, video=True, exact_count=False), \
            registered("look_intra_llm", look, default_layer=1):
        shown("qwen2_5_vl", dict(PRUNE_METHOD_PRE_LLM="labels_pre_llm", KEEP_RATIO="1.0",
                                 INTRA_LLM_LAYER_SPECS="1:look_intra_llm:0.5;2:look_intra_llm:0.25"))
    (image_1, labels_1), (video_1, groups_1) = seen[1]
    assert image_1 == "image" and bool((labels_1 == -1).all())  # the image got no labels
    assert video_1 == "video" and groups_1.tolist() == [100 + i for i in range(0, 2 * groups_1.numel(), 2)]
    (_, _), (_, groups_2) = seen[2]
    assert groups_2.tolist() == groups_1[:groups_2.numel()].tolist()  # look_intra_llm kept the first tokens


def test_prunevid_stages_pass_their_groups_through_the_hooks():
    model, inputs = build_model("qwen2_5_vl"), inputs_for("qwen2_5_vl", "image_video")
    seen = []
    original = methods.registered_methods()["prunevid_intra_llm"].fn

    def spy(ctx):
        seen.append(None if ctx.groups is None else ctx.groups.clone())
        return original(ctx)

    spec = methods._base._REGISTRY["prunevid_intra_llm"]
    methods._base._REGISTRY["prunevid_intra_llm"] = spec.__class__(**{**spec.__dict__, "fn": spy})
    try:
        with patched(custom_qwenvl, KEEP_RATIO="0.5", PRUNE_METHOD_PRE_LLM="prunevid_pre_llm",
                     INTRA_LLM_LAYER_SPECS="2:prunevid_intra_llm:0.5"):
            forward_logits(model, inputs)
    finally:
        methods._base._REGISTRY["prunevid_intra_llm"] = spec
    assert len(seen) == 2 and all(g is not None and bool((g >= 0).all()) for g in seen)


def test_gemma4_frames_of_one_video_reach_a_video_method_together():
    """Gemma 4 lays every frame out as its own span (timestamps between): a video method still sees the video whole,
    with num_frames_per_video from the feature call."""
    import custom_gemma4
    from tests.support import tiny_gemma

    SEEN.clear()
    model = tiny_gemma.build_model("e2b")
    inputs = dict(tiny_gemma.make_inputs(tiny_gemma.build_processor(), "video"))
    with patched(custom_gemma4, PRUNE_METHOD="firstframe_pre_llm", KEEP_RATIO="0.5"):
        forward_logits(model, inputs)
        record = custom_gemma4.last_record(model)
    frames = int(inputs["num_frames_per_video"].sum())
    video = [ctx for ctx in SEEN if ctx.modality == "video"]
    assert frames > 1 and len(video) == 1 and video[0].video.count == frames and video[0].video.separate_spans
    spans = [s for s in record.spans[0] if s.modality == "video"]
    assert len(spans) == frames and [s.counts["pre_llm"] for s in spans[1:]] == [0] * (frames - 1)
    assert spans[0].counts["pre_llm"] == spans[0].counts["input"]
