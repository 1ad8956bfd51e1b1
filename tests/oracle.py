"""Helpers shared by the model-patch oracle tests."""

import dataclasses
from contextlib import contextmanager

import pytest
import torch

import methods
from utils import PruneConfig, keep_count

ATTN = ("eager", "sdpa")
STEPS = 5


@contextmanager
def patched(family_module, **env):
    """Apply a family's patches with this configuration (given as environment-variable strings)."""
    config = family_module.apply_patches(PruneConfig.from_env({k: str(v) for k, v in env.items()}))
    try:
        yield config
    finally:
        family_module.remove_patches()


def greedy(model, inputs, steps=STEPS):
    """Greedy ids (B, steps) and the logits of every step (steps, B, V)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -steps:], torch.stack(out.logits)


def forward_logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def capture_lm_inputs(model, inputs):
    """The unpatched language model's keyword inputs for this prompt (embeddings, positions, ...)."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward_logits(model, inputs)
    finally:
        handle.remove()
    return captured


def gather(x, index, dim=1):
    """x gathered along ``dim`` (batch dim ``dim - 1``) with a (B, L') index; -1 (padding slots) copies 0."""
    index = index.clamp(min=0)
    if x.shape[dim - 1] == 1 and index.shape[0] > 1:
        x = x.expand(*x.shape[:dim - 1], index.shape[0], *x.shape[dim:])
    shape = [1] * x.dim()
    shape[dim - 1], shape[dim] = index.shape
    return torch.gather(x, dim, index.view(shape).expand(*x.shape[:dim], index.shape[1], *x.shape[dim + 1:]))


def image_runs(ids, token_id):
    """Contiguous runs of ``token_id`` in a 1-D id tensor, as index tensors."""
    positions = torch.nonzero(ids == token_id).flatten()
    if positions.numel() == 0:
        return []
    return list(torch.tensor_split(positions, (torch.nonzero(positions.diff() != 1).flatten() + 1).tolist()))


def kept_mask(mask_2d, keep):
    """The 2-D padding mask of the kept sequence: padding slots (-1) are masked."""
    if mask_2d is None and bool((keep >= 0).all()):
        return None
    if mask_2d is None:
        mask_2d = torch.ones(keep.shape[0], int(keep.max()) + 1, dtype=torch.long)
    return gather(mask_2d, keep) * (keep >= 0)


# ------------------------------------------------------------------------------------------------------
# Every registered method through a family's hooks
# ------------------------------------------------------------------------------------------------------
# Hyper-parameters that must be scaled down to the tiny models (2-layer vision encoders).
TINY_PARAMS = {"vtc_cls_pre_llm": {"VTC_CLS_START_LAYER": -1}}


def sparsevlm_count(before, budget):
    pruned = before - budget
    return budget + (int((int(0.3 * pruned) + 1) / 10) + 1 if pruned else 0)


def documented_count(name, span, label, before, budget):
    """Tokens the method's docstring says it keeps (for methods whose count is not the keep rule)."""
    if name == "vtw_intra_llm":
        return 0
    if name == "sparsevlm_intra_llm":
        return sparsevlm_count(before, budget)
    if name == "pool_pre_llm":
        if span.grid is None:  # no grid (LLaVA-NeXT's base view + tiles): pooled along the raster to exactly K bins
            return budget
        t, h, w = span.grid
        scale = (budget / before) ** 0.5
        return t * min(h, max(1, round(h * scale))) * min(w, max(1, round(w * scale)))
    return None  # another method's rule, checked by its own tests: here only bounded by the count before


def frame_calls(spec, config, span, before) -> int:
    """How many calls a stage made on ``span`` holding ``before`` tokens (hooks.method_calls): its frames for a
    method other than a video one on a whole one-span video in the default scope, else 1."""
    if spec.video or config.image_methods_on_video != "frame" or span.modality != "video" or span.grid is None:
        return 1
    t, h, w = span.grid
    return t if t > 1 and before == t * h * w else 1


def check_counts(name, record, config):
    spec = methods.registered_methods()[name]
    ratios = {f"vit_{s.layer}": s.ratio for s in config.vit}  # blocks given as non-negative numbers here
    ratios.update({"pre_llm": config.pre_llm.ratio} if config.pre_llm else {})
    ratios.update({f"layer_{s.layer}": s.ratio for s in config.intra_llm})
    for sample in record.spans:
        for span in sample:
            labels = list(span.counts)
            assert labels[1:] == list(ratios), (name, span.counts)
            for previous, label in zip(labels, labels[1:]):
                before, after = span.counts[previous], span.counts[label]
                if label.startswith("vit_"):  # the keep rule applies per encoded image (tile), not per span
                    assert 0 < after <= before, (name, label, span.counts)
                    continue
                base = span.counts["input"] if label == "pre_llm" else span.llm_input
                frames = frame_calls(spec, config, span, before)
                if frames > 1:  # each frame of a whole one-span video is a call of its own
                    span_frame = dataclasses.replace(span, grid=(1, *span.grid[1:]))
                    before, base, span = before // frames, before // frames, span_frame
                budget = min(before, keep_count(base, ratios[label])) if before else 0
                if spec.exact_count:
                    assert after == frames * budget, (name, label, span.counts)
                else:
                    rule = documented_count(name, span, label, before, budget)
                    assert (after == frames * rule if rule is not None else 0 <= after <= frames * before), (
                        name, label, span.counts)


def _fits(spec, depth: int) -> bool:
    try:
        spec.default_schedule(depth, 0.25)
        return True
    except ValueError:
        return False


def check_kv_method(family_module, name, model, inputs, reference, env):
    """A KV-cache method through a family's hooks (``env(ratio)``'s PRUNE_METHOD / KEEP_RATIO become KV_METHOD /
    KV_BUDGET): budget 1.0 bit-identical to the reference; budget 0.25: the prefill (its logits, the first generated
    token) is untouched, every layer that owns a full-attention cache (Gemma 4: not the sliding-window or KV-shared
    ones) keeps fewer entries than it cached, and greedy generation runs."""
    ref_logits, (ref_ids, ref_steps) = reference

    def kv_env(budget):
        extra = {k: v for k, v in env(budget).items() if k not in ("PRUNE_METHOD", "KEEP_RATIO")}
        return {**extra, "KV_METHOD": name, "KV_BUDGET": budget}

    with patched(family_module, **kv_env(1.0)):
        logits, (ids, steps) = forward_logits(model, inputs), greedy(model, inputs)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps)
    with patched(family_module, **kv_env(0.25)):
        logits = forward_logits(model, inputs)
        ids, steps = greedy(model, inputs)
        record = family_module.last_record(model)
    assert torch.equal(logits, ref_logits) and torch.equal(ids[:, 0], ref_ids[:, 0]) and torch.equal(steps[0], ref_steps[0])
    kept = [(before, after) for layer in record.kv_layers.values() for before, after in zip(layer["before"], layer["after"])]
    text_config = model.config.get_text_config()
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
    sharing = getattr(text_config, "kv_sharing_modes", None) or [None] * text_config.num_hidden_layers
    owners = [i for i, (kind, mode) in enumerate(zip(layer_types, sharing)) if kind == "full_attention" and mode != "reuse"]
    assert sorted(record.kv_layers) == owners and all(1 <= a < b for b, a in kept), kept
    assert ids.shape == ref_ids.shape


def check_registered_method(family_module, name, model, inputs, reference, env, vit_block=None):
    """One registered method through a family's hooks; ``env(ratio)`` is its pruning configuration at that keep
    ratio, ``reference`` the unpatched model's ``(forward_logits, greedy)`` on ``inputs``.

    A ViT-stage method runs before encoder block ``vit_block`` (``VIT_LAYER_SPECS``; the tiny encoders are shallower
    than the methods' default blocks); with None the family (or these inputs) must refuse it with a clear error.

    Ratio 1.0: bit-identical to the reference unless the method's own documented count drops tokens anyway.
    Ratio 0.25: the recorded counts follow the keep rule (or the method's documented rule), the logits are as long
    as the kept sequence, and greedy generation runs.
    """
    ref_logits, (ref_ids, ref_steps) = reference
    spec, given = methods.registered_methods()[name], env
    if spec.stage == methods.KV:
        check_kv_method(family_module, name, model, inputs, reference, env)
        return
    if spec.stage == methods.VIT:
        env = lambda ratio: {**{k: v for k, v in given(ratio).items() if k != "PRUNE_METHOD"},
                             "VIT_LAYER_SPECS": f"{vit_block or 1}:{name}"}
        if vit_block is None:
            with patched(family_module, **env(0.25)), pytest.raises(NotImplementedError, match="ViT stage"):
                forward_logits(model, inputs)
            return
    depth = model.config.get_text_config().num_hidden_layers
    if spec.default_schedule is not None and "PRUNE_METHOD" in given(0.25) and not _fits(spec, depth):
        # A schedule with more stages than the tiny model has layers: every layer the method may run before.
        env = lambda ratio: {**{k: v for k, v in given(ratio).items() if k != "PRUNE_METHOD"},
                             "INTRA_LLM_LAYER_SPECS": ";".join(f"{layer}:{name}"
                                                               for layer in range(max(1, spec.min_layer), depth))}
    with patched(family_module, **env(1.0)):
        logits = forward_logits(model, inputs)
        # The full-length prefill's record: generate's asks for the last row only, which Gemma 4's KV-shared
        # layers then compute alone (a stage there sees no visual rows).
        record = family_module.last_record(model)
        ids, steps = greedy(model, inputs)
        decode_stage = family_module.pruning_state(model).decode_stage  # DyCoke's: it changes the decode steps
    if decode_stage is not None:
        assert torch.equal(logits, ref_logits) and torch.equal(steps[0], ref_steps[0])
        ref_ids, ref_steps = ids, steps  # the prefill is checked; what follows is the decode stage's
    kept_all = all(len(set(s.counts.values())) == 1 for sample in record.spans for s in sample)
    # A ViT method that decides its own count may merge patches that pool into one token (MustDrop's 3 x 3 windows
    # are Gemma 4's 3 x 3 pooling bins): every token count stays while features change.
    merges_within_tokens = spec.stage == methods.VIT and not spec.exact_count
    if kept_all and not merges_within_tokens:
        assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(steps, ref_steps)
    else:  # only a method that decides its own count may drop tokens at ratio 1 (VTW withdraws every span)
        assert not methods.registered_methods()[name].exact_count and ids.shape == ref_ids.shape

    with patched(family_module, **env(0.25)):
        logits = forward_logits(model, inputs)
        state = family_module.pruning_state(model)
        record, config = state.record, state.config
        ids, steps = greedy(model, inputs)
    check_counts(name, record, config)
    dropped = [sum(s.counts["input"] - s.current for s in sample) for sample in record.spans]
    assert logits.shape[1] == inputs["input_ids"].shape[1] - min(dropped)
    assert ids.shape == ref_ids.shape and bool(torch.isfinite(steps).all())
