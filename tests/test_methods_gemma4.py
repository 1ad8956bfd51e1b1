"""Every registered method through the Gemma 4 hooks, at keep ratios 1.0 and 0.25 (as tests/test_methods_qwenvl.py).

* ``dense31b`` (bidirectional vision attention, no KV sharing), two images in one prompt: every method named
  alone, multi-stage methods with their own schedules scaled to the 6 layers;
* ``e2b`` (per-layer inputs, layers 4 and 5 reuse the KV of the storing layers 2 and 3), a left-padded batch:
  pre-LLM methods named alone; intra-LLM methods at layer 2 (<= every storing layer: the KV cache shrinks) and
  layer 5 (shared region: query rows only, signals from the shared keys), since a layer in between (3) is
  refused, as tested once here for a default schedule that reaches it.

The vision-encoder-signal methods (PruMerge, PruMerge+, VisionZip, VisPruner, VTC-CLS) read
``Gemma4Adapter.capture_vision`` like any pre-LLM method reads its features; the ViT-stage methods run before
block 1 of the tiny 2-block vision encoder (``Gemma4Adapter.vit_encoder``).
"""

import functools

import pytest
import torch

import custom_gemma4
import methods
from tests.support.tiny_gemma import build_model
from tests.oracle import TINY_PARAMS, check_registered_method, forward_logits, greedy
from tests.test_gemma4 import inputs_for, patched
from utils import PruneConfigError, keep_count

REGISTRY = methods.load_methods()
# layer 2: <= every KV-storing layer (2, 3); layer 5: in the KV-shared region (4, 5)
E2B_INTRA_SPECS = {1.0: "2:{name}:1;5:{name}:1", 0.25: "2:{name}:0.5;5:{name}:0.25"}


@functools.lru_cache(maxsize=None)
def tiny(variant):
    return build_model(variant)


@functools.lru_cache(maxsize=None)
def reference_run(variant, kind):
    model, inputs = tiny(variant), inputs_for(kind)
    return forward_logits(model, inputs), greedy(model, inputs)


def pruning_env(variant, name):
    params = TINY_PARAMS.get(name, {})
    if variant == "e2b" and REGISTRY[name].stage == "intra_llm":
        return lambda ratio: dict(INTRA_LLM_LAYER_SPECS=E2B_INTRA_SPECS[ratio].format(name=name), **params)
    return lambda ratio: dict(KEEP_RATIO=ratio, PRUNE_METHOD=name, **params)


# KV-cache methods on e2b only (its KV-shared and sliding layers are the cases; tests/test_kv_stage.py covers every
# shape's cache layout).
@pytest.mark.parametrize("name, variant, kind", [(name, variant, kind) for name in sorted(REGISTRY)
                                                 for variant, kind in (("e2b", "batch"), ("dense31b", "two_images"))
                                                 if variant == "e2b" or REGISTRY[name].stage != methods.KV])
def test_every_registered_method_through_the_gemma4_hooks(name, variant, kind):
    check_registered_method(custom_gemma4, name, tiny(variant), inputs_for(kind), reference_run(variant, kind),
                            pruning_env(variant, name), vit_block=1)  # ViT-stage methods before block 1 of 2


def test_a_default_schedule_reaching_between_kv_store_and_shared_layers_is_refused():
    """PyramidDrop named alone on the 6-layer e2b: 8/16/24 of 32 layers scale to 2/3/4, and 3 lies after the
    storing layer 2 and before the shared layer 4: a configuration error before any layer runs, not a crash."""
    model, inputs = tiny("e2b"), inputs_for("image")
    with patched(KEEP_RATIO=0.5, PRUNE_METHOD="pdrop_intra_llm"):
        with pytest.raises(PruneConfigError, match=r"layer 3 \(pdrop_intra_llm.*KV-storing layer 2.*"
                                                   r"allowed: a layer <= 2 .*or >= 4"):
            forward_logits(model, inputs)
    with patched(INTRA_LLM_LAYER_SPECS="2:pdrop_intra_llm:0.5;4:pdrop_intra_llm:0.25"):
        forward_logits(model, inputs)  # the same method at allowed layers runs
        assert [m.layer for m in custom_gemma4.pruning_state(model).intra_maps] == [2, 4]


def test_a_stage_in_the_kv_shared_region_changes_nothing_under_generate():
    """generate asks for the last row only, and transformers then computes only that row in the KV-shared layers:
    a stage there sees no visual rows (records 0) and changes nothing; a full forward drops the query rows."""
    model, inputs = tiny("e2b"), inputs_for("image")
    ids, steps = reference_run("e2b", "image")[1]
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with patched(INTRA_LLM_LAYER_SPECS="4:fastv_intra_llm:0.5"):
        forward_logits(model, inputs)
        assert custom_gemma4.last_record(model).totals() == {"input": n, "layer_4": keep_count(n, 0.5)}
        generated = greedy(model, inputs)
        assert custom_gemma4.last_record(model).totals() == {"input": n, "layer_4": 0}
    assert torch.equal(generated[0], ids) and torch.equal(generated[1], steps)
