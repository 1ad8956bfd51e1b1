"""The oracle battery of every family whose language model is a standard 1-D RoPE decoder: LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision and InternVL3, on tiny random models, float32, CPU, under every attention implementation:

* keep ratio 1.0: logits and greedy ids bit-identical to the unpatched model (pre-LLM and intra-LLM methods; with a
  mask and positions, without a mask, a left-padded batch with and without positions);
* pre-LLM: equal to the unpatched language model run on the hand-shortened sequence (kept embeddings at their original
  positions, gaps included, with an explicit 2-D mask), prefill and cached decode steps; without a mask also with no
  cache (the gaps must not read as packed sequences) and in a manual decode loop that passes no positions;
* intra-LLM at K (alone, and after a pre-LLM stage with a second intra stage): equal to a hand-written loop over the
  decoder layers, prefill and generated steps;
* FastV's scores at layer K equal the eager model's own attention weights (``output_attentions``);
* a left-padded batch equals each sample alone (pre-LLM, intra-LLM, both); text-only prompts are untouched; one span
  per image (per video) with the keep rule's counts.

LLaVA-NeXT and OneVision close image rows with ``image_newline`` tokens: they are never pruned, so every kept set here
must contain them (and the pre-LLM reference keeps them). Family specifics (spans and newlines in detail, vision
encoder signals, every registered method) are in ``tests/test_llava.py``, ``tests/test_llava_next.py`` and
``tests/test_internvl.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType
from typing import Callable

import pytest
import torch
from transformers.masking_utils import create_causal_mask

import custom_internvl
import custom_llava
from hooks import text_positions_for
from tests import oracle
from tests.oracle import ATTN, capture_lm_inputs, forward_logits, gather, greedy, image_runs, kept_mask
from tests.support import tiny_internvl, tiny_llava
from utils import keep_count

STEPS = 3  # generated tokens compared (each costs a reference loop)
PER_TOKEN = ("input_ids", "attention_mask", "position_ids")


def sample_alone(inputs, b):
    """Sample b of a left-padded batch as the processor would make it alone (one image-sized item per sample)."""
    real = inputs["attention_mask"][b].bool()
    return {key: value[b:b + 1][:, real] if key in PER_TOKEN else value[b:b + 1] for key, value in inputs.items()}


def internvl_sample_alone(inputs, b):
    """InternVL: ``pixel_values`` holds every tile of the batch; sample b's are its image tokens / tokens per tile."""
    alone = sample_alone({key: value for key, value in inputs.items() if key != "pixel_values"}, b)
    tiles = [int((row == tiny_internvl.special_ids()["image_token_id"]).sum()) // tiny_internvl.TOKENS_PER_TILE
             for row in inputs["input_ids"]]
    start = sum(tiles[:b])
    return alone | {"pixel_values": inputs["pixel_values"][start:start + tiles[b]]}


@dataclasses.dataclass(frozen=True)
class Family:
    patches: ModuleType  # apply_patches / remove_patches / pruning_state / last_record
    build_model: Callable[[str], torch.nn.Module]  # attention implementation -> the cached tiny model
    make_inputs: Callable[[str], dict]  # kind -> the processor's inputs
    main: str  # a prompt with two visual items (run with a mask, and without in the pre- / intra-LLM oracles)
    no_mask: str  # a one-image prompt run without a mask
    batch: str  # left-padded, one image per sample
    repadded: tuple[bool, bool]  # which samples of the batch are re-padded after pruning (their image is larger)
    alone: Callable = sample_alone  # (batch inputs, b) -> sample b alone
    span_kinds: tuple[str, ...] = ()  # prompts of two visual items, besides ``main``, that must make two spans


FAMILIES = {
    "llava": Family(custom_llava, lambda attn: tiny_llava.build_model("llava", attn_implementation=attn),
                    lambda kind: tiny_llava.make_inputs(tiny_llava.build_processor("llava"), kind),
                    main="two_images", no_mask="image", batch="batch", repadded=(False, False),
                    span_kinds=("adjacent_images",)),  # touching placeholder runs still make two spans
    "llava_next": Family(custom_llava, lambda attn: tiny_llava.build_model("llava_next", attn_implementation=attn),
                         lambda kind: tiny_llava.make_inputs(tiny_llava.build_processor("llava_next"), kind),
                         main="two_images", no_mask="image", batch="batch", repadded=(False, True)),
    # Seed 3: with seed 0's weights OneVision's greedy output is constant on these prompts (a vacuous comparison).
    # Main: a tiled image and a video; without a mask the image whose stitched grid is downscaled (anyres_max_2).
    "llava_onevision": Family(custom_llava,
                              lambda attn: tiny_llava.build_model("llava_onevision", attn_implementation=attn, seed=3),
                              lambda kind: tiny_llava.make_inputs(tiny_llava.build_processor("llava_onevision"), kind),
                              main="image_video", no_mask="large_image", batch="batch", repadded=(False, True)),
    # Two images of 3 and 5 tiles; the batch's sample 0 has the larger image.
    "internvl": Family(custom_internvl, tiny_internvl.build_model, tiny_internvl.make_inputs, main="two_images",
                       no_mask="image", batch="batch", repadded=(True, False), alone=internvl_sample_alone),
}


def patches(family):
    return FAMILIES[family].patches


def patched(family, **env):
    return oracle.patched(patches(family), **env)


def model_for(family, attn="sdpa"):
    return FAMILIES[family].build_model(attn)


@functools.lru_cache(maxsize=None)
def _processed(family, kind):
    return FAMILIES[family].make_inputs(kind)


def prompt_inputs(processed, with_mask=True, with_positions=True):
    """The processor's inputs; with a mask also generate's positions (left padding counted out), so that a plain
    forward numbers tokens as generate's prefill does; without them (or without the mask) the model numbers
    0..L-1."""
    inputs = dict(processed)
    if not with_mask:
        inputs.pop("attention_mask")
    elif with_positions:
        inputs["position_ids"] = text_positions_for(inputs["attention_mask"], *inputs["input_ids"].shape, "cpu")
    return inputs


def inputs_for(family, kind, with_mask=True, with_positions=True):
    return prompt_inputs(_processed(family, kind), with_mask, with_positions)


@functools.lru_cache(maxsize=None)
def lm_inputs(family, attn, kind, with_mask):
    """The unpatched language model's inputs for this prompt (cached: do not modify)."""
    return capture_lm_inputs(model_for(family, attn), inputs_for(family, kind, with_mask))


def original_positions(lm):
    embeds, positions = lm["inputs_embeds"], lm.get("position_ids")
    if positions is None:
        positions = torch.arange(embeds.shape[1])
    return positions.expand(embeds.shape[0], -1)


def newlines(model, lm):
    """(B, L) bool: the language model's input rows that are the model's ``image_newline`` (copied, so equal); all
    False for a model without one."""
    newline = getattr(model.model, "image_newline", None)
    if newline is None:
        return torch.zeros(lm["inputs_embeds"].shape[:2], dtype=torch.bool)
    return (lm["inputs_embeds"] == newline).all(dim=-1)


def visual(model, ids):
    """The image (and video) placeholder ids."""
    video = getattr(model.config, "video_token_id", None)
    return (ids == model.config.image_token_id) | (ids == video if video is not None else False)


def assert_newlines_kept(model, lm, keep):
    """Every ``image_newline`` row of the input is in ``keep`` (and a model with newlines has some)."""
    rows = newlines(model, lm)
    assert bool(rows.any()) == (getattr(model.model, "image_newline", None) is not None)
    for b in range(keep.shape[0]):
        assert set(torch.nonzero(rows[b]).flatten().tolist()) <= set(keep[b].tolist())


def battery(*roles):
    """(family, kind, with_mask) for every family, the roles ``(role, with_mask)`` mapped to its prompt kinds."""
    return [(family, getattr(f, role), with_mask) for family, f in FAMILIES.items() for role, with_mask in roles]


# ------------------------------------------------------------------------------------------------------
# Keep ratio 1.0
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_ratio_one_is_bit_identical(family, attn):
    model, f = model_for(family, attn), FAMILIES[family]
    # (kind, with_mask, with_positions, generate too): a batch with its mask but no positions numbers the left padding
    # in a plain forward; generate, which derives the same positions from the mask, would repeat the case before it.
    cases = [(f.main, True, True, True), (f.no_mask, False, False, True), (f.batch, True, True, True),
             (f.batch, True, False, False)]
    for kind, with_mask, with_positions, generate in cases:
        inputs = inputs_for(family, kind, with_mask, with_positions)
        ref_logits = forward_logits(model, inputs)
        if generate:
            ref_ids, ref_steps = greedy(model, inputs, STEPS)
            assert len(set(ref_ids.flatten().tolist())) > 1, kind  # a constant output would make the check vacuous
        for env in [dict(PRUNE_METHOD="random_pre_llm"), dict(PRUNE_METHOD="divprune_pre_llm"),
                    dict(INTRA_LLM_LAYER_SPECS="1:random_intra_llm"), dict(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm")]:
            with patched(family, KEEP_RATIO=1.0, **env):
                assert torch.equal(forward_logits(model, inputs), ref_logits), (kind, with_positions, env)
                if generate:
                    ids, steps = greedy(model, inputs, STEPS)
                    assert torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps), (kind, env)
                record = patches(family).last_record(model)
            assert record.spans and all(len(set(s.counts.values())) == 1 for sample in record.spans for s in sample)


# ------------------------------------------------------------------------------------------------------
# Pre-LLM: the unpatched language model on the hand-shortened sequence
# ------------------------------------------------------------------------------------------------------
def reference_pre_llm(model, lm, keep, step_ids):
    """Unpatched language model on the kept embeddings at their original positions (gaps) with an explicit 2-D mask
    (with None, transformers would read the gaps as packed sequences), then a cached greedy loop whose positions
    continue from the original length."""
    tm = model.model.language_model
    mask = lm.get("attention_mask")
    mask = gather(torch.ones(lm["inputs_embeds"].shape[:2], dtype=torch.long) if mask is None else mask, keep)
    mask = mask * (keep >= 0)
    out = tm(inputs_embeds=gather(lm["inputs_embeds"], keep), position_ids=gather(original_positions(lm), keep),
             attention_mask=mask, use_cache=True)
    prefill = model.lm_head(out.last_hidden_state)
    steps = [model.lm_head(out.last_hidden_state[:, -1:])[:, -1]]  # generate projects the last row only
    cache, last = out.past_key_values, original_positions(lm)[:, -1:]
    for t, token in enumerate(step_ids.T[:-1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = tm(inputs_embeds=model.model.get_input_embeddings()(token[:, None]), position_ids=last + t + 1,
                 attention_mask=mask, past_key_values=cache, use_cache=True)
        steps.append(model.lm_head(out.last_hidden_state)[:, -1])
    return prefill, torch.stack(steps)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family, kind, with_mask",
                         battery(("main", True), ("main", False), ("no_mask", False), ("batch", True)))
def test_pre_llm_equals_language_model_on_shortened_sequence(family, attn, kind, with_mask):
    model, f = model_for(family, attn), FAMILIES[family]
    inputs = inputs_for(family, kind, with_mask)
    lm = lm_inputs(family, attn, kind, with_mask)
    env = dict(KEEP_RATIO=0.25, PRUNE_METHOD="divprune_pre_llm")
    with patched(family, **env):
        logits = forward_logits(model, inputs)
        keep = patches(family).pruning_state(model).pre_map.index
        ids, steps = greedy(model, inputs, STEPS)
        assert torch.equal(patches(family).pruning_state(model).pre_map.index, keep)  # generate's prefill kept as much
    assert keep.shape[1] < lm["inputs_embeds"].shape[1]
    assert bool((keep < 0).any()) == (kind == f.batch and any(f.repadded))  # the shorter sample re-padded (-1)
    assert_newlines_kept(model, lm, keep)
    with torch.no_grad():
        ref_prefill, ref_steps = reference_pre_llm(model, lm, keep, ids)
    assert torch.equal(logits, ref_prefill)
    assert torch.equal(steps, ref_steps)
    assert torch.equal(ids, ref_steps.argmax(-1).T)
    if not with_mask:
        with patched(family, **env), torch.no_grad():
            # No mask and no cache: the gaps in the kept positions must not read as packed sequences.
            assert torch.equal(model(**inputs, use_cache=False).logits, ref_prefill)
            # A manual decode loop without positions (nor a mask) continues the original numbering (original
            # length + steps), not the pruned cache's length.
            cache, manual = model(**inputs, use_cache=True).past_key_values, []
            for token in ids.T[:-1]:
                out = model(input_ids=token[:, None], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                manual.append(out.logits[:, -1])
        assert torch.equal(torch.stack(manual), ref_steps[1:])


# ------------------------------------------------------------------------------------------------------
# Intra-LLM: a hand-written loop over the decoder layers
# ------------------------------------------------------------------------------------------------------
def reference_intra(model, lm, stages):
    """No cache: layers < K on the full sequence, gather the kept tokens (and their rotary rows, mask), layers >= K on
    the short sequence; ``stages`` maps each stage layer to its keep index (into what the previous stage kept)."""
    tm = model.model.language_model
    hidden, mask = lm["inputs_embeds"], lm.get("attention_mask")
    cos, sin = tm.rotary_emb(hidden, original_positions(lm))
    for i, layer in enumerate(tm.layers):
        if i in stages:
            keep = stages[i]
            hidden, cos, sin = gather(hidden, keep), gather(cos, keep), gather(sin, keep)
            mask = kept_mask(mask, keep)  # samples left with fewer tokens are re-padded (-1)
        causal = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=mask, past_key_values=None)
        hidden = layer(hidden, attention_mask=causal, position_embeddings=(cos, sin), position_ids=None)
    return model.lm_head(tm.norm(hidden))


def extend(lm, new_ids, model):
    """The language model's inputs of the prompt followed by already generated tokens (positions continue +1)."""
    t = new_ids.shape[1]
    positions = original_positions(lm)
    out = dict(lm, inputs_embeds=torch.cat([lm["inputs_embeds"], model.model.get_input_embeddings()(new_ids)], dim=1),
               position_ids=torch.cat([positions, positions[:, -1:] + torch.arange(1, t + 1)], dim=1))
    if lm.get("attention_mask") is not None:
        out["attention_mask"] = torch.cat([lm["attention_mask"], torch.ones_like(new_ids)], dim=1)
    return out


def with_new_tokens(index, prefill_length, t):
    """A stage's keep index extended by the t tokens generated after the prefill (never pruned)."""
    return torch.cat([index, torch.arange(prefill_length, prefill_length + t).expand(index.shape[0], t)], dim=1)


def check_generated_steps(model, lm, stages, ids, steps):
    """Each generated step equals a no-cache recomputation with the same kept sets plus the tokens generated so far;
    ``stages``: the stage maps (layer, index, prefill_length)."""
    for t in range(STEPS):
        ref = reference_intra(model, extend(lm, ids[:, :t], model),
                              {m.layer: with_new_tokens(m.index, m.prefill_length, t) for m in stages})[:, -1]
        torch.testing.assert_close(steps[t], ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(ids[:, t], ref.argmax(-1))


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("method, layer_k", [("fastv_intra_llm", 2), ("random_intra_llm", 1)])
@pytest.mark.parametrize("family, kind, with_mask", battery(("main", False), ("batch", True)))
def test_intra_llm_equals_hand_written_layer_loop(family, attn, method, layer_k, kind, with_mask):
    model = model_for(family, attn)
    inputs = inputs_for(family, kind, with_mask)
    lm = lm_inputs(family, attn, kind, with_mask)
    with patched(family, INTRA_LLM_LAYER_SPECS=f"{layer_k}:{method}:0.25"):
        logits = forward_logits(model, inputs)
        stage = patches(family).pruning_state(model).intra_maps[0]
        ids, steps = greedy(model, inputs, STEPS)
    assert stage.layer == layer_k and stage.index.shape[1] < lm["inputs_embeds"].shape[1]
    assert_newlines_kept(model, lm, stage.index)
    with torch.no_grad():
        assert torch.equal(logits, reference_intra(model, lm, {layer_k: stage.index}))
        check_generated_steps(model, lm, [stage], ids, steps)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_pre_llm_then_two_intra_llm_stages_equal_hand_written_layer_loop(family, attn):
    model = model_for(family, attn)
    batch = FAMILIES[family].batch
    inputs, lm = inputs_for(family, batch), lm_inputs(family, attn, batch, True)
    with patched(family, PRUNE_METHOD_PRE_LLM="divprune_pre_llm", KEEP_RATIO=0.75,
                 INTRA_LLM_LAYER_SPECS="1:random_intra_llm:0.5;3:fastv_intra_llm:0.1"):
        logits = forward_logits(model, inputs)
        state = patches(family).pruning_state(model)
        pre, maps = state.pre_map, list(state.intra_maps)
        ids, steps = greedy(model, inputs, STEPS)
    assert [m.layer for m in maps] == [1, 3] and maps[1].index.shape[1] < maps[0].index.shape[1] < pre.index.shape[1]
    assert_newlines_kept(model, lm, gather(gather(pre.index, maps[0].index), maps[1].index))  # through every stage
    # The pre-LLM stage's kept tokens at their original positions, then the layer loop.
    shortened = dict(lm, inputs_embeds=gather(lm["inputs_embeds"], pre.index),
                     position_ids=gather(original_positions(lm), pre.index),
                     attention_mask=kept_mask(lm["attention_mask"], pre.index))
    with torch.no_grad():
        assert torch.equal(logits, reference_intra(model, shortened, {m.layer: m.index for m in maps}))
        check_generated_steps(model, shortened, maps, ids, steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_scores_equal_eager_attention_weights(family):
    """FastV's last-token attention row, recomputed from layer K-1's q / k, keeps in every span what the eager model's
    ``output_attentions`` ranks highest (the newlines always kept, never ranked), under every implementation."""
    layer_k, main = 2, FAMILIES[family].main
    eager, inputs = model_for(family, "eager"), inputs_for(family, main)
    with torch.no_grad():
        row = eager(**inputs, output_attentions=True).attentions[layer_k - 1][0, :, -1].mean(0)
    ids, rows = inputs["input_ids"][0], newlines(eager, lm_inputs(family, "eager", main, True))[0]
    expected = torch.nonzero(rows).flatten().tolist()
    for token in {int(t) for t in ids[visual(eager, ids)]}:
        for run in image_runs(ids, token):  # one span per run of placeholders here
            run = run[~rows[run]]
            expected += run[row[run].topk(keep_count(len(run), 0.5)).indices].tolist()
    is_visual = visual(eager, ids)
    for attn in ATTN:
        model = model_for(family, attn)
        # One call per span (LLaVA-OneVision's main input is a video: whole, not frame by frame).
        with patched(family, INTRA_LLM_LAYER_SPECS=f"{layer_k}:fastv_intra_llm:0.5", IMAGE_METHODS_ON_VIDEO="video"):
            forward_logits(model, inputs)
            keep = patches(family).pruning_state(model).intra_maps[0].index[0]
        assert [p for p in keep.tolist() if is_visual[p]] == sorted(expected), attn


# ------------------------------------------------------------------------------------------------------
# Batches, text-only prompts, spans
# ------------------------------------------------------------------------------------------------------
BATCH_ENVS = {"pre": dict(KEEP_RATIO=0.5, PRUNE_METHOD="divprune_pre_llm"),
              "intra": dict(KEEP_RATIO=0.5, PRUNE_METHOD="fastv_intra_llm"),
              "pre+intra": dict(KEEP_RATIO=0.3, PRUNE_METHOD_PRE_LLM="random_pre_llm",
                                INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.5")}


@pytest.mark.parametrize("stages", BATCH_ENVS)
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_each_sample_alone(family, stages):
    model, f = model_for(family), FAMILIES[family]
    batch = inputs_for(family, f.batch)
    assert bool((batch["attention_mask"] == 0).any())
    with patched(family, **BATCH_ENVS[stages]):
        ids, steps = greedy(model, batch, STEPS)  # steps[0]: the prefill's last row
        state = patches(family).pruning_state(model)
        maps = ([state.pre_map] if state.pre_map else []) + state.intra_maps
        # The sample with the larger image drops more: it is re-padded with masked slots.
        assert [any(bool((m.index[b] < 0).any()) for m in maps) for b in range(2)] == list(f.repadded)
        for b in range(2):
            alone_ids, alone_steps = greedy(model, f.alone(batch, b), STEPS)
            assert torch.equal(ids[b:b + 1], alone_ids)
            torch.testing.assert_close(steps[:, b:b + 1], alone_steps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompt_is_untouched(family):
    model = model_for(family)
    inputs = inputs_for(family, "text")
    ref_logits, (ref_ids, _) = forward_logits(model, inputs), greedy(model, inputs, STEPS)
    with patched(family, KEEP_RATIO=0.1, PRUNE_METHOD="divprune_pre_llm",
                 INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.1"):
        assert torch.equal(forward_logits(model, inputs), ref_logits)
        assert torch.equal(greedy(model, inputs, STEPS)[0], ref_ids)
        assert patches(family).last_record(model).spans == [[]]


@pytest.mark.parametrize("family, kind", [(family, kind) for family, f in FAMILIES.items()
                                          for kind in (f.main, *f.span_kinds)])
def test_record_has_one_span_per_visual_item_with_counts(family, kind):
    model = model_for(family)
    inputs = inputs_for(family, kind)
    with patched(family, KEEP_RATIO=0.25, PRUNE_METHOD="random_pre_llm",
                 INTRA_LLM_LAYER_SPECS="2:random_intra_llm:0.5"):
        forward_logits(model, inputs)
        record = patches(family).last_record(model)
    spans = record.spans[0]
    assert len(spans) == 2
    for span in spans:
        n = span.counts["input"]
        # A whole video is pruned frame by frame (IMAGE_METHODS_ON_VIDEO=frame); after that its frames are unknown.
        frames = span.grid[0] if span.modality == "video" and span.grid else 1
        assert span.counts["pre_llm"] == frames * keep_count(n // frames, 0.25)
        assert span.counts["layer_2"] == keep_count(span.llm_input, 0.5)
