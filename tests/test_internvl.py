"""InternVL specifics (``custom_internvl``) on a tiny random InternVL3 model, float32, CPU (the shared oracle battery,
keep 1.0, pre-LLM and intra-LLM references, decode steps, batches, FastV vs eager attention, is in
tests/test_decoder_families.py):

* spans: one per image with all its tiles, grid (tiles, h, w); video frames one span each; the record's counts;
* the patched classes are restored by remove_patches;
* every registered method runs through the hooks (ViT-stage methods before InternViT block 1, see
  tests/test_vit_internvl.py);
* the vision-encoder signals equal the eager InternViT attention probabilities and keys, grouped by the model's own
  pixel shuffle.
"""

import dataclasses
import functools

import pytest
import torch

import custom_internvl
import methods
from methods import VisionNeeds
from tests import oracle
from tests.oracle import TINY_PARAMS, forward_logits, greedy, image_runs
from tests.support.tiny_internvl import build_model
from tests.test_decoder_families import inputs_for, model_for
from utils import keep_count


def patched(**env):
    return oracle.patched(custom_internvl, **env)


def internvl_model(attn="sdpa", qk_norm=False):
    """The battery's cached model, or the InternViT-6B-like one (q / k norms)."""
    return build_model(attn, qk_norm=True) if qk_norm else model_for("internvl", attn)


# ------------------------------------------------------------------------------------------------------
# Spans, records, patches
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, grids", [("two_images", [(3, 2, 2), (5, 2, 2)]), ("video", [(1, 2, 2)] * 4),
                                         ("batch", [(5, 2, 2), (3, 2, 2)])])
def test_one_span_per_image_with_all_its_tiles(kind, grids):
    model = internvl_model()
    inputs = inputs_for("internvl", kind)
    with patched(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprune_pre_llm",
                 INTRA_LLM_LAYER_SPECS="1:random_intra_llm:0.5;3:fastv_intra_llm:0.25"):
        logits = forward_logits(model, inputs)
        record = custom_internvl.last_record(model)
    spans = [span for sample in record.spans for span in sample]
    assert [span.grid for span in spans] == grids and {span.modality for span in spans} == {"image"}
    assert sum(t for t, _, _ in grids) == inputs["pixel_values"].shape[0]  # every tile of the batch in one span
    ids = inputs["input_ids"]
    for b, sample in enumerate(record.spans):
        runs = image_runs(ids[b], model.config.image_token_id)  # each <img> ... </img> run is one span
        assert [span.counts["input"] for span in sample] == [len(run) for run in runs]
        for span in sample:
            n = span.counts["input"]
            pre = keep_count(n, 0.5)
            assert span.counts == {"input": n, "pre_llm": pre, "layer_1": min(pre, keep_count(pre, 0.5)),
                                   "layer_3": min(pre, keep_count(pre, 0.25))}, (kind, span)
    dropped = [sum(s.counts["input"] - s.counts["layer_3"] for s in sample) for sample in record.spans]
    assert logits.shape[1] == ids.shape[1] - min(dropped)
    assert record.totals()["input"] == int((ids == model.config.image_token_id).sum())


def test_unpatched_after_remove():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model
    from transformers.models.internvl.modeling_internvl import InternVLModel

    originals = Qwen2Model.forward, InternVLModel.forward, InternVLModel.get_image_features
    model = internvl_model()
    inputs = inputs_for("internvl", "image")
    ref = forward_logits(model, inputs)
    with patched(KEEP_RATIO=0.5, PRUNE_METHOD="random_pre_llm"):
        assert Qwen2Model.forward is not originals[0]
        assert forward_logits(model, inputs).shape[1] < ref.shape[1]
    assert (Qwen2Model.forward, InternVLModel.forward, InternVLModel.get_image_features) == originals
    assert torch.equal(forward_logits(model, inputs), ref)


# ------------------------------------------------------------------------------------------------------
# Every registered method through the InternVL hooks
# ------------------------------------------------------------------------------------------------------
REGISTRY = methods.load_methods()


@functools.lru_cache(maxsize=None)
def reference_run(kind):
    model, inputs = internvl_model(), inputs_for("internvl", kind)
    return forward_logits(model, inputs), greedy(model, inputs)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_method_through_the_internvl_hooks(name):
    params = TINY_PARAMS.get(name, {})
    oracle.check_registered_method(custom_internvl, name, internvl_model(), inputs_for("internvl", "batch"),
                                   reference_run("batch"), lambda ratio: dict(KEEP_RATIO=ratio, PRUNE_METHOD=name,
                                                                              **params),
                                   vit_block=1)  # ViT-stage methods before block 1 of the tiny 2-block InternViT


# ------------------------------------------------------------------------------------------------------
# Vision-encoder signals: the eager InternViT's own attention probabilities and keys
# ------------------------------------------------------------------------------------------------------
PROBED = []


@pytest.fixture
def vision_probe(monkeypatch):
    """A test-only pre-LLM method that keeps everything and records the vision signals it was handed; and
    VisPruner wrapped to record the default-layer scores it reads."""

    @methods.register_prune("vision_probe_pre_llm", vision=VisionNeeds(first_layer=0, keys=True))
    def vision_probe_pre_llm(ctx):
        """Test probe."""
        PROBED.append({layer: ctx.vision_attention_received(layer) for layer in ctx.vision_layers()}
                      | {"keys": ctx.vision_keys(), "grid": ctx.grid})
        return torch.arange(ctx.num_tokens)

    spec = methods._base._REGISTRY["vispruner_pre_llm"]

    def vispruner(ctx, fn=spec.fn):
        PROBED.append({"vispruner": ctx.vision_attention_received()})
        return fn(ctx)

    monkeypatch.setitem(methods._base._REGISTRY, "vispruner_pre_llm", dataclasses.replace(spec, fn=vispruner))
    PROBED.clear()
    yield
    methods._base._REGISTRY.pop("vision_probe_pre_llm")


def eager_vision_reference(pixel_values, qk_norm):
    """Per LLM token, from the eager InternViT itself: attention received at each layer (probabilities averaged over
    every query of the tile, [CLS] included, then over heads; the [CLS] column dropped) and the last layer's keys, both
    grouped into LLM tokens by the model's own pixel shuffle (scores summed, keys averaged); and what the [CLS] column
    received, per layer and tile."""
    model = internvl_model("eager", qk_norm)
    tower = model.model.vision_tower
    captured = {}
    handle = tower.encoder.layer[-1].attention.k_norm.register_forward_hook(lambda m, a, out: captured.update(k=out))
    with torch.no_grad():
        attentions = tower(pixel_values=pixel_values, output_attentions=True).attentions
    handle.remove()
    tiles, side = pixel_values.shape[0], int((attentions[0].shape[-1] - 1) ** 0.5)

    def shuffled(per_patch):  # (tiles, P, C) -> (tiles * tokens, group, C) through InternVLModel.pixel_shuffle
        channels = per_patch.shape[-1]
        out = model.model.pixel_shuffle(per_patch.reshape(tiles, side, side, channels),
                                        scale_factor=model.config.downsample_ratio)
        return out.reshape(-1, out.shape[-1] // channels, channels)

    per_column = {layer: probs.mean(dim=2).mean(dim=1) for layer, probs in enumerate(attentions)}  # (tiles, 1 + P)
    received = {layer: shuffled(column[:, 1:, None]).sum(dim=1)[:, 0] for layer, column in per_column.items()}
    heads = tower.config.num_attention_heads
    keys = shuffled(captured["k"][:, 1:]).mean(dim=1)
    return received, keys.view(keys.shape[0], heads, -1), {layer: column[:, 0] for layer, column in per_column.items()}


@pytest.mark.parametrize("kind, qk_norm", [("two_images", False), ("batch", False), ("two_images", True)])
def test_vision_signals_equal_the_encoders_own_attention(kind, qk_norm, vision_probe):
    inputs = inputs_for("internvl", kind)
    received, keys, to_cls = eager_vision_reference(inputs["pixel_values"], qk_norm)
    model = internvl_model("sdpa", qk_norm)
    with patched(KEEP_RATIO=1.0, PRUNE_METHOD="vision_probe_pre_llm"):
        forward_logits(model, inputs)
    spans = [span for sample in custom_internvl.last_record(model).spans for span in sample]
    assert len(PROBED) == len(spans) == 2 and [p["grid"] for p in PROBED] == [s.grid for s in spans]
    for layer in received:
        torch.testing.assert_close(torch.cat([p[layer] for p in PROBED]), received[layer], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([p["keys"] for p in PROBED]), keys, rtol=1e-5, atol=1e-6)
    first = 0
    for probe, span in zip(PROBED, spans):  # each tile's patches share what its [CLS] does not take
        tiles = span.grid[0]
        for layer in received:
            cls_share = to_cls[layer][first:first + tiles]
            assert float(probe[layer].sum()) == pytest.approx(tiles - float(cls_share.sum()), abs=1e-5)
            assert bool((cls_share > 0).all())
        first += tiles

    PROBED.clear()
    with patched(KEEP_RATIO=0.5, PRUNE_METHOD="vispruner_pre_llm"):
        forward_logits(model, inputs)
    last = len(model.model.vision_tower.encoder.layer) - 1
    torch.testing.assert_close(torch.cat([p["vispruner"] for p in PROBED]), received[last], rtol=1e-5, atol=1e-6)
