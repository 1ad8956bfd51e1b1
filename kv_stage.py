"""The KV-cache stage: after the prefill of each decoder layer, a KV method (``*_kv``, ``KV_METHOD``) chooses which
cached entries of that layer the decode steps keep, per KV head.

How it fits the hooks (``hooks.intra_llm_hooks`` installs it):

* Prefill: a pre-hook on each layer's attention notes what the attention receives; once the decoder layer has run,
  its cache holds the layer's prompt entries. Per sample, the method sees the sample's entries (padding left out)
  and their attention signals: the layer's queries, projected from the noted input, against the cached keys (a
  softmax over the entries each row may see, read from the mask the layer got), never as an L x L matrix. The
  layer's keys and values are then gathered per head (a merging method replaces the kept ones); samples that keep
  fewer entries than the longest are left-padded with empty slots, which every head masks (the same count per head
  within a sample). Later layers of the prefill do not read this layer's cache, so the prefill itself is unchanged.
* Decode: every layer's mask is rebuilt from generate's 2-D mask carried through the prefill's stage maps and the
  ``KVMap`` of the cache the layer reads (its slots; a slot stands for the same token position in every head's row
  only for the padding mask, which is all the mask needs: a kept entry is never padding). Cached keys keep their
  rotary positions, and the tokens generated next are numbered as without compression.

Which layers (``FamilyAdapter.kv_compressible``): every layer that owns a full-attention cache. Gemma 4's
sliding-window layers keep their window as stock (their cache is already bounded by it), and its KV-shared layers
read the compressed cache of the layer they share (their prefill reads the storing layer's keys as computed, before
compression).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import methods
from methods import KVContext, KVMerged, KVSignalSource
from utils import ATTENTION_BLOCK_ELEMENTS, KVStage, PruneConfigError


@dataclass
class KVMap:
    """How the KV stage compressed one layer's cache, kept for the decode steps that follow."""

    layer: int
    index: torch.Tensor  # (B, K) a position each slot holds (its first head's), -1 for an empty slot
    prefill_length: int  # the layer's cached entries before compression
    before: list[int]  # per sample: prompt entries cached before compression
    after: list[int]  # per sample: entries kept per head


class _SampleSignals(KVSignalSource):
    """One sample's attention signals at one layer: its queries (``queries(rows)``, rows of the layer's input)
    against the cached keys of its prompt entries ``rows`` (padding left out), at the layer's scale, each row over
    the keys ``allowed(rows)`` ((r, layer rows) bool, from the layer's mask) lets it see."""

    def __init__(self, queries, allowed, keys: torch.Tensor, rows: torch.Tensor, scale: float):
        self.queries, self.allowed, self.rows, self.scale = queries, allowed, rows, scale
        self.keys = keys.float()  # (H_kv, L, d), as cached: rotated

    def _probs(self, first: int, last: int) -> torch.Tensor:
        """[H_q, last - first, L] probabilities of the prompt rows first..last-1 (indices among the entries)."""
        q = self.queries(self.rows[first:last]).float()  # (H_q, r, d)
        k = self.keys.repeat_interleave(q.shape[0] // self.keys.shape[0], dim=0)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        allowed = self.allowed(self.rows[first:last])[:, self.rows].to(scores.device)  # (r, L)
        return torch.softmax(scores.masked_fill(~allowed.unsqueeze(0), float("-inf")), dim=-1)

    def window_attention(self, window: int) -> torch.Tensor:
        length = self.rows.numel()
        return self._probs(max(0, length - window), length)

    def attention_column_sums(self, block_rows: int | None = None) -> torch.Tensor:
        length = self.rows.numel()
        heads = self.keys.shape[0]
        step = block_rows or max(1, ATTENTION_BLOCK_ELEMENTS // (heads * length))
        total = None
        for first in range(0, length, step):
            part = self._probs(first, min(length, first + step)).sum(dim=1)
            total = part if total is None else total + part
        return total


def _per_head(result, heads: int, entries: int, name: str) -> torch.Tensor:
    """A method's answer as (H_kv, K) ascending distinct indices, checked."""
    index = torch.as_tensor(result).long()
    if index.dim() == 1:
        index = index.unsqueeze(0).expand(heads, -1)
    if index.dim() != 2 or index.shape[0] != heads:
        raise ValueError(f"{name} returned indices of shape {tuple(index.shape)}; expected [K] or [{heads}, K]")
    if index.shape[1] == 0:
        raise ValueError(f"{name} kept no entry of a layer; a KV method keeps at least one entry per head")
    if bool((index < 0).any()) or bool((index >= entries).any()):
        raise ValueError(f"{name} returned indices outside 0..{entries - 1}")
    index = index.sort(dim=1).values
    if bool((index[:, 1:] == index[:, :-1]).any()):
        raise ValueError(f"{name} returned the same entry twice for one head")
    return index


def compress_layer(kv: KVStage, params, layer: int, layer_cache, queries, allowed, scale: float, layout,
                   num_layers: int, query_heads: int) -> KVMap:
    """Compress ``layer_cache`` (a DynamicCache layer: keys / values (B, H_kv, L, d)) with the KV method, in place.

    ``params`` are the method's validated hyper-parameters; ``queries(b, rows)`` the layer's rotated queries
    (H_q, r, d) of sample b's rows, ``allowed(b, rows)`` ((r, L) bool) the keys the layer's mask lets those rows see,
    ``scale`` its attention scale; ``layout`` is the layout of the layer's rows (its attention mask marks padding,
    its span ids visual tokens).
    """
    spec = methods.registered_methods()[kv.method]
    keys, values = layer_cache.keys, layer_cache.values
    batch, heads, length, _ = keys.shape
    mask = layout.attention_mask
    chosen, before, merged = [], [], []
    for b in range(batch):
        rows = (torch.arange(length) if mask is None else torch.nonzero(mask[b].cpu()).flatten())
        rows_on = rows.to(keys.device)
        span_id = layout.span_id[b].cpu()
        sample_keys = keys[b][:, rows_on]
        signals = _SampleSignals(lambda r, b=b: queries(b, r), lambda r, b=b: allowed(b, r), sample_keys, rows_on,
                                 scale)
        ctx = KVContext(keys=sample_keys, values=values[b][:, rows_on], budget=kv.budget(rows.numel()),
                        layer=layer, num_layers=num_layers, visual=(span_id[rows] >= 0), query_heads=query_heads,
                        params=params, _signals=signals)
        result = spec.fn(ctx)
        index = _per_head(result.index if isinstance(result, KVMerged) else result, heads, rows.numel(), kv.method)
        chosen.append(rows_on[index])  # (H, K_b) positions in the layer's cache
        merged.append(_merged(result, index, ctx, kv.method) if isinstance(result, KVMerged) else None)
        before.append(rows.numel())
    width = max(c.shape[1] for c in chosen)
    slots = torch.full((batch, heads, width), -1, dtype=torch.long, device=keys.device)
    for b, c in enumerate(chosen):
        slots[b, :, width - c.shape[1]:] = c  # left padding, as the prompt's own
    _keep_slots(layer_cache, slots)
    for b, replacement in enumerate(merged):
        if replacement is not None:
            width_b = chosen[b].shape[1]
            layer_cache.keys[b, :, width - width_b:] = replacement[0]
            layer_cache.values[b, :, width - width_b:] = replacement[1]
    return KVMap(layer, slots[:, 0], length, before, [c.shape[1] for c in chosen])


def reindex_layer(layer: int, layer_cache, index: torch.Tensor, before: list[int], after: list[int]) -> KVMap:
    """Cut ``layer_cache`` to the entries ``index`` ((B, K) positions in its cache, -1 for an empty slot), the same in
    every head, in place: an intra-LLM method's decode-time re-indexing (MustDrop) after the prefill."""
    slots = index.to(layer_cache.keys.device)
    length = layer_cache.keys.shape[2]
    _keep_slots(layer_cache, slots.unsqueeze(1).expand(-1, layer_cache.keys.shape[1], -1))
    return KVMap(layer, slots, length, before, after)


def _keep_slots(layer_cache, slots: torch.Tensor) -> None:
    """Replace the cache layer's keys and values (B, H_kv, L, d) by their entries at ``slots`` (B, H_kv, K); a -1
    slot is an empty one (zeros, masked in every decode step)."""
    gather = slots.clamp(min=0).unsqueeze(-1)
    empty = (slots < 0).unsqueeze(-1)
    keys, values = layer_cache.keys, layer_cache.values
    layer_cache.keys = keys.gather(2, gather.expand(-1, -1, -1, keys.shape[-1])).masked_fill(empty, 0)
    layer_cache.values = values.gather(2, gather.expand(-1, -1, -1, values.shape[-1])).masked_fill(empty, 0)


def _merged(result: KVMerged, index: torch.Tensor, ctx: KVContext, name: str):
    """A merging method's replacement (keys, values) of its kept entries, checked against its (sorted) index."""
    if not torch.equal(torch.as_tensor(result.index).long().to(index.device).expand_as(index), index):
        raise ValueError(f"{name} returned KVMerged indices that are not ascending per head")
    keys = ctx.keys.gather(1, index.unsqueeze(-1).expand(-1, -1, ctx.keys.shape[-1])) if result.keys is None \
        else result.keys
    for tensor, what in ((keys, "keys"), (result.values, "values")):
        if tuple(tensor.shape) != (*index.shape, ctx.keys.shape[-1]):
            raise ValueError(f"{name} returned merged {what} of shape {tuple(tensor.shape)}; expected "
                             f"{(*index.shape, ctx.keys.shape[-1])}")
    return keys.to(ctx.keys.dtype), result.values.to(ctx.values.dtype)


def check_model(kv: KVStage, text_model, adapter) -> None:
    """Refuse, before any prefill, a language model with no cache the stage can compress."""
    layers = range(text_model.config.num_hidden_layers)
    if not any(adapter.kv_compressible(text_model, layer) for layer in layers):
        raise PruneConfigError(f"KV_METHOD={kv.method!r}: {type(text_model).__name__} has no decoder layer that owns a "
                               "full-attention cache, which is all the KV stage compresses; allowed: a model with "
                               "full-attention layers, or no KV_METHOD")
