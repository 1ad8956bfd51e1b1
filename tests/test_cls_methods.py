"""The [CLS]-reading methods on an encoder with a true [CLS] token (LLaVA-1.5's CLIP-L/336, 24 layers).

* Registrations declare where the official code reads the [CLS] row (``VisionNeeds.cls_layers`` / ``cls_heads``),
  and ``hooks.cls_vision_layers`` resolves them to the official CLIP layers (errors name the variable and value);
* ``hooks.cls_attention_row`` equals a direct computation of the [CLS] row ("mean" and PruMerge's "single");
* on hand-made ``VisionSignals(..., cls=True)`` whose answer is known, each method selects what its official rule
  selects: FasterVLM's top-k in original order, VisPruner / VisionZip on the declared layer, VTC-CLS's sum over
  exactly the declared layers, PruMerge's single-head values used as given (no renormalisation).
"""

from pathlib import Path

import pytest
import torch

import hooks
import methods
from methods import PRE_LLM, PruneContext, PruneResult, VisionNeeds, VisionSignals
from methods.visionzip import visionzip_merge
from methods.vispruner import vispruner_select
from utils import PruneConfigError

REGISTRY = methods.load_methods()
CLS_METHODS = ["fastervlm_pre_llm", "hiprune_pre_llm", "prumerge_plus_pre_llm", "prumerge_pre_llm",
               "visionzip_pre_llm", "vispruner_pre_llm", "vscan_pre_llm", "vtc_cls_pre_llm"]
DEPTH = 24  # CLIP-L/336 in LLaVA-1.5 / LLaVA-NeXT


def defaults(name, **override):
    return {p.env: p.default for p in REGISTRY[name].params} | override


def needs(name, **params):
    return REGISTRY[name].vision_needs(defaults(name, **params))


def cls_context(features, keep, rows, keys=None, params=None):
    """A pre-LLM context for one span whose vision signals are true [CLS] rows ({layer: [N]})."""
    return PruneContext(features=features, keep=keep, grid=None, modality="image", stage=PRE_LLM,
                        params=params or {}, span_key=0, _vision=VisionSignals(rows, keys, cls=True))


def run(name, ctx):
    result = REGISTRY[name].fn(ctx)
    return result if isinstance(result, PruneResult) else PruneResult(result)


# ---------------------------------------------------------------- registrations and layer resolution
def test_every_cls_method_declares_the_official_layers_and_head_reduction():
    assert sorted(name for name, spec in REGISTRY.items() if spec.vision is not None and not spec.video) == CLS_METHODS
    # the video methods that read the encoder: FastVID's salient tokens, HoliTom's dominant ones
    assert needs("fastvid_pre_llm") == VisionNeeds(cls_layers=(-2, -2), cls_heads="mean", mean_query=True)
    assert needs("holitom_pre_llm") == VisionNeeds(cls_layers=(-2, -2), cls_heads="received")
    single = VisionNeeds(keys=True, cls_layers=(-1, -1), cls_heads="single")
    assert needs("prumerge_pre_llm") == needs("prumerge_plus_pre_llm") == single
    assert needs("visionzip_pre_llm") == VisionNeeds(keys=True, cls_layers=(-2, -2), cls_heads="mean")
    assert needs("vispruner_pre_llm") == VisionNeeds(cls_layers=(-2, -2), cls_heads="mean")
    assert needs("fastervlm_pre_llm") == VisionNeeds(cls_layers=(-2, -2), cls_heads="mean")
    vtc = needs("vtc_cls_pre_llm")
    assert vtc == VisionNeeds(first_layer=16, cls_layers=(16, -2), cls_heads="mean")
    assert vtc.first_layer_var == "VTC_CLS_START_LAYER"
    assert needs("vtc_cls_pre_llm", VTC_CLS_START_LAYER=-7).cls_layers == (-7, -2)
    # HiPrune's official LLaVA score is the all-query mean, not the [CLS] row.
    assert needs("hiprune_pre_llm") == VisionNeeds(first_layer=0, cls_layers=(0, -2), cls_heads="received")


@pytest.mark.parametrize("name, layers", [
    ("prumerge_pre_llm", [23]), ("prumerge_plus_pre_llm", [23]),  # hooks on encoder.layers[23]
    ("visionzip_pre_llm", [22]), ("vispruner_pre_llm", [22]), ("fastervlm_pre_llm", [22]),  # attentions[-2]
    ("vtc_cls_pre_llm", list(range(16, 23))),  # attentions[16:-1]
    ("hiprune_pre_llm", list(range(0, 23))),  # "auto": every layer to attentions[-2]; reads 8 and 22 of them
    ("vscan_pre_llm", list(range(0, 23))),  # "auto": every layer to attentions[-2]; reads 5 and 22 of them
])
def test_the_declared_layers_resolve_to_the_official_clip_layers(name, layers):
    assert hooks.cls_vision_layers(needs(name), DEPTH) == layers


@pytest.mark.parametrize("start", [16, -8, -7, 0, 22, -2])
def test_vtc_cls_range_is_the_official_slice(start):
    """attentions[start:-1] of CLIP's 24 layers, [CLS] row summed over exactly those layers."""
    official = list(range(DEPTH))[start:-1]
    assert hooks.cls_vision_layers(needs("vtc_cls_pre_llm", VTC_CLS_START_LAYER=start), DEPTH) == official


@pytest.mark.parametrize("start", [23, -1, 24, -25])
def test_a_vtc_cls_start_that_leaves_no_layer_names_the_variable_and_value(start):
    with pytest.raises(PruneConfigError) as err:
        hooks.cls_vision_layers(needs("vtc_cls_pre_llm", VTC_CLS_START_LAYER=start), DEPTH)
    message = str(err.value)
    assert message.startswith(f"VTC_CLS_START_LAYER={str(start)!r}: ")
    assert f"[CLS] layers {start}..-2 leave no layer of the encoder to read" in message
    assert "allowed: a layer in -24..23" in message and "up to the method's last [CLS] layer (-2)" in message


def test_a_range_outside_a_shallow_encoder_without_a_variable_is_explained():
    with pytest.raises(PruneConfigError, match=r"\[CLS\] layers -2..-2 leave no layer .*pre-LLM method"):
        hooks.cls_vision_layers(needs("fastervlm_pre_llm"), 1)
    assert hooks.cls_vision_layers(needs("fastervlm_pre_llm"), 2) == [0]


# ---------------------------------------------------------------- the [CLS] row itself
def clip_like_qk(heads=4, dim=8, patches=9, seed=0):
    """q / k of one image as a CLIP attention produces them: (H, 1 + P, d), [CLS] first, sharp-ish logits."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(heads, 1 + patches, dim, generator=gen) * 2,
            torch.randn(heads, 1 + patches, dim, generator=gen) * 2)


@pytest.mark.parametrize("seed", range(3))
def test_cls_row_mean_is_each_heads_softmax_row_averaged(seed):
    query, key = clip_like_qk(seed=seed)
    scale = 8 ** -0.5
    direct = []
    for h in range(4):  # one head at a time, the way output_attentions exposes them
        probs = torch.softmax((query[h] @ key[h].T) * scale, dim=-1)  # (1 + P, 1 + P)
        direct.append(probs[0, 1:])
    expected = torch.stack(direct).mean(dim=0)
    row = hooks.cls_attention_row(query, key, scale, "mean")
    assert row.shape == (9,) and row.dtype == torch.float32
    torch.testing.assert_close(row, expected)
    cls_self = torch.stack([torch.softmax(query[h, 0] @ key[h].T * scale, dim=-1)[0] for h in range(4)]).mean()
    torch.testing.assert_close(row.sum() + cls_self, torch.tensor(1.0))  # [CLS] column dropped, not renormalised


@pytest.mark.parametrize("seed", range(3))
def test_cls_row_single_is_one_full_width_head(seed):
    """PruMerge: softmax(q k^T * C^-0.5) on the whole q_proj / k_proj outputs (C = H * d), row 0, patches."""
    gen = torch.Generator().manual_seed(seed)
    tokens, heads, dim = 10, 4, 8
    q_full, k_full = torch.randn(tokens, heads * dim, generator=gen), torch.randn(tokens, heads * dim, generator=gen)
    expected = torch.softmax(q_full @ k_full.T * (heads * dim) ** -0.5, dim=-1)[0, 1:]
    # split into heads the way a CLIP attention module views its projections: (1 + P, H, d) -> (H, 1 + P, d)
    query = q_full.view(tokens, heads, dim).transpose(0, 1)
    key = k_full.view(tokens, heads, dim).transpose(0, 1)
    for scale in (dim ** -0.5, 123.0):  # the module's per-head scale is not used
        torch.testing.assert_close(hooks.cls_attention_row(query, key, scale, "single"), expected)
    assert not torch.allclose(hooks.cls_attention_row(query, key, dim ** -0.5, "mean"), expected)


# ---------------------------------------------------------------- FasterVLM
def test_fastervlm_keeps_the_top_k_of_the_cls_row_in_original_order():
    row = torch.tensor([0.01, 0.30, 0.02, 0.10, 0.05, 0.25, 0.00, 0.12])
    ctx = cls_context(torch.randn(8, 4), 3, {22: row})
    assert ctx.vision_has_cls
    assert REGISTRY["fastervlm_pre_llm"].fn(ctx).tolist() == [1, 5, 7]  # ranks 1, 5, 7: positional order
    assert REGISTRY["fastervlm_pre_llm"].fn(cls_context(torch.randn(8, 4), 8, {22: row})).tolist() == list(range(8))
    ties = cls_context(torch.randn(6, 4), 2, {22: torch.full((6,), 0.1)})
    assert REGISTRY["fastervlm_pre_llm"].fn(ties).tolist() == [0, 1]  # equal scores: the lower index


def test_fastervlm_reads_the_declared_layer_and_serves_the_substitute_alike():
    row = torch.tensor([0.01, 0.30, 0.02, 0.10, 0.05, 0.25, 0.00, 0.12])
    decoy = row.flip(0)  # an earlier layer, ranked the other way round
    with_decoy = cls_context(torch.randn(8, 4), 3, {21: decoy, 22: row})
    assert REGISTRY["fastervlm_pre_llm"].fn(with_decoy).tolist() == [1, 5, 7]
    substitute = PruneContext(features=torch.randn(8, 4), keep=3, grid=None, modality="image", stage=PRE_LLM,
                              params={}, span_key=0, _vision=VisionSignals({31: row}))
    assert not substitute.vision_has_cls
    assert REGISTRY["fastervlm_pre_llm"].fn(substitute).tolist() == [1, 5, 7]


# ---------------------------------------------------------------- VisPruner
def test_vispruner_ranks_important_tokens_by_the_declared_cls_row():
    # 8 tokens; the [CLS] row of layer 22 ranks them 0..7. 3 important (0, 1, 2); residual ranks 3..7 with
    # 3 diverse to keep: a = 3, 5, 7 and b = 4, 6; 3 and 7 duplicate b-tokens, 5 is distinct.
    row = torch.linspace(0.2, 0.05, 8)
    directions = torch.eye(4)
    features = torch.stack([directions[0], directions[0], directions[0], directions[1], directions[1],
                            directions[3], directions[2], directions[2]])
    decoy = row.flip(0)  # layer 21 ranks them the other way round
    ctx = cls_context(features, 6, {21: decoy, 22: row}, params=defaults("vispruner_pre_llm"))
    chosen = REGISTRY["vispruner_pre_llm"].fn(ctx).tolist()
    assert chosen == [0, 1, 2, 4, 5, 6]
    assert chosen == sorted(vispruner_select(row, features, 6, 0.5).tolist())
    assert chosen != sorted(vispruner_select(decoy, features, 6, 0.5).tolist())


# ---------------------------------------------------------------- VisionZip
def test_visionzip_on_the_declared_layer_gives_the_whole_dominant_budget_to_patches():
    row = torch.tensor([0.0, 0.01, 0.3, 0.02, 0.0, 0.2, 0.01, 0.4, 0.0, 0.01])
    decoy = torch.tensor([0.5, 0.4, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    metric = torch.zeros(10, 2)
    metric[[0, 1, 3]] = torch.tensor([1.0, 0.0])
    metric[[4, 6, 8, 9]] = torch.tensor([0.0, 1.0])
    # Two heads whose mean is ``metric`` (the official head-averaged keys); token 1's head 0 points at target 4.
    keys = torch.stack([metric, metric], dim=1)  # [N, H=2, d=2]
    keys[1] = torch.tensor([[0.0, 3.0], [2.0, -3.0]])
    torch.testing.assert_close(keys.mean(dim=1), metric)
    features = torch.arange(10.0).unsqueeze(1) * torch.tensor([1.0, 10.0])
    ctx = cls_context(features, 5, {21: decoy, 22: row}, keys, params={"VISIONZIP_DOMINANT_RATIO": 0.6})
    result = run("visionzip_pre_llm", ctx)
    # D = round(5 * 0.6) = 3 patches (the official code: the [CLS] + 2 patches): 7, 2, 5 by the layer-22 row.
    # Remaining 0 1 3 4 6 8 9: step 7 // 2 = 3, targets 0 and 4; 1, 3 join 0 and 6, 8, 9 join 4 by key cosine.
    assert result.indices.tolist() == [2, 5, 7, 0, 4]
    torch.testing.assert_close(result.features[:3], features[[2, 5, 7]])
    torch.testing.assert_close(result.features[3], features[0] + features[[1, 3]].mean(dim=0))
    torch.testing.assert_close(result.features[4], features[4] + features[[6, 8, 9]].mean(dim=0))
    _, first_head = visionzip_merge(row, keys[:, 0], features, 3, 2)  # head 0 alone: token 1 would join 4
    torch.testing.assert_close(first_head[4], features[4] + features[[1, 6, 8, 9]].mean(dim=0))


# ---------------------------------------------------------------- VTC-CLS
def test_vtc_cls_sums_exactly_the_declared_layers():
    layers = hooks.cls_vision_layers(needs("vtc_cls_pre_llm"), DEPTH)  # 16..22, as the family captures them
    rows = {layer: torch.zeros(6) for layer in layers}
    rows[16][0] = 0.5  # token 0: only in the first declared layer
    for layer in range(17, 23):
        rows[layer][1] = 0.1  # token 1: 0.6 in all, spread over 17..22
    rows[22][2] = 0.45  # token 2: only in the last declared layer
    ctx = cls_context(torch.randn(6, 3), 2, rows, params=defaults("vtc_cls_pre_llm"))
    assert REGISTRY["vtc_cls_pre_llm"].fn(ctx).tolist() == [0, 1]  # sums 0.5, 0.6, 0.45
    without_first = {layer: row for layer, row in rows.items() if layer != 16}
    assert REGISTRY["vtc_cls_pre_llm"].fn(cls_context(torch.randn(6, 3), 2, without_first)).tolist() == [1, 2]


# ---------------------------------------------------------------- PruMerge / PruMerge+
def test_prumerge_uses_the_single_head_values_as_given():
    # The [CLS] row of layer 23 as the "single" head gives it: the [CLS] keeps 0.3 for itself, the patches
    # share 0.7. One IQR outlier (token 0) of 8: int(8 * 1/8) = 1 token kept, plus the extra token.
    row = torch.tensor([0.40, 0.05, 0.05, 0.04, 0.05, 0.03, 0.04, 0.04])
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],  # token 0: full-width key (1, 0, 0, 1)
                         [[1.0, 1.0], [0.0, 0.0]],  # token 1: cosine 0.5 over the full width (1.0 by head mean)
                         [[1.0, 0.0], [0.0, 0.5]]]  # token 2: cosine 0.95 over the full width
                        + [[[-1.0, 0.0], [0.0, -1.0]]] * 5)
    features = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    ctx = cls_context(features, 4, {23: row}, keys, params=defaults("prumerge_pre_llm", PRUMERGE_NEIGHBOURS=1))
    result = run("prumerge_pre_llm", ctx)
    assert result.indices.tolist() == [0, 1]  # the kept token, then the extra token at the first most attended
    torch.testing.assert_close(result.features[0], features[0] + 0.05 * features[2])  # full-width neighbour: 2
    torch.testing.assert_close(result.features[1], (row[1:, None] * features[1:]).sum(dim=0))  # not renormalised


def test_prumerge_plus_adds_the_official_uniform_samples_on_the_cls_row():
    row = torch.full((24,), 0.01)
    row[[8, 13]] = torch.tensor([0.6, 0.4])  # 2 outliers of 24: r = 1/12, stride int(12 / 3) = 4
    ctx = cls_context(torch.randn(24, 3), 1, {23: row}, torch.randn(24, 2, 4), defaults("prumerge_plus_pre_llm"))
    assert run("prumerge_plus_pre_llm", ctx).indices.tolist() == [8, 13, 0, 4, 12, 16, 20, 1]


# ---------------------------------------------------------------- all of them, with the signals the family captures
@pytest.mark.parametrize("name", CLS_METHODS)
def test_every_cls_method_runs_on_the_layers_its_registration_captures(name):
    gen = torch.Generator().manual_seed(3)
    n = 36
    params = defaults(name, PRUMERGE_ADAPTIVE=False)
    spec = needs(name, **params)
    rows = {layer: torch.softmax(torch.randn(n + 1, generator=gen) * 3, dim=0)[1:]
            for layer in hooks.cls_vision_layers(spec, DEPTH)}
    keys = torch.randn(n, 16, 64, generator=gen) if spec.keys else None
    features = torch.randn(n, 32, generator=gen)
    for keep in (1, 5, 18, 36):
        result = run(name, cls_context(features, keep, rows, keys, params))
        assert len(set(result.indices.tolist())) == result.indices.numel() == keep, (name, keep)


def test_docs_list_fastervlm():
    table = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    assert "| `fastervlm_pre_llm` | pre-LLM |" in table
