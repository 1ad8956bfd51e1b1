"""HoliTom (methods/holitom.py) on hand-made videos whose answer is known, and against loops written the way the
official code (cokeshao/HoliTom: holitom/llava_arch.py ``select_static_windows``, ``cluster_dpc_knn``,
``merge_tokens_by_clustering``; holitom/modeling_qwen2.py) computes."""

import math

import pytest
import torch

from methods import INTRA_LLM, PRE_LLM, PruneContext, PruneResult, SignalSource, VideoFrames, VisionNeeds, \
    registered_methods
from methods._base import VisionSignals
from methods.holitom import cluster, holitom_intra_llm, holitom_pre_llm, static_windows

pytestmark = pytest.mark.usefixtures("one_thread")

PRE = registered_methods()["holitom_pre_llm"]
INTRA = registered_methods()["holitom_intra_llm"]
DEFAULTS = {p.env: p.default for p in PRE.params}


def video_context(features, attention, frames, size, ratio, **params):
    n = features.shape[0]
    video = VideoFrames(frame=torch.arange(frames).repeat_interleave(n // frames), count=frames, size=size)
    return PruneContext(features=features, keep=max(1, round(ratio * n)), grid=(frames, *size) if size else None,
                        modality="video" if frames > 1 else "image", stage=PRE_LLM, params={**DEFAULTS, **params},
                        span_key=0, video=video, ratio=ratio, _vision=VisionSignals(attention={0: attention}))


def official_windows(similar, max_window):
    """``select_static_windows`` as the official code writes it (tensor counts, float DP, strict >)."""
    frames = similar.shape[0] + 1
    matrix = torch.ones(frames, frames, similar.shape[1])
    for start in range(frames - 1):
        cum = torch.cumprod(similar[start:].float(), dim=0)
        matrix[start, start + 1:start + 1 + len(cum)] = cum
    lengths = (torch.arange(frames)[None, :] - torch.arange(frames)[:, None]).clamp(min=0)
    count = matrix.sum(dim=-1) * lengths
    dp, prev = torch.zeros(frames), torch.zeros(frames, dtype=torch.long)
    for i in range(frames):
        best, best_j = (dp[i - 1] if i > 0 else 0), i
        for window in range(2, min(i + 1, max_window) + 1):
            j = i - window
            value = (dp[j] if j >= 0 else 0) + count[j + 1, i]
            if value > best:
                best, best_j = value, j + 1
        dp[i], prev[i] = best, best_j
    segments, i = [], frames - 1
    while i >= 0:
        segments.append((prev[i].item(), i))
        i = prev[i].item() - 1
    return segments[::-1], dp[-1].item()


def official_cluster(x, clusters, k, beta, seed=0):
    """``cluster_dpc_knn`` + ``merge_tokens_by_clustering`` for one batch row; the density noise drawn as the method
    draws it first for a span (mutual nearest neighbours have equal densities: the noise breaks the tie)."""
    dist = torch.cdist(x[None], x[None]) / x.shape[1] ** 0.5
    nearest = torch.topk(dist, k, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, generator=torch.Generator().manual_seed(seed)) * 1e-6
    mask = (density[:, None, :] > density[:, :, None]).float()
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    parent = (dist * mask + dist_max * (1 - mask)).min(dim=-1).values
    centres = (parent * density).topk(clusters, dim=-1).indices.sort(dim=-1).values[0]
    others = torch.tensor([i for i in range(x.shape[0]) if i not in centres.tolist()], dtype=torch.long)
    assigned = torch.argmin(dist[0][others][:, centres], dim=-1)
    tokens = []
    for c in range(clusters):
        members = x[others][assigned == c]
        tokens.append(beta * x[centres[c]] + (1 - beta) * members.mean(0) if len(members) else x[centres[c]])
    return centres, torch.stack(tokens)


def planted_video(seed=0, dim=64):
    """5 frames of 3 x 3 tokens. Frames 0-2: positions 0-4 the same in every frame (0-2 near one vector, 3-4 near
    another), 5-8 new each frame; a scene cut; frames 3-4: positions 0-5 the same, 6-8 new each frame."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(5, 9, dim, generator=g)
    a, b = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    first = torch.stack([a + 0.05 * torch.randn(dim, generator=g) for _ in range(3)]
                        + [b + 0.05 * torch.randn(dim, generator=g) for _ in range(2)])
    frames[0:3, 0:5] = first
    frames[3:5, 0:6] = torch.randn(6, dim, generator=g)
    attention = torch.rand(5, 9, generator=g)
    return frames, attention


# ---------------------------------------------------------------- registration
def test_registration_and_official_defaults():
    assert PRE.stage == PRE_LLM and PRE.video and not PRE.exact_count
    assert PRE.vision_needs(DEFAULTS) == VisionNeeds(cls_layers=(-2, -2), cls_heads="received")
    assert DEFAULTS == {"HOLITOM_T": 0.8, "HOLITOM_BETA": 0.6, "HOLITOM_D": 0.0, "HOLITOM_KNN": 7,
                        "HOLITOM_MAX_WINDOW_SIZE": 1024, "HOLITOM_NO_BETA": False, "HOLITOM_SEED": 0}
    assert INTRA.stage == INTRA_LLM and INTRA.video and not INTRA.exact_count
    assert INTRA.default_layer == 3 and INTRA.min_layer == 1
    assert {p.env: p.default for p in INTRA.params} == {"HOLITOM_R": 0.5}
    assert INTRA.params[0].type(" Stage ") == "stage" and INTRA.params[0].check(1.0)


# ---------------------------------------------------------------- temporal segmentation
def test_dynamic_programme_finds_the_planted_segments():
    frames, _ = planted_video()
    unit = torch.nn.functional.normalize(frames, dim=-1)
    similar = torch.nn.functional.cosine_similarity(unit[:-1], unit[1:], dim=-1) > 0.8
    expected = torch.zeros(4, 9, dtype=torch.bool)
    expected[0:2, 0:5] = True
    expected[3, 0:6] = True
    assert torch.equal(similar, expected)
    assert static_windows(similar, 1024) == ([(0, 2), (3, 4)], 5 * 2 + 6 * 1)
    # A window cap of 2 frames: [0, 1] saves 5, then frame 2 alone, then [3, 4] saves 6.
    assert static_windows(similar, 2) == ([(0, 1), (2, 2), (3, 4)], 11)


def test_dynamic_programme_equals_the_official_loop_and_prefers_single_frames_on_ties():
    g = torch.Generator().manual_seed(3)
    for trial in range(30):
        frames = 2 + trial % 7
        similar = torch.rand(frames - 1, 6, generator=g) > 0.35
        for cap in (2, 3, 1024):
            segments, saved = static_windows(similar, cap)
            assert (segments, float(saved)) == official_windows(similar, cap)
            assert all(b - a + 1 <= cap for a, b in segments)
    assert static_windows(torch.zeros(3, 4, dtype=torch.bool), 1024) == ([(0, 0), (1, 1), (2, 2), (3, 3)], 0)


# ---------------------------------------------------------------- DPC-kNN
def test_dpc_knn_finds_one_centre_per_planted_group_and_merges_with_beta():
    g = torch.Generator().manual_seed(5)
    centres_true = torch.randn(3, 16, generator=g) * 4
    x = torch.cat([c + 0.1 * torch.randn(4, 16, generator=g) for c in centres_true])  # 3 groups of 4
    params = {**DEFAULTS}
    centres, merged = cluster(x, 3, params, torch.Generator().manual_seed(0))
    assert sorted((centres // 4).tolist()) == [0, 1, 2]
    ref_centres, ref_merged = official_cluster(x, 3, 3, 0.6)
    assert torch.equal(centres, ref_centres)
    torch.testing.assert_close(merged, ref_merged)
    group = (centres[0] // 4).item()
    members = [i for i in range(4 * group, 4 * group + 4) if i != centres[0]]
    torch.testing.assert_close(merged[0], 0.6 * x[centres[0]] + 0.4 * x[members].mean(0))
    _, plain = cluster(x, 3, {**params, "HOLITOM_NO_BETA": True}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain[0], x[4 * group:4 * group + 4].mean(0))


# ---------------------------------------------------------------- the pre-LLM stage
def test_planted_video_segments_static_merging_and_dominant_tokens():
    frames, attention = planted_video()
    features, ratio = frames.reshape(45, -1), 0.25
    result = holitom_pre_llm(video_context(features, attention.flatten(), 5, (3, 3), ratio))
    assert isinstance(result, PruneResult)
    r = min(ratio / ((45 - 16) / 45), 1)
    segment_0 = round(5 * r) + 3 * math.ceil(4 * r)  # 2 static clusters + 2 dynamic per frame
    segment_1 = round(6 * r) + 2 * math.ceil(3 * r)
    assert (round(5 * r), math.ceil(4 * r), round(6 * r), math.ceil(3 * r)) == (2, 2, 2, 2)
    assert result.indices.numel() == segment_0 + segment_1 == 14
    kept = dict(zip(result.indices.tolist(), result.features))
    # Static tokens: positions 0-4 of frames 0-2 become two tokens placed in frame 0 (one per planted group), and
    # positions 0-5 of frames 3-4 two tokens placed in frame 3; no static position is kept in a later frame.
    static_0 = sorted(i for i in kept if i < 9 and i % 9 < 5)
    static_1 = sorted(i for i in kept if 27 <= i < 36 and i % 9 < 6)
    assert len(static_0) == 2 and [p < 3 for p in static_0] == [True, False]
    assert len(static_1) == 2
    assert not any(9 <= i < 27 and i % 9 < 5 for i in kept) and not any(36 <= i and i % 9 < 6 for i in kept)
    means = frames[0:3, 0:5].mean(0)
    ref_centres, ref_merged = official_cluster(means, 2, 2, 0.6)
    assert static_0 == ref_centres.tolist()
    torch.testing.assert_close(torch.stack([kept[i] for i in static_0]), ref_merged)
    # Dynamic tokens: the two most attended of each frame's dynamic positions, unchanged.
    for f in range(5):
        dynamic = list(range(5, 9)) if f < 3 else list(range(6, 9))
        top = sorted(dynamic, key=lambda p: -attention[f, p].item())[:2]
        assert sorted(i - 9 * f for i in kept if i // 9 == f and i % 9 in dynamic) == sorted(top)
        for p in top:
            assert torch.equal(kept[9 * f + p], features[9 * f + p])


def test_keep_ratio_one_keeps_every_dynamic_token_and_one_token_per_static_position_and_segment():
    frames, attention = planted_video()
    result = holitom_pre_llm(video_context(frames.reshape(45, -1), attention.flatten(), 5, (3, 3), 1.0))
    assert result.indices.numel() == 45 - 16
    kept = dict(zip(result.indices.tolist(), result.features))
    for p in range(5):
        torch.testing.assert_close(kept[p], frames[0:3, p].mean(0))  # a static token: its segment mean
    for p in range(6):
        torch.testing.assert_close(kept[27 + p], frames[3:5, p].mean(0))


def test_an_image_is_one_frame_the_temporal_step_changes_nothing():
    g = torch.Generator().manual_seed(7)
    features, attention = torch.randn(12, 8, generator=g), torch.rand(12, generator=g)
    for threshold in (0.8, -1.0):  # every token "static" or none: a single frame has no temporal step
        result = holitom_pre_llm(video_context(features, attention, 1, (3, 4), 0.3, HOLITOM_T=threshold))
        assert not isinstance(result, PruneResult)  # nothing merged: the original tokens
        top = attention.argsort(descending=True)[:math.ceil(12 * 0.3)]
        assert sorted(result.tolist()) == sorted(top.tolist())
    # A frame without a grid (LLaVA-NeXT base view + tiles): the same spatial step.
    tiled = video_context(features, attention, 1, None, 0.3)
    assert sorted(holitom_pre_llm(tiled).tolist()) == sorted(result.tolist())


def test_counts_follow_the_documented_rule():
    g = torch.Generator().manual_seed(11)
    for trial in range(12):
        frames, h, w = 2 + trial % 4, 2 + trial % 2, 3
        n = h * w
        base = torch.randn(n, 16, generator=g)
        video = torch.stack([base + 0.6 * torch.randn(n, 16, generator=g) for _ in range(frames)])
        attention = torch.rand(frames * n, generator=g)
        ratio = (0.1, 0.25, 0.5)[trial % 3]
        result = holitom_pre_llm(video_context(video.reshape(frames * n, -1), attention, frames, (h, w), ratio))
        indices = result.indices if isinstance(result, PruneResult) else result
        unit = torch.nn.functional.normalize(video, dim=-1)
        similar = torch.nn.functional.cosine_similarity(unit[:-1], unit[1:], dim=-1) > 0.8
        segments, saved = static_windows(similar, 1024)
        r = min(ratio / ((frames * n - saved) / (frames * n)), 1)
        expected = 0
        for a, b in segments:
            static = int(similar[a:b].all(0).sum()) if b > a else 0
            expected += round(static * r) + (b - a + 1) * math.ceil((n - static) * r)
        assert indices.numel() == max(1, expected), trial
        assert indices.unique().numel() == indices.numel()


def test_contextual_tokens_are_dpc_knn_centres_of_the_rest():
    g = torch.Generator().manual_seed(13)
    features, attention = torch.randn(16, 8, generator=g), torch.rand(16, generator=g)
    result = holitom_pre_llm(video_context(features, attention, 1, (4, 4), 0.25, HOLITOM_D=0.5))
    # budget ceil(16 * 0.25) = 4: round(4 * 0.5) = 2 dominant, 2 contextual
    dominant = attention.argsort(descending=True)[:2].sort().values
    rest = torch.tensor([i for i in range(16) if i not in dominant.tolist()])
    ref_centres, ref_merged = official_cluster(features[rest], 2, 2, 0.6)
    expected = torch.cat([dominant, rest[ref_centres]])
    assert result.indices.tolist() == expected.sort().values.tolist()
    kept = dict(zip(result.indices.tolist(), result.features))
    torch.testing.assert_close(torch.stack([kept[i] for i in rest[ref_centres].tolist()]), ref_merged)
    torch.testing.assert_close(torch.stack([kept[i] for i in dominant.tolist()]), features[dominant])


def test_at_least_one_token_is_kept():
    features = torch.ones(2 * 4, 4)  # every token static over both frames: round(4 * r') = 0 at a tiny ratio
    attention = torch.arange(8.0)
    result = holitom_pre_llm(video_context(features, attention, 2, (2, 2), 0.05))
    assert result.tolist() == [7]


# ---------------------------------------------------------------- the intra-LLM stage
class PlantedAttention(SignalSource):
    def __init__(self, probs):
        self.probs = probs

    def attention(self, query_rows, layer):
        assert layer == 2
        return self.probs[:, query_rows]


def intra_context(features, last_row, share, keep=1):
    n, length = features.shape[0], features.shape[0] + 3
    probs = torch.rand(2, length, length)
    probs[:, -1, 1:n + 1] = last_row  # both heads: the planted row of the last prompt token
    return PruneContext(features=features, keep=keep, grid=None, modality="video", stage=INTRA_LLM,
                        params={"HOLITOM_R": share}, span_key=0, layer=3, span_positions=torch.arange(1, n + 1),
                        text_positions=torch.tensor([0, n + 1, n + 2]), _signals=PlantedAttention(probs))


def official_merge(states, kept, others):
    """The official in-place loop: similarities first, then kept = (kept + other) / 2 in position order."""
    states = states.clone()
    unit = states / states.norm(dim=-1, keepdim=True)
    nearest = (unit[others] @ unit[kept].T).max(dim=-1).indices
    for i, other in enumerate(others.tolist()):
        target = kept[nearest[i]]
        states[target] = (states[target] + states[other]) / 2
    return states[kept]


def test_intra_keeps_the_most_attended_and_merges_the_rest_sequentially():
    g = torch.Generator().manual_seed(17)
    basis = torch.eye(6) * 2
    features = basis[[1, 0, 2, 1, 2, 0, 0, 3]] + 0.05 * torch.randn(8, 6, generator=g)  # 0 ~ 3, 2 ~ 4, 5 and 6 ~ 1
    last_row = torch.tensor([0.05, 0.3, 0.02, 0.2, 0.1, 0.01, 0.03, 0.25])
    result = holitom_intra_llm(intra_context(features, last_row, 0.5))
    kept = torch.tensor([1, 3, 4, 7])  # round(8 * 0.5) = 4 most attended, in order
    assert result.indices.tolist() == kept.tolist()
    x = features
    expected = torch.stack([x[1] / 4 + x[5] / 4 + x[6] / 2,  # 1 absorbs 5, then 6: ((x1 + x5) / 2 + x6) / 2
                            (x[3] + x[0]) / 2, (x[4] + x[2]) / 2, x[7]])
    torch.testing.assert_close(result.features, expected)
    torch.testing.assert_close(result.features, official_merge(features, kept, torch.tensor([0, 2, 5, 6])))


def test_intra_matches_the_official_loop_on_random_spans():
    g = torch.Generator().manual_seed(19)
    for n, share in ((30, 0.5), (17, 0.3), (9, 0.8)):
        features, last_row = torch.randn(n, 5, generator=g), torch.rand(n, generator=g)
        result = holitom_intra_llm(intra_context(features, last_row, share))
        keep = round(n * (1 - share))
        kept = last_row.argsort(descending=True)[:keep].sort().values
        others = torch.tensor([i for i in range(n) if i not in kept.tolist()])
        assert result.indices.tolist() == kept.tolist()
        torch.testing.assert_close(result.features, official_merge(features, kept, others))


def test_intra_stage_mode_and_floors():
    g = torch.Generator().manual_seed(23)
    features, last_row = torch.randn(10, 4, generator=g), torch.rand(10, generator=g)
    assert holitom_intra_llm(intra_context(features, last_row, "stage", keep=3)).indices.numel() == 3
    assert holitom_intra_llm(intra_context(features, last_row, 0.0)).tolist() == list(range(10))
    one = holitom_intra_llm(intra_context(features[:1], last_row[:1], 0.5))  # round(0.5) = 0 -> floor of 1
    assert one.tolist() == [0]
