"""SnapKV (Li et al., NeurIPS 2024; official code FasterDecoding/SnapKV, ``snapkv/monkeypatch/snapkv_utils.py``,
``SnapKVCluster.update_kv`` and ``init_snapkv``; also read: ``mistral_hijack_4_37.py`` (GQA), and Zefan-Cai/KVCache-Factory,
``pyramidkv/pyramidkv_utils.py``, ``SnapKVCluster.update_kv``, and its ``docs/gqa_cache_layout.md``).

Rule (per decoder layer and KV head), ``w = SNAPKV_WINDOW``:
  1. observation window = the last ``w`` prompt rows; their (causal) attention probabilities to the entries
     before the window, summed over the window rows, per query head -> [H_q, L - w];
  2. pooled along the sequence, per query head: ``avg_pool1d`` / ``max_pool1d`` (``SNAPKV_POOLING``) with
     ``kernel = SNAPKV_KERNEL``, stride 1, padding ``kernel // 2`` (average pooling counts the zero padding, as
     ``F.avg_pool1d``'s default in the official code), so a spike lends its score to its neighbours;
  3. averaged over the query heads of each KV head (``ctx.per_kv_head``);
  4. keep the ``budget - w`` best pooled entries plus the ``w`` window entries themselves.
Equal scores go to the lower index (stable sort).

Official defaults (``init_snapkv``): ``window_size=32``, ``kernel_size=5``, ``pooling='avgpool'``
(``max_capacity_prompt=2048``: here the toolkit's budget).

Adaptations:
  * GQA: the official code repeats the keys to the query heads before ``update_kv`` ("[SnapKV] move to ahead"),
    so it keeps a separate set per query head (KVCache-Factory does the same and documents it as a ~H_q/H_kv
    larger cache). Here the cache has H_kv heads, so the pooled scores of each KV head's query heads are averaged
    before the top-k (pooling stays per query head, as officially, which matters for max pooling);
  * ``budget >= L``: everything is kept (officially the cache is untouched while ``q_len < max_capacity_prompt``);
  * ``budget <= w`` (the official code asserts ``max_capacity_prompt > window_size``): the window is clipped to the
    budget, i.e. the last ``budget`` entries are kept (the limit of the official rule as the selected share
    reaches 0); no attention is read then;
  * ``SNAPKV_KERNEL`` must be odd: with an even kernel, padding ``kernel // 2`` gives ``L - w + 1`` pooled scores,
    one more than the entries they index;
  * the scores are the toolkit's fp32 recomputation of the layer's attention (``ctx.window_attention``), not the
    half-precision probabilities of the official code.
"""

import torch
import torch.nn.functional as F

from methods._base import HyperParam, KVContext, register_prune

WINDOW = HyperParam("SNAPKV_WINDOW", 32, int, "observation window: last prompt rows, always kept (official 32)",
                    check=lambda v: None if v >= 1 else "must be >= 1")
KERNEL = HyperParam("SNAPKV_KERNEL", 5, int, "pooling kernel along the sequence (official 5)",
                    check=lambda v: None if v >= 1 and v % 2 == 1 else "must be an odd number >= 1")
POOLING = HyperParam("SNAPKV_POOLING", "avgpool", str, "pooling of the window scores: avgpool or maxpool",
                     check=lambda v: None if v in ("avgpool", "maxpool") else "must be 'avgpool' or 'maxpool'")


def snapkv_scores(ctx: KVContext, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """[H_kv, L - w] SnapKV's pooled observation-window score of every entry before the window
    (w = min(window, L)): window rows' attention summed, pooled per query head, averaged per KV head."""
    attn = ctx.window_attention(window)  # [H_q, w, L]
    prefix = ctx.num_entries - attn.shape[1]
    summed = attn[:, :, :prefix].sum(dim=1).unsqueeze(1)  # [H_q, 1, L - w]
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    pooled = pool(summed, kernel_size=kernel, stride=1, padding=kernel // 2).squeeze(1)
    return ctx.per_kv_head(pooled)


def snapkv_keep(ctx: KVContext, keep: int, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """[H_kv, keep] (or [L] when keep >= L): the last min(window, keep) entries plus, per KV head, the best
    ``keep - window`` entries before the window by ``snapkv_scores``."""
    length, device = ctx.num_entries, ctx.keys.device
    if keep >= length:
        return torch.arange(length, device=device)
    kept_window = min(window, keep)
    recent = torch.arange(length - kept_window, length, device=device).expand(ctx.kv_heads, kept_window)
    if keep == kept_window:
        return recent.contiguous()
    scores = snapkv_scores(ctx, window, kernel, pooling)  # window < keep < L: w == window
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :keep - window]
    return torch.cat([order.to(device), recent], dim=-1)


@register_prune("snapkv_kv", params=[WINDOW, KERNEL, POOLING])
def snapkv_kv(ctx: KVContext) -> torch.Tensor:
    """SnapKV: keep the entries the observation window attends to most (pooled), plus the window, per KV head."""
    p = ctx.params
    return snapkv_keep(ctx, ctx.budget, p["SNAPKV_WINDOW"], p["SNAPKV_KERNEL"], p["SNAPKV_POOLING"])
