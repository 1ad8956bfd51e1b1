"""Spatial pooling on each span's real (h, w) grid (no paper; a baseline, as UniPruneBench's ``pool``).

UniPruneBench pools every image to a fixed square (4/16/25 tokens). Here each frame of the span (grid
``(t, h, w)`` in LLM tokens, raster order) is pooled separately with adaptive average or max pooling to
``h' x w'`` cells, where both sides shrink by ``sqrt(K / N)`` so the aspect ratio is kept:
``h' = clamp(round(h * sqrt(K / N)), 1, h)`` and likewise ``w'``. Cells are PyTorch's adaptive-pooling bins
(rows ``floor(i h / h')`` to ``ceil((i + 1) h / h')``); there is no temporal pooling.

Count rule (``exact_count=False``): ``t * h' * w'`` tokens, which is close to but not always the keep rule's
``K`` (a grid cannot have every size); the record holds the count actually kept. A span whose grid is
unknown is pooled along its raster order to exactly ``K`` bins instead.

Each pooled token takes the position of its cell's central token (``(first + last) // 2`` per axis). At
``K = N`` nothing is pooled. Deterministic.

Hyper-parameter: ``POOL_MODE`` = ``avg`` (default) or ``max``.
Pre-LLM and feature-based: no attention is read, so it runs with any attention implementation (flash included).
"""

import math

import torch
import torch.nn.functional as F

from methods._base import HyperParam, PruneContext, PruneResult, register_prune

MODE = HyperParam("POOL_MODE", "avg", str, "pooling of each cell: avg or max",
                  check=lambda m: None if m in ("avg", "max") else "must be 'avg' or 'max'")


def bins(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive-pooling bins of ``range(size)`` into ``out`` cells, as (first, last + 1)."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def centre(first: int, end: int) -> int:
    return (first + end - 1) // 2


def pool_grid(features: torch.Tensor, grid: tuple[int, int, int], keep: int, mode: str):
    """Pool each frame of a (t, h, w) raster to h' x w' cells; returns (representative indices, pooled tokens)."""
    t, h, w = grid
    scale = math.sqrt(keep / features.shape[0])
    out_h, out_w = min(h, max(1, round(h * scale))), min(w, max(1, round(w * scale)))
    frames = features.float().view(t, h, w, -1).permute(0, 3, 1, 2)  # (t, D, h, w)
    pool = F.adaptive_avg_pool2d if mode == "avg" else F.adaptive_max_pool2d
    pooled = pool(frames, (out_h, out_w)).permute(0, 2, 3, 1).reshape(t * out_h * out_w, -1)
    rows = torch.tensor([centre(*b) for b in bins(h, out_h)])
    cols = torch.tensor([centre(*b) for b in bins(w, out_w)])
    frame_starts = torch.arange(t) * h * w
    index = (frame_starts.view(t, 1, 1) + rows.view(1, -1, 1) * w + cols.view(1, 1, -1)).flatten()
    return index, pooled


def pool_raster(features: torch.Tensor, keep: int, mode: str):
    """Pool along the raster order into ``keep`` adaptive bins (span without a known grid)."""
    pool = F.adaptive_avg_pool1d if mode == "avg" else F.adaptive_max_pool1d
    pooled = pool(features.float().T.unsqueeze(0), keep)[0].T
    index = torch.tensor([centre(*b) for b in bins(features.shape[0], keep)])
    return index, pooled


@register_prune("pool_pre_llm", params=[MODE], exact_count=False)
def pool_pre_llm(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """Average/max pooling of each frame on its real (h, w) grid, both sides scaled by sqrt(K/N)."""
    mode = ctx.params["POOL_MODE"]
    n = ctx.num_tokens
    if ctx.grid is not None and math.prod(ctx.grid) == n:
        index, pooled = pool_grid(ctx.features, ctx.grid, ctx.keep, mode)
    else:
        index, pooled = pool_raster(ctx.features, ctx.keep, mode)
    if index.numel() == n:  # every cell is one token: nothing pooled
        return torch.arange(n)
    return PruneResult(index, pooled)
