"""FrameFusion, "Combining Similarity and Importance for Video Token Reduction on Large Vision Language Models" (Fu et
al., ICCV 2025; official code thu-nics/FrameFusion: ``framefusion/main.py`` (``FrameFusion.forward``,
``compute_similarity_and_token_index_by_patch``, ``merge_tokens_and_get_mask``, ``_compute_pruning_ratio``),
``framefusion/models/qwen2/modeling_qwen2.py`` and ``modeling_qwen2_vl.py`` (where it is called),
``framefusion/interface.py`` (``apply_framefusion``), README defaults).

Official algorithm (one video, prefill). Every visual token has a "patch type": its position inside its frame (a
frame is what the model encodes as one temporal step: Qwen2-VL's temporal patch, here ``ctx.video``'s frames).

1. Similarity-based merging, first before layer 0's attention (on the input embeddings), then again after the
   attention of layers 0, 1, ... (on the residual stream) until it stops. A step: each token's cosine similarity to
   the previous remaining token of its patch type (at the first step: the same position in the previous frame;
   first-frame tokens have none); the tokens with similarity ``>= similarity_lower_bound`` (0.6) are merged into it.
   A run of consecutive merged frames of one position goes into the token just before the run (the earliest one),
   which becomes the plain mean of itself and the run (``merge_tokens_and_get_mask``) and keeps its position.
2. The cost budget (``_compute_pruning_ratio(sparsity_list, cost, num_layers=28)``): with s_i the share of tokens
   merged at step i and r_i = prod_{k<=i} (1 - s_k), the sparsity still allowed is
   ``u = 1 - (28 cost - sum_i r_i) / ((28 - #steps) r_last)`` (0 if negative). Before a merging step, u is its cap:
   if the similar share reaches u, only the ``int(u N)`` most similar tokens are merged and FrameFusion ends there
   (no pruning); if the similar share is below ``ratio_lower_bound`` (0.1), merging ends.
3. Importance-based pruning, once, after the attention of the layer following the last merging step: the
   attention of the last query row (``scaled_dot_product_attention(num=1)``; the Qwen2-VL adapter: last 4 rows),
   averaged over heads and rows, keeps the ``round(n (1 - u))`` most attended of the n current visual tokens.

Here (``framefusion_intra_llm``, video method, named alone: stages before layers 0 and 1):

* Stage at layer 0 -- the first merging step, on the hidden states entering layer 0: the language model's input
  embeddings, the very tensor the official first step reads. Merged tokens take the earliest token's place (its
  original position, Qwen's temporal M-RoPE index included), as officially. ``framefusion_pre_llm`` is the same step
  on the pre-LLM features (the same embeddings), for combining it with other intra-LLM methods or running merging
  alone; after it the layer-0 stage finds the video no longer whole and merges nothing more (or, where it merged
  nothing, finds nothing either: the same embeddings). Give both stages the same ratio (it is the cost).
* Stage at any layer K >= 1 -- the pruning, with the attention of layer K-1 (``ctx.attention_to_span``; the official
  pruning after layer 0's attention when merging stops at the first step, read here before layer 1). The merging
  step's share is read back from the counts: s = 1 - n / N0, N0 = t h w of the span's grid (the tokens it entered
  with; no grid: N0 = n; tokens an earlier stage of another method removed count as merged). If the merging reached its cap (``N0 - n >= int(u0 N0)`` with N0 - n > 0, or u0 = 0) nothing
  is pruned, as officially.

Adaptations (README row): **one merging step.** The official code repeats the merge after each following layer's
attention while at least ``ratio_lower_bound`` (10 %) of the tokens merge, then prunes. A later stage here cannot tell
which frame position a remaining token holds (``ctx.video.size`` is None once a stage has merged the video) nor what
earlier steps merged (a method keeps no state between stages), so merging happens once, on the input embeddings, and
the pruning follows with the cost model fed that one step (``ratio_lower_bound`` is therefore not used). The pruning
reads layer K-1's attention before layer K, i.e. after layer K-1's MLP instead of between its attention and MLP.

Other adaptations: KEEP_RATIO is the official ``cost`` (README 0.3: on average 30 % of the visual tokens per layer,
over ``FRAMEFUSION_COST_LAYERS`` layers); where the official code raises "The cost is too small" (KEEP_RATIO below
(1 - s) / 28) every visual token of the span is pruned (the formula's limit). Temporal merging only in a span of
modality "video" with complete frames: an image (a one-frame video; also InternVL's tiles, laid along t) is never
merged, so on an image FrameFusion is its pruning alone (as officially, where a one-frame input finds nothing to
merge). Similarities and means are computed in fp32 (official: the model dtype) and cast back; a zero vector
(NaN similarity) is never merged; ties go to the earlier token (official ``topk``: unspecified). Newline tokens
(LLaVA-Video) are not shown to methods here; the official code gives them patch types and merges them too.

Count rule (``exact_count=False``; KEEP_RATIO is the cost, not the kept share): the merging stage keeps N minus the
tokens merged (all similar ones, or ``int(u0 N)`` with u0 = 1 - KEEP_RATIO); the pruning stage keeps
``round(n (1 - u))`` with u = ``budget_sparsity([1 - n / N0], KEEP_RATIO)`` (n when the merging reached its cap).
No randomness.
"""

from __future__ import annotations

import math

import torch

from methods._base import HyperParam, PruneContext, PruneResult, register_prune
from methods.fastv import top_k_in_order

IGNORE = -2.0  # official IGNORE_TOKEN: the similarity of a token with no predecessor of its patch type

SIMILARITY = HyperParam("FRAMEFUSION_SIMILARITY_THRESHOLD", 0.6, float,
                        "a token merges into the same position of the previous frame when their cosine similarity is "
                        ">= this (official similarity_lower_bound, README 0.6; the paper tunes S_th per model)",
                        check=lambda t: None if math.isfinite(t) and t >= -1 else "must be a finite number >= -1")
COST_LAYERS = HyperParam("FRAMEFUSION_COST_LAYERS", 28, int,
                         "layers of the cost model that turns KEEP_RATIO (the official cost) into the merge cap and "
                         "the pruning ratio (official _compute_pruning_ratio(num_layers=28), never overridden)",
                         check=lambda n: None if n >= 2 else "must be >= 2")
QUERY_ROWS = HyperParam("FRAMEFUSION_QUERY_ROWS", 1, int,
                        "pruning: the last N prompt tokens whose attention (heads and rows averaged) scores the "
                        "visual tokens (official 1; its Qwen2-VL adapter uses 4)",
                        check=lambda n: None if n >= 1 else "must be >= 1")


def budget_sparsity(sparsities: list[float], cost: float, num_layers: int) -> float:
    """The official ``_compute_pruning_ratio``: the share of the current tokens the next step may remove so that the
    visual tokens averaged over ``num_layers`` layers come to ``cost``, after merging steps that removed the shares
    ``sparsities``. Where the official code raises ("The cost is too small"), 1 (remove everything)."""
    remaining, total = 1.0, 0.0
    for sparsity in sparsities:
        remaining *= 1 - sparsity
        total += remaining
    remain = num_layers * cost - total
    if remain < 0 or remaining <= 0:
        return 1.0
    share = remain / ((num_layers - len(sparsities)) * remaining)
    return 0.0 if share > 1 else 1 - share


def frame_similarity(frames: torch.Tensor) -> torch.Tensor:
    """[T, P] fp32 cosine similarity of every token to the same position of the previous frame (the official
    ``dot / (|a| |b|)``); IGNORE for the first frame and where a norm is zero (NaN)."""
    x = frames.float()
    norms = x.norm(dim=-1)
    similarity = torch.full(norms.shape, IGNORE, device=x.device)
    similarity[1:] = (x[1:] * x[:-1]).sum(dim=-1) / (norms[1:] * norms[:-1])
    return similarity.nan_to_num(nan=IGNORE)


def merge_choice(similarity: torch.Tensor, threshold: float, cost: float, num_layers: int) -> torch.Tensor:
    """[T, P] bool: the tokens the first merging step merges (official ``FrameFusion.forward``, merging branch)."""
    total = similarity.numel()
    similar = similarity >= threshold
    similar[0] = False  # the first frame has no predecessor (official: IGNORE, below any allowed threshold)
    cap = budget_sparsity([], cost, num_layers)
    if int(similar.sum()) / total < cap:
        return similar
    # At the cap: the int(cap N) most similar tokens, official topk over the tokens in patch order (position-major);
    # ties to the earlier one in that order.
    by_patch = similarity.T.flatten()
    chosen = torch.sort(by_patch, descending=True, stable=True).indices[:int(cap * total)]
    mask = torch.zeros(total, dtype=torch.bool, device=similarity.device)
    mask[chosen] = True
    return mask.view(similarity.T.shape).T


def merge_into_previous(frames: torch.Tensor, merged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every token of ``merged`` [T, P] into the last unmerged token of its position before it: that token
    becomes the plain mean of itself and the tokens merged into it. Returns (frame-major indices of the remaining
    tokens, ascending; their [K, D] fp32 features)."""
    t, p, d = frames.shape
    frame = torch.arange(t, device=frames.device).unsqueeze(1).expand(t, p)
    owner_frame = torch.where(merged, -1, frame).cummax(dim=0).values  # last unmerged frame <= f (frame 0 never merged)
    owner = (owner_frame * p + torch.arange(p, device=frames.device)).flatten()
    sums = torch.zeros(t * p, d, device=frames.device).index_add_(0, owner, frames.reshape(t * p, d).float())
    counts = torch.zeros(t * p, device=frames.device).index_add_(0, owner, torch.ones(t * p, device=frames.device))
    kept = torch.nonzero(~merged.flatten()).flatten()
    return kept, sums[kept] / counts[kept, None]


def temporal_merge(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """The first merging step on a whole video (complete frames), or nothing."""
    everything = torch.arange(ctx.num_tokens)
    video = ctx.video
    if ctx.modality != "video" or video is None or video.count < 2 or video.size is None:
        return everything  # an image, or a video a stage has already reduced: nothing to align by position
    frames = video.frame_tokens(ctx.features)
    similarity = frame_similarity(frames)
    merged = merge_choice(similarity, ctx.params["FRAMEFUSION_SIMILARITY_THRESHOLD"], ctx.ratio,
                          ctx.params["FRAMEFUSION_COST_LAYERS"])
    if not bool(merged.any()):
        return everything
    indices, features = merge_into_previous(frames, merged)
    return PruneResult(indices, features.to(ctx.features.dtype))


def pruning_keep(current: int, entered: int, cost: float, num_layers: int) -> int:
    """Tokens the pruning keeps of ``current`` when the span entered with ``entered`` (the documented count rule)."""
    merged = entered - current
    cap = budget_sparsity([], cost, num_layers)
    if cap <= 0 or (merged > 0 and merged >= int(cap * entered)):
        return current  # the merging reached its cap: FrameFusion ends without pruning
    share = budget_sparsity([merged / entered], cost, num_layers)
    return min(current, max(0, round(current * (1 - share))))


def importance_prune(ctx: PruneContext) -> torch.Tensor:
    """The pruning step: keep the visual tokens most attended by the last prompt token(s) at layer K-1."""
    n = ctx.num_tokens
    entered = max(n, math.prod(ctx.grid)) if ctx.grid is not None else n
    keep = pruning_keep(n, entered, ctx.ratio, ctx.params["FRAMEFUSION_COST_LAYERS"])
    if keep >= n:
        return torch.arange(n)
    rows = ctx.text_positions[-ctx.params["FRAMEFUSION_QUERY_ROWS"]:]
    scores = ctx.attention_to_span(rows).float().mean(dim=(0, 1))  # heads and query rows averaged -> [N]
    return top_k_in_order(scores, keep)


def framefusion_schedule(num_layers: int, keep_ratio: float) -> list[tuple[int, float]]:
    """Merge before layer 0, prune before layer 1 with layer 0's attention (the ratio is the cost, carried along)."""
    if num_layers < 2:
        raise ValueError(f"FrameFusion's two stages (layers 0 and 1) do not fit in a model with {num_layers} layer")
    return [(0, keep_ratio), (1, keep_ratio)]


@register_prune("framefusion_intra_llm", params=[SIMILARITY, COST_LAYERS, QUERY_ROWS],
                default_schedule=framefusion_schedule, video=True, exact_count=False)
def framefusion_intra_llm(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """FrameFusion: merge tokens into the same position of the previous frame (layer 0), then prune by attention."""
    if ctx.layer == 0:
        return temporal_merge(ctx)
    return importance_prune(ctx)


@register_prune("framefusion_pre_llm", params=[SIMILARITY, COST_LAYERS], video=True, exact_count=False)
def framefusion_pre_llm(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """FrameFusion's merging step alone: tokens similar to the previous frame's same position merge into it."""
    return temporal_merge(ctx)
