"""Oracles for the KV-cache stage (kv_stage.py) on the tiny Qwen-VL models, float32, CPU.

* a budget that keeps every entry: logits and greedy ids bit-identical to the unpatched model under ``generate``;
* a compressed cache: every decode step's logits equal the unpatched model run without a cache on the prompt and
  the generated tokens, with each layer's dropped entries masked (per KV head) for the generated tokens' rows only;
* composition with pre-LLM pruning and with an intra-LLM stage; the record; refusals and configuration errors.
"""

import contextlib

import pytest
import torch

import custom_gemma4
import custom_qwenvl
import methods
from tests import oracle
from tests.oracle import ATTN, capture_lm_inputs, forward_logits, gather, greedy
from tests.support.tiny_gemma import build_model as build_gemma
from tests.support.tiny_gemma import build_processor as build_gemma_processor
from tests.support.tiny_gemma import make_inputs as make_gemma_inputs
from tests.support.tiny_models import FAMILIES, build_model
from tests.test_decoder_families import FAMILIES as DECODER_FAMILIES
from tests.test_qwenvl import extend, inputs_for, patched, shorten_deepstack
from tests.test_qwenvl import single as single_sample
from tests import test_gemma4 as gemma
from transformers.models.gemma4 import modeling_gemma4 as gm
from utils import PruneConfig, PruneConfigError

CHOSEN: list = []  # per prefill layer call: (layer, [(H_kv, K) indices per sample into its entries], entries)


@pytest.fixture
def probe_kv():
    """A test-only KV method: per KV head a different seeded subset of ``budget`` entries; records its choice."""

    @methods.register_prune("probe_kv")
    def probe_kv(ctx):
        """Test probe."""
        generator = torch.Generator().manual_seed(1000 * ctx.layer + ctx.num_entries)
        index = torch.stack([torch.randperm(ctx.num_entries, generator=generator)[:ctx.budget]
                             for _ in range(ctx.kv_heads)])
        CHOSEN.append((ctx.layer, index.sort(dim=1).values, ctx.num_entries, ctx.visual.clone()))
        return index

    CHOSEN.clear()
    yield
    methods._base._REGISTRY.pop("probe_kv")


def kept_per_layer(batch):
    """{layer: [per sample (H_kv, K) kept entry indices]} from the probe's calls (one call per sample and layer)."""
    kept = {}
    for layer, index, _, _ in CHOSEN:
        kept.setdefault(layer, []).append(index)
    assert all(len(v) == batch for v in kept.values())
    return kept


def masked_reference_logits(family, inputs, new_ids, kept, rows_of, pre_llm_keep=None):
    """Logits of the unpatched eager model, no cache, on prompt + generated tokens, where the generated tokens'
    rows of layer l, head h see only the prompt entries ``kept[l][b][h // group]`` (``rows_of(b)``: the sample's
    prompt rows, padding excluded, whose positions the kept indices count). ``pre_llm_keep``: (B, L') the prompt
    tokens a pre-LLM stage kept (Qwen-VL): the prompt is then the hand-shortened sequence, original positions."""
    if family in DECODER_FAMILIES:
        model = DECODER_FAMILIES[family].build_model("eager")
        lm = capture_lm_inputs(model, inputs)
        full = extend_1d(lm, new_ids, model)
    else:
        model = build_model(family, attn_implementation="eager")
        lm = capture_lm_inputs(model, inputs)
        if pre_llm_keep is not None:
            lm = dict(lm, inputs_embeds=gather(lm["inputs_embeds"], pre_llm_keep),
                      position_ids=gather(lm["position_ids"][-3:], pre_llm_keep, dim=2),
                      **shorten_deepstack(lm, pre_llm_keep))
            assert lm.get("attention_mask") is None  # one prompt, no padding
        full = extend(lm, new_ids, model)
    text_model = model.model.language_model
    config = text_model.config
    batch, length = full["inputs_embeds"].shape[:2]
    prompt = lm["inputs_embeds"].shape[1]
    heads, group = config.num_attention_heads, config.num_attention_heads // config.num_key_value_heads
    pad = torch.ones(batch, length, dtype=torch.bool) if full.get("attention_mask") is None \
        else full["attention_mask"].bool()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    masks = {}
    for layer in range(len(text_model.layers)):
        allowed = (causal & pad[:, None, :]).unsqueeze(1).repeat(1, heads, 1, 1)  # (B, H, T, T)
        for b, index in enumerate(kept.get(layer, [])):
            rows = rows_of(b)
            for h in range(heads):
                keep = torch.zeros(prompt, dtype=torch.bool)
                keep[rows[index[h // group]]] = True
                allowed[b, h, prompt:, :prompt] &= keep
        masks[layer] = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)

    def hook(layer):
        def set_mask(module, args, kwargs):
            kwargs["attention_mask"] = masks[layer]
            return args, kwargs
        return set_mask

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(text_model.layers)]
    try:
        with torch.no_grad():
            hidden = text_model(**{k: v for k, v in full.items() if k != "attention_mask"},
                                attention_mask=full.get("attention_mask")).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return model.lm_head(hidden)[:, prompt - 1:prompt - 1 + new_ids.shape[1]]  # row t predicts token t


def extend_1d(lm, new_ids, model):
    """A 1-D RoPE decoder's inputs for the prompt followed by the generated tokens, numbered as generate numbers
    them (no positions: the text model counts 0..T-1, padding included)."""
    embeds = torch.cat([lm["inputs_embeds"], model.get_input_embeddings()(new_ids)], dim=1)
    out = {"inputs_embeds": embeds}
    if lm.get("attention_mask") is not None:
        out["attention_mask"] = torch.cat([lm["attention_mask"], torch.ones_like(new_ids)], dim=1)
    if lm.get("position_ids") is not None:
        positions = lm["position_ids"]
        out["position_ids"] = torch.cat([positions, positions[:, -1:] + torch.arange(1, new_ids.shape[1] + 1)], dim=1)
    return out


def prompt_rows(inputs):
    mask = inputs.get("attention_mask")
    return lambda b: (torch.arange(inputs["input_ids"].shape[1]) if mask is None else torch.nonzero(mask[b]).flatten())


# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_every_entry_is_bit_identical(family, probe_kv):
    model = build_model(family)
    for kind, with_mask in [("two_images", True), ("batch", True), ("text", True)]:
        inputs = inputs_for(family, kind, with_mask)
        ref_logits, (ref_ids, ref_steps) = forward_logits(model, inputs), greedy(model, inputs)
        with patched(KV_METHOD="probe_kv", KV_BUDGET=1.0):
            logits, (ids, steps) = forward_logits(model, inputs), greedy(model, inputs)
            record = custom_qwenvl.last_record(model)
        assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps), kind
        assert sorted(record.kv_layers) == [0, 1, 2, 3]
        assert record.kv_layers[0]["before"] == record.kv_layers[0]["after"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind, with_mask", [("two_images", False), ("batch", True)])
@pytest.mark.parametrize("budget", ["0.5", "7"])
@pytest.mark.parametrize("attn", ATTN)
def test_compressed_cache_equals_masked_recomputation(family, kind, with_mask, budget, attn, probe_kv):
    inputs = inputs_for(family, kind, with_mask)
    model = build_model(family, attn_implementation=attn)
    with patched(KV_METHOD="probe_kv", KV_BUDGET=budget):
        ids, step_logits = greedy(model, inputs)
        record = custom_qwenvl.last_record(model)
    batch = ids.shape[0]
    kept = kept_per_layer(batch)
    entries = [record.kv_layers[0]["before"][b] for b in range(batch)]
    expected = [max(1, round(n * 0.5)) if budget == "0.5" else 7 for n in entries]
    assert all(record.kv_layers[layer]["after"] == expected for layer in range(4))
    if batch > 1:
        assert len(set(entries)) > 1  # a padded batch: samples of different lengths keep different counts
    reference = masked_reference_logits(family, inputs, ids, kept, prompt_rows(inputs))
    torch.testing.assert_close(step_logits.transpose(0, 1), reference, rtol=1e-4, atol=1e-4)
    # the entries really were dropped: without the masks the reference differs
    assert not torch.allclose(step_logits.transpose(0, 1)[:, 1:], masked_reference_logits(
        family, inputs, ids, {}, prompt_rows(inputs))[:, 1:], atol=1e-4)


def test_cache_lengths_and_visual_flags(probe_kv):
    inputs = inputs_for("qwen2_5_vl", "two_images", with_mask=False)
    model = build_model("qwen2_5_vl")
    with patched(KV_METHOD="probe_kv", KV_BUDGET=0.25):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                 return_dict_in_generate=True)
    prompt = inputs["input_ids"].shape[1]
    kept = max(1, round(prompt * 0.25))
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [kept + 1] * 4  # + the first new token
    visual = CHOSEN[0][3]
    image_id = model.config.image_token_id
    assert torch.equal(visual, inputs["input_ids"][0] == image_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_composes_with_pre_llm_and_intra_llm_pruning(family, probe_kv):
    """Pre-LLM (random, keep 0.5) then the KV stage: decode logits equal the masked recomputation on the
    hand-shortened sequence (kept tokens at their original positions); with an intra-LLM stage too, each layer
    compresses the cache it holds."""
    inputs = inputs_for(family, "two_images", with_mask=False)
    model = build_model(family)
    with patched(PRUNE_METHOD="random_pre_llm", KEEP_RATIO=0.5, KV_METHOD="probe_kv", KV_BUDGET=0.5):
        ids, step_logits = greedy(model, inputs)
        record = custom_qwenvl.last_record(model)
        pre_keep = custom_qwenvl.pruning_state(model).pre_map.index.clone()
    kept_pre = CHOSEN[0][2]
    assert kept_pre == pre_keep.shape[1] < inputs["input_ids"].shape[1]
    assert record.kv_layers[0]["before"] == [kept_pre]
    reference = masked_reference_logits(family, inputs, ids, kept_per_layer(1),
                                        lambda b: torch.arange(kept_pre), pre_llm_keep=pre_keep)
    torch.testing.assert_close(step_logits.transpose(0, 1), reference, rtol=1e-4, atol=1e-4)
    CHOSEN.clear()
    with patched(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.25", KV_METHOD="probe_kv", KV_BUDGET=0.5):
        greedy(model, inputs)
        record = custom_qwenvl.last_record(model)
    entries = record.kv_layers
    assert entries[0]["before"] == entries[1]["before"] > entries[2]["before"] == entries[3]["before"]


def test_decode_positions_continue_as_stock(probe_kv):
    """The rotary positions the language model receives at a decode step are the stock ones, however many entries
    layer 0 kept (Qwen numbers decode steps from layer 0's cache length plus rope_deltas)."""
    inputs = inputs_for("qwen2_5_vl", "image", with_mask=False)
    model = build_model("qwen2_5_vl")
    seen = []
    handle = model.model.language_model.rotary_emb.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).clone()),
        with_kwargs=True)
    try:
        greedy(model, inputs, steps=2)
        stock = seen[-1]
        seen.clear()
        with patched(KV_METHOD="probe_kv", KV_BUDGET=0.25):
            greedy(model, inputs, steps=2)
    finally:
        handle.remove()
    assert torch.equal(seen[-1], stock)


# ------------------------------------------------------------------------------------------------------
def test_configuration_errors():
    env = {"KV_METHOD": "streaming_kv_nonexistent", "KV_BUDGET": "0.5"}
    with pytest.raises(PruneConfigError, match=r"^KV_METHOD='streaming_kv_nonexistent': unknown pruning method"):
        PruneConfig.from_env(env)
    with pytest.raises(PruneConfigError, match=r"^KV_METHOD='fastv_intra_llm': is an intra-LLM method; allowed: "
                                               r"KV-cache methods"):
        PruneConfig.from_env({"KV_METHOD": "fastv_intra_llm", "KV_BUDGET": "0.5"})
    with pytest.raises(PruneConfigError, match=r"^KV_BUDGET='0.5': is set but KV_METHOD is not"):
        PruneConfig.from_env({"KV_BUDGET": "0.5"})


def test_budget_values(probe_kv):
    def parse(text):
        return PruneConfig.from_env({"KV_METHOD": "probe_kv", "KV_BUDGET": text}).kv

    assert parse("0.25").budget(100) == 25 and parse("1").budget(100) == 100 and parse("1.0").budget(7) == 7
    assert parse("64").budget(100) == 64 and parse("64").budget(10) == 10
    for bad, reason in [("", "required with KV_METHOD=probe_kv"), ("0", "out of range"), ("1.5", "out of range"),
                        ("-3", "out of range"), ("lots", "not a number")]:
        with pytest.raises(PruneConfigError, match=rf"^KV_BUDGET='{bad}': {reason}; allowed: a fraction in \(0, 1\]"):
            parse(bad)
    with pytest.raises(PruneConfigError, match=r"^PRUNE_METHOD='probe_kv': is a KV-cache method, configured by "
                                               r"KV_METHOD and KV_BUDGET"):
        PruneConfig.from_env({"PRUNE_METHOD": "probe_kv", "KEEP_RATIO": "0.5"})


def gemma_masked_reference(model, inputs, new_ids, kept, rows_of):
    """Gemma 4's masked recomputation: the unpatched eager layers looped by hand without a cache on prompt + generated
    tokens (masks as Gemma4Model builds them: sliding windows, bidirectional images), where the generated tokens' rows
    of every layer reading a compressed cache (its own, or for a KV-shared layer its storing layer's) see only that
    cache's kept prompt entries, per KV head."""
    tm = model.model.language_model
    config = tm.config
    lm = gemma.lm_inputs(model, inputs)
    ids = inputs["input_ids"]
    prompt = ids.shape[1]
    ext, ext_ids = gemma.extend(model, lm, ids, new_ids)
    hidden, mask_2d, positions = ext["inputs_embeds"], ext.get("mask_2d"), ext["position_ids"]
    is_visual = gemma.visual_mask(model, ext_ids) if lm["mm_token_type_ids"] is not None else None
    per_layer = None if ext.get("per_layer_inputs") is None else tm.project_per_layer_inputs(hidden, ext["per_layer_inputs"])
    embeddings = {t: tm.rotary_emb(hidden, positions, t) for t in set(config.layer_types)}
    base = gemma.reference_masks(model, hidden, mask_2d, is_visual)
    adapter = custom_gemma4.Gemma4Adapter()
    heads = config.num_attention_heads
    shared = gm.KVSharingDict(None)
    for i, layer in enumerate(tm.layers):
        mask = base[config.layer_types[i]]
        allowed = (mask == 0 if mask.dtype != torch.bool else mask).expand(ids.shape[0], heads, -1, -1).clone()
        for b, index in enumerate(kept.get(adapter.cache_owner(tm, i), [])):
            for h in range(heads):  # query head h reads KV head h // (heads / KV heads of the layer)
                keep = torch.zeros(prompt, dtype=torch.bool)
                keep[rows_of(b)[index[h * index.shape[0] // heads]]] = True
                allowed[b, h, prompt:, :prompt] &= keep
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        hidden = layer(hidden, None if per_layer is None else per_layer[:, :, i], shared_kv_states=shared,
                       position_embeddings=embeddings[config.layer_types[i]], attention_mask=additive,
                       position_ids=positions, past_key_values=None)
    logits = gemma.softcap(model, model.lm_head(tm.norm(hidden)))
    return logits[:, prompt - 1:prompt - 1 + new_ids.shape[1]]


@pytest.mark.parametrize("variant", ["e2b", "dense31b"])  # moe26b: dense31b's attention, other MLPs
def test_gemma4_keep_every_entry_and_equal_the_masked_recomputation(variant, probe_kv):
    """Gemma 4: the full-attention layers that own a cache are compressed; sliding-window layers keep their window;
    KV-shared layers (e2b) read their storing layer's compressed cache. A keep-all budget is bit-identical under
    generate; a compressed cache equals the masked recomputation of a left-padded batch (and differs from the
    unmasked one)."""
    model = build_gemma(variant, attn_implementation="eager")
    inputs = dict(make_gemma_inputs(build_gemma_processor(), "batch"))
    text_model = model.model.language_model
    ref_logits, (ref_ids, ref_steps) = forward_logits(model, inputs), greedy(model, inputs)
    with oracle.patched(custom_gemma4, KV_METHOD="probe_kv", KV_BUDGET=1.0):
        logits, (ids, steps) = forward_logits(model, inputs), greedy(model, inputs)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps)
    CHOSEN.clear()
    with oracle.patched(custom_gemma4, KV_METHOD="probe_kv", KV_BUDGET=0.4):
        ids, step_logits = greedy(model, inputs)
        record = custom_gemma4.last_record(model)
    config = text_model.config
    owners = [i for i in range(config.num_hidden_layers) if config.layer_types[i] == "full_attention"
              and config.kv_sharing_modes[i] != "reuse"]
    assert sorted(record.kv_layers) == owners and owners
    kept = kept_per_layer(ids.shape[0])
    with torch.no_grad():
        reference = gemma_masked_reference(model, inputs, ids, kept, prompt_rows(inputs))
        unmasked = gemma_masked_reference(model, inputs, ids, {}, prompt_rows(inputs))
    torch.testing.assert_close(step_logits.transpose(0, 1), reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(step_logits.transpose(0, 1)[:, 1:], unmasked[:, 1:], atol=1e-4)


def test_gemma4_records_what_each_layer_reads():
    """``record.cached`` on Gemma 4 (e2b): a layer that owns a cache counts its entries (a sliding layer's window
    included); a KV-shared layer counts its storing layer's."""
    model = build_gemma("e2b")
    inputs = dict(make_gemma_inputs(build_gemma_processor(), "image"))
    inputs.pop("attention_mask")
    config = model.model.language_model.config
    for env in ({}, {"KV_METHOD": "streamingllm_kv", "KV_BUDGET": 0.5}):
        with oracle.patched(custom_gemma4, **env):
            with torch.no_grad():
                out = model(**inputs, use_cache=True)
            cached = custom_gemma4.last_record(model).cached[0]
        adapter = custom_gemma4.Gemma4Adapter()
        owned = [None if layer.keys is None else layer.keys.shape[2] for layer in out.past_key_values.layers]
        assert cached == [owned[adapter.cache_owner(model.model.language_model, i)] for i in range(len(cached))]
        assert min(cached) == config.sliding_window - 1 < max(cached)


# ------------------------------------------------------------------------------------------------------
# The signals and the registered methods through the hooks
# ------------------------------------------------------------------------------------------------------
KV_METHODS = sorted(name for name, spec in methods.load_methods().items() if spec.stage == methods.KV)


def test_the_registered_kv_methods():
    assert KV_METHODS == ["h2o_kv", "lookm_kv", "pyramidkv_kv", "snapkv_kv", "streamingllm_kv"]


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_signals_equal_eager_attention_weights(family):
    """``window_attention`` and ``attention_column_sums`` equal the eager model's own probabilities of the
    prefill (padding rows and columns left out), at every layer and for every sample of a padded batch."""
    seen = {}

    @methods.register_prune("signal_probe_kv")
    def signal_probe_kv(ctx):
        """Test probe."""
        seen.setdefault(ctx.layer, []).append((ctx.window_attention(3), ctx.attention_column_sums()))
        return torch.arange(ctx.num_entries)

    try:
        inputs = inputs_for(family, "batch")
        eager = build_model(family, attn_implementation="eager")
        with torch.no_grad():
            attentions = eager(**inputs, output_attentions=True).attentions
        with patched(KV_METHOD="signal_probe_kv", KV_BUDGET=1.0):
            forward_logits(build_model(family), inputs)
    finally:
        methods._base._REGISTRY.pop("signal_probe_kv")
    rows_of = prompt_rows(inputs)
    assert sorted(seen) == list(range(len(attentions)))
    for layer, per_sample in seen.items():
        for b, (window, sums) in enumerate(per_sample):
            rows = rows_of(b)
            probs = attentions[layer][b][:, rows][:, :, rows]  # (H, L, L) over the sample's own entries
            torch.testing.assert_close(window, probs[:, -3:], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(sums, probs.sum(dim=1), rtol=1e-5, atol=1e-5)


@pytest.fixture
def recorded(monkeypatch):
    """Record what every registered KV method chooses (its spec's fn wrapped)."""
    import dataclasses

    registry = methods._base._REGISTRY
    for name in (m for m in KV_METHODS if m not in MERGING):
        spec = registry[name]

        def recording(ctx, fn=spec.fn):
            index = torch.as_tensor(fn(ctx)).long()
            index = index.unsqueeze(0).expand(ctx.kv_heads, -1) if index.dim() == 1 else index
            CHOSEN.append((ctx.layer, index.sort(dim=1).values, ctx.num_entries, ctx.visual.clone()))
            return index

        monkeypatch.setitem(registry, name, dataclasses.replace(spec, fn=recording))
    CHOSEN.clear()
    yield


MERGING = ["lookm_kv"]  # replace kept entries by merged ones: no masked recomputation to equal


@pytest.mark.parametrize("method", [m for m in KV_METHODS if m not in MERGING])
def test_every_kv_method_equals_the_masked_recomputation(method, recorded):
    family = "qwen2_5_vl"
    inputs = inputs_for(family, "batch")
    model = build_model(family)
    ref_ids, ref_steps = greedy(model, inputs)
    small = {"snapkv_kv": {"SNAPKV_WINDOW": 4}, "pyramidkv_kv": {"PYRAMIDKV_WINDOW": 4}}.get(method, {})  # tiny prompts
    with patched(KV_METHOD=method, KV_BUDGET=1.0, **small):
        ids, steps = greedy(model, inputs)
    assert torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps)
    CHOSEN.clear()
    with patched(KV_METHOD=method, KV_BUDGET=0.3, **small):
        ids, step_logits = greedy(model, inputs)
        record = custom_qwenvl.last_record(model)
    kept = kept_per_layer(ids.shape[0])
    assert all(after < before for layer in record.kv_layers.values()
               for before, after in zip(layer["before"], layer["after"]))
    reference = masked_reference_logits(family, inputs, ids, kept, prompt_rows(inputs))
    torch.testing.assert_close(step_logits.transpose(0, 1), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(DECODER_FAMILIES))
def test_decoder_families_keep_every_entry_and_equal_the_masked_recomputation(family, probe_kv):
    """LLaVA-1.5 / NeXT / OneVision and InternVL3 (1-D RoPE decoders): a keep-all budget is bit-identical under
    generate, a compressed cache equals the masked recomputation (a left-padded batch)."""
    spec = DECODER_FAMILIES[family]
    model, inputs = spec.build_model("sdpa"), dict(spec.make_inputs(spec.batch))
    ref_logits, (ref_ids, ref_steps) = forward_logits(model, inputs), greedy(model, inputs)
    with oracle.patched(spec.patches, KV_METHOD="probe_kv", KV_BUDGET=1.0):
        logits, (ids, steps) = forward_logits(model, inputs), greedy(model, inputs)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps)
    CHOSEN.clear()
    with oracle.patched(spec.patches, KV_METHOD="probe_kv", KV_BUDGET=0.4):
        ids, step_logits = greedy(model, inputs)
        record = spec.patches.last_record(model)
    kept = kept_per_layer(ids.shape[0])
    assert all(a < b for n in record.kv_layers.values() for b, a in zip(n["before"], n["after"]))
    reference = masked_reference_logits(family, inputs, ids, kept, prompt_rows(inputs))
    torch.testing.assert_close(step_logits.transpose(0, 1), reference, rtol=1e-4, atol=1e-4)
    unmasked = masked_reference_logits(family, inputs, ids, {}, prompt_rows(inputs))
    assert not torch.allclose(step_logits.transpose(0, 1)[:, 1:], unmasked[:, 1:], atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# The cache size every run records (token pruning and KV compression compared at equal size)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env", [{}, {"PRUNE_METHOD": "random_pre_llm", "KEEP_RATIO": 0.5},
                                 {"INTRA_LLM_LAYER_SPECS": "2:random_intra_llm:0.25"},
                                 {"KV_METHOD": "streamingllm_kv", "KV_BUDGET": 0.5},
                                 {"PRUNE_METHOD": "random_pre_llm", "KEEP_RATIO": 0.5, "KV_METHOD": "h2o_kv",
                                  "KV_BUDGET": 0.5}], ids=lambda e: "+".join(str(v) for v in e.values()) or "stock")
def test_every_prefill_records_what_each_layer_caches(env):
    """``record.cached``: per sample and layer, the cache's real entries after the prefill: the cache's own length
    for one prompt; for a left-padded batch, each sample's count without padding (each sample alone gives it)."""
    model = build_model("qwen2_5_vl")
    single = inputs_for("qwen2_5_vl", "two_images", with_mask=False)
    with patched(**env):
        with torch.no_grad():
            out = model(**single, use_cache=True)
        record = custom_qwenvl.last_record(model)
    assert record.cached == [[layer.keys.shape[2] for layer in out.past_key_values.layers]]
    if env.get("INTRA_LLM_LAYER_SPECS"):
        assert record.cached[0][0] == record.cached[0][1] > record.cached[0][2] == record.cached[0][3]
    batch = inputs_for("qwen2_5_vl", "batch")
    with patched(**env):
        forward_logits(model, batch)
        counts = custom_qwenvl.last_record(model).cached
        assert len(counts) == 2
        for b in range(2):
            forward_logits(model, single_sample(batch, b))
            assert custom_qwenvl.last_record(model).cached == [counts[b]]


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_a_merging_method_writes_its_merged_entries(family, monkeypatch):
    """LOOK-M returns merged keys and values for the entries it keeps: the compressed cache holds exactly those (per
    sample, after its left-padded empty slots), and decoding from it differs from keeping the same entries unmerged."""
    import dataclasses

    registry = methods._base._REGISTRY
    spec, returned = registry["lookm_kv"], []

    def recording(ctx, fn=spec.fn):
        result = fn(ctx)
        returned.append((ctx.layer, result))
        return result

    monkeypatch.setitem(registry, "lookm_kv", dataclasses.replace(spec, fn=recording))
    model = build_model(family)
    inputs = inputs_for(family, "batch")
    with patched(KV_METHOD="lookm_kv", KV_BUDGET=0.3):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        merged_ids, merged_steps = greedy(model, inputs)
    batch = inputs["input_ids"].shape[0]
    assert len(returned) == 2 * batch * len(out.past_key_values.layers)  # the prefill, then greedy's own
    for i, (layer, result) in enumerate(returned[:batch * len(out.past_key_values.layers)]):
        b = i % batch
        cache = out.past_key_values.layers[layer]
        width = result.index.shape[1]
        assert isinstance(result, methods.KVMerged) and result.keys is not None
        assert torch.equal(cache.keys[b, :, -width:], result.keys) and torch.equal(cache.values[b, :, -width:], result.values)
        assert bool((cache.keys[b, :, :-width] == 0).all())  # this sample's empty slots
    with patched(KV_METHOD="lookm_kv", KV_BUDGET=0.3, LOOKM_MERGE="none"):
        plain_ids, plain_steps = greedy(model, inputs)
    assert torch.equal(merged_steps[0], plain_steps[0]) and not torch.allclose(merged_steps[1:], plain_steps[1:])


# ------------------------------------------------------------------------------------------------------
# An intra-LLM method's decode-time re-indexing (MustDrop's third stage)
# ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def decode_steps_see_only(text_model, keep):
    """In decode steps (one query row), layer l's attention sees of its cached prompt entries only those ``keep[l]``
    ((B, H or 1, prompt entries of l's cache) bool) marks; the prefill and the generated tokens are untouched."""
    steps = [0]

    def count(module, args, kwargs):
        steps[0] += (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[1] == 1

    def hide(layer):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if hidden.shape[1] != 1:
                return args, kwargs
            prompt = keep[layer].shape[-1]
            mask = kwargs.get("attention_mask")
            mask = torch.zeros(hidden.shape[0], 1, 1, prompt + steps[0]) if mask is None else mask
            mask = mask.expand(-1, keep[layer].shape[1], -1, -1).clone()  # per query head where keep is
            mask[..., :prompt] = mask[..., :prompt].masked_fill(~keep[layer].unsqueeze(2), torch.finfo(mask.dtype).min)
            kwargs["attention_mask"] = mask
            return args, kwargs
        return hook

    handles = [text_model.layers[0].register_forward_pre_hook(count, with_kwargs=True)]
    handles += [text_model.layers[layer].self_attn.register_forward_pre_hook(hide(layer), with_kwargs=True)
                for layer in keep]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def reindex_probes():
    """Two test-only intra-LLM methods choosing the same seeded random tokens; one re-indexes the cache."""
    for name, reindex in (("probe_reindex_intra_llm", True), ("probe_plain_intra_llm", False)):
        @methods.register_prune(name, default_layer=1, reindex_cache=reindex)
        def probe(ctx):
            """Test probe."""
            generator = torch.Generator().manual_seed(100 * ctx.num_tokens + ctx.keep)
            return torch.randperm(ctx.num_tokens, generator=generator)[:ctx.keep].sort().values
    yield
    for name in ("probe_reindex_intra_llm", "probe_plain_intra_llm"):
        methods._base._REGISTRY.pop(name)


def specs(method, layers):
    return ";".join(f"{layer}:{method}:{ratio}" for layer, ratio in zip(layers, (0.6, 0.3)))


@pytest.mark.parametrize("layers", [(2, 3), (1, 3)])
def test_reindexed_cache_holds_the_last_stage_survivors(layers, reindex_probes):
    """After the prefill, the caches of layers first-1 .. last-1 hold exactly the last stage's survivors (the same
    run without re-indexing, gathered), the others are untouched; every decode step equals the run without
    re-indexing whose decode steps mask, in those layers, every entry the last stage dropped."""
    family = "qwen2_5_vl"
    model = build_model(family, attn_implementation="eager")
    inputs = inputs_for(family, "batch")
    runs = {}
    for name in ("probe_plain_intra_llm", "probe_reindex_intra_llm"):
        with patched(INTRA_LLM_LAYER_SPECS=specs(name, layers)):
            with torch.no_grad():
                out = model(**inputs, use_cache=True)
            state = custom_qwenvl.pruning_state(model)
            maps = [m.index.clone() for m in state.intra_maps]
            cached = custom_qwenvl.last_record(model).cached
            runs[name] = (out.past_key_values, maps, cached, greedy(model, inputs))
    plain, maps, plain_cached, (plain_ids, plain_steps) = runs["probe_plain_intra_llm"]
    cut, cut_maps, cut_cached, (ids, steps) = runs["probe_reindex_intra_llm"]
    assert all(torch.equal(a, b) for a, b in zip(maps, cut_maps))
    final_from = {}  # layer -> (B, K) the last stage's survivors as positions in that layer's cache
    for layer in range(len(plain.layers)):
        later = [m for k, m in zip(layers, maps) if k > layer]
        if layer < layers[0] - 1 or not later:
            assert torch.equal(cut.layers[layer].keys, plain.layers[layer].keys), layer
            continue
        index = later[0]
        for inner in later[1:]:
            index = torch.gather(index, 1, inner.clamp(min=0)).masked_fill(inner < 0, -1)
        final_from[layer] = index
        expected = plain.layers[layer].keys.gather(
            2, index.clamp(min=0)[:, None, :, None].expand(-1, plain.layers[layer].keys.shape[1], -1,
                                                           plain.layers[layer].keys.shape[-1]))
        expected = expected.masked_fill((index < 0)[:, None, :, None], 0)
        assert torch.equal(cut.layers[layer].keys, expected), layer
    assert sorted(final_from) == list(range(layers[0] - 1, layers[-1]))
    assert all(c[layer] == c[layers[-1]] for c in cut_cached for layer in final_from)
    assert all(c[layer] > c[layers[-1]] for c in plain_cached for layer in final_from)

    keep = {}
    for layer, index in final_from.items():
        keep[layer] = torch.zeros(index.shape[0], 1, plain.layers[layer].keys.shape[2], dtype=torch.bool)
        for b in range(index.shape[0]):
            keep[layer][b, 0, index[b][index[b] >= 0]] = True
    with patched(INTRA_LLM_LAYER_SPECS=specs("probe_plain_intra_llm", layers)), \
            decode_steps_see_only(model.model.language_model, keep):
        ref_ids, ref_steps = greedy(model, inputs)
    torch.testing.assert_close(steps, ref_steps, rtol=1e-4, atol=1e-4)
    assert torch.equal(ids, ref_ids)
    assert not torch.allclose(steps[1:], plain_steps[1:], atol=1e-4)  # the re-indexing changed the decode steps


def test_mustdrop_reindexes_by_default_and_refuses_a_kv_method():
    spec = methods.registered_methods()["mustdrop_intra_llm"]
    assert spec.reindexes_cache({"MUSTDROP_REINDEX_CACHE": 1}) and not spec.reindexes_cache({"MUSTDROP_REINDEX_CACHE": 0})
    with pytest.raises(PruneConfigError, match=r"^KV_METHOD='snapkv_kv': mustdrop_intra_llm cuts the earlier layers"):
        PruneConfig.from_env({"PRUNE_METHOD": "mustdrop_intra_llm", "KEEP_RATIO": "0.5", "KV_METHOD": "snapkv_kv",
                              "KV_BUDGET": "0.5"})
    config = PruneConfig.from_env({"PRUNE_METHOD": "mustdrop_intra_llm", "KEEP_RATIO": "0.5", "KV_METHOD": "snapkv_kv",
                                   "KV_BUDGET": "0.5", "MUSTDROP_REINDEX_CACHE": "0"})
    assert config.kv.method == "snapkv_kv"


def test_kv_stage_after_an_intra_llm_stage_equals_masking_what_it_dropped(reindex_probes, probe_kv):
    """An intra-LLM stage at layer 2 and a KV method on every layer's cache: each decode step equals the run with the
    intra-LLM stage alone whose decode steps, per layer and query head, see only the entries the KV method kept of
    that layer's cache (the original layout before layer 2, the stage's kept layout from it; a padded batch)."""
    family = "qwen2_5_vl"
    model = build_model(family, attn_implementation="eager")
    inputs = inputs_for(family, "batch")
    intra = "2:probe_plain_intra_llm:0.5"
    with patched(INTRA_LLM_LAYER_SPECS=intra, KV_METHOD="probe_kv", KV_BUDGET=0.5):
        ids, steps = greedy(model, inputs)
        stage = custom_qwenvl.pruning_state(model).intra_maps[0]
    kept = kept_per_layer(ids.shape[0])
    config = model.model.language_model.config
    heads, group = config.num_attention_heads, config.num_attention_heads // config.num_key_value_heads
    mask = inputs["attention_mask"].bool()
    after = torch.gather(mask, 1, stage.index.clamp(min=0)) & (stage.index >= 0)  # the stage's kept layout
    keep = {}
    for layer, per_sample in kept.items():
        layout = mask if layer < stage.layer else after
        keep[layer] = torch.zeros(layout.shape[0], heads, layout.shape[1], dtype=torch.bool)
        for b, index in enumerate(per_sample):
            rows = torch.nonzero(layout[b]).flatten()  # the sample's entries, as the KV method counted them
            for h in range(heads):
                keep[layer][b, h, rows[index[h // group]]] = True
    with patched(INTRA_LLM_LAYER_SPECS=intra), decode_steps_see_only(model.model.language_model, keep):
        ref_ids, ref_steps = greedy(model, inputs)
    torch.testing.assert_close(steps, ref_steps, rtol=1e-4, atol=1e-4)
    assert torch.equal(ids, ref_ids)
    with patched(INTRA_LLM_LAYER_SPECS=intra):
        _, alone = greedy(model, inputs)
    assert not torch.allclose(steps[1:], alone[1:], atol=1e-4)  # the KV method changed the decode steps
