"""LLaVA-1.5 specifics: the true [CLS] row of its CLIP encoder as the vision-encoder signal, and every registered
method through the LLaVA hooks (the shared oracle battery is in tests/test_decoder_families.py)."""

import functools

import pytest
import torch

import custom_llava
import hooks
import methods
from methods import VisionNeeds
from tests import oracle
from tests.oracle import check_registered_method, forward_logits, greedy
from tests.support import tiny_llava
from tests.test_decoder_families import inputs_for

REGISTRY = methods.load_methods()
# The tiny CLIP has 4 layers: VTC-CLS's official range [start, last) is (start, -2) inclusive.
TINY_PARAMS = {**oracle.TINY_PARAMS, "vtc_cls_pre_llm": {"VTC_CLS_START_LAYER": 1}}


@functools.lru_cache(maxsize=None)
def reference_run(kind):
    model, inputs = tiny_llava.build_model("llava"), inputs_for("llava", kind)
    return forward_logits(model, inputs), greedy(model, inputs)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_method_through_the_llava_hooks(name):
    params = TINY_PARAMS.get(name, {})
    check_registered_method(custom_llava, name, tiny_llava.build_model("llava"), inputs_for("llava", "batch"),
                            reference_run("batch"), lambda ratio: dict(KEEP_RATIO=ratio, PRUNE_METHOD=name, **params),
                            vit_block=1)


def captured_signals(model, inputs, needs):
    """The VisionSignals the LLaVA adapter captures for ``needs``, one per image."""
    adapter = custom_llava.LlavaAdapter()
    args = {"pixel_values": inputs["pixel_values"]}
    with torch.no_grad():
        _, signals = adapter.capture_vision(model.model, "image", args, needs,
                                            lambda: model.model.get_image_features(inputs["pixel_values"]))
    return signals


@pytest.mark.parametrize("layers", [(-2, -2), (1, 2), (-1, -1)])
def test_cls_row_equals_the_encoders_own_eager_attention(layers):
    model = tiny_llava.build_model("llava", attn_implementation="eager")
    inputs = inputs_for("llava", "two_images")
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    signals = captured_signals(model, inputs, VisionNeeds(keys=True, cls_layers=layers))
    depth = len(attentions)
    chosen = list(range(layers[0] % depth, layers[1] % depth + 1))
    for i, span in enumerate(signals):
        assert span.cls and sorted(span.attention) == chosen
        for layer in chosen:
            expected = attentions[layer][i, :, 0, 1:].mean(dim=0)  # [CLS] query row over the patches, head mean
            torch.testing.assert_close(span.attention[layer], expected, rtol=1e-5, atol=1e-6)
        assert span.keys.shape == (36, 4, 8)  # 6 x 6 patches, 4 heads of 8


def test_received_mode_is_the_all_query_mean_of_the_encoders_own_eager_attention():
    """``cls_heads="received"`` (HiPrune): ``attentions[l].mean(1).mean(1)[:, 1:]``, as its official LLaVA code."""
    model = tiny_llava.build_model("llava", attn_implementation="eager")
    inputs = inputs_for("llava", "two_images")
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    signals = captured_signals(model, inputs, VisionNeeds(cls_layers=(1, 2), cls_heads="received"))
    for i, span in enumerate(signals):
        assert span.cls and sorted(span.attention) == [1, 2]
        for layer in (1, 2):
            expected = attentions[layer][i].mean(dim=0).mean(dim=0)[1:]
            torch.testing.assert_close(span.attention[layer], expected, rtol=1e-5, atol=1e-7)
            row = attentions[layer][i, :, 0, 1:].mean(dim=0)
            assert not torch.allclose(span.attention[layer], row)  # not the [CLS] row


def test_single_head_cls_row_is_one_full_width_head():
    """PruMerge's form: softmax(q k^T / sqrt(C)) over the whole q_proj / k_proj outputs of the last layer."""
    model = tiny_llava.build_model("llava", attn_implementation="eager")
    inputs = inputs_for("llava", "image")
    captured = {}
    layer = model.model.vision_tower.encoder.layers[-1].self_attn
    handles = [layer.q_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("q", out)),
               layer.k_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("k", out))]
    try:
        signals = captured_signals(model, inputs, VisionNeeds(keys=True, cls_layers=(-1, -1), cls_heads="single"))
    finally:
        for handle in handles:
            handle.remove()
    q, k = captured["q"][0], captured["k"][0]  # (1 + P, C)
    expected = torch.softmax(q[0] @ k.T / q.shape[-1] ** 0.5, dim=-1)[1:]
    torch.testing.assert_close(signals[0].attention[3], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(signals[0].keys.flatten(1), k[1:], rtol=1e-6, atol=1e-6)


def test_cls_layers_outside_the_encoder_name_the_variable():
    needs = VisionNeeds(first_layer=5, first_layer_var="VTC_CLS_START_LAYER", cls_layers=(5, -2))
    with pytest.raises(Exception, match=r"VTC_CLS_START_LAYER='5'.*-4\.\.3"):
        hooks.cls_vision_layers(needs, 4)


def test_cls_method_prunes_by_the_cls_row_on_llava():
    """FasterVLM-style selection through the hooks: the kept patches are the top [CLS]-attention patches of layer -2."""
    model = tiny_llava.build_model("llava")
    inputs = inputs_for("llava", "image")
    row = captured_signals(model, inputs, VisionNeeds(cls_layers=(-2, -2)))[0].attention[2]
    with oracle.patched(custom_llava, KEEP_RATIO=0.25, PRUNE_METHOD="vispruner_pre_llm", VISPRUNER_IMPORTANT_RATIO=1.0):
        forward_logits(model, inputs)
        keep = custom_llava.pruning_state(model).pre_map.index[0]
    image = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    kept = [int(p) - int(image[0]) for p in keep if int(p) in set(image.tolist())]
    assert kept == sorted(row.topk(9).indices.tolist())


@pytest.mark.parametrize("heads", ["mean", "single"])
def test_substitute_signal_on_clip_is_the_attention_received_at_the_same_layers(heads):
    """``CLS_SIGNAL=substitute`` (``VisionNeeds.cls_substitute``): at the layers the method reads, the all-query mean
    of the encoder's own eager attention instead of the [CLS] row, whatever the method's head reduction; the spans say
    so (``substitute``) and keep the encoder's layout (``cls``)."""
    model = tiny_llava.build_model("llava", attn_implementation="eager")
    inputs = inputs_for("llava", "two_images")
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    signals = captured_signals(model, inputs, VisionNeeds(keys=True, cls_layers=(1, 2), cls_heads=heads,
                                                          cls_substitute=True))
    for i, span in enumerate(signals):
        assert span.cls and span.substitute and sorted(span.attention) == [1, 2]
        for layer in (1, 2):
            expected = attentions[layer][i].mean(dim=0).mean(dim=0)[1:]
            torch.testing.assert_close(span.attention[layer], expected, rtol=1e-5, atol=1e-7)
        assert span.keys.shape == (36, 4, 8)


def test_cls_signal_substitute_reaches_the_method_through_the_hooks():
    """Through the patches: a method reading the [CLS] row gets the substitute under ``CLS_SIGNAL=substitute``, and
    ``ctx.vision_has_cls`` says which it got while ``ctx.vision_encoder_has_cls`` still describes the encoder."""
    seen = []

    @methods.register_prune("cls_signal_probe_pre_llm", vision=VisionNeeds(cls_layers=(-2, -2)))
    def cls_signal_probe_pre_llm(ctx):
        """Test probe."""
        seen.append((ctx.vision_has_cls, ctx.vision_encoder_has_cls, ctx.vision_attention_received()))
        return torch.arange(ctx.num_tokens)

    model = tiny_llava.build_model("llava")
    inputs = inputs_for("llava", "image")
    try:
        for signal in ("cls", "substitute"):
            with oracle.patched(custom_llava, KEEP_RATIO=1.0, PRUNE_METHOD="cls_signal_probe_pre_llm", CLS_SIGNAL=signal):
                forward_logits(model, inputs)
    finally:
        methods._base._REGISTRY.pop("cls_signal_probe_pre_llm")
    row = captured_signals(model, inputs, VisionNeeds(cls_layers=(-2, -2)))[0].attention[2]
    received = captured_signals(model, inputs, VisionNeeds(cls_layers=(-2, -2), cls_heads="received"))[0].attention[2]
    (cls_flag, cls_encoder, cls_scores), (sub_flag, sub_encoder, sub_scores) = seen
    assert (cls_flag, cls_encoder, sub_flag, sub_encoder) == (True, True, False, True)
    torch.testing.assert_close(cls_scores, row)
    torch.testing.assert_close(sub_scores, received)
    assert not torch.allclose(row, received)
