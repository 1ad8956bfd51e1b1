"""Vision-encoder signals of the tiny Gemma 4 models, and the methods that read them, through the Gemma hooks.

* The attention received and the keys handed to a method equal what the model's own eager attention
  probabilities and k-norm outputs give, mapped to soft tokens by the model's own pooler (two images with
  different padding, and a video's frames); computing them with the padding left in would not;
* the methods at keep ratio 1.0 are bit-identical to the unpatched model; at 0.25 they keep the counted tokens
  at their original positions; a batch gives every sample what it gets alone.
"""

import pytest
import torch
from transformers.models.gemma4 import modeling_gemma4 as gm

import custom_gemma4
import methods
from methods import VisionNeeds
from tests.support import tiny_gemma
from tests.support.tiny_gemma import build_model
from tests.oracle import forward_logits, gather, greedy
from tests.test_gemma4 import inputs_for, patched, single, visual_mask
from tests.test_vision_signals import ENV, VISION_METHODS
from utils import keep_count

PIXELS = {"image": ("pixel_values", "image_position_ids"), "video": ("pixel_values_videos", "video_position_ids")}
PROBED = []


@pytest.fixture
def vision_probe():
    """A test-only pre-LLM method that keeps everything and records the vision signals it was handed."""

    @methods.register_prune("gemma_vision_probe_pre_llm", vision=VisionNeeds(first_layer=0, keys=True))
    def gemma_vision_probe_pre_llm(ctx):
        """Test probe."""
        PROBED.append({layer: ctx.vision_attention_received(layer) for layer in ctx.vision_layers()}
                      | {"keys": ctx.vision_keys(), "default": ctx.vision_attention_received()})
        return torch.arange(ctx.num_tokens)

    PROBED.clear()
    yield
    methods._base._REGISTRY.pop("gemma_vision_probe_pre_llm")


def build(variant, gqa, attn):
    """A tiny model; ``gqa``: an encoder with 4 query heads on 2 key heads (the fixtures' have 2 on 2)."""
    if not gqa:
        return build_model(variant, attn_implementation=attn)
    config = tiny_gemma._config(variant)
    config.vision_config.num_attention_heads, config.vision_config.num_key_value_heads = 4, 2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_gemma, "_config", lambda _: config)
        return build_model(variant, attn_implementation=attn)


def eager_run(model, pixels, positions, layers, monkeypatch):
    """The encoder's own eager probabilities (items, H, P, P) at each layer and the last layer's k_norm output
    (items, P, H_kv, d): post-norm, pre-RoPE keys."""
    tower = model.model.vision_tower
    eager = gm.eager_attention_forward
    current, probabilities, keys = {"layer": None}, {}, {}

    def recording_eager(*args, **kwargs):
        out, weights = eager(*args, **kwargs)
        if current["layer"] is not None:
            probabilities[current["layer"]] = weights
        return out, weights

    monkeypatch.setattr(gm, "eager_attention_forward", recording_eager)
    attn = tower.encoder.layers[layers[-1]].self_attn
    handles = [attn.k_norm.register_forward_hook(lambda m, a, out: keys.update(out=out))]
    for layer in layers:
        attn = tower.encoder.layers[layer].self_attn
        handles.append(attn.register_forward_pre_hook(lambda m, a, layer=layer: current.update(layer=layer)))
        handles.append(attn.register_forward_hook(lambda m, a, o: current.update(layer=None)))
    with torch.no_grad():
        tower(pixel_values=pixels, pixel_position_ids=positions)
    for handle in handles:
        handle.remove()
    monkeypatch.setattr(gm, "eager_attention_forward", eager)
    return probabilities, keys["out"]


def through_pooler(tower, per_patch, positions, padding):
    """(items, P, C) per-patch values pooled by the model's own pooler and stripped of empty bins as the vision
    tower does: the mean over each k x k bin (the pooler zeroes ``padding`` patches and divides by k^2)."""
    k = tower.config.pooling_kernel_size
    with torch.no_grad():
        pooled, kept = tower.pooler(per_patch, positions, padding, output_length=positions.shape[1] // k ** 2)
    return pooled[kept] / tower.pooler.root_hidden_size


@pytest.mark.parametrize("variant, gqa", [("e2b", False), ("dense31b", False), ("dense31b", True)])
@pytest.mark.parametrize("kind, modality", [("two_images", "image"), ("video", "video")])
def test_vision_signals_equal_the_models_own_attention(variant, gqa, kind, modality, vision_probe,
                                                       monkeypatch):
    inputs = inputs_for(kind)
    pixels, positions = (inputs[key] for key in PIXELS[modality])
    padding = (positions == -1).all(dim=-1)
    assert bool(padding.any(dim=-1).all())  # every item is padded...
    if kind == "two_images":
        assert len(set(padding.sum(dim=-1).tolist())) == 2  # ...and the two images by different amounts

    reference = build(variant, gqa, "eager")
    tower = reference.model.vision_tower
    layers = list(range(len(tower.encoder.layers)))
    probabilities, keys = eager_run(reference, pixels, positions, layers, monkeypatch)
    bin_size = tower.config.pooling_kernel_size ** 2

    def received(probs, rows):  # column mean over the query rows of each item, then head mean
        return torch.stack([p[:, r].mean(dim=1).mean(dim=0) for p, r in zip(probs, rows)])

    real_rows = list(~padding)
    attention = {layer: through_pooler(tower, received(probabilities[layer], real_rows)[..., None], positions,
                                       padding)[:, 0] * bin_size for layer in layers}
    heads_kv = keys.shape[2]
    token_keys = through_pooler(tower, keys.flatten(2), positions, padding).view(-1, heads_kv, keys.shape[-1])

    model = build(variant, gqa, "sdpa")
    with patched(KEEP_RATIO=1.0, PRUNE_METHOD="gemma_vision_probe_pre_llm"):
        forward_logits(model, inputs)
    spans = custom_gemma4.last_record(model).spans[0]
    assert len(PROBED) == len(spans) == 2  # one span per image / per frame
    for probe, span in zip(PROBED, spans):  # every item's scores sum to 1
        assert probe["default"].shape == (span.counts["input"],)
        assert float(probe["default"].sum()) == pytest.approx(1.0, abs=1e-5)
    for layer in layers:
        torch.testing.assert_close(torch.cat([probe[layer] for probe in PROBED]), attention[layer],
                                   rtol=1e-5, atol=1e-6)
    got_attention = torch.cat([probe["default"] for probe in PROBED])
    torch.testing.assert_close(got_attention, attention[layers[-1]])
    got_keys = torch.cat([probe["keys"] for probe in PROBED])
    torch.testing.assert_close(got_keys, token_keys, rtol=1e-5, atol=1e-5)

    # Negative controls: the padding exclusion is exercised. Averaging over every query row (padding rows
    # included) or pooling the padding patches' keys (the pooler would put them in bin 0) gives other values.
    every_row = [torch.ones_like(r) for r in real_rows]
    padded_rows = through_pooler(tower, received(probabilities[layers[-1]], every_row)[..., None], positions,
                                 padding)[:, 0] * bin_size
    assert not torch.allclose(got_attention, padded_rows, rtol=1e-3, atol=1e-5)
    padded_keys = through_pooler(tower, keys.flatten(2), positions, torch.zeros_like(padding))
    assert not torch.allclose(got_keys, padded_keys.view_as(got_keys), rtol=1e-3, atol=1e-5)


def test_pooler_bins_follow_the_pooler():
    """Bins from positions, not from patch order: a 9 x 6 item (W = 9: 3 bins per row) with shuffled patches
    and padding, reduced by ``to_soft_tokens`` as the model's own pooler reduces it."""
    gen = torch.Generator().manual_seed(0)
    xy = torch.tensor([(x, y) for y in range(6) for x in range(9)])
    order = torch.randperm(54, generator=gen)
    positions = torch.cat([xy[order], torch.full((9, 2), -1)]).unsqueeze(0)  # 63 patches, 7 bins, 6 real
    bins, kept = custom_gemma4.pooler_bins(positions, 7)
    assert bins[0, :54].tolist() == (xy[order, 0] // 3 + 3 * (xy[order, 1] // 3)).tolist()
    assert bins[0, 54:].tolist() == [-1] * 9 and kept.tolist() == [[True] * 6 + [False]]
    values = torch.randn(1, 63, 5, generator=gen)
    padding = (positions == -1).all(dim=-1)
    tower = build_model("e2b").model.vision_tower
    expected = through_pooler(tower, values, positions, padding)
    torch.testing.assert_close(custom_gemma4.to_soft_tokens(values, bins, kept, mean=True), expected)
    torch.testing.assert_close(custom_gemma4.to_soft_tokens(values, bins, kept, mean=False), expected * 9)


def layer0_inputs(model, inputs):
    """Hidden states and position ids entering decoder layer 0 (after any pre-LLM stage)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["hidden"], seen["positions"] = args[0] if args else kwargs["hidden_states"], kwargs["position_ids"]

    handle = model.model.language_model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward_logits(model, inputs)
    finally:
        handle.remove()
    return seen


# moe26b's vision tower is dense31b's (the variants differ in the language model only).
@pytest.mark.parametrize("variant", ["e2b", "dense31b"])
@pytest.mark.parametrize("method", VISION_METHODS)
def test_vision_methods_through_the_hooks(variant, method):
    model = build_model(variant)
    env = ENV.get(method, {})
    inputs = inputs_for("two_images")
    ref_logits, (ref_ids, ref_steps) = forward_logits(model, inputs), greedy(model, inputs)
    with patched(KEEP_RATIO=1.0, PRUNE_METHOD=method, **env):
        logits, (ids, steps) = forward_logits(model, inputs), greedy(model, inputs)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps)

    for kind in ("two_images", "video"):
        inputs = inputs_for(kind)
        full = layer0_inputs(model, inputs)
        with patched(KEEP_RATIO=0.25, PRUNE_METHOD=method, **env):
            pruned = layer0_inputs(model, inputs)
            state = custom_gemma4.pruning_state(model)
            index, spans = state.pre_map.index, state.record.spans[0]
            greedy(model, inputs)  # generate runs the encoder before the language model: signals must still arrive
        assert len(spans) == 2
        assert all(span.counts["pre_llm"] == keep_count(span.counts["input"], 0.25) for span in spans)
        assert index.shape[1] == inputs["input_ids"].shape[1] - sum(s.counts["input"] - s.counts["pre_llm"]
                                                                   for s in spans)
        # Every kept or merged token sits at the original position of the token it represents.
        assert torch.equal(pruned["positions"], gather(full["positions"], index))
        changed = (pruned["hidden"] != gather(full["hidden"], index)).any(dim=-1)[0]
        assert bool(visual_mask(model, inputs["input_ids"][0, index[0]])[changed].all())  # only visual tokens
        merging = method in ("prumerge_pre_llm", "prumerge_plus_pre_llm", "visionzip_pre_llm")
        assert bool(changed.any()) == merging


@pytest.mark.parametrize("method, kind", [("visionzip_pre_llm", "batch"), ("vtc_cls_pre_llm", "ragged_batch")])
def test_batch_spans_get_their_own_signals(method, kind):
    """In a batch every span gets its own image's signals: each sample as if alone."""
    model = build_model("dense31b")
    inputs = inputs_for(kind)
    with patched(KEEP_RATIO=0.5, PRUNE_METHOD=method, **ENV.get(method, {})):
        batch_logits = forward_logits(model, inputs)[:, -1]
        batch_ids, _ = greedy(model, inputs)
        for b in range(2):
            alone = single(model, inputs, b)
            torch.testing.assert_close(forward_logits(model, alone)[0, -1], batch_logits[b], rtol=1e-4, atol=1e-4)
            assert torch.equal(greedy(model, alone)[0][0], batch_ids[b])
