"""ToMe ("Token Merging: Your ViT But Faster", Bolya et al., ICLR 2023; official code facebookresearch/ToMe,
``bipartite_soft_matching`` and ``merge_wavg`` in tome/merge.py, ``ToMeBlock`` / ``ToMeAttention`` /
``apply_patch`` in tome/patch/timm.py and tome/patch/clip.py).

Rule (one bipartite soft matching, merging r tokens):
  1. metric: the keys of the block's attention averaged over heads (``k.mean(1)``), L2-normalised;
  2. split the sequence alternately: set A = even positions, set B = odd positions; scores = cosine
     similarity A x B;
  3. every A token draws one edge to its most similar B token (``scores.max(-1)``); the r A tokens whose edge
     scores highest (``argsort(descending=True)``) are merged into their B token, the other A tokens stay;
     at most half of the tokens can go: r <= floor(N / 2);
  4. merge_wavg: x * size is summed per destination and divided by the summed size; sizes add (size 1 per
     patch at first).
  Later blocks add log(size) to every attention logit of a key (proportional attention, ``prop_attn``, on by
  default in ``apply_patch`` for off-the-shelf ViTs). No randomness.

Official facts followed (see the comments in the code):
  * [CLS]: with ``class_token`` the [CLS] is position 0 of the sequence, hence in set A, and its score row is
    set to -inf so it is never merged. The patch after it is then at position 1: patch tokens at odd
    span positions form A and those at even span positions form B. ``tome_vit`` does exactly that on an encoder
    with a [CLS] (CLIP, the ToMe CLIP patch sets ``class_token=True``) and splits the patches themselves
    (A = even) on one without (SigLIP; timm's ``class_token`` is False when the model has no cls_token).
  * Ties: ``scores.max(dim=-1)`` returns the first maximal B token (documented torch behaviour), kept here;
    ``argsort(descending=True)`` is not stable, so its tie order is left to the backend: here the sort is
    stable (equal best scores: the A token earlier in the sequence is merged first).
  * The metric is divided by its norm (here ``F.normalize``: identical unless a norm is below 1e-12, where the
    official division gives NaN).

Our contract: a merged token takes the ORIGINAL span index of its B token as representative; unmerged A tokens
and B tokens keep their own indices; the result is in ascending index order (the official output is the unmerged
A tokens, sorted only with a [CLS], then every B token: the same tokens, in another order).

Adaptations (``tome_vit``):
  * Schedule. The official code merges a constant r tokens in every block. Named alone (``PRUNE_METHOD=tome_vit``),
    ``tome_vit`` does the same on the blocks the features depend on: a stage before every block 1..F (F: the block
    whose output the model reads as features, LLaVA-1.5's 22 of CLIP-L's 24), the cumulative ratio falling linearly
    from 1 to ``KEEP_RATIO`` (block b keeps ``1 - (1 - KEEP_RATIO) * b / F`` of the patches, so each block merges
    about (N - K) / F tokens: the constant r). Block 0 merges nothing here (no block has computed keys before it).
    ``VIT_LAYER_SPECS`` places single stages instead (e.g. ``12:tome_vit:0.5``: every merge before block 12).
  * Rounds: the official code caps r at floor(N / 2) per block. When keep < N / 2 the matching is repeated
    (each round at most floor(N_current / 2) merges) on the tokens in ascending representative order, the
    merged tokens' metric being the size-weighted average of their metrics (as their features; the official
    code recomputes the keys in the next block instead), until ``keep`` tokens remain.
  * Where: the official code merges inside a block, between the attention and the MLP, with that attention's
    keys; here the hidden states entering block ``layer`` are merged with the keys of block ``layer - 1``
    (``ctx.encoder_keys()``), after that block's MLP.
  * Merging is computed in fp32 and cast back to the features' dtype (the official code uses the model's).

``tome_pre_llm``: the same matching and merging on the projected visual tokens, before the language model
(``ctx.features`` as the metric, sizes starting at 1, the rounds above when keep < N / 2), the form many VLM
pruning papers report as "ToMe". No proportional attention there: the language model has no size input.

Hyper-parameters:
  TOME_PROP_ATTN (default 1, official for off-the-shelf ViTs): ``tome_vit`` asks the later encoder blocks for
  proportional attention (log(size) added to the attention logits).

Flash compatibility: ``tome_pre_llm`` yes; ``tome_vit`` no (the ViT stage passes sizes and padding as an additive
attention mask: sdpa or eager).
"""

import torch
import torch.nn.functional as F

from methods._base import HyperParam, PruneContext, PruneResult, flag, register_prune


PROP_ATTN = HyperParam("TOME_PROP_ATTN", True, flag,
                       "1: later encoder blocks add log(size) to the attention logits of merged tokens (official "
                       "proportional attention); 0: plain attention")

def tome_schedule(feature_block: int, keep_ratio: float) -> list[tuple[int, float]]:
    """ToMe's constant r per block: a stage before every block 1..feature_block, the kept share falling linearly
    from 1 to ``keep_ratio`` (cumulative ratios, as the ViT stage takes them)."""
    return [(block, 1 - (1 - keep_ratio) * block / feature_block) for block in range(1, feature_block + 1)]



def bipartite_matching(metric: torch.Tensor, r: int, class_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching on one sequence ``metric`` [n, c]: (src, dst), the positions in the sequence
    of the r merged A tokens and of the B token each goes into, in merge order (highest score first).

    ``class_token``: a [CLS] precedes the sequence (not in ``metric``); it is then A's first token and, its scores
    being -inf officially, is never merged, so A is the odd positions of ``metric`` and B the even ones.
    r is capped at floor(n / 2) as officially (``min(r, (t - protected) // 2)`` with t = n + protected).
    """
    n = metric.shape[0]
    r = min(r, n // 2)
    device = metric.device
    a_pos = torch.arange(1 if class_token else 0, n, 2, device=device)
    b_pos = torch.arange(0 if class_token else 1, n, 2, device=device)
    if r <= 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    unit = F.normalize(metric.float(), dim=-1)
    scores = unit[a_pos] @ unit[b_pos].T  # [|A|, |B|] cosine similarities
    best, match = scores.max(dim=-1)  # official: node_max, node_idx (first maximal B token on ties)
    order = torch.sort(best, descending=True, stable=True).indices  # official: argsort(descending=True)
    src = order[:r]  # official: src_idx = edge_idx[:r]; the rest (unm_idx) stays
    return a_pos[src], b_pos[match[src]]  # official: dst_idx = node_idx.gather(src_idx)


def merge_round(tensors: list[torch.Tensor], sizes: torch.Tensor, src: torch.Tensor,
                dst: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """ToMe's merge_wavg of each [n, c] tensor: x * size summed into the destinations, divided by the summed
    size. Returns (survivors: ascending positions, the merged tensors in that order, their sizes)."""
    n = sizes.shape[0]
    total = sizes.clone()
    total.index_add_(0, dst, sizes[src])
    survivors = torch.ones(n, dtype=torch.bool, device=sizes.device)
    survivors[src] = False
    survivors = torch.nonzero(survivors).flatten()
    merged = []
    for x in tensors:
        weighted = x * sizes[:, None]
        weighted.index_add_(0, dst, weighted[src])  # src (A) and dst (B) are disjoint: reads are unchanged
        merged.append(weighted[survivors] / total[survivors, None])
    return survivors, merged, total[survivors]


def tome_merge(metric: torch.Tensor, features: torch.Tensor, sizes: torch.Tensor | None, keep: int,
               class_token: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge [N, C] ``features`` (similarity from [N, c] ``metric``, sizes [N] or None for ones) down to ``keep``
    tokens by rounds of bipartite soft matching, each at most floor(N_current / 2) merges. Returns (indices of the
    representatives, ascending; [keep, C] merged features, fp32; [keep] sizes, fp32)."""
    n = features.shape[0]
    device = features.device
    values = features.float()
    metric = metric.float().to(device)
    sizes = torch.ones(n, device=device) if sizes is None else sizes.float().to(device)
    origin = torch.arange(n, device=device)  # original span index of every current token, ascending
    while origin.numel() > max(keep, 1):
        src, dst = bipartite_matching(metric, origin.numel() - keep, class_token)
        survivors, (values, metric), sizes = merge_round([values, metric], sizes, src, dst)
        origin = origin[survivors]  # a destination B token keeps its own index: the representative
    return origin, values, sizes


def encoder_has_cls(ctx: PruneContext) -> bool:
    try:
        ctx.encoder_cls_attention()
    except RuntimeError:
        return False
    return True


@register_prune("tome_vit", params=[PROP_ATTN], default_schedule=tome_schedule, min_layer=1)
def tome_vit(ctx: PruneContext) -> PruneResult:
    """ToMe: bipartite soft matching on the encoder keys (heads averaged), size-weighted merge inside the ViT."""
    prop_attn = ctx.params["TOME_PROP_ATTN"]
    n = ctx.num_tokens
    if ctx.keep >= n:
        return PruneResult(torch.arange(n, device=ctx.features.device), proportional_attention=prop_attn)
    metric = ctx.encoder_keys().float().mean(dim=1)  # official: ToMeAttention returns k.mean(1)
    indices, merged, sizes = tome_merge(metric, ctx.features, ctx.sizes, ctx.keep, encoder_has_cls(ctx))
    out_dtype = ctx.sizes.dtype if ctx.sizes is not None else torch.float32
    return PruneResult(indices, merged.to(ctx.features.dtype), sizes.to(out_dtype), proportional_attention=prop_attn)


@register_prune("tome_pre_llm")
def tome_pre_llm(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """ToMe as VLM papers report it: bipartite soft matching and size-weighted merging of the projected tokens."""
    n = ctx.num_tokens
    if ctx.keep >= n:
        return torch.arange(n, device=ctx.features.device)
    # The metric is the tokens themselves; no [CLS] among the LLM's visual tokens; sizes start at 1 and are not
    # returned (no proportional attention: the language model has no size input).
    indices, merged, _ = tome_merge(ctx.features, ctx.features, None, ctx.keep)
    return PruneResult(indices, merged.to(ctx.features.dtype))
