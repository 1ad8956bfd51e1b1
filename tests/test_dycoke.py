"""DyCoke's temporal token merging (methods/dycoke.py) on hand-made videos whose answer is known, and against a loop
written the way the official code (KD-TAO/DyCoke, ``dycole_ttm`` in llava/model/llava_arch.py) computes it, with
the documented fixes (each pair ranked by its own similarity; an unpaired last frame kept whole)."""

import pytest
import torch
import torch.nn.functional as F

import custom_qwenvl
from methods import PRE_LLM, PruneContext, VideoFrames, registered_methods
from methods.dycoke import dycoke_pre_llm, ttm_plan
from tests.oracle import forward_logits, patched
from tests.support.tiny_models import build_model
from tests.test_qwenvl import inputs_for

pytestmark = pytest.mark.usefixtures("one_thread")


def video_context(features, frames, size, *, keep=None, rate="auto", modality="video"):
    n = features.shape[0]
    frame = torch.arange(frames).repeat_interleave(n // frames) if size else torch.zeros(n, dtype=torch.long)
    video = VideoFrames(frame, frames, size)
    return PruneContext(features=features, keep=n if keep is None else keep, grid=(frames, *size) if size else None,
                        modality=modality, stage=PRE_LLM, params={"DYCOKE_K": rate}, span_key=0, video=video)


def kept(ctx) -> list[int]:
    return sorted(dycoke_pre_llm(ctx).tolist())


def official_ttm(features, tokens, rate):
    """The official ``dycole_ttm`` loops, as kept span indices: frames appended pairwise (frame i whole, frame i + 1's
    least similar int((1 - K) * n) tokens), then every window of four from ``range(0, T - 4, 4)`` replacing frame
    i + 2 by its least similar tokens against frame i. Fixed: ``similarities[i // 2]`` (officially ``(i - 2) // 2``)
    and an odd last frame appended whole (officially dropped)."""
    frames = features.shape[0] // tokens
    keep_share = 1 - rate
    frame = [features[f * tokens:(f + 1) * tokens] for f in range(frames)]
    positions = [torch.arange(f * tokens, (f + 1) * tokens) for f in range(frames)]
    similarities = [F.cosine_similarity(F.normalize(frame[i], p=2, dim=1), F.normalize(frame[i + 1], p=2, dim=1), dim=1)
                    for i in range(0, frames - 1, 2)]
    modified = []
    for i in range(0, frames - 1, 2):
        keep = similarities[i // 2].topk(int(keep_share * tokens), largest=False).indices
        modified += [positions[i], positions[i + 1][keep]]
    if frames % 2:
        modified.append(positions[-1])
    for i in range(0, frames - 4, 4):
        similarity = F.cosine_similarity(frame[i], frame[i + 2], dim=1)
        keep = similarity.topk(int(keep_share * tokens), largest=False).indices
        modified[i], modified[i + 2] = positions[i], positions[i + 2][keep]
    return sorted(torch.cat(modified).tolist())


# ---------------------------------------------------------------- registration and grouping
def test_registration():
    spec = registered_methods()["dycoke_pre_llm"]
    assert spec.stage == PRE_LLM and spec.video and not spec.exact_count and spec.description
    assert {p.env: p.default for p in spec.params} == {"DYCOKE_K": "auto"}
    assert spec.params[0].type(" AUTO ") == "auto" and spec.params[0].type("0.7") == 0.7
    assert spec.params[0].check(1.5) and spec.params[0].check(0.7) is None and spec.params[0].check("auto") is None


@pytest.mark.parametrize("frames, whole, compared", [
    (1, [0], []),
    (2, [0], [(1, 0)]),
    (3, [0, 2], [(1, 0)]),  # the unpaired last frame stays whole
    (4, [0, 2], [(1, 0), (3, 2)]),  # official range(0, T - 4, 4) is empty: no pivot step
    (5, [0, 4], [(1, 0), (2, 0), (3, 2)]),
    (8, [0, 4, 6], [(1, 0), (2, 0), (3, 2), (5, 4), (7, 6)]),  # the last window keeps its frame 6 (official)
    (9, [0, 4, 8], [(1, 0), (2, 0), (3, 2), (5, 4), (6, 4), (7, 6)]),
])
def test_frames_are_grouped_in_pairs_and_windows_of_four_as_officially(frames, whole, compared):
    assert ttm_plan(frames) == (whole, compared)


# ---------------------------------------------------------------- planted redundancy
def planted_video(frames=8, side=3, dim=16, seed=0):
    """Each compared frame equals its reference frame except at two planted positions (new random tokens)."""
    gen = torch.Generator().manual_seed(seed)
    n = side * side
    grid = torch.randn(frames, n, dim, generator=gen)
    changed = {}
    for f, ref in ttm_plan(frames)[1]:
        moved = torch.randperm(n, generator=gen)[:2]
        grid[f] = grid[ref]
        grid[f, moved] = torch.randn(2, dim, generator=gen)
        changed[f] = moved
    return grid, changed


def test_static_tokens_of_later_frames_are_dropped_the_changed_ones_kept():
    """K = 0.7 keeps int(0.3 * 9) = 2 tokens per compared frame: exactly the two planted changes, found against the
    frame's own reference (frame 2 against the pivot 0, not its neighbour 1; frame 1 against its own pair)."""
    grid, changed = planted_video()
    n = grid.shape[1]
    ctx = video_context(grid.flatten(0, 1), 8, (3, 3), rate=0.7)
    expected = [t for f in (0, 4, 6) for t in range(f * n, (f + 1) * n)]
    expected += [f * n + p for f, moved in changed.items() for p in moved.tolist()]
    assert kept(ctx) == sorted(expected)


def test_the_least_similar_tokens_are_kept_in_order_of_similarity():
    """Frame 1's token j is frame 0's rotated by an angle growing with j: the m kept are the last m positions."""
    dim, n = 8, 9
    base = F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    other = F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(2)), dim=-1)
    other = F.normalize(other - (other * base).sum(-1, keepdim=True) * base, dim=-1)  # orthogonal to base
    angles = torch.linspace(0.1, 1.5, n)[:, None]
    frame1 = torch.cos(angles) * base + torch.sin(angles) * other
    features = torch.cat([base, frame1])
    for keep, m in [(9 + 3, 3), (9 + 7, 7), (18, 9), (9, 0)]:
        assert kept(video_context(features, 2, (3, 3), keep=keep)) == list(range(9)) + list(range(18 - m, 18))


@pytest.mark.parametrize("frames, rate", [(2, 0.7), (5, 0.5), (8, 0.7), (9, 0.3), (12, 0.8)])
def test_matches_the_official_loops_with_a_fixed_rate(frames, rate):
    side = 4
    features = torch.randn(frames * side * side, 12, generator=torch.Generator().manual_seed(frames))
    assert kept(video_context(features, frames, (side, side), rate=rate)) == official_ttm(features, side * side, rate)


def test_official_default_rate_keeps_58_of_196_tokens_per_compared_frame():
    features = torch.randn(4 * 196, 4, generator=torch.Generator().manual_seed(3))
    result = kept(video_context(features, 4, (14, 14), rate=0.7))
    per_frame = torch.bincount(torch.tensor(result) // 196, minlength=4).tolist()
    assert per_frame == [196, 58, 196, 58]


# ---------------------------------------------------------------- counts
def test_auto_rate_keeps_exactly_the_keep_count_down_to_the_whole_frames():
    """KEEP_RATIO sets K: the whole frames (0, 4, 6 of 8) stay and the rest of the budget is shared evenly by the
    compared frames (the remainder to the earliest); below the whole frames' 27 tokens only they remain."""
    grid, _ = planted_video()
    features, n = grid.flatten(0, 1), 9
    for keep in range(1, 73):
        result = kept(video_context(features, 8, (3, 3), keep=keep))
        assert len(result) == min(72, max(keep, 27)) and len(set(result)) == len(result)
        per_frame = torch.bincount(torch.tensor(result) // n, minlength=8)
        assert per_frame[[0, 4, 6]].tolist() == [n] * 3
        compared = per_frame[[1, 2, 3, 5, 7]]
        assert int(compared.max() - compared.min()) <= 1
        assert compared.tolist() == sorted(compared.tolist(), reverse=True)  # the remainder to the earliest
    spread = torch.bincount(torch.tensor(kept(video_context(features, 8, (3, 3), keep=50))) // n, minlength=8)
    assert spread.tolist() == [9, 5, 5, 5, 9, 4, 9, 4]  # 23 over 5 frames: 5, 5, 5, 4, 4
    assert kept(video_context(features, 8, (3, 3), keep=72)) == list(range(72))


def test_auto_rate_equals_the_official_count_of_the_matching_rate():
    """A keep count that the official rule gives for some K (every compared frame m = int((1 - K) * n) tokens) keeps
    the same tokens as that K."""
    features = torch.randn(8 * 16, 6, generator=torch.Generator().manual_seed(4))
    rate, n = 0.75, 16
    m = int((1 - rate) * n)
    assert kept(video_context(features, 8, (4, 4), keep=3 * n + 5 * m)) == official_ttm(features, n, rate)


# ---------------------------------------------------------------- no temporal part
def test_an_image_or_a_one_frame_video_is_kept_whole():
    features = torch.randn(12, 8)
    assert kept(video_context(features, 1, (3, 4), keep=3, modality="image")) == list(range(12))
    assert kept(video_context(features, 1, (3, 4), keep=3, rate=0.9)) == list(range(12))
    # an image of tiles shown as several "frames" is still an image: no temporal merging
    assert kept(video_context(features, 3, (2, 2), keep=3, modality="image")) == list(range(12))


def test_frames_without_complete_grids_are_kept_whole():
    """Frames of 6 and 4 tokens (e.g. after a ViT stage) have no common positions to compare."""
    ctx = video_context(torch.randn(10, 8), 1, None, keep=4)
    ctx.video = VideoFrames(torch.tensor([0] * 6 + [1] * 4), 2, None)
    assert kept(ctx) == list(range(10))


def test_through_the_qwen_hooks_the_image_stays_whole_and_the_video_follows_the_count():
    """Qwen2.5-VL, an image (6 tokens) and a video of 2 temporal patches of 2 x 2: KEEP_RATIO 0.5 keeps 4 of the
    video's 8 (frame 0 whole, none of frame 1), 0.25 the same (its keep count 2 is below the whole frame 0: the
    floor), 0.75 frame 0 and 2 of frame 1, 1.0 everything."""
    model, inputs = build_model("qwen2_5_vl"), inputs_for("qwen2_5_vl", "image_video")
    counts = {}
    for ratio in ("1.0", "0.75", "0.5", "0.25"):
        with patched(custom_qwenvl, PRUNE_METHOD="dycoke_pre_llm", KEEP_RATIO=ratio):
            forward_logits(model, inputs)
            record = custom_qwenvl.last_record(model)
        counts[ratio] = [(s.modality, s.counts["input"], s.counts["pre_llm"]) for s in record.spans[0]]
    assert counts == {"1.0": [("image", 6, 6), ("video", 8, 8)], "0.75": [("image", 6, 6), ("video", 8, 6)],
                      "0.5": [("image", 6, 6), ("video", 8, 4)], "0.25": [("image", 6, 6), ("video", 8, 4)]}
