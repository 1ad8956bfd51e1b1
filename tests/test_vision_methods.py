"""The vision-signal methods (PruMerge, PruMerge+, VisionZip, VisPruner, VTC-CLS) on hand-made inputs whose
answer is known, and against loops written the way the official code computes them."""

import numpy as np
import pytest
import torch

import methods
from methods import PRE_LLM, PruneContext, PruneResult, VideoFrames, VisionNeeds, VisionSignals
from methods.prumerge import adaptive_count, merge_into_kept, outlier_fraction
from methods.prumerge_plus import official_uniform, uniform_complement
from methods.visionzip import visionzip_merge
from methods.vispruner import vispruner_select

REGISTRY = methods.load_methods()
VISION_METHODS = sorted(name for name, spec in REGISTRY.items() if spec.vision is not None)


def defaults(name, **override):
    return {p.env: p.default for p in REGISTRY[name].params} | override


def context(features, keep, attention, keys=None, params=None, more_layers=None, video=False):
    """A pre-LLM context for one span with planted encoder signals (attention at layer 9 by default); ``video``: as a
    video method sees an image (a video of one frame whose tokens form no grid)."""
    layers = (more_layers or {}) | {9: attention}
    frames = VideoFrames(torch.zeros(features.shape[0], dtype=torch.long), 1, None) if video else None
    return PruneContext(features=features, keep=keep, grid=None, modality="image", stage=PRE_LLM,
                        params=params or {}, span_key=0, _vision=VisionSignals(layers, keys), video=frames,
                        ratio=keep / features.shape[0])


def run(name, ctx):
    result = REGISTRY[name].fn(ctx)
    return result if isinstance(result, PruneResult) else PruneResult(result)


def test_vision_methods_are_registered_with_their_needs():
    assert [n for n in VISION_METHODS if not REGISTRY[n].video] == [
        "fastervlm_pre_llm", "hiprune_pre_llm", "prumerge_plus_pre_llm", "prumerge_pre_llm", "visionzip_pre_llm",
        "vispruner_pre_llm", "vscan_pre_llm", "vtc_cls_pre_llm"]
    assert "holitom_pre_llm" in VISION_METHODS  # a video method reading the encoder's attention
    assert REGISTRY["vtc_cls_pre_llm"].vision_needs({"VTC_CLS_START_LAYER": -3}) == \
        VisionNeeds(first_layer=-3, cls_layers=(-3, -2))
    assert REGISTRY["visionzip_pre_llm"].vision_needs({}) == VisionNeeds(keys=True, cls_layers=(-2, -2))
    assert REGISTRY["vispruner_pre_llm"].vision_needs({}) == VisionNeeds(cls_layers=(-2, -2))


def test_vision_signals_are_refused_to_intra_llm_methods_and_missing_signals_are_explained():
    with pytest.raises(ValueError, match="pre-LLM only"):
        methods.register_prune("nope_intra_llm", default_layer=2, vision=VisionNeeds())(lambda ctx: None)
    ctx = PruneContext(features=torch.zeros(4, 2), keep=2, grid=None, modality="image", stage=PRE_LLM, params={},
                       span_key=0)
    with pytest.raises(RuntimeError, match="vision=VisionNeeds"):
        ctx.vision_attention_received()
    with pytest.raises(RuntimeError, match="keys=True"):
        context(torch.zeros(4, 2), 2, torch.zeros(4)).vision_keys()


@pytest.mark.parametrize("name", VISION_METHODS)
def test_every_vision_method_is_deterministic_and_keeps_its_count(name):
    gen = torch.Generator().manual_seed(0)
    n = 40
    features, keys = torch.randn(n, 16, generator=gen), torch.randn(n, 2, 8, generator=gen)
    attention = torch.softmax(torch.randn(n, generator=gen) * 3, dim=0)
    params = defaults(name, PRUMERGE_ADAPTIVE=False, VTC_CLS_START_LAYER=0)
    video, exact = REGISTRY[name].video, REGISTRY[name].exact_count
    for keep in (1, 2, 7, 39, 40):
        first, again = (run(name, context(features, keep, attention, keys, params, video=video)) for _ in range(2))
        assert torch.equal(first.indices, again.indices)
        assert first.features is None or torch.equal(first.features, again.features)
        assert len(set(first.indices.tolist())) == first.indices.numel(), (name, keep)
        assert first.indices.numel() == keep if exact else 0 < first.indices.numel() <= n, (name, keep)
        assert 0 <= int(first.indices.min()) and int(first.indices.max()) < n
        if keep == n:  # nothing to prune: the tokens pass unchanged
            assert first.features is None and first.indices.tolist() == list(range(n))


# ---------------------------------------------------------------- VTC-CLS
def test_vtc_cls_sums_the_layers_and_keeps_positional_order():
    early = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.0, 0.05, 0.0, 0.0])
    last = torch.tensor([0.0, 0.0, 0.4, 0.0, 0.0, 0.35, 0.0, 0.0])
    features = torch.zeros(8, 2)
    summed = context(features, 2, last, more_layers={3: early})
    assert REGISTRY["vtc_cls_pre_llm"].fn(summed).tolist() == [1, 2]  # 0.5 and 0.4 beat 0.4 (token 5: 0.4)
    assert REGISTRY["vtc_cls_pre_llm"].fn(context(features, 2, last)).tolist() == [2, 5]  # last layer alone
    ties = context(features, 3, torch.full((8,), 0.125))
    assert REGISTRY["vtc_cls_pre_llm"].fn(ties).tolist() == [0, 1, 2]


# ---------------------------------------------------------------- VisPruner
def official_vispruner(attention, features, keep, ratio):
    """VisPruner's encode_images loop, batch of one, as published (for even residual sizes)."""
    feats = (features / features.norm(dim=-1, keepdim=True))[None]
    important_num = int(keep * ratio)
    diverse_num = keep - important_num
    order = attention[None].argsort(dim=-1, descending=True)
    important, residual = order[:, :important_num], order[:, important_num:]
    while True:
        tokens = feats[torch.arange(1), residual]
        r = min(8, tokens.shape[1] - diverse_num)
        if r <= 0:
            break
        a, b = tokens[..., ::2, :], tokens[..., 1::2, :]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct = scores.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat([residual[..., ::2][torch.arange(1), distinct], residual[..., 1::2]], dim=-1)
    return torch.cat([important, residual], dim=-1)[0].sort().values


def test_vispruner_keeps_important_then_the_distinct_residual():
    # 8 tokens ranked by attention 0..7; 3 important (ranks 0-2); residual ranks 3-7, 3 diverse to keep:
    # a = ranks 3, 5, 7 and b = ranks 4, 6; ranks 3 and 7 duplicate b-tokens, rank 5 is distinct.
    attention = torch.linspace(1.0, 0.2, 8)
    directions = torch.eye(4)
    features = torch.stack([directions[0], directions[0], directions[0], directions[1], directions[1],
                            directions[3], directions[2], directions[2]])
    chosen = vispruner_select(attention, features, keep=6, important_ratio=0.5)
    assert chosen.tolist() == [0, 1, 2, 5, 4, 6]  # important, surviving a, then b
    assert REGISTRY["vispruner_pre_llm"].fn(context(features, 6, attention, params=defaults("vispruner_pre_llm"))).tolist() \
        == [0, 1, 2, 4, 5, 6]


@pytest.mark.parametrize("seed", range(4))
def test_vispruner_matches_the_official_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    attention, features = torch.rand(60, generator=gen), torch.randn(60, 12, generator=gen)
    for keep, ratio in [(20, 0.5), (16, 0.75), (30, 0.5)]:  # residual sizes 50, 56, 45 (odd)
        expected = official_vispruner(attention, features, keep, ratio)
        assert vispruner_select(attention, features, keep, ratio).sort().values.tolist() == expected.tolist()


def test_vispruner_matches_the_official_loop_at_realistic_sizes():
    """Hundreds of tokens and many rounds: the similarities computed once and read per round select what the
    official per-round products select."""
    gen = torch.Generator().manual_seed(7)
    attention, features = torch.rand(600, generator=gen), torch.randn(600, 64, generator=gen)
    for keep, ratio in [(150, 0.5), (201, 0.25)]:  # 47 and 42 rounds, even and odd residual sizes
        expected = official_vispruner(attention, features, keep, ratio)
        assert vispruner_select(attention, features, keep, ratio).sort().values.tolist() == expected.tolist()


# ---------------------------------------------------------------- VisionZip
def official_visionzip(attention, keys, features, dominant_num, contextual_num):
    """VisionZip's dominant/contextual step, batch of one, with the one-hot matrix of the official code."""
    dominant = attention.topk(dominant_num).indices.sort().values
    mask = torch.ones(attention.numel(), dtype=torch.bool)
    mask[dominant] = False
    metric = keys[mask] / keys[mask].norm(dim=-1, keepdim=True)
    hidden = features[mask]
    step = max(1, metric.shape[0] // contextual_num)
    target = torch.arange(0, metric.shape[0], step)[:contextual_num]
    others = ~torch.isin(torch.arange(metric.shape[0]), target)
    similarity = metric[others] @ metric[target].T
    one_hot = torch.zeros(int(others.sum()), contextual_num).scatter_(1, similarity.argmax(dim=1, keepdim=True), 1)
    counts = one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
    contextual = hidden[target] + one_hot.T @ hidden[others] / counts
    return torch.cat([features[dominant], contextual])


def test_visionzip_merges_every_leftover_into_its_most_similar_target():
    attention = torch.tensor([0.0, 0.01, 0.3, 0.02, 0.0, 0.2, 0.01, 0.4, 0.0, 0.01])
    keys = torch.zeros(10, 2)
    keys[[0, 1, 3]] = torch.tensor([1.0, 0.0])  # like target 0
    keys[[4, 6, 8, 9]] = torch.tensor([0.0, 1.0])  # like target 4
    features = torch.arange(10.0).unsqueeze(1) * torch.tensor([1.0, 10.0])
    # Dominant: 7, 2, 5. Remaining 0 1 3 4 6 8 9: step 7 // 2 = 3, targets 0 and 4.
    indices, merged = visionzip_merge(attention, keys, features, dominant_num=3, contextual_num=2)
    assert indices.tolist() == [2, 5, 7, 0, 4]
    torch.testing.assert_close(merged[:3], features[[2, 5, 7]])
    torch.testing.assert_close(merged[3], features[0] + features[[1, 3]].mean(dim=0))
    torch.testing.assert_close(merged[4], features[4] + features[[6, 8, 9]].mean(dim=0))
    ctx = context(features, 5, attention, keys.unsqueeze(1), params={"VISIONZIP_DOMINANT_RATIO": 0.6})
    result = REGISTRY["visionzip_pre_llm"].fn(ctx)
    assert result.indices.tolist() == [2, 5, 7, 0, 4]  # the hook puts them in positional order


def test_visionzip_target_without_members_stays_itself():
    attention = torch.tensor([0.9, 0.0, 0.0, 0.0])
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    features = torch.randn(4, 3)
    indices, merged = visionzip_merge(attention, keys, features, dominant_num=1, contextual_num=2)
    assert indices.tolist() == [0, 1, 2]  # remaining 1 2 3, step 1: targets 1 and 2; 3 joins 1
    torch.testing.assert_close(merged[1], features[1] + features[3])
    torch.testing.assert_close(merged[2], features[2])


@pytest.mark.parametrize("seed", range(4))
def test_visionzip_matches_the_official_one_hot_formulation(seed):
    gen = torch.Generator().manual_seed(seed)
    attention, keys, features = torch.rand(50, generator=gen), torch.randn(50, 8, generator=gen), torch.randn(50, 6, generator=gen)
    for dominant_num, contextual_num in [(20, 5), (40, 7), (10, 30)]:
        _, merged = visionzip_merge(attention, keys, features, dominant_num, contextual_num)
        torch.testing.assert_close(merged, official_visionzip(attention, keys, features, dominant_num, contextual_num))


def test_visionzip_split_follows_the_dominant_ratio():
    gen = torch.Generator().manual_seed(1)
    ctx = context(torch.randn(100, 4, generator=gen), 64, torch.rand(100, generator=gen),
                  torch.randn(100, 2, 3, generator=gen), params={"VISIONZIP_DOMINANT_RATIO": 54 / 64})
    result = REGISTRY["visionzip_pre_llm"].fn(ctx)
    unchanged = (result.features == ctx.features[result.indices]).all(dim=1)
    assert int(unchanged.sum()) >= 54 and result.indices.numel() == 64  # 54 dominant + 10 contextual


# ---------------------------------------------------------------- PruMerge / PruMerge+
def official_prumerge_merge(attention, keys, features, kept, neighbours):
    """PruMerge's per-token loop: neighbours among the other kept tokens and the non-kept ones."""
    n = features.shape[0]
    rest_mask = torch.ones(n, dtype=torch.bool)
    rest_mask[kept] = False
    non_topk = torch.nonzero(rest_mask).flatten()
    unit = keys / keys.norm(dim=-1, keepdim=True)
    merged = []
    for i in range(kept.numel()):
        rest = torch.cat([kept[:i], kept[i + 1:], non_topk])
        similarity = unit[kept[i]] @ unit[rest].T
        near = rest[similarity.topk(neighbours).indices]
        merged.append((attention[near].unsqueeze(-1) * features[near]).sum(dim=0) + features[kept[i]])
    extra = (attention[non_topk].unsqueeze(-1) * features[non_topk]).sum(dim=0)
    return torch.stack(merged + [extra])


def test_iqr_outliers_match_numpy_percentiles():
    attention = torch.cat([torch.linspace(0.01, 0.02, 18), torch.tensor([0.5, 0.3])])
    values = attention.numpy()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    assert outlier_fraction(attention) == (values > q3 + 1.5 * (q3 - q1)).mean() == 0.1
    assert adaptive_count(attention) == (2, 0.1)
    assert adaptive_count(torch.full((7,), 1 / 7)) == (1, 1 / 7)  # no outlier: one token still kept


def test_prumerge_adds_attention_weighted_key_neighbours_and_one_extra_token():
    attention = torch.tensor([0.5, 0.1, 0.05, 0.2, 0.15, 0.0])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.1], [1.0, 0.2], [-1.0, 0.0]])
    features = torch.randn(6, 3)
    result = merge_into_kept(attention, keys, features, kept=torch.tensor([0]), neighbours=2)
    assert result.indices.tolist() == [0, 3]  # the extra token sits at the most attended left-out token
    torch.testing.assert_close(result.features[0], features[0] + 0.2 * features[3] + 0.15 * features[4])
    torch.testing.assert_close(result.features[1], (attention[1:, None] * features[1:]).sum(dim=0))


@pytest.mark.parametrize("seed", range(3))
def test_prumerge_merge_matches_the_official_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    attention = torch.softmax(torch.randn(80, generator=gen), dim=0)
    keys, features = torch.randn(80, 16, generator=gen), torch.randn(80, 8, generator=gen)
    kept = torch.randperm(80, generator=gen)[:12]
    result = merge_into_kept(attention, keys, features, kept, neighbours=32)
    torch.testing.assert_close(result.features, official_prumerge_merge(attention, keys, features, kept, 32))


def test_prumerge_counts_adaptive_and_fixed():
    attention = torch.cat([torch.full((18,), 0.02), torch.tensor([0.5, 0.14])])[torch.randperm(20)]
    keys, features = torch.randn(20, 2, 4), torch.randn(20, 5)
    adaptive = run("prumerge_pre_llm", context(features, 3, attention, keys, defaults("prumerge_pre_llm")))
    top_two = set(torch.nonzero(attention > 0.1).flatten().tolist())
    assert adaptive.indices.numel() == 3 and top_two < set(adaptive.indices.tolist())  # 2 outliers + 1 extra
    fixed = run("prumerge_pre_llm", context(features, 5, attention, keys,
                                            defaults("prumerge_pre_llm", PRUMERGE_ADAPTIVE=False)))
    assert fixed.indices.numel() == 5 and top_two < set(fixed.indices.tolist())


def test_prumerge_plus_adds_the_official_uniform_samples():
    # r = 1/12 of 24 tokens: 2 by attention, step int(1/r) = 12, stride 4: 0 4 8 12 16 20 minus those chosen.
    assert official_uniform(torch.tensor([8, 13]), 24, 1 / 12).tolist() == [0, 4, 12, 16, 20]
    assert official_uniform(torch.tensor([]), 6, 0.5).tolist() == [0, 1, 2, 3, 4]  # stride 0 -> 1
    assert uniform_complement(torch.tensor([1, 2]), 10, 4).tolist() == [0, 4, 6, 8]
    attention = torch.full((24,), 0.01)
    attention[[8, 13]] = torch.tensor([0.6, 0.4])  # 2 outliers of 24: int(24 * 2/24) = 2, r = 1/12
    result = run("prumerge_plus_pre_llm", context(torch.randn(24, 3), 1, attention, torch.randn(24, 1, 4),
                                                  defaults("prumerge_plus_pre_llm")))
    # attention rank, uniform samples, then the extra token at the first of the equally attended others
    assert result.indices.tolist() == [8, 13, 0, 4, 12, 16, 20, 1]


def test_prumerge_plus_fixed_count_splits_one_to_three():
    attention = torch.linspace(1.0, 0.0, 30)  # token i is the i-th most attended
    result = run("prumerge_plus_pre_llm", context(torch.randn(30, 3), 9, attention, torch.randn(30, 1, 4),
                                                  defaults("prumerge_plus_pre_llm", PRUMERGE_ADAPTIVE=False)))
    # 8 slots: the 2 most attended, 6 evenly spaced among the other 28 (every 28 * i // 6), then the extra
    # token at the most attended of the rest.
    assert result.indices.tolist() == [0, 1, 2, 6, 11, 16, 20, 25, 3]
