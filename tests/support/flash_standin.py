"""A pure-torch stand-in for flash-attn 2, so transformers' ``flash_attention_2`` path runs on a CPU.

transformers 5.23 routes ``attn_implementation="flash_attention_2"`` through
``integrations/flash_attention.py:flash_attention_forward`` -> ``modeling_flash_attention_utils._flash_attention_forward``,
which picks one of:

* ``flash_attn_varlen_func`` with ``cu_seqlens`` from a 2-D padding mask (``_upad_input``; ``unpad_input`` /
  ``pad_input`` from ``flash_attn.bert_padding``),
* ``flash_attn_varlen_func`` with precomputed ``cu_seq_lens_*`` kwargs (Qwen vision towers),
* ``flash_attn_varlen_func`` with ``cu_seqlens`` read from position ids when ``_is_packed_sequence`` (batch 1,
  positions that are not one contiguous run: read as packed sequences, attention blocked across them),
* ``flash_attn_func`` otherwise (no padding, no packing).

The functions here have flash-attn 2's semantics: layout (batch, seqlen, heads, dim) (varlen: (total, heads,
dim)); grouped-query k/v heads; causal mask aligned to the bottom-right when query and key lengths differ;
``window_size=(left, right)``, -1 = unbounded, relative to that alignment; ``softcap`` (tanh capping of the
scaled scores when > 0); ``softmax_scale`` (default 1/sqrt(d)); rows with no allowed key give 0. They compute
in float64 and return the input dtype. Every call is counted in :data:`CALLS` (``"plain"`` / ``"varlen"``).

:func:`active` installs the smallest set of patches that makes transformers take that path with these
functions, and undoes them on exit:

1. ``sys.modules["flash_attn"]`` and ``sys.modules["flash_attn.bert_padding"]``: modules holding the stand-in
   functions. ``_lazy_imports`` does ``from flash_attn import flash_attn_func, flash_attn_varlen_func,
   flash_attn_with_kvcache`` and ``from flash_attn.bert_padding import pad_input, unpad_input``; this lets
   transformers' own loader run unchanged and pick up the stand-ins.
2. ``modeling_flash_attention_utils.is_flash_attn_2_available`` -> True: ``_lazy_imports`` takes the
   ``flash_attn`` import branch only if it is true (otherwise it falls back to downloading a hub kernel).
   The real function checks the ``flash-attn`` distribution and CUDA (``utils/import_utils.py``), and is
   lru-cached, so it is replaced in that module's namespace rather than re-evaluated.
3. ``FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]`` (the same dict object modeling_utils reads), replaced by a copy
   whose ``general_availability_check`` is true and whose ``supported_devices`` include the CPU:
   ``PreTrainedModel._check_and_adjust_attn_implementation`` would otherwise re-route to the ``kernels``
   hub fallback, and ``_flash_attn_import_error`` / ``_flash_attn_can_dispatch`` raise "not available on
   CPU" / "model not initialized on GPU".
4. The loader's module-level cache (``_loaded_implementation``, ``_flash_fn``, ...) is cleared on entry and
   on exit, so the stand-ins are loaded inside and never leak out (nor a previously cached real kernel in).

Not patched: ``integrations.flash_attention._use_top_left_mask`` is computed at import; on a CPU (no NPU) it
is False, which is flash-attn >= 2.1's bottom-right alignment, the one implemented here (asserted in
:func:`active`). Models must be *built* inside :func:`active` (the attention implementation is validated at
construction) and *run* inside it (the functions are looked up lazily at the first flash call).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import math
import sys
import types
from collections import Counter

import torch
import torch.nn.functional as F

CALLS: Counter = Counter()  # "plain" / "varlen" -> number of calls since the last reset


def _attend(q, k, v, causal, window_size, softcap, scale):
    """One sequence: q (Lq, H, d), k/v (Lk, Hk, d) -> (Lq, H, d) in float64."""
    lq, lk = q.shape[0], k.shape[0]
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    if groups * k.shape[1] != q.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap and softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    # Bottom-right alignment: query row i sits at key index i + (Lk - Lq).
    qi = torch.arange(lq, device=q.device).unsqueeze(1) + (lk - lq)
    kj = torch.arange(lk, device=q.device).unsqueeze(0)
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    left, right = window_size if window_size is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left >= 0:
        allowed &= kj >= qi - left
    if right >= 0:
        allowed &= kj <= qi + right
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no allowed key outputs 0
    return torch.einsum("hqk,khd->qhd", probs, v)


def _check(dropout_p, alibi_slopes, return_attn_probs):
    if dropout_p:
        raise NotImplementedError("flash stand-in: dropout_p > 0 is not implemented (eval only)")
    if alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("flash stand-in: alibi_slopes / return_attn_probs are not implemented")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn 2 ``flash_attn_func``: q (B, Lq, H, d), k/v (B, Lk, Hk, d) -> (B, Lq, H, d)."""
    _check(dropout_p, alibi_slopes, return_attn_probs)
    CALLS["plain"] += 1
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.stack([_attend(q[b], k[b], v[b], causal, window_size, softcap, scale) for b in range(q.shape[0])])
    return out.to(q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn 2 ``flash_attn_varlen_func``: q (total_q, H, d), k/v (total_k, Hk, d); sequence i is
    ``cu_seqlens_*[i]:cu_seqlens_*[i+1]``; attention never crosses sequences."""
    _check(dropout_p, alibi_slopes, return_attn_probs)
    if block_table is not None:
        raise NotImplementedError("flash stand-in: paged attention (block_table) is not implemented")
    CALLS["varlen"] += 1
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q has {len(cq)} entries, cu_seqlens_k {len(ck)}")
    if cq[-1] != q.shape[0] or ck[-1] != k.shape[0]:
        # flash-attn would read past (or short of) the packed tensors: fail loudly instead.
        raise ValueError(f"cu_seqlens end at ({cq[-1]}, {ck[-1]}) for {q.shape[0]} queries, {k.shape[0]} keys")
    out = q.new_zeros(q.shape, dtype=torch.float64)
    for i in range(len(cq) - 1):
        if cq[i + 1] > cq[i]:
            out[cq[i]:cq[i + 1]] = _attend(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], causal,
                                           window_size, softcap, scale)
    return out.to(q.dtype)


def flash_attn_with_kvcache(*args, **kwargs):
    """Paged decoding (continuous batching) only; not used by ``generate`` with a DynamicCache."""
    raise NotImplementedError("flash stand-in: flash_attn_with_kvcache is not implemented")


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """flash_attn.bert_padding.unpad_input (>= 2.7): (hidden (nnz, ...), indices, cu_seqlens, max_seqlen, seqused)."""
    all_masks = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens = all_masks.sum(dim=-1, dtype=torch.int32)
    used = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu_seqlens, int(seqlens.max().item()), used


def pad_input(hidden_states, indices, batch, seqlen):
    """flash_attn.bert_padding.pad_input: (nnz, ...) -> (batch, seqlen, ...), zeros elsewhere."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out[indices] = hidden_states
    return out.view(batch, seqlen, *hidden_states.shape[1:])


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    module.__version__ = "2.8.3"  # what a flash-attn 2 install reports; only read by version checks
    module.__dict__.update(attrs)
    return module


_LOADER_CACHE = ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn")


@contextlib.contextmanager
def active():
    """Make transformers' ``flash_attention_2`` path run on the stand-ins (see the module docstring)."""
    import transformers.modeling_flash_attention_utils as fa
    from transformers.integrations import flash_attention as fa_integration

    assert fa_integration._use_top_left_mask is False, "the stand-in implements bottom-right causal alignment"
    package = _module("flash_attn", flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func,
                      flash_attn_with_kvcache=flash_attn_with_kvcache)
    package.__path__ = []  # a package, so that `flash_attn.bert_padding` imports
    padding = _module("flash_attn.bert_padding", pad_input=pad_input, unpad_input=unpad_input)
    package.bert_padding = padding
    saved_modules = {name: sys.modules.get(name) for name in ("flash_attn", "flash_attn.bert_padding")}
    saved_available = fa.is_flash_attn_2_available
    saved_entry = fa.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]
    saved_cache = {name: getattr(fa, name) for name in _LOADER_CACHE}

    def available(*args, **kwargs):
        return True

    entry = dict(saved_entry, general_availability_check=available,
                 supported_devices=tuple(saved_entry["supported_devices"]) + ((available, "cpu"),))
    try:
        sys.modules["flash_attn"], sys.modules["flash_attn.bert_padding"] = package, padding
        fa.is_flash_attn_2_available = available
        fa.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2] = entry
        for name in _LOADER_CACHE:
            setattr(fa, name, None)
        yield
    finally:
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        fa.is_flash_attn_2_available = saved_available
        fa.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2] = saved_entry
        for name, value in saved_cache.items():
            setattr(fa, name, value)


def reset_counts() -> None:
    CALLS.clear()
