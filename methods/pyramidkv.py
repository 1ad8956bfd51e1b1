"""PyramidKV (Cai et al., 2024, "Dynamic KV Cache Compression based on Pyramidal Information Funneling"; official
code Zefan-Cai/PyramidKV, now Zefan-Cai/KVCache-Factory, ``pyramidkv/pyramidkv_utils.py``,
``PyramidKVCluster.update_kv`` and ``init_pyramidkv``; settings of ``run_longbench.py``).

SnapKV's selection (``methods.snapkv.snapkv_keep``: observation-window attention, pooled, top entries plus the
window) with a per-layer count that falls linearly with depth. With M = ``ctx.budget`` (the official
``max_capacity_prompt``, entries per head of an average layer), W = ``PYRAMIDKV_WINDOW``, L entries, layer l of N:
  * ``L <= M``: everything is kept (officially ``q_len < max_capacity_prompt`` returns the cache);
  * ``L < 2 (M - W)``: every layer keeps M (the official middle branch: plain SnapKV);
  * otherwise:  min_num = (M - W) // beta,  max_num = 2 (M - W) - min_num;
                if max_num >= L - W:  max_num = L - W,  min_num = 2 (M - W) - max_num;
                steps = (max_num - min_num) // (N - 1);
                layer l keeps ``K = max_num - l * steps`` selected entries plus the W window entries.
  The layers' mean of K is about M (slightly above it, as ``steps`` is rounded down); 1 <= K <= L.
Equal scores go to the lower index (stable sort).

Official defaults: ``beta = 20`` (``PyramidKVCluster``); ``run_longbench.py`` (the paper's runs) sets
``window_sizes = 8``, ``kernel_sizes = 7``, ``pooling = "maxpool"``, which are the defaults here (the fall-backs of
``init_pyramidkv`` when the script sets nothing are 32 / 5 / avgpool, SnapKV's).

Adaptations:
  * ``budget <= W`` (the official code asserts ``max_capacity_prompt > window_size``): SnapKV's rule for that case,
    the last ``budget`` entries;
  * N = 1: ``steps = 0`` (the official formula divides by N - 1);
  * GQA, scores and pooling: as ``methods.snapkv`` (query-head scores averaged per KV head before the top-k,
    where the official code keeps a set per query head);
  * the count: this method keeps the count derived above, not ``ctx.budget``, at each layer (the same K for every
    KV head of the layer); the KV stage's contract allows it for PyramidKV.
"""

import torch

from methods._base import HyperParam, KVContext, register_prune
from methods.snapkv import snapkv_keep

WINDOW = HyperParam("PYRAMIDKV_WINDOW", 8, int, "observation window: last prompt rows, always kept (official run 8)",
                    check=lambda v: None if v >= 1 else "must be >= 1")
KERNEL = HyperParam("PYRAMIDKV_KERNEL", 7, int, "pooling kernel along the sequence (official run 7)",
                    check=lambda v: None if v >= 1 and v % 2 == 1 else "must be an odd number >= 1")
POOLING = HyperParam("PYRAMIDKV_POOLING", "maxpool", str, "pooling of the window scores: avgpool or maxpool",
                     check=lambda v: None if v in ("avgpool", "maxpool") else "must be 'avgpool' or 'maxpool'")
BETA = HyperParam("PYRAMIDKV_BETA", 20, int, "pyramid steepness: the last layer selects about (budget - window) / beta",
                  check=lambda v: None if v >= 1 else "must be >= 1")


def pyramid_count(length: int, budget: int, window: int, layer: int, num_layers: int, beta: int) -> int:
    """Entries per head PyramidKV keeps at ``layer`` (window included), by the official formula (see above)."""
    if budget >= length or budget <= window or length < 2 * (budget - window):
        return min(budget, length)
    min_num = (budget - window) // beta
    max_num = 2 * (budget - window) - min_num
    if max_num >= length - window:
        max_num = length - window
        min_num = 2 * (budget - window) - max_num
    steps = (max_num - min_num) // (num_layers - 1) if num_layers > 1 else 0
    return max_num - layer * steps + window


@register_prune("pyramidkv_kv", params=[WINDOW, KERNEL, POOLING, BETA])
def pyramidkv_kv(ctx: KVContext) -> torch.Tensor:
    """PyramidKV: SnapKV selection with per-layer counts falling linearly with depth (mean about the budget)."""
    p = ctx.params
    window = p["PYRAMIDKV_WINDOW"]
    keep = pyramid_count(ctx.num_entries, ctx.budget, window, ctx.layer, ctx.num_layers, p["PYRAMIDKV_BETA"])
    return snapkv_keep(ctx, keep, window, p["PYRAMIDKV_KERNEL"], p["PYRAMIDKV_POOLING"])
