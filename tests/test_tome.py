"""ToMe (tome_vit, tome_pre_llm) on hand-made inputs whose answer is known, and against a loop written the way the
official code (facebookresearch/ToMe, tome/merge.py) computes one bipartite soft matching and merge_wavg."""

import math

import pytest
import torch

import methods
from methods import PRE_LLM, VIT, EncoderSignals, PruneContext, PruneResult
from methods.tome import bipartite_matching, tome_merge

REGISTRY = methods.load_methods()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def vit_context(features, keep, keys, sizes=None, cls=False, prop_attn=True):
    """A ViT-stage context before block 5 with planted keys [N, H, d] (and a [CLS] row when ``cls``)."""
    n = features.shape[0]
    encoder = EncoderSignals(keys, torch.full((n,), 1.0 / (n + 1)) if cls else None)
    return PruneContext(features=features, keep=keep, grid=None, modality="image", stage=VIT,
                        params={"TOME_PROP_ATTN": prop_attn}, span_key=0, layer=5,
                        sizes=torch.ones(n) if sizes is None else sizes, _encoder=encoder)


def pre_llm_context(features, keep):
    return PruneContext(features=features, keep=keep, grid=None, modality="image", stage=PRE_LLM, params={},
                        span_key=0)


def basis(i, dim=8):
    return torch.eye(dim)[i]


def test_both_methods_are_registered_with_their_stage():
    listed = methods.registered_methods()
    assert listed["tome_vit"].stage == VIT and listed["tome_pre_llm"].stage == PRE_LLM
    assert listed["tome_vit"].default_layer is None and listed["tome_pre_llm"].default_layer is None
    # Official: r tokens in every block. Named alone: a stage before every block up to the feature block, the kept
    # share falling linearly to KEEP_RATIO (about (N - K) / F merges per block).
    schedule = listed["tome_vit"].default_schedule(22, 0.5)
    assert [block for block, _ in schedule] == list(range(1, 23))
    assert schedule[-1][1] == 0.5 and schedule[0][1] == 1 - 0.5 / 22
    merges = [round(576 * (a - b)) for (_, a), (_, b) in zip([(0, 1.0)] + schedule, schedule)]
    assert max(merges) - min(merges) <= 1  # a constant r (up to rounding)
    assert [(p.env, p.default) for p in listed["tome_vit"].params] == [("TOME_PROP_ATTN", True)]
    assert listed["tome_vit"].description and listed["tome_pre_llm"].description
    assert listed["tome_vit"].exact_count and listed["tome_pre_llm"].exact_count


# ---------------------------------------------------------------- Hand-made answers
def test_pairwise_duplicates_merge_into_the_b_token_with_size_weighted_means():
    # keys: tokens 2i and 2i+1 identical (direction i); features all different; sizes uneven
    keys = torch.stack([basis(i // 2) for i in range(8)]).unsqueeze(1)  # [8, 1, 8]
    features = torch.arange(8 * 3, dtype=torch.float32).view(8, 3) ** 1.5
    sizes = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 1.0, 1.0, 4.0])
    result = REGISTRY["tome_vit"].fn(vit_context(features, 4, keys, sizes))
    assert result.indices.tolist() == [1, 3, 5, 7]  # the B (odd) tokens represent the merged pairs
    assert result.sizes.tolist() == [4.0, 4.0, 6.0, 5.0]
    for k, (a, b) in enumerate([(0, 1), (2, 3), (4, 5), (6, 7)]):
        mean = (features[a] * sizes[a] + features[b] * sizes[b]) / (sizes[a] + sizes[b])
        torch.testing.assert_close(result.features[k], mean)
    assert result.proportional_attention is True


def test_only_the_r_best_edges_merge_and_the_rest_of_a_stays():
    # pair (2i, 2i+1) has cosine cos_i, pairs are mutually orthogonal: the two most similar pairs merge
    cosines = [0.7, 0.95, 0.8, 0.99]
    rows = []
    for i, c in enumerate(cosines):
        rows += [basis(2 * i), c * basis(2 * i) + math.sqrt(1 - c * c) * basis(2 * i + 1)]
    keys = torch.stack(rows).unsqueeze(1)
    features = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    result = REGISTRY["tome_vit"].fn(vit_context(features, 6, keys))
    assert result.indices.tolist() == [0, 1, 3, 4, 5, 7]  # A tokens 2 and 6 went into 3 and 7
    assert result.sizes.tolist() == [1, 1, 2, 1, 1, 2]
    torch.testing.assert_close(result.features[2], (features[2] + features[3]) / 2)
    torch.testing.assert_close(result.features[[0, 1, 3, 4]], features[[0, 1, 4, 5]])


def test_several_a_tokens_can_go_into_one_b_token():
    keys = torch.stack([basis(0), basis(0), basis(0), basis(1), basis(0), basis(2)]).unsqueeze(1)
    features = torch.tensor([[1.0], [2.0], [4.0], [8.0], [16.0], [32.0]])
    result = REGISTRY["tome_vit"].fn(vit_context(features, 3, keys))
    assert result.indices.tolist() == [1, 3, 5]  # A tokens 0, 2, 4 all into B token 1
    assert result.sizes.tolist() == [4, 1, 1]
    torch.testing.assert_close(result.features[:, 0], torch.tensor([(1 + 2 + 4 + 16) / 4, 8.0, 32.0]))


def test_the_metric_is_the_keys_averaged_over_heads():
    # tokens 0 and 1: the heads swapped, so the head mean is identical but the concatenation is not
    a, b, c = basis(0, 4), basis(1, 4), basis(2, 4)
    keys = torch.stack([torch.stack([a, b]), torch.stack([b, a]), torch.stack([c, c]), torch.stack([a, c])])
    features = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    result = REGISTRY["tome_vit"].fn(vit_context(features, 3, keys))
    assert result.indices.tolist() == [1, 2, 3]  # cosine 1 for (0, 1) by the mean; (2, 3) is lower
    torch.testing.assert_close(result.features[0], (features[0] + features[1]) / 2)


def test_ties_go_to_the_first_b_token_and_the_earlier_a_tokens():
    metric = torch.ones(6, 4)  # every score equal
    src, dst = bipartite_matching(metric, 2)
    assert src.tolist() == [0, 2] and dst.tolist() == [1, 1]
    indices, _, sizes = tome_merge(metric, torch.randn(6, 2), None, 4)
    assert indices.tolist() == [1, 3, 4, 5] and sizes.tolist() == [3, 1, 1, 1]
    # with a [CLS] in front the patches at odd positions are set A, those at even positions set B
    src, dst = bipartite_matching(metric, 2, class_token=True)
    assert src.tolist() == [1, 3] and dst.tolist() == [0, 0]


def test_an_encoder_with_a_cls_splits_the_patches_as_the_official_code_does():
    # officially the [CLS] is position 0 (set A, never merged), so patch 0 is in B: A = odd patches, B = even
    keys = torch.stack([basis(i // 2) for i in range(8)]).unsqueeze(1)
    keys = torch.roll(keys, 1, dims=0)  # identical pairs: (1, 2), (3, 4), (5, 6), (7, 0)
    features = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    with_cls = REGISTRY["tome_vit"].fn(vit_context(features, 4, keys, cls=True))
    assert with_cls.indices.tolist() == [0, 2, 4, 6] and with_cls.sizes.tolist() == [2, 2, 2, 2]
    torch.testing.assert_close(with_cls.features[0], (features[0] + features[7]) / 2)
    torch.testing.assert_close(with_cls.features[1], (features[1] + features[2]) / 2)
    without = REGISTRY["tome_vit"].fn(vit_context(features, 4, keys, cls=False))
    assert without.indices.tolist() == [1, 3, 5, 7] and without.sizes.tolist() == [2, 2, 2, 2]
    torch.testing.assert_close(without.features[0], (features[1] + features[2]) / 2)
    torch.testing.assert_close(without.features[2], (features[5] + features[6]) / 2)
    torch.testing.assert_close(without.features[3], (features[0] + features[7]) / 2)


def test_rounds_reach_keep_below_half():
    # keys: {0,1,2,3} along u, {4,5,6,7} along v. Round 1 (r = 4): A 0, 2 -> B 1 (tie: first B); A 4, 6 -> B 5.
    # Round 2 on [1, 3, 5, 7] (r = 2): 1 -> 3, 5 -> 7.
    keys = torch.stack([basis(0)] * 4 + [basis(1)] * 4).unsqueeze(1)
    features = torch.arange(16, dtype=torch.float32).view(8, 2)
    sizes = torch.tensor([1.0, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0])
    result = REGISTRY["tome_vit"].fn(vit_context(features, 2, keys, sizes))
    assert result.indices.tolist() == [3, 7] and result.sizes.tolist() == [5.0, 6.0]
    expected = torch.stack([(features[:4] * sizes[:4, None]).sum(0) / 5, (features[4:] * sizes[4:, None]).sum(0) / 6])
    torch.testing.assert_close(result.features, expected)
    one = REGISTRY["tome_vit"].fn(vit_context(features, 1, keys, sizes))  # rounds until a single token
    assert one.indices.tolist() == [7] and one.sizes.tolist() == [11.0]
    torch.testing.assert_close(one.features[0], (features * sizes[:, None]).sum(0) / 11)


def test_vit_switches_and_keeps_everything_when_asked_to():
    keys = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(3))
    features = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    assert REGISTRY["tome_vit"].fn(vit_context(features, 3, keys, prop_attn=False)).proportional_attention is False
    same = REGISTRY["tome_vit"].fn(vit_context(features, 6, keys))
    assert same.indices.tolist() == list(range(6)) and same.features is None and same.proportional_attention
    no_encoder = vit_context(features, 3, keys)
    no_encoder._encoder = None
    with pytest.raises(RuntimeError, match="ViT-stage methods"):
        REGISTRY["tome_vit"].fn(no_encoder)


def test_pre_llm_merges_the_projected_tokens_with_sizes_from_one():
    features = torch.stack([basis(i // 2, 4) * (i + 1) for i in range(8)]).to(torch.bfloat16)
    result = REGISTRY["tome_pre_llm"].fn(pre_llm_context(features, 4))
    assert isinstance(result, PruneResult) and result.sizes is None and result.proportional_attention is False
    assert result.indices.tolist() == [1, 3, 5, 7] and result.features.dtype == torch.bfloat16
    expected = torch.stack([(features[2 * k].float() + features[2 * k + 1].float()) / 2 for k in range(4)])
    torch.testing.assert_close(result.features.float(), expected.bfloat16().float())
    assert REGISTRY["tome_pre_llm"].fn(pre_llm_context(features, 8)).tolist() == list(range(8))


# ---------------------------------------------------------------- Against the official computation
def official_round(metric, x, size, pos, r, class_token):
    """One ToMe block's merge as tome/merge.py computes it, on [1, t, c] tensors (a [CLS] first when
    ``class_token``); ``pos`` [1, t, 1] carries each token's original index through the same merge."""
    t = metric.shape[1]
    r = min(r, (t - int(class_token)) // 2)
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[..., ::2, :], m[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(v, mode):
        src, dst = v[..., ::2, :], v[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        if mode is not None:  # None: the destinations keep their own values (their original index)
            dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    new_size = merge(size, "sum")
    new_x = merge(x * size, "sum") / new_size
    new_metric = merge(metric * size, "sum") / new_size
    return new_metric, new_x, new_size, merge(pos, None)


def official_loop(metric, features, keep, class_token):
    """The official round repeated until ``keep`` patches remain, tokens put back in original order between rounds
    (our adaptation); a random [CLS] is prepended when ``class_token`` and dropped at the end."""
    n = features.shape[0]
    metric, x = metric[None].clone(), features[None].clone()
    size, pos = torch.ones(1, n, 1), torch.arange(n, dtype=torch.float32).view(1, n, 1)
    if class_token:
        cls = torch.randn(1, 1, metric.shape[-1], generator=torch.Generator().manual_seed(99))
        metric = torch.cat([cls, metric], 1)
        x, size = torch.cat([torch.zeros(1, 1, x.shape[-1]), x], 1), torch.cat([torch.ones(1, 1, 1), size], 1)
        pos = torch.cat([torch.full((1, 1, 1), -1.0), pos], 1)
    while x.shape[1] - int(class_token) > keep:
        metric, x, size, pos = official_round(metric, x, size, pos, x.shape[1] - int(class_token) - keep,
                                              class_token)
        order = pos[0, :, 0].argsort()
        metric, x, size, pos = metric[:, order], x[:, order], size[:, order], pos[:, order]
    if class_token:
        assert pos[0, 0, 0] == -1  # the [CLS] is never merged
        metric, x, size, pos = metric[:, 1:], x[:, 1:], size[:, 1:], pos[:, 1:]
    return pos[0, :, 0].long(), x[0], size[0, :, 0]


@pytest.mark.parametrize("keep", [500, 288, 100, 7])
@pytest.mark.parametrize("class_token", [False, True])
def test_matches_the_official_computation_at_realistic_sizes(keep, class_token):
    gen = torch.Generator().manual_seed(keep + 1000 * class_token)
    n, c = 576, 64
    # correlated neighbours, as in an image: a random walk plus noise
    metric = torch.randn(n, c, generator=gen).cumsum(0) * 0.1 + torch.randn(n, c, generator=gen)
    features = torch.randn(n, c, generator=gen)
    indices, merged, sizes = tome_merge(metric, features, None, keep, class_token)
    ref_pos, ref_x, ref_size = official_loop(metric, features, keep, class_token)
    assert indices.tolist() == ref_pos.tolist()
    assert torch.equal(sizes, ref_size)
    torch.testing.assert_close(merged, ref_x, rtol=1e-5, atol=1e-5)
    assert indices.numel() == keep and sizes.sum() == n


def test_vit_method_matches_the_official_computation_through_the_context():
    gen = torch.Generator().manual_seed(5)
    n, heads, d = 576, 4, 16
    keys = torch.randn(n, heads, d, generator=gen).cumsum(0) * 0.1 + torch.randn(n, heads, d, generator=gen)
    features = torch.randn(n, 64, generator=gen)
    result = REGISTRY["tome_vit"].fn(vit_context(features, 150, keys, cls=True))
    ref_pos, ref_x, ref_size = official_loop(keys.mean(1), features, 150, True)
    assert result.indices.tolist() == ref_pos.tolist() and torch.equal(result.sizes, ref_size)
    torch.testing.assert_close(result.features, ref_x, rtol=1e-5, atol=1e-5)
