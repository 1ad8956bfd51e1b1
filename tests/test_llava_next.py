"""LLaVA-NeXT and LLaVA-OneVision specifics on tiny random models, float32, CPU (the shared oracle battery, keep 1.0,
pre-LLM and intra-LLM references, decode steps, batches, is in tests/test_decoder_families.py):

* spans: one per image (base view + tiles) and one per video; the ``image_newline`` tokens, found as the rows of the
  language model's input that are the model's own newline embedding, are never pruned and never counted;
* vision-encoder signals: NeXT's CLIP [CLS] row and OneVision's substitute (attention received in SigLIP) equal the
  encoders' own eager attention, laid out by the model's own feature call (newlines dropped); LLaVA-1.5 built with a
  SigLIP tower (llava-interleave) falls back to the same substitute;
* every registered method runs through the hooks on both families.
"""

import functools

import pytest
import torch

import custom_llava
import methods
from methods import VisionNeeds
from tests import oracle
from tests.oracle import check_registered_method, forward_logits, greedy
from tests.support import tiny_llava
from tests.test_decoder_families import (assert_newlines_kept, inputs_for, lm_inputs, model_for, newlines,
                                         prompt_inputs, visual)
from utils import keep_count

FAMILIES = ("llava_next", "llava_onevision")
REGISTRY = methods.load_methods()
# The tiny towers have 4 layers: VTC-CLS's [CLS] range (start, -2) must be non-empty (layers 1..2 on CLIP; the
# substitute on SigLIP sums layers 1..3).
TINY_PARAMS = {**oracle.TINY_PARAMS, "vtc_cls_pre_llm": {"VTC_CLS_START_LAYER": 1}}


def patched(**env):
    return oracle.patched(custom_llava, **env)


# ------------------------------------------------------------------------------------------------------
# Spans and newlines
# ------------------------------------------------------------------------------------------------------
SPAN_KINDS = [("llava_next", "two_images", ["image", "image"]), ("llava_next", "large_image", ["image"]),
              ("llava_onevision", "image_video", ["image", "video"]), ("llava_onevision", "two_images", ["image"] * 2),
              ("llava_onevision", "video", ["video"]), ("llava_onevision", "large_image", ["image"])]


@pytest.mark.parametrize("family, kind, modalities", SPAN_KINDS)
def test_one_span_per_image_and_video_and_newlines_never_pruned_nor_counted(family, kind, modalities):
    model = model_for(family)
    inputs = inputs_for(family, kind)
    lm = lm_inputs(family, "sdpa", kind, True)
    with patched(KEEP_RATIO=0.1, PRUNE_METHOD="divprune_pre_llm", INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.1"):
        forward_logits(model, inputs)
        state = custom_llava.pruning_state(model)
        record, pre, intra = state.record, state.pre_map.index, state.intra_maps[0].index
    ids, rows = inputs["input_ids"][0], newlines(model, lm)[0]
    assert_newlines_kept(model, lm, oracle.gather(pre, intra))  # every newline survives both stages
    spans = record.spans[0]
    assert [s.modality for s in spans] == modalities
    # Every placeholder is a span's token or a newline; the counts leave the newlines out.
    placeholders = visual(model, ids)
    assert bool(placeholders[rows].all())
    assert sum(s.counts["input"] for s in spans) == int(placeholders.sum() - rows.sum())
    side = 84 // 14
    for span in spans:
        n = span.counts["input"]
        assert span.counts["pre_llm"] == keep_count(n, 0.1)
        assert span.counts["layer_2"] == keep_count(span.llm_input, 0.1)
        if span.modality == "video":  # frames x 3 x 3 pooled tokens, then one newline
            assert span.grid == (tiny_llava.VIDEO_FRAMES, 3, 3) and n == 4 * 9
        elif span.grid is not None:  # an image without tiles (OneVision's multi-image prompt): its base view
            assert span.grid == (1, side, side) and n == side * side
        else:  # base view + the stitched, unpadded tiles
            assert n > side * side
    if "video" in modalities:  # the video's newline is its last placeholder
        video = torch.nonzero(ids == model.config.video_token_id).flatten()
        assert bool(rows[video[-1]]) and int(rows[video].sum()) == 1
    # One newline per row of the stitched grid of a tiled image, one after a base view alone.
    image = torch.nonzero(ids == model.config.image_token_id).flatten()
    expected = {("llava_next", "two_images"): 6 + 10, ("llava_next", "large_image"): 10,
                ("llava_onevision", "image_video"): 6, ("llava_onevision", "two_images"): 2,
                ("llava_onevision", "video"): 0, ("llava_onevision", "large_image"): 7}[(family, kind)]
    assert int(rows[image].sum()) == expected


# ------------------------------------------------------------------------------------------------------
# Vision-encoder signals
# ------------------------------------------------------------------------------------------------------
PROBED = []


@pytest.fixture
def vision_probe():
    """A test-only pre-LLM method that keeps everything and records the vision signals it was handed: the [CLS] rows
    of every CLIP layer, or the substitute at every SigLIP layer, and the last layer's keys."""

    @methods.register_prune("llava_vision_probe_pre_llm",
                            vision=VisionNeeds(first_layer=0, keys=True, cls_layers=(0, -1)))
    def llava_vision_probe_pre_llm(ctx):
        """Test probe."""
        PROBED.append({"attention": {layer: ctx.vision_attention_received(layer) for layer in ctx.vision_layers()},
                       "keys": ctx.vision_keys(), "cls": ctx.vision_has_cls, "n": ctx.num_tokens})
        return torch.arange(ctx.num_tokens)

    PROBED.clear()
    yield
    methods._base._REGISTRY.pop("llava_vision_probe_pre_llm")


def encoder_reference(model, inputs, modality):
    """The eager tower run on exactly the images the model's feature call encodes (tiles, base views, frames):
    per layer (items, H, 1 + P or P, same) attention probabilities, and the last layer's k_proj output."""
    inner = model.model
    seen, keys = {}, {}
    tower = inner.vision_tower
    handle = tower.register_forward_pre_hook(lambda m, args: seen.update(pixels=args[0]))
    with torch.no_grad():
        features(model, inputs, modality)
    handle.remove()
    handle = tower.encoder.layers[-1].self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.update(k=out))
    with torch.no_grad():
        attentions = tower(seen["pixels"], output_attentions=True).attentions
    handle.remove()
    return attentions, keys["k"]


def features(model, inputs, modality):
    inner = model.model
    if modality == "video":
        return list(inner.get_video_features(inputs["pixel_values_videos"]).pooler_output)
    extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
    return list(inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **extra).pooler_output)


def laid_out_like_features(model, inputs, modality, per_item):
    """Per span, ``per_item`` (items, P, k) values of the encoded images put through the model's own feature call in
    place of the projector's output, so the model packs (unpads, downscales) or pools them as it does features; the
    newline rows (the model's ``image_newline``) dropped. (N, k) per span."""
    inner = model.model
    k = per_item.shape[-1]
    replacement = torch.zeros(*per_item.shape[:2], inner.config.text_config.hidden_size)
    replacement[..., :k] = per_item
    handle = inner.multi_modal_projector.register_forward_hook(lambda m, a, out: replacement)
    try:
        with torch.no_grad():
            packed = features(model, inputs, modality)
    finally:
        handle.remove()
    return [p[~(p == inner.image_newline).all(dim=-1)][:, :k] for p in packed]


def check_signals(model, inputs, modality, probes, attentions, keys, cls):
    depth = len(attentions)
    heads = attentions[0].shape[1]
    if cls:  # the [CLS] query's row over the patches, head mean; patches' keys
        per_layer = [a[:, :, 0, 1:].mean(dim=1) for a in attentions]
        keys = keys[:, 1:]
    else:  # attention each patch receives: mean over the queries of its image, then over heads
        per_layer = [a.mean(dim=2).mean(dim=1) for a in attentions]
    expected = [laid_out_like_features(model, inputs, modality, row[..., None]) for row in per_layer]
    expected_keys = laid_out_like_features(model, inputs, modality, keys)
    assert len(probes) == len(expected_keys)
    for i, probe in enumerate(probes):
        assert probe["cls"] == cls and sorted(probe["attention"]) == list(range(depth))
        for layer in range(depth):
            torch.testing.assert_close(probe["attention"][layer], expected[layer][i][:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probe["keys"].flatten(1), expected_keys[i], rtol=1e-5, atol=1e-6)
        assert probe["keys"].shape[1] == heads


@pytest.mark.parametrize("family, kind, modality", [("llava_next", "batch", "image"),
                                                    ("llava_onevision", "batch", "image"),
                                                    ("llava_onevision", "two_images", "image"),
                                                    ("llava_onevision", "video", "video")])
def test_vision_signals_equal_the_encoders_own_eager_attention(family, kind, modality, vision_probe):
    """NeXT: the [CLS] row of every CLIP tile; OneVision: the attention received in every SigLIP tile / frame. Both
    laid out by the model's own feature call: base view, then the stitched tiles unpadded (downscaled), or pooled."""
    inputs = inputs_for(family, kind)
    attentions, keys = encoder_reference(model_for(family, "eager"), inputs, modality)
    model = model_for(family)
    # A video's signals in one call (IMAGE_METHODS_ON_VIDEO=video), laid out as the span; frame by frame (the
    # default), each call gets its frame's rows (tests/test_vision_signals.py).
    with patched(KEEP_RATIO=1.0, PRUNE_METHOD="llava_vision_probe_pre_llm", IMAGE_METHODS_ON_VIDEO="video"):
        forward_logits(model, inputs)
    check_signals(model, inputs, modality, PROBED, attentions, keys, cls=(family == "llava_next"))


def test_llava_with_a_siglip_tower_gets_the_substitute(vision_probe):
    """LLaVA-1.5's class built with SigLIP (llava-interleave: no [CLS], strategy "full"): one (1, 6, 6) span per image,
    the substitute signals; VisionZip then prunes by them."""
    family = tiny_llava.SIGLIP_LLAVA
    inputs = prompt_inputs(tiny_llava.make_inputs(tiny_llava.build_processor(family), "two_images"))
    eager = tiny_llava.build_model(family, attn_implementation="eager")
    seen = {}
    handle = eager.model.vision_tower.encoder.layers[-1].self_attn.k_proj.register_forward_hook(
        lambda m, a, out: seen.update(k=out))
    with torch.no_grad():
        attentions = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    handle.remove()
    model = tiny_llava.build_model(family, attn_implementation="sdpa")
    with patched(KEEP_RATIO=1.0, PRUNE_METHOD="llava_vision_probe_pre_llm"):
        forward_logits(model, inputs)
        spans = custom_llava.last_record(model).spans[0]
    assert [s.grid for s in spans] == [(1, 6, 6)] * 2 and len(PROBED) == 2
    for i, probe in enumerate(PROBED):
        assert not probe["cls"] and probe["n"] == 36
        for layer, probs in enumerate(attentions):
            torch.testing.assert_close(probe["attention"][layer], probs[i].mean(dim=1).mean(dim=0),
                                       rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probe["keys"].flatten(1), seen["k"][i], rtol=1e-5, atol=1e-6)
    with patched(KEEP_RATIO=0.25, PRUNE_METHOD="visionzip_pre_llm", VISIONZIP_DOMINANT_RATIO=0.5):
        forward_logits(model, inputs)
        assert [s.counts["pre_llm"] for s in custom_llava.last_record(model).spans[0]] == [9, 9]


# ------------------------------------------------------------------------------------------------------
# Every registered method
# ------------------------------------------------------------------------------------------------------
METHOD_INPUTS = {"llava_next": "batch", "llava_onevision": "image_video"}


@functools.lru_cache(maxsize=None)
def reference_run(family):
    model, inputs = model_for(family), inputs_for(family, METHOD_INPUTS[family])
    return forward_logits(model, inputs), greedy(model, inputs)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_registered_method_through_the_llava_hooks(family, name):
    params = TINY_PARAMS.get(name, {})
    check_registered_method(custom_llava, name, model_for(family), inputs_for(family, METHOD_INPUTS[family]),
                            reference_run(family), lambda ratio: dict(KEEP_RATIO=ratio, PRUNE_METHOD=name, **params),
                            vit_block=1 if family == "llava_next" else None)  # OneVision's inputs hold a video
