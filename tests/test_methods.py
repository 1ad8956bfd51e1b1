"""Each method against its published algorithm, on hand-made inputs whose answer is known."""

import math

import pytest
import torch

import methods
from methods import PRE_LLM, INTRA_LLM, PruneContext, SignalSource
from methods.divprune import divprune_select
from methods.fastv import fastv_intra_llm

REGISTRY = methods.load_methods()


def context(features, keep, *, stage=PRE_LLM, params=None, span_key=0, signals=None, span_positions=None,
            text_positions=None, layer=None):
    return PruneContext(features=features, keep=keep, grid=None, modality="image", stage=stage,
                        params=params or {}, span_key=span_key, layer=layer, span_positions=span_positions,
                        text_positions=text_positions, _signals=signals)


def test_registry_has_the_first_methods_with_stages():
    for name, stage in [("random_pre_llm", PRE_LLM), ("divprune_pre_llm", PRE_LLM),
                        ("random_intra_llm", INTRA_LLM), ("fastv_intra_llm", INTRA_LLM)]:
        assert REGISTRY[name].stage == stage and REGISTRY[name].description
    assert REGISTRY["fastv_intra_llm"].default_layer == 2


def test_register_rejects_names_without_a_stage_suffix():
    with pytest.raises(ValueError, match="must end with"):
        methods.register_prune("nostage")


# ---------------------------------------------------------------- DivPrune
def official_divprune(features, keep):
    """The official loop as published: min over all chosen rows at every step (O(K^2 N))."""
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    chosen = []
    for i in range(keep):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = distance[torch.tensor(chosen)].min(dim=0).values
        chosen.append(int(torch.argmax(scores)))
    return chosen


def test_divprune_picks_the_obvious_max_min_set():
    # Nine nearly identical vectors around +x, and three distinct directions: -x, +y, -y.
    cluster = torch.tensor([[1.0, 0.01 * i, 0.0] for i in range(9)])
    outliers = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    features = torch.cat([cluster[:4], outliers[:1], cluster[4:], outliers[1:]])  # outliers at 4, 10, 11
    selection = divprune_select(features, 4)
    assert int(selection[0]) == 4  # the most isolated token (-x) seeds the set
    assert sorted(selection.tolist())[-3:] == [4, 10, 11] and len(set(selection.tolist())) == 4
    ctx = context(features, 4)
    kept = REGISTRY["divprune_pre_llm"].fn(ctx)
    assert kept.tolist() == sorted(kept.tolist())


@pytest.mark.parametrize("seed", range(5))
def test_divprune_matches_the_official_quadratic_loop(seed):
    features = torch.randn(60, 16, generator=torch.Generator().manual_seed(seed))
    assert divprune_select(features, 20).tolist() == official_divprune(features, 20)


def test_divprune_ties_go_to_the_lowest_index():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert divprune_select(features, 2).tolist() == official_divprune(features, 2)


def test_divprune_never_repeats_a_token_when_the_span_has_duplicates():
    # Three distinct tokens repeated (a flat image region): keeping more than three must still give distinct
    # indices; the float distance of a token to itself (~6e-8) must not make it win again.
    base = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    features = torch.cat([base[0:1].repeat(10, 1), base[1:2].repeat(10, 1), base[2:3].repeat(4, 1)])
    selection = divprune_select(features, 12).tolist()
    assert len(set(selection)) == 12
    assert {0, 10, 20} <= set(selection[:3])  # one of each distinct token first


# ---------------------------------------------------------------- FastV
class PlantedAttention(SignalSource):
    def __init__(self, probs):
        self.probs, self.calls = probs, []

    def attention(self, query_rows, layer):
        self.calls.append((query_rows.tolist(), layer))
        return self.probs[:, query_rows]


def test_fastv_keeps_the_planted_attention_peaks_in_order():
    seq, heads = 12, 2
    probs = torch.full((heads, seq, seq), 0.01)
    span = torch.arange(3, 9)  # six visual tokens at positions 3..8
    probs[0, -1, 7] = 0.9
    probs[1, -1, 4] = 0.5
    probs[0, -1, 5] = 0.2
    signals = PlantedAttention(probs)
    ctx = context(torch.zeros(6, 4), 2, stage=INTRA_LLM, signals=signals, span_positions=span,
                  text_positions=torch.tensor([0, 1, 2, 9, 10, 11]), layer=2)
    assert fastv_intra_llm(ctx).tolist() == [1, 4]  # positions 4 and 7, in order
    assert signals.calls == [([11], 1)]  # the last prompt token, at layer K-1


def test_fastv_ties_go_to_the_lower_index():
    probs = torch.full((1, 6, 6), 0.1)
    ctx = context(torch.zeros(4, 2), 2, stage=INTRA_LLM, signals=PlantedAttention(probs),
                  span_positions=torch.arange(1, 5), text_positions=torch.tensor([0, 5]), layer=3)
    assert fastv_intra_llm(ctx).tolist() == [0, 1]


# ---------------------------------------------------------------- Random
@pytest.mark.parametrize("name", ["random_pre_llm", "random_intra_llm"])
def test_random_is_reproducible_sorted_exact_and_seed_dependent(name):
    fn = REGISTRY[name].fn
    features = torch.randn(40, 8)
    picks = [fn(context(features, 10, params={"PRUNE_RANDOM_SEED": seed})).tolist() for seed in (0, 0, 1)]
    assert picks[0] == picks[1] and picks[0] != picks[2]
    assert picks[0] == sorted(picks[0]) and len(set(picks[0])) == 10
    other_span = fn(context(features, 10, params={"PRUNE_RANDOM_SEED": 0}, span_key=1)).tolist()
    assert other_span != picks[0]


def test_every_registered_method_keeps_the_asked_count_on_plain_features():
    features = torch.randn(30, 8)
    for name, spec in REGISTRY.items():
        if spec.stage != PRE_LLM:
            continue
        params = {p.env: p.default for p in spec.params}
        for keep in (1, 7, 30):
            kept = spec.fn(context(features, keep, params=params))
            assert len(set(kept.tolist())) == keep, name
