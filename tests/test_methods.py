"""Each method against its published algorithm, on hand-made inputs whose answer is known."""

import pytest
import torch

import methods
from methods import PRE_LLM, INTRA_LLM, PruneContext, SignalSource, VideoFrames
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


# ---------------------------------------------------------------- What the hooks accept from a method
RETURNED = {}


@pytest.fixture
def returning_method():
    """A test-only pre-LLM method that returns ``RETURNED["indices"]`` as its indices."""

    @methods.register_prune("returning_pre_llm")
    def returning_pre_llm(ctx):
        """Test method."""
        return RETURNED["indices"]

    yield "returning_pre_llm"
    methods._base._REGISTRY.pop("returning_pre_llm")


def select_with(name, indices):
    """Run ``name`` through the hooks on one sample: 2 text tokens around a 4-token image span, keep 2."""
    import hooks
    from utils import PruneConfig, Stage

    RETURNED["indices"] = indices
    layout = hooks.find_layout(torch.tensor([[1, 5, 5, 5, 5, 2]]), None, {5: "image"}, {"image": [(1, 2, 2)]})
    stage = Stage(name, 0.5)
    return hooks.select_tokens(stage, PruneConfig(pre_llm=stage), layout, torch.randn(1, 6, 8))


@pytest.mark.parametrize("indices", [torch.tensor([0.0, 2.7]), torch.tensor([True, False]),
                                     torch.tensor([1.0, 3.0], dtype=torch.float16), torch.tensor([0j, 1j])])
def test_non_integer_indices_are_refused_by_name(returning_method, indices):
    with pytest.raises(TypeError) as err:
        select_with(returning_method, indices)
    assert str(err.value) == (f"pruning method returning_pre_llm returned indices of dtype {indices.dtype} for a span "
                              f"of 4 tokens; allowed: an integer tensor (e.g. torch.long) of span-local indices in "
                              f"[0, 4)")
    with pytest.raises(TypeError, match="dtype torch.float32"):  # in a PruneResult too
        select_with(returning_method, methods.PruneResult(torch.tensor([0.0, 1.0]), torch.zeros(2, 8)))


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.uint8])
def test_integer_indices_of_any_width_are_accepted(returning_method, dtype):
    selection = select_with(returning_method, torch.tensor([3, 1], dtype=dtype))
    assert selection.index.tolist() == [[0, 2, 4, 5]]


def test_out_of_range_indices_say_what_is_allowed(returning_method):
    with pytest.raises(ValueError, match=r"returning_pre_llm returned out-of-range .* span of 4; allowed: distinct "
                                         r"span-local indices in \[0, 4\)"):
        select_with(returning_method, torch.tensor([1, 4]))


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


def test_greedy_selections_never_wait_for_the_host():
    # On a GPU, a Python int or an `if` on a tensor inside a K-step loop makes every step wait for the device
    # (with such a loop, DivPrune at keep 0.25 made a 2,098-token prefill on an H200 take 36.8 ms instead of
    # 7.5). The meta device has no data, so it refuses both: these loops running there proves they queue all
    # their work on the features' device.
    from methods.cdpruner import dpp_greedy_map
    from methods.divprune import max_min_greedy
    from methods.divprune_hybrid import divprune_hybrid_select

    assert max_min_greedy(torch.empty(50, 50, device="meta"), 0, 10).device.type == "meta"
    assert divprune_hybrid_select(torch.empty(50, 8, device="meta"), 10, 0.5).device.type == "meta"
    assert dpp_greedy_map(torch.empty(50, 50, device="meta"), 10).device.type == "meta"


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
        if spec.stage != PRE_LLM or spec.vision is not None:  # vision methods: tests/test_vision_methods.py
            continue
        params = {p.env: p.default for p in spec.params}
        for keep in (1, 7, 30):
            # a video method sees an image as a video of one frame whose tokens form no grid
            video = VideoFrames(torch.zeros(30, dtype=torch.long), 1, None) if spec.video else None
            ctx = PruneContext(features=features, keep=keep, grid=None, modality="image", stage=PRE_LLM,
                               params=params, span_key=0, hidden_states=hidden, span_positions=span,
                               text_positions=text, video=video, ratio=keep / 30)
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


# ---------------------------------------------------------------- Intra-LLM: a planted signal source
class PlantedSignals(SignalSource):
    """Attention probabilities per layer ([H, L, L]), key states, normed and input states, all planted."""

    def __init__(self, probs=None, keys=None, normed=None, embeds=None, block_rows=2):
        self.probs, self.keys, self.normed, self.embeds = probs, keys, normed, embeds
        self.block_rows, self.calls = block_rows, []

    def attention(self, query_rows, layer):
        self.calls.append(("attention", query_rows.tolist(), layer))
        return self.probs[layer][:, query_rows]

    def attention_blocks(self, query_rows, layer, block_rows=None):
        self.calls.append(("blocks", query_rows.tolist(), layer))
        for start in range(0, len(query_rows), self.block_rows):
            yield self.probs[layer][:, query_rows[start:start + self.block_rows]]

    def key_states(self, layer):
        self.calls.append(("keys", layer))
        return self.keys

    def final_normed_hidden_states(self):
        return self.normed

    def input_embeddings(self):
        return self.embeds

    def span_input_embeddings(self, span_positions):
        return self.embeds[span_positions]


def intra_context(signals, span, text, keep, layer, params=None, features=None):
    features = torch.zeros(len(span), 4) if features is None else features
    return PruneContext(features=features, keep=keep, grid=None, modality="image", stage=INTRA_LLM,
                        params=params or {}, span_key=0, layer=layer, span_positions=span, text_positions=text,
                        _signals=signals)


# ---------------------------------------------------------------- PyramidDrop
def test_pdrop_scores_with_layer_k_own_attention_of_the_last_prompt_token():
    seq, span, text = 12, torch.arange(3, 9), torch.tensor([0, 1, 2, 9, 10, 11])
    own, previous = torch.full((2, seq, seq), 0.01), torch.full((2, seq, seq), 0.01)
    own[0, -1, 4], own[1, -1, 7] = 0.9, 0.6  # layer K's own row: peaks at positions 4 and 7
    previous[0, -1, 5], previous[1, -1, 6] = 0.9, 0.9  # what FastV (layer K-1) would keep
    signals = PlantedSignals({3: own, 2: previous})
    kept = REGISTRY["pdrop_intra_llm"].fn(intra_context(signals, span, text, 2, layer=3))
    assert kept.tolist() == [1, 4] and signals.calls == [("attention", [11], 3)]


def test_pdrop_default_schedule_scales_the_official_layers_and_uses_keep_ratio_as_lambda():
    from methods.pdrop import pdrop_schedule

    assert pdrop_schedule(32, 0.5) == [(8, 0.5), (16, 0.25), (24, 0.125)]  # the official setting
    assert [layer for layer, _ in pdrop_schedule(28, 0.5)] == [7, 14, 21]
    assert pdrop_schedule(4, 0.4) == [(1, 0.4), (2, 0.4 ** 2), (3, 0.4 ** 3)]
    with pytest.raises(ValueError, match="do not fit"):
        pdrop_schedule(3, 0.5)


# ---------------------------------------------------------------- FitPrune
def official_fitprune_keep(probs, start, n, keep):
    """Literal rendering of the official block: head-max, self/N summed over visual rows, cross summed over the
    rows after the image, sort ascending and delete the first N - keep."""
    headmax = probs.max(dim=0).values
    self_attention = (headmax[start:start + n, start:start + n] / n).sum(dim=0)
    cross_attention = headmax[start + n:, start:start + n].sum(dim=0)
    delete = torch.sort(cross_attention * self_attention, dim=-1, stable=True).indices[:n - keep]
    mask = torch.ones(n, dtype=torch.bool)
    mask[delete] = False
    return torch.nonzero(mask).flatten().tolist()


def test_fitprune_keeps_the_highest_head_max_scores():
    seq, span, text = 10, torch.arange(2, 6), torch.tensor([0, 1, 6, 7, 8, 9])
    probs = torch.full((2, seq, seq), 0.01)
    # Visual token 1 (position 3): high self attention on head 0 and high cross attention on head 1, so only
    # a max over heads sees both. Token 3 (position 5): moderate on both, on the opposite heads.
    probs[0, 2:6, 3], probs[1, 6:, 3] = 0.5, 0.6
    probs[1, 2:6, 5], probs[0, 6:, 5] = 0.3, 0.3
    signals = PlantedSignals({2: probs})
    kept = REGISTRY["fitprune_intra_llm"].fn(intra_context(signals, span, text, 2, layer=3))
    assert kept.tolist() == [1, 3]  # UniPruneBench's port would keep [0, 2], the lowest
    assert signals.calls == [("blocks", [2, 3, 4, 5, 6, 7, 8, 9], 2)]  # visual + text-after rows of layer K-1
    assert kept.tolist() == official_fitprune_keep(probs, 2, 4, 2)


@pytest.mark.parametrize("seed", range(3))
def test_fitprune_matches_the_official_rule_on_random_attention(seed):
    g = torch.Generator().manual_seed(seed)
    seq, start, n = 30, 4, 16
    probs = torch.softmax(torch.randn(3, seq, seq, generator=g) * 3, dim=-1)
    span, text = torch.arange(start, start + n), torch.cat([torch.arange(start), torch.arange(start + n, seq)])
    for keep in (1, 5, 16):
        kept = REGISTRY["fitprune_intra_llm"].fn(intra_context(PlantedSignals({1: probs}, block_rows=3), span, text,
                                                               keep, layer=2))
        assert kept.tolist() == official_fitprune_keep(probs, start, n, keep)


# ---------------------------------------------------------------- DART
def official_dart(keys, hidden, start, length, pivot_image, pivot_text, topk):
    """Literal rendering of the official Qwen2.5-VL ``get_retained_image_token`` (batch of one, no padding)."""
    image_l1 = torch.norm(keys[start:start + length], p=1, dim=-1)
    query_l1 = torch.norm(keys[start + length:], p=1, dim=-1)
    image_indices = (image_l1.topk(pivot_image).indices + start).tolist()
    query_indices = (query_l1.topk(pivot_text).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid = set(range(start, start + length)) - set(image_indices)
    valid_list = list(valid)
    for item in list(indices_set):
        cos_sim = -torch.nn.functional.cosine_similarity(hidden[item, :], hidden[valid_list, :], dim=-1)
        chosen = [valid_list[i] for i in cos_sim.topk(topk).indices]
        indices_set.update(chosen)
        valid.difference_update(chosen)
        valid_list = list(valid)
    indices_set.difference_update(query_indices)
    return sorted(i - start for i in indices_set)


def dart_params(image=4, text=4):
    return {"DART_PIVOT_IMAGE_TOKENS": image, "DART_PIVOT_TEXT_TOKENS": text}


def test_dart_planted_pivots_take_their_least_similar_tokens():
    angles = torch.tensor([0.0, 0.0, 30.0, 90.0, 180.0, 200.0, 0.0, 90.0])  # text 0, span 1..5, text 6, 7
    normed = torch.stack([torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))], dim=1)
    keys = torch.ones(8, 2, 3)
    keys[1] *= 5  # image pivot: span token 0 (0 degrees)
    keys[7] *= 3  # text pivot: position 7 (90 degrees)
    signals = PlantedSignals(keys=keys, normed=normed)
    span, text = torch.arange(1, 6), torch.tensor([0, 6, 7])
    kept = REGISTRY["dart_intra_llm"].fn(intra_context(signals, span, text, 3, layer=2, params=dart_params(1, 1)))
    # Pivot at 0 degrees takes 180 (span 3); the pivot at 90 then takes 200 (span 4) of {30, 90, 200}.
    assert kept.tolist() == [0, 3, 4] and ("keys", 1) in signals.calls
    # K = 4: R = 3 picks for 2 pivots, the first visited pivot (position 1) takes two, 180 and 200; the pivot at
    # 90 degrees then takes 30 (span 1) rather than 90 (span 2).
    kept = REGISTRY["dart_intra_llm"].fn(intra_context(signals, span, text, 4, layer=2, params=dart_params(1, 1)))
    assert kept.tolist() == [0, 1, 3, 4]


@pytest.mark.parametrize("seed", range(3))
def test_dart_matches_the_official_code_when_the_official_count_is_the_keep_count(seed):
    g = torch.Generator().manual_seed(seed)
    start, n, after = 5, 40, 8
    seq = start + n + after
    keys, normed = torch.randn(seq, 2, 8, generator=g), torch.randn(seq, 16, generator=g)
    span, text = torch.arange(start, start + n), torch.cat([torch.arange(start), torch.arange(start + n, seq)])
    for topk in (1, 3, 4):
        keep = 4 + 8 * topk  # official count with 4 + 4 pivots
        kept = REGISTRY["dart_intra_llm"].fn(intra_context(PlantedSignals(keys=keys, normed=normed), span, text,
                                                           keep, layer=2, params=dart_params()))
        assert kept.tolist() == official_dart(keys.flatten(1), normed, start, n, 4, 4, topk)


def test_dart_matches_the_official_code_on_realistic_layouts():
    """Qwen-like layouts: hundreds of visual tokens, pivot indices in the hundreds. There the iteration order of a
    set depends on how it was built (from the official list, or from a dict), and pivots draw from one pool in
    turn, so the visiting order changes the selection."""
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        start, n, after = (int(torch.randint(low, high, (1,), generator=g)) for low, high in
                           ((10, 80), (150, 1300), (15, 60)))
        seq = start + n + after
        keys, normed = torch.randn(seq, 2, 8, generator=g), torch.randn(seq, 16, generator=g)
        span, text = torch.arange(start, start + n), torch.cat([torch.arange(start), torch.arange(start + n, seq)])
        topk = int(n * 0.75 / 8)  # the official quota at reduction ratio 0.75
        kept = REGISTRY["dart_intra_llm"].fn(intra_context(PlantedSignals(keys=keys, normed=normed), span, text,
                                                           4 + 8 * topk, layer=2, params=dart_params()))
        assert kept.tolist() == official_dart(keys.flatten(1), normed, start, n, 4, 4, topk), (start, n, after)


def test_dart_keeps_exactly_the_keep_count_in_edge_cases():
    g = torch.Generator().manual_seed(0)
    keys, normed = torch.randn(20, 2, 4, generator=g), torch.randn(20, 8, generator=g)
    span = torch.arange(2, 12)
    for text in (torch.tensor([0, 1, 12, 13, 14, 15, 16, 17, 18, 19]), torch.tensor([0, 1, 12]), torch.tensor([0, 1])):
        for keep in range(1, 11):
            kept = REGISTRY["dart_intra_llm"].fn(intra_context(PlantedSignals(keys=keys, normed=normed), span, text,
                                                               keep, layer=2, params=dart_params()))
            assert len(set(kept.tolist())) == keep and max(kept.tolist()) < 10


def test_dart_visiting_order_does_not_depend_on_left_padding():
    g = torch.Generator().manual_seed(1)
    keys, normed = torch.randn(60, 2, 4, generator=g), torch.randn(60, 8, generator=g)
    span, text = torch.arange(3, 43), torch.cat([torch.arange(3), torch.arange(43, 51)])
    alone = REGISTRY["dart_intra_llm"].fn(intra_context(PlantedSignals(keys=keys, normed=normed), span, text, 13, 2,
                                                        params=dart_params()))
    pad = 9
    padded = PlantedSignals(keys=torch.cat([torch.zeros(pad, 2, 4), keys]), normed=torch.cat([torch.ones(pad, 8), normed]))
    shifted = REGISTRY["dart_intra_llm"].fn(intra_context(padded, span + pad, text + pad, 13, 2, params=dart_params()))
    assert alone.tolist() == shifted.tolist()


# ---------------------------------------------------------------- VTW
def test_vtw_withdraws_every_visual_token():
    spec = REGISTRY["vtw_intra_llm"]
    assert not spec.exact_count
    assert spec.fn(intra_context(None, torch.arange(1, 5), torch.tensor([0, 5]), 4, layer=3)).numel() == 0
    assert spec.default_schedule(32, 0.5) == [(15, 0.5)] and spec.default_schedule(28, 1.0) == [(13, 1.0)]


# ---------------------------------------------------------------- SparseVLM
def official_cluster_and_merge(x, cluster_num, noise):
    """Literal rendering of SparseVLM's ``cluster_and_merge`` for a batch of one, with its noise supplied."""
    x = x[None]
    b, n, c = x.shape
    dist_matrix = (x[:, :, None, :] - x[:, None, :, :]).norm(dim=-1, p=2) / (c ** 0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp() + noise[None] * 1e-6
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    _, index_down = torch.topk(dist * density, k=cluster_num, dim=-1)
    centre_rows = dist_matrix[0, index_down[0]][None]
    idx_cluster = centre_rows.argmin(dim=1)
    idx_cluster[0, index_down[0]] = torch.arange(cluster_num)
    all_weight = torch.zeros(cluster_num, 1).index_add_(0, idx_cluster[0], torch.ones(n, 1)) + 1e-6
    norm_weight = 1.0 / all_weight[idx_cluster[0]]
    merged = torch.zeros(cluster_num, c).index_add_(0, idx_cluster[0], x[0] * norm_weight)
    return index_down[0], merged


@pytest.mark.parametrize("seed", range(3))
def test_sparsevlm_dpc_knn_matches_the_official_clustering(seed):
    from methods.sparsevlm import dpc_knn_merge

    x = clustered(3, 7, 6, seed)
    noise = torch.rand(len(x), generator=torch.Generator().manual_seed(seed))
    centres, merged = dpc_knn_merge(x, 3, torch.Generator().manual_seed(seed))
    official_centres, official_merged = official_cluster_and_merge(x, 3, noise)
    assert centres.tolist() == official_centres.tolist()
    torch.testing.assert_close(merged, official_merged)


def test_sparsevlm_dpc_knn_merges_obvious_clusters():
    from methods.sparsevlm import dpc_knn_merge

    x = torch.tensor([[0.0, 0.0], [10.0, 10.0], [0.2, 0.0], [10.2, 10.0], [0.0, 0.2], [10.0, 10.2]])
    centres, merged = dpc_knn_merge(x, 2, torch.Generator().manual_seed(0))
    by_cluster = {int(c) % 2: m for c, m in zip(centres, merged)}  # even rows: near 0, odd rows: near 10
    scale = 3 / (3 + 1e-6)  # the official average divides by (size + 1e-6)
    torch.testing.assert_close(by_cluster[0], torch.tensor([0.2 / 3, 0.2 / 3]) * scale)
    torch.testing.assert_close(by_cluster[1], torch.tensor([30.2 / 3, 30.2 / 3]) * scale)


def test_sparsevlm_text_raters_are_the_above_mean_text_tokens():
    from methods.sparsevlm import text_raters

    visual = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[5.0, 0.0], [0.0, 0.0], [4.0, 0.0], [4.5, 0.0]])  # softmax ~ [.49, .003, .18, .30]
    assert text_raters(visual, text).tolist() == [0, 3]
    assert text_raters(visual, torch.zeros(3, 2)).tolist() == [0, 1, 2]  # all equal: every text token rates


def test_sparsevlm_keeps_top_rater_scores_and_recycles_the_best_pruned_into_clusters():
    seq, span, text = 16, torch.arange(2, 14), torch.tensor([0, 1, 14, 15])
    probs = torch.full((2, seq, seq), 0.01)
    probs[:, 14, 2 + 5] = 0.8  # the rater (position 14) looks at span token 5, then 9, then 0
    probs[:, 14, 2 + 9] = 0.6
    probs[:, 14, 2 + 0] = 0.4
    probs[:, 15, 2 + 11] = 0.9  # position 15 is not a rater: ignored
    embeds = torch.zeros(seq, 2)
    embeds[2:14] = torch.tensor([1.0, 0.0])
    embeds[14], embeds[15] = torch.tensor([3.0, 0.0]), torch.tensor([-3.0, 0.0])  # only 14 is above the mean
    features = torch.arange(12, dtype=torch.float32)[:, None].repeat(1, 4)
    signals = PlantedSignals({4: probs}, embeds=embeds)
    params = {"SPARSEVLM_RECYCLE": 1, "SPARSEVLM_SEED": 0}
    result = REGISTRY["sparsevlm_intra_llm"].fn(intra_context(signals, span, text, 3, layer=5, params=params,
                                                              features=features))
    assert signals.calls == [("attention", [14], 4)]
    # Kept: 0, 5, 9. Pruned: 9 tokens, of which int(0.3 * 9) + 1 = 3 are recycled into int(3 / 10) + 1 = 1
    # cluster (the three best pruned: ties at 0.01 go to the lower index: 1, 2, 3) placed at its centre.
    assert result.indices[:3].tolist() == [0, 5, 9] and len(result.indices) == 4
    assert result.indices[3] in (1, 2, 3)
    torch.testing.assert_close(result.features[:3], features[[0, 5, 9]])
    torch.testing.assert_close(result.features[3], features[1:4].mean(dim=0) * 3 / (3 + 1e-6))
    plain = REGISTRY["sparsevlm_intra_llm"].fn(intra_context(signals, span, text, 3, layer=5, features=features,
                                                             params={"SPARSEVLM_RECYCLE": 0, "SPARSEVLM_SEED": 0}))
    assert plain.tolist() == [0, 5, 9]


def test_sparsevlm_schedule_reproduces_the_official_counts_at_the_official_budgets():
    from methods.sparsevlm import OFFICIAL_COUNTS, sparsevlm_schedule
    from utils import keep_count

    for budget, counts in OFFICIAL_COUNTS.items():
        schedule = sparsevlm_schedule(32, budget / 576)
        assert [layer for layer, _ in schedule] == [3, 7, 16]  # after layers 2, 6, 15
        assert [keep_count(576, ratio) for _, ratio in schedule] == list(counts)
    assert [ratio for _, ratio in sparsevlm_schedule(32, 1.0)] == [1.0, 1.0, 1.0]
    middle = [ratio for _, ratio in sparsevlm_schedule(32, (64 + 96) / 2 / 576)]
    assert middle == pytest.approx([(66 + 238) / 2 / 576, (30 + 48) / 2 / 576, (17 + 26) / 2 / 576])
    assert [layer for layer, _ in sparsevlm_schedule(4, 0.5)] == [1, 2, 3]
    assert [layer for layer, _ in sparsevlm_schedule(28, 0.5)] == [3, 6, 14]
