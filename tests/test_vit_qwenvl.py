"""The ViT stage on Qwen-VL's vision transformer (a packed encoder whose tokens are 2x2 merge units):

* keep ratio 1.0: logits and greedy ids bit-identical to the unpatched model, every Qwen family, eager and sdpa,
  images and a video in one prompt;
* on a 4-block encoder (Qwen2.5-VL: windowed blocks 0 and 2 around full-attention blocks 1 and 3; Qwen3-VL:
  deepstack after blocks 0 and 2), the pruned encoder equals a hand-written loop over its blocks: the methods applied
  by hand to each image's or frame's units in raster order between blocks, the attention segments rebuilt by hand from
  geometry (per item; per window of units for windowed blocks), the mergers' outputs put back at full length;
  features, deepstack features and kept tokens alike;
* the language model then equals the unpatched language model on the hand-shortened sequence (prefill, decode);
* proportional attention is refused with a message naming the variable; ToMe with it off runs.
"""

from __future__ import annotations

import functools

import pytest
import torch

import custom_qwenvl
import methods
from methods import EncoderSignals, PruneContext, PruneResult
from tests.oracle import ATTN, capture_lm_inputs, forward_logits, greedy, patched
from tests.support.tiny_models import FAMILIES, build_model
from tests.test_qwenvl import inputs_for, reference_pre_llm
from utils import PruneConfig, keep_count

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
SPECS = "1:random_vit:0.5;2:tome_vit:0.5"  # a selection, then a ToMe merge reading the keys of block 1
ENV = dict(VIT_LAYER_SPECS=SPECS, TOME_PROP_ATTN="0")
DEEP = {"qwen2_vl": dict(depth=4), "qwen2_5_vl": dict(depth=4, fullatt_block_indexes=[1, 3]),
        "qwen3_vl": dict(depth=4, deepstack_visual_indexes=[0, 2])}


@functools.lru_cache(maxsize=None)
def deep_model(family, attn="sdpa"):
    return build_model(family, attn_implementation=attn, num_layers=2, vision_overrides=DEEP[family])


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_ratio_one_is_bit_identical(family, attn):
    model, inputs = deep_model(family, attn), inputs_for(family, "image_video")
    ref_logits, (ref_ids, ref_steps) = forward_logits(model, inputs), greedy(model, inputs, STEPS)
    with patched(custom_qwenvl, VIT_LAYER_SPECS="1:random_vit:1.0;3:tome_vit:1.0"):
        logits = forward_logits(model, inputs)
        ids, steps = greedy(model, inputs, STEPS)
        record = custom_qwenvl.last_record(model)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps)
    assert all(list(s.counts) == ["input", "vit_1", "vit_3"] and len(set(s.counts.values())) == 1
               for s in record.spans[0])


# ------------------------------------------------------------------------------------------------------
# The encoder against a hand-written loop over its blocks
# ------------------------------------------------------------------------------------------------------
def geometry(visual, grid_thw):
    """Per unit in the encoder's order: its feature token, its item (image or frame) and its attention window,
    derived from the grid: items raster by raster; Qwen2.5-VL orders every item's units window by window (windows of
    w x w units in raster order, units raster within a window)."""
    merge = visual.spatial_merge_size
    side = visual.window_size // merge // visual.patch_size if hasattr(visual, "fullatt_block_indexes") else None
    units, grids, token = [], [], 0
    for t, h, w in grid_thw.tolist():
        for _ in range(t):
            rows, cols = h // merge, w // merge
            item = len(grids)
            cells = [(r, c) for r in range(rows) for c in range(cols)]
            if side:
                cells.sort(key=lambda rc: (rc[0] // side, rc[1] // side, rc[0], rc[1]))
            units += [(token + r * cols + c, item, (item, r // side, c // side) if side else item) for r, c in cells]
            grids.append((rows, cols))
            token += rows * cols
    windows = {w: i for i, w in enumerate(dict.fromkeys(u[2] for u in units))}
    return (torch.tensor([u[0] for u in units]), torch.tensor([u[1] for u in units]),
            torch.tensor([windows[u[2]] for u in units]), grids)


def stock_inputs(visual, pixel_values, grid_thw):
    """What the unpatched encoder gives its first block: the rows and the rotary tables (the model's own)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(hidden=args[0] if args else kwargs["hidden_states"], rotary=kwargs["position_embeddings"])

    handle = visual.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        visual(pixel_values, grid_thw=grid_thw)
    finally:
        handle.remove()
    return seen["hidden"], seen["rotary"]


def reference_encoder(model, pixel_values, grid_thw):
    """The features in token order (zeros where no unit is kept), the deepstack features likewise, and the kept
    tokens, with SPECS applied by hand."""
    visual = model.model.visual
    token, item, window, grids = geometry(visual, grid_thw)
    unit = visual.spatial_merge_size ** 2
    params = PruneConfig.from_env(ENV).params
    stages = {1: ("random_vit", 0.5), 2: ("tome_vit", 0.5)}
    full_blocks = set(getattr(visual, "fullatt_block_indexes", range(len(visual.blocks))))
    deepstack = list(getattr(visual, "deepstack_visual_indexes", []))
    x, rotary = stock_inputs(visual, pixel_values, grid_thw)
    current, sizes = torch.arange(token.numel()), torch.ones(token.numel())  # units in the encoder's order
    keys, extra = None, []

    def to_full(merged):  # one row per current unit -> token order, zeros elsewhere
        out = merged.new_zeros(token.numel(), merged.shape[1])
        out[token[current]] = merged
        return out

    for block, blk in enumerate(visual.blocks):
        if block in stages:
            name, ratio = stages[block]
            states = x.view(-1, unit * x.shape[1])
            chosen, new_states, new_sizes = [], [], []
            for i, (h, w) in enumerate(grids):
                mine = torch.nonzero(item[current] == i).flatten()
                mine = mine[token[current][mine].argsort()]  # raster order
                ctx = PruneContext(features=states[mine], keep=keep_count(h * w, ratio),
                                   grid=(1, h, w) if mine.numel() == h * w else None, modality="image",
                                   stage=methods.VIT, params=params.get(name, {}), span_key=block, layer=block,
                                   sizes=sizes[mine], _encoder=EncoderSignals(keys[mine]))
                result = methods.registered_methods()[name].fn(ctx)
                result = result if isinstance(result, PruneResult) else PruneResult(result)
                chosen.append(mine[result.indices])
                new_states.append(states[mine][result.indices] if result.features is None else result.features)
                new_sizes.append(sizes[mine][result.indices] if result.sizes is None else result.sizes)
            chosen = torch.cat(chosen)
            order = current[chosen].argsort()
            current, sizes = current[chosen][order], torch.cat(new_sizes)[order]
            x = torch.cat(new_states)[order].reshape(-1, x.shape[1])
        groups = item[current] if block in full_blocks else window[current]
        lengths = torch.unique_consecutive(groups, return_counts=True)[1] * unit
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
        rows = (current[:, None] * unit + torch.arange(unit)).flatten()
        normed = blk.norm1(x)
        qkv = blk.attn.qkv(normed).view(x.shape[0], 3, blk.attn.num_heads, blk.attn.head_dim)
        keys = qkv[:, 1].float().view(-1, unit, blk.attn.num_heads, blk.attn.head_dim).transpose(1, 2).flatten(2)
        x = blk(x, cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()),
                position_embeddings=tuple(t[rows] for t in rotary))
        if block in deepstack:
            extra.append(to_full(visual.deepstack_merger_list[deepstack.index(block)](x)))
    kept = torch.zeros(token.numel(), dtype=torch.bool)
    kept[token[current]] = True
    return to_full(visual.merger(x)), extra, kept


def feature_call(model, inputs):
    out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return torch.cat(out.pooler_output), [torch.cat(f) for f in getattr(out, "deepstack_features", None) or []]


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_encoder_equals_a_hand_written_loop_over_its_blocks(family, attn):
    model, inputs = deep_model(family, attn), inputs_for(family, "two_images")
    with torch.no_grad():
        expected, expected_deep, kept = reference_encoder(model, inputs["pixel_values"], inputs["image_grid_thw"])
    with patched(custom_qwenvl, **ENV), torch.no_grad():
        features, deep = feature_call(model, inputs)
        masks = custom_qwenvl.pruning_state(model).pending_vit["image"]
    assert torch.equal(torch.cat([m["vit_2"] for m in masks]), kept)
    assert 0 < int(kept.sum()) < kept.numel() // 2 + 2  # two halvings, rounding up per item
    assert torch.equal(features[kept], expected[kept])
    assert len(deep) == len(expected_deep)
    for got, ref in zip(deep, expected_deep):
        assert torch.equal(got[kept], ref[kept])


def test_windows_really_change_between_the_stage_and_the_stock_layout():
    """The case under test for Qwen2.5-VL: the second image spans several windows, and after the stages some keep
    fewer units than others (so the windowed blocks run on rebuilt segments)."""
    model, inputs = deep_model("qwen2_5_vl"), inputs_for("qwen2_5_vl", "two_images")
    visual = model.model.visual
    _, item, window, _ = geometry(visual, inputs["image_grid_thw"])
    with torch.no_grad():
        _, _, kept = reference_encoder(model, inputs["pixel_values"], inputs["image_grid_thw"])
    token, *_ = geometry(visual, inputs["image_grid_thw"])
    per_window = torch.bincount(window[kept[token]], minlength=int(window.max()) + 1)
    assert int(window.max()) >= 3 and len(set(per_window.tolist())) > 1


# ------------------------------------------------------------------------------------------------------
# The language model against the hand-shortened sequence
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_equals_the_hand_shortened_sequence(family):
    model, inputs = deep_model(family), inputs_for(family, "two_images")
    with patched(custom_qwenvl, **ENV):
        logits = forward_logits(model, inputs)
        ids, steps = greedy(model, inputs, STEPS)
        keep = custom_qwenvl.pruning_state(model).pre_map.index
    lm = dict(capture_lm_inputs(model, inputs))
    with torch.no_grad():
        expected, expected_deep, kept = reference_encoder(model, inputs["pixel_values"], inputs["image_grid_thw"])
    image_rows = inputs["input_ids"] == model.config.image_token_id
    embeds = lm["inputs_embeds"].clone()
    embeds[image_rows] = expected.to(embeds.dtype)
    lm["inputs_embeds"] = embeds
    if expected_deep:
        lm["deepstack_visual_embeds"] = expected_deep
    dropped = torch.nonzero(image_rows[0]).flatten()[~kept]
    assert set(keep[0].tolist()) == set(range(image_rows.shape[1])) - set(dropped.tolist())
    with torch.no_grad():
        ref_prefill, ref_steps = reference_pre_llm(model, lm, keep, ids)
    assert torch.equal(logits, ref_prefill)
    assert torch.equal(steps, ref_steps)


# ------------------------------------------------------------------------------------------------------
# Videos, batches, refusals
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_video_frame_is_its_own_item(family):
    model, inputs = deep_model(family), inputs_for(family, "image_video")
    with patched(custom_qwenvl, VIT_LAYER_SPECS="1:random_vit:0.5"):
        forward_logits(model, inputs)
        record = custom_qwenvl.last_record(model)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    per_frame = (h // 2) * (w // 2)
    video = [s for s in record.spans[0] if s.modality == "video"]
    assert sum(s.counts["vit_1"] for s in video) == t * keep_count(per_frame, 0.5)


def test_left_padded_batch_equals_each_sample_alone():
    model, inputs = deep_model("qwen2_5_vl"), inputs_for("qwen2_5_vl", "batch")
    from tests.test_qwenvl import single

    with patched(custom_qwenvl, **ENV):
        batch = forward_logits(model, inputs)
        for b in range(batch.shape[0]):
            alone = forward_logits(model, single(inputs, b))
            torch.testing.assert_close(batch[b, -alone.shape[1]:], alone[0], rtol=1e-4, atol=1e-5)


def test_proportional_attention_is_refused_with_the_variable_named():
    model, inputs = deep_model("qwen2_5_vl"), inputs_for("qwen2_5_vl", "image")
    with patched(custom_qwenvl, VIT_LAYER_SPECS="1:tome_vit:0.5"), \
            pytest.raises(NotImplementedError, match="TOME_PROP_ATTN=0"):
        forward_logits(model, inputs)


def test_a_block_after_the_last_is_refused():
    model, inputs = deep_model("qwen2_vl"), inputs_for("qwen2_vl", "image")
    with patched(custom_qwenvl, VIT_LAYER_SPECS="4:random_vit:0.5"), pytest.raises(Exception, match="1..3"):
        forward_logits(model, inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_flash_attention_runs_the_stage_and_matches_sdpa(family):
    """The packed encoder takes no mask, so flash_attention_2 (here its pure-torch stand-in) runs the stage: the same
    kept tokens as sdpa, logits within the kernels' rounding."""
    from tests.test_flash_standin import TOL, models, run_pruned
    from tests.test_flash_standin import inputs_for as flash_inputs

    flash, sdpa, _ = models(family)
    inputs = flash_inputs(family, "batch")
    env = dict(VIT_LAYER_SPECS="1:random_vit:0.5")
    f_logits, f_kept, f_ids, _ = run_pruned(custom_qwenvl, flash, inputs, env, True)
    s_logits, s_kept, s_ids, _ = run_pruned(custom_qwenvl, sdpa, inputs, env, False)
    assert len(f_kept) == 1 and torch.equal(f_kept[0], s_kept[0])
    assert f_kept[0].shape[1] < inputs["input_ids"].shape[1]
    assert (f_logits - s_logits).abs().max() < TOL and torch.equal(f_ids, s_ids)
