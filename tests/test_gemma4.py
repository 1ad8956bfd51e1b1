"""Oracles for the Gemma 4 hooks on tiny random models (float32, CPU), one per real family shape:

* ``e2b``: per-layer inputs, KV sharing (layers 4 and 5 reuse the keys of layers 3 and 2), sliding + full layers,
  no bidirectional vision attention;
* ``dense31b``: bidirectional vision attention, K = V full layers, no per-layer inputs;
* ``moe26b``: the same with mixture-of-experts blocks.
"""

import pytest
import torch
from transformers.masking_utils import create_masks_for_generate
from transformers.models.gemma4 import modeling_gemma4 as gm

import custom_gemma4
from tests.support.tiny_gemma import VARIANTS, build_model, build_processor, make_inputs
from tests import oracle
from tests.oracle import ATTN, STEPS, capture_lm_inputs, forward_logits, gather, greedy, image_runs, kept_mask
from utils import PruneConfigError, keep_count


def patched(**env):
    return oracle.patched(custom_gemma4, **env)


def inputs_for(kind, with_mask=True, seed=0):
    inputs = dict(make_inputs(build_processor(), kind, seed=seed))
    assert "mm_token_type_ids" in inputs
    if not with_mask:
        inputs.pop("attention_mask")
    return inputs


def softcap(model, logits):
    cap = model.config.get_text_config().final_logit_softcapping
    return torch.tanh(logits / cap) * cap


def reference_masks(model, embeds, mask_2d, is_visual, cache=None):
    """The language model's masks as Gemma4Model builds them, for this (possibly shortened) sequence."""
    text_config = model.config.get_text_config()
    kwargs = dict(config=text_config, inputs_embeds=embeds, attention_mask=mask_2d, past_key_values=cache,
                  position_ids=None)
    if text_config.use_bidirectional_attention == "vision" and is_visual is not None:
        block_ids = gm.get_block_sequence_ids_for_mask(is_visual.long(), device=embeds.device)
        return gm.create_masks_for_vision_model(block_sequence_ids=block_ids, **kwargs)
    return create_masks_for_generate(**kwargs)


def choice(model, logits):
    """Greedy pick as generate makes it: the fixtures suppress special tokens through generation_config."""
    suppressed = model.generation_config.suppress_tokens or []
    return logits.index_fill(-1, torch.tensor(suppressed, dtype=torch.long), float("-inf")).argmax(-1)


def visual_mask(model, ids):
    return (ids == model.config.image_token_id) | (ids == model.config.video_token_id)


# ------------------------------------------------------------------------------------------------------
# Keep ratio 1.0: bit-identical to the unpatched model
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attn", ATTN)
def test_keep_ratio_one_is_bit_identical(variant, attn):
    model = build_model(variant, attn_implementation=attn)
    for kind, with_mask in [("two_images", True), ("image", False), ("batch", True)]:
        inputs = inputs_for(kind, with_mask)
        ref_logits, (ref_ids, ref_steps) = forward_logits(model, inputs), greedy(model, inputs)
        assert len(set(ref_ids.flatten().tolist())) > 1
        for env in [dict(PRUNE_METHOD="random_pre_llm"), dict(PRUNE_METHOD="divprune_pre_llm"),
                    dict(INTRA_LLM_LAYER_SPECS="1:random_intra_llm"), dict(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm"),
                    dict(INTRA_LLM_LAYER_SPECS="4:fastv_intra_llm")]:
            with patched(KEEP_RATIO=1.0, **env):
                logits, (ids, steps) = forward_logits(model, inputs), greedy(model, inputs)
            assert torch.equal(logits, ref_logits), (kind, env)
            assert torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps), (kind, env)


# ------------------------------------------------------------------------------------------------------
# Pre-LLM: the unpatched language model on the hand-shortened sequence, same positions, same masks
# ------------------------------------------------------------------------------------------------------
def reference_pre_llm(model, lm, ids, keep, steps_ids):
    embeds, mask = gather(lm["inputs_embeds"], keep), kept_mask(lm["mask_2d"], keep)
    is_visual = None if lm["mm_token_type_ids"] is None else gather(visual_mask(model, ids), keep) & (keep >= 0)
    positions = gather(lm["position_ids"], keep)
    cache = gm.DynamicCache(config=model.config.get_text_config())
    prefill_kwargs = dict(
        inputs_embeds=embeds, position_ids=positions, attention_mask=reference_masks(model, embeds, mask, is_visual),
        per_layer_inputs=None if lm.get("per_layer_inputs") is None else gather(lm["per_layer_inputs"], keep))
    out = model.model.language_model(**prefill_kwargs, past_key_values=cache, use_cache=True)
    prefill = softcap(model, model.lm_head(out.last_hidden_state))
    # generate asks for the last row only (the KV-shared layers then compute just that row)
    last_only = model.model.language_model(**prefill_kwargs, use_cache=False, logits_to_keep=1)
    steps = [softcap(model, model.lm_head(last_only.last_hidden_state[:, -1:]))[:, -1]]
    last = positions[:, -1:]
    for t, token in enumerate(steps_ids.T[:-1]):
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        token_embeds = model.model.language_model.embed_tokens(token[:, None])
        step = model.model.language_model(
            input_ids=token[:, None], position_ids=last + t + 1, past_key_values=cache, use_cache=True,
            attention_mask=reference_masks(model, token_embeds, mask, None, cache))
        steps.append(softcap(model, model.lm_head(step.last_hidden_state))[:, -1])
    return prefill, torch.stack(steps)


def lm_inputs(model, inputs):
    lm = capture_lm_inputs(model, inputs)
    lm["mask_2d"] = inputs.get("attention_mask")
    lm["mm_token_type_ids"] = inputs.get("mm_token_type_ids")
    return lm


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("kind, with_mask", [("two_images", True), ("video", False), ("ragged_batch", True)])
def test_pre_llm_equals_language_model_on_shortened_sequence(variant, attn, kind, with_mask):
    model = build_model(variant, attn_implementation=attn)
    inputs = inputs_for(kind, with_mask)
    lm = lm_inputs(model, inputs)
    with patched(KEEP_RATIO=0.5, PRUNE_METHOD="divprune_pre_llm"):
        logits = forward_logits(model, inputs)
        keep = custom_gemma4.pruning_state(model).pre_map.index
        ids, steps = greedy(model, inputs)
    assert keep.shape[1] < inputs["input_ids"].shape[1]
    with torch.no_grad():
        ref_prefill, ref_steps = reference_pre_llm(model, lm, inputs["input_ids"], keep, ids)
    assert torch.equal(logits, ref_prefill)
    assert torch.equal(steps, ref_steps)
    assert torch.equal(ids, choice(model, ref_steps).T)
    if not with_mask:  # no mask, no cache: gappy kept positions must not be read as packed sequences
        with patched(KEEP_RATIO=0.5, PRUNE_METHOD="divprune_pre_llm"):
            assert torch.equal(forward_logits(model, inputs, use_cache=False), ref_prefill)


# ------------------------------------------------------------------------------------------------------
# Intra-LLM: a hand-written loop over the decoder layers (per-layer inputs, per-type RoPE and masks, KV sharing)
# ------------------------------------------------------------------------------------------------------
def reference_intra(model, lm, ids, keep, layer_k):
    """No cache. Layers < K on the full sequence; at K gather hidden states, per-layer inputs, positions and
    position embeddings; masks rebuilt for the kept tokens — or, inside the KV-shared region, the full masks'
    kept query rows, since the shared layers read keys computed before K."""
    tm = model.model.language_model
    config = tm.config
    hidden, mask_2d, positions = lm["inputs_embeds"], lm["mask_2d"], lm["position_ids"]
    is_visual = visual_mask(model, ids) if lm["mm_token_type_ids"] is not None else None
    per_layer = None if lm.get("per_layer_inputs") is None else tm.project_per_layer_inputs(hidden, lm["per_layer_inputs"])
    embeddings = {t: tm.rotary_emb(hidden, positions, t) for t in set(config.layer_types)}
    masks = reference_masks(model, hidden, mask_2d, is_visual)
    shared = gm.KVSharingDict(None)
    first_shared = config.num_hidden_layers - config.num_kv_shared_layers
    for i, layer in enumerate(tm.layers):
        if i == layer_k:
            hidden, positions = gather(hidden, keep), gather(positions, keep)
            per_layer = None if per_layer is None else gather(per_layer, keep)
            embeddings = {t: (gather(c, keep), gather(s, keep)) for t, (c, s) in embeddings.items()}
            assert bool((keep >= 0).all())  # (no padding slots in these oracle inputs)
            if layer_k >= first_shared:
                full = reference_masks(model, lm["inputs_embeds"], mask_2d, is_visual)
                full = {t: m if m is not None else _materialised(model, lm, mask_2d, is_visual, t) for t, m in full.items()}
                masks = {t: torch.stack([m[b if m.shape[0] > 1 else 0][:, keep[b]] for b in range(keep.shape[0])])
                         for t, m in full.items()}
            else:
                mask_2d = None if mask_2d is None else gather(mask_2d, keep)
                is_visual = None if is_visual is None else gather(is_visual, keep)
                masks = reference_masks(model, hidden, mask_2d, is_visual)
        layer_type = config.layer_types[i]
        hidden = layer(hidden, None if per_layer is None else per_layer[:, :, i], shared_kv_states=shared,
                       position_embeddings=embeddings[layer_type], attention_mask=masks[layer_type],
                       position_ids=positions, past_key_values=None)
    return softcap(model, model.lm_head(tm.norm(hidden)))


def _materialised(model, lm, mask_2d, is_visual, layer_type):
    from transformers.masking_utils import create_causal_mask, sliding_window_overlay

    kwargs = dict(config=model.config.get_text_config(), inputs_embeds=lm["inputs_embeds"], attention_mask=mask_2d,
                  past_key_values=None, position_ids=None, allow_is_causal_skip=False)
    if layer_type == "full_attention":
        return create_causal_mask(**kwargs)
    return create_causal_mask(**kwargs, and_mask_function=sliding_window_overlay(model.config.get_text_config().sliding_window))


def extend(model, lm, ids, new_ids):
    """Prompt + generated tokens, positions as generate numbers them (padding-aware), +1 per new token."""
    t = new_ids.shape[1]
    tm = model.model.language_model
    out = dict(lm)
    out["inputs_embeds"] = torch.cat([lm["inputs_embeds"], tm.embed_tokens(new_ids)], dim=1)
    mask = lm["mask_2d"]
    base = lm["position_ids"] if mask is None else (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    base = base.expand(ids.shape[0], -1)
    out["position_ids"] = torch.cat([base, base[:, -1:] + torch.arange(1, t + 1)], dim=1)
    if lm.get("per_layer_inputs") is not None:
        out["per_layer_inputs"] = torch.cat([lm["per_layer_inputs"], tm.get_per_layer_inputs(new_ids)], dim=1)
    if lm["mask_2d"] is not None:
        out["mask_2d"] = torch.cat([lm["mask_2d"], torch.ones_like(new_ids)], dim=1)
    return out, torch.cat([ids, new_ids], dim=1)


@pytest.mark.parametrize("variant, layer_k", [("e2b", 2), ("e2b", 4), ("e2b", 5), ("dense31b", 3), ("moe26b", 2)])
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("kind, with_mask", [("two_images", False), ("batch", True)])
def test_intra_llm_equals_hand_written_layer_loop(variant, layer_k, attn, kind, with_mask):
    model = build_model(variant, attn_implementation=attn)
    inputs = inputs_for(kind, with_mask)
    ids = inputs["input_ids"]
    lm = lm_inputs(model, inputs)
    with patched(INTRA_LLM_LAYER_SPECS=f"{layer_k}:fastv_intra_llm:0.4"):
        logits = forward_logits(model, inputs)
        stage = custom_gemma4.pruning_state(model).intra_maps[0]
        gen_ids, steps = greedy(model, inputs)
    kept, queries_only = stage.index, stage.queries_only  # inside the KV-shared region the cache keeps every token
    assert queries_only == (variant == "e2b" and layer_k >= 4)
    with torch.no_grad():
        torch.testing.assert_close(logits, reference_intra(model, lm, ids, kept, layer_k), rtol=0, atol=0)
        if queries_only:  # generate already keeps only the last query row there: nothing changes
            ref_ids, ref_steps = greedy(model, inputs)
            assert torch.equal(gen_ids, ref_ids) and torch.equal(steps, ref_steps)
            return
        n = ids.shape[1]
        for t in range(STEPS):
            ext, ext_ids = extend(model, lm, ids, gen_ids[:, :t])
            ext_keep = torch.cat([kept, torch.arange(n, n + t).expand(kept.shape[0], t)], dim=1)
            ref = reference_intra(model, ext, ext_ids, ext_keep, layer_k)[:, -1]
            torch.testing.assert_close(steps[t], ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(gen_ids[:, t], choice(model, ref))


def test_layer_between_kv_store_and_shared_region_is_refused():
    model = build_model("e2b")
    with patched(INTRA_LLM_LAYER_SPECS="3:fastv_intra_llm:0.5"):
        with pytest.raises(PruneConfigError, match=r"layer 3 .*KV-storing layer 2.*allowed: a layer <= 2 .* >= 4"):
            forward_logits(model, inputs_for("image"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_shrinks_from_the_pruning_layer(variant):
    model = build_model(variant)
    inputs = inputs_for("image")
    with patched(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.5"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        kept = custom_gemma4.pruning_state(model).intra_maps[0].index.shape[1]
    n = inputs["input_ids"].shape[1]
    config = model.config.get_text_config()
    own_cache = [i for i in range(config.num_hidden_layers) if config.kv_sharing_modes[i] != "reuse"]
    # Tokens each layer has cached (sliding layers count every token seen, though they keep the last W-1).
    lengths = [out.past_key_values.layers[i].get_seq_length() for i in own_cache]
    assert lengths == [(n if i < 2 else kept) + 2 for i in own_cache]


# ------------------------------------------------------------------------------------------------------
# Attention signals: Gemma's scale 1.0, its masks (sliding, bidirectional), shared keys
# ------------------------------------------------------------------------------------------------------
PROBED = []


@pytest.fixture
def probe_method():
    import methods

    @methods.register_prune("gemma_probe_intra_llm", default_layer=2, min_layer=1)
    def gemma_probe_intra_llm(ctx):
        """Test probe."""
        rows = torch.cat([ctx.span_positions[:3], ctx.text_positions[-2:]])  # visual queries (bidirectional) too
        PROBED.append({"previous": ctx.attention_to_span(rows), "own": ctx.attention_to_span(rows, layer=ctx.layer),
                       "rows": rows, "span": ctx.span_positions})
        return torch.arange(ctx.num_tokens)

    PROBED.clear()
    yield
    methods._base._REGISTRY.pop("gemma_probe_intra_llm")


@pytest.mark.parametrize("variant, layer_k", [("e2b", 2), ("e2b", 5), ("dense31b", 2), ("dense31b", 3)])
@pytest.mark.parametrize("attn, tolerance", [("eager", 1e-6), ("sdpa", 1e-5)])
def test_attention_signals_equal_eager_attention_weights(variant, layer_k, attn, tolerance, probe_method):
    """Rows recomputed from q/k (captured at K-1, computed at K; shared keys in KV-shared layers; sliding and
    bidirectional masks) equal eager `output_attentions` (sdpa's hidden states differ in the last digits)."""
    inputs = inputs_for("batch")
    eager = build_model(variant, attn_implementation="eager")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    model = build_model(variant, attn_implementation=attn)
    with patched(INTRA_LLM_LAYER_SPECS=f"{layer_k}:gemma_probe_intra_llm:1.0"):
        forward_logits(model, inputs)
    assert len(PROBED) == 2
    for b, probe in enumerate(PROBED):
        for key, layer in (("previous", layer_k - 1), ("own", layer_k)):
            expected = attentions[layer][b][:, probe["rows"]][..., probe["span"]]
            torch.testing.assert_close(probe[key], expected, rtol=1e-4, atol=tolerance)


# ------------------------------------------------------------------------------------------------------
# Batches, spans, text-only prompts, records
# ------------------------------------------------------------------------------------------------------
def single(model, inputs, b):
    """Sample b of a batch as the processor would make it alone (images assigned to samples in order)."""
    keep = inputs["attention_mask"][b].bool()
    counts = [len(image_runs(row, model.config.image_token_id)) for row in inputs["input_ids"]]
    start = sum(counts[:b])
    return {"input_ids": inputs["input_ids"][b:b + 1, keep], "attention_mask": inputs["attention_mask"][b:b + 1, keep],
            "mm_token_type_ids": inputs["mm_token_type_ids"][b:b + 1, keep],
            "pixel_values": inputs["pixel_values"][start:start + counts[b]],
            "image_position_ids": inputs["image_position_ids"][start:start + counts[b]]}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("env", [dict(PRUNE_METHOD="divprune_pre_llm"), dict(PRUNE_METHOD="fastv_intra_llm"),
                                 dict(PRUNE_METHOD_PRE_LLM="random_pre_llm", PRUNE_METHOD_INTRA_LLM="fastv_intra_llm")])
@pytest.mark.parametrize("kind", ["batch", "ragged_batch"])
def test_batch_equals_each_sample_alone(variant, env, kind):
    model = build_model(variant)
    inputs = inputs_for(kind)
    with patched(KEEP_RATIO=0.5, **env):
        batch_logits = forward_logits(model, inputs)[:, -1]
        batch_ids, _ = greedy(model, inputs)
        for b in range(2):
            alone = single(model, inputs, b)
            torch.testing.assert_close(forward_logits(model, alone)[0, -1], batch_logits[b], rtol=1e-4, atol=1e-4)
            assert torch.equal(greedy(model, alone)[0][0], batch_ids[b])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_span_is_pruned_to_its_own_count(variant):
    model = build_model(variant)
    for kind in ("two_images", "video"):
        inputs = inputs_for(kind)
        with patched(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprune_pre_llm",
                     INTRA_LLM_LAYER_SPECS="1:random_intra_llm:0.5;2:fastv_intra_llm:0.25"):
            logits = forward_logits(model, inputs)
            record = custom_gemma4.last_record(model)
        ids = inputs["input_ids"][0]
        spans = record.spans[0]
        assert sum(s.counts["input"] for s in spans) == int(visual_mask(model, ids).sum())
        for span in spans:
            n = span.counts["input"]
            pre = keep_count(n, 0.5)
            assert span.counts == {"input": n, "pre_llm": pre, "layer_1": keep_count(pre, 0.5),
                                   "layer_2": keep_count(pre, 0.25)}
            assert span.grid is not None and span.grid[1] * span.grid[2] == n
        assert {s.modality for s in spans} == ({"video"} if kind == "video" else {"image"})
        if kind == "video":
            assert len(spans) == 2  # one span per frame
        dropped = sum(s.counts["input"] - s.counts["layer_2"] for s in spans)
        assert logits.shape[1] == len(ids) - dropped


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_only_prompt_is_untouched(variant):
    model = build_model(variant)
    inputs = inputs_for("text")
    ref_logits, (ref_ids, _) = forward_logits(model, inputs), greedy(model, inputs)
    with patched(KEEP_RATIO=0.25, PRUNE_METHOD_PRE_LLM="divprune_pre_llm", INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm"):
        assert torch.equal(forward_logits(model, inputs), ref_logits)
        assert torch.equal(greedy(model, inputs)[0], ref_ids)
        assert custom_gemma4.last_record(model).spans == [[]]
