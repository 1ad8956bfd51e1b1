"""HiPrune ("HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models",
Liu et al., arXiv 2508.00553, ACL 2026 Findings; official code Danielement321/HiPrune: ``encode_images`` in
LLaVA/llava/model/llava_arch.py (LLaVA-1.5 / LLaVA-NeXT), the vision tower's ``forward`` and the "HiPrune" block of
``Qwen2_5_VLForConditionalGeneration.forward`` in Qwen2_5_VL/qwen2_5_vl_HiPrune.py; defaults in its README and
bench_*.sh).

Rule, for a budget of K tokens, alpha and an object (middle) layer:
  1. anchors: the a = round(K * alpha / 5) tokens with the largest encoder attention at the object layer
     (Python's round, halves to even, as the official code);
  2. buffers: the 4-connected neighbours (left, right, up, down; radius 1) of every anchor on the span's 2-D grid;
     anchors and buffers together (duplicates once) are at most 5a ~ alpha * K tokens;
  3. registers: the K - |anchors + buffers| tokens with the largest encoder attention at the deep layer among the
     tokens not chosen yet;
  4. keep the three sets, in positional order. No randomness, exactly K tokens.

Signals (``ctx.vision_attention_received`` at two captured layers; see docs/methods.md, "Vision-encoder signals"):
  * The official score is the same on every model: the attention a token receives, averaged over heads and over
    every query (LLaVA: ``attentions[layer].mean(1).mean(1)[:, 1:]``, the [CLS] query included, its column dropped;
    Qwen2.5-VL: head mean, summed over queries, averaged over each 2x2 merge group, then a softmax over the tokens,
    which changes no ranking).
  * Layers. LLaVA (CLIP-L/336, 24 layers): object ``attentions[HIPRUNE_OBJECT_LAYER - 1]`` = layer 8 (default 9),
    deep ``attentions[mm_vision_select_layer]`` = layer 22 (-2, the feature layer). Qwen2.5-VL (32 blocks): object
    block HIPRUNE_OBJECT_LAYER - 1 = 15 (default 16; a full-attention block), deep the last block (31).
  * Here, without a [CLS] (Qwen-VL, Gemma 4, SigLIP, InternViT): the substitute, the mean attention received inside
    the image or frame, heads averaged, summed over each LLM token's patches: the official Qwen score up to a
    per-image constant (same ranking). The object layer is the first globally attending layer at or after
    HIPRUNE_OBJECT_LAYER - 1 (Qwen2.5-VL: its full-attention blocks only; 15 by default, as official), the deep
    layer the last globally attending one (the feature layer).
  * On CLIP with a [CLS] (LLaVA-1.5 / NeXT, ``ctx.vision_has_cls``): the official score itself, at both layers (8 and
    22): ``VisionNeeds(cls_heads="received")`` averages the attention every patch receives over every query, the
    [CLS] query included, and over heads, then drops the [CLS] column.

Official defaults (README, bench_llava.sh, bench_qwen.sh): HIPRUNE_ALPHA 0.1; HIPRUNE_OBJECT_LAYER 9 (LLaVA-1.5 and
LLaVA-NeXT, CLIP-L's 24 layers) and 16 (Qwen2.5-VL's 32); budget HIPRUNE_RETENTION 192/128/64 tokens (LLaVA-1.5),
HIPRUNE_QWEN_RETENTION 0.334/0.223/0.112 (Qwen). Here the budget is the toolkit's keep-count rule on
``KEEP_RATIO`` (exact count), per span.

Hyper-parameters:
  HIPRUNE_ALPHA (default 0.1): share of the budget spent on anchors and their buffers (a = round(K * alpha / 5)).
  HIPRUNE_OBJECT_LAYER (default "auto"): the object layer, 1-based as the official variable (layer index + 1).
    "auto": the official value of the encoder where there is one (9 of CLIP-L's 24, 16 of Qwen2.5-VL's 32) and the
    same fraction of the depth elsewhere: depth * 3 // 8 on a [CLS] encoder, depth // 2 without ([CLS]-free
    encoders follow Qwen's setting), at least 1. "auto" captures every globally attending layer (the object layer
    depends on the depth, known only at the first forward); a number captures only that layer onwards.

Adaptations:
  * Buffers are the true grid neighbours of ``ctx.grid`` (t, h, w), inside the anchor's own frame. The official code
    adds -1, +1, -W, +W to the flat index (W = 24 on LLaVA, the first image's LLM grid width on Qwen) and clamps to
    [0, N - 1]: an anchor in the first or last column gets a "neighbour" from the other end of the next or previous
    row, one in the first or last row adds token 0 or N - 1. Interior anchors get the same buffers.
  * A span without a usable grid (LLaVA-NeXT's base view + tiles, ``ctx.grid`` None or not N tokens) gets no
    buffers: anchors and registers only, the registers filling the budget. The official LLaVA-NeXT code prunes
    every 24 x 24 crop separately (``HIPRUNE_RETENTION / crops`` tokens each) before unpadding and stitching.
  * Qwen2.5-VL: per span (one image or video), not over every image of the prompt at once (the official code ranks
    all images of a prompt together and uses the first image's width for all); videos are not pruned officially.
  * If anchors and buffers exceed K (only when round(K * alpha / 5) * 5 > K, e.g. alpha near 1 or tiny K; the
    official ``topk`` then fails on a negative count), the anchors are kept in rank order, then the buffers of the
    best anchors first (left, right, up, down), cut at K; no registers.
  * Scores in fp32 (official: the model dtype); equal scores go to the lower index (stable sorts; official
    ``topk`` leaves ties unspecified).

Flash compatibility: yes (attention recomputed from the encoder's own q/k in chunks).
"""

from __future__ import annotations

import math

import torch

from methods._base import HyperParam, PruneContext, VisionNeeds, register_prune

AUTO = "auto"


def layer(text: str) -> str | int:
    """'auto' or a 1-based encoder layer."""
    value = text.strip().lower()
    return AUTO if value == AUTO else int(value)


ALPHA = HyperParam("HIPRUNE_ALPHA", 0.1, float,
                   "share of the budget kept as anchors (round(K * alpha / 5)) and their 4 grid neighbours",
                   check=lambda a: None if 0.0 <= a <= 1.0 else "must be in [0, 1]")
OBJECT_LAYER = HyperParam("HIPRUNE_OBJECT_LAYER", AUTO, layer,
                          "object (middle) encoder layer of the anchors, 1-based as the official variable; 'auto': "
                          "9 of CLIP-L's 24, 16 of Qwen2.5-VL's 32, the same share of other depths",
                          check=lambda v: None if v == AUTO or v >= 1 else "must be 'auto' or a layer >= 1 (1-based)")


def vision_needs(params) -> VisionNeeds:
    """Captured from the object layer (0-based: the setting - 1; 'auto': from layer 0) to the deep layer: CLIP's
    all-query attention received up to layer -2 (LLaVA's feature layer), elsewhere every globally attending layer to the last."""
    setting = params["HIPRUNE_OBJECT_LAYER"]
    first = 0 if setting == AUTO else setting - 1
    # On CLIP the official LLaVA code averages over every query, not the [CLS] row: cls_heads="received".
    return VisionNeeds(first_layer=first, cls_layers=(first, -2), cls_heads="received")


def hiprune_layers(ctx: PruneContext) -> tuple[int, int]:
    """(object layer, deep layer) among the captured ones (0-based encoder indices)."""
    captured = ctx.vision_layers()
    deep = captured[-1]
    setting = ctx.params["HIPRUNE_OBJECT_LAYER"]
    if setting == AUTO:
        # The captured range ends at the deep layer: CLIP's layer -2, else the encoder's last layer.
        depth = deep + 2 if ctx.vision_encoder_has_cls else deep + 1
        setting = max(1, depth * 3 // 8 if ctx.vision_encoder_has_cls else depth // 2)
    later = [index for index in captured if index >= setting - 1]
    if not later:
        raise RuntimeError(f"HIPRUNE_OBJECT_LAYER={setting}: no captured encoder layer at or after index {setting - 1} "
                           f"(captured: {list(captured)})")
    return later[0], deep


def grid_neighbours(anchors: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """[a, 4] left, right, up, down neighbours of each anchor (raster index) inside its frame; -1 off the grid."""
    _, h, w = grid
    position = anchors % (h * w)
    row, col = position // w, position % w
    steps = torch.tensor([-1, 1, -w, w], device=anchors.device)
    inside = torch.stack([col > 0, col < w - 1, row > 0, row < h - 1], dim=1)
    return torch.where(inside, anchors.unsqueeze(1) + steps, torch.full_like(inside, -1, dtype=anchors.dtype))


def first_occurrences(sequence: torch.Tensor) -> torch.Tensor:
    """The distinct values of ``sequence`` in the order they first appear."""
    if sequence.numel() == 0:
        return sequence
    values, inverse = torch.unique(sequence, return_inverse=True)
    first = torch.full((values.numel(),), sequence.numel(), dtype=torch.long, device=sequence.device)
    first.scatter_reduce_(0, inverse, torch.arange(sequence.numel(), device=sequence.device), reduce="amin")
    return sequence[first.sort().values]


def hiprune_select(object_scores: torch.Tensor, deep_scores: torch.Tensor, keep: int, alpha: float,
                   grid: tuple[int, int, int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchors, buffers, registers), disjoint, ``keep`` tokens in all; ``grid`` None: no buffers."""
    n = object_scores.shape[0]
    device = object_scores.device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    keep = max(0, min(keep, n))
    anchor_num = min(keep, round(keep * alpha / 5))
    anchors = torch.sort(object_scores, descending=True, stable=True).indices[:anchor_num]
    buffers = empty
    if grid is not None and math.prod(grid) == n and anchor_num:
        around = grid_neighbours(anchors, grid).flatten()  # anchor by anchor: left, right, up, down
        chosen = first_occurrences(torch.cat([anchors, around[around >= 0]]))[:keep]
        buffers = chosen[anchor_num:]
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    taken[anchors] = True
    taken[buffers] = True
    rest = torch.nonzero(~taken).flatten()  # ascending: equal deep scores go to the lower index
    order = torch.sort(deep_scores[rest], descending=True, stable=True).indices
    registers = rest[order[:keep - anchors.numel() - buffers.numel()]]
    return anchors, buffers, registers


@register_prune("hiprune_pre_llm", params=[ALPHA, OBJECT_LAYER], vision=vision_needs)
def hiprune_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """HiPrune: anchors by middle-layer encoder attention, their grid neighbours, registers by deep-layer attention."""
    if ctx.keep >= ctx.num_tokens:
        return torch.arange(ctx.num_tokens, device=ctx.features.device)
    object_layer, deep_layer = hiprune_layers(ctx)
    parts = hiprune_select(ctx.vision_attention_received(object_layer), ctx.vision_attention_received(deep_layer),
                           ctx.keep, ctx.params["HIPRUNE_ALPHA"], ctx.grid)
    return torch.cat(parts).sort().values
