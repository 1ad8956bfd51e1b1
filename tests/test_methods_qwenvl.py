"""Every registered method through the Qwen-VL hooks, and the methods' signals against eager attention.

* every method (including ones added later), named alone, at keep ratio 1.0 (bit-identical to the unpatched
  model unless the method's documented count drops tokens anyway) and 0.25 (counts follow the keep rule or the
  method's documented rule; greedy generation runs);
* the signals the attention-scored methods read, recomputed from q/k, pick what eager ``output_attentions``
  (or the unpatched cache and hidden states) would;
* merged tokens (pre-LLM pooling, SparseVLM recycling) and withdrawn spans (VTW) equal hand-written references.
"""

import dataclasses
import functools

import pytest
import torch

import custom_qwenvl
import methods
from methods.dart import dart_select
from methods.sparsevlm import text_raters
from tests.oracle import TINY_PARAMS, check_registered_method
from tests.test_qwenvl import (capture_lm_inputs, extend, forward_logits, gather, greedy, inputs_for, patched,
                               reference_intra)
from tests.support.tiny_models import build_model
from utils import keep_count

REGISTRY = methods.load_methods()
FAMILY = "qwen2_5_vl"


@functools.lru_cache(maxsize=None)
def tiny(family, attn="sdpa"):
    return build_model(family, attn_implementation=attn)


@functools.lru_cache(maxsize=None)
def reference_run(family, kind):
    model, inputs = tiny(family), inputs_for(family, kind)
    return forward_logits(model, inputs), greedy(model, inputs)


# A left-padded batch; an image and a video in one prompt (Qwen2.5-VL: one (2, h, w) video span; Qwen3-VL: one
# span per frame, and deepstack features that follow the kept tokens).
CASES = [("qwen2_5_vl", "batch"), ("qwen2_5_vl", "image_video"), ("qwen3_vl", "image_video")]


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("family, kind", CASES)
def test_every_registered_method_through_the_qwen_hooks(name, family, kind):
    # ViT-stage methods run before block 1 of the tiny encoders; Qwen's packed vision attention takes no mask, so
    # ToMe runs without proportional attention (its refusal is tested in tests/test_vit_qwenvl.py)
    params = {**TINY_PARAMS.get(name, {}), **({"TOME_PROP_ATTN": "0"} if name == "tome_vit" else {})}
    check_registered_method(custom_qwenvl, name, tiny(family), inputs_for(family, kind), reference_run(family, kind),
                            lambda ratio: dict(KEEP_RATIO=ratio, PRUNE_METHOD=name, **params), vit_block=1)


def test_vtw_layer_spec_generation_after_withdrawing_every_span_equals_a_text_only_loop():
    """VTW at layer 2: prefill and every decode step equal the layer loop that drops every visual token."""
    model, inputs = tiny(FAMILY), inputs_for(FAMILY, "batch")
    lm = capture_lm_inputs(model, inputs)
    with patched(INTRA_LLM_LAYER_SPECS="2:vtw_intra_llm:1"):
        logits = forward_logits(model, inputs)
        keep = custom_qwenvl.pruning_state(model).intra_maps[0].index
        record = custom_qwenvl.last_record(model)
        ids, steps = greedy(model, inputs)
    ids_in = inputs["input_ids"]
    visual = ids_in == model.config.image_token_id
    assert [[s.counts["layer_2"] for s in sample] for sample in record.spans] == [[0], [0]]
    assert all(not bool(visual[b, keep[b].clamp(min=0)][keep[b] >= 0].any()) for b in range(2))
    with torch.no_grad():
        torch.testing.assert_close(logits, reference_intra(model, lm, keep, 2), rtol=1e-5, atol=1e-5)
        n = lm["inputs_embeds"].shape[1]
        for t in range(ids.shape[1]):
            ext_keep = torch.cat([keep, torch.arange(n, n + t).expand(keep.shape[0], t)], dim=1)
            ref = reference_intra(model, extend(lm, ids[:, :t], model), ext_keep, 2)[:, -1]
            torch.testing.assert_close(steps[t], ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Merged tokens: what the method returned, placed where the hooks say, equals a hand-written reference
# ------------------------------------------------------------------------------------------------------
@pytest.fixture
def recorded_results(monkeypatch):
    """Wrap every registered method to record (span positions, result) per call."""
    calls = []
    registry = dict(methods._base._REGISTRY)
    for name, spec in registry.items():
        def wrapped(ctx, fn=spec.fn):
            result = fn(ctx)
            calls.append((ctx.span_positions.clone(), result))
            return result
        monkeypatch.setitem(methods._base._REGISTRY, name, dataclasses.replace(spec, fn=wrapped))
    return calls


def placed(hidden, keep, calls_per_sample):
    """Gather ``hidden`` (B, L, D) with ``keep`` and put each merging result's features at its positions."""
    out = gather(hidden, keep).clone()
    for b, calls in enumerate(calls_per_sample):
        for span_positions, result in calls:
            if isinstance(result, methods.PruneResult) and result.features is not None:
                original = span_positions[result.indices]
                rows = torch.searchsorted(keep[b], original)
                out[b, rows] = result.features.to(out.dtype)
    return out


def split_by_sample(calls, record):
    counts = [len(sample) for sample in record.spans]
    return [calls[sum(counts[:b]):sum(counts[:b + 1])] for b in range(len(counts))]


@pytest.mark.parametrize("kind", ["two_images", "batch"])
def test_pre_llm_pooled_tokens_equal_the_language_model_on_the_merged_sequence(kind, recorded_results):
    model, inputs = tiny(FAMILY), inputs_for(FAMILY, kind)
    lm = capture_lm_inputs(model, inputs)
    with patched(KEEP_RATIO=0.25, PRUNE_METHOD="pool_pre_llm"):
        logits = forward_logits(model, inputs)
        keep = custom_qwenvl.pruning_state(model).pre_map.index
        record = custom_qwenvl.last_record(model)
    assert bool((keep >= 0).all()) and any(isinstance(r, methods.PruneResult) for _, r in recorded_results)
    embeds = placed(lm["inputs_embeds"], keep, split_by_sample(recorded_results, record))
    mask = lm.get("attention_mask")
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=embeds, position_ids=gather(lm["position_ids"][-3:], keep, dim=2),
                                         attention_mask=None if mask is None else gather(mask, keep))
        assert torch.equal(logits, model.lm_head(out.last_hidden_state))


def reference_intra_merged(model, lm, stages):
    """No-cache layer loop; before each stage layer: gather its keep index and place its merged tokens."""
    tm = model.model.language_model
    hidden, mask = lm["inputs_embeds"], lm.get("attention_mask")
    cos, sin = tm.rotary_emb(hidden, lm["position_ids"][-3:])
    from transformers.masking_utils import create_causal_mask

    for i, layer in enumerate(tm.layers):
        if i in stages:
            keep, calls = stages[i]
            hidden, cos, sin = placed(hidden, keep, calls), gather(cos, keep), gather(sin, keep)
            mask = None if mask is None else gather(mask, keep)
        causal = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=mask, past_key_values=None)
        hidden = layer(hidden, attention_mask=causal, position_embeddings=(cos, sin), position_ids=None)
    return model.lm_head(tm.norm(hidden))


def test_sparsevlm_recycled_tokens_equal_a_hand_written_layer_loop(recorded_results):
    model, inputs = tiny(FAMILY), inputs_for(FAMILY, "batch")
    lm = capture_lm_inputs(model, inputs)
    with patched(KEEP_RATIO=0.25, PRUNE_METHOD="sparsevlm_intra_llm"):
        logits = forward_logits(model, inputs)
        state = custom_qwenvl.pruning_state(model)
        maps, record = list(state.intra_maps), state.record
    assert [m.layer for m in maps] == [1, 2, 3]
    assert any(isinstance(r, methods.PruneResult) for _, r in recorded_results)
    per_stage = [recorded_results[i:i + 2] for i in range(0, len(recorded_results), 2)]  # one span per sample
    stages = {m.layer: (m.index, split_by_sample(calls, record)) for m, calls in zip(maps, per_stage)}
    with torch.no_grad():
        torch.testing.assert_close(logits, reference_intra_merged(model, lm, stages), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Signals: what the methods read, recomputed from q/k under sdpa, equals eager attention weights
# ------------------------------------------------------------------------------------------------------
def eager_reference(family, kind, layer_k):
    """Eager attentions, per-layer hidden states and cache of the unpatched model, and its spans."""
    model = tiny(family, "eager")
    inputs = inputs_for(family, kind)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True, use_cache=True)
    ids = inputs["input_ids"]
    visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    return model, inputs, out, visual


def runs_of(positions):
    """Contiguous runs of a sorted position tensor (the spans)."""
    return torch.tensor_split(positions, (torch.nonzero(positions.diff() != 1).flatten() + 1).tolist())


def kept_visual(family, kind, spec, attn):
    model = tiny(family, attn)
    inputs = inputs_for(family, kind)
    with patched(INTRA_LLM_LAYER_SPECS=spec, SPARSEVLM_RECYCLE=0):
        forward_logits(model, inputs)
        keep = custom_qwenvl.pruning_state(model).intra_maps[0].index
    ids = inputs["input_ids"]
    visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    return [[p for p in keep[b].tolist() if p >= 0 and bool(visual[b, p])] for b in range(ids.shape[0])]


def expected_per_span(inputs, visual, choose):
    """``choose(b, span_positions, text_after, real_text)`` -> kept positions of that span, for every span."""
    mask = inputs["attention_mask"].bool()
    result = []
    for b in range(visual.shape[0]):
        real_text = torch.nonzero(mask[b] & ~visual[b]).flatten()
        kept = []
        for span in runs_of(torch.nonzero(visual[b]).flatten()):
            kept += sorted(choose(b, span, real_text[real_text > span.max()], real_text))
        result.append(kept)
    return result


def top_positions(scores, span, keep):
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return span[order].tolist()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family, kind", [("qwen2_5_vl", "batch"), ("qwen3_vl", "two_images")])
def test_pdrop_fitprune_and_sparsevlm_pick_what_eager_attention_gives(family, kind, attn):
    layer_k, ratio = 2, 0.5
    _, inputs, out, visual = eager_reference(family, kind, layer_k)
    own, previous = out.attentions[layer_k], out.attentions[layer_k - 1]
    embeds = capture_lm_inputs(tiny(family), inputs)["inputs_embeds"]

    def pdrop(b, span, after, text):
        return top_positions(own[b, :, text[-1], span].mean(0), span, keep_count(len(span), ratio))

    def fitprune(b, span, after, text):
        headmax = previous[b].amax(dim=0)
        score = headmax[span][:, span].sum(0) / len(span) * headmax[after][:, span].sum(0)
        order = torch.sort(score, stable=True).indices[len(span) - keep_count(len(span), ratio):]
        return span[order].tolist()

    def sparsevlm(b, span, after, text):
        raters = after[text_raters(embeds[b, span], embeds[b, after])]
        return top_positions(previous[b, :, raters][:, :, span].mean(0).mean(0), span, keep_count(len(span), ratio))

    for name, choose in [("pdrop_intra_llm", pdrop), ("fitprune_intra_llm", fitprune), ("sparsevlm_intra_llm", sparsevlm)]:
        got = kept_visual(family, kind, f"{layer_k}:{name}:{ratio}", attn)
        assert got == expected_per_span(inputs, visual, choose), (name, attn)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_dart_picks_what_the_unpatched_cache_and_hidden_states_give(attn):
    """Keys of layer K-1 from the unpatched KV cache (post-RoPE), hidden states entering K through the final norm."""
    layer_k, ratio, family = 2, 0.5, "qwen2_5_vl"
    model, inputs, out, visual = eager_reference(family, "batch", layer_k)
    keys = out.past_key_values.layers[layer_k - 1].keys  # (B, H_kv, L, d)
    normed = model.model.language_model.norm(out.hidden_states[layer_k])

    def dart(b, span, after, text):
        local = dart_select(keys[b].transpose(0, 1).flatten(1), normed[b], span, after, keep_count(len(span), ratio),
                            4, 4, origin=int(text[0]))
        return span[local].tolist()

    got = kept_visual(family, "batch", f"{layer_k}:dart_intra_llm:{ratio}", attn)
    assert got == expected_per_span(inputs, visual, dart)


@pytest.fixture
def embedding_probe():
    seen = []

    @methods.register_prune("embedding_probe_intra_llm", default_layer=3)
    def embedding_probe_intra_llm(ctx):
        """Test probe."""
        rows = torch.cat([ctx.span_positions, ctx.text_after_span()])
        seen.append({"rows": ctx.input_embeddings(), "span": ctx.span_input_embeddings(),
                     "positions": ctx.span_positions, "whole": ctx.attention_to_span(rows),
                     "blocks": torch.cat(list(ctx.attention_to_span_blocks(rows, block_rows=3)), dim=1)})
        return torch.arange(ctx.num_tokens)

    yield seen
    methods._base._REGISTRY.pop("embedding_probe_intra_llm")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_input_embedding_and_block_signals_after_an_earlier_stage(family, embedding_probe):
    model, inputs = tiny(family), inputs_for(family, "ragged_batch")
    lm = capture_lm_inputs(model, inputs)
    with patched(INTRA_LLM_LAYER_SPECS="1:random_intra_llm:0.5;3:embedding_probe_intra_llm:0.5"):
        forward_logits(model, inputs)
        first = custom_qwenvl.pruning_state(model).intra_maps[0].index
    embeds = lm["inputs_embeds"]
    visual = inputs["input_ids"] == model.config.image_token_id
    assert len(embedding_probe) == 2
    for b, probe in enumerate(embedding_probe):
        rows = first[b]
        torch.testing.assert_close(probe["rows"][rows >= 0], embeds[b, rows[rows >= 0]], rtol=0, atol=0)
        assert torch.equal(probe["span"], embeds[b, visual[b]])  # all of the span, as it entered the LM
        assert len(probe["positions"]) < len(probe["span"])
        torch.testing.assert_close(probe["blocks"], probe["whole"], rtol=1e-6, atol=1e-7)  # blocks: same rows
