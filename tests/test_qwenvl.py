"""Oracles for the Qwen-VL hooks (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on tiny random models, float32, CPU.

* keep ratio 1.0: logits and greedy ids bit-identical to the unpatched model;
* pre-LLM: equal to the unpatched language model run on the hand-shortened sequence with the same positions;
* intra-LLM at K: equal to a hand-written loop over the decoder layers;
* spans, batches, videos and text-only prompts; the per-forward token-count record.
"""

import pytest
import torch
from transformers.masking_utils import create_causal_mask

import custom_qwenvl
from tests.support.tiny_models import FAMILIES, build_model, build_processor, make_inputs
from tests import oracle
from tests.oracle import ATTN, STEPS, capture_lm_inputs, forward_logits, gather, greedy, image_runs
from utils import PruneConfig, PruneConfigError, keep_count



def patched(**env):
    return oracle.patched(custom_qwenvl, **env)


def inputs_for(family, kind, with_mask=True, seed=0):
    inputs = dict(make_inputs(build_processor(family), kind, seed=seed))
    assert "mm_token_type_ids" in inputs  # without it transformers falls back to 1-D positions
    if not with_mask:
        inputs.pop("attention_mask")
    return inputs


def shorten_deepstack(lm, keep):
    """Gather Qwen3-VL's visual mask and deepstack rows with the same kept set."""
    if lm.get("visual_pos_masks") is None:
        return {}
    mask = lm["visual_pos_masks"]
    kept = torch.zeros_like(mask).scatter_(1, keep, True)
    among_visual = kept[mask]
    return {"visual_pos_masks": gather(mask, keep),
            "deepstack_visual_embeds": [e[among_visual] for e in lm["deepstack_visual_embeds"]]}


# ------------------------------------------------------------------------------------------------------
# Keep ratio 1.0: bit-identical to the unpatched model
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTN)
def test_keep_ratio_one_is_bit_identical(family, attn):
    model = build_model(family, attn_implementation=attn)
    for kind, with_mask in [("two_images", True), ("image", False), ("batch", True)]:
        inputs = inputs_for(family, kind, with_mask)
        ref_logits, (ref_ids, ref_steps) = forward_logits(model, inputs), greedy(model, inputs)
        assert len(set(ref_ids.flatten().tolist())) > 1  # a constant output would make the check vacuous
        for env in [dict(PRUNE_METHOD="random_pre_llm"), dict(PRUNE_METHOD="divprune_pre_llm"),
                    dict(INTRA_LLM_LAYER_SPECS="1:random_intra_llm"), dict(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm")]:
            with patched(KEEP_RATIO=1.0, **env):
                logits, (ids, steps) = forward_logits(model, inputs), greedy(model, inputs)
                record = custom_qwenvl.last_record(model)
            assert torch.equal(logits, ref_logits), (kind, env)
            assert torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps), (kind, env)
            assert all(len(set(s.counts.values())) == 1 for sample in record.spans for s in sample)


# ------------------------------------------------------------------------------------------------------
# Pre-LLM: the unpatched language model on the hand-shortened sequence
# ------------------------------------------------------------------------------------------------------
def reference_pre_llm(model, lm, keep, steps_ids):
    """Unpatched LM on the kept embeddings with their original 3-D positions, then a cached greedy loop."""
    embeds, positions, mask = lm["inputs_embeds"], lm["position_ids"], lm.get("attention_mask")
    positions = positions[-3:]
    kept_mask = None if mask is None else gather(mask, keep)
    cache_out = model.model.language_model(
        inputs_embeds=gather(embeds, keep), position_ids=gather(positions, keep, dim=2), attention_mask=kept_mask,
        use_cache=True, **shorten_deepstack(lm, keep))
    prefill = model.lm_head(cache_out.last_hidden_state)
    step_logits = [model.lm_head(cache_out.last_hidden_state[:, -1:])[:, -1]]  # generate projects the last row only
    cache, last = cache_out.past_key_values, positions[:, :, -1:]
    for t, token in enumerate(steps_ids.T[:-1]):
        if kept_mask is not None:
            kept_mask = torch.cat([kept_mask, torch.ones_like(kept_mask[:, :1])], dim=1)
        out = model.model.language_model(
            inputs_embeds=model.model.get_input_embeddings()(token[:, None]), position_ids=last + t + 1,
            attention_mask=kept_mask, past_key_values=cache, use_cache=True)
        step_logits.append(model.lm_head(out.last_hidden_state)[:, -1])
    return prefill, torch.stack(step_logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("kind, with_mask", [("two_images", True), ("image_video", False), ("batch", True)])
def test_pre_llm_equals_language_model_on_shortened_sequence(family, attn, kind, with_mask):
    model = build_model(family, attn_implementation=attn)
    inputs = inputs_for(family, kind, with_mask)
    lm = capture_lm_inputs(model, inputs)
    with patched(KEEP_RATIO=0.5, PRUNE_METHOD="divprune_pre_llm"):
        logits = forward_logits(model, inputs)
        keep = custom_qwenvl.pruning_state(model).pre_map.index
        ids, steps = greedy(model, inputs)
        assert torch.equal(custom_qwenvl.pruning_state(model).pre_map.index, keep)
    assert keep.shape[1] < lm["inputs_embeds"].shape[1] and bool((keep >= 0).all())
    with torch.no_grad():
        ref_prefill, ref_steps = reference_pre_llm(model, lm, keep, ids)
    assert torch.equal(logits, ref_prefill)
    assert torch.equal(steps, ref_steps)
    assert torch.equal(ids, ref_steps.argmax(-1).T)
    if not with_mask:  # no mask and no cache: gaps in the kept positions must not read as packed sequences
        with patched(KEEP_RATIO=0.5, PRUNE_METHOD="divprune_pre_llm"), torch.no_grad():
            assert torch.equal(model(**inputs, use_cache=False).logits, ref_prefill)


def test_rope_deltas_continue_decoding_without_explicit_positions():
    """A manual decode loop that passes no positions relies on rope_deltas += N - N'."""
    model = build_model("qwen2_5_vl")
    inputs = inputs_for("qwen2_5_vl", "two_images", with_mask=False)
    lm = capture_lm_inputs(model, inputs)
    with patched(KEEP_RATIO=0.5, PRUNE_METHOD="random_pre_llm"), torch.no_grad():
        out = model(**inputs, use_cache=True)
        keep = custom_qwenvl.pruning_state(model).pre_map.index
        token = out.logits[:, -1:].argmax(-1)
        manual = [model(input_ids=token, past_key_values=out.past_key_values).logits[:, -1]]
    with torch.no_grad():
        _, ref_steps = reference_pre_llm(model, lm, keep, torch.cat([token, token], dim=1))
    assert torch.equal(manual[0], ref_steps[1])


# ------------------------------------------------------------------------------------------------------
# Intra-LLM: a hand-written loop over the decoder layers
# ------------------------------------------------------------------------------------------------------
def reference_intra(model, lm, keep, layer_k):
    """No cache: full sequence through layers < K, gather the kept tokens, layers >= K on the short sequence.
    ``keep``/``layer_k`` may be lists for several stages (each keep indexes what the previous stage kept)."""
    stages = dict(zip(layer_k, keep)) if isinstance(layer_k, list) else {layer_k: keep}
    tm = model.model.language_model
    hidden, mask = lm["inputs_embeds"], lm.get("attention_mask")
    positions = lm["position_ids"][-3:]
    cos, sin = tm.rotary_emb(hidden, positions)
    deepstack = {k: lm[k] for k in ("visual_pos_masks", "deepstack_visual_embeds") if lm.get(k) is not None}
    for i, layer in enumerate(tm.layers):
        if i in stages:
            keep = stages[i]
            hidden, cos, sin = gather(hidden, keep), gather(cos, keep), gather(sin, keep)
            mask = None if mask is None else gather(mask, keep)
            deepstack = shorten_deepstack(deepstack, keep) if deepstack else {}
        causal = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=mask, past_key_values=None)
        hidden = layer(hidden, attention_mask=causal, position_embeddings=(cos, sin), position_ids=None)
        if deepstack and i < len(deepstack["deepstack_visual_embeds"]):
            hidden = tm._deepstack_process(hidden, deepstack["visual_pos_masks"], deepstack["deepstack_visual_embeds"][i])
    return model.lm_head(tm.norm(hidden))


def extend(lm, new_ids, model):
    """The LM inputs of the prompt followed by already generated tokens (positions continue +1 per token)."""
    t = new_ids.shape[1]
    embeds = torch.cat([lm["inputs_embeds"], model.model.get_input_embeddings()(new_ids)], dim=1)
    positions = lm["position_ids"][-3:]
    positions = torch.cat([positions, positions[:, :, -1:] + torch.arange(1, t + 1)], dim=2)
    out = dict(lm, inputs_embeds=embeds, position_ids=positions)
    if lm.get("attention_mask") is not None:
        out["attention_mask"] = torch.cat([lm["attention_mask"], torch.ones_like(new_ids)], dim=1)
    if lm.get("visual_pos_masks") is not None:
        out["visual_pos_masks"] = torch.cat([lm["visual_pos_masks"], torch.zeros_like(new_ids, dtype=torch.bool)], 1)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("method, layer_k", [("fastv_intra_llm", 2), ("random_intra_llm", 1), ("fastv_intra_llm", 3)])
@pytest.mark.parametrize("kind, with_mask", [("two_images", False), ("batch", True)])
def test_intra_llm_equals_hand_written_layer_loop(family, attn, method, layer_k, kind, with_mask):
    model = build_model(family, attn_implementation=attn)
    inputs = inputs_for(family, kind, with_mask)
    lm = capture_lm_inputs(model, inputs)
    with patched(INTRA_LLM_LAYER_SPECS=f"{layer_k}:{method}:0.4"):
        logits = forward_logits(model, inputs)
        state = custom_qwenvl.pruning_state(model)
        keep = state.intra_maps[0].index
        ids, steps = greedy(model, inputs)
    assert keep.shape[1] < lm["inputs_embeds"].shape[1] and bool((keep >= 0).all())
    with torch.no_grad():
        assert torch.equal(logits, reference_intra(model, lm, keep, layer_k))
        # Generation: a no-cache recomputation every step with the same kept set plus the new tokens.
        n = lm["inputs_embeds"].shape[1]
        for t in range(STEPS):
            ext_keep = torch.cat([keep, torch.arange(n, n + t).expand(keep.shape[0], t)], dim=1)
            ref = reference_intra(model, extend(lm, ids[:, :t], model), ext_keep, layer_k)[:, -1]
            torch.testing.assert_close(steps[t], ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(ids[:, t], ref.argmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTN)
def test_two_intra_llm_stages_equal_hand_written_layer_loop(family, attn):
    model = build_model(family, attn_implementation=attn)
    inputs = inputs_for(family, "batch")
    lm = capture_lm_inputs(model, inputs)
    with patched(INTRA_LLM_LAYER_SPECS="1:random_intra_llm:0.6;3:fastv_intra_llm:0.3"):
        logits = forward_logits(model, inputs)
        maps = custom_qwenvl.pruning_state(model).intra_maps
        ids, steps = greedy(model, inputs)
    assert [m.layer for m in maps] == [1, 3] and maps[1].index.shape[1] < maps[0].index.shape[1]
    with torch.no_grad():
        assert torch.equal(logits, reference_intra(model, lm, [m.index for m in maps], [1, 3]))
        ref = reference_intra(model, extend(lm, ids[:, :2], model),
                              [torch.cat([m.index, torch.arange(m.prefill_length, m.prefill_length + 2).expand(2, 2)], 1)
                               for m in maps], [1, 3])[:, -1]
    torch.testing.assert_close(steps[2], ref, rtol=1e-5, atol=1e-5)


def test_intra_llm_cache_lengths_per_layer():
    model = build_model("qwen2_5_vl")
    inputs = inputs_for("qwen2_5_vl", "image")
    with patched(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.5"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True)
        kept = custom_qwenvl.pruning_state(model).intra_maps[0].index.shape[1]
    n = inputs["input_ids"].shape[1]
    lengths = [out.past_key_values.get_seq_length(i) for i in range(4)]
    assert lengths == [n + 3] * 2 + [kept + 3] * 2


def test_fastv_scores_equal_eager_attention_weights():
    """The attention row recomputed from layer K-1's q/k picks what eager `output_attentions` would."""
    layer_k = 2
    for family in FAMILIES:
        model = build_model(family, attn_implementation="eager")
        inputs = inputs_for(family, "two_images")
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions[layer_k - 1]
        row = attentions[0, :, -1].mean(0)
        image_token = model.config.image_token_id
        ids = inputs["input_ids"][0]
        expected = []
        for run in image_runs(ids, image_token):
            k = keep_count(len(run), 0.5)
            expected += sorted(run[row[run].topk(k).indices].tolist())
        for attn in ATTN:
            model.set_attn_implementation(attn)
            with patched(INTRA_LLM_LAYER_SPECS=f"{layer_k}:fastv_intra_llm:0.5"):
                forward_logits(model, inputs)
                keep = custom_qwenvl.pruning_state(model).intra_maps[0].index[0]
            kept_visual = [p for p in keep.tolist() if int(ids[p]) == image_token]
            assert kept_visual == expected, (family, attn)


# ------------------------------------------------------------------------------------------------------
# Spans, batches, text-only prompts, records
# ------------------------------------------------------------------------------------------------------
def single(inputs, b):
    """Sample b of a left-padded batch (one image per sample), as the processor would make it alone."""
    keep = inputs["attention_mask"][b].bool()
    grid = inputs["image_grid_thw"]
    sizes = grid.prod(-1).tolist()
    start = sum(sizes[:b])
    return {"input_ids": inputs["input_ids"][b:b + 1, keep], "attention_mask": inputs["attention_mask"][b:b + 1, keep],
            "mm_token_type_ids": inputs["mm_token_type_ids"][b:b + 1, keep],
            "pixel_values": inputs["pixel_values"][start:start + sizes[b]], "image_grid_thw": grid[b:b + 1]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("env", [dict(PRUNE_METHOD="divprune_pre_llm"), dict(PRUNE_METHOD="fastv_intra_llm"),
                                 dict(PRUNE_METHOD_PRE_LLM="random_pre_llm", PRUNE_METHOD_INTRA_LLM="fastv_intra_llm")])
@pytest.mark.parametrize("kind", ["batch", "ragged_batch"])
def test_left_padded_batch_equals_each_sample_alone(family, env, kind):
    model = build_model(family)
    inputs = inputs_for(family, kind)
    with patched(KEEP_RATIO=0.5, **env):
        batch_logits = forward_logits(model, inputs)[:, -1]
        state = custom_qwenvl.pruning_state(model)
        maps = ([state.pre_map] if state.pre_map else []) + state.intra_maps
        # In the ragged batch the sample with fewer visual tokens is re-padded with masked slots.
        assert any(bool((m.index < 0).any()) for m in maps) == (kind == "ragged_batch")
        batch_ids, _ = greedy(model, inputs)
        for b in range(2):
            alone = single(inputs, b)
            torch.testing.assert_close(forward_logits(model, alone)[0, -1], batch_logits[b], rtol=1e-5, atol=1e-5)
            assert torch.equal(greedy(model, alone)[0][0], batch_ids[b])


def test_decode_mask_follows_the_kept_layout():
    """generate's 2-D mask stays in the original layout; layers after a stage must see the kept layout."""
    from hooks import PruningState, StageMap

    state = PruningState(PruneConfig())
    state.pre_map = StageMap(0, torch.tensor([[-1, 0, 2, 3], [0, 1, 2, 4]]), prefill_length=5)
    state.intra_maps = [StageMap(2, torch.tensor([[0, 1, 3], [0, 2, 3]]), prefill_length=4)]
    original = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # prefill 5 + 2 decoded tokens
    after_pre = state.decode_mask(original, [state.pre_map])
    assert after_pre.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    after_both = state.decode_mask(original, [state.pre_map] + state.intra_maps)
    assert after_both.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    state.decoded = 2  # generate dropped an all-ones mask: the padding slots must still be masked
    assert state.decode_mask(None, [state.pre_map]).tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_span_is_pruned_to_its_own_count(family):
    model = build_model(family)
    for kind in ("two_images", "video", "image_video"):
        inputs = inputs_for(family, kind)
        with patched(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprune_pre_llm",
                     INTRA_LLM_LAYER_SPECS="1:random_intra_llm:0.5;3:fastv_intra_llm:0.25"):
            logits = forward_logits(model, inputs)
            record = custom_qwenvl.last_record(model)
        ids = inputs["input_ids"][0]
        n_visual = int(((ids == model.config.image_token_id) | (ids == model.config.video_token_id)).sum())
        spans = record.spans[0]
        assert sum(s.counts["input"] for s in spans) == n_visual
        for span in spans:
            n = span.counts["input"]
            pre = keep_count(n, 0.5)
            assert span.counts == {"input": n, "pre_llm": pre, "layer_1": min(pre, keep_count(pre, 0.5)),
                                   "layer_3": min(pre, keep_count(pre, 0.25))}, (kind, span)
            assert span.grid is not None and span.grid[0] * span.grid[1] * span.grid[2] == n
        expected_modalities = {"two_images": {"image"}, "video": {"video"}, "image_video": {"image", "video"}}[kind]
        assert {s.modality for s in spans} == expected_modalities
        dropped = sum(s.counts["input"] - s.counts["layer_3"] for s in spans)
        assert logits.shape[1] == len(ids) - dropped
        if family == "qwen3_vl" and "video" in kind:
            assert sum(s.modality == "video" for s in spans) == inputs["video_grid_thw"][0, 0]  # one span per frame
        assert record.totals()["input"] == n_visual


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompt_is_untouched(family):
    model = build_model(family)
    inputs = inputs_for(family, "text")
    ref_logits, (ref_ids, _) = forward_logits(model, inputs), greedy(model, inputs)
    with patched(KEEP_RATIO=0.25, PRUNE_METHOD_PRE_LLM="divprune_pre_llm", INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm"):
        assert torch.equal(forward_logits(model, inputs), ref_logits)
        assert torch.equal(greedy(model, inputs)[0], ref_ids)
        assert custom_qwenvl.last_record(model).spans == [[]]


def test_unpatched_after_remove():
    model = build_model("qwen2_vl")
    inputs = inputs_for("qwen2_vl", "image")
    ref = forward_logits(model, inputs)
    with patched(KEEP_RATIO=0.5, PRUNE_METHOD="random_pre_llm"):
        assert forward_logits(model, inputs).shape[1] < ref.shape[1]
    assert torch.equal(forward_logits(model, inputs), ref)


def test_layer_beyond_depth_raises_at_first_forward():
    model = build_model("qwen2_5_vl", num_layers=4)
    with patched(INTRA_LLM_LAYER_SPECS="4:fastv_intra_llm:0.5"):
        with pytest.raises(PruneConfigError, match=r"layer 4 .*allowed: 0\.\.3"):
            forward_logits(model, inputs_for("qwen2_5_vl", "image"))


PROBED = []


@pytest.fixture
def probe_method():
    """A test-only intra-LLM method that keeps everything and records the signals it was offered."""
    import methods

    @methods.register_prune("signal_probe_intra_llm", default_layer=2, min_layer=1)
    def signal_probe_intra_llm(ctx):
        """Test probe."""
        PROBED.append({"previous": ctx.attention_to_span(), "own": ctx.attention_to_span(layer=ctx.layer),
                       "keys": ctx.key_states(), "normed": ctx.final_normed_hidden_states(),
                       "hidden": ctx.hidden_states, "span": ctx.span_positions})
        return torch.arange(ctx.num_tokens)

    PROBED.clear()
    yield
    methods._base._REGISTRY.pop("signal_probe_intra_llm")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTN)
def test_attention_signals_equal_eager_attention_weights(family, attn, probe_method):
    """Rows recomputed from q/k (layer K-1 captured, layer K computed) equal eager `output_attentions`."""
    layer_k = 2
    eager = build_model(family, attn_implementation="eager")
    inputs = inputs_for(family, "ragged_batch")
    layer_inputs = []
    handle = eager.model.language_model.layers[layer_k].register_forward_pre_hook(
        lambda module, args: layer_inputs.append(args[0]))
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    handle.remove()
    model = build_model(family, attn_implementation=attn)
    with patched(INTRA_LLM_LAYER_SPECS=f"{layer_k}:signal_probe_intra_llm:1.0"):
        forward_logits(model, inputs)
    spans_per_sample = [len(s) for s in custom_qwenvl.last_record(model).spans]
    assert len(PROBED) == sum(spans_per_sample) == 2
    for b, probe in enumerate(PROBED):
        span = probe["span"]
        for key, layer in (("previous", layer_k - 1), ("own", layer_k)):
            expected = out.attentions[layer][b, :, -1:, span]
            torch.testing.assert_close(probe[key], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probe["hidden"], layer_inputs[0][b], rtol=1e-5, atol=1e-5)
        tm = model.model.language_model
        torch.testing.assert_close(probe["normed"], tm.norm(layer_inputs[0][b]), rtol=1e-5, atol=1e-5)
        assert probe["keys"].shape == (inputs["input_ids"].shape[1], tm.config.num_key_value_heads,
                                       tm.layers[0].self_attn.head_dim)
