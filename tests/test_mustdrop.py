"""MustDrop (methods/mustdrop.py) on hand-made inputs whose answer is known, and against loops written the way the
official code (liuting20/MustDrop: ``local_merge.conditional_pooling`` / ``merge_wavg``,
``modelling_sparse_llama.dual_attention_filter``) computes."""

import pytest
import torch
import torch.nn.functional as F

from methods import INTRA_LLM, VIT, PruneContext, PruneResult, SignalSource, registered_methods
from methods.mustdrop import local_merge, mustdrop_intra_llm, mustdrop_schedule, mustdrop_vit, window_indices, \
    window_scores

VIT_PARAMS = {"MUSTDROP_MERGE_THRESHOLD": 0.8}


def vit_context(features, grid, *, sizes=None, keep=None, params=None):
    return PruneContext(features=features, keep=keep or features.shape[0], grid=grid, modality="image", stage=VIT,
                        params=params or VIT_PARAMS, span_key=1, layer=1,
                        sizes=torch.ones(features.shape[0]) if sizes is None else sizes)


def fill_window(features, w, row, col, value):
    """Set every patch of window (row, col) (3x3, raster grid of width w) to ``value``."""
    for r in range(3 * row, 3 * row + 3):
        features[r * w + 3 * col:r * w + 3 * col + 3] = value


# ---------------------------------------------------------------- ViT stage: registration and windows
def test_registration():
    vit, intra = registered_methods()["mustdrop_vit"], registered_methods()["mustdrop_intra_llm"]
    assert vit.stage == VIT and vit.default_layer == 1 and not vit.exact_count
    assert intra.stage == INTRA_LLM and intra.min_layer == 1 and not intra.exact_count
    assert intra.default_schedule is mustdrop_schedule and vit.description and intra.description
    assert {p.env: p.default for p in vit.params} == {"MUSTDROP_MERGE_THRESHOLD": 0.8}
    assert {p.env: p.default for p in intra.params} == {"MUSTDROP_GLOBAL_THR": 0.001, "MUSTDROP_INDIVIDUAL_THR": 0.001,
                                                        "MUSTDROP_REINDEX_CACHE": 1}


def test_windows_tile_the_raster_grid_without_overlap_and_leave_the_remainder():
    windows = window_indices((1, 6, 6))
    assert windows.tolist()[0] == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert windows.tolist()[1] == [3, 4, 5, 9, 10, 11, 15, 16, 17]
    assert windows.tolist()[3] == [21, 22, 23, 27, 28, 29, 33, 34, 35]
    assert sorted(windows.flatten().tolist()) == list(range(36))
    ragged = window_indices((1, 4, 7))  # one row of two full windows; row 3 and column 6 are left out
    assert ragged.tolist() == [[0, 1, 2, 7, 8, 9, 14, 15, 16], [3, 4, 5, 10, 11, 12, 17, 18, 19]]
    assert window_indices((2, 3, 3)).tolist() == [list(range(9)), list(range(9, 18))]  # frame by frame
    assert window_indices((1, 2, 8)).numel() == 0


def test_identical_windows_merge_random_ones_do_not():
    torch.manual_seed(0)
    features = torch.randn(36, 16)
    fill_window(features, 6, 0, 0, torch.randn(16))
    fill_window(features, 6, 1, 1, torch.randn(16))
    scores = window_scores(features, window_indices((1, 6, 6)))
    assert scores[0] == pytest.approx(1.0) and scores[3] == pytest.approx(1.0)
    assert abs(scores[1]) < 0.5 and abs(scores[2]) < 0.5
    result = mustdrop_vit(vit_context(features, (1, 6, 6)))
    assert isinstance(result, PruneResult) and not result.proportional_attention
    merged_away = set(window_indices((1, 6, 6))[[0, 3]].flatten().tolist()) - {7, 28}
    assert result.indices.tolist() == [i for i in range(36) if i not in merged_away]  # 36 - 2 x 8 = 20, raster
    assert result.indices.numel() == 20
    by_index = dict(zip(result.indices.tolist(), range(20)))
    assert result.sizes[by_index[7]] == 9 and result.sizes[by_index[28]] == 9  # the centres (1, 1) and (4, 4)
    assert result.sizes.sum() == 36
    torch.testing.assert_close(result.features[by_index[7]], features[0])
    torch.testing.assert_close(result.features[by_index[0 + 3]], features[3])  # an unmerged patch, unchanged


def test_merged_token_is_the_mean_and_the_size_weighted_mean():
    torch.manual_seed(1)
    base = torch.rand(8) + 1.0
    features = torch.randn(9, 8) * 0.01 + base  # one window, nearly parallel patches: merged
    result = mustdrop_vit(vit_context(features, (1, 3, 3)))
    assert result.indices.tolist() == [4] and result.sizes.tolist() == [9.0]
    torch.testing.assert_close(result.features[0], features.mean(dim=0))
    sizes = torch.arange(1.0, 10.0)
    weighted = mustdrop_vit(vit_context(features, (1, 3, 3), sizes=sizes))
    assert weighted.sizes.tolist() == [45.0]
    torch.testing.assert_close(weighted.features[0], (features * sizes[:, None]).sum(dim=0) / 45)


def test_merge_keeps_the_features_dtype():
    features = torch.ones(9, 4, dtype=torch.float16)
    result = mustdrop_vit(vit_context(features, (1, 3, 3)))
    assert result.features.dtype == torch.float16 and result.indices.tolist() == [4]


def test_self_pairs_are_excluded_from_the_window_mean():
    # Eight equal patches and one orthogonal: 56 of the 72 ordered pairs i != j have cosine 1, the 16 others 0:
    # 56 / 72 = 0.778 < 0.8, not merged (with the 9 self-pairs counted it would be 65 / 81 = 0.802, merged).
    features = torch.tensor([[1.0, 0.0]]).repeat(9, 1)
    features[5] = torch.tensor([0.0, 3.0])
    assert window_scores(features, window_indices((1, 3, 3))).item() == pytest.approx(56 / 72)
    assert mustdrop_vit(vit_context(features, (1, 3, 3))).indices.tolist() == list(range(9))
    # The odd patch at cosine 0.5 instead: (56 + 16 x 0.5) / 72 = 0.889 >= 0.8, merged.
    features[5] = torch.tensor([0.5, 0.75 ** 0.5])
    assert window_scores(features, window_indices((1, 3, 3))).item() == pytest.approx(64 / 72)
    assert mustdrop_vit(vit_context(features, (1, 3, 3))).indices.tolist() == [4]


def test_threshold_is_inclusive():
    torch.manual_seed(2)
    features = torch.randn(9, 6) * 0.3 + 1.0
    score = window_scores(features, window_indices((1, 3, 3)))[0]
    above = torch.nextafter(score, torch.tensor(2.0)).item()
    at = mustdrop_vit(vit_context(features, (1, 3, 3), params={"MUSTDROP_MERGE_THRESHOLD": score.item()}))
    over = mustdrop_vit(vit_context(features, (1, 3, 3), params={"MUSTDROP_MERGE_THRESHOLD": above}))
    assert at.indices.tolist() == [4] and over.indices.tolist() == list(range(9))


def test_grid_sides_not_divisible_by_three_merge_only_full_windows():
    features = torch.ones(4 * 5, 3)  # every patch identical: every full window merges
    result = mustdrop_vit(vit_context(features, (1, 4, 5)))
    # One full window (rows 0-2, columns 0-2), centre 1 x 5 + 1 = 6; row 3 and columns 3-4 stay.
    assert result.indices.tolist() == [3, 4, 6, 8, 9, 13, 14, 15, 16, 17, 18, 19]
    assert result.sizes.tolist() == [1, 1, 9, 1, 1, 1, 1, 1, 1, 1, 1, 1]


def test_keep_ratio_is_ignored():
    torch.manual_seed(3)
    features = torch.randn(36, 8)
    fill_window(features, 6, 0, 1, torch.randn(8))
    kept = [mustdrop_vit(vit_context(features, (1, 6, 6), keep=k)).indices.tolist() for k in (1, 18, 36)]
    assert kept[0] == kept[1] == kept[2] and len(kept[0]) == 28


def test_no_grid_or_a_wrong_grid_is_refused():
    with pytest.raises(RuntimeError, match="needs the full patch grid"):
        mustdrop_vit(vit_context(torch.ones(9, 2), None))
    with pytest.raises(ValueError, match=r"grid \(1, 3, 4\) has 12 patches but the span has 9 tokens"):
        mustdrop_vit(vit_context(torch.ones(9, 2), (1, 3, 4)))


# ---------------------------------------------------------------- ViT stage: against the official computation
def official_local_merge(feat, threshold):
    """``conditional_pooling`` + ``merge_wavg`` for a batch of one, written as loops: per-window pairwise
    ``F.cosine_similarity`` with the diagonal masked, sum / (9 x 8), ``torch.ge``; top-r windows by score
    (r = windows at or above the threshold); each merged window summed into its last patch and divided by the
    summed size; output [merged windows by descending score, unmerged patches in raster order]."""
    n, c = feat.shape
    side = int(n ** 0.5)
    windows, scores = [], []
    for gr in range(side // 3):
        for gc in range(side // 3):
            patches = [(3 * gr + i) * side + 3 * gc + j for i in range(3) for j in range(3)]
            sims = torch.zeros(9, 9)
            for a in range(9):
                for b in range(9):
                    sims[a, b] = F.cosine_similarity(feat[patches[a]], feat[patches[b]], dim=0)
            sims = sims * (1 - torch.eye(9))
            windows.append(patches)
            scores.append(sims.sum() / (9 * 8))
    scores = torch.stack(scores)
    r = int(torch.ge(scores, threshold).sum())
    top = scores.topk(r).indices.tolist()
    merged_patches = {p for w in top for p in windows[w]}
    merged = [feat[windows[w]].sum(dim=0) / 9 for w in top]  # x * size summed, / summed size (sizes 1)
    unmerged = [feat[p] for p in range(n) if p not in merged_patches]
    return torch.stack(merged + unmerged), [windows[w] for w in top], torch.tensor([9.0] * r + [1.0] * len(unmerged))


@pytest.mark.parametrize("seed", range(3))
def test_vit_merge_matches_the_official_computation(seed):
    g = torch.Generator().manual_seed(seed)
    windows = window_indices((1, 12, 12))
    features = torch.randn(144, 32, generator=g)
    for w, noise in enumerate(torch.rand(16, generator=g) * 1.5):  # each window: one direction + its own noise
        features[windows[w]] = torch.randn(32, generator=g) + noise * torch.randn(9, 32, generator=g)
    expected, official_windows, official_sizes = official_local_merge(features, 0.8)
    assert 0 < len(official_windows) < 16  # some windows merge, some do not
    result = mustdrop_vit(vit_context(features, (1, 12, 12)))
    position = {int(i): k for k, i in enumerate(result.indices)}
    centres = [w[4] for w in official_windows]
    unmerged = sorted(set(range(144)) - {p for w in official_windows for p in w})
    assert sorted(result.indices.tolist()) == sorted(centres + unmerged)
    in_official_order = torch.tensor([position[i] for i in centres + unmerged])
    torch.testing.assert_close(result.features[in_official_order], expected)
    torch.testing.assert_close(result.sizes[in_official_order], official_sizes)


def test_local_merge_is_equivariant_to_a_common_scale():  # cosine similarity: no dependence on norms
    torch.manual_seed(4)
    features = torch.randn(36, 8)
    fill_window(features, 6, 1, 0, torch.randn(8))
    a, _, _ = local_merge(features, torch.ones(36), (1, 6, 6), 0.8)
    b, _, _ = local_merge(features * 7.5, torch.ones(36), (1, 6, 6), 0.8)
    assert a.tolist() == b.tolist()


# ---------------------------------------------------------------- Intra-LLM: the dual-attention filter
class PlantedAttention(SignalSource):
    """Planted probabilities per layer ([H, L, L]), served in blocks of two rows; records every call."""

    def __init__(self, probs):
        self.probs, self.calls = probs, []

    def attention(self, query_rows, layer):
        return self.probs[layer][:, query_rows]

    def attention_blocks(self, query_rows, layer, block_rows=None):
        self.calls.append((query_rows.tolist(), layer))
        for start in range(0, len(query_rows), 2):
            yield self.probs[layer][:, query_rows[start:start + 2]]


def intra_context(probs, span, text, layer, global_thr, individual_thr, keep=1):
    return PruneContext(features=torch.zeros(len(span), 4), keep=keep, grid=None, modality="image", stage=INTRA_LLM,
                        params={"MUSTDROP_GLOBAL_THR": global_thr, "MUSTDROP_INDIVIDUAL_THR": individual_thr},
                        span_key=0, layer=layer, span_positions=span, text_positions=text,
                        _signals=PlantedAttention(probs))


def test_dual_filter_drops_only_tokens_low_on_both_scores():
    # Text 0 before the span, span at positions 1..5, text 6, 7, 8 after it. Head-mean attention of rows 6-8:
    mean = torch.tensor([[0.50, 0.35, 0.20, 0.01, 0.20],
                         [0.50, 0.00, 0.20, 0.01, 0.00],
                         [0.50, 0.00, 0.20, 0.01, 0.00]])
    # global = [1.5, 0.35, 0.6, 0.03, 0.2], sum 2.68; global_thr 0.2 -> 0.536; individual_thr 0.3.
    # 0: both high, kept. 1: global low, peak 0.35 high, kept. 2: global 0.6 high, peak low, kept.
    # 3: both low, dropped. 4: both low (head mean 0.2; a sum or max over heads would give 0.4), dropped.
    heads = torch.zeros(2, 9, 9)
    heads[0, 6:9, 1:6], heads[1, 6:9, 1:6] = mean, mean
    heads[0, 6, 5], heads[1, 6, 5] = 0.4, 0.0
    heads[0, 0, 1:6] = 0.9  # a row before the span (cannot attend to it): never read
    ctx = intra_context({3: heads, 4: torch.zeros(2, 9, 9)}, torch.arange(1, 6), torch.tensor([0, 6, 7, 8]),
                        layer=4, global_thr=0.2, individual_thr=0.3)
    assert mustdrop_intra_llm(ctx).tolist() == [0, 1, 2]
    assert ctx._signals.calls == [([6, 7, 8], 3)]  # the text after the span, at layer K-1 (the layer just run)


def test_dual_filter_thresholds_are_strict():
    probs = torch.zeros(1, 4, 4)
    probs[0, 3, 1:3] = torch.tensor([0.75, 0.25])  # span at 1, 2; one text row after it; global sum 1.0

    def kept(global_thr, individual_thr):
        return mustdrop_intra_llm(intra_context({1: probs}, torch.tensor([1, 2]), torch.tensor([0, 3]), 2,
                                                global_thr, individual_thr)).tolist()

    assert kept(0.5, 0.5) == [0]  # 0.25 < 0.5 on both: dropped
    assert kept(0.25, 0.5) == [0, 1]  # global 0.25 == 0.25 x 1.0: not below, kept
    assert kept(0.5, 0.25) == [0, 1]  # peak 0.25 == 0.25: not below, kept
    assert kept(1.0, 0.0) == [0, 1]  # the official argparse defaults drop nothing


def test_dual_filter_ignores_keep_ratio_and_keeps_everything_without_text_after_the_span():
    probs = torch.zeros(1, 4, 4)
    probs[0, 3, 1:3] = torch.tensor([0.75, 0.25])
    for keep in (1, 2):
        assert mustdrop_intra_llm(intra_context({1: probs}, torch.tensor([1, 2]), torch.tensor([0, 3]), 2, 0.5, 0.5,
                                                keep=keep)).tolist() == [0]
    alone = intra_context({1: probs}, torch.tensor([1, 2]), torch.tensor([0]), 2, 0.5, 0.5)
    assert mustdrop_intra_llm(alone).tolist() == [0, 1] and alone._signals.calls == []


def official_dual_attention_filter(attn, v_token_start, img_seq, global_thr, individual_thr):
    """``dual_attention_filter`` as published, on a [1, H, L, L] attention tensor."""
    attn = attn[0]
    text_seq = attn.shape[1] - img_seq - v_token_start
    attn = attn.narrow(1, v_token_start + img_seq, text_seq).narrow(2, v_token_start, img_seq).mean(dim=0)
    attn_sum = attn.sum(dim=0)
    candidate = (attn_sum < attn_sum.sum(dim=0) * global_thr) & (attn.max(dim=0)[0] < individual_thr)
    return torch.arange(img_seq)[~candidate]


@pytest.mark.parametrize("seed", range(3))
def test_dual_filter_matches_the_official_function(seed):
    g = torch.Generator().manual_seed(seed)
    start, img, length = 5, 40, 60  # system 0-4, image 5-44, text 45-59
    logits = torch.randn(4, length, length, generator=g) * 3
    logits = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    probs = logits.softmax(dim=-1)
    text = torch.cat([torch.arange(start), torch.arange(start + img, length)])
    for global_thr, individual_thr in ((0.001, 0.001), (0.011, 0.01), (0.02, 0.05)):
        expected = official_dual_attention_filter(probs[None], start, img, global_thr, individual_thr)
        ctx = intra_context({6: probs}, torch.arange(start, start + img), text, 7, global_thr, individual_thr)
        assert mustdrop_intra_llm(ctx).tolist() == expected.tolist()
    assert 0 < len(expected) < img  # the last setting drops some, not all


def test_schedule_is_after_layers_2_6_10_14_of_32_scaled():
    assert mustdrop_schedule(32, 0.5) == [(3, 0.5), (7, 0.5), (11, 0.5), (15, 0.5)]
    assert [layer for layer, _ in mustdrop_schedule(28, 1.0)] == [3, 6, 10, 13]
    assert [layer for layer, _ in mustdrop_schedule(8, 0.3)] == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        mustdrop_schedule(4, 0.5)
