"""The hooks in bfloat16 and float16 (CPU), for Qwen2.5-VL, Qwen3-VL and Gemma 4 (``e2b``), sdpa and eager.

* keep ratio 1.0 is bit-identical to the unpatched model in bf16 and fp16 (forward logits, greedy ids and
  per-step logits), for a pre-LLM method, a vision-signal method and an intra-LLM method;
* the attention signals the methods receive are fp32 with the model in bf16, and equal the fp32 softmax of the
  very q/k the bf16 model attends with (recorded from the model's own attention call / its own vision RoPE);
* the pre-LLM and intra-LLM oracles of ``test_qwenvl`` / ``test_gemma4`` hold in bf16, exactly where the same
  ops run on the same rows, otherwise within a tolerance measured from the unpatched model's own sdpa-vs-eager
  difference.
"""

import functools
import importlib

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import custom_gemma4
import custom_qwenvl
import methods
from methods import VisionNeeds
from tests import oracle, test_gemma4, test_qwenvl
from tests.oracle import ATTN, forward_logits
from tests.support import tiny_gemma, tiny_models

# bf16/fp16 matmuls run ~8x slower than fp32 on a CPU without native bf16 units, so the suite keeps this file small:
# 3 greedy steps; one method per (family, dtype, attention) case on the left-padded batch, rotating so that every
# family meets every method; fp16 under sdpa only; the bf16 oracles on Qwen2.5-VL and Gemma 4 under sdpa (their
# tolerance is measured against eager).
STEPS = 3
DTYPE_CASES = [(torch.bfloat16, "sdpa"), (torch.bfloat16, "eager"), (torch.float16, "sdpa")]
ORACLE_FAMILIES = ("qwen2_5_vl", "e2b")


def greedy(model, inputs):
    return oracle.greedy(model, inputs, steps=STEPS)


FAMILIES = ("qwen2_5_vl", "qwen3_vl", "e2b")
MODULES = {"qwen2_5_vl": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
           "qwen3_vl": "transformers.models.qwen3_vl.modeling_qwen3_vl",
           "e2b": "transformers.models.gemma4.modeling_gemma4"}


def hooks_of(family):
    return custom_gemma4 if family == "e2b" else custom_qwenvl


@functools.lru_cache(maxsize=None)
def model_for(family, dtype, attn):
    if family == "e2b":
        return tiny_gemma.build_model("e2b", attn_implementation=attn, dtype=dtype)
    return tiny_models.build_model(family, attn_implementation=attn, dtype=dtype)


def inputs_for(family, kind):
    if family == "e2b":
        return test_gemma4.inputs_for(kind)
    return test_qwenvl.inputs_for(family, kind)


@functools.lru_cache(maxsize=None)
def reference_run(family, dtype, attn, kind):
    model, inputs = model_for(family, dtype, attn), inputs_for(family, kind)
    return forward_logits(model, inputs), greedy(model, inputs)


def valid(logits, inputs):
    """Prefill logits of the real (non-padding) positions."""
    mask = inputs.get("attention_mask")
    return logits if mask is None else logits[mask.bool()]


# ------------------------------------------------------------------------------------------------------
# 1. Keep ratio 1.0: bit-identical in bf16 and fp16
# ------------------------------------------------------------------------------------------------------
ENVS = [dict(PRUNE_METHOD="divprune_pre_llm"),
        dict(PRUNE_METHOD="visionzip_pre_llm", VISIONZIP_DOMINANT_RATIO=0.5),
        dict(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype, attn", DTYPE_CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_keep_ratio_one_is_bit_identical(family, dtype, attn):
    model = model_for(family, dtype, attn)
    envs = [ENVS[(DTYPE_CASES.index((dtype, attn)) + FAMILIES.index(family)) % len(ENVS)]]
    for kind in ("batch",):
        inputs = inputs_for(family, kind)
        ref_logits, (ref_ids, ref_steps) = reference_run(family, dtype, attn, kind)
        assert ref_logits.dtype == dtype and bool(torch.isfinite(ref_logits).all())
        assert len(set(ref_ids.flatten().tolist())) > 1  # a constant output would make the check vacuous
        for env in envs:
            with oracle.patched(hooks_of(family), KEEP_RATIO=1.0, **env):
                logits, (ids, steps) = forward_logits(model, inputs), greedy(model, inputs)
                record = hooks_of(family).last_record(model)
            assert all(len(set(s.counts.values())) == 1 for sample in record.spans for s in sample)
            assert sum(len(sample) for sample in record.spans) > 0
            assert torch.equal(logits, ref_logits), (kind, env)
            assert torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps), (kind, env)


# ------------------------------------------------------------------------------------------------------
# 2. Attention signals are fp32 with the model in bf16
# ------------------------------------------------------------------------------------------------------
PROBED = []


@pytest.fixture
def intra_probe():
    @methods.register_prune("dtype_probe_intra_llm", default_layer=2, min_layer=1)
    def dtype_probe_intra_llm(ctx):
        """Test probe."""
        rows = torch.cat([ctx.span_positions[:3], ctx.text_positions[-2:]])
        PROBED.append({"previous": ctx.attention_to_span(rows), "own": ctx.attention_to_span(rows, layer=ctx.layer),
                       "default": ctx.attention_to_span(), "last": ctx.last_query_row(),
                       "rows": rows, "span": ctx.span_positions})
        return torch.arange(ctx.num_tokens)

    PROBED.clear()
    yield
    methods._base._REGISTRY.pop("dtype_probe_intra_llm")


@pytest.fixture
def vision_probe():
    @methods.register_prune("dtype_probe_pre_llm", vision=VisionNeeds())
    def dtype_probe_pre_llm(ctx):
        """Test probe."""
        PROBED.append(ctx.vision_attention_received())
        return torch.arange(ctx.num_tokens)

    PROBED.clear()
    yield
    methods._base._REGISTRY.pop("dtype_probe_pre_llm")


def record_attention_calls(monkeypatch, family, text_model):
    """What the text model's attention function gets at each decoder layer (post-RoPE bf16 q/k, mask, scale):
    the model's own eager function and the registered sdpa one are wrapped."""
    layer_of = {id(layer.self_attn): i for i, layer in enumerate(text_model.layers)}
    calls = {}

    def recording(function):
        def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
            if id(module) in layer_of:
                scaling = kwargs.get("scaling")
                calls[layer_of[id(module)]] = dict(query=query, key=key, mask=attention_mask,
                                                   scaling=module.scaling if scaling is None else scaling)
            return function(module, query, key, value, attention_mask, *args, **kwargs)
        return wrapper

    module = importlib.import_module(MODULES[family])
    monkeypatch.setattr(module, "eager_attention_forward", recording(module.eager_attention_forward))
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", recording(ALL_ATTENTION_FUNCTIONS["sdpa"]))
    return calls


def fp32_probabilities(call, sample, rows):
    """softmax(q k^T * scale) in fp32 of the q/k the model attended with, under the mask it attended with."""
    q, k = call["query"][sample].float(), call["key"][sample].float()  # (H, L, d), (H_kv, L, d)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    scores = (q[:, rows] @ k.transpose(-1, -2)) * call["scaling"]
    mask = call["mask"]
    if isinstance(mask, torch.Tensor):
        block = mask[sample if mask.shape[0] > 1 else 0, 0][rows][:, -k.shape[1]:]
        allowed = block if block.dtype == torch.bool else block == 0
    else:  # sdpa's causal fast path (no padding)
        allowed = torch.arange(k.shape[1]).unsqueeze(0) <= rows.unsqueeze(1)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTN)
def test_intra_llm_attention_signals_are_fp32(family, attn, intra_probe, monkeypatch):
    """The reference: the bf16 q/k the model's own attention call received at layers K-1 and K (same forward),
    upcast, softmax in fp32 under the same mask. The signal must match it to fp32 rounding, and be closer to it
    than the bf16 rounding of those probabilities is (what a bf16 softmax would hand the methods)."""
    layer_k = 2
    model = model_for(family, torch.bfloat16, attn)
    inputs = inputs_for(family, "batch")
    calls = record_attention_calls(monkeypatch, family, model.model.language_model)
    with oracle.patched(hooks_of(family), INTRA_LLM_LAYER_SPECS=f"{layer_k}:dtype_probe_intra_llm:1.0"):
        forward_logits(model, inputs)
    assert len(PROBED) == 2 and {layer_k - 1, layer_k} <= set(calls)
    assert calls[layer_k]["query"].dtype == torch.bfloat16
    bf16_rounding = 0.0
    for b, probe in enumerate(PROBED):
        for key, layer, rows in (("previous", layer_k - 1, probe["rows"]), ("own", layer_k, probe["rows"]),
                                 ("default", layer_k - 1, probe["last"].reshape(1))):
            got = probe[key]
            assert got.dtype == torch.float32, (key, got.dtype)
            expected = fp32_probabilities(calls[layer], b, rows.reshape(-1))[..., probe["span"]]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            bf16_rounding = max(bf16_rounding, float((expected.bfloat16().float() - expected).abs().max()))
            assert float((got - expected).abs().max()) < bf16_rounding or bf16_rounding == 0.0
    assert bf16_rounding > 0  # the comparison above had bite


QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl")


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("attn", ATTN)
def test_vision_attention_received_is_fp32(family, attn, vision_probe, monkeypatch):
    """The reference, from the same bf16 forward: the encoder's own RoPE (``apply_rotary_pos_emb_vision``) applied
    in fp32 to the bf16 q/k the block projected, softmax in fp32 per ``cu_seqlens`` segment, column mean over
    queries then heads, mapped to LLM tokens by the model's own merger (window un-permutation included), as in
    ``test_vision_signals.eager_reference``. The model itself rounds the rotated q/k back to bf16."""
    module = importlib.import_module(MODULES[family])
    model = model_for(family, torch.bfloat16, attn)
    visual = model.model.visual
    layer = list(model.config.vision_config.fullatt_block_indexes)[-1] if family == "qwen2_5_vl" \
        else len(visual.blocks) - 1
    rope = module.apply_rotary_pos_emb_vision
    stash = {}

    def fp32_rope(q, k, cos, sin):
        stash["q"], stash["k"] = rope(q.float(), k.float(), cos, sin)  # fp32 in, fp32 out
        return rope(q, k, cos, sin)

    def segments(attn_module, args, kwargs):
        stash["cu_seqlens"] = kwargs["cu_seqlens"].tolist()

    monkeypatch.setattr(module, "apply_rotary_pos_emb_vision", fp32_rope)
    received = {}

    def after_block(attn_module, args, output):
        per_patch = torch.zeros(stash["q"].shape[0])
        bounds = stash["cu_seqlens"]
        for start, end in zip(bounds, bounds[1:]):
            q, k = (stash[x][start:end].transpose(0, 1) for x in "qk")  # (H, n, d)
            probs = torch.softmax((q @ k.transpose(-1, -2)) * attn_module.scaling, dim=-1)
            per_patch[start:end] = probs.mean(dim=1).mean(dim=0)
        received["per_patch"] = per_patch

    block = visual.blocks[layer].attn
    handles = [block.register_forward_pre_hook(segments, with_kwargs=True), block.register_forward_hook(after_block)]
    inputs = inputs_for(family, "two_images")
    try:
        with oracle.patched(custom_qwenvl, KEEP_RATIO=1.0, PRUNE_METHOD="dtype_probe_pre_llm"):
            forward_logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert stash["q"].dtype == torch.float32 and len(PROBED) == 2
    unit = visual.spatial_merge_size ** 2
    per_patch = received["per_patch"]

    def replace(merger, args, output):
        return per_patch.view(-1, unit, 1).sum(dim=1)

    handle = visual.merger.register_forward_hook(replace)
    with torch.no_grad():
        expected = visual(inputs["pixel_values"].to(torch.bfloat16), grid_thw=inputs["image_grid_thw"]).pooler_output
    handle.remove()
    assert expected.dtype == torch.float32
    got = torch.cat(PROBED)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected[:, 0], rtol=1e-5, atol=1e-6)
    assert float((got - expected[:, 0]).abs().max()) < float((expected.bfloat16().float() - expected).abs().max())


# ------------------------------------------------------------------------------------------------------
# 3. Pre-LLM and intra-LLM oracles in bf16, within the unpatched model's own sdpa-vs-eager difference
# ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def measured_noise(family, dtype, kind):
    """How far the unpatched model's prefill logits move between two equivalent computations (sdpa vs eager,
    real positions only), and one unit in the last place of the largest logit (the floor)."""
    inputs = inputs_for(family, kind)
    sdpa, eager = (valid(reference_run(family, dtype, attn, kind)[0], inputs).float() for attn in ATTN)
    noise = float((sdpa - eager).abs().max())
    floor = torch.finfo(dtype).eps * float(sdpa.abs().max())
    assert noise > 0  # bf16 kernels do differ: the tolerance below is a measured figure, not zero by accident
    return noise, floor


def tolerance(family, kind):
    noise, floor = measured_noise(family, torch.bfloat16, kind)
    return 2 * noise + floor


def assert_within(got, ref, tol, what):
    diff = float((got.float() - ref.float()).abs().max())
    print(f"[dtypes] {what}: |pruned - reference| = {diff:.4g}, tolerance {tol:.4g}")
    if diff == 0.0:
        return
    assert diff <= tol, f"{what}: |pruned - reference| = {diff:.4g} > tolerance {tol:.4g}"


def lm_inputs(family, model, inputs):
    return test_gemma4.lm_inputs(model, inputs) if family == "e2b" else oracle.capture_lm_inputs(model, inputs)


@pytest.mark.parametrize("family", ORACLE_FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa"])
def test_pre_llm_oracle_in_bf16(family, attn):
    """The unpatched language model on the hand-shortened sequence (``reference_pre_llm`` of the fp32 oracles).
    Prefill: the same kernels on the same rows, equal bit for bit in bf16 as in fp32; so are Qwen's decode
    steps. Gemma 4's first decode step is the reference's ``logits_to_keep=1`` prefill, whose KV-shared layers
    compute one query row instead of the cached prefill's full rows: in bf16 that other shape rounds
    differently (bit-identical in fp32), so its steps are held to the measured tolerance."""
    kind = "batch"
    model, inputs = model_for(family, torch.bfloat16, attn), inputs_for(family, kind)
    lm = lm_inputs(family, model, inputs)
    with oracle.patched(hooks_of(family), KEEP_RATIO=0.5, PRUNE_METHOD="divprune_pre_llm"):
        logits = forward_logits(model, inputs)
        keep = hooks_of(family).pruning_state(model).pre_map.index
        ids, steps = greedy(model, inputs)
    assert keep.shape[1] < inputs["input_ids"].shape[1] and len(set(ids.flatten().tolist())) > 1
    with torch.no_grad():
        if family == "e2b":
            ref_prefill, ref_steps = test_gemma4.reference_pre_llm(model, lm, inputs["input_ids"], keep, ids)
            ref_ids = test_gemma4.choice(model, ref_steps).T
        else:
            ref_prefill, ref_steps = test_qwenvl.reference_pre_llm(model, lm, keep, ids)
            ref_ids = ref_steps.argmax(-1).T
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, ref_prefill)
    if family != "e2b":
        assert torch.equal(steps, ref_steps) and torch.equal(ids, ref_ids)
        return
    tol = tolerance(family, kind)
    assert_within(steps, ref_steps, tol, "steps")
    assert assert_clear_choices(ids, steps, ref_steps, model) > 0


def assert_clear_choices(ids, steps, ref_steps, model=None):
    """Greedy ids equal the reference's choice wherever they cannot differ: if the two step logits differ by at
    most d, the argmax can only flip where the reference's top-2 margin is <= 2d (bf16 ties are common here).
    Returns how many (step, sample) choices were checked."""
    choice = ref_steps.float()
    if model is not None and model.generation_config.suppress_tokens:
        choice = choice.index_fill(-1, torch.tensor(model.generation_config.suppress_tokens), float("-inf"))
    top2 = choice.topk(2, dim=-1).values  # (steps, B, 2)
    diff = (steps.float() - ref_steps.float()).abs().amax(dim=-1)
    clear = (top2[..., 0] - top2[..., 1]) > 2 * diff
    assert torch.equal(ids.T[clear], choice.argmax(-1)[clear])
    return int(clear.sum())


@pytest.mark.parametrize("family", ORACLE_FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa"])
def test_intra_llm_oracle_in_bf16(family, attn):
    """The hand-written layer loop (``reference_intra`` of the fp32 oracles). Prefill: the same ops on the same
    rows. Decoding: a no-cache recomputation against the cached decode, i.e. other kernels/shapes, held to twice
    the unpatched model's measured sdpa-vs-eager logit difference plus one ulp of the largest logit; greedy ids
    are checked wherever that observed difference cannot flip the reference's argmax."""
    kind, layer_k = "batch", 2
    model, inputs = model_for(family, torch.bfloat16, attn), inputs_for(family, kind)
    ids_in = inputs["input_ids"]
    lm = lm_inputs(family, model, inputs)
    with oracle.patched(hooks_of(family), INTRA_LLM_LAYER_SPECS=f"{layer_k}:fastv_intra_llm:0.4"):
        logits = forward_logits(model, inputs)
        keep = hooks_of(family).pruning_state(model).intra_maps[0].index
        ids, steps = greedy(model, inputs)
    assert keep.shape[1] < ids_in.shape[1] and bool((keep >= 0).all())
    tol = tolerance(family, kind)
    with torch.no_grad():
        if family == "e2b":
            ref = test_gemma4.reference_intra(model, lm, ids_in, keep, layer_k)
        else:
            ref = test_qwenvl.reference_intra(model, lm, keep, layer_k)
        assert torch.equal(logits, ref)  # measured: exactly 0 in all six cases, so equality is asserted
        n = ids_in.shape[1]
        ref_steps = []
        for t in range(STEPS):
            ext_keep = torch.cat([keep, torch.arange(n, n + t).expand(keep.shape[0], t)], dim=1)
            if family == "e2b":
                ext, ext_ids = test_gemma4.extend(model, lm, ids_in, ids[:, :t])
                ref_steps.append(test_gemma4.reference_intra(model, ext, ext_ids, ext_keep, layer_k)[:, -1])
            else:
                ext = test_qwenvl.extend(lm, ids[:, :t], model)
                ref_steps.append(test_qwenvl.reference_intra(model, ext, ext_keep, layer_k)[:, -1])
    ref_steps = torch.stack(ref_steps)
    assert_within(steps, ref_steps, tol, "steps")
    assert assert_clear_choices(ids, steps, ref_steps, model if family == "e2b" else None) > 0
