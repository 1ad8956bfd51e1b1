"""HiPrune (``hiprune_pre_llm``): the layers it declares and reads, hand-made inputs whose answer is known (anchors,
their grid neighbours, registers among the rest, overlaps, exact count), and a comparison with a loop written the
way the official code computes the selection (Danielement321/HiPrune, ``encode_images`` in llava_arch.py) on
random 24 x 24 grids."""

import pytest
import torch

import hooks
import methods
from methods import PRE_LLM, PruneContext, VisionNeeds, VisionSignals
from methods.hiprune import hiprune_layers, hiprune_select, layer
from utils import PruneConfig, PruneConfigError

REGISTRY = methods.load_methods()
SPEC = REGISTRY["hiprune_pre_llm"]


def params(**override):
    return {p.env: p.default for p in SPEC.params} | override


def context(keep, attention, grid=None, cls=False, n=None, **override):
    """A pre-LLM context for one span with planted encoder signals ({layer: [N]})."""
    n = n or next(iter(attention.values())).numel()
    return PruneContext(features=torch.zeros(n, 4), keep=keep, grid=grid, modality="image", stage=PRE_LLM,
                        params=params(**override), span_key=0, _vision=VisionSignals(attention, cls=cls))


def official_loop(shallow, deep, keep, alpha, width):
    """The official selection, step by step (llava_arch.py ``encode_images``; the Qwen block is the same with the
    LLM grid width): round(K * alpha / 5) anchors by ``topk``, the flat indices +-1 and +-width of each clamped to
    [0, N - 1], duplicates once; then the K - |those| tokens with the largest ``deep - chosen`` (topk)."""
    n = len(shallow)
    anchor_num = round(keep * alpha / 5)
    anchors = sorted(range(n), key=lambda i: -shallow[i])[:anchor_num]
    candidates = anchors + [i - 1 for i in anchors] + [i + 1 for i in anchors] + \
        [i - width for i in anchors] + [i + width for i in anchors]
    chosen = {min(max(i, 0), n - 1) for i in candidates}
    masked = [deep[i] - (1 if i in chosen else 0) for i in range(n)]
    registers = sorted(range(n), key=lambda i: -masked[i])[:keep - len(chosen)]
    return sorted(chosen | set(registers))


def grid_loop(shallow, deep, keep, alpha, h, w):
    """The same loop with true 4-neighbours on an h x w grid (nothing across a row end, nothing off the grid)."""
    n = len(shallow)
    anchors = sorted(range(n), key=lambda i: -shallow[i])[:round(keep * alpha / 5)]
    chosen = set(anchors)
    for i in anchors:
        row, col = divmod(i, w)
        for r, c in ((row, col - 1), (row, col + 1), (row - 1, col), (row + 1, col)):
            if 0 <= r < h and 0 <= c < w:
                chosen.add(r * w + c)
    rest = sorted((i for i in range(n) if i not in chosen), key=lambda i: -deep[i])
    return sorted(chosen | set(rest[:keep - len(chosen)]))


# ---------------------------------------------------------------- registration and layers
def test_registration_declares_both_layers_and_the_official_defaults():
    assert SPEC.stage == PRE_LLM and SPEC.exact_count
    assert params() == {"HIPRUNE_ALPHA": 0.1, "HIPRUNE_OBJECT_LAYER": "auto"}
    assert SPEC.vision_needs(params()) == VisionNeeds(first_layer=0, cls_layers=(0, -2), cls_heads="received")
    nine = SPEC.vision_needs(params(HIPRUNE_OBJECT_LAYER=9))
    assert nine == VisionNeeds(first_layer=8, cls_layers=(8, -2), cls_heads="received")
    assert hooks.cls_vision_layers(nine, 24) == list(range(8, 23))  # CLIP-L: attentions[8] .. attentions[-2]
    sixteen = SPEC.vision_needs(params(HIPRUNE_OBJECT_LAYER=16))
    assert hooks.vision_layers(sixteen, [7, 15, 23, 31], 32) == [15, 23, 31]  # Qwen2.5-VL's full-attention blocks
    assert layer(" Auto ") == "auto" and layer("9") == 9
    object_check, alpha_check = SPEC.params[1].check, SPEC.params[0].check
    assert object_check("auto") is None and object_check(1) is None and object_check(0)
    assert alpha_check(0.0) is None and alpha_check(1.0) is None and alpha_check(1.5)
    with pytest.raises(PruneConfigError, match=r"HIPRUNE_OBJECT_LAYER='0': must be 'auto' or a layer >= 1"):
        PruneConfig.from_env({"KEEP_RATIO": "0.5", "PRUNE_METHOD": "hiprune_pre_llm", "HIPRUNE_OBJECT_LAYER": "0"})
    with pytest.raises(PruneConfigError, match=r"\[CLS\] layers 23..-2 leave no layer"):  # past the deep layer 22
        hooks.cls_vision_layers(SPEC.vision_needs(params(HIPRUNE_OBJECT_LAYER=24)), 24)


def test_auto_resolves_to_the_official_layers_and_scales_elsewhere():
    rows = {index: torch.rand(6) for index in range(23)}  # CLIP-L [CLS] rows 0..22 (auto: cls_layers 0..-2)
    assert hiprune_layers(context(2, rows, cls=True)) == (8, 22)  # official: attentions[9 - 1], attentions[-2]
    qwen25 = {index: torch.rand(6) for index in (7, 15, 23, 31)}
    assert hiprune_layers(context(2, qwen25)) == (15, 31)  # official: block 16 - 1, the last block
    assert hiprune_layers(context(2, qwen25, HIPRUNE_OBJECT_LAYER=9)) == (15, 31)  # window block 8: next full one
    assert hiprune_layers(context(2, {i: torch.rand(6) for i in range(27)})) == (12, 26)  # 27 layers: 13th
    assert hiprune_layers(context(2, {i: torch.rand(6) for i in range(16)})) == (7, 15)  # Gemma 4's 16: 8th
    assert hiprune_layers(context(2, {0: torch.rand(6), 1: torch.rand(6)})) == (0, 1)  # tiny encoders still run
    assert hiprune_layers(context(2, {i: torch.rand(6) for i in range(8, 23)}, cls=True,
                                  HIPRUNE_OBJECT_LAYER=9)) == (8, 22)


def test_the_method_reads_the_object_and_deep_layers_and_no_other():
    grid, n = (1, 6, 6), 36
    rows = {index: torch.zeros(n) for index in range(23)}
    for index in rows:
        rows[index][35] = 0.9  # a decoy in every other layer
    rows[8] = torch.zeros(n)
    rows[8][14] = 0.5  # the only anchor (keep 10, alpha 0.5: round(1.0) = 1)
    rows[22] = torch.zeros(n)
    rows[22][[0, 1, 2, 3, 4, 5]] = torch.tensor([0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    kept = SPEC.fn(context(10, rows, grid, cls=True, HIPRUNE_ALPHA=0.5)).tolist()
    # anchor 14, buffers 13, 15, 8, 20, registers 0..4 (0.6 .. 0.2 at layer 22)
    assert kept == [0, 1, 2, 3, 4, 8, 13, 14, 15, 20]


# ---------------------------------------------------------------- hand-made selections
def test_anchors_their_neighbours_and_registers_among_the_rest():
    shallow = torch.zeros(36)
    shallow[[14, 15, 30]] = torch.tensor([0.9, 0.8, 0.7])  # two anchors: (2, 2) and (2, 3), side by side
    deep = torch.linspace(0.01, 0.02, 36)
    deep[[14, 9, 0, 35]] = torch.tensor([0.9, 0.8, 0.7, 0.6])  # 14 and 9 are taken already: registers 0, 35
    anchors, buffers, registers = hiprune_select(shallow, deep, 10, 1.0, (1, 6, 6))  # round(10 / 5) = 2 anchors
    assert anchors.tolist() == [14, 15]
    assert buffers.tolist() == [13, 8, 20, 16, 9, 21]  # 14: left, (15), up, down; 15: (14), right, up, down
    assert registers.tolist() == [0, 35]
    ctx = context(10, {15: shallow, 31: deep}, (1, 6, 6), HIPRUNE_ALPHA=1.0)
    assert SPEC.fn(ctx).tolist() == [0, 8, 9, 13, 14, 15, 16, 20, 21, 35]


def test_borders_have_no_wrapped_or_clamped_neighbours_unlike_the_flat_official_indices():
    shallow = torch.zeros(16)
    shallow[3] = 1.0  # corner (0, 3) of a 4 x 4 grid
    deep = torch.arange(16, 0, -1).float() / 100  # registers: the lowest free indices
    anchors, buffers, registers = hiprune_select(shallow, deep, 5, 1.0, (1, 4, 4))  # 1 anchor
    assert (anchors.tolist(), buffers.tolist(), registers.tolist()) == ([3], [2, 7], [0, 1])
    # The official flat arithmetic adds 4 (row 1, col 0: +1 wraps) and 0 (3 - 4 clamped): no register left.
    assert official_loop(shallow.tolist(), deep.tolist(), 5, 1.0, 4) == [0, 2, 3, 4, 7]


def test_video_frames_are_separate_grids():
    shallow = torch.zeros(18)
    shallow[11] = 1.0  # frame 1, row 0, last column of a (2, 3, 3) grid
    anchors, buffers, _ = hiprune_select(shallow, torch.rand(18), 5, 1.0, (2, 3, 3))
    assert (anchors.tolist(), buffers.tolist()) == ([11], [10, 14])  # not 12 (next row) nor 8 (frame 0)


def test_overlapping_anchors_count_once_and_the_total_is_exact():
    shallow = torch.zeros(25)
    shallow[[12, 13, 7, 18]] = torch.tensor([0.9, 0.8, 0.7, 0.6])  # 4 anchors close together: shared neighbours
    deep = torch.rand(25, generator=torch.Generator().manual_seed(0))
    anchors, buffers, registers = hiprune_select(shallow, deep, 20, 1.0, (1, 5, 5))  # round(20 / 5) = 4
    assert anchors.tolist() == [12, 13, 7, 18]
    assert buffers.tolist() == [11, 17, 14, 8, 6, 2, 19, 23]  # by anchor: 12's 11, 17; 13's 14, 8; 7's 6, 2; ...
    chosen = torch.cat([anchors, buffers, registers])
    assert chosen.numel() == len(set(chosen.tolist())) == 20
    rest = sorted(set(range(25)) - set(anchors.tolist()) - set(buffers.tolist()), key=lambda i: -float(deep[i]))
    assert sorted(registers.tolist()) == sorted(rest[:8])


def test_anchor_count_rounds_as_python_and_buffers_never_exceed_the_budget():
    scores = torch.rand(400, generator=torch.Generator().manual_seed(1))
    grid = (1, 20, 20)
    assert hiprune_select(scores, scores, 25, 0.1, grid)[0].numel() == 0  # round(0.5) = 0: registers only
    assert hiprune_select(scores, scores, 75, 0.1, grid)[0].numel() == 2  # round(1.5) = 2
    shallow = torch.zeros(400)
    shallow[210] = 1.0  # interior anchor, 4 neighbours, but keep 3 (round(3 / 5) = 1 anchor)
    anchors, buffers, registers = hiprune_select(shallow, scores, 3, 1.0, grid)
    assert (anchors.tolist(), buffers.tolist(), registers.tolist()) == ([210], [209, 211], [])


def test_without_a_grid_there_are_no_buffers():
    shallow = torch.tensor([0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    deep = torch.tensor([0.1, 0.0, 0.9, 0.5, 0.0, 0.4, 0.0, 0.3, 0.2, 0.0])
    for grid in (None, (1, 3, 3)):  # unknown, or not the span's length (a grid of 9 for 10 tokens)
        assert SPEC.fn(context(5, {15: shallow, 31: deep}, grid, HIPRUNE_ALPHA=1.0)).tolist() == [2, 3, 5, 7, 8]


def test_nothing_to_prune_keeps_everything_and_ties_go_to_the_lower_index():
    flat = torch.full((9,), 0.1)
    assert SPEC.fn(context(9, {0: flat, 1: flat}, (1, 3, 3))).tolist() == list(range(9))
    assert SPEC.fn(context(3, {0: flat, 1: flat}, (1, 3, 3))).tolist() == [0, 1, 2]  # 0 anchors, ties
    assert SPEC.fn(context(5, {0: flat, 1: flat}, (1, 3, 3), HIPRUNE_ALPHA=1.0)).tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- against the official loop, 24 x 24
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("keep, alpha", [(64, 0.1), (192, 0.1), (128, 0.5), (192, 1.0), (25, 0.3)])
def test_matches_the_official_loop_on_a_24x24_grid(seed, keep, alpha):
    gen = torch.Generator().manual_seed(seed)
    shallow = torch.softmax(torch.randn(576, generator=gen) * 2, dim=0)
    deep = torch.softmax(torch.randn(576, generator=gen) * 2, dim=0)
    grid_ref = grid_loop(shallow.tolist(), deep.tolist(), keep, alpha, 24, 24)
    kept = SPEC.fn(context(keep, {8: shallow, 22: deep}, (1, 24, 24), cls=True, HIPRUNE_ALPHA=alpha,
                           HIPRUNE_OBJECT_LAYER=9))
    assert kept.tolist() == grid_ref and kept.numel() == keep
    # Interior anchors (the border's object-layer scores lowered): the official flat arithmetic gives the same set.
    border = torch.ones(24, 24, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    interior = shallow.masked_fill(border.flatten(), 0.0)
    kept = SPEC.fn(context(keep, {8: interior, 22: deep}, (1, 24, 24), cls=True, HIPRUNE_ALPHA=alpha))
    assert kept.tolist() == official_loop(interior.tolist(), deep.tolist(), keep, alpha, 24)
