"""VScan (``vscan_pre_llm``, ``vscan_intra_llm``): registrations and the layers they read, hand-made inputs whose
answer is known (local picks per window, global picks among the rest, merge weights, exact counts, the intra-LLM rule
on planted attention), and a comparison with loops written the way the official code computes them
(Tencent/SelfEvolvingAgent VScan/qwen/model: ``window_selection``, ``token_merging``, the selection block of
``Qwen2_5_VLForConditionalGeneration_X.forward``) on random grids of realistic size."""

import math

import pytest
import torch

import hooks
import methods
from methods import INTRA_LLM, PRE_LLM, PruneContext, PruneResult, SignalSource, VisionNeeds, VisionSignals
from methods.vscan import (global_scan, local_layer, local_scan, merge_into_nearest, vscan_layers, vscan_select,
                           window_ids)
from utils import PruneConfig, PruneConfigError

REGISTRY = methods.load_methods()
PRE, INTRA = REGISTRY["vscan_pre_llm"], REGISTRY["vscan_intra_llm"]
QWEN25_FULL = (7, 15, 23, 31)  # Qwen2.5-VL-7B's full-attention blocks


def params(**override):
    return {p.env: p.default for p in PRE.params} | override


def context(keep, attention, grid=None, features=None, cls=False, **override):
    """A pre-LLM context for one span with planted encoder signals ({layer: [N]})."""
    n = next(iter(attention.values())).numel()
    features = torch.randn(n, 8, generator=torch.Generator().manual_seed(0)) if features is None else features
    return PruneContext(features=features, keep=keep, grid=grid, modality="image", stage=PRE_LLM,
                        params=params(**override), span_key=0, _vision=VisionSignals(attention, cls=cls))


# ---------------------------------------------------------------- the official computation, as loops
def official_window_selection(scores, count, h, w, window=4):
    """``window_selection``: windows floor(h / 4) x floor(w / 4), leftovers in the last row / column of windows; visit
    tokens by descending score, take one while its window holds fewer than ceil(count / windows)."""
    rows, cols = h // window, w // window
    limit = math.ceil(count / (rows * cols))
    taken, counter = [], {}
    for index in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        x, y = min((index // w) // window, rows - 1), min((index % w) // window, cols - 1)
        if counter.get((x, y), 0) < limit:
            counter[(x, y)] = counter.get((x, y), 0) + 1
            taken.append(index)
        if len(taken) >= count:
            break
    assert len(taken) == count  # the official assertion
    return taken


def official_token_merging(features, kept):
    """``token_merging(scaling=1)``: each dropped token to the kept token (ascending order) of highest cosine
    similarity, kept = (kept + sum of its dropped) / (1 + their count)."""
    kept = sorted(kept)
    retained = features[kept]
    sums = {k: features[k].clone() for k in kept}
    counts = {k: 0 for k in kept}
    for i in range(features.shape[0]):
        if i in sums:
            continue
        sims = torch.nn.functional.cosine_similarity(features[i].unsqueeze(0), retained, dim=1).tolist()
        best = kept[max(range(len(kept)), key=lambda j: (sims[j], -j))]
        sums[best] += features[i]
        counts[best] += 1
    return kept, torch.stack([sums[k] / (1 + counts[k]) for k in kept])


def official_vscan(local_scores, global_scores, features, keep, h, w):
    """The selection block: K // 2 by the windowed local scan, the local picks' global scores zeroed, the other
    K - K // 2 by ``topk`` of the global scores, sorted, then merged."""
    local = official_window_selection(local_scores.tolist(), keep // 2, h, w)
    masked = global_scores.clone()
    masked[local] = 0
    rest = sorted(range(len(masked)), key=lambda i: (-float(masked[i]), i))[:keep - keep // 2]
    return official_token_merging(features, local + rest)


# ---------------------------------------------------------------- registration and layers
def test_registration_defaults_layers_and_schedule():
    assert PRE.stage == PRE_LLM and PRE.exact_count and INTRA.stage == INTRA_LLM and INTRA.exact_count
    assert params() == {"VSCAN_LOCAL_RATIO": 0.5, "VSCAN_WINDOW": 4, "VSCAN_LOCAL_LAYER": "auto"}
    auto = PRE.vision_needs(params())
    assert auto == VisionNeeds(first_layer=0, cls_layers=(0, -2))
    assert hooks.vision_layers(auto, list(QWEN25_FULL), 32) == list(QWEN25_FULL)  # window blocks never read
    assert hooks.cls_vision_layers(auto, 24) == list(range(23))  # CLIP-L: [CLS] rows 0 .. 22 (-2)
    seven = PRE.vision_needs(params(VSCAN_LOCAL_LAYER=7))
    assert seven == VisionNeeds(first_layer=7, cls_layers=(7, -2)) and seven.first_layer_var == "VSCAN_LOCAL_LAYER"
    assert hooks.vision_layers(seven, list(QWEN25_FULL), 32) == list(QWEN25_FULL)
    assert local_layer(" AUTO ") == "auto" and local_layer("7") == 7
    with pytest.raises(PruneConfigError, match=r"VSCAN_LOCAL_LAYER='-1': must be 'auto' or a layer >= 0"):
        PruneConfig.from_env({"KEEP_RATIO": "0.5", "PRUNE_METHOD": "vscan_pre_llm", "VSCAN_LOCAL_LAYER": "-1"})
    with pytest.raises(PruneConfigError, match=r"VSCAN_WINDOW='0': must be >= 1"):
        PruneConfig.from_env({"KEEP_RATIO": "0.5", "PRUNE_METHOD": "vscan_pre_llm", "VSCAN_WINDOW": "0"})
    # The middle of the model: 14 of Qwen2.5-VL-7B's 28 (official layer_list [14]), 16 of LLaVA's 32 ([16]).
    assert INTRA.default_schedule(28, 0.333) == [(14, 0.333)]
    assert INTRA.default_schedule(32, 0.5) == [(16, 0.5)]
    assert INTRA.default_schedule(36, 0.5) == [(18, 0.5)] and INTRA.min_layer == 0


def test_auto_reads_the_official_qwen_blocks_and_the_same_depth_elsewhere():
    rand = lambda: torch.rand(6)
    assert vscan_layers(context(2, {i: rand() for i in QWEN25_FULL})) == (7, 31)  # fullatt_block_indexes[0], last
    assert vscan_layers(context(2, {i: rand() for i in range(23)}, cls=True)) == (5, 22)  # CLIP-L: 24 // 4 - 1, -2
    assert vscan_layers(context(2, {i: rand() for i in range(27)})) == (5, 26)  # Qwen3-VL's 27 layers
    assert vscan_layers(context(2, {i: rand() for i in range(16)})) == (3, 15)  # Gemma 4's 16
    assert vscan_layers(context(2, {9: rand()})) == (9, 9)  # one captured layer serves both scans
    assert vscan_layers(context(2, {i: rand() for i in QWEN25_FULL}, VSCAN_LOCAL_LAYER=9)) == (15, 31)
    with pytest.raises(RuntimeError, match="VSCAN_LOCAL_LAYER=32: no captured encoder layer"):
        vscan_layers(context(2, {i: rand() for i in QWEN25_FULL}, VSCAN_LOCAL_LAYER=32))


def test_the_method_reads_the_local_and_global_layers_and_no_other():
    n, grid = 64, (1, 8, 8)
    rows = {layer: torch.full((n,), 0.01) for layer in QWEN25_FULL}
    for layer in (15, 23):
        rows[layer][[9, 10, 11, 12]] = 0.9  # decoys in the unread blocks
    rows[7][[0, 36]] = torch.tensor([0.5, 0.4])  # local (block 7): windows 0 and 3
    rows[31][[63, 0, 5]] = torch.tensor([0.8, 0.7, 0.6])  # global (block 31): 0 is local already
    result = PRE.fn(context(4, rows, grid))
    assert result.indices.tolist() == [0, 5, 36, 63]


# ---------------------------------------------------------------- windows and the local scan
def test_windows_absorb_leftover_rows_and_columns_and_split_frames():
    ids, count = window_ids(60, (1, 6, 10), 4)  # 1 x 2 windows: rows 4-5 and columns 8-9 join the last ones
    assert count == 2
    grid = ids.view(6, 10)
    assert grid[:, :4].eq(0).all() and grid[:, 4:].eq(1).all()
    ids, count = window_ids(32, (2, 4, 4), 4)  # a video: one window per frame
    assert count == 2 and ids.tolist() == [0] * 16 + [1] * 16
    ids, count = window_ids(6, (1, 2, 3), 4)  # shorter than a window on both axes: one window (official: none)
    assert count == 1 and ids.tolist() == [0] * 6
    for grid in (None, (1, 3, 3)):  # no grid, or not the span's length
        ids, count = window_ids(10, grid, 4)
        assert count == 1 and ids.tolist() == [0] * 10


def test_local_scan_caps_each_window_in_global_order():
    scores = torch.zeros(64)  # 8 x 8 grid, 4 windows of 4 x 4
    scores[[0, 1, 2]] = torch.tensor([0.9, 0.8, 0.7])  # window 0 (rows 0-3, columns 0-3)
    scores[[4, 5]] = torch.tensor([0.6, 0.5])  # window 1
    scores[[32, 36]] = torch.tensor([0.4, 0.3])  # windows 2 and 3
    assert local_scan(scores, 4, (1, 8, 8), 4).tolist() == [0, 4, 32, 36]  # limit 1: one per window
    assert local_scan(scores, 6, (1, 8, 8), 4).tolist() == [0, 1, 4, 5, 32, 36]  # limit 2
    assert local_scan(scores, 3, (1, 8, 8), 4).tolist() == [0, 4, 32]  # limit 1, stops at 3: window 3 gets none
    assert local_scan(scores, 3, None, 4).tolist() == [0, 1, 2]  # one window: plain top-3
    assert local_scan(scores, 0, (1, 8, 8), 4).numel() == 0


def test_local_scan_tops_up_when_the_caps_fall_short():
    scores = torch.rand(44, generator=torch.Generator().manual_seed(1))  # 4 x 11: windows of 16 and 28 tokens
    taken = local_scan(scores, 40, (1, 4, 11), 4)  # limit 20: window 0 supplies 16, window 1 20, then 4 more
    assert taken.numel() == len(set(taken.tolist())) == 40
    window0 = {r * 11 + c for r in range(4) for c in range(4)}
    assert window0 <= set(taken.tolist())
    rest = [i for i in range(44) if i not in window0]
    assert sorted(taken[36:].tolist()) == sorted(sorted(rest, key=lambda i: -float(scores[i]))[20:24])


def test_global_scan_skips_the_local_picks_and_ties_go_low():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.8, 0.0])
    assert global_scan(scores, 3, torch.tensor([0, 4])).tolist() == [2, 3, 1]


def test_budget_split_is_int_of_the_local_share():
    scores = torch.rand(64, generator=torch.Generator().manual_seed(2))
    for keep, ratio, local_count in [(7, 0.5, 3), (8, 0.5, 4), (1, 0.5, 0), (10, 0.0, 0), (10, 1.0, 10), (9, 0.3, 2)]:
        local, chosen = vscan_select(scores, scores.flip(0), keep, ratio, (1, 8, 8), 4)
        assert local.numel() == local_count and local.numel() + chosen.numel() == keep
        assert not set(local.tolist()) & set(chosen.tolist())


# ---------------------------------------------------------------- merging
def test_dropped_tokens_join_their_most_similar_kept_token_with_equal_weights():
    features = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    merged = merge_into_nearest(features, torch.tensor([0, 3]))
    # 1 -> 0; 2 -> 3; 4 is as close to 0 as to 3 (cos 0.707 both): the first kept token
    torch.testing.assert_close(merged, torch.stack([(features[0] + features[1] + features[4]) / 3,
                                                    (features[3] + features[2]) / 2]))
    torch.testing.assert_close(merge_into_nearest(features, torch.arange(5)), features)


def test_the_method_returns_exactly_keep_merged_tokens_in_positional_order():
    gen = torch.Generator().manual_seed(3)
    n, grid = 48, (1, 6, 8)
    features = torch.randn(n, 16, generator=gen).to(torch.bfloat16)
    rows = {7: torch.rand(n, generator=gen), 31: torch.rand(n, generator=gen)}
    for keep in (1, 2, 5, 12, 47):
        result = PRE.fn(context(keep, rows, grid, features))
        assert isinstance(result, PruneResult) and result.features.dtype == torch.bfloat16
        assert result.indices.tolist() == sorted(set(result.indices.tolist())) and result.indices.numel() == keep
        torch.testing.assert_close(result.features, merge_into_nearest(features, result.indices).to(torch.bfloat16))
    everything = PRE.fn(context(n, rows, grid, features))
    assert torch.equal(everything, torch.arange(n))


def test_clip_cls_rows_use_the_shallow_layer_and_layer_minus_two():
    n = 16
    rows = {layer: torch.full((n,), 0.01) for layer in range(23)}
    rows[5][3] = 0.5  # local pick (one window: no grid)
    rows[22][[3, 9]] = torch.tensor([0.6, 0.4])  # global pick: 9 (3 is local already)
    rows[23 - 1 - 1][0] = 0.9  # decoy at layer 21
    assert PRE.fn(context(2, rows, cls=True)).indices.tolist() == [3, 9]


# ---------------------------------------------------------------- the official score reduction ranks alike
def test_official_qwen_score_and_the_substitute_rank_alike():
    """Official: sum over heads, mean over every query, mean over the 2 x 2 merge group. Toolkit substitute: mean over
    heads and the image's queries, summed over the group. A positive factor apart (per image)."""
    gen = torch.Generator().manual_seed(4)
    heads, patches = 3, 64  # an 8 x 8 patch image in merge-group order: 16 LLM tokens
    attention = torch.softmax(torch.randn(heads, patches, patches, generator=gen) * 2, dim=-1)
    official = attention.sum(0).mean(0).view(-1, 4).mean(1)
    substitute = attention.mean(0).mean(0).view(-1, 4).sum(1)
    torch.testing.assert_close(official, substitute * heads / 4)
    assert torch.equal(official.argsort(descending=True), substitute.argsort(descending=True))


# ---------------------------------------------------------------- against the official loops, realistic sizes
@pytest.mark.parametrize("grid, keep", [((1, 24, 24), 96), ((1, 24, 24), 64), ((1, 27, 37), 167), ((1, 34, 46), 261),
                                        ((1, 10, 14), 23)])
def test_matches_the_official_loops(grid, keep):
    _, h, w = grid
    n = h * w
    gen = torch.Generator().manual_seed(n + keep)
    local_scores = torch.softmax(torch.randn(n, generator=gen) * 2, dim=0)
    global_scores = torch.softmax(torch.randn(n, generator=gen) * 3, dim=0)
    features = torch.randn(n, 32, generator=gen) + torch.randn(1, 32, generator=gen)  # realistic: shared offset
    kept, merged = official_vscan(local_scores, global_scores, features, keep, h, w)
    result = PRE.fn(context(keep, {7: local_scores, 31: global_scores}, grid, features))
    assert result.indices.tolist() == kept
    torch.testing.assert_close(result.features, merged, rtol=1e-5, atol=1e-6)
    local = local_scan(local_scores, keep // 2, grid, 4).tolist()
    assert local == official_window_selection(local_scores.tolist(), keep // 2, h, w)


# ---------------------------------------------------------------- intra-LLM
class PlantedAttention(SignalSource):
    """Attention probabilities per layer ([H, L, L]), planted; records what was asked."""

    def __init__(self, probs):
        self.probs, self.calls = probs, []

    def attention(self, query_rows, layer):
        self.calls.append((query_rows.tolist(), layer))
        return self.probs[layer][:, query_rows]


def intra_context(signals, keep, layer=14):
    seq, span = 12, torch.arange(3, 9)  # six visual tokens at 3..8, text at 0..2 and 9..11
    return PruneContext(features=torch.zeros(6, 4), keep=keep, grid=None, modality="image", stage=INTRA_LLM,
                        params={}, span_key=0, hidden_states=torch.zeros(seq, 4), span_positions=span,
                        text_positions=torch.tensor([0, 1, 2, 9, 10, 11]), layer=layer, _signals=signals)


def test_intra_llm_keeps_what_the_last_token_attends_with_the_layer_s_own_qk():
    probs = {layer: torch.full((2, 12, 12), 0.01) for layer in (13, 14)}
    probs[13][:, -1, 3] = 0.9  # the previous layer (FastV's signal) is not read
    probs[14][0, -1, [4, 7, 8]] = torch.tensor([0.6, 0.1, 0.3])
    probs[14][1, -1, [4, 7, 8]] = torch.tensor([0.0, 0.6, 0.3])  # head mean: 4 -> 0.3, 7 -> 0.35, 8 -> 0.3
    probs[14][:, 10, 5] = 0.95  # another query row is not read
    signals = PlantedAttention(probs)
    assert INTRA.fn(intra_context(signals, 3)).tolist() == [1, 4, 5]  # span-local 4, 7, 8
    assert signals.calls == [([11], 14)]
    assert INTRA.fn(intra_context(signals, 2)).tolist() == [1, 4]  # 4 and 8 tie at 0.3: the lower index
    assert INTRA.fn(intra_context(signals, 6)).tolist() == list(range(6))
