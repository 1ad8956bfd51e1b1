"""The ViT stage (methods named ``*_vit``) on Gemma 4's vision encoder, before its pooler (``custom_gemma4``):

* keep ratio 1.0: logits and greedy ids bit-identical to the unpatched model, eager and sdpa, on images of two sizes
  (the smaller one padded inside the encoder call), a video's frames and a left-padded batch;
* the pruned encoder equals a hand-written loop over the Gemma 4 vision blocks: the selection and the merge applied by
  hand between blocks, the kept patches' rotary tables and (x, y) positions gathered, padding and proportional
  attention as an explicit additive mask, then the put-back output pooled by hand as the size-weighted mean of each
  k x k bin's kept patches; features and kept soft tokens alike;
* the keys the methods read are the block's pre-RoPE ``k_norm(k_proj)`` keys of each item's real patches;
* mustdrop_vit's 3 x 3 windows are the pooler's bins: merged windows keep every soft token;
* the language model then equals the unpatched language model on the hand-shortened sequence whose visual rows are
  the reference features (prefill and decode steps), images, video frames and a batch whose samples keep different
  counts;
* refusals: flash attention, a block after the encoder's last, patches out of raster order or padding first, the
  tower's layer outputs asked for.

The fixtures' vision encoder has 2 blocks (a stage can only run before block 1); the oracles use the same tiny model
with a 3-block encoder so that a merge can follow a selection.
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import pytest
import torch
from transformers.masking_utils import create_bidirectional_mask

import custom_gemma4
import methods
from methods import PruneContext, PruneResult
from tests.oracle import ATTN, forward_logits, greedy, patched
from tests.support import tiny_gemma
from tests.test_gemma4 import inputs_for, lm_inputs, reference_pre_llm
from utils import PruneConfig, PruneConfigError, keep_count

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
SPECS = "1:random_vit:0.5;2:pairmerge_vit:0.5"  # a selection, then a merge with proportional attention
DEEP = "1:random_vit:0.2;2:pairmerge_vit:0.2"  # few enough patches left that whole soft tokens go


@contextlib.contextmanager
def registered(name, fn, **kwargs):
    """A test-only method, registered for the duration of the block."""
    methods.register_prune(name, **kwargs)(fn)
    try:
        yield
    finally:
        methods._base._REGISTRY.pop(name)


def pair_merge(ctx: PruneContext) -> PruneResult:
    """Merge raster neighbours (2j, 2j + 1) into the token at 2j + 1: size-weighted mean, sizes added, proportional
    attention on (an odd last token stays)."""
    n, sizes, x = ctx.num_tokens, ctx.sizes, ctx.features
    first = torch.arange(0, n - 1, 2)
    second = first + 1
    total = sizes[first] + sizes[second]
    merged = (x[first] * sizes[first, None] + x[second] * sizes[second, None]) / total[:, None]
    indices = second
    if n % 2:
        indices, merged = torch.cat([indices, torch.tensor([n - 1])]), torch.cat([merged, x[-1:]])
        total = torch.cat([total, sizes[-1:]])
    return PruneResult(indices, merged, total, proportional_attention=True)


KEYS = []


def key_probe(ctx: PruneContext) -> torch.Tensor:
    """Keeps every other patch; notes the keys and grid the stage hands the method."""
    KEYS.append((ctx.encoder_keys(), ctx.grid))
    return torch.arange(0, ctx.num_tokens, 2)


@pytest.fixture(scope="module", autouse=True)
def test_methods():
    with registered("pairmerge_vit", pair_merge, default_layer=1, exact_count=False), \
            registered("keyprobe_vit", key_probe, default_layer=1, exact_count=False):
        yield


@functools.lru_cache(maxsize=None)
def model_for(variant, attn="sdpa", vision_blocks=2, dtype=torch.float32):
    """The tiny Gemma 4 (cached: the tests only read it); ``vision_blocks`` other than the fixtures' 2 rebuild its
    vision encoder that deep (same seed, same initialisation)."""
    if vision_blocks == 2:
        return tiny_gemma.build_model(variant, attn_implementation=attn, dtype=dtype)
    original = tiny_gemma._config

    def config(name):
        built = original(name)
        built.vision_config.num_hidden_layers = vision_blocks
        return built

    with mock.patch.object(tiny_gemma, "_config", config):
        return tiny_gemma.build_model(variant, attn_implementation=attn, dtype=dtype)


@functools.lru_cache(maxsize=None)
def cached_inputs(kind):
    return inputs_for(kind)


def visual_inputs(inputs):
    """(modality, pixel values, positions) of a prompt's images or video frames."""
    if "pixel_values_videos" in inputs:
        return "video", inputs["pixel_values_videos"], inputs["video_position_ids"]
    return "image", inputs["pixel_values"], inputs["image_position_ids"]


# ------------------------------------------------------------------------------------------------------
# Keep ratio 1.0
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("variant", ["e2b", "dense31b"])
def test_keep_ratio_one_is_bit_identical(variant, attn):
    model = model_for(variant, attn)
    for kind in ("two_images", "video", "batch"):
        inputs = cached_inputs(kind)
        ref_logits, (ref_ids, ref_steps) = forward_logits(model, inputs), greedy(model, inputs, STEPS)
        with patched(custom_gemma4, VIT_LAYER_SPECS="1:random_vit:1.0"):
            logits = forward_logits(model, inputs)
            record = custom_gemma4.last_record(model)
            ids, steps = greedy(model, inputs, STEPS)
        assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps), kind
        spans = [span for sample in record.spans for span in sample]
        assert spans and all(list(s.counts) == ["input", "vit_1"] and len(set(s.counts.values())) == 1 for s in spans)


# ------------------------------------------------------------------------------------------------------
# The encoder against a hand-written loop over its blocks
# ------------------------------------------------------------------------------------------------------
def by_hand(name, specs, state, sizes, keep, block, grid, modality):
    """The registered method on one item's current tokens, as the stage calls it: (sorted local indices, their states,
    their sizes, proportional attention)."""
    ctx = PruneContext(features=state, keep=keep, grid=grid, modality=modality, stage=methods.VIT,
                       params=PruneConfig.from_env({"VIT_LAYER_SPECS": specs}).params.get(name, {}), span_key=block,
                       layer=block, sizes=sizes)
    result = methods.registered_methods()[name].fn(ctx)
    if not isinstance(result, PruneResult):
        result = PruneResult(result)
    order = result.indices.argsort()
    merged = state[result.indices] if result.features is None else result.features
    new_sizes = sizes[result.indices] if result.sizes is None else result.sizes
    return result.indices[order], merged[order].to(state.dtype), new_sizes[order], result.proportional_attention


def hand_pool(tower, full, weights, positions, output_length):
    """Gemma4VisionPooler with per-patch weights: each soft token the weighted mean of its k x k bin's patches (bin
    x // k + (W // k) * (y // k), W the item's largest x + 1), zeros without weight; float32 sqrt(hidden) scaling.
    Returns the pooled (items, L, D) float32 and which soft tokens exist (items, L)."""
    k = tower.config.pooling_kernel_size
    real = ~(positions == -1).all(dim=-1)
    xy = positions.clamp(min=0)
    width = xy[..., 0].amax(dim=1, keepdim=True) + 1
    bins = xy[..., 0] // k + (width // k) * (xy[..., 1] // k)
    matrix = torch.zeros(*bins.shape, output_length)
    exists = torch.zeros(bins.shape[0], output_length, dtype=torch.bool)
    for i in range(bins.shape[0]):
        for p in torch.nonzero(real[i]).flatten().tolist():
            matrix[i, p, bins[i, p]] = weights[i, p]
            exists[i, bins[i, p]] = True
    total = matrix.sum(dim=1)
    summed = matrix.transpose(1, 2) @ full.float()
    mean = torch.where(total[..., None] > 0, summed / total.clamp(min=torch.finfo(torch.float32).tiny)[..., None],
                       torch.zeros(()))
    return mean.to(full.dtype).float() * tower.config.hidden_size ** 0.5, exists, matrix


def reference_encoder(model, inputs, specs):
    """The vision tower's soft-token features with ``specs`` applied by hand, every item of the call at once as the
    model encodes them: the patch embedding; the encoder's own bidirectional padding mask while every patch is there;
    at each stage the method on each item's current real tokens, the items then right-padded to the longest, their
    rotary (cos, sin) and (x, y) positions gathered (padding rows take token 0's), padding keys (and log(size) under
    proportional attention) as an additive mask; the last block's output put back at the kept patches' positions, the
    pooling by hand, padding soft tokens stripped, standardised, ``embed_vision``. Returns per item the features
    (soft tokens, D), which soft tokens each stage keeps ({label: (soft tokens,) bool}) and the kept patches' (x, y)
    positions after the last stage."""
    modality, pixels, positions = visual_inputs(inputs)
    tower = model.model.vision_tower
    k = tower.config.pooling_kernel_size
    output_length = pixels.shape[-2] // (k * k)
    stages = {s.layer: (s.method, s.ratio) for s in PruneConfig.from_env({"VIT_LAYER_SPECS": specs}).vit}
    padding = (positions == -1).all(dim=-1)
    items, length = padding.shape
    real_counts = (~padding).sum(dim=1).tolist()
    grids = [(int(positions[i, :n, 1].max()) + 1, int(positions[i, :n, 0].max()) + 1)
             for i, n in enumerate(real_counts)]
    with torch.no_grad():
        x = tower.patch_embedder(pixels, positions, padding)
        cos, sin = tower.encoder.rotary_emb(x, positions)
        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=x, attention_mask=~padding)
        where = torch.arange(length).expand(items, length)  # each current token's patch
        counts = real_counts  # current real tokens per item
        sizes = torch.ones(items, length)
        proportional, full_grid, kept_patches = False, True, {}
        rope, position_ids = (cos, sin), positions
        for block, layer in enumerate(tower.encoder.layers):
            if block in stages:
                name, ratio = stages[block]
                rows = [by_hand(name, specs, x[i, :n], sizes[i, :n], min(n, keep_count(real_counts[i], ratio)),
                                block, (1, *grids[i]) if full_grid else None, modality)
                        for i, n in enumerate(counts)]
                counts = [local.numel() for local, *_ in rows]
                width = max(counts)
                new_x = x.new_zeros(items, width, x.shape[2])
                new_where = torch.zeros(items, width, dtype=torch.long)
                new_sizes = torch.ones(items, width)
                for i, (local, merged, kept_sizes, wants) in enumerate(rows):
                    new_x[i, :counts[i]] = merged
                    new_where[i, :counts[i]] = where[i, local]
                    new_sizes[i, :counts[i]] = kept_sizes
                    proportional = proportional or wants
                x, where, sizes, full_grid = new_x, new_where, new_sizes, False
                kept_patches[f"vit_{block}"] = [where[i, :n] for i, n in enumerate(counts)]
                valid = torch.arange(width)[None] < torch.tensor(counts)[:, None]
                bias = sizes.log() if proportional else torch.zeros(items, width)
                mask = bias.masked_fill(~valid, torch.finfo(x.dtype).min).to(x.dtype)[:, None, None, :]
                if not proportional and bool(valid.all()):
                    mask = None
                index = where.masked_fill(~valid, 0)
                rope = tuple(torch.stack([t[i, index[i]] for i in range(items)]) for t in (cos, sin))
                position_ids = torch.stack([positions[i, index[i]] for i in range(items)])
            x = layer(x, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
        full = x.new_zeros(items, length, x.shape[2])
        weights = torch.zeros(items, length)
        for i, n in enumerate(counts):
            full[i, where[i, :n]] = x[i, :n]
            weights[i, where[i, :n]] = sizes[i, :n]
        pooled, exists, _ = hand_pool(tower, full, weights, positions, output_length)
        features = pooled[exists]
        if tower.config.standardize:
            features = (features - tower.std_bias.float()) * tower.std_scale.float()
        features = model.model.embed_vision(inputs_embeds=features.to(x.dtype))
    per_item = list(features.split(exists.sum(dim=1).tolist()))
    kept_soft = []
    for i in range(items):
        labels = {}
        for label, patches in kept_patches.items():
            one_hot = torch.zeros(length)
            one_hot[patches[i]] = 1
            _, _, matrix = hand_pool(tower, torch.zeros(items, length, 1), one_hot.expand(items, length), positions,
                                     output_length)
            labels[label] = (matrix[i].sum(dim=0) > 0)[exists[i]]
        kept_soft.append(labels)
    return per_item, kept_soft, [positions[i, where[i, :n]] for i, n in enumerate(counts)]


@pytest.mark.parametrize("specs, kind, attn, dtype", [
    (SPECS, "two_images", "eager", torch.float32), (SPECS, "two_images", "sdpa", torch.float32),
    (DEEP, "video", "eager", torch.float32), (DEEP, "video", "sdpa", torch.float32),
    (SPECS, "two_images", "sdpa", torch.bfloat16)])
def test_pruned_encoder_equals_a_hand_written_loop_over_its_blocks(specs, kind, attn, dtype):
    """Features bit-identical (same shapes, same operations in the same order; in bfloat16 too: the stage keeps the
    model's dtype, sizes enter the mask in it, the pooling runs in float32 as the pooler's), the kept soft tokens
    and the kept patches' positions equal; the items keep different counts (two image sizes) or equal ones
    (frames)."""
    model = model_for("dense31b", attn, vision_blocks=3, dtype=dtype)  # standardised features (31B / 26B-A4B tower)
    inputs = cached_inputs(kind)
    modality, pixels, positions = visual_inputs(inputs)
    expected, expected_kept, kept_positions = reference_encoder(model, inputs, specs)
    kwargs = {"image_position_ids": positions} if modality == "image" else {
        "video_position_ids": positions, "num_frames_per_video": inputs["num_frames_per_video"]}
    with patched(custom_gemma4, VIT_LAYER_SPECS=specs), torch.no_grad():  # the wrapped feature methods
        features_of = model.model.get_image_features if modality == "image" else model.model.get_video_features
        features = torch.cat(features_of(pixels, **kwargs).pooler_output)
        masks = custom_gemma4.pruning_state(model).pending_vit[modality]
    assert torch.equal(features, torch.cat(expected))
    assert len(masks) == len(expected_kept) == positions.shape[0]
    for got, want in zip(masks, expected_kept):
        assert set(got) == set(want) == {"vit_1", "vit_2"}
        assert all(torch.equal(got[label], want[label]) for label in want)
        assert 0 < int(got["vit_2"].sum()) <= int(got["vit_1"].sum()) <= got["vit_1"].numel()
    if specs == DEEP:  # whole soft tokens go
        assert all(int(m["vit_2"].sum()) < m["vit_2"].numel() for m in masks)
    patches = [int(n) for n in (positions != -1).all(dim=-1).sum(dim=1)]
    ratio = PruneConfig.from_env({"VIT_LAYER_SPECS": specs}).vit[0].ratio
    assert [p.shape[0] for p in kept_positions] == [(keep_count(n, ratio) + 1) // 2 for n in patches]


@pytest.mark.parametrize("attn", ATTN)
def test_methods_read_pre_rope_keys_of_the_real_patches(attn):
    """``ctx.encoder_keys()``: k_norm(k_proj(x)) per key head of block 0's normed input, before the 2-D RoPE, each
    item's padding patches left out; ``ctx.grid``: the item's patch grid (1, h, w), raster order."""
    model, inputs = model_for("e2b", attn), cached_inputs("two_images")
    _, pixels, positions = visual_inputs(inputs)
    tower = model.model.vision_tower
    block = tower.encoder.layers[0]
    padding = (positions == -1).all(dim=-1)
    KEYS.clear()
    with patched(custom_gemma4, VIT_LAYER_SPECS="1:keyprobe_vit:0.5"):
        forward_logits(model, inputs)
    with torch.no_grad():
        normed = block.input_layernorm(tower.patch_embedder(pixels, positions, padding))
        attn_module = block.self_attn
        keys = attn_module.k_norm(attn_module.k_proj(normed).view(*normed.shape[:2], -1, attn_module.head_dim))
    assert len(KEYS) == 2
    for i, (got, grid) in enumerate(KEYS):
        n = int((~padding[i]).sum())
        assert got.shape == (n, tower.config.num_key_value_heads, attn_module.head_dim)
        assert torch.equal(got, keys[i, :n].float())
        h, w = int(positions[i, :n, 1].max()) + 1, int(positions[i, :n, 0].max()) + 1
        assert grid == (1, h, w) and h * w == n


@pytest.mark.parametrize("threshold", [-1.0, 2.0])
def test_mustdrop_merges_whole_soft_tokens(threshold):
    """mustdrop_vit's 3 x 3 windows are the pooler's 3 x 3 bins: at threshold -1 every window becomes one token of 9
    patches (block 1 runs on one token per soft token) and every soft token stays, its feature that token's; at 2
    nothing merges, every real patch runs on (padding patches dropped) and the logits are the stock ones up to
    float32 rounding (the pooling divides a sum by 9 where the pooler sums ninths)."""
    model, inputs = model_for("dense31b"), cached_inputs("two_images")
    tower = model.model.vision_tower
    lengths = []
    norm = tower.encoder.layers[1].input_layernorm  # inside block 1: after the stage
    handle = norm.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    try:
        reference = forward_logits(model, inputs)
        with patched(custom_gemma4, VIT_LAYER_SPECS="1:mustdrop_vit:1.0", MUSTDROP_MERGE_THRESHOLD=threshold):
            logits = forward_logits(model, inputs)
            record = custom_gemma4.last_record(model)
    finally:
        handle.remove()
    _, _, positions = visual_inputs(inputs)
    real = (positions != -1).all(dim=-1).sum(dim=1)
    assert [s.counts for s in record.spans[0]] == [{"input": int(n) // 9, "vit_1": int(n) // 9} for n in real]
    assert lengths == [positions.shape[1], int(real.max()) // 9 if threshold < 0 else int(real.max())]
    if threshold < 0:
        assert not torch.allclose(logits, reference, rtol=1e-3, atol=1e-3)
    else:
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# The language model against the hand-shortened sequence
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("variant, kind", [("e2b", "two_images"), ("dense31b", "ragged_batch"),
                                           ("dense31b", "video")])
def test_language_model_equals_the_hand_shortened_sequence(variant, kind, attn):
    """Prefill logits and decode steps equal the unpatched language model on the text and the reference features
    of the soft tokens some kept patch stands in, at their original positions (gaps included). A batch whose samples
    keep different counts: ``ragged_batch``, as tests/test_gemma4.py's pre-LLM oracle (on the left-padded ``batch``
    its decode steps differ from this oracle in the last bits with any pre-LLM pruning too)."""
    model, inputs = model_for(variant, attn, vision_blocks=3), cached_inputs(kind)
    with patched(custom_gemma4, VIT_LAYER_SPECS=DEEP):
        logits = forward_logits(model, inputs)
        record = custom_gemma4.last_record(model)
        ids, steps = greedy(model, inputs, STEPS)
    features, kept_soft, _ = reference_encoder(model, inputs, DEEP)
    lm = lm_inputs(model, inputs)
    embeds = lm["inputs_embeds"].clone()
    token = model.config.image_token_id if "pixel_values" in inputs else model.config.video_token_id
    visual = inputs["input_ids"] == token
    items = iter(zip(features, kept_soft))
    keep_rows, spans = [], []
    for b in range(embeds.shape[0]):
        rows = torch.nonzero(visual[b]).flatten()
        kept, start = [torch.nonzero(~visual[b]).flatten()], 0
        while start < rows.numel():  # the soft tokens of one item after another
            feature, masks = next(items)
            span = rows[start:start + feature.shape[0]]
            embeds[b, span] = feature.to(embeds.dtype)
            kept.append(span[masks["vit_2"]])
            spans.append({"input": feature.shape[0], "vit_1": int(masks["vit_1"].sum()),
                          "vit_2": int(masks["vit_2"].sum())})
            start += feature.shape[0]
        keep_rows.append(torch.cat(kept).sort().values)
    width = max(k.numel() for k in keep_rows)
    keep = torch.stack([torch.cat([torch.full((width - k.numel(),), -1), k]) for k in keep_rows])
    lm["inputs_embeds"] = embeds
    with torch.no_grad():
        ref_prefill, ref_steps = reference_pre_llm(model, lm, inputs["input_ids"], keep, ids)
    assert [span.counts for sample in record.spans for span in sample] == spans
    assert any(s["vit_2"] < s["input"] for s in spans)
    assert torch.equal(logits, ref_prefill)
    assert torch.equal(steps, ref_steps)


# ------------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------------
def test_flash_attention_is_refused():
    model, inputs = model_for("e2b"), cached_inputs("image")
    config = model.model.vision_tower.config
    saved = config._attn_implementation
    config._attn_implementation = "flash_attention_2"
    try:
        with patched(custom_gemma4, VIT_LAYER_SPECS="1:random_vit:0.5"), \
                pytest.raises(NotImplementedError, match="flash_attention_2.*allowed: --attn-implementation sdpa"):
            forward_logits(model, inputs)
    finally:
        config._attn_implementation = saved


@pytest.mark.parametrize("block", ["2", "-2", "0"])
def test_a_block_outside_the_encoder_is_refused(block):
    """The fixtures' encoder has 2 blocks whose last output is pooled: block 1 (-1) only."""
    model, inputs = model_for("e2b"), cached_inputs("image")
    with patched(custom_gemma4, VIT_LAYER_SPECS=f"{block}:random_vit:0.5"), \
            pytest.raises(PruneConfigError, match=r"VIT_LAYER_SPECS: block .*allowed: 1\.\.1"):
        forward_logits(model, inputs)


@pytest.mark.parametrize("change, message", [("shuffle", "raster order"), ("pad_first", "padding patches")])
def test_patches_out_of_raster_order_or_padding_first_are_refused(change, message):
    model, inputs = model_for("e2b"), cached_inputs("two_images")
    pixels, positions = inputs["pixel_values"].clone(), inputs["image_position_ids"].clone()
    if change == "shuffle":  # two real patches swapped (pixels and positions alike)
        positions[0, [0, 1]], pixels[0, [0, 1]] = positions[0, [1, 0]], pixels[0, [1, 0]]
    else:  # the first item's last (padding) patch moved to the front
        order = torch.cat([torch.tensor([positions.shape[1] - 1]), torch.arange(positions.shape[1] - 1)])
        positions[0], pixels[0] = positions[0, order], pixels[0, order]
    with patched(custom_gemma4, VIT_LAYER_SPECS="1:random_vit:0.5"), torch.no_grad(), \
            pytest.raises(NotImplementedError, match=f"ViT stage.*{message}"):
        model.model.get_image_features(pixels, positions)


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_the_towers_layer_outputs_are_refused(flag):
    model, inputs = model_for("e2b"), cached_inputs("image")
    with patched(custom_gemma4, VIT_LAYER_SPECS="1:random_vit:0.5"), torch.no_grad(), \
            pytest.raises(NotImplementedError, match=f"ViT stage.*{flag}"):
        model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"], **{flag: True})
