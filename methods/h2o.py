"""H2O, Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023; official code FMInference/H2O,
``h2o_hf/utils_real_drop/modify_llama.py``, ``H2OKVCache_LayerWise.__call__`` / ``_update_hh_score``, and
``h2o_hf/utils_hh/modify_llama.py``, ``LlamaAttention_heavy_hitter.forward``; also read: Zefan-Cai/PyramidKV and
Zefan-Cai/KVCache-Factory, ``pyramidkv/pyramidkv_utils.py``, ``H2OKVCluster.update_kv``).

Rule (per decoder layer and KV head):
  1. ``recent = floor(budget * H2O_RECENT_RATIO)``, ``heavy = budget - recent``;
  2. score of an entry = the attention it received in the prefill summed over every prompt row (causal), the
     accumulated attention score (``hh_score = attn.sum(0).sum(1)``), per query head, then averaged over the
     query heads of each KV head (GQA, see below);
  3. keep the ``recent`` last entries, plus the ``heavy`` best-scored entries among the others (the official
     heavy hitters are chosen from ``hh_score[:, :seq_len - recent_size]``, outside the recent window);
  4. ``budget >= L``: everything is kept (officially the cache is untouched while ``seq_len <= cache_size``).
Equal scores go to the lower index (stable sort).

How the official code splits the budget: FMInference's H2O gives the heavy hitters and the recent window the
same share (``heavy_ratio = recent_ratio = 0.1`` in ``scripts/lm_eval/h2o.sh``, ``hh_size = recent_size = 1024`` in
``run_summarization.py``), hence the default ``H2O_RECENT_RATIO = 0.5``. KVCache-Factory's ``H2OKVCluster`` instead
keeps a fixed recent window (``window_size``: 32 in ``init_H2O``, 8 in ``run_longbench.py``) and gives the rest to
the heavy hitters; set a small ratio to come near it.

Adaptations:
  * the budget is one count per layer (the toolkit's KV_BUDGET), split by a ratio of it rather than two ratios
    of the prompt length;
  * GQA: the official caches hold one head per query head (FMInference's real-drop code assumes H_q == H_kv;
    KVCache-Factory repeats the keys to query heads before compressing); here the cache has H_kv heads, so the
    scores of each KV head's query heads are averaged (``ctx.per_kv_head``) before the top-k;
  * the selection runs once after the prefill (H2O also evicts at every decode step); the decode tokens are kept;
  * the prefill attention is the layer's own causal attention (KVCache-Factory's ``H2OKVCluster`` masks only its
    last ``window_size`` rows, so its earlier rows also see later entries; not reproduced).
"""

import torch

from methods._base import HyperParam, KVContext, register_prune

RECENT_RATIO = HyperParam("H2O_RECENT_RATIO", 0.5, float,
                          "share of the budget given to the most recent entries (the rest: heavy hitters)",
                          check=lambda v: None if 0.0 <= v <= 1.0 else "must be in [0, 1]")


def heavy_and_recent(scores: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """[H, budget] the last ``recent`` entries plus, per head, the ``budget - recent`` best-scored earlier entries
    (``scores``: [H, L]; ties to the lower index)."""
    heads, length = scores.shape
    if budget >= length:
        return torch.arange(length, device=scores.device).expand(heads, length)
    split = length - recent
    order = torch.sort(scores[:, :split], dim=-1, descending=True, stable=True).indices
    recent_idx = torch.arange(split, length, device=scores.device).expand(heads, recent)
    return torch.cat([order[:, :budget - recent], recent_idx], dim=-1)


@register_prune("h2o_kv", params=[RECENT_RATIO])
def h2o_kv(ctx: KVContext) -> torch.Tensor:
    """H2O: keep the heavy hitters (largest accumulated prefill attention) and the most recent entries, per KV head."""
    if ctx.budget >= ctx.num_entries:
        return torch.arange(ctx.num_entries, device=ctx.keys.device)
    recent = int(ctx.budget * ctx.params["H2O_RECENT_RATIO"])
    scores = ctx.per_kv_head(ctx.attention_column_sums())  # [H_kv, L]
    return heavy_and_recent(scores, ctx.budget, recent).to(ctx.keys.device)
