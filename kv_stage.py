"""The KV-cache stage: after the prefill of each decoder layer, a KV method (``*_kv``, ``KV_METHOD``) chooses which
cached entries of that layer the decode steps keep, per KV head.

How it fits the hooks (``hooks.intra_llm_hooks`` installs it):

* Prefill: a pre-hook on each layer's attention notes what the attention receives; once the decoder layer has run,
  its cache holds the layer's prompt entries. Per sample, the method sees the sample's entries (padding left out)
  and their attention signals: the layer's queries, projected from the noted input, against the cached keys (a
  causal softmax over the sample's entries), never as an L x L matrix. The layer's keys and values are then gathered per head; samples that keep fewer entries than the longest are
  left-padded with empty slots, which every head masks (the same count per head within a sample). Later layers of
  the prefill do not read this layer's cache, so the prefill itself is unchanged.
* Decode: every layer's mask is rebuilt from generate's 2-D mask carried through the prefill's stage maps and the
  layer's own ``KVMap`` (its slots; a slot stands for the same token position in every head's row only for the
  padding mask, which is all the mask needs: a kept entry is never padding). Cached keys keep their rotary
  positions, and the tokens generated next are numbered as without compression.

Not supported (refused before the first prefill by ``check_model``): KV-shared layers (Gemma 4 reads an earlier
layer's cache in the prefill itself) and sliding-window layers (their cache already keeps only the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import methods
from methods import KVContext, KVSignalSource
from utils import KVStage, PruneConfigError


@dataclass
class KVMap:
    """How the KV stage compressed one layer's cache, kept for the decode steps that follow."""

    layer: int
    index: torch.Tensor  # (B, K) a position each slot holds (its first head's), -1 for an empty slot
    prefill_length: int  # the layer's cached entries before compression
    before: list[int]  # per sample: prompt entries cached before compression
    after: list[int]  # per sample: entries kept per head


# Query rows per block of the column sums: about 16 MB of fp32 scores per block, as hooks._BLOCK_ELEMENTS.
_BLOCK_ELEMENTS = 1 << 22


class _SampleSignals(KVSignalSource):
    """One sample's attention signals at one layer: its queries (``queries(rows)``, rows of the layer's input)
    against the cached keys of its prompt entries ``rows`` (padding left out), causal, at the layer's scale."""

    def __init__(self, queries, keys: torch.Tensor, rows: torch.Tensor, scale: float):
        self.queries, self.rows, self.scale = queries, rows, scale
        self.keys = keys.float()  # (H_kv, L, d), as cached: rotated

    def _probs(self, first: int, last: int) -> torch.Tensor:
        """[H_q, last - first, L] probabilities of the prompt rows first..last-1 (indices among the entries)."""
        q = self.queries(self.rows[first:last]).float()  # (H_q, r, d)
        k = self.keys.repeat_interleave(q.shape[0] // self.keys.shape[0], dim=0)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        entries = torch.arange(k.shape[1], device=scores.device)
        later = entries.unsqueeze(0) > torch.arange(first, last, device=scores.device).unsqueeze(1)  # causal
        return torch.softmax(scores.masked_fill(later.unsqueeze(0), float("-inf")), dim=-1)

    def window_attention(self, window: int) -> torch.Tensor:
        length = self.rows.numel()
        return self._probs(max(0, length - window), length)

    def attention_column_sums(self, block_rows: int | None = None) -> torch.Tensor:
        length = self.rows.numel()
        heads = self.keys.shape[0]
        step = block_rows or max(1, _BLOCK_ELEMENTS // (heads * length))
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


def compress_layer(kv: KVStage, params, layer: int, layer_cache, queries, scale: float, layout, num_layers: int,
                   query_heads: int) -> KVMap:
    """Compress ``layer_cache`` (a DynamicCache layer: keys / values (B, H_kv, L, d)) with the KV method, in place.

    ``params`` are the method's validated hyper-parameters; ``queries(b, rows)`` the layer's rotated queries
    (H_q, r, d) of sample b's rows, ``scale`` its attention scale; ``layout`` is the layout of the layer's rows (its
    attention mask marks padding, its span ids visual tokens).
    """
    spec = methods.registered_methods()[kv.method]
    keys, values = layer_cache.keys, layer_cache.values
    batch, heads, length, _ = keys.shape
    mask = layout.attention_mask
    chosen, before = [], []
    for b in range(batch):
        rows = (torch.arange(length) if mask is None else torch.nonzero(mask[b].cpu()).flatten())
        rows_on = rows.to(keys.device)
        span_id = layout.span_id[b].cpu()
        sample_keys = keys[b][:, rows_on]
        signals = _SampleSignals(lambda r, b=b: queries(b, r), sample_keys, rows_on, scale)
        ctx = KVContext(keys=sample_keys, values=values[b][:, rows_on], budget=kv.budget(rows.numel()),
                        layer=layer, num_layers=num_layers, visual=(span_id[rows] >= 0), query_heads=query_heads,
                        params=params, _signals=signals)
        index = _per_head(spec.fn(ctx), heads, rows.numel(), kv.method)
        chosen.append(rows_on[index])  # (H, K_b) positions in the layer's cache
        before.append(rows.numel())
    width = max(c.shape[1] for c in chosen)
    slots = torch.full((batch, heads, width), -1, dtype=torch.long, device=keys.device)
    for b, c in enumerate(chosen):
        slots[b, :, width - c.shape[1]:] = c  # left padding, as the prompt's own
    gather = slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    empty = (slots < 0).unsqueeze(-1)
    layer_cache.keys = keys.gather(2, gather).masked_fill(empty, 0)
    layer_cache.values = values.gather(2, gather.expand(-1, -1, -1, values.shape[-1])).masked_fill(empty, 0)
    return KVMap(layer, slots[:, 0], length, before, [c.shape[1] for c in chosen])


def check_model(kv: KVStage, text_model) -> None:
    """Refuse, before any prefill, a language model whose caches the stage cannot compress."""
    config = text_model.config
    name = type(text_model).__name__
    allowed = "a model whose every layer owns a full-attention cache (Qwen-VL, LLaVA, InternVL), or no KV_METHOD"
    if getattr(config, "num_kv_shared_layers", 0):
        raise PruneConfigError(f"KV_METHOD={kv.method!r}: {name} shares KV caches between layers (a sharing layer's "
                               f"prefill reads an earlier layer's cache), which the KV stage does not compress; "
                               f"allowed: {allowed}")
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise PruneConfigError(f"KV_METHOD={kv.method!r}: {name} has sliding-window layers, whose cache keeps only "
                               f"the window; the KV stage compresses full-attention caches only; allowed: {allowed}")
