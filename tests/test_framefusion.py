"""FrameFusion (methods/framefusion.py) on hand-made videos and planted attention whose answer is known, against a
loop written the way the official code (thu-nics/FrameFusion ``framefusion/main.py``) walks the sequence in patch
order, and through the tiny Qwen2.5-VL (the layer-0 stage is the pre-LLM merge)."""

import math

import pytest
import torch

from methods import INTRA_LLM, PRE_LLM, PruneContext, PruneResult, SignalSource, VideoFrames, registered_methods
from methods.framefusion import (budget_sparsity, frame_similarity, framefusion_intra_llm, framefusion_pre_llm,
                                 framefusion_schedule, pruning_keep)

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = {"FRAMEFUSION_SIMILARITY_THRESHOLD": 0.6, "FRAMEFUSION_COST_LAYERS": 28, "FRAMEFUSION_QUERY_ROWS": 1}


def frames_of(t, h, w, complete=True):
    n = t * h * w
    return VideoFrames(torch.arange(t).repeat_interleave(h * w) if complete else torch.zeros(n, dtype=torch.long),
                       t if complete else 1, (h, w) if complete else None)


def merge_context(features, t, h, w, *, ratio=0.3, params=None, modality="video", stage=INTRA_LLM, complete=True):
    return PruneContext(features=features, keep=features.shape[0], grid=(t, h, w), modality=modality, stage=stage,
                        params={**PARAMS, **(params or {})}, span_key=0, layer=0 if stage == INTRA_LLM else None,
                        video=frames_of(t, h, w, complete), ratio=ratio)


def unit(i, d=16):
    return torch.nn.functional.one_hot(torch.tensor(i), d).float()


def at_cosine(a, b, cosine):
    """A vector at exactly ``cosine`` to the unit vector ``a`` (b is orthogonal to a)."""
    return cosine * a + math.sqrt(1 - cosine ** 2) * b


# ---------------------------------------------------------------- registration and the cost model
def test_registration():
    intra, pre = registered_methods()["framefusion_intra_llm"], registered_methods()["framefusion_pre_llm"]
    assert intra.stage == INTRA_LLM and intra.video and not intra.exact_count and intra.min_layer == 0
    assert pre.stage == PRE_LLM and pre.video and not pre.exact_count
    assert intra.default_schedule is framefusion_schedule
    assert framefusion_schedule(28, 0.3) == [(0, 0.3), (1, 0.3)]
    with pytest.raises(ValueError):
        framefusion_schedule(1, 0.3)
    assert {p.env: p.default for p in intra.params} == PARAMS
    assert {p.env: p.default for p in pre.params} == {k: PARAMS[k] for k in list(PARAMS)[:2]}


def test_budget_sparsity_is_the_official_cost_model():
    assert budget_sparsity([], 0.3, 28) == pytest.approx(0.7)  # before the first step: 1 - cost
    assert budget_sparsity([0.0], 0.3, 28) == pytest.approx(1 - 7.4 / 27)  # nothing merged: prune 72.6 %
    assert budget_sparsity([0.5], 0.3, 28) == pytest.approx(1 - 7.9 / 13.5)
    assert budget_sparsity([0.5, 0.2], 0.3, 28) == pytest.approx(1 - (8.4 - 0.5 - 0.4) / (26 * 0.4))
    assert budget_sparsity([], 1.0, 28) == 0.0 and budget_sparsity([0.0], 1.0, 28) == 0.0  # cost 1: nothing
    assert budget_sparsity([0.2], 0.9, 28) == 0.0  # the budget allows more than every remaining token
    assert budget_sparsity([0.0], 0.01, 28) == 1.0  # official: "The cost is too small"


# ---------------------------------------------------------------- the merging step
def test_tokens_merge_into_the_same_position_of_the_previous_frame_and_runs_into_the_earliest():
    # 3 frames of 2 x 2 tokens, every token its own direction except the planted ones:
    #   position 0: frame 1 = frame 0, frame 2 = frame 1 -> a run of two, both merged into frame 0's token;
    #   position 1: frame 2 at cosine 0.7 to frame 1, frame 1 orthogonal to frame 0 -> into frame 1;
    #   position 2: frame 1 at cosine 0.5 to frame 0 -> kept; position 3: frame 2 equal to frame 0 but not adjacent.
    x = torch.stack([unit(i) for i in range(12)])
    x[4] = x[0] * 2
    x[8] = x[0] * 3
    x[9] = at_cosine(unit(5), unit(15), 0.7)
    x[6] = at_cosine(unit(2), unit(14), 0.5)
    x[11] = x[3]
    result = framefusion_intra_llm(merge_context(x, 3, 2, 2))
    assert isinstance(result, PruneResult)
    assert result.indices.tolist() == [0, 1, 2, 3, 5, 6, 7, 10, 11]  # 4, 8 -> 0 and 9 -> 5 merged away
    by_index = dict(zip(result.indices.tolist(), result.features))
    torch.testing.assert_close(by_index[0], (x[0] + x[4] + x[8]) / 3)  # plain mean of the run and its start
    torch.testing.assert_close(by_index[5], (x[5] + x[9]) / 2)
    for i in (1, 2, 3, 6, 7, 10, 11):
        torch.testing.assert_close(by_index[i], x[i])


def test_threshold_is_inclusive():
    x = torch.stack([unit(0), unit(1), at_cosine(unit(0), unit(2), 0.6), unit(3)])
    similarity = frame_similarity(x.view(2, 2, 16))[1, 0].item()
    above = torch.nextafter(torch.tensor(similarity), torch.tensor(2.0)).item()
    at = framefusion_intra_llm(merge_context(x, 2, 1, 2, params={"FRAMEFUSION_SIMILARITY_THRESHOLD": similarity}))
    over = framefusion_intra_llm(merge_context(x, 2, 1, 2, params={"FRAMEFUSION_SIMILARITY_THRESHOLD": above}))
    assert at.indices.tolist() == [0, 1, 3] and over.tolist() == [0, 1, 2, 3]


def test_merge_keeps_the_dtype_and_a_zero_vector_never_merges():
    x = torch.zeros(8, 4, dtype=torch.bfloat16)
    x[0] = x[4] = 1  # position 0: equal in both frames; position 1: zero vectors (NaN similarity)
    result = framefusion_pre_llm(merge_context(x, 2, 2, 2, stage=PRE_LLM))
    assert result.indices.tolist() == [0, 1, 2, 3, 5, 6, 7] and result.features.dtype == torch.bfloat16


def official_merge(x, threshold, cost, layers=28):
    """The official first merging step, walked the way ``compute_similarity_and_token_index_by_patch`` and
    ``merge_tokens_and_get_mask`` do: tokens listed in patch order (position-major), each compared with the one
    before it in that list (IGNORE across positions), the cap applied with topk, then runs of consecutive merged
    entries averaged into the entry before the run. Returns {kept frame-major index: feature}."""
    t, p, _ = x.shape
    order = [(f, q) for q in range(p) for f in range(t)]
    sims = [-2.0] + [(torch.dot(x[a], x[b]) / (x[a].norm() * x[b].norm())).item() if a[1] == b[1] else -2.0
                     for b, a in zip(order[:-1], order[1:])]
    sims = torch.tensor(sims)
    merged = set(torch.nonzero(sims >= threshold).flatten().tolist())
    cap = budget_sparsity([], cost, layers)
    if len(merged) / len(order) >= cap:
        merged = set(torch.topk(sims, int(cap * len(order))).indices.tolist())
    out, i = {}, 0
    while i < len(order):
        j = i + 1
        while j in merged:
            j += 1
        f, q = order[i]
        out[f * p + q] = torch.stack([x[order[k]] for k in range(i, j)]).mean(dim=0)
        i = j
    return out


@pytest.mark.parametrize("ratio", [0.3, 0.85])  # 0.85: the cap (int(0.15 N)) binds
def test_merge_equals_the_official_patch_order_walk(ratio):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 6, 12, generator=g)
    x = base + torch.randn(5, 6, 12, generator=g) * torch.rand(5, 6, 1, generator=g) * 2  # graded similarities
    expected = official_merge(x, 0.6, ratio)
    result = framefusion_intra_llm(merge_context(x.reshape(30, 12), 5, 2, 3, ratio=ratio))
    assert result.indices.tolist() == sorted(expected)
    torch.testing.assert_close(result.features, torch.stack([expected[i] for i in sorted(expected)]))
    merged = 30 - result.indices.numel()
    if ratio == 0.85:
        assert merged == int(budget_sparsity([], 0.85, 28) * 30) == 4
    else:
        assert 4 < merged < int(0.7 * 30)


def test_at_the_cap_only_the_most_similar_merge():
    # 2 frames of 8 tokens, all frame-1 tokens similar (cos 0.99 ... 0.92); cost 0.75: cap 0.25 -> int(4) = 4 merges.
    x = torch.stack([unit(i) for i in range(8)] + [at_cosine(unit(i), unit(8 + i), 0.99 - 0.01 * i)
                                                   for i in range(8)])
    result = framefusion_intra_llm(merge_context(x, 2, 2, 4, ratio=0.75))
    assert result.indices.tolist() == list(range(8)) + [12, 13, 14, 15]


def test_keep_ratio_one_merges_nothing():
    x = torch.ones(8, 4)
    assert framefusion_intra_llm(merge_context(x, 2, 2, 2, ratio=1.0)).tolist() == list(range(8))


def test_images_and_reduced_videos_are_not_merged():
    x = torch.ones(8, 4)  # every token identical: any temporal merge would take half of them
    assert framefusion_intra_llm(merge_context(x[:4], 1, 2, 2)).tolist() == list(range(4))  # a one-frame image
    # An image whose tiles the model lays along t (InternVL) is still an image: no merging across tiles.
    assert framefusion_pre_llm(merge_context(x, 2, 2, 2, modality="image", stage=PRE_LLM)).tolist() == list(range(8))
    # After an earlier stage the frames are no complete grids (ctx.video.size None): nothing to align by position.
    assert framefusion_intra_llm(merge_context(x, 2, 2, 2, complete=False)).tolist() == list(range(8))


# ---------------------------------------------------------------- the pruning step
class PlantedAttention(SignalSource):
    def __init__(self, probs):
        self.probs, self.calls = probs, []  # layer -> [H, L, L]

    def attention(self, query_rows, layer):
        self.calls.append((query_rows.tolist(), layer))
        return self.probs[layer][:, query_rows]


def prune_context(probs, span, text, grid, *, layer=1, ratio=0.3, params=None, modality="video"):
    n = len(span)
    return PruneContext(features=torch.zeros(n, 4), keep=n, grid=grid, modality=modality, stage=INTRA_LLM,
                        params={**PARAMS, **(params or {})}, span_key=0, layer=layer, span_positions=span,
                        text_positions=text, video=VideoFrames(torch.zeros(n, dtype=torch.long), 1, None),
                        ratio=ratio, _signals=PlantedAttention(probs))


def planted(length, rows_scores, heads=2):
    """[H, L, L] attention whose rows ``rows_scores`` {row: [L] head-mean scores} are planted (split over heads)."""
    probs = torch.zeros(heads, length, length)
    for row, scores in rows_scores.items():
        probs[0, row], probs[1, row] = torch.tensor(scores) * 2, 0  # head mean = scores
    return probs


def test_pruning_keeps_the_most_attended_tokens_by_the_cost_rule():
    # Text 0, a one-frame span at 1..10, text 11..13; the last prompt token (13) at layer 0 scores the span.
    scores = [0.0] + [0.01, 0.09, 0.02, 0.08, 0.03, 0.07, 0.04, 0.06, 0.05, 0.10] + [0.0, 0.0, 0.0]
    probs = {0: planted(14, {13: scores, 12: [0.0] * 14})}
    span, text = torch.arange(1, 11), torch.tensor([0, 11, 12, 13])
    ctx = prune_context(probs, span, text, (1, 2, 5))
    keep = round(10 * (1 - budget_sparsity([0.0], 0.3, 28)))  # nothing merged: 10 x 0.274 -> 3
    assert keep == 3 and pruning_keep(10, 10, 0.3, 28) == 3
    assert framefusion_intra_llm(ctx).tolist() == [1, 3, 9]  # scores 0.09, 0.08, 0.10
    assert ctx._signals.calls == [([13], 0)]  # the last prompt token, at layer K-1


def test_query_rows_are_averaged():
    a = [0.0] + [0.5, 0.0, 0.0, 0.0] + [0.0, 0.0]
    b = [0.0] + [0.0, 0.3, 0.3, 0.0] + [0.0, 0.0]
    probs = {2: planted(7, {5: a, 6: b})}
    one = prune_context(probs, torch.arange(1, 5), torch.tensor([0, 5, 6]), (1, 2, 2), layer=3, ratio=0.6)
    two = prune_context(probs, torch.arange(1, 5), torch.tensor([0, 5, 6]), (1, 2, 2), layer=3, ratio=0.6,
                        params={"FRAMEFUSION_QUERY_ROWS": 2})
    assert pruning_keep(4, 4, 0.6, 28) == 2
    assert framefusion_intra_llm(one).tolist() == [1, 2]  # row 6 alone: 0.3, 0.3 (ties: the earlier)
    assert framefusion_intra_llm(two).tolist() == [0, 1]  # mean of rows 5, 6: 0.25, 0.15, 0.15, 0
    assert two._signals.calls == [([5, 6], 2)]


def test_pruning_reads_the_merged_share_from_the_grid():
    # The span entered with 2 x 2 x 5 = 20 tokens and 8 remain after the merge: s = 0.6 < cap 0.7.
    share = budget_sparsity([12 / 20], 0.3, 28)
    assert pruning_keep(8, 20, 0.3, 28) == round(8 * (1 - share)) == 6
    scores = [0.0] + [0.1 * (i % 4) + 0.01 * i for i in range(8)] + [0.0]
    ctx = prune_context({0: planted(10, {9: scores})}, torch.arange(1, 9), torch.tensor([0, 9]), (2, 2, 5))
    assert framefusion_intra_llm(ctx).tolist() == [1, 2, 3, 5, 6, 7]  # the two lowest (0.0, 0.04) pruned


def test_no_pruning_once_merging_reached_its_cap_or_at_keep_ratio_one():
    # Cap int(0.7 x 20) = 14 merged: FrameFusion ends without pruning (official finish_pruning).
    assert pruning_keep(6, 20, 0.3, 28) == 6
    ctx = prune_context({}, torch.arange(1, 7), torch.tensor([0, 7]), (2, 2, 5))
    assert framefusion_intra_llm(ctx).tolist() == list(range(6)) and ctx._signals.calls == []
    assert pruning_keep(20, 20, 1.0, 28) == 20
    assert pruning_keep(10, 10, 0.01, 28) == 0  # the official "cost is too small": every token pruned


def test_an_image_is_pruned_as_a_one_frame_video():
    scores = [0.0] + [0.2, 0.1, 0.4, 0.3, 0.0, 0.0] + [0.0]
    ctx = prune_context({0: planted(8, {7: scores})}, torch.arange(1, 7), torch.tensor([0, 7]), (1, 2, 3),
                        modality="image")
    assert pruning_keep(6, 6, 0.3, 28) == 2  # round(6 x 0.274): nothing to merge in one frame
    assert framefusion_intra_llm(ctx).tolist() == [2, 3]


# ---------------------------------------------------------------- through the tiny Qwen2.5-VL
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_layer_0_stage_is_the_pre_llm_merge(family):
    """Every video token similar (threshold -1): merging before layer 0 equals merging the pre-LLM features, and the
    pruning before layer 1 then keeps the same count. Qwen3-VL: one span per frame, the second frame merged away."""
    import custom_qwenvl
    from tests.oracle import forward_logits, patched
    from tests.support.tiny_models import build_model
    from tests.test_qwenvl import inputs_for

    model, inputs = build_model(family), inputs_for(family, "image_video")
    common = dict(KEEP_RATIO="0.3", FRAMEFUSION_SIMILARITY_THRESHOLD="-1")
    with patched(custom_qwenvl, PRUNE_METHOD="framefusion_intra_llm", **common):
        intra = forward_logits(model, inputs)
        record = custom_qwenvl.last_record(model)
    with patched(custom_qwenvl, PRUNE_METHOD_PRE_LLM="framefusion_pre_llm",
                 INTRA_LLM_LAYER_SPECS="1:framefusion_intra_llm:0.3", **common):
        pre = forward_logits(model, inputs)
        pre_record = custom_qwenvl.last_record(model)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    n = t * (h // 2) * (w // 2)  # t frames (temporal patches) of (h / 2) x (w / 2) tokens
    video = [s.counts for s in record.spans[0] if s.modality == "video"]
    if family == "qwen3_vl":  # a span per frame: the second frame's tokens all merged into the first's
        assert [c["layer_0"] for c in video] == [n // 2, 0]
        assert sum(c["layer_1"] for c in video) == pruning_keep(n // 2, n, 0.3, 28)
    else:
        assert video == [{"input": n, "layer_0": n // 2, "layer_1": pruning_keep(n // 2, n, 0.3, 28)}]
    assert [s.counts["pre_llm"] for s in pre_record.spans[0]] == [s.counts["layer_0"] for s in record.spans[0]]
    assert [s.current for s in pre_record.spans[0]] == [s.current for s in record.spans[0]]
    torch.testing.assert_close(pre, intra, rtol=1e-4, atol=1e-4)
