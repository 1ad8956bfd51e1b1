"""Vision-encoder signals of the tiny Qwen-VL models, and the methods that read them, through the hooks.

* The attention received and the keys handed to a method equal what the model's own eager attention
  probabilities and q/k give, mapped to LLM tokens by the model's own merger (window permutation included);
* the methods at keep ratio 1.0 are bit-identical to the unpatched model; at 0.25 they keep the counted
  tokens, and merged tokens sit at their representative's original position.
"""

import importlib
import math

import pytest
import torch

import custom_qwenvl
import hooks
import methods
from methods import VisionNeeds
from tests.support.tiny_models import FAMILIES, build_model
from tests.test_qwenvl import forward_logits, gather, greedy, inputs_for, patched, single
from utils import PruneConfigError, keep_count

MODULES = {"qwen2_vl": "transformers.models.qwen2_vl.modeling_qwen2_vl",
           "qwen2_5_vl": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
           "qwen3_vl": "transformers.models.qwen3_vl.modeling_qwen3_vl"}
PIXELS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}
VISION_METHODS = ["prumerge_pre_llm", "prumerge_plus_pre_llm", "visionzip_pre_llm", "vispruner_pre_llm",
                  "vtc_cls_pre_llm"]
# PruMerge's official count ignores KEEP_RATIO; its keep-count mode is the one with a 1.0 / 0.25 contract.
# The tiny spans keep 1-3 tokens at 0.25: VisionZip's default split would leave no contextual token there.
ENV = {"prumerge_pre_llm": {"PRUMERGE_ADAPTIVE": 0}, "prumerge_plus_pre_llm": {"PRUMERGE_ADAPTIVE": 0},
       "vtc_cls_pre_llm": {"VTC_CLS_START_LAYER": 0}, "visionzip_pre_llm": {"VISIONZIP_DOMINANT_RATIO": 0.5}}

PROBED = []


@pytest.fixture
def vision_probe():
    """A test-only pre-LLM method that keeps everything and records the vision signals it was handed."""

    @methods.register_prune("vision_probe_pre_llm", vision=VisionNeeds(first_layer=0, keys=True))
    def vision_probe_pre_llm(ctx):
        """Test probe."""
        PROBED.append({layer: ctx.vision_attention_received(layer) for layer in ctx.vision_layers()}
                      | {"keys": ctx.vision_keys(), "default": ctx.vision_attention_received()})
        return torch.arange(ctx.num_tokens)

    PROBED.clear()
    yield
    methods._base._REGISTRY.pop("vision_probe_pre_llm")


def eager_reference(model, family, pixels, grid, layers, monkeypatch):
    """Per LLM token, from the model itself: attention received at each layer (eager probabilities, column
    mean per attention call, head mean, summed per merger group) and the last layer's pre-RoPE keys (mean per
    merger group). Values are fed through the merger's place so the model applies its own un-permutation."""
    module = importlib.import_module(MODULES[family])
    visual = model.model.visual
    eager = module.eager_attention_forward
    current, probabilities, qkv = {"layer": None}, {layer: [] for layer in layers}, {}

    def recording_eager(*args, **kwargs):
        out, weights = eager(*args, **kwargs)
        if current["layer"] is not None:
            probabilities[current["layer"]].append(weights[0])  # (H, n, n), one call per attention segment
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording_eager)
    handles = [visual.blocks[layers[-1]].attn.qkv.register_forward_hook(lambda m, a, out: qkv.update(out=out))]
    for layer in layers:
        attn = visual.blocks[layer].attn
        handles.append(attn.register_forward_pre_hook(lambda m, a, layer=layer: current.update(layer=layer)))
        handles.append(attn.register_forward_hook(lambda m, a, o: current.update(layer=None)))
    with torch.no_grad():
        visual(pixels, grid_thw=grid)
    for handle in handles:
        handle.remove()
    monkeypatch.setattr(module, "eager_attention_forward", eager)

    unit = visual.spatial_merge_size ** 2

    def through_merger(per_patch, reduce):
        def replace(module, args, output):
            return reduce(per_patch.reshape(-1, unit, per_patch.shape[-1]), dim=1)

        handle = visual.merger.register_forward_hook(replace)
        with torch.no_grad():
            out = visual(pixels, grid_thw=grid).pooler_output
        handle.remove()
        return out

    attention, in_encoder_order = {}, {}
    for layer in layers:
        per_patch = torch.cat([p.mean(dim=1).mean(dim=0) for p in probabilities[layer]])
        attention[layer] = through_merger(per_patch[:, None], torch.sum)[:, 0]
        in_encoder_order[layer] = per_patch.view(-1, unit).sum(dim=1)
    heads = visual.blocks[0].attn.num_heads
    keys = qkv["out"].view(qkv["out"].shape[0], 3, heads, -1)[:, 1]
    keys = through_merger(keys.flatten(1), torch.mean).view(-1, heads, keys.shape[-1])
    return attention, keys, in_encoder_order


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind, modality", [("two_images", "image"), ("video", "video")])
def test_vision_signals_equal_the_models_own_attention(family, kind, modality, vision_probe, monkeypatch):
    inputs = inputs_for(family, kind)
    pixels, grid = (inputs[key] for key in PIXELS[modality])
    reference_model = build_model(family, attn_implementation="eager")
    depth = len(reference_model.model.visual.blocks)
    layers = list(reference_model.config.vision_config.fullatt_block_indexes) if family == "qwen2_5_vl" \
        else list(range(depth))
    attention, keys, in_encoder_order = eager_reference(reference_model, family, pixels, grid, layers, monkeypatch)

    model = build_model(family, attn_implementation="sdpa")
    with patched(KEEP_RATIO=1.0, PRUNE_METHOD="vision_probe_pre_llm"):
        forward_logits(model, inputs)
    spans = custom_qwenvl.last_record(model).spans[0]
    assert len(spans) == (2 if kind == "two_images" or family == "qwen3_vl" else 1)
    # One call per image and per frame (IMAGE_METHODS_ON_VIDEO=frame: a one-span video's temporal steps one by one).
    assert len(PROBED) == sum(span.grid[0] for span in spans)
    for probe in PROBED:  # every attention segment (image, or frame) sums to 1
        assert float(probe["default"].sum()) == pytest.approx(1, abs=1e-5)
    for layer in layers:
        got = torch.cat([probe[layer] for probe in PROBED])
        torch.testing.assert_close(got, attention[layer], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([probe["default"] for probe in PROBED]), attention[layers[-1]])
    torch.testing.assert_close(torch.cat([probe["keys"] for probe in PROBED]), keys, rtol=1e-5, atol=1e-6)
    if family == "qwen2_5_vl" and kind == "two_images":  # windows permuted: no un-permutation would fail
        assert not torch.allclose(in_encoder_order[layers[-1]], attention[layers[-1]])


def test_attention_received_is_chunked_exactly(monkeypatch):
    query, key = torch.randn(3, 11, 4), torch.randn(3, 11, 4)
    segments = [torch.arange(0, 6), torch.tensor([6, 8, 9])]  # patches 7 and 10 are padding
    full = hooks.attention_received(query, key, 0.5, segments)
    monkeypatch.setattr(hooks, "VISION_CHUNK_ELEMENTS", 4)  # one query row at a time
    torch.testing.assert_close(hooks.attention_received(query, key, 0.5, segments), full)
    assert full[7] == 0 and full[10] == 0
    assert float(full[:6].sum()) == pytest.approx(1.0) and float(full[[6, 8, 9]].sum()) == pytest.approx(1.0)
    probs = torch.softmax(query[:, :6] @ key[:, :6].transpose(1, 2) * 0.5, dim=-1)
    torch.testing.assert_close(full[:6], probs.mean(dim=1).mean(dim=0))


def official_mean_query_scores(model, family, pixels, grid):
    """FastVID's official Qwen2.5-VL salient score, recomputed from the model's last vision block: the frame's mean
    rotated query (the model's own ``apply_rotary_pos_emb_vision``) against the 2x2-mean rotated keys, softmax per
    frame, heads averaged, then un-permuted by the model's own merger."""
    module = importlib.import_module(MODULES[family])
    visual = model.model.visual
    attn, seen = visual.blocks[-1].attn, {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(hidden=a[0] if a else kw["hidden_states"],
                                                                       **kw), with_kwargs=True)
    with torch.no_grad():
        visual(pixels, grid_thw=grid)
    handle.remove()
    hidden = seen["hidden"]
    q, k, _ = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = module.apply_rotary_pos_emb_vision(q, k, *seen["position_embeddings"])
    unit = visual.spatial_merge_size ** 2
    scores = []
    bounds = seen["cu_seqlens"].tolist()
    for start, end in zip(bounds, bounds[1:]):  # one frame (or image) each
        mean_query = q[start:end].transpose(0, 1).mean(dim=1, keepdim=True)  # (H, 1, d)
        keys = k[start:end].transpose(0, 1).reshape(attn.num_heads, -1, unit, k.shape[-1]).mean(dim=2)
        weights = torch.softmax(mean_query @ keys.transpose(1, 2) / math.sqrt(k.shape[-1]), dim=-1)
        scores.append(weights.mean(dim=1).mean(dim=0))
    per_token = torch.cat(scores)

    handle = visual.merger.register_forward_hook(lambda m, a, out: per_token[:, None].to(out.dtype))
    with torch.no_grad():
        out = visual(pixels, grid_thw=grid).pooler_output
    handle.remove()
    return out[:, 0], per_token


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind, modality", [("two_images", "image"), ("video", "video")])
def test_mean_query_signal_equals_fastvids_official_score(family, kind, modality, monkeypatch):
    seen = []

    @methods.register_prune("mean_query_probe_pre_llm", vision=VisionNeeds(mean_query=True))
    def mean_query_probe_pre_llm(ctx):
        """Test probe."""
        seen.append(ctx.vision_attention_received())
        return torch.arange(ctx.num_tokens)

    try:
        inputs = inputs_for(family, kind)
        pixels, grid = (inputs[key] for key in PIXELS[modality])
        model = build_model(family)
        expected, in_encoder_order = official_mean_query_scores(model, family, pixels, grid)
        with patched(KEEP_RATIO=1.0, PRUNE_METHOD="mean_query_probe_pre_llm"):
            forward_logits(model, inputs)
    finally:
        methods._base._REGISTRY.pop("mean_query_probe_pre_llm")
    for scores in seen:  # one call per image or frame; each sums to 1
        assert float(scores.sum()) == pytest.approx(1, abs=1e-5)
    torch.testing.assert_close(torch.cat(seen), expected, rtol=1e-5, atol=1e-6)
    if family == "qwen2_5_vl" and kind == "two_images":  # windows permuted: no un-permutation would fail
        assert not torch.allclose(in_encoder_order, expected)


def test_mean_query_attention_on_hand_made_keys():
    """Two heads, 4 patches = 2 tokens of 2 patches, one segment: the mean query points at token 1's mean key."""
    query = torch.tensor([[[1.0, 0.0]] * 2, [[3.0, 0.0]] * 2, [[0.0, 0.0]] * 2, [[0.0, 0.0]] * 2])  # mean (1, 0)
    key = torch.tensor([[[0.0, 1.0]] * 2, [[0.0, -1.0]] * 2, [[2.0, 0.0]] * 2, [[0.0, 0.0]] * 2])  # means 0, (1, 0)
    scores = hooks.mean_query_attention(query, key, 1.0, [0, 4], 2)
    e = math.exp(1.0)
    torch.testing.assert_close(scores, torch.tensor([1 / (1 + e), e / (1 + e)]))
    two = hooks.mean_query_attention(query, key, 1.0, [0, 2, 4], 2)  # a segment per token: each gets 1
    torch.testing.assert_close(two, torch.ones(2))


def test_vision_layers_follow_the_request():
    full_blocks = [7, 15, 23, 31]  # Qwen2.5-VL-7B
    assert hooks.vision_layers(VisionNeeds(), full_blocks, 32) == [31]
    assert hooks.vision_layers(VisionNeeds(first_layer=16), full_blocks, 32) == [23, 31]
    assert hooks.vision_layers(VisionNeeds(first_layer=-9), list(range(32)), 32) == list(range(23, 32))
    with pytest.raises(hooks.PruneConfigError, match="no globally attending layer"):
        hooks.vision_layers(VisionNeeds(first_layer=32), full_blocks, 32)
    with pytest.raises(hooks.PruneConfigError, match=r"^START='-33': .* past the first .*allowed: -32\.\.31"):
        hooks.vision_layers(VisionNeeds(first_layer=-33, first_layer_var="START"), list(range(32)), 32)
    with pytest.raises(hooks.PruneConfigError, match=r"^START='-1': .*allowed: 0\.\.31 or -33\.\.-2 "):
        hooks.vision_layers(VisionNeeds(first_layer=-1, first_layer_var="START"), full_blocks, 33)


@pytest.mark.parametrize("family, start", [("qwen2_vl", 16), ("qwen2_5_vl", 2), ("qwen3_vl", -3)])
def test_vtc_cls_start_layer_beyond_the_encoder_is_named(family, start):
    """The tiny encoders have 2 layers (Qwen2.5-VL: the full-attention block is the last one): the first forward
    refuses a start layer outside them, naming VTC_CLS_START_LAYER, its value and this encoder's range."""
    model = build_model(family)
    with patched(KEEP_RATIO=0.5, PRUNE_METHOD="vtc_cls_pre_llm", VTC_CLS_START_LAYER=start):
        with pytest.raises(PruneConfigError) as err:
            forward_logits(model, inputs_for(family, "image"))
    blocks = [1] if family == "qwen2_5_vl" else [0, 1]
    assert str(err.value).startswith(f"VTC_CLS_START_LAYER='{start}': first vision-encoder layer {start} ")
    assert str(err.value).endswith(f"allowed: -2..1 (a negative index counts from the end) for this encoder of 2 "
                                   f"layers, whose globally attending layers are {blocks}")


def test_encoder_is_not_hooked_for_methods_without_vision_signals(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("capture_vision called for a method that reads no vision signals")

    monkeypatch.setattr(custom_qwenvl.QwenAdapter, "capture_vision", refuse)
    model = build_model("qwen2_5_vl")
    with patched(KEEP_RATIO=0.5, PRUNE_METHOD="divprune_pre_llm"):
        forward_logits(model, inputs_for("qwen2_5_vl", "image"))
        assert custom_qwenvl.pruning_state(model).pending_vision == {}


def layer0_inputs(model, inputs):
    """Hidden states and rotary cos entering decoder layer 0 (after any pre-LLM stage)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["hidden"], seen["cos"] = args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"][0]

    handle = model.model.language_model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward_logits(model, inputs)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", VISION_METHODS)
def test_vision_methods_through_the_hooks(family, method):
    model = build_model(family)
    env = ENV.get(method, {})
    inputs = inputs_for(family, "two_images")
    ref_logits, (ref_ids, ref_steps) = forward_logits(model, inputs), greedy(model, inputs)
    with patched(KEEP_RATIO=1.0, PRUNE_METHOD=method, **env):
        logits, (ids, steps) = forward_logits(model, inputs), greedy(model, inputs)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps)

    inputs = inputs_for(family, "image_video")
    full = layer0_inputs(model, inputs)
    with patched(KEEP_RATIO=0.25, PRUNE_METHOD=method, **env):
        pruned = layer0_inputs(model, inputs)
        state = custom_qwenvl.pruning_state(model)
        index, spans = state.pre_map.index, state.record.spans[0]
        greedy(model, inputs)  # generate runs the encoder before the language model: signals must still arrive
    assert all(span.counts["pre_llm"] == keep_count(span.counts["input"], 0.25) for span in spans)
    assert index.shape[1] == inputs["input_ids"].shape[1] - sum(s.counts["input"] - s.counts["pre_llm"] for s in spans)
    # Every kept or merged token sits at the original position of the token it represents.
    assert torch.equal(pruned["cos"], gather(full["cos"], index))
    changed = (pruned["hidden"] != gather(full["hidden"], index)).any(dim=-1)[0]
    visual = torch.isin(inputs["input_ids"][0, index[0]], torch.tensor([model.config.image_token_id,
                                                                         model.config.video_token_id]))
    assert bool(visual[changed].all())  # only visual tokens are ever replaced
    merging = method in ("prumerge_pre_llm", "prumerge_plus_pre_llm", "visionzip_pre_llm")
    assert bool(changed.any()) == merging


@pytest.mark.parametrize("family, kind", [("qwen2_5_vl", "batch"), ("qwen3_vl", "ragged_batch")])
def test_batch_spans_get_their_own_signals(family, kind):
    """In a left-padded batch every span gets its own image's signals: each sample as if alone."""
    model = build_model(family)
    inputs = inputs_for(family, kind)
    with patched(KEEP_RATIO=0.5, PRUNE_METHOD="visionzip_pre_llm", VISIONZIP_DOMINANT_RATIO=0.5):
        batch = forward_logits(model, inputs)[:, -1]
        for b in range(2):
            torch.testing.assert_close(forward_logits(model, single(inputs, b))[0, -1], batch[b], rtol=1e-5, atol=1e-5)


def test_prumerge_official_count_is_recorded(monkeypatch):
    """PruMerge's default (official, data-dependent) count: the IQR outliers plus the extra token, per span."""
    import methods.prumerge as prumerge

    selected, adaptive_count = [], prumerge.adaptive_count

    def spy(attention):
        count = adaptive_count(attention)
        selected.append((attention.numel(), count[0]))
        return count

    monkeypatch.setattr(prumerge, "adaptive_count", spy)
    model = build_model("qwen2_5_vl")
    with patched(KEEP_RATIO=0.25, PRUNE_METHOD="prumerge_pre_llm"):
        forward_logits(model, inputs_for("qwen2_5_vl", "two_images"))
        spans = custom_qwenvl.last_record(model).spans[0]
    assert [(s.counts["input"], s.counts["pre_llm"]) for s in spans] == [(n, k + (k < n)) for n, k in selected]
