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
    hidden = torch.randn(40, 8)  # 3 text tokens, a 30-token span, 7 text tokens
    features, span = hidden[3:33], torch.arange(3, 33)
    text = torch.cat([torch.arange(3), torch.arange(33, 40)])
    for name, spec in REGISTRY.items():
        if spec.stage != PRE_LLM:
            continue
        params = {p.env: p.default for p in spec.params}
        for keep in (1, 7, 30):
            ctx = PruneContext(features=features, keep=keep, grid=None, modality="image", stage=PRE_LLM,
                               params=params, span_key=0, hidden_states=hidden, span_positions=span,
                               text_positions=text)
            result = spec.fn(ctx)
            kept = result.indices if isinstance(result, methods.PruneResult) else result
            assert len(set(kept.tolist())) == len(kept) and 0 < len(kept) <= 30, name
            if spec.exact_count:
                assert len(kept) == keep, name


# ---------------------------------------------------------------- Uniform
def test_uniform_takes_the_centre_of_equal_slices():
    fn = REGISTRY["uniform_pre_llm"].fn
    assert fn(context(torch.zeros(10, 2), 4)).tolist() == [1, 3, 6, 8]  # floor((2i+1) * 10 / 8)
    assert fn(context(torch.zeros(9, 2), 3)).tolist() == [1, 4, 7]
    assert fn(context(torch.zeros(7, 2), 7)).tolist() == list(range(7))
    for n in range(1, 40):
        for keep in range(1, n + 1):
            kept = fn(context(torch.zeros(n, 1), keep)).tolist()
            assert kept == sorted(set(kept)) and len(kept) == keep and kept[-1] < n


# ---------------------------------------------------------------- Pooling
def pool_context(features, keep, grid, mode="avg"):
    ctx = context(features, keep, params={"POOL_MODE": mode})
    ctx.grid = grid
    return ctx


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pool_pools_2x2_cells_of_the_real_grid(mode):
    h, w = 4, 6
    grid_values = torch.arange(h * w, dtype=torch.float32)
    features = torch.stack([grid_values, -grid_values], dim=1)  # token (r, c) carries (6r + c, -(6r + c))
    result = REGISTRY["pool_pre_llm"].fn(pool_context(features, 6, (1, h, w), mode))  # sqrt(6/24) = 1/2
    assert result.indices.tolist() == [0, 2, 4, 12, 14, 16]  # centre token of each 2x2 cell
    cells = torch.tensor([[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11], [12, 13, 18, 19], [14, 15, 20, 21],
                          [16, 17, 22, 23]], dtype=torch.float32)
    reduce = (lambda x: x.mean(dim=1)) if mode == "avg" else (lambda x: x.amax(dim=1))
    expected = torch.stack([reduce(cells), reduce(-cells)], dim=1)
    torch.testing.assert_close(result.features, expected)


def test_pool_keeps_the_aspect_ratio_pools_frames_separately_and_matches_adaptive_pooling():
    t, h, w = 2, 3, 5
    features = torch.randn(t * h * w, 4, generator=torch.Generator().manual_seed(0))
    result = REGISTRY["pool_pre_llm"].fn(pool_context(features, 8, (t, h, w)))  # sqrt(8/30): 3x5 -> 2x3 per frame
    assert len(result.indices) == t * 2 * 3 and not REGISTRY["pool_pre_llm"].exact_count
    frames = features.view(t, h, w, 4).permute(0, 3, 1, 2)
    expected = torch.nn.functional.adaptive_avg_pool2d(frames, (2, 3)).permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(result.features, expected)
    # Bins of 3 rows into 2: rows 0-1 and 1-2 (centres 0, 1); 5 columns into 3: 0-1, 1-3, 3-4 (centres 0, 2, 3).
    first_frame = [0, 2, 3, 5, 7, 8]
    assert result.indices.tolist() == first_frame + [15 + i for i in first_frame]


def test_pool_keeps_everything_at_full_ratio_and_pools_the_raster_without_a_grid():
    features = torch.randn(12, 3)
    assert REGISTRY["pool_pre_llm"].fn(pool_context(features, 12, (1, 3, 4))).tolist() == list(range(12))
    result = REGISTRY["pool_pre_llm"].fn(pool_context(features, 5, None))
    assert len(result.indices) == 5  # exactly K adaptive bins of the raster order
    torch.testing.assert_close(result.features[0], features[0:3].mean(dim=0))  # bin 0 = tokens 0..2


# ---------------------------------------------------------------- FPS and DivPrune-hybrid
def vtbench_greedy(features, keep, alpha=None):
    """Literal rendering of radosc/vtbench's fps.py (alpha None) and divprune_hybrid.py loops."""
    unit = torch.nn.functional.normalize(features, dim=1)
    sim = unit @ unit.T
    norms = features.norm(dim=1)
    if alpha is None:
        selected = [norms.argmax().item()]
    else:
        importance = (norms - norms.min()) / (norms.max() - norms.min())
        selected = [importance.argmax().item()]
    mask = torch.zeros(len(features), dtype=torch.bool)
    mask[selected[0]] = True
    min_dist = (1.0 - sim[selected[0]]).clone()
    for _ in range(keep - 1):
        if alpha is None:
            min_dist[mask] = -1.0
            nxt = min_dist.argmax().item()
        else:
            d_max = min_dist.max()
            score = alpha * importance + (1.0 - alpha) * (min_dist / d_max if d_max > 0 else min_dist)
            score[mask] = -1.0
            nxt = score.argmax().item()
        selected.append(nxt)
        mask[nxt] = True
        min_dist = torch.min(min_dist, 1.0 - sim[nxt])
    return selected


def test_fps_seeds_at_the_largest_norm_then_goes_farthest():
    from methods.fps import fps_select

    # +x with norm 3 seeds; -x is farthest (distance 2); then +y / -y (distance 1 from both) in index order.
    features = torch.tensor([[0.0, 1.0], [1.0, 0.1], [3.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])
    assert fps_select(features, 3).tolist() == [2, 4, 0]
    assert REGISTRY["fps_pre_llm"].fn(context(features, 3)).tolist() == [0, 2, 4]


@pytest.mark.parametrize("seed", range(3))
def test_fps_and_divprune_hybrid_match_the_vtbench_loops(seed):
    from methods.divprune_hybrid import divprune_hybrid_select
    from methods.fps import fps_select

    features = torch.randn(50, 12, generator=torch.Generator().manual_seed(seed))
    assert fps_select(features, 20).tolist() == vtbench_greedy(features, 20)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        assert divprune_hybrid_select(features, 20, alpha).tolist() == vtbench_greedy(features, 20, alpha)
    # alpha = 0 is FPS; alpha = 1 is top-K by norm in norm order.
    assert divprune_hybrid_select(features, 20, 0.0).tolist() == fps_select(features, 20).tolist()
    assert divprune_hybrid_select(features, 20, 1.0).tolist() == features.norm(dim=1).topk(20).indices.tolist()


def test_divprune_hybrid_trades_diversity_for_norm():
    from methods.divprune_hybrid import divprune_hybrid_select

    # Seed: the norm-4 token along +x. Token 1 is a slightly weaker near-duplicate (importance 0.97, tiny
    # diversity); token 2 is the weakest but opposite (importance 0, diversity 1).
    features = torch.tensor([[4.0, 0.0], [3.9, 0.1], [-1.0, 0.0]])
    assert divprune_hybrid_select(features, 2, 0.5).tolist() == [0, 2]
    assert divprune_hybrid_select(features, 2, 0.9).tolist() == [0, 1]


# ---------------------------------------------------------------- G-Prune
def official_gprune_scores(features, threshold=0.5, temperature=0.03, iterations=5):
    """Literal rendering of the official block (matrix power, then w @ A^n / degree)."""
    unit = torch.nn.functional.normalize(features, p=2, dim=1)
    a = unit @ unit.t()
    a[a < threshold] = 0
    a = a / temperature
    a[abs(a) < 1e-6] = -5000
    a = torch.nn.functional.softmax(a, dim=1)
    degree = torch.sum(a > 0, dim=1)
    a = torch.matrix_power(a, iterations)
    w = torch.norm(features, dim=-1).view(1, -1)
    return ((w @ a) / degree).flatten()


def clustered(n_clusters, per_cluster, dim, seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g)
    points = centres.repeat_interleave(per_cluster, 0) + spread * torch.randn(n_clusters * per_cluster, dim, generator=g)
    return points[torch.randperm(len(points), generator=g)]


def test_gprune_on_a_hand_made_graph():
    from methods.gprune import gprune_scores, transition_and_degree

    # Three identical unit tokens (a clique: every row of P is 1/3 on the clique) and one orthogonal token of
    # norm 0.5 (alone: P row = itself). Flow into a clique token: (1 + 1 + 1) / 3 per step, / degree 3 = 1/3;
    # into the loner: 0.5 / degree 1 = 0.5. So K = 1 keeps the loner, K = 2 adds the first clique token.
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.5], [1.0, 0.0]])
    transition, degree = transition_and_degree(features, 0.5, 0.03)
    assert degree.tolist() == [3, 3, 1, 3]
    torch.testing.assert_close(transition, torch.tensor([[1 / 3, 1 / 3, 0, 1 / 3]] * 2 + [[0, 0, 1.0, 0]] + [[1 / 3, 1 / 3, 0, 1 / 3]]))
    torch.testing.assert_close(gprune_scores(features, 0.5, 0.03, 5), torch.tensor([1 / 3, 1 / 3, 0.5, 1 / 3]))
    fn = REGISTRY["gprune_pre_llm"].fn
    params = {"GPRUNE_THRESHOLD": 0.5, "GPRUNE_TEMPERATURE": 0.03, "GPRUNE_ITERATIONS": 5}
    assert fn(context(features, 1, params=params)).tolist() == [2]
    assert fn(context(features, 2, params=params)).tolist() == [0, 2]


@pytest.mark.parametrize("seed", range(3))
def test_gprune_equals_the_official_matrix_power(seed):
    from methods.gprune import gprune_scores, transition_and_degree

    features = clustered(4, 8, 16, seed)
    _, degree = transition_and_degree(features, 0.5, 0.03)
    assert 1 < degree.float().mean() < len(features)  # a real graph: neither empty nor complete
    ours, official = gprune_scores(features, 0.5, 0.03, 5), official_gprune_scores(features.clone())
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-7)
    params = {"GPRUNE_THRESHOLD": 0.5, "GPRUNE_TEMPERATURE": 0.03, "GPRUNE_ITERATIONS": 5}
    kept = REGISTRY["gprune_pre_llm"].fn(context(features, 10, params=params))
    assert kept.tolist() == sorted(official.topk(10).indices.tolist())


# ---------------------------------------------------------------- CDPruner
def official_dpp(kernel, keep):
    """Literal rendering of CDPruner's greedy loop (batch of one)."""
    n = kernel.shape[0]
    cis = torch.zeros(keep, n)
    di2s = torch.diagonal(kernel).clone()
    select = []
    for i in range(keep):
        j = int(torch.argmax(di2s))
        select.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= torch.square(eis)
        di2s[j] = -float("inf")
    return select


def brute_force_greedy_map(kernel, keep):
    """Greedy MAP by definition: each step adds the item that maximises det(L_S)."""
    chosen = []
    for _ in range(keep):
        best, best_det = None, -1.0
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            idx = torch.tensor(chosen + [j])
            det = float(torch.det(kernel[idx][:, idx].double()))
            if det > best_det + 1e-12:
                best, best_det = j, det
        chosen.append(best)
    return chosen


def cdpruner_context(features, keep, instruction, sign=-1):
    hidden = torch.cat([features, instruction])
    n = len(features)
    return PruneContext(features=features, keep=keep, grid=None, modality="image", stage=PRE_LLM,
                        params={"CDPRUNER_RELEVANCE_SIGN": sign}, span_key=0, hidden_states=hidden,
                        span_positions=torch.arange(n), text_positions=torch.arange(n, len(hidden)))


@pytest.mark.parametrize("seed", range(3))
def test_cdpruner_greedy_map_matches_the_official_loop_and_the_determinant_definition(seed):
    from methods.cdpruner import dpp_greedy_map

    x = torch.randn(12, 20, generator=torch.Generator().manual_seed(seed))
    unit = torch.nn.functional.normalize(x, dim=1)
    rel = torch.rand(12, generator=torch.Generator().manual_seed(seed + 10)) + 0.1
    kernel = rel[:, None] * (unit @ unit.T) * rel[None, :]
    ours = dpp_greedy_map(kernel, 6).tolist()
    assert ours == official_dpp(kernel, 6) == brute_force_greedy_map(kernel, 6)


def test_cdpruner_relevance_sign_and_duplicates():
    # Three orthogonal directions, token 3 a duplicate of token 0; the instruction points along token 2.
    features = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    instruction = torch.tensor([[0.0, 0.0, 2.0], [0.1, 0.1, 1.0]])
    fn = REGISTRY["cdpruner_pre_llm"].fn
    # S = I on distinct tokens, so the first pick is the largest relevance: token 2 with sign +1, never with -1.
    assert fn(cdpruner_context(features, 1, instruction, sign=1)).tolist() == [2]
    assert 2 not in fn(cdpruner_context(features, 1, instruction, sign=-1)).tolist()
    # The duplicate adds nothing to the determinant: two picks never take both copies of +x.
    assert fn(cdpruner_context(features, 2, instruction, sign=1)).tolist() in ([0, 2], [2, 3])
    # Four picks from a rank-3 kernel: still exactly four distinct tokens, no NaN.
    assert fn(cdpruner_context(features, 4, instruction, sign=1)).tolist() == [0, 1, 2, 3]
    # No instruction after the span: pure diversity (relevance 1).
    assert fn(cdpruner_context(features, 3, instruction[:0])).tolist() in ([0, 1, 2], [1, 2, 3])

