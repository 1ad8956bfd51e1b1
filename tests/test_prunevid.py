"""PruneVid (methods/prunevid.py) on hand-made videos whose answer is known (planted segments, static tokens, clusters
and attention), and against loops written the way the official code (Visual-AI/PruneVid, PLLaVA port:
``merge_frames_dynamic``, ``cluster_dpc_knn``, ``refine_clusters``, ``compute_cluster_vectors``; the selection of
``VTPWindowCache.process_attention``) computes."""

import pytest
import torch
import torch.nn.functional as F

import methods
from methods import INTRA_LLM, PRE_LLM, PruneContext, PruneResult, SignalSource, VideoFrames
from methods.prunevid import (dpc_knn, prunevid_intra_llm, prunevid_pre_llm, prunevid_schedule, refine_clusters,
                              run_lengths, spatio_temporal_merge, static_positions, token_groups)

REGISTRY = methods.load_methods()

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PARAMS = {"PRUNEVID_TAU": 0.8, "PRUNEVID_TEMPORAL_SEGMENT_RATIO": 0.25, "PRUNEVID_KNN": 7, "PRUNEVID_SEED": 0}


def video(frames, per_frame, size=None):
    return VideoFrames(torch.arange(frames).repeat_interleave(per_frame), frames, size)


def pre_context(features, frames, ratio, size=None, modality="video", grid=None, **params):
    per_frame = features.shape[0] // frames
    return PruneContext(features=features, keep=1, grid=grid, modality=modality, stage=PRE_LLM,
                        params={**PARAMS, **params}, span_key=3, video=video(frames, per_frame, size), ratio=ratio)


def blobs(sizes, dim, generator, spread=10.0, noise=1e-3):
    """Rows in tight blobs (``sizes`` rows each, far apart): (rows [sum(sizes), dim], blob of each row)."""
    centres = torch.randn(len(sizes), dim, generator=generator) * spread
    label = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    return centres[label] + noise * torch.randn(label.numel(), dim, generator=generator), label


# ---------------------------------------------------------------- registration
def test_registration_and_defaults():
    pre, intra = REGISTRY["prunevid_pre_llm"], REGISTRY["prunevid_intra_llm"]
    assert pre.stage == PRE_LLM and pre.video and not pre.exact_count and pre.description
    assert intra.stage == INTRA_LLM and intra.video and not intra.exact_count and intra.min_layer == 1
    assert {p.env: p.default for p in pre.params} == PARAMS and intra.params == ()
    assert intra.default_schedule is prunevid_schedule
    # official --selected_layer 10: pruned after layer 10, i.e. before layer 11, whenever the model is deep enough
    assert [prunevid_schedule(d, 0.4) for d in (32, 28, 36, 12)] == [[(11, 0.4)]] * 4
    assert prunevid_schedule(4, 0.5) == [(1, 0.5)] and prunevid_schedule(8, 0.5) == [(3, 0.5)]  # round(11 d / 32)


# ---------------------------------------------------------------- temporal segments
def test_refine_clusters_keeps_longest_runs_and_reassigns_left_to_right():
    # cluster 0: runs of 2 and 1 -> the single one joins its longer neighbour (cluster 2's run of 3)
    assert refine_clusters([0, 0, 1, 1, 0, 2, 2, 2]) == [0, 0, 1, 1, 2, 2, 2, 2]
    # a cluster whose runs all have length 1 dissolves; a tie goes to the left neighbour
    assert refine_clusters([0, 0, 1, 2, 2]) == [0, 0, 0, 2, 2]
    # several runs of the longest length all survive (two segments of the same cluster)
    assert refine_clusters([0, 0, 1, 1, 0, 0]) == [0, 0, 1, 1, 0, 0]
    assert run_lengths([0, 0, 1, 1, 0, 0]) == [2, 2, 2]
    # nothing survives: no neighbours, cluster 0
    assert refine_clusters([0, 1, 2]) == [0, 0, 0]
    # sequential: frame 0 first joins cluster 1 (its run becomes 3 long), so frame 3 then ties 3 vs 3 -> left
    assert refine_clusters([0, 1, 1, 2, 3, 3, 3]) == [1, 1, 1, 1, 3, 3, 3]


def official_refine_clusters(cluster_idx):
    """``refine_clusters`` for one video as published: per cluster, its contiguous segments from its indices."""
    refined = cluster_idx.clone()
    n = cluster_idx.numel()
    for label in torch.unique(cluster_idx).tolist():
        idx = torch.nonzero(cluster_idx == label).flatten().tolist()
        segs, start, prev = [], idx[0], idx[0]
        for i in idx[1:]:
            if i == prev + 1:
                prev = i
            else:
                segs.append((start, prev))
                start = prev = i
        segs.append((start, prev))
        longest = max(e - s + 1 for s, e in segs)
        for s, e in segs:
            if longest == 1 or e - s + 1 != longest:
                refined[s:e + 1] = -1
    i = 0
    while i < n:
        if refined[i] != -1:
            i += 1
            continue
        s = i
        while i < n and refined[i] == -1:
            i += 1
        e = i - 1
        left_label, left_len, right_label, right_len = None, 0, None, 0
        if s > 0:
            left_label, j = refined[s - 1].item(), s - 1
            while j >= 0 and refined[j] == left_label:
                j -= 1
            left_len = s - j - 1
        if e < n - 1:
            right_label, j = refined[e + 1].item(), e + 1
            while j < n and refined[j] == right_label:
                j += 1
            right_len = j - e - 1
        if left_len > right_len:
            new = left_label
        elif right_len > left_len:
            new = right_label
        else:
            new = left_label if left_label is not None else right_label
        refined[s:e + 1] = 0 if new is None else new
    return refined


def test_refine_clusters_matches_the_official_loop_on_random_labels():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        labels = torch.randint(0, 4, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g)
        assert refine_clusters(labels.tolist()) == official_refine_clusters(labels).tolist()


def official_cluster_dpc_knn(x, cluster_num, k, generator):
    """``cluster_dpc_knn`` (batch of one, no mask) as published, its noise drawn from ``generator``."""
    x = x[None]
    b, n, c = x.shape
    dist = torch.cdist(x.float(), x.float()) / (c ** 0.5)
    nearest, _ = torch.topk(dist, k=k, dim=-1, largest=False)
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, generator=generator) * 1e-6
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
    parent, _ = (dist * mask + dist_max * (1 - mask)).min(dim=-1)
    _, centres = torch.topk(parent * density, k=cluster_num, dim=-1)
    idx = dist[0][centres[0]].argmin(dim=0)
    idx[centres[0]] = torch.arange(cluster_num)
    return idx, centres[0]


def official_cluster_vectors(x, idx, num):
    onehot = F.one_hot(idx, num_classes=num).to(x.dtype)
    return (onehot.T @ x) / onehot.sum(dim=0).clamp(min=1)[:, None]


def test_dpc_knn_matches_the_official_clustering_and_recovers_planted_blobs():
    for seed in range(3):
        x = torch.randn(40, 12, generator=torch.Generator().manual_seed(seed))
        ours = dpc_knn(x, 9, 7, torch.Generator().manual_seed(seed + 10))
        official = official_cluster_dpc_knn(x, 9, 7, torch.Generator().manual_seed(seed + 10))
        assert torch.equal(ours[0], official[0]) and torch.equal(ours[1], official[1])
    x, label = blobs([3, 5, 2, 4], 6, torch.Generator().manual_seed(4))
    assigned, centres = dpc_knn(x, 4, 7, torch.Generator().manual_seed(0))
    assert sorted(label[centres].tolist()) == [0, 1, 2, 3]  # one centre per blob
    assert torch.equal(label[centres][assigned], label)  # every row joins its blob's centre


def test_static_positions_use_the_mean_over_ordered_pairs_and_a_strict_threshold():
    # position 0: identical over 3 frames (1.0); position 1: frames 0 and 1 equal, frame 2 orthogonal: (2 x 1 + 4 x 0)
    # / 6 = 1/3; position 2: cosine 0.6 between every pair of frames (the sum includes the diagonal, minus W)
    window = torch.zeros(3, 3, 2)
    window[:, 0] = torch.tensor([1.0, 2.0])
    window[:, 1] = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    window[:, 2] = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])  # pairs: 0.6, 0.6, 1.0 -> mean 2.2 / 3
    assert static_positions(window, 0.8).tolist() == [True, False, False]
    assert static_positions(window, 0.7).tolist() == [True, False, True]
    assert static_positions(window, 0.3).tolist() == [True, True, True]
    assert static_positions(window[:, :1], 1.0).tolist() == [False]  # strict: 1.0 is not above 1.0
    assert static_positions(window[:1], -1.0).tolist() == [False, False, False]  # one frame: nothing static


# ---------------------------------------------------------------- pre-LLM stage on planted videos
def planted_video():
    """4 frames of 20 tokens (a 4 x 5 grid), D = 32. Segment A = frames 0-1 (15 static positions, forming 7 blobs,
    and 5 dynamic ones); segment B = frames 2-3 (4 static positions; 16 dynamic ones per frame, 8 blobs of 2), every
    token of B sharing an offset (its frames' means are close, its dynamic tokens still at cosine ~0.5 between the
    two frames). Scaled down so that DPC-kNN's densities are far above its 1e-6 noise."""
    g = torch.Generator().manual_seed(7)
    dim, per = 32, 20
    x = torch.zeros(4, per, dim)
    static_a, a_label = blobs([3, 2, 2, 2, 2, 2, 2], dim, g)
    x[0, :15] = static_a
    x[1, :15] = static_a + 0.01 * torch.randn(15, dim, generator=g)
    x[0, 15:] = torch.randn(5, dim, generator=g) * 10
    x[1, 15:] = torch.randn(5, dim, generator=g) * 10
    b_static = [0, 7, 13, 19]
    b_dynamic = [p for p in range(per) if p not in b_static]
    offset = torch.randn(dim, generator=g) * 10
    static_b = torch.randn(4, dim, generator=g) * 10 + offset
    x[2, b_static] = static_b
    x[3, b_static] = static_b + 0.01 * torch.randn(4, dim, generator=g)
    for f in (2, 3):
        rows, _ = blobs([2] * 8, dim, g)
        x[f, b_dynamic] = rows + offset
    return x * 0.05, a_label, b_static, b_dynamic


def test_planted_segments_static_tokens_and_spatial_clusters():
    x, a_label, b_static, b_dynamic = planted_video()
    params = {"PRUNEVID_TEMPORAL_SEGMENT_RATIO": 0.5}  # int(4 x 0.5) = 2 temporal clusters
    result = prunevid_pre_llm(pre_context(x.reshape(80, 32), 4, 0.5, size=(4, 5), **params))
    assert isinstance(result, PruneResult)
    # A: 15 static -> int(15 x 0.5) = 7 clusters at frame 0; 5 dynamic per frame (<= 14) unchanged.
    # B: 4 static (<= 14) averaged, at frame 2; 16 dynamic per frame -> 8 clusters each. 7 + 10 + 4 + 16 = 37.
    rows = result.indices.tolist()
    assert len(rows) == 37 and rows == sorted(rows)
    frame_of = [r // 20 for r in rows]
    assert frame_of.count(0) == 7 + 5 and frame_of.count(1) == 5 and frame_of.count(2) == 4 + 8 and \
        frame_of.count(3) == 8
    by_row = dict(zip(rows, result.features))
    # segment A's static clusters: the blob means of the segment-averaged static tokens, at a blob member's position
    mean_a = x[:2, :15].mean(dim=0)
    centres = [r for r in rows if r < 15]
    assert sorted(a_label[centres].tolist()) == list(range(7))
    for r in centres:
        torch.testing.assert_close(by_row[r], mean_a[a_label == a_label[r]].mean(dim=0))
    for r in list(range(15, 20)) + list(range(35, 40)):  # A's dynamic tokens: kept as they are
        assert torch.equal(by_row[r], x.reshape(80, 32)[r])
    for p in b_static:  # B's static tokens: averaged over frames 2 and 3, placed in frame 2
        torch.testing.assert_close(by_row[40 + p], x[2:, p].mean(dim=0))
    for f in (2, 3):  # B's dynamic tokens: 8 pairs per frame -> 8 pair means
        kept = [r - 20 * f for r in rows if r // 20 == f and r - 20 * f in b_dynamic]
        assert len(kept) == 8
        pair = {p: b_dynamic.index(p) // 2 for p in b_dynamic}
        assert sorted(pair[p] for p in kept) == list(range(8))
        for p in kept:
            members = [q for q in b_dynamic if pair[q] == pair[p]]
            torch.testing.assert_close(by_row[20 * f + p], x[f, members].mean(dim=0))


def test_pre_llm_count_rule_and_keep_ratio_one():
    x, *_ = planted_video()
    flat = x.reshape(80, 32)
    params = {"PRUNEVID_TEMPORAL_SEGMENT_RATIO": 0.5}
    # ratio 1: no spatial merge; static tokens still become one per segment: 15 + 2 x 5 + 4 + 2 x 16 = 61
    full = prunevid_pre_llm(pre_context(flat, 4, 1.0, size=(4, 5), **params))
    assert full.indices.numel() == 61
    # ratio 0.25: A static int(15/4) = 3, B dynamic int(16/4) = 4 per frame: 3 + 10 + 4 + 8 = 25
    assert prunevid_pre_llm(pre_context(flat, 4, 0.25, size=(4, 5), **params)).indices.numel() == 25
    # independent frames (no static token) at ratio 1: nothing changes, plain indices
    noise = torch.randn(80, 32, generator=torch.Generator().manual_seed(5))
    same = prunevid_pre_llm(pre_context(noise, 4, 1.0, size=(4, 5), **params))
    assert same.features is None and same.indices.tolist() == list(range(80))  # unchanged tokens, their groups
    # the official segment ratio 0.25 of 4 frames: one temporal cluster, one segment of 4 frames; with every
    # position static, the video becomes its 20 segment means, in frame 0
    rows, tokens, groups, _ = spatio_temporal_merge(flat, list(torch.arange(80).view(4, 20)), 1.0, -1.0, 0.25, 7,
                                                    torch.Generator())
    assert rows.tolist() == list(range(20)) and groups.tolist() == [0] * 20
    torch.testing.assert_close(tokens, x.mean(dim=0))


def test_an_image_is_one_frame_the_temporal_part_changes_nothing():
    g = torch.Generator().manual_seed(1)
    tile = torch.randn(12, 16, generator=g)
    # a tiled image (grid 3 x 3 x 4) whose tiles are identical: as a video they would be all static; as an image
    # nothing is averaged over tiles, and 36 tokens at ratio 1 stay exactly as they are
    image = tile.repeat(3, 1)
    ctx = pre_context(image, 3, 1.0, size=(3, 4), modality="image", grid=(3, 3, 4), PRUNEVID_TAU=-1.0)
    result = prunevid_pre_llm(ctx)
    assert result.features is None and result.indices.tolist() == list(range(36))
    # a one-frame video too, whatever the threshold
    single = torch.randn(20, 16, generator=g)
    alone = prunevid_pre_llm(pre_context(single, 1, 1.0, size=(4, 5), PRUNEVID_TAU=-1.0))
    assert alone.features is None and alone.indices.tolist() == list(range(20))
    # ratio 0.5: only the spatial merge, exactly DPC-kNN over the frame's 20 tokens into 10 clusters
    merged = prunevid_pre_llm(pre_context(single, 1, 0.5, size=(4, 5)))
    assigned, centres = official_cluster_dpc_knn(single, 10, 7, PruneContext(
        features=single, keep=1, grid=None, modality="video", stage=PRE_LLM, params={}, span_key=3).generator(0))
    expected = official_cluster_vectors(single, assigned, 10)
    order = centres.argsort()
    assert merged.indices.tolist() == centres[order].tolist()
    torch.testing.assert_close(merged.features, expected[order])


def official_merge_frames_dynamic(frames, tau, segment_ratio, cluster_ratio, k, generator):
    """``merge_frames_dynamic`` for one video [T, P, C] as published (the one-frame segment guarded: no static)."""
    t, p, c = frames.shape
    idx, _ = official_cluster_dpc_knn(frames.mean(dim=1), int(t * segment_ratio), k, generator)
    windows = run_lengths(official_refine_clusters(idx).tolist())

    def spatial(feat):
        if feat.shape[0] > 14:
            num = int(feat.shape[0] * cluster_ratio)
            assigned, _ = official_cluster_dpc_knn(feat, num, k, generator)
            return official_cluster_vectors(feat, assigned, num)
        return feat

    out, start = [], 0
    for w in windows:
        cur = frames[start:start + w]
        if w > 1:
            unit = F.normalize(cur, p=2, dim=-1)
            sim = torch.einsum("wlc,tlc->wtl", unit, unit)
            mask = (sim.sum(dim=-2) - 1).sum(dim=-2) / (w * (w - 1)) > tau
        else:
            mask = torch.zeros(p, dtype=torch.bool)
        if mask.any():
            out.append(spatial(cur[:, mask].mean(dim=0)))
        for i in range(w):
            if (~mask).any():
                out.append(spatial(cur[i][~mask]))
        start += w
    return torch.cat(out), windows


def test_pre_llm_matches_the_official_merge_frames_dynamic_on_random_videos():
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        scenes = torch.randn(3, 24, 16, generator=g)
        which = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
        frames = scenes[which] + 0.4 * torch.randn(8, 24, 16, generator=g)  # some positions static, some not
        expected, windows = official_merge_frames_dynamic(frames, 0.8, 0.5, 0.5, 7, torch.Generator().manual_seed(9))
        assert len(windows) > 1
        rows, tokens, _, _ = spatio_temporal_merge(frames.reshape(-1, 16), list(torch.arange(192).view(8, 24)),
                                                   0.5, 0.8, 0.5, 7, torch.Generator().manual_seed(9))
        assert rows.unique().numel() == rows.numel()
        torch.testing.assert_close(tokens, expected)


# ---------------------------------------------------------------- intra-LLM stage
class Planted(SignalSource):
    """Planted attention [H, L, L] at one layer, served in blocks of two rows; optional input embeddings [L, D]."""

    def __init__(self, probs, layer, embeddings=None):
        self.probs, self.layer, self.embeddings, self.calls = probs, layer, embeddings, []

    def attention_blocks(self, query_rows, layer, block_rows=None):
        self.calls.append((query_rows.tolist(), layer))
        assert layer == self.layer
        for start in range(0, len(query_rows), 2):
            yield self.probs[:, query_rows[start:start + 2]]

    def input_embeddings(self):
        if self.embeddings is None:
            raise RuntimeError("not captured")
        return self.embeddings


def intra_context(probs, span, text, ratio, frames=1, modality="video", embeddings=None, layer=5):
    n = len(span)
    return PruneContext(features=torch.zeros(n, 4), keep=1, grid=None, modality=modality, stage=INTRA_LLM,
                        params={}, span_key=0, layer=layer, span_positions=span, text_positions=text,
                        video=video(frames, n // frames, (1, n // frames)), ratio=ratio,
                        _signals=Planted(probs, layer - 1, embeddings))


def test_selection_scores_are_the_peak_over_heads_and_question_rows_and_count_per_frame():
    # text 0, span 1..8 (2 frames of 4), text 9, 10, 11 after it
    probs = torch.zeros(2, 12, 12)
    probs[0, 9, 1:9] = torch.tensor([0.1, 0.0, 0.0, 0.0, 0.3, 0.2, 0.0, 0.0])
    probs[1, 11, 1:9] = torch.tensor([0.0, 0.05, 0.0, 0.0, 0.0, 0.0, 0.25, 0.0])
    probs[:, 10, 1:9] = 0.04  # spread evenly: beats nothing but the zeros, everywhere the same
    probs[:, 9, 6] = 0.2  # token 5: 0.2 in both heads (head mean 0.2 > token 6's 0.125, but peak 0.2 < 0.25)
    probs[:, 0, 1:9] = 0.9  # a row before the span (cannot attend to it): never read
    # peaks: [0.1, 0.05, 0.04, 0.04 | 0.3, 0.2, 0.25, 0.04]
    ctx = intra_context(probs, torch.arange(1, 9), torch.tensor([0, 9, 10, 11]), 0.5, frames=2)
    assert prunevid_intra_llm(ctx).tolist() == [0, 1, 4, 6]  # int(4 x 0.5) = 2 per frame, not the global top 4
    assert ctx._signals.calls == [([9, 10, 11], 4)]  # the text after the span, at layer K - 1
    # an image: one group; ratio 0.6 of 8 -> int(4.8) = 4
    image = intra_context(probs, torch.arange(1, 9), torch.tensor([0, 9, 10, 11]), 0.6, modality="image")
    assert prunevid_intra_llm(image).tolist() == [0, 4, 5, 6]
    # ratio 1 keeps everything; equal scores go to the lower index
    assert prunevid_intra_llm(intra_context(probs, torch.arange(1, 9), torch.tensor([0, 9, 10, 11]), 1.0,
                                            frames=2)).tolist() == list(range(8))
    assert prunevid_intra_llm(intra_context(probs, torch.arange(1, 9), torch.tensor([0, 9, 10, 11]), 0.75,
                                            frames=2)).tolist() == [0, 1, 2, 4, 5, 6]


def test_no_text_after_the_video_keeps_everything():
    ctx = intra_context(torch.zeros(1, 9, 9), torch.arange(1, 9), torch.tensor([0]), 0.25, frames=2)
    assert prunevid_intra_llm(ctx).tolist() == list(range(8)) and ctx._signals.calls == []


def test_intra_llm_uses_the_pre_llm_groups():
    x, *_ = planted_video()
    params = {"PRUNEVID_TEMPORAL_SEGMENT_RATIO": 0.5}
    pre = prunevid_pre_llm(pre_context(x.reshape(80, 32), 4, 0.5, size=(4, 5), **params))
    n = pre.indices.numel()
    assert pre.groups is not None and pre.groups.shape == (n,)
    frame = (pre.indices // 20).tolist()
    # groups in position order: A static (frame 0, 7 tokens) interleaves with A frame 0 dynamic (5), etc.
    sizes = torch.bincount(pre.groups).tolist()
    assert sorted(sizes) == sorted([7, 5, 5, 4, 8, 8])
    for g in range(len(sizes)):
        assert len({frame[i] for i in torch.nonzero(pre.groups == g).flatten().tolist()}) == 1
    # the 37 tokens enter the language model after 2 text tokens; 3 text tokens follow
    span, text = torch.arange(2, 2 + n), torch.tensor([0, 1, n + 2, n + 3, n + 4])
    probs = torch.zeros(1, n + 5, n + 5)
    probs[0, n + 2, 2:2 + n] = torch.linspace(0.01, 0.5, n)  # later tokens score higher
    ctx = intra_context(probs, span, text, 0.5)
    ctx.video = VideoFrames(torch.zeros(n, dtype=torch.long), 1, None)  # frames unknown after the merge
    ctx.groups = pre.groups  # what the hooks hand the later stage (tests/test_video_context.py checks they do)
    assert torch.equal(token_groups(ctx), pre.groups)
    kept = prunevid_intra_llm(ctx)
    assert kept.numel() == 3 + 2 + 2 + 2 + 4 + 4  # int(n_g / 2) per group
    # without groups from an earlier stage: frames, here one unknown frame
    ctx.groups = None
    assert token_groups(ctx).tolist() == [0] * n
    assert token_groups(intra_context(probs, span, text, 0.5, frames=1)).tolist() == [0] * n
