"""StreamingLLM (Xiao et al., ICLR 2024; official code mit-han-lab/streaming-llm, ``streaming_llm/kv_cache.py``,
``StartRecentKVCache.__call__``).

Rule (per decoder layer, the same entries for every KV head, no attention read):
  1. ``sink = min(STREAMINGLLM_SINK, budget)``: the first ``sink`` entries, the "attention sinks", are kept;
  2. the ``budget - sink`` most recent entries are kept;
  3. when ``budget >= L`` everything is kept (officially: ``seq_len <= start_size + recent_size`` returns the cache).

Official defaults: ``start_size=4`` (``examples/run_streaming_llama.py``, class default), ``recent_size=2000``
(the script) / 512 (class default); the cache holds ``start_size + recent_size`` entries. KVCache-Factory
(Zefan-Cai/KVCache-Factory, ``StreamingLLMKVCluster``) does the same with ``window_size = max_capacity_prompt - 4``.

Adaptations:
  * the cache size is the toolkit's per-layer ``budget``, so ``recent_size = budget - sink`` (not a parameter);
  * ``budget <= STREAMINGLLM_SINK``: the official cache cannot be smaller than ``start_size`` (with
    ``recent_size = 0`` it keeps exactly the first ``start_size`` entries and concatenates them first), so the
    continuation chosen here is to keep the first ``budget`` entries (sinks before recency), no recent entry;
  * the official class evicts again at every decode step (a rolling cache) and re-numbers positions
    (``pos_shift``); here eviction happens once after the prefill and kept entries keep their rotary positions
    (the KV stage's contract), so the tokens generated later are all kept.
"""

import torch

from methods._base import HyperParam, KVContext, register_prune

SINK = HyperParam("STREAMINGLLM_SINK", 4, int, "first entries always kept (attention sinks; official start_size)",
                  check=lambda v: None if v >= 0 else "must be >= 0")


def sink_and_recent(length: int, budget: int, sink: int) -> torch.Tensor:
    """[K] the first ``min(sink, budget)`` and the last ``budget - that`` of ``length`` entries (all if budget >= L)."""
    if budget >= length:
        return torch.arange(length)
    start = min(sink, budget)
    return torch.cat([torch.arange(start), torch.arange(length - (budget - start), length)])


@register_prune("streamingllm_kv", params=[SINK])
def streamingllm_kv(ctx: KVContext) -> torch.Tensor:
    """StreamingLLM: keep the first STREAMINGLLM_SINK entries (attention sinks) and the most recent ones."""
    return sink_and_recent(ctx.num_entries, ctx.budget, ctx.params["STREAMINGLLM_SINK"]).to(ctx.keys.device)
