"""LOOK-M (Wan et al., EMNLP Findings 2024; official code SUSTechBruce/LOOK-M,
``LLaVA-mix_merge_v1/llava/model/kv_token_merge/modify_llama.py``: ``TextPivotMerge_LayerWise``,
``TextWeightedMerge_LayerWise``, ``TextAVGMergeKVCache_LayerWise`` and ``TextH2OKVCache_LayerWise``
(``__call__``, ``_update_hh_score``), run by ``TextPivotLlamaAttention_drop`` & co.; the defaults from ``generate.py``,
``workers/model_workers.py``, ``scripts/text-prior-pivot-merge.sh``, ``LLaVA-mix_merge_v1/llava/model/builder.py``;
also read: LoverLost/EffiVLM-Bench, ``kv_cache_compression/kv_cache_utils.py``, ``LOOK_MCluster`` and ``merge_kv``).

Rule (per decoder layer and KV head, once after the prefill):
  1. ``recent = floor(budget * LOOKM_RECENT_RATIO)``, ``heavy = budget - recent``;
  2. score of an entry = the attention it received summed over every prompt row (causal), H2O's accumulated
     score (``hh_score = attn.sum(0).sum(1)``), per query head, then averaged over the query heads of each KV head;
  3. text prior: among the entries before the recent window every text entry ranks before every image entry
     (officially -65516 is added to the image entries' scores), each group by score; the ``heavy`` first ones are
     kept, plus the ``recent`` last entries;
  4. merge (``LOOKM_MERGE``): each evicted entry is matched to the kept entry (heavy or recent) whose cached key has
     the largest cosine similarity with its own key (``similarity.max(-1)``); kept entry j, with key k_j, value v_j
     and matched evicted entries S_j, becomes the mean of itself and its contributions (``scatter_reduce(...,
     reduce='mean', include_self=True)``), the same matches for keys and values:
       * ``pivot``:    k_j <- (k_j + sum_{i in S_j} (k_i + k_j) / 2) / (1 + |S_j|)   (v likewise);
       * ``avg``:      k_j <- (k_j + sum_{i in S_j} k_i) / (1 + |S_j|);
       * ``weighted``: k_j <- (k_j + sum_{i in S_j} s_i k_i) / (1 + |S_j|), s_i the cosine of i with j;
       * ``none``:     no merge (the official ``text_prior_h2o``).
     ``avg`` and ``weighted`` merge only the evicted entries whose best cosine, averaged over the heads, is at least
     the mean best cosine over every head and evicted entry (``filter_indices``; the others are dropped). As
     officially, that filter is positional: the i-th evicted entry (ascending) of every head, which is one same entry
     in every head whenever the heads evict the same entries (e.g. whenever text fills the heavy share);
  5. ``budget >= L``: everything is kept unchanged (officially the cache is untouched while
     ``seq_len <= cache_size``).
Equal scores go to the lower index (stable sort); equal cosines to the lower kept entry (``argmax``'s first maximum).

Official defaults: ``hh_ratio = recent_ratio = 0.1`` of the prompt length (``generate.py`` and
``load_pretrained_model``; ``HH_R = RECENT_R = 0.1`` in the script), ``kv_mode = text_prior_pivot_merge`` (the
README's "test LOOK-M" example). Equal shares of the budget, hence ``LOOKM_RECENT_RATIO = 0.5``,
``LOOKM_MERGE = 'pivot'``.

Adaptations:
  * the budget is one count per layer (the toolkit's KV_BUDGET), split by a ratio of it rather than two ratios of L
    (EffiVLM-Bench's ``LOOK_MCluster`` splits a budget 0.9 heavy / 0.1 recent: set 0.1 to come near it);
  * the budget is a hard count: officially the kept mask is ``hh_score >= 0`` after the kept scores are set to 0,
    so every text entry stays, even past ``hh_size`` (the cache then holds max(text entries before the window,
    hh_size) + recent entries; EffiVLM-Bench's ``LOOK_MCluster`` does the same). Here exactly ``budget`` entries are
    kept: text entries beyond the heavy share are evicted by score and merged like image entries. When the text
    entries fit in the heavy share, both rules keep the same entries;
  * a prompt without image: officially its cache is left untouched (compression runs only when
    ``image_position`` is not empty); here the budget holds and the text prior has nothing to favour (H2O's heavy
    hitters plus the recent window, then the merge);
  * GQA: the official code assumes H_q == H_kv (an [H_q, L] mask selects from the cache); here the cache has H_kv
    heads, so the scores of each KV head's query heads are averaged (``ctx.per_kv_head``), as EffiVLM-Bench's
    ``LOOK_MCluster`` does (``view(kv_heads, group, -1).mean(dim=1)``); the merge runs per KV head;
  * ``avg``: the official ``TextAVGMergeKVCache_LayerWise`` gives ``scatter_reduce`` the filtered matches but the
    unfiltered evicted keys / values as ``src``, so the i-th filtered match receives the i-th evicted entry, not
    the entry matched; here each filtered entry merges into its own match (as the ``weighted`` code does);
  * ``recent = 0`` (officially ``hh_score[:, :-0]`` is empty): no recent window;
  * no entry is pinned as an attention sink: the official text-prior classes pin none (the classes without the
    text prior, e.g. ``PivotKVCache_LayerWise``, give the first 4 entries an infinite score);
  * the scores are the toolkit's fp32 recomputation (``ctx.attention_column_sums``); cosines and merges in fp32
    (officially fp16), results cast back to the cache dtype; a zero key has cosine 0 with every key (officially NaN).
"""

import torch
import torch.nn.functional as F

from methods._base import HyperParam, KVContext, KVMerged, register_prune

MERGES = ("pivot", "avg", "weighted", "none")

RECENT_RATIO = HyperParam("LOOKM_RECENT_RATIO", 0.5, float,
                          "share of the budget given to the most recent entries (the rest: text-prior heavy hitters; "
                          "official hh_ratio = recent_ratio = 0.1 of the prompt)",
                          check=lambda v: None if 0.0 <= v <= 1.0 else "must be in [0, 1]")
MERGE = HyperParam("LOOKM_MERGE", "pivot", str,
                   "how evicted entries merge into their most similar kept entry: pivot (official LOOK-M), avg, "
                   "weighted or none",
                   check=lambda v: None if v in MERGES else f"must be one of {', '.join(MERGES)}")


def text_prior_keep(scores: torch.Tensor, visual: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """[H, budget] ascending: the last ``recent`` entries plus, per head, the ``budget - recent`` first entries before
    them ranked text before image, each by ``scores`` ([H, L]) descending, ties to the lower index."""
    heads, length = scores.shape
    split = length - recent
    order = torch.sort(scores[:, :split], dim=-1, descending=True, stable=True).indices
    is_image = visual.to(scores.device)[:split][order].to(torch.int8)
    order = order.gather(1, torch.sort(is_image, dim=-1, stable=True).indices)  # text first, score order kept
    recent_idx = torch.arange(split, length, device=scores.device).expand(heads, recent)
    return torch.cat([order[:, :budget - recent], recent_idx], dim=-1).sort(dim=-1).values


def merge_evicted(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, merge: str):
    """([H, K, d], [H, K, d]) fp32 keys and values of the kept entries ``index`` ([H, K] ascending), each merged with
    the evicted entries whose keys are most cosine-similar to its key (``merge``: pivot, avg or weighted)."""
    heads, length, _ = keys.shape
    kept = torch.zeros(heads, length, dtype=torch.bool, device=keys.device).scatter(1, index, True)
    evicted = torch.sort(kept.to(torch.int8), dim=-1, stable=True).indices[:, :length - index.shape[1]]

    def rows(x, idx):
        return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    kept_k, kept_v, ev_k, ev_v = rows(keys, index), rows(values, index), rows(keys, evicted), rows(values, evicted)
    similarity = F.normalize(ev_k, dim=-1) @ F.normalize(kept_k, dim=-1).transpose(1, 2)  # [H, E, K]
    match = similarity.argmax(dim=-1)  # [H, E]
    best = similarity.gather(-1, match.unsqueeze(-1)).squeeze(-1)
    if merge == "pivot":
        weight = torch.ones_like(best)
        src_k, src_v = (ev_k + rows(kept_k, match)) / 2, (ev_v + rows(kept_v, match)) / 2
    else:
        weight = (best.mean(dim=0) >= best.mean()).to(best.dtype).expand_as(best)  # shared by the heads
        scale = best.unsqueeze(-1) if merge == "weighted" else 1.0
        src_k, src_v = scale * ev_k, scale * ev_v
    counts = 1 + torch.zeros_like(kept_k[..., 0]).scatter_add(1, match, weight)

    def merged(base, src):
        added = torch.zeros_like(base).scatter_add(1, match.unsqueeze(-1).expand_as(src), weight.unsqueeze(-1) * src)
        return (base + added) / counts.unsqueeze(-1)

    return merged(kept_k, src_k), merged(kept_v, src_v)


@register_prune("lookm_kv", params=[RECENT_RATIO, MERGE])
def lookm_kv(ctx: KVContext) -> KVMerged:
    """LOOK-M: keep text before image by accumulated attention plus the recent entries; merge the evicted entries."""
    heads, length, device = ctx.kv_heads, ctx.num_entries, ctx.keys.device
    if ctx.budget >= length:
        return KVMerged(index=torch.arange(length, device=device).expand(heads, length), keys=None, values=ctx.values)
    recent = int(ctx.budget * ctx.params["LOOKM_RECENT_RATIO"])
    scores = ctx.per_kv_head(ctx.attention_column_sums())  # [H_kv, L]
    index = text_prior_keep(scores, ctx.visual, ctx.budget, recent).to(device)
    merge = ctx.params["LOOKM_MERGE"]
    if merge == "none":
        kept_v = ctx.values.gather(1, index.unsqueeze(-1).expand(-1, -1, ctx.values.shape[-1]))
        return KVMerged(index=index, keys=None, values=kept_v)
    keys, values = merge_evicted(ctx.keys.float(), ctx.values.float(), index, merge)
    return KVMerged(index=index, keys=keys.to(ctx.keys.dtype), values=values.to(ctx.values.dtype))
