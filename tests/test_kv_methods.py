"""The KV-cache methods (StreamingLLM, H2O, SnapKV, PyramidKV) on hand-made inputs whose answer is known, and
against a direct transcription of their official selection on small random attention."""

import math

import pytest
import torch
import torch.nn.functional as F

import methods
from methods import KV, KVContext, KVSignalSource
from methods import snapkv as snapkv_module
from methods.pyramidkv import pyramid_count

REGISTRY = methods.load_methods()
pytestmark = pytest.mark.usefixtures("one_thread")


class FakeSignals(KVSignalSource):
    """Hand-made signals: ``rows`` [H_q, R, L] are the attention rows of the last R prompt tokens; ``column_sums``
    [H_q, L] the accumulated attention. Records what was asked for; refuses what it was not given."""

    def __init__(self, rows=None, column_sums=None):
        self.rows, self.sums, self.asked = rows, column_sums, []

    def window_attention(self, window):
        self.asked.append(("window", window))
        if self.rows is None:
            raise AssertionError("window_attention was not expected")
        w = min(window, self.rows.shape[-1])
        assert w <= self.rows.shape[1], "the test gave fewer rows than the method asks for"
        return self.rows[:, self.rows.shape[1] - w:]

    def attention_column_sums(self, block_rows=None):
        self.asked.append(("sums", None))
        if self.sums is None:
            raise AssertionError("attention_column_sums was not expected")
        return self.sums


class CausalSignals(KVSignalSource):
    """Exact causal softmax attention of random queries [H_q, L, d] to keys [H_kv, L, d] (GQA by repetition)."""

    def __init__(self, queries, keys):
        group = queries.shape[0] // keys.shape[0]
        logits = queries @ keys.repeat_interleave(group, dim=0).transpose(1, 2) / math.sqrt(queries.shape[-1])
        length = keys.shape[1]
        future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        self.probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1)

    def window_attention(self, window):
        return self.probs[:, self.probs.shape[1] - min(window, self.probs.shape[1]):]

    def attention_column_sums(self, block_rows=None):
        return self.probs.sum(dim=1)


def kv_context(name, length, budget, *, kv_heads=1, query_heads=None, signals=None, layer=0, num_layers=4, **params):
    """A KVContext for ``name`` with its default hyper-parameters, overridden by ``params``."""
    defaults = {p.env: p.default for p in REGISTRY[name].params}
    assert set(params) <= set(defaults), "unknown hyper-parameter in the test"
    keys = torch.randn(kv_heads, length, 4)
    return KVContext(keys=keys, values=torch.randn_like(keys), budget=budget, layer=layer, num_layers=num_layers,
                     visual=torch.zeros(length, dtype=torch.bool), query_heads=query_heads or kv_heads,
                     params=defaults | params, _signals=signals)


def run(name, ctx):
    return REGISTRY[name].fn(ctx)


def kept_sets(indices, kv_heads):
    """Per KV head, the sorted kept entries (a [K] answer applies to every head)."""
    rows = indices.expand(kv_heads, -1) if indices.dim() == 1 else indices
    return [sorted(row.tolist()) for row in rows]


def window_rows(scores, window, length):
    """[H_q, window, length] attention rows whose sum over the rows gives ``scores`` ([H_q, length - window]) on the
    entries before the window; each row puts the rest of its unit mass on its own position (causal)."""
    heads = scores.shape[0]
    rows = torch.zeros(heads, window, length)
    rows[:, :, :length - window] = scores.unsqueeze(1) / window
    for r in range(window):
        rows[:, r, length - window + r] = 1 - rows[:, r, :length - window].sum(-1)
    assert (rows >= 0).all(), "scores too large for probabilities"
    return rows


# ---------------------------------------------------------------- registration
@pytest.mark.parametrize("name, defaults", [
    ("streamingllm_kv", {"STREAMINGLLM_SINK": 4}),
    ("h2o_kv", {"H2O_RECENT_RATIO": 0.5}),
    ("snapkv_kv", {"SNAPKV_WINDOW": 32, "SNAPKV_KERNEL": 5, "SNAPKV_POOLING": "avgpool"}),
    ("pyramidkv_kv", {"PYRAMIDKV_WINDOW": 8, "PYRAMIDKV_KERNEL": 7, "PYRAMIDKV_POOLING": "maxpool",
                      "PYRAMIDKV_BETA": 20}),
])
def test_each_method_registers_as_a_kv_method_with_the_official_defaults(name, defaults):
    spec = REGISTRY[name]
    assert spec.stage == KV and spec.description and spec.source == f"methods.{name[:-3]}"
    assert {p.env: p.default for p in spec.params} == defaults


@pytest.mark.parametrize("name, env, bad, good", [
    ("streamingllm_kv", "STREAMINGLLM_SINK", -1, 0),
    ("h2o_kv", "H2O_RECENT_RATIO", 1.5, 1.0),
    ("snapkv_kv", "SNAPKV_WINDOW", 0, 1),
    ("snapkv_kv", "SNAPKV_KERNEL", 4, 3),
    ("snapkv_kv", "SNAPKV_POOLING", "sumpool", "maxpool"),
    ("pyramidkv_kv", "PYRAMIDKV_BETA", 0, 1),
    ("pyramidkv_kv", "PYRAMIDKV_KERNEL", 6, 7),
])
def test_hyper_parameter_checks_refuse_bad_values(name, env, bad, good):
    param = next(p for p in REGISTRY[name].params if p.env == env)
    assert param.check(bad) and param.check(good) is None


@pytest.mark.parametrize("name", ["streamingllm_kv", "h2o_kv", "snapkv_kv", "pyramidkv_kv"])
def test_a_budget_of_every_entry_keeps_everything_without_reading_attention(name):
    signals = FakeSignals()
    for budget in (9, 12):
        ctx = kv_context(name, 9, budget, kv_heads=2, query_heads=4, signals=signals)
        assert kept_sets(run(name, ctx), 2) == [list(range(9))] * 2
    assert signals.asked == []


@pytest.mark.parametrize("name", ["streamingllm_kv", "h2o_kv", "snapkv_kv", "pyramidkv_kv"])
def test_every_head_keeps_the_same_count_of_distinct_entries(name):
    torch.manual_seed(0)
    length, kv_heads, query_heads = 40, 2, 6
    signals = CausalSignals(torch.randn(query_heads, length, 8), torch.randn(kv_heads, length, 8))
    for layer in (0, 3):
        for budget in (1, 3, 8, 9, 20, 39):
            ctx = kv_context(name, length, budget, kv_heads=kv_heads, query_heads=query_heads, signals=signals,
                             layer=layer, num_layers=4, **({"SNAPKV_WINDOW": 4} if name == "snapkv_kv" else {}))
            out = run(name, ctx)
            assert out.dtype == torch.long and out.dim() in (1, 2)
            rows = out.expand(kv_heads, -1) if out.dim() == 1 else out
            assert rows.shape[0] == kv_heads and 1 <= rows.shape[1] <= length
            assert all(len(set(row.tolist())) == rows.shape[1] for row in rows)
            assert rows.min() >= 0 and rows.max() < length
            if name != "pyramidkv_kv":
                assert rows.shape[1] == budget


# ---------------------------------------------------------------- StreamingLLM
def test_streamingllm_keeps_the_sinks_and_the_most_recent_entries():
    ctx = kv_context("streamingllm_kv", 20, 10)
    assert run("streamingllm_kv", ctx).tolist() == [0, 1, 2, 3, 14, 15, 16, 17, 18, 19]
    ctx = kv_context("streamingllm_kv", 20, 5, STREAMINGLLM_SINK=1)
    assert run("streamingllm_kv", ctx).tolist() == [0, 16, 17, 18, 19]
    ctx = kv_context("streamingllm_kv", 20, 3, STREAMINGLLM_SINK=0)
    assert run("streamingllm_kv", ctx).tolist() == [17, 18, 19]


def test_streamingllm_budget_within_the_sinks_keeps_the_first_entries():
    assert run("streamingllm_kv", kv_context("streamingllm_kv", 20, 3)).tolist() == [0, 1, 2]
    assert run("streamingllm_kv", kv_context("streamingllm_kv", 20, 4)).tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- H2O
def h2o_sums():
    """[4 query heads, 10 entries] accumulated attention; query heads (0, 1) read KV head 0, (2, 3) KV head 1."""
    return torch.tensor([
        [0.0, 6.0, 0.0, 0.0, 4.0, 0.0, 0.0, 90.0, 0.0, 0.0],  # alone: 1, 4 then a tie of zeros -> 0
        [0.0, 0.0, 0.0, 3.0, 0.0, 5.0, 2.0, 0.0, 80.0, 0.0],  # alone: 5, 3, 6
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],   # KV head 1: all equal -> lowest indices
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    ])


def test_h2o_keeps_the_heaviest_columns_of_the_group_mean_and_the_recent_window():
    signals = FakeSignals(column_sums=h2o_sums())
    ctx = kv_context("h2o_kv", 10, 6, kv_heads=2, query_heads=4, signals=signals)
    # recent = floor(6 * 0.5) = 3 -> entries 7, 8, 9; heavy = 3 among entries 0..6.
    # KV head 0, mean of its query heads: [0, 3, 0, 1.5, 2, 2.5, 1] -> 1, 5, 4 (neither head alone gives this set);
    # the huge scores of entries 7 and 8 are in the recent window and take no heavy-hitter slot.
    # KV head 1: equal scores -> the lowest indices 0, 1, 2.
    assert kept_sets(run("h2o_kv", ctx), 2) == [[1, 4, 5, 7, 8, 9], [0, 1, 2, 7, 8, 9]]
    assert signals.asked == [("sums", None)]


def test_h2o_recent_ratio_splits_the_budget():
    sums = h2o_sums()
    ctx = kv_context("h2o_kv", 10, 4, kv_heads=2, query_heads=4, signals=FakeSignals(column_sums=sums),
                     H2O_RECENT_RATIO=0.0)
    # no recent window: the top 4 of all entries; KV head 0 mean: 7 (45), 8 (40), 1 (3), 5 (2.5)
    assert kept_sets(run("h2o_kv", ctx), 2)[0] == [1, 5, 7, 8]
    ctx = kv_context("h2o_kv", 10, 4, kv_heads=2, query_heads=4, signals=FakeSignals(column_sums=sums),
                     H2O_RECENT_RATIO=1.0)
    assert kept_sets(run("h2o_kv", ctx), 2) == [[6, 7, 8, 9]] * 2
    ctx = kv_context("h2o_kv", 10, 5, kv_heads=2, query_heads=4, signals=FakeSignals(column_sums=sums))
    # recent = floor(5 * 0.5) = 2 (8, 9); heavy 3 among 0..7: 7 (45), 1 (3), 5 (2.5)
    assert kept_sets(run("h2o_kv", ctx), 2)[0] == [1, 5, 7, 8, 9]


def test_h2o_matches_the_official_selection_per_head_on_causal_attention():
    torch.manual_seed(1)
    heads, length, budget = 3, 30, 12
    signals = CausalSignals(torch.randn(heads, length, 8), torch.randn(heads, length, 8))
    ctx = kv_context("h2o_kv", length, budget, kv_heads=heads, signals=signals)
    # official (utils_real_drop): hh_score = attention summed over the prompt rows; topk of hh_score[:, :L - recent]
    recent = budget // 2
    hh_score = signals.probs.sum(dim=1)
    heavy = hh_score[:, :length - recent].topk(budget - recent, dim=-1).indices
    expected = [sorted(h.tolist() + list(range(length - recent, length))) for h in heavy]
    assert kept_sets(run("h2o_kv", ctx), heads) == expected


# ---------------------------------------------------------------- SnapKV
# 12 entries, window 2 (entries 10, 11), budget 3: one entry chosen among 0..9.
SPIKE_VS_CLUSTER = torch.tensor([[0.0, 0.0, 0.4, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.0]])


def snap(length, budget, scores, window, **params):
    signals = FakeSignals(rows=window_rows(scores, window, length))
    ctx = kv_context("snapkv_kv", length, budget, kv_heads=scores.shape[0], signals=signals,
                     SNAPKV_WINDOW=window, **params)
    return kept_sets(run("snapkv_kv", ctx), scores.shape[0]), signals


def test_snapkv_pooling_spreads_a_spike_to_its_neighbours():
    # no pooling: the spike (entry 2, 0.4) wins over the cluster (0.3 each)
    assert snap(12, 3, SPIKE_VS_CLUSTER, 2, SNAPKV_KERNEL=1)[0] == [[2, 10, 11]]
    # average pooling, kernel 3: spike -> 0.4 / 3, cluster centre -> 0.3: the cluster's centre wins
    assert snap(12, 3, SPIKE_VS_CLUSTER, 2, SNAPKV_KERNEL=3)[0] == [[7, 10, 11]]
    # max pooling, kernel 3: entries 1, 2, 3 all score 0.4; the tie goes to the lowest index
    assert snap(12, 3, SPIKE_VS_CLUSTER, 2, SNAPKV_KERNEL=3, SNAPKV_POOLING="maxpool")[0] == [[1, 10, 11]]


def test_snapkv_average_pooling_counts_the_zero_padding_at_the_ends():
    scores = torch.tensor([[0.45, 0.0, 0.0, 0.0, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0]])
    # entry 0: (pad 0 + 0.45 + 0) / 3 = 0.15 < entry 5: 0.2 (without counting the pad, entry 0 would score 0.225)
    assert snap(12, 3, scores, 2, SNAPKV_KERNEL=3)[0] == [[5, 10, 11]]


def test_snapkv_reads_only_the_observation_window_and_always_keeps_it():
    scores = torch.tensor([[0.5, 0.1, 0.0, 0.3, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0]])
    kept, signals = snap(12, 5, scores, 2, SNAPKV_KERNEL=1)
    assert kept == [[0, 3, 5, 10, 11]] and signals.asked == [("window", 2)]


def test_snapkv_reduces_query_heads_by_their_kv_group():
    # 4 query heads, 2 KV heads; kernel 1. KV head 0 = mean(q0, q1): entry 1 (0.6) beats 3 (0.5) and 5 (0.45),
    # although q0 alone prefers 3 and q1 alone prefers 5. KV head 1 = mean(q2, q3): entry 8.
    scores = torch.zeros(4, 10)
    scores[0, [1, 3]] = torch.tensor([0.6, 1.0])
    scores[1, [1, 5]] = torch.tensor([0.6, 0.9])
    scores[2, 8] = scores[3, 8] = 0.7
    scores[3, 2] = 0.9
    signals = FakeSignals(rows=window_rows(scores, 2, 12))
    ctx = kv_context("snapkv_kv", 12, 3, kv_heads=2, query_heads=4, signals=signals, SNAPKV_WINDOW=2,
                     SNAPKV_KERNEL=1)
    assert kept_sets(run("snapkv_kv", ctx), 2) == [[1, 10, 11], [8, 10, 11]]


def test_snapkv_max_pools_each_query_head_before_the_group_mean():
    # q0 spikes at 2, q1 at 4 (one KV head). Pooled per query head (official): entry 3 gets 1.0 from both -> 1.0.
    # Mean first, then max pooling, would give 0.5 to entries 1..5 and pick entry 1.
    scores = torch.zeros(2, 10)
    scores[0, 2] = scores[1, 4] = 1.0
    signals = FakeSignals(rows=window_rows(scores, 2, 12))
    ctx = kv_context("snapkv_kv", 12, 3, kv_heads=1, query_heads=2, signals=signals, SNAPKV_WINDOW=2,
                     SNAPKV_KERNEL=3, SNAPKV_POOLING="maxpool")
    assert kept_sets(run("snapkv_kv", ctx), 1) == [[3, 10, 11]]


def test_snapkv_budget_within_the_window_keeps_the_last_entries_without_reading_attention():
    signals = FakeSignals()
    ctx = kv_context("snapkv_kv", 12, 3, kv_heads=2, query_heads=4, signals=signals, SNAPKV_WINDOW=4)
    assert kept_sets(run("snapkv_kv", ctx), 2) == [[9, 10, 11]] * 2
    ctx = kv_context("snapkv_kv", 12, 4, kv_heads=2, query_heads=4, signals=signals, SNAPKV_WINDOW=4)
    assert kept_sets(run("snapkv_kv", ctx), 2) == [[8, 9, 10, 11]] * 2
    assert signals.asked == []


@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
def test_snapkv_matches_the_official_update_kv_per_head_on_causal_attention(pooling):
    torch.manual_seed(2)
    heads, length, window, kernel, budget = 3, 40, 6, 5, 15
    queries, keys = torch.randn(heads, length, 8), torch.randn(heads, length, 8)
    ctx = kv_context("snapkv_kv", length, budget, kv_heads=heads, signals=CausalSignals(queries, keys),
                     SNAPKV_WINDOW=window, SNAPKV_KERNEL=kernel, SNAPKV_POOLING=pooling)
    # transcription of SnapKVCluster.update_kv (one query head per KV head, so no GQA question)
    logits = queries[:, -window:] @ keys.transpose(1, 2) / math.sqrt(8)
    mask = torch.full((window, window), torch.finfo(logits.dtype).min)
    mask.masked_fill_(torch.arange(window) < (torch.arange(window) + 1).view(window, 1), 0)
    logits[:, :, -window:] += mask
    summed = logits.softmax(dim=-1)[:, :, :-window].sum(dim=-2)
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    cache = pool(summed, kernel_size=kernel, padding=kernel // 2, stride=1)
    official = cache.topk(budget - window, dim=-1).values
    # max pooling makes exact ties (plateaus) that topk breaks as it likes; here ties go to the lower index, so
    # compare with a stable sort, after checking that it picks the same pooled scores as the official topk
    top = torch.sort(cache, dim=-1, descending=True, stable=True).indices[:, :budget - window]
    assert torch.equal(cache.gather(-1, top), official)
    expected = [sorted(t.tolist() + list(range(length - window, length))) for t in top]
    assert kept_sets(run("snapkv_kv", ctx), heads) == expected


# ---------------------------------------------------------------- PyramidKV
def test_pyramid_counts_follow_the_official_formula_on_a_worked_example():
    # L = 1000, M = 64, W = 8, beta = 20, N = 32 (L >= 2 (M - W) = 112: the pyramid branch):
    # min_num = 56 // 20 = 2, max_num = 112 - 2 = 110 (< L - W = 992, no clamp),
    # steps = (110 - 2) // 31 = 3, layer l keeps 110 - 3 l selected + 8 window: 118, 115, ..., 25.
    counts = [pyramid_count(1000, 64, 8, layer, 32, 20) for layer in range(32)]
    assert counts[:3] == [118, 115, 112] and counts[-1] == 25
    assert counts == [118 - 3 * layer for layer in range(32)]
    assert all(a > b for a, b in zip(counts, counts[1:]))
    # mean (118 + 25) / 2 = 71.5: about the budget, above it as steps is rounded down (108 / 31 = 3.48 -> 3)
    assert sum(counts) / 32 == 71.5


def test_pyramid_counts_clamp_to_the_prompt_length():
    # L = 115, M = 64, W = 8, N = 4: min_num = 2, max_num = 110 >= L - W = 107 -> max_num = 107,
    # min_num = 112 - 107 = 5; steps = (107 - 5) // 3 = 34: 107, 73, 39, 5 selected, + 8 window.
    counts = [pyramid_count(115, 64, 8, layer, 4, 20) for layer in range(4)]
    assert counts == [115, 81, 47, 13] and sum(counts) / 4 == 64


def test_pyramid_counts_outside_the_pyramid_branch():
    assert [pyramid_count(100, 64, 8, layer, 4, 20) for layer in range(4)] == [64] * 4  # L < 2 (M - W)
    assert pyramid_count(50, 64, 8, 0, 4, 20) == 50  # L <= M: everything
    assert pyramid_count(1000, 6, 8, 3, 4, 20) == 6  # M <= W: SnapKV's clipped window
    assert pyramid_count(1000, 64, 8, 0, 1, 20) == 118  # one layer: steps = 0
    # beta: min_num = 56 // 4 = 14, max_num = 98, steps = 84 // 3 = 28: 98, 70, 42, 14 selected
    assert [pyramid_count(1000, 64, 8, layer, 4, 4) for layer in range(4)] == [106, 78, 50, 22]


def test_pyramidkv_keeps_its_layer_count_with_snapkv_scores(monkeypatch):
    # L = 40, M = 10, W = 2, N = 4, beta = 20: 2 (M - W) = 16 <= 40; min_num = 0, max_num = 16,
    # steps = 16 // 3 = 5: layers keep 16, 11, 6, 1 selected + 2 window entries.
    length, kv_heads = 40, 2
    scores = torch.arange(kv_heads * (length - 2), dtype=torch.float).view(kv_heads, length - 2).flip(-1)
    scores[1] = scores[1].flip(-1)  # KV head 0 prefers the first entries, KV head 1 the last ones before the window
    asked = []

    def fake_scores(ctx, window, kernel, pooling):
        asked.append((window, kernel, pooling))
        return scores

    monkeypatch.setattr(snapkv_module, "snapkv_scores", fake_scores)  # PyramidKV must score through SnapKV's function
    for layer, selected in enumerate([16, 11, 6, 1]):
        ctx = kv_context("pyramidkv_kv", length, 10, kv_heads=kv_heads, query_heads=4, layer=layer, num_layers=4,
                         PYRAMIDKV_WINDOW=2)
        kept = kept_sets(run("pyramidkv_kv", ctx), kv_heads)
        assert kept[0] == list(range(selected)) + [38, 39]
        assert kept[1] == list(range(38 - selected, 40))
    assert asked == [(2, 7, "maxpool")] * 4


# ---------------------------------------------------------------- LOOK-M
def lookm(keys, values, budget, visual, signals, query_heads=None, **params):
    """LOOK-M's answer on a hand-made cache (keys, values [H_kv, L, d]; visual [L] bool)."""
    defaults = {p.env: p.default for p in REGISTRY["lookm_kv"].params}
    assert set(params) <= set(defaults), "unknown hyper-parameter in the test"
    ctx = KVContext(keys=keys, values=values, budget=budget, layer=0, num_layers=1, visual=torch.as_tensor(visual),
                    query_heads=query_heads or keys.shape[0], params=defaults | params, _signals=signals)
    return run("lookm_kv", ctx)


def lookm_kept(budget, visual, sums, query_heads=None, kv_heads=1, **params):
    """The entries LOOK-M keeps per KV head for accumulated attention ``sums`` [H_q, L] (random keys, no merge)."""
    keys = torch.randn(kv_heads, len(visual), 4)
    out = lookm(keys, torch.randn_like(keys), budget, visual, FakeSignals(column_sums=sums), query_heads,
                LOOKM_MERGE="none", **params)
    return out.index.tolist()


def test_lookm_registers_as_a_kv_method_with_the_official_defaults():
    spec = REGISTRY["lookm_kv"]
    assert spec.stage == KV and spec.description and spec.source == "methods.lookm"
    assert {p.env: p.default for p in spec.params} == {"LOOKM_RECENT_RATIO": 0.5, "LOOKM_MERGE": "pivot"}
    checks = {p.env: p.check for p in spec.params}
    assert checks["LOOKM_RECENT_RATIO"](1.5) and checks["LOOKM_RECENT_RATIO"](1.0) is None
    assert checks["LOOKM_MERGE"]("mean") and all(checks["LOOKM_MERGE"](m) is None
                                                for m in ("pivot", "avg", "weighted", "none"))


# 10 entries: text 0, 1, 8, 9; image 2..7. Entry 7 (image) has the largest score but sits in the recent window.
LOOKM_VISUAL = [False, False, True, True, True, True, True, True, False, False]
LOOKM_SUMS = torch.tensor([[0.01, 0.02, 0.5, 3.0, 2.0, 0.1, 2.5, 9.0, 0.5, 0.3]])


def test_lookm_keeps_text_before_any_image_then_the_best_scored_images():
    # budget 6: recent = 3 (7, 8, 9); heavy 3 among 0..6: text 0, 1 (lowest scores) first, then image 3 (3.0).
    # Without the text prior (H2O) the heavy hitters would be 3, 6, 4.
    assert lookm_kept(6, LOOKM_VISUAL, LOOKM_SUMS) == [[0, 1, 3, 7, 8, 9]]
    # no recent window: the 3 best text entries (8: 0.5, 9: 0.3, 1: 0.02), however large the image scores
    assert lookm_kept(3, LOOKM_VISUAL, LOOKM_SUMS, LOOKM_RECENT_RATIO=0.0) == [[1, 8, 9]]


def test_lookm_text_beyond_the_heavy_share_is_chosen_by_score():
    # budget 4: recent 2 (8, 9), heavy 2 among 0..7, which hold 6 text entries: the 2 best-scored text entries
    # (officially every text entry would stay, beyond the budget); no image, whatever its score.
    visual = [False] * 6 + [True, True, False, False]
    sums = torch.tensor([[0.1, 0.7, 0.2, 0.6, 0.3, 0.1, 5.0, 5.0, 0.0, 0.0]])
    assert lookm_kept(4, visual, sums) == [[1, 3, 8, 9]]


def test_lookm_reduces_query_heads_by_their_kv_group_and_breaks_ties_to_the_lower_index():
    # 4 query heads, 2 KV heads; budget 6 as above: text 0, 1, then one image among 2..6.
    # KV head 0 = mean(q0, q1) = LOOKM_SUMS: image 3. KV head 1: q2 alone prefers image 6, q3 alone image 4;
    # their mean ties images 2 and 4 (2.0 each, above 6: 1.5): the lower index, 2.
    sums = torch.zeros(4, 10)
    sums[0] = sums[1] = LOOKM_SUMS[0]
    sums[2, [2, 6]] = torch.tensor([2.0, 3.0])
    sums[3, [2, 4]] = torch.tensor([2.0, 4.0])
    assert lookm_kept(6, LOOKM_VISUAL, sums, query_heads=4, kv_heads=2) == [[0, 1, 3, 7, 8, 9], [0, 1, 2, 7, 8, 9]]


# 5 entries, one KV head: text 0 and 4, image 1..3; budget 2: recent 1 (entry 4), heavy 1: text entry 0.
# Evicted keys 1 and 2 point like key 0, key 3 like key 4.
MERGE_KEYS = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [2.0, -0.1], [0.1, 1.0], [0.0, 1.0]]])
MERGE_VALUES = torch.tensor([[[2.0, 0.0], [4.0, 0.0], [0.0, 8.0], [6.0, 6.0], [0.0, 0.0]]])
MERGE_VISUAL = [False, True, True, True, False]


def lookm_merge(merge):
    signals = FakeSignals(column_sums=torch.tensor([[0.0, 5.0, 5.0, 5.0, 0.0]]))
    out = lookm(MERGE_KEYS, MERGE_VALUES, 2, MERGE_VISUAL, signals, LOOKM_MERGE=merge)
    assert out.index.tolist() == [[0, 4]] and signals.asked == [("sums", None)]
    return out


def test_lookm_pivot_merge_averages_each_kept_entry_with_its_pivot_halves():
    out = lookm_merge("pivot")
    # entry 0 <- 1 and 2: (v0 + (v1 + v0) / 2 + (v2 + v0) / 2) / 3 = ((2, 0) + (3, 0) + (1, 4)) / 3
    # entry 4 <- 3:       (v4 + (v3 + v4) / 2) / 2 = (0 + (3, 3)) / 2
    assert torch.allclose(out.values, torch.tensor([[[2.0, 4 / 3], [1.5, 1.5]]]))
    # keys likewise: ((1, 0) + (1, 0.05) + (1.5, -0.05)) / 3 and ((0, 1) + (0.05, 1)) / 2
    assert torch.allclose(out.keys, torch.tensor([[[3.5 / 3, 0.0], [0.025, 1.0]]]))


@pytest.mark.parametrize("merge", ["avg", "weighted"])
def test_lookm_avg_and_weighted_merge_only_the_entries_at_least_as_similar_as_the_mean(merge):
    out = lookm_merge(merge)
    # best cosines: entry 1 -> 0: 1 / sqrt(1.01) = 0.99504, entry 2 -> 0: 2 / sqrt(4.01) = 0.99875,
    # entry 3 -> 4: 0.99504; their mean 0.99628: only entry 2 merges (into entry 0), entry 4 stays as it was.
    s2 = 2 / math.sqrt(4.01)
    weight = s2 if merge == "weighted" else 1.0
    assert torch.allclose(out.values, torch.tensor([[[1.0, 4.0 * weight], [0.0, 0.0]]]))
    assert torch.allclose(out.keys, torch.tensor([[[(1 + 2 * weight) / 2, -0.05 * weight], [0.0, 1.0]]]))


def test_lookm_an_entry_as_similar_to_two_kept_entries_merges_into_the_lower_one():
    # text 0 and 2 kept (budget 2, recent 1: entry 2; heavy: entry 0); image 1's key is at 45 degrees from both
    keys = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    values = torch.tensor([[[0.0, 0.0], [4.0, 2.0], [1.0, 1.0]]])
    out = lookm(keys, values, 2, [False, True, False], FakeSignals(column_sums=torch.ones(1, 3)))
    assert out.index.tolist() == [[0, 2]]
    assert torch.allclose(out.values, torch.tensor([[[1.0, 0.5], [1.0, 1.0]]]))  # (v0 + (v1 + v0) / 2) / 2


def test_lookm_without_merge_keeps_the_cached_values():
    out = lookm_merge("none")
    assert out.keys is None and torch.equal(out.values, MERGE_VALUES[:, [0, 4]])


def test_lookm_a_budget_of_every_entry_keeps_everything_unchanged_without_reading_attention():
    keys = torch.randn(2, 9, 4)
    values = torch.randn_like(keys)
    signals = FakeSignals()
    for budget in (9, 12):
        out = lookm(keys, values, budget, [True] * 4 + [False] * 5, signals, query_heads=4)
        assert out.index.tolist() == [list(range(9))] * 2
        assert (out.keys is None or torch.equal(out.keys, keys)) and torch.equal(out.values, values)
    assert signals.asked == []


def test_lookm_every_head_keeps_the_budget_in_ascending_order_with_merged_tensors_of_its_shape():
    torch.manual_seed(3)
    length, kv_heads, query_heads = 40, 2, 6
    keys = torch.randn(kv_heads, length, 8)
    values = torch.randn_like(keys)
    signals = CausalSignals(torch.randn(query_heads, length, 8), keys)
    visual = torch.zeros(length, dtype=torch.bool)
    visual[5:30] = True
    for merge in ("pivot", "avg", "weighted"):
        for budget in (1, 2, 3, 8, 20, 39):
            out = lookm(keys, values, budget, visual, signals, query_heads, LOOKM_MERGE=merge)
            assert out.index.shape == (kv_heads, budget) and out.index.dtype == torch.long
            assert torch.equal(out.index, out.index.sort(dim=1).values)
            assert all(len(set(row.tolist())) == budget for row in out.index)
            assert out.keys.shape == out.values.shape == (kv_heads, budget, 8)
            assert torch.isfinite(out.keys).all() and torch.isfinite(out.values).all()


def test_lookm_merges_in_float32_and_returns_the_cache_dtype():
    torch.manual_seed(4)
    keys = torch.randn(2, 20, 8)
    values = torch.randn_like(keys)
    visual = [False] * 3 + [True] * 14 + [False] * 3
    signals = CausalSignals(torch.randn(2, 20, 8), keys)
    exact = lookm(keys, values, 6, visual, signals)
    half = lookm(keys.bfloat16(), values.bfloat16(), 6, visual, signals)
    assert half.keys.dtype == half.values.dtype == torch.bfloat16
    assert torch.equal(half.index, exact.index)
    assert torch.allclose(half.values.float(), exact.values, atol=0.05)


def official_text_prior_merge(attn, keys, values, image_mask, hh_size, recent_size, merge):
    """Transcription of the official ``Text{Pivot,Weighted}Merge_LayerWise.__call__`` / ``TextAVGMergeKVCache_
    LayerWise.__call__`` (SUSTechBruce/LOOK-M, modify_llama.py) for one sample: attn [1, H, L, L], keys / values
    [1, H, L, d]; the hard-coded head size 128 is ``head_dim``; ``image_mask`` replaces the 576-token image spans."""
    hh_score = attn.sum(0).sum(1)  # _update_hh_score
    bsz, num_heads, _, head_dim = keys.shape
    anti_image_mask = torch.full((hh_score.shape[0], hh_score.shape[1]), 0)
    anti_image_mask[:, image_mask] = -65516
    anti_image_mask = anti_image_mask.to(device=hh_score.device, dtype=hh_score.dtype)
    anti_image_mask[:, -recent_size:] = -65516
    hh_score = hh_score + anti_image_mask
    _, keep_topk = torch.topk(hh_score[:, :-recent_size], hh_size, dim=-1)
    keep_topk = keep_topk.sort().values
    hh_score.scatter_(1, keep_topk, 0)
    hh_score[:, -recent_size:] = 0
    mask = hh_score >= 0
    expanded_mask = mask.unsqueeze(-1).expand_as(keys)
    k_hh_recent = torch.masked_select(keys.squeeze(), expanded_mask).view(bsz, num_heads, -1, head_dim)
    v_hh_recent = torch.masked_select(values.squeeze(), expanded_mask).view(bsz, num_heads, -1, head_dim)
    k_hh_pruned = torch.masked_select(keys, ~expanded_mask).view(bsz, num_heads, -1, head_dim)
    similarity = (k_hh_pruned / torch.norm(k_hh_pruned, dim=-1).unsqueeze(-1).repeat(1, 1, 1, head_dim)) @ (
        (k_hh_recent / (torch.norm(k_hh_recent, dim=-1).unsqueeze(-1).repeat(1, 1, 1, head_dim))).transpose(-1, -2))
    max_values, max_indices = similarity.max(dim=-1)
    if merge == "pivot":
        merged_indices = max_indices.unsqueeze(-1).repeat(1, 1, 1, head_dim)
        k_hh_selected = torch.gather(input=k_hh_recent, dim=2, index=merged_indices)
        k_hh_merged = (k_hh_pruned + k_hh_selected) / 2
        k_hh_recent = torch.scatter_reduce(input=k_hh_recent, dim=2, index=merged_indices, src=k_hh_merged,
                                           reduce='mean', include_self=True)
        v_hh_pruned = values.squeeze()[~mask].view(bsz, num_heads, -1, head_dim)
        v_hh_selected = torch.gather(input=v_hh_recent, dim=2, index=merged_indices)
        v_hh_merged = (v_hh_pruned + v_hh_selected) / 2
        v_hh_recent = torch.scatter_reduce(input=v_hh_recent, dim=2, index=merged_indices, src=v_hh_merged,
                                           reduce='mean', include_self=True)
        return mask, k_hh_recent, v_hh_recent
    filter_indices = (max_values.mean(1) >= max_values.mean()).squeeze(0)
    merged_indices = max_indices[..., filter_indices].unsqueeze(-1).repeat(1, 1, 1, head_dim)
    merge_weights = max_values[..., filter_indices].unsqueeze(-1).repeat(1, 1, 1, head_dim)
    k_hh_merged = k_hh_pruned[..., filter_indices, :]
    v_hh_pruned = torch.masked_select(values, ~expanded_mask).view(bsz, num_heads, -1, head_dim)
    v_hh_merged = v_hh_pruned[..., filter_indices, :]
    if merge == "weighted":
        k_hh_merged, v_hh_merged = merge_weights * k_hh_merged, merge_weights * v_hh_merged
    # avg: the official src is the unfiltered k_hh_pruned / v_hh_pruned (the i-th filtered match then receives the
    # i-th evicted entry); LOOK-M here merges each filtered entry into its own match, as the weighted code does
    k_hh_recent = torch.scatter_reduce(input=k_hh_recent, dim=2, index=merged_indices, src=k_hh_merged,
                                       reduce='mean', include_self=True)
    v_hh_recent = torch.scatter_reduce(input=v_hh_recent, dim=2, index=merged_indices, src=v_hh_merged,
                                       reduce='mean', include_self=True)
    return mask, k_hh_recent, v_hh_recent


@pytest.mark.parametrize("merge", ["pivot", "weighted", "avg"])
def test_lookm_matches_the_official_text_prior_merge_per_head_on_causal_attention(merge):
    torch.manual_seed(5)
    heads, length, budget = 3, 30, 12  # recent = heavy = 6 (the official equal ratios)
    queries, keys = torch.randn(heads, length, 8), torch.randn(heads, length, 8)
    values = torch.randn_like(keys)
    visual = torch.ones(length, dtype=torch.bool)
    visual[[0, 1, 22, 23, 24, 27]] = False  # 4 text entries before the window, fewer than the heavy share
    signals = CausalSignals(queries, keys)
    out = lookm(keys, values, budget, visual, signals, LOOKM_MERGE=merge)
    mask, k_official, v_official = official_text_prior_merge(signals.probs[None], keys[None], values[None], visual,
                                                             budget // 2, budget // 2, merge)
    expected = [torch.nonzero(row).flatten().tolist() for row in mask]
    assert out.index.tolist() == expected
    assert len({tuple(row) for row in expected}) == heads  # the heads keep different images
    assert torch.allclose(out.keys, k_official[0], atol=1e-5)
    assert torch.allclose(out.values, v_official[0], atol=1e-5)
