"""Calls the hooks do not own carry no state from an earlier call.

A call is a decode step only when it continues the cache that the model's last prefill wrote. These are the calls
transformers' own model tests make with the patches installed: ``inputs_embeds`` only after a pruned prefill, a
second ``generate`` on the same model, ``use_cache=False``, a cache built elsewhere. Each must behave exactly as
the unpatched model does (keep ratio 1.0) or as a fresh pruned prefill.
"""

import warnings

import pytest
import torch

import custom_gemma4
import custom_qwenvl
from tests import oracle
from tests.oracle import forward_logits, greedy
from tests.support import tiny_gemma, tiny_models

PRUNED = dict(PRUNE_METHOD="divprune_pre_llm", KEEP_RATIO=0.5)
INTRA = dict(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.5")

# family -> (patches module, model builder, inputs builder)
FAMILIES = {
    "qwen3_vl": (custom_qwenvl, lambda: tiny_models.build_model("qwen3_vl"),
                 lambda kind: dict(tiny_models.make_inputs(tiny_models.build_processor("qwen3_vl"), kind))),
    "qwen2_5_vl": (custom_qwenvl, lambda: tiny_models.build_model("qwen2_5_vl"),
                   lambda kind: dict(tiny_models.make_inputs(tiny_models.build_processor("qwen2_5_vl"), kind))),
    "gemma4_e2b": (custom_gemma4, lambda: tiny_gemma.build_model("e2b"),
                   lambda kind: dict(tiny_gemma.make_inputs(tiny_gemma.build_processor(), kind))),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    patches, build, inputs_for = FAMILIES[request.param]
    return request.param, patches, build(), inputs_for


def embeds_of(model, input_ids):
    with torch.no_grad():
        return model.get_input_embeddings()(input_ids)


@pytest.mark.parametrize("env", [dict(KEEP_RATIO=1.0, **{k: v for k, v in PRUNED.items() if k != "KEEP_RATIO"}),
                                 PRUNED, INTRA])
def test_inputs_embeds_only_after_a_pruned_prefill_runs_as_stock(family, env):
    """transformers' test_inputs_embeds_matches_input_ids: a call with ids and an image, then a fresh call with
    inputs_embeds only and no cache."""
    _, patches, model, inputs_for = family
    text = inputs_for("text")
    embeds = embeds_of(model, text["input_ids"])
    forward_logits(model, inputs_for("image"))  # the unpatched model keeps state of its own (Qwen's rope_deltas)
    with torch.no_grad():
        stock = model(inputs_embeds=embeds, attention_mask=text["attention_mask"]).logits
    with oracle.patched(patches, **env):
        forward_logits(model, inputs_for("image"))  # a (pruned) prefill leaves its stage maps behind
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                first = model(inputs_embeds=embeds, attention_mask=text["attention_mask"]).logits
                second = model(inputs_embeds=embeds, attention_mask=text["attention_mask"]).logits
    assert torch.equal(first, stock) and torch.equal(second, stock)
    mine = [w for w in caught if "runs unpruned, exactly as stock" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]  # once per model, not per call


def test_second_generate_on_the_same_model(family):
    _, patches, model, inputs_for = family
    inputs = inputs_for("image")
    with oracle.patched(patches, **PRUNED):
        first_ids, first_logits = greedy(model, inputs)
        second_ids, second_logits = greedy(model, inputs)
    assert torch.equal(first_ids, second_ids) and torch.equal(first_logits, second_logits)
    ref_ids, ref_logits = greedy(model, inputs)
    with oracle.patched(patches, KEEP_RATIO=1.0, PRUNE_METHOD="random_pre_llm"):
        greedy(model, inputs_for("two_images"))  # an unrelated generate in between
        ids, logits = greedy(model, inputs)
    assert torch.equal(ids, ref_ids) and torch.equal(logits, ref_logits)


def test_use_cache_false(family):
    _, patches, model, inputs_for = family
    inputs = inputs_for("image")
    stock_logits = forward_logits(model, inputs, use_cache=False)
    stock_ids, _ = greedy(model, {**inputs, "use_cache": False}, steps=3)
    with oracle.patched(patches, KEEP_RATIO=1.0, PRUNE_METHOD="divprune_pre_llm"):
        assert torch.equal(forward_logits(model, inputs, use_cache=False), stock_logits)
        ids, _ = greedy(model, {**inputs, "use_cache": False}, steps=3)
    assert torch.equal(ids, stock_ids)
    with oracle.patched(patches, **PRUNED):
        cached = forward_logits(model, inputs)
        uncached = forward_logits(model, inputs, use_cache=False)
        again = forward_logits(model, inputs, use_cache=False)
        # generate without a cache prunes the whole sequence again at every step
        ids, _ = greedy(model, {**inputs, "use_cache": False}, steps=3)
    assert torch.equal(uncached, cached) and torch.equal(again, cached)
    assert ids.shape == stock_ids.shape


def test_a_cache_from_elsewhere_is_continued_as_stock(family):
    """A cache written by the unpatched model, continued with the patches installed (after a pruned prefill
    that left its maps behind), gives exactly the unpatched continuation."""
    _, patches, model, inputs_for = family
    inputs = inputs_for("image")
    next_token = inputs["input_ids"][:, -1:]
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        # One unpadded sample, no mask: the model derives the next position from the cache length.
        stock = model(input_ids=next_token, past_key_values=_copy_cache(prefill.past_key_values)).logits
    with oracle.patched(patches, **PRUNED):
        forward_logits(model, inputs)  # a pruned prefill of another cache
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                continued = model(input_ids=next_token, past_key_values=_copy_cache(prefill.past_key_values)).logits
    assert torch.equal(continued, stock)
    assert any("no prefill of these hooks wrote" in str(w.message) for w in caught)


def test_a_cache_passed_to_generate_is_the_prefill_cache(family):
    """generate(past_key_values=<an empty cache of the caller's>): the prefill writes into it and every decode step
    continues it, so the pruned layout is followed exactly as with generate's own cache."""
    from transformers import DynamicCache

    _, patches, model, inputs_for = family
    inputs = inputs_for("image")
    for env in (PRUNED, INTRA):
        with oracle.patched(patches, **env):
            ids, logits = greedy(model, inputs)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                given_ids, given_logits = greedy(model, {**inputs, "past_key_values": DynamicCache(config=model.config)})
        assert torch.equal(given_ids, ids) and torch.equal(given_logits, logits), env
        assert not [w for w in caught if "exactly as stock" in str(w.message)]


def _copy_cache(cache):
    import copy

    return copy.deepcopy(cache)
