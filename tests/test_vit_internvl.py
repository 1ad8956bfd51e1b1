"""The ViT stage (methods named ``*_vit``) inside InternVL's InternViT, every tile an item, on tiny random InternVL3
models (56 px tiles: 4 x 4 patches + [CLS], pixel-shuffled 2 x 2 into 4 LLM tokens per tile):

* keep ratio 1.0: logits and greedy ids bit-identical to the unpatched model, eager and sdpa;
* the pruned encoder equals a hand-written loop over the InternViT blocks (a selection and a merge applied by hand
  between blocks, proportional attention as an explicit log(size) mask handed to the attention), whole projected
  features and LLM-token keep masks alike, for the last hidden state and an earlier ``vision_feature_layer``, fp32 and
  bf16, eager and sdpa;
* an LLM token (one 2 x 2 patch group of the pixel shuffle) reaches the language model when any of its patches was
  kept; the methods' queries and keys are the attention's own (q / k norms included);
* the language model then equals the unpatched language model on the hand-shortened sequence (prefill, decode steps);
* refusals: flash attention, a block after the feature block, the "full" strategy, a list of feature layers.

The battery's model has 2 encoder blocks (features: block 1's output, normed); the merge tests use a 3-block encoder.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import custom_internvl
import methods
from methods import PruneContext, PruneResult
from tests.oracle import ATTN, capture_lm_inputs, forward_logits, greedy, patched
from tests.support import tiny_internvl
from tests.test_decoder_families import inputs_for, model_for, reference_pre_llm
from utils import PruneConfig, PruneConfigError, keep_count

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
SIDE, K = 4, 2  # patches per tile side; pixel-shuffle group side (1 / downsample_ratio)
TOKENS = (SIDE // K) ** 2  # LLM tokens per tile


@contextlib.contextmanager
def registered(name, fn, **kwargs):
    """A test-only method, registered for the duration of the block."""
    methods.register_prune(name, **kwargs)(fn)
    try:
        yield
    finally:
        methods._base._REGISTRY.pop(name)


def merge_pairs_into_first(ctx: PruneContext) -> PruneResult:
    """Each pair of consecutive current tokens (2j, 2j + 1) becomes one token at 2j: their size-weighted mean, their
    sizes added; later blocks use proportional attention. An odd last token stays as it is."""
    n, x, sizes = ctx.num_tokens, ctx.features, ctx.sizes
    left = torch.arange(0, n - 1, 2)
    right = left + 1
    total = sizes[left] + sizes[right]
    merged = (x[left] * sizes[left, None] + x[right] * sizes[right, None]) / total[:, None]
    if n % 2:
        left, merged, total = (torch.cat([left, torch.tensor([n - 1])]), torch.cat([merged, x[-1:]]),
                               torch.cat([total, sizes[-1:]]))
    return PruneResult(left, merged, total, proportional_attention=True)


CHOSEN: list[int] = []  # the patches chosen_vit keeps (set by the test)


def chosen_patches(ctx: PruneContext) -> torch.Tensor:
    return torch.tensor(CHOSEN)


@pytest.fixture(scope="module", autouse=True)
def test_methods():
    with registered("pairfirst_vit", merge_pairs_into_first, default_layer=1, exact_count=False), \
            registered("chosen_vit", chosen_patches, default_layer=1, exact_count=False):
        yield


def deep_model(attn="sdpa"):
    """A 3-block InternViT (features: the last block's output, normed), so that two stages fit."""
    return tiny_internvl.build_model(attn, vision_layers=3)


# ------------------------------------------------------------------------------------------------------
# Keep ratio 1.0
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("kind", ["two_images", "batch"])
def test_keep_ratio_one_is_bit_identical(kind, attn):
    model, inputs = model_for("internvl", attn), inputs_for("internvl", kind)
    ref_logits, (ref_ids, ref_steps) = forward_logits(model, inputs), greedy(model, inputs, STEPS)
    with patched(custom_internvl, VIT_LAYER_SPECS="1:random_vit:1.0"):
        logits = forward_logits(model, inputs)
        ids, steps = greedy(model, inputs, STEPS)
        record = custom_internvl.last_record(model)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps)
    spans = [span for sample in record.spans for span in sample]
    assert len(spans) == 2 and all(list(s.counts) == ["input", "vit_1"] and len(set(s.counts.values())) == 1
                                   for s in spans)


# ------------------------------------------------------------------------------------------------------
# The encoder against a hand-written loop over its blocks
# ------------------------------------------------------------------------------------------------------
SPECS = "1:random_vit:0.5;2:pairfirst_vit:0.5"  # a selection, then a merge with proportional attention


def block_by_hand(layer, x, mask):
    """An InternVLVisionLayer with an additive attention mask handed to its attention (the layer passes none)."""
    attended, _ = layer.attention(layer.layernorm_before(x), attention_mask=mask)
    x = layer.lambda_1 * attended + x
    return layer.lambda_2 * layer.dropout(layer.mlp(layer.layernorm_after(x))) + x


def method_by_hand(name, params, state, sizes, keep, block, grid):
    """The registered method on one tile's current patch tokens, as the stage calls it; sorted by index."""
    ctx = PruneContext(features=state, keep=keep, grid=grid, modality="image", stage=methods.VIT,
                       params=params.get(name, {}), span_key=block, layer=block, sizes=sizes)
    result = methods.registered_methods()[name].fn(ctx)
    result = result if isinstance(result, PruneResult) else PruneResult(result)
    order = result.indices.argsort()
    merged = state[result.indices] if result.features is None else result.features.to(state.dtype)
    new_sizes = sizes[result.indices] if result.sizes is None else result.sizes
    return result.indices[order], merged[order], new_sizes[order], result.proportional_attention


def llm_tokens_kept(patches: torch.Tensor) -> torch.Tensor:
    """(TOKENS,) bool: the LLM tokens whose K x K patch group holds any of ``patches`` (raster patch indices)."""
    rows, cols = patches // SIDE, patches % SIDE
    kept = torch.zeros(TOKENS, dtype=torch.bool)
    kept[(rows // K) * (SIDE // K) + cols // K] = True
    return kept


def reference_encoder(model, pixel_values, specs, feature_layer=-1):
    """``get_image_features`` with the stages of ``specs`` applied by hand: InternViT's blocks up to the feature block
    on every tile at once (as the model encodes them; the methods here keep the same count in every tile), the method on
    each tile's patches between blocks, proportional attention as an additive log(size) mask; then the final layernorm
    (feature layer -1), the outputs put back at their representatives' patch positions (zeros elsewhere), the [CLS]
    dropped, the model's pixel shuffle and projector. Returns the projected features (tiles, TOKENS, D) and per stage
    label the LLM tokens kept (tiles, TOKENS)."""
    config = PruneConfig.from_env({"VIT_LAYER_SPECS": specs})
    stages = {stage.layer: stage for stage in config.vit}
    tower = model.model.vision_tower
    blocks = tower.encoder.layer
    feature_block = (feature_layer if feature_layer >= 0 else len(blocks) + 1 + feature_layer) - 1
    with torch.no_grad():
        x = tower.embeddings(pixel_values.to(model.dtype))
        tiles, length = x.shape[:2]
        where = torch.arange(length).expand(tiles, -1)
        sizes, proportional, kept = torch.ones(tiles, length), False, {}
        for block in range(feature_block + 1):
            if block in stages:
                stage, n = stages[block], x.shape[1] - 1
                grid = (1, SIDE, SIDE) if n == SIDE * SIDE else None
                rows = [method_by_hand(stage.method, config.params, x[t, 1:], sizes[t, 1:],
                                       min(n, keep_count(SIDE * SIDE, stage.ratio)), block, grid) for t in range(tiles)]
                x = torch.stack([torch.cat([x[t, :1], merged]) for t, (_, merged, _, _) in enumerate(rows)])
                where = torch.stack([torch.cat([where[t, :1], where[t, 1:][local]])
                                     for t, (local, _, _, _) in enumerate(rows)])
                sizes = torch.stack([torch.cat([sizes[t, :1], new]) for t, (_, _, new, _) in enumerate(rows)])
                proportional = proportional or any(wants for *_, wants in rows)
                kept[stage.label] = torch.stack([llm_tokens_kept(w[1:] - 1) for w in where])
            mask = sizes.log()[:, None, None, :].to(x.dtype) if proportional else None
            x = block_by_hand(blocks[block], x, mask)
        if feature_layer == -1:
            x = tower.layernorm(x)
        full = x.new_zeros(tiles, length, x.shape[2])
        for t in range(tiles):
            full[t, where[t]] = x[t]
        shuffled = model.model.pixel_shuffle(full[:, 1:].reshape(tiles, SIDE, SIDE, -1),
                                             scale_factor=model.config.downsample_ratio)
        features = model.model.multi_modal_projector(shuffled.reshape(tiles, TOKENS, -1))
    return features, kept


@pytest.mark.parametrize("specs, feature_layer", [(SPECS, -1), ("1:pairfirst_vit:1.0", 2)])
@pytest.mark.parametrize("attn, dtype", [("eager", torch.float32), ("sdpa", torch.float32),
                                         ("eager", torch.bfloat16), ("sdpa", torch.bfloat16)])
def test_pruned_encoder_equals_a_hand_written_loop_over_its_blocks(attn, dtype, specs, feature_layer):
    """Features of every tile of both images (all LLM tokens: the stage puts the encoder's outputs back at full length,
    so the pixel shuffle and projector run on the shapes of the hand-written loop) and the LLM-token keep masks. The
    feature layer 2 reads block 1's output (hidden_states[2]), before the final layernorm; block 2 still runs."""
    model = deep_model(attn)
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
    pixel_values = inputs_for("internvl", "two_images")["pixel_values"].to(dtype)
    expected, expected_kept = reference_encoder(model, pixel_values, specs, feature_layer)
    with torch.no_grad():
        stock = model.model.get_image_features(pixel_values, vision_feature_layer=feature_layer).pooler_output
    with patched(custom_internvl, VIT_LAYER_SPECS=specs), torch.no_grad():
        features = model.model.get_image_features(pixel_values, vision_feature_layer=feature_layer).pooler_output
        masks = custom_internvl.pruning_state(model).pending_vit["image"]
    assert len(masks) == pixel_values.shape[0] == 8  # one entry per tile
    assert list(masks[0]) == list(expected_kept)
    for label, kept in expected_kept.items():
        assert torch.equal(torch.stack([m[label] for m in masks]), kept), label
    assert torch.equal(features, expected)
    assert not torch.equal(features, stock)  # the stages changed the features: not the stock call's


def test_a_token_is_kept_when_any_of_its_patches_is():
    """Patches 0 (row 0, col 0) and 5 (row 1, col 1) fall into LLM token 0, patch 11 (row 2, col 3) into token 3:
    tokens 0 and 3 of every tile reach the language model, where the model's own pixel shuffle put their features."""
    model, inputs = model_for("internvl"), inputs_for("internvl", "two_images")
    CHOSEN[:] = [0, 5, 11]
    with patched(custom_internvl, VIT_LAYER_SPECS="1:chosen_vit:1.0"):
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"])
        masks = custom_internvl.pruning_state(model).pending_vit["image"]
        logits = forward_logits(model, inputs)
        index = custom_internvl.pruning_state(model).pre_map.index[0]
        record = custom_internvl.last_record(model)
    assert all(m["vit_1"].tolist() == [True, False, False, True] for m in masks)
    assert [s.counts for s in record.spans[0]] == [{"input": 12, "vit_1": 6}, {"input": 20, "vit_1": 10}]
    image_rows = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    kept_rows = image_rows.view(-1, TOKENS)[:, [0, 3]].flatten()
    assert set(index.tolist()) & set(image_rows.tolist()) == set(kept_rows.tolist())
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 8 * 2


@pytest.mark.parametrize("qk_norm", [False, True])
def test_queries_and_keys_are_the_attentions_own(qk_norm):
    """What the methods read (``Encoder.queries`` / ``keys``) is what InternVLVisionAttention computes: its q / k
    projections, q / k norms over the full width (InternViT-6B), split into heads."""
    model = tiny_internvl.build_model("eager", qk_norm=True) if qk_norm else model_for("internvl", "eager")
    pixel_values = inputs_for("internvl", "image")["pixel_values"]
    encoder, _ = custom_internvl.InternVLAdapter().vit_encoder(model.model, "image", {"pixel_values": pixel_values})
    attn = encoder.attention(encoder.blocks[1])
    seen = {}
    handles = [attn.register_forward_pre_hook(lambda m, args: seen.update(hidden=args[0])),
               attn.q_norm.register_forward_hook(lambda m, a, out: seen.update(q=out)),
               attn.k_norm.register_forward_hook(lambda m, a, out: seen.update(k=out))]
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values)
            queries, keys = encoder.queries(attn, seen["hidden"]), encoder.keys(attn, seen["hidden"])
    finally:
        for handle in handles:
            handle.remove()
    shape = (*seen["hidden"].shape[:2], attn.num_heads, attn.head_dim)
    assert torch.equal(queries, seen["q"].view(shape)) and torch.equal(keys, seen["k"].view(shape))
    assert encoder.has_cls and encoder.grid == (SIDE, SIDE) and encoder.feature_block == 1
    with patched(custom_internvl, PRUNE_METHOD="tome_vit", KEEP_RATIO=0.1):  # a method reading keys, on these
        forward_logits(model, inputs_for("internvl", "image"))
        assert custom_internvl.last_record(model).spans[0][0].counts["vit_1"] < 12


# ------------------------------------------------------------------------------------------------------
# The language model against the hand-shortened sequence
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("kind", ["two_images", "batch"])
def test_language_model_equals_the_hand_shortened_sequence(attn, kind):
    """Prefill logits and decode steps equal the unpatched language model on the text and the reference features of
    the kept LLM tokens at their original positions (gaps included)."""
    model, inputs = deep_model(attn), inputs_for("internvl", kind)
    with patched(custom_internvl, VIT_LAYER_SPECS=SPECS):
        logits = forward_logits(model, inputs)
        ids, steps = greedy(model, inputs, STEPS)
        record = custom_internvl.last_record(model)
    features, kept = reference_encoder(model, inputs["pixel_values"], SPECS)
    lm = dict(capture_lm_inputs(model, inputs))
    image_rows = inputs["input_ids"] == model.config.image_token_id
    embeds = lm["inputs_embeds"].clone()
    embeds[image_rows] = features.flatten(0, 1)  # as the model's masked_scatter: tiles in order, batch-major
    kept_rows = torch.zeros_like(image_rows)
    kept_rows[image_rows] = kept["vit_2"].flatten()
    keep_rows = [torch.nonzero(~image_rows[b] | kept_rows[b]).flatten() for b in range(embeds.shape[0])]
    width = max(k.numel() for k in keep_rows)
    keep = torch.stack([torch.cat([torch.full((width - k.numel(),), -1), k]) for k in keep_rows])
    lm["inputs_embeds"] = embeds
    with torch.no_grad():
        ref_prefill, ref_steps = reference_pre_llm(model, lm, keep, ids)
    counts = [span.counts for sample in record.spans for span in sample]
    assert all(list(c) == ["input", "vit_1", "vit_2"] and c["vit_2"] <= c["vit_1"] <= c["input"] for c in counts)
    assert sum(c["input"] - c["vit_2"] for c in counts) > 0
    assert torch.equal(logits, ref_prefill)
    assert torch.equal(steps, ref_steps)


# ------------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------------
def test_flash_attention_is_refused():
    model, inputs = model_for("internvl"), inputs_for("internvl", "image")
    config = model.model.vision_tower.config
    saved = config._attn_implementation
    config._attn_implementation = "flash_attention_2"
    try:
        with patched(custom_internvl, VIT_LAYER_SPECS="1:random_vit:0.5"), \
                pytest.raises(NotImplementedError, match="flash_attention_2.*allowed: --attn-implementation sdpa"):
            forward_logits(model, inputs)
    finally:
        config._attn_implementation = saved


@pytest.mark.parametrize("block, feature_layer, allowed", [("2", None, "1..1"), ("0", None, "1..1"),
                                                           ("2", -2, "1..1"), ("3", 3, "1..2")])
def test_a_block_after_the_feature_block_or_before_block_one_is_refused(block, feature_layer, allowed):
    """The battery's 2-block InternViT reads the last block's output (normed): block 1 only. On the 3-block one,
    feature layer -2 (hidden_states[-2]: block 1's output) allows block 1, feature layer 3 (block 2's output) 1..2."""
    model = model_for("internvl") if feature_layer is None else deep_model()
    inputs = inputs_for("internvl", "image")
    kwargs = {} if feature_layer is None else {"vision_feature_layer": feature_layer}
    with patched(custom_internvl, VIT_LAYER_SPECS=f"{block}:random_vit:0.5"), \
            pytest.raises(PruneConfigError, match=rf"VIT_LAYER_SPECS: block .*allowed: {allowed}\b"):
        forward_logits(model, inputs, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"vision_feature_select_strategy": "full"}, "'default' feature strategy"),
    ({"vision_feature_layer": [-1]}, "one vision_feature_layer"),
])
def test_unsupported_feature_arguments_are_refused(kwargs, message):
    model, inputs = model_for("internvl"), inputs_for("internvl", "image")
    with patched(custom_internvl, VIT_LAYER_SPECS="1:random_vit:0.5"), torch.no_grad(), \
            pytest.raises(NotImplementedError, match=message):
        model.model.get_image_features(inputs["pixel_values"], **kwargs)
