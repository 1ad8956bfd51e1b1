"""The ViT stage (methods named ``*_vit``, run before an encoder block) on the LLaVA families' CLIP / SigLIP towers:

* keep ratio 1.0: logits and greedy ids bit-identical to the unpatched model, eager and sdpa, every LLaVA family;
* the pruned encoder equals a hand-written loop over the encoder blocks (the selection and merge applied by hand
  between blocks, proportional attention as an explicit log-size mask), features and kept patches alike;
* the language model then equals the unpatched language model on the hand-shortened sequence whose visual rows are
  the reference features at their representatives' original positions (prefill and decode steps);
* a left-padded batch equals each sample alone; items of one encoder call that keep different counts (padded and
  masked inside the encoder) equal each image encoded alone;
* a ViT stage composes with pre-LLM and intra-LLM stages (records, counts);
* every bad configuration is refused with a message naming the variable: malformed specs, a block after the feature
  layer, a family or input the stage does not support, flash attention, a vision-signal pre-LLM method.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import custom_llava
import methods
from methods import PruneContext, PruneResult
from tests.oracle import ATTN, capture_lm_inputs, forward_logits, greedy, patched
from tests.support import tiny_llava
from tests.test_decoder_families import inputs_for, model_for, reference_pre_llm, sample_alone
from utils import PruneConfig, PruneConfigError, keep_count

STEPS = 3


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
    merged = (x[first] * sizes[first, None] + x[second] * sizes[second, None]) / (sizes[first] + sizes[second])[:, None]
    indices, new_sizes = second, sizes[first] + sizes[second]
    if n % 2:
        indices, merged = torch.cat([indices, torch.tensor([n - 1])]), torch.cat([merged, x[-1:]])
        new_sizes = torch.cat([new_sizes, sizes[-1:]])
    return PruneResult(indices, merged, new_sizes, proportional_attention=True)


def bright_patches(ctx: PruneContext) -> torch.Tensor:
    """A data-dependent count: the tokens whose states sum to more than zero (at least one)."""
    score = ctx.features.float().sum(dim=-1)
    kept = torch.nonzero(score > 0).flatten()
    return kept if kept.numel() else score.argmax().view(1)


@pytest.fixture(scope="module", autouse=True)
def test_methods():
    with registered("pairmerge_vit", pair_merge, default_layer=1, exact_count=False), \
            registered("bright_vit", bright_patches, default_layer=1, exact_count=False):
        yield


# ------------------------------------------------------------------------------------------------------
# Keep ratio 1.0
# ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def reference(family, attn, kind):
    model, inputs = model_for(family, attn), inputs_for(family, kind)
    return forward_logits(model, inputs), greedy(model, inputs, STEPS)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_keep_ratio_one_is_bit_identical(family, attn):
    model, inputs = model_for(family, attn), inputs_for(family, "two_images")
    ref_logits, (ref_ids, ref_steps) = reference(family, attn, "two_images")
    with patched(custom_llava, VIT_LAYER_SPECS="1:random_vit:1.0;2:random_vit:1.0"):
        logits = forward_logits(model, inputs)
        ids, steps = greedy(model, inputs, STEPS)
        record = custom_llava.last_record(model)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps)
    for span in record.spans[0]:
        assert list(span.counts) == ["input", "vit_1", "vit_2"] and len(set(span.counts.values())) == 1


# ------------------------------------------------------------------------------------------------------
# The encoder against a hand-written loop over its blocks; the language model against the shortened sequence
# ------------------------------------------------------------------------------------------------------
SPECS = "1:random_vit:0.5;2:pairmerge_vit:0.5"  # a selection, then a merge with proportional attention


def by_hand(name, state, sizes, keep, block, grid):
    """The registered method on one image's patches, as the stage calls it."""
    ctx = PruneContext(features=state, keep=keep, grid=grid, modality="image", stage=methods.VIT,
                       params=PruneConfig.from_env({"VIT_LAYER_SPECS": SPECS}).params.get(name, {}), span_key=block,
                       layer=block, sizes=sizes)
    result = methods.registered_methods()[name].fn(ctx)
    if not isinstance(result, PruneResult):
        result = PruneResult(result)
    order = result.indices.argsort()
    merged = state[result.indices] if result.features is None else result.features
    new_sizes = sizes[result.indices] if result.sizes is None else result.sizes
    return result.indices[order], merged[order], new_sizes[order], result.proportional_attention


def reference_encoder(model, pixel_values):
    """LLaVA-1.5's features with SPECS applied by hand: the CLIP blocks up to the feature layer's on every image of
    the call at once (as the model encodes them; both methods keep the same count per image), the method on each
    image's patches between blocks, proportional attention as an additive log(size) mask. Returns per image the
    projected features (K, D) and their patch positions (K,)."""
    body = custom_llava._encoder_body(model.model.vision_tower)
    blocks = body.encoder.layers
    feature_block = len(blocks) + model.config.vision_feature_layer  # hidden_states[-2]: the output of block depth - 2
    stages = {1: ("random_vit", 0.5), 2: ("pairmerge_vit", 0.5)}
    with torch.no_grad():
        x = body.pre_layrnorm(body.embeddings(pixel_values))
        items = x.shape[0]
        where = torch.arange(x.shape[1]).expand(items, -1)
        sizes, proportional = torch.ones(items, x.shape[1]), False
        for block in range(feature_block + 1):
            if block in stages:
                name, ratio = stages[block]
                patches = x.shape[1] - 1
                rows = [by_hand(name, x[i, 1:], sizes[i, 1:], min(patches, keep_count(36, ratio)), block,
                                (1, 6, 6) if patches == 36 else None) for i in range(items)]
                x = torch.stack([torch.cat([x[i, :1], merged.to(x.dtype)]) for i, (_, merged, _, _) in enumerate(rows)])
                where = torch.stack([torch.cat([where[i, :1], where[i, 1:][local]])
                                     for i, (local, _, _, _) in enumerate(rows)])
                sizes = torch.stack([torch.cat([sizes[i, :1], new]) for i, (_, _, new, _) in enumerate(rows)])
                proportional = proportional or any(wants for *_, wants in rows)
            mask = sizes.log()[:, None, None, :].to(x.dtype) if proportional else None
            x = blocks[block](x, mask)
        # The projector runs on every patch position (as on the model's own, put-back features: zeros where no
        # representative is), so that its matrix products have the model's shapes.
        full = x.new_zeros(items, 37, x.shape[2])  # [CLS] + 36 patches, the [CLS] then dropped as the model does
        for i in range(items):
            full[i, where[i]] = x[i]
        projected = model.model.multi_modal_projector(full[:, 1:])
        return [(projected[i, where[i, 1:] - 1], where[i, 1:] - 1) for i in range(items)]


@pytest.mark.parametrize("attn, dtype", [("eager", torch.float32), ("sdpa", torch.float32),
                                         ("sdpa", torch.bfloat16), ("eager", torch.bfloat16)])
def test_pruned_encoder_equals_a_hand_written_loop_over_its_blocks(attn, dtype):
    """In float32 and bfloat16 alike (the stage keeps the model's dtype; sizes enter the mask in it)."""
    model = tiny_llava.build_model("llava", attn_implementation=attn, dtype=dtype)
    inputs = inputs_for("llava", "two_images")
    inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}
    expected = reference_encoder(model, inputs["pixel_values"])
    with patched(custom_llava, VIT_LAYER_SPECS=SPECS), torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
        masks = custom_llava.pruning_state(model).pending_vit["image"]
    assert len(features) == len(expected) == 2
    for got, image_masks, (ref, where) in zip(features, masks, expected):
        assert torch.equal(torch.nonzero(image_masks["vit_2"]).flatten(), where.sort().values)
        assert int(image_masks["vit_1"].sum()) == 18 and int(image_masks["vit_2"].sum()) == 9
        order = where.argsort()
        assert torch.equal(got[where[order]], ref[order])


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("kind", ["two_images", "batch"])
def test_language_model_equals_the_hand_shortened_sequence(attn, kind):
    """Prefill logits and decode steps equal the unpatched language model on the text and the reference features at
    their representatives' original positions (gaps included)."""
    model, inputs = model_for("llava", attn), inputs_for("llava", kind)
    with patched(custom_llava, VIT_LAYER_SPECS=SPECS):
        logits = forward_logits(model, inputs)
        ids, steps = greedy(model, inputs, STEPS)
        record = custom_llava.last_record(model)
    lm = dict(capture_lm_inputs(model, inputs))
    embeds = lm["inputs_embeds"].clone()
    image_rows = inputs["input_ids"] == model.config.image_token_id
    keep_rows, features = [], iter(reference_encoder(model, inputs["pixel_values"]))
    for b in range(embeds.shape[0]):
        rows = torch.nonzero(image_rows[b]).flatten()
        kept = [torch.nonzero(~image_rows[b]).flatten()]
        for start in range(0, rows.numel(), 36):  # one image = 36 placeholder rows
            ref, where = next(features)
            embeds[b, rows[start:start + 36][where]] = ref
            kept.append(rows[start:start + 36][where])
        keep_rows.append(torch.cat(kept).sort().values)
    width = max(k.numel() for k in keep_rows)
    keep = torch.stack([torch.cat([torch.full((width - k.numel(),), -1), k]) for k in keep_rows])
    lm["inputs_embeds"] = embeds
    with torch.no_grad():
        ref_prefill, ref_steps = reference_pre_llm(model, lm, keep, ids)
    assert all(span.counts == {"input": 36, "vit_1": 18, "vit_2": 9} for sample in record.spans for span in sample)
    assert torch.equal(logits, ref_prefill)
    assert torch.equal(steps, ref_steps)


# On a CPU, an encoder block's output at a shortened length can differ in the last bits between a call of one image
# and one of several (the kernels' blocking depends on the shapes; a plain CLIP block shows it without any hook), so a
# batch is compared with each sample alone within float32 rounding, and its greedy predictions must be the same.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("specs", [SPECS, "1:bright_vit:1.0"])
def test_left_padded_batch_equals_each_sample_alone(specs):
    model, inputs = model_for("llava"), inputs_for("llava", "batch")
    with patched(custom_llava, VIT_LAYER_SPECS=specs):
        batch = forward_logits(model, inputs)
        ids, _ = greedy(model, inputs, STEPS)
        for b in range(batch.shape[0]):
            alone = sample_alone(inputs, b)
            logits = forward_logits(model, alone)
            torch.testing.assert_close(batch[b, -logits.shape[1]:], logits[0], **TOLERANCE)
            assert torch.equal(ids[b], greedy(model, alone, STEPS)[0][0])


def test_items_keeping_different_counts_equal_each_image_alone():
    """bright_vit keeps a different count per image: the encoder call pads and masks the shorter one."""
    model, inputs = model_for("llava"), inputs_for("llava", "two_images")
    pixels = inputs["pixel_values"]
    with patched(custom_llava, VIT_LAYER_SPECS="1:bright_vit:1.0"), torch.no_grad():
        together = model.model.get_image_features(pixels, vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
        masks = custom_llava.pruning_state(model).pending_vit["image"]
        counts = [int(m["vit_1"].sum()) for m in masks]
        alone = [model.model.get_image_features(pixels[i:i + 1], vision_feature_layer=-2,
                                                vision_feature_select_strategy="default").pooler_output[0]
                 for i in range(2)]
    assert counts[0] != counts[1]  # the case under test: ragged items
    for i, mask in enumerate(masks):
        torch.testing.assert_close(together[i][mask["vit_1"]], alone[i][mask["vit_1"]], **TOLERANCE)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_tiles_and_newlines_follow_the_kept_patches(family):
    """LLaVA-NeXT / OneVision: every tile is pruned in the encoder; the kept patches' tokens reach the language model
    where the model lays out their features, and the newline tokens stay."""
    model, inputs = model_for(family), inputs_for(family, "two_images")
    with patched(custom_llava, VIT_LAYER_SPECS="1:random_vit:0.5"):
        logits = forward_logits(model, inputs)
        record = custom_llava.last_record(model)
        index = custom_llava.pruning_state(model).pre_map.index
    spans = record.spans[0]
    assert len(spans) == 2 and all(0 < s.counts["vit_1"] < s.counts["input"] for s in spans)
    dropped = sum(s.counts["input"] - s.counts["vit_1"] for s in spans)
    assert logits.shape[1] == inputs["input_ids"].shape[1] - dropped
    newline = model.model.image_newline
    lm = capture_lm_inputs(model, inputs)
    newline_rows = torch.nonzero((lm["inputs_embeds"][0] == newline).all(dim=-1)).flatten()
    assert newline_rows.numel() and set(newline_rows.tolist()) <= set(index[0].tolist())


def test_composes_with_pre_llm_and_intra_llm_stages():
    model, inputs = model_for("llava"), inputs_for("llava", "two_images")
    with patched(custom_llava, VIT_LAYER_SPECS="1:random_vit:0.5", PRUNE_METHOD_PRE_LLM="divprune_pre_llm",
                 KEEP_RATIO=0.25, INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.5"):
        logits = forward_logits(model, inputs)
        ids, _ = greedy(model, inputs, STEPS)
        record = custom_llava.last_record(model)
    for span in record.spans[0]:  # pre-LLM: a fraction of the image's tokens; intra-LLM: of those entering the LM
        assert span.counts == {"input": 36, "vit_1": 18, "pre_llm": 9, "layer_2": keep_count(9, 0.5)}
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 2 * (36 - keep_count(9, 0.5)) and ids.shape[1] == STEPS


# ------------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, message", [
    ({"VIT_LAYER_SPECS": "1:random_vit"}, "VIT_LAYER_SPECS.*no ratio and KEEP_RATIO is not set"),
    ({"VIT_LAYER_SPECS": "x:random_vit:0.5"}, "VIT_LAYER_SPECS.*not an integer"),
    ({"VIT_LAYER_SPECS": "1:random_pre_llm:0.5"}, "VIT_LAYER_SPECS.*pre-LLM method.*ViT methods"),
    ({"VIT_LAYER_SPECS": "1:random_vit:0.5;2:random_vit:0.7"}, "ratio 0.7 at block 2 exceeds"),
    ({"VIT_LAYER_SPECS": "1:random_vit:0.5;1:random_vit:0.4"}, "block 1 appears more than once"),
    ({"VIT_LAYER_SPECS": "1:random_vit:0.5", "PRUNE_METHOD_VIT": "random_vit", "KEEP_RATIO": "0.5"},
     "VIT_LAYER_SPECS.*conflicts with the ViT method"),
    ({"PRUNE_METHOD_VIT": "random_vit"}, "KEEP_RATIO.*required"),
    ({"PRUNE_METHOD_VIT": "random_pre_llm", "KEEP_RATIO": "0.5"}, "PRUNE_METHOD_VIT.*pre-LLM method"),
    ({"VIT_LAYER_SPECS": "1:random_vit:0.5", "PRUNE_METHOD_PRE_LLM": "visionzip_pre_llm", "KEEP_RATIO": "0.25"},
     "PRUNE_METHOD_PRE_LLM.*vision encoder's attention"),
])
def test_bad_configurations_are_refused_before_a_model_loads(env, message):
    with pytest.raises(PruneConfigError, match=message):
        PruneConfig.from_env(env)


def test_prune_method_alone_runs_at_the_methods_default_block():
    config = PruneConfig.from_env({"PRUNE_METHOD": "random_vit", "KEEP_RATIO": "0.5"})
    assert config.vit[0].layer == methods.registered_methods()["random_vit"].default_layer and config.pre_llm is None


@pytest.mark.parametrize("block", ["3", "-1", "0"])
def test_a_block_after_the_feature_layer_or_before_block_one_is_refused(block):
    """The tiny CLIP has 4 blocks and LLaVA reads block 2's output: blocks 1..2 (-3..-2) only."""
    model, inputs = model_for("llava"), inputs_for("llava", "image")
    with patched(custom_llava, VIT_LAYER_SPECS=f"{block}:random_vit:0.5"), \
            pytest.raises(PruneConfigError, match=r"VIT_LAYER_SPECS: block .*allowed: 1\.\.2"):
        forward_logits(model, inputs)


def test_negative_blocks_count_from_the_encoders_end():
    model, inputs = model_for("llava"), inputs_for("llava", "image")
    with patched(custom_llava, VIT_LAYER_SPECS="-3:random_vit:0.5"):
        forward_logits(model, inputs)
        assert list(custom_llava.last_record(model).spans[0][0].counts) == ["input", "vit_1"]


def test_a_downscaled_tile_grid_is_refused():
    """LLaVA-OneVision bilinearly downscales a large image's stitched grid: kept and dropped patches would mix."""
    model, inputs = model_for("llava_onevision"), inputs_for("llava_onevision", "large_image")
    with patched(custom_llava, VIT_LAYER_SPECS="1:random_vit:0.5"), \
            pytest.raises(NotImplementedError, match="resamples"):
        forward_logits(model, inputs)


def test_flash_attention_is_refused():
    model, inputs = model_for("llava"), inputs_for("llava", "image")
    config = model.model.vision_tower.config
    saved = config._attn_implementation
    config._attn_implementation = "flash_attention_2"
    try:
        with patched(custom_llava, VIT_LAYER_SPECS="1:random_vit:0.5"), \
                pytest.raises(NotImplementedError, match="flash_attention_2.*allowed: --attn-implementation sdpa"):
            forward_logits(model, inputs)
    finally:
        config._attn_implementation = saved


def test_profiling_names_the_vit_stage_and_changes_no_output():
    """METHOD_TIME: the ViT stage's time is its own ``pruning_ms/vit_<B>/<method>`` entry (timed inside the encoder,
    whose time includes it), its tokens ``visual_tokens/vit_<B>``; ids and logits are those of the unprofiled run."""
    import profiling

    model, inputs = model_for("llava"), inputs_for("llava", "image")
    env = dict(VIT_LAYER_SPECS="1:tome_vit:0.5", PRUNE_METHOD_PRE_LLM="divprune_pre_llm", KEEP_RATIO=0.25)
    with patched(custom_llava, **env):
        ids, logits = greedy(model, inputs, STEPS)
    with patched(custom_llava, **env, METHOD_TIME="True") as config:
        profiler = profiling.Profiler(config.profile)
        profiler.instrument(model)
        try:
            profiled_ids, profiled_logits = greedy(model, inputs, STEPS)
        finally:
            del model.generate  # the instance attribute: back to the class's generate
    (record,) = profiler.take("data", "key")
    assert torch.equal(profiled_ids, ids) and torch.equal(profiled_logits, logits)
    assert [(s["stage"], s["method"], s["tokens_in"]) for s in record["stages"]] == [
        ("vit_1", "tome_vit", 36), ("pre_llm", "divprune_pre_llm", 18)]
    metrics = record["metrics"]
    assert metrics["pruning_ms/vit_1/tome_vit"] > 0
    assert {k: v for k, v in metrics.items() if k.startswith("visual_tokens/")} == {
        "visual_tokens/input": 36, "visual_tokens/vit_1": 18, "visual_tokens/pre_llm": 9}


def test_tome_named_alone_merges_before_every_block_up_to_the_feature_block():
    """ToMe's own schedule: the tiny CLIP's features are block 2's output, so stages before blocks 1 and 2, the kept
    share falling linearly to KEEP_RATIO."""
    model, inputs = model_for("llava"), inputs_for("llava", "image")
    with patched(custom_llava, PRUNE_METHOD="tome_vit", KEEP_RATIO=0.5) as config:
        forward_logits(model, inputs)
        record = custom_llava.last_record(model)
    assert config.vit[0].layer is None
    assert record.spans[0][0].counts == {"input": 36, "vit_1": keep_count(36, 0.75), "vit_2": keep_count(36, 0.5)}
