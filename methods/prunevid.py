"""PruneVid ("PruneVid: Visual Token Pruning for Efficient Video Large Language Models", Huang, Zhou and Han, arXiv
2412.16117, ACL 2025; official code Visual-AI/PruneVid, PLLaVA port: models/pllava/modeling_pllava.py
``merge_frames_dynamic``, ``cluster_dpc_knn``, ``refine_clusters``, ``segment_lengths``, ``spatial_merge_tokens``,
``compute_cluster_vectors``; models/pllava/llama.py ``LlamaModelVTP.forward`` and ``LlamaAttention.forward``; the
selection ``VTPWindowCache`` of models/pllava/elastic_cache.py, shipped only as bytecode and read in two copies of
it (duykhang2103/Mate models/pllava/elastic_cache.py and a standalone copy) that agree; defaults in scripts/eval.sh
and the README).

Two stages, two methods, usable alone or together (``PRUNE_METHOD_PRE_LLM=prunevid_pre_llm
PRUNE_METHOD_INTRA_LLM=prunevid_intra_llm``). The official setting is cluster ratio 0.5 before the LLM and
alpha 0.4 inside it: ``KEEP_RATIO=0.5 PRUNE_METHOD_PRE_LLM=prunevid_pre_llm
INTRA_LLM_LAYER_SPECS=11:prunevid_intra_llm:0.4``.

1. ``prunevid_pre_llm`` (one whole video per call; T frames of P = h * w tokens; r = the stage's KEEP_RATIO, the
   official ``cluster_ratio``):
   a. temporal segments: the frames' mean tokens are clustered by DPC-kNN (k = min(PRUNEVID_KNN, T) nearest
      neighbours, distances ``cdist / sqrt(C)``, density exp(-mean d^2) plus a 1e-6 noise, distance to the nearest
      denser frame (the largest distance for the densest), the c = max(1, int(T * PRUNEVID_TEMPORAL_SEGMENT_RATIO))
      largest distance x density are the centres, every frame joins its nearest centre); the clusters are made
      contiguous as ``refine_clusters`` does: per cluster only its longest runs survive (every run of a cluster
      whose runs all have length 1 is dissolved), each dissolved run, left to right, joins the neighbouring run
      that is longer (the left one on a tie; cluster 0 without neighbours); each run of equal labels is a segment;
   b. static tokens of a segment of W > 1 frames: position p is static if the mean cosine similarity of its
      tokens over the W (W - 1) ordered pairs of frames, ``(sum over all pairs - W) / (W (W - 1))``, is above
      PRUNEVID_TAU (strict ``>``); a one-frame segment has none (officially 0 / 0 = NaN, never above);
   c. the S static tokens are averaged over the segment's frames; each frame's P - S dynamic tokens stay per frame;
   d. spatial merging: every group of more than 14 tokens (the segment's static tokens; one frame's dynamic
      tokens) is clustered by DPC-kNN into max(1, int(n * r)) clusters, each cluster becoming the plain mean of
      its tokens (``compute_cluster_vectors``); a group of at most 14 tokens is left as it is.
   Count (``exact_count=False``, decided by the method as officially): per segment, S' + W * D' where S' is S if
   S <= 14 else max(1, int(S r)), and D' the same of P - S; at KEEP_RATIO 1 every static token still becomes one
   per segment (and nothing else changes). On an image (one frame) only step d runs on its tokens.
2. ``prunevid_intra_llm`` (before decoder layer 11, i.e. after the official ``selected_layer`` 10 with that
   layer's attention; a = the stage's ratio, the official ``alpha``): every visual token is scored by the
   largest attention probability it receives from any text token after the video (the question and the
   chat-template suffix), over every head (``max(dim=heads).max(dim=queries)``) at layer K - 1. Per group, the
   int(n_g * a) best tokens are kept (Python ``int``, as officially; ties to the lower index): the groups are the
   pre-LLM stage's (each segment's static tokens; each frame's dynamic tokens of each segment) when
   ``prunevid_pre_llm`` ran on this video, else one group per frame (an image: one group; frames unknown, e.g.
   after another method's pre-LLM stage on Qwen2.5-VL: the whole video). Count (``exact_count=False``): the sum
   of int(n_g * a) over the groups of the tokens the stage receives (as the only intra-LLM stage, the official
   use, those that entered the language model; after another intra-LLM stage, what that one kept); KEEP_RATIO 1
   keeps everything. No text after the video: nothing scores it, every token is kept (the official code assumes
   a question after the video).

Hyper-parameters (official defaults from scripts/eval.sh and the PLLaVA port):
  KEEP_RATIO: pre-LLM the official ``cluster_ratio`` (0.5), intra-LLM the official ``alpha`` (0.4).
  PRUNEVID_TAU (0.8): static-token threshold (``--tau 0.8``).
  PRUNEVID_TEMPORAL_SEGMENT_RATIO (0.25): share of the frames that are cluster centres
    (``--temporal_segment_ratio 0.25``).
  PRUNEVID_KNN (7): k of DPC-kNN's density, temporal and spatial (hard-coded ``k=7``).
  PRUNEVID_SEED (0): seed of DPC-kNN's density noise (unseeded officially).
  Layer: official ``--selected_layer 10`` (pruning after layer 10, which is before layer 11 here); named alone the
  intra stage runs before layer 11, or, in a model of at most 11 layers, at the same relative depth
  (round(11 * depth / 32), at least 1); ``INTRA_LLM_LAYER_SPECS`` places it elsewhere (VCG-Bench used 5, i.e. 6).

What was adapted, and why:
  * Frames are the model's temporal steps (Qwen2/2.5-VL: a temporal patch of two frames) and their tokens the
    merger / projector output (officially PLLaVA's 16 pooled 12 x 12 frames); any number of frames: the segment
    cluster count and k are floored at 1 and capped at T. Images (and frames without a common grid) skip the
    temporal part; an image with tiles is one frame of all its tokens.
  * Positions (this toolkit keeps original positions; the official sequence is rebuilt and numbered 0..n): a
    static token (merged or not) takes the position of its spatial position (its cluster centre's) in the
    segment's first frame, where the official order puts the static tokens (before the segment's dynamic ones); a
    merged dynamic token takes its cluster centre's position; others keep their own.
  * Attention: the toolkit's attention of layer K - 1 (rotary positions applied, causal mask, fp32, recomputed from
    q/k). The official code reads ``attn_weights_wo_pos``: softmax(q k^T / sqrt(d)) of the query/key states BEFORE
    the rotary embedding and without the causal mask (every key in the denominator); the contract exposes no
    pre-rotary query/key states.
  * KV cache: officially the caches of layers 0..10 are re-indexed to the selected tokens too; here (as for every
    intra-LLM method of this toolkit) layers >= K hold only the kept tokens and earlier layers the full prompt.
  * Groups across stages: ``prunevid_pre_llm`` returns each token's group (``PruneResult.groups``: the segment's
    static tokens, each frame's dynamic ones), which ``prunevid_intra_llm`` reads as ``ctx.groups`` in the same
    prefill (also after another stage in between); without the pre-LLM stage its groups are the frames.
  * Similarities, clustering and means in fp32 (officially cosine and means in the model dtype, cdist in fp32),
    cast back to the features' dtype. A cluster count below 1 (tiny ratios) is raised to 1. One video per call,
    any batch (officially batch 1, one video per prompt).
No randomness beyond the seeded density noise. Cost: DPC-kNN's distance matrix, O(n^2 C) per group (a frame's
tokens; a whole image's, tiles included), and O(W^2 P C) per segment for the static test. Flash compatibility: yes
(the attention rows are recomputed from q/k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods._base import HyperParam, PruneContext, PruneResult, register_prune
from methods._schedule import scale_layers

TAU = HyperParam("PRUNEVID_TAU", 0.8, float, "mean pairwise cosine similarity above which a token is static in "
                 "a segment", check=lambda t: None if -1.0 <= t <= 1.0 else "must be in [-1, 1]")
SEGMENT_RATIO = HyperParam("PRUNEVID_TEMPORAL_SEGMENT_RATIO", 0.25, float,
                           "share of the T frames that are DPC-kNN cluster centres: max(1, int(T * ratio)) clusters",
                           check=lambda r: None if 0.0 < r <= 1.0 else "must be in (0, 1]")
KNN = HyperParam("PRUNEVID_KNN", 7, int, "k nearest neighbours of DPC-kNN's density (temporal and spatial)",
                 check=lambda k: None if k >= 1 else "must be >= 1")
SEED = HyperParam("PRUNEVID_SEED", 0, int, "seed of DPC-kNN's density tie-breaking noise (unseeded officially)")

MERGE_ABOVE = 14  # official: only groups of more than 14 tokens are clustered (``if ....shape[1] > 14``)
OFFICIAL_LAYER, OFFICIAL_DEPTH = 11, 32  # after layer 10 of PLLaVA-7B's 32 (``--selected_layer 10``)


# ------------------------------------------------------------------------------------------------------
# DPC-kNN (``cluster_dpc_knn``) and cluster means (``compute_cluster_vectors``)
# ------------------------------------------------------------------------------------------------------
def dpc_knn(x: torch.Tensor, clusters: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN over the rows of ``x`` [n, C]: (cluster of each row [n] in 0..clusters-1, centre row of each cluster
    [clusters], in the official order: descending score). Every centre is in its own cluster."""
    n, c = x.shape
    x = x.float()
    distance = torch.cdist(x, x) / c ** 0.5
    nearest = torch.topk(distance, min(k, n), dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(n, generator=generator).to(density.device) * 1e-6
    denser = density[None, :] > density[:, None]  # [i, j]: row j is denser than row i
    parent = torch.where(denser, distance, distance.max()).min(dim=-1).values
    centres = torch.topk(parent * density, clusters).indices
    assigned = distance[centres].argmin(dim=0)  # nearest centre (the first in centre order on ties)
    assigned[centres] = torch.arange(clusters, device=x.device)
    return assigned, centres


def merge_group(x: torch.Tensor, ratio: float, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``spatial_merge_tokens`` of one group [n, C] fp32 if it has more than 14 tokens: (rows of ``x`` naming each
    output token -- its cluster centre --, output tokens fp32). Smaller groups, and a cluster count >= n (every token
    its own cluster), come back unchanged."""
    n = x.shape[0]
    clusters = max(1, int(n * ratio))
    if n <= MERGE_ABOVE or clusters >= n:
        return torch.arange(n, device=x.device), x
    assigned, centres = dpc_knn(x, clusters, k, generator)
    sums = torch.zeros(clusters, x.shape[1], device=x.device).index_add_(0, assigned, x)
    counts = torch.bincount(assigned, minlength=clusters).to(x.dtype)
    return centres, sums / counts[:, None]


# ------------------------------------------------------------------------------------------------------
# Temporal segments (``refine_clusters``, ``segment_lengths``) and static tokens
# ------------------------------------------------------------------------------------------------------
def refine_clusters(labels: list[int]) -> list[int]:
    """Frame labels made contiguous as the official ``refine_clusters``: each cluster keeps only its longest runs
    (all its runs are dissolved if the longest has length 1); each dissolved run, scanning left to right, takes the
    label of the longer neighbouring run (left on a tie, 0 without neighbours)."""
    n = len(labels)
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for i in range(1, n + 1):
        if i == n or labels[i] != labels[start]:
            runs.setdefault(labels[start], []).append((start, i))
            start = i
    refined = list(labels)
    for spans in runs.values():
        longest = max(end - begin for begin, end in spans)
        for begin, end in spans:
            if longest == 1 or end - begin != longest:
                refined[begin:end] = [-1] * (end - begin)
    i = 0
    while i < n:
        if refined[i] != -1:
            i += 1
            continue
        begin = i
        while i < n and refined[i] == -1:
            i += 1
        left = right = None
        left_length = right_length = 0
        if begin > 0:
            left, j = refined[begin - 1], begin - 1
            while j >= 0 and refined[j] == left:
                j -= 1
            left_length = begin - 1 - j
        if i < n:
            right, j = refined[i], i
            while j < n and refined[j] == right:
                j += 1
            right_length = j - i
        if left_length > right_length:
            label = left
        elif right_length > left_length:
            label = right
        else:
            label = left if left is not None else right
        refined[begin:i] = [0 if label is None else label] * (i - begin)
    return refined


def run_lengths(labels: list[int]) -> list[int]:
    """Lengths of the runs of equal consecutive labels (``segment_lengths``)."""
    lengths = [1]
    for previous, label in zip(labels, labels[1:]):
        if label == previous:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


def segments(frames: torch.Tensor, ratio: float, k: int, generator: torch.Generator) -> list[int]:
    """Frames per temporal segment, in order, of ``frames`` [T, P, C] (DPC-kNN on the frames' mean tokens)."""
    count = frames.shape[0]
    if count == 1:
        return [1]
    clusters = max(1, int(count * ratio))
    labels, _ = dpc_knn(frames.float().mean(dim=1), clusters, k, generator)
    return run_lengths(refine_clusters(labels.tolist()))


def static_positions(window: torch.Tensor, tau: float) -> torch.Tensor:
    """[P] bool: positions whose mean pairwise cosine similarity over the frames of ``window`` [W, P, C] is above
    ``tau`` (the official ``(sum over every pair - W) / (W (W - 1))``); none for one frame."""
    frames = window.shape[0]
    if frames < 2:
        return torch.zeros(window.shape[1], dtype=torch.bool, device=window.device)
    unit = F.normalize(window.float(), dim=-1)
    similarity = torch.einsum("wpc,tpc->wtp", unit, unit)
    return (similarity.sum(dim=1) - 1).sum(dim=0) / (frames * (frames - 1)) > tau


# ------------------------------------------------------------------------------------------------------
# Pre-LLM stage
# ------------------------------------------------------------------------------------------------------
def frame_rows(ctx: PruneContext) -> list[torch.Tensor]:
    """Span-local rows of each frame, in raster order: one frame for an image (tiles included) or a one-frame
    video, else the frames of ``ctx.video`` (a frame's rows in order)."""
    n = ctx.num_tokens
    if ctx.modality == "image" or ctx.video is None or ctx.video.count <= 1:
        return [torch.arange(n)]
    frame = ctx.video.frame.cpu()
    return [torch.nonzero(frame == f).flatten() for f in range(ctx.video.count) if bool((frame == f).any())]


def spatio_temporal_merge(features: torch.Tensor, frames: list[torch.Tensor], ratio: float, tau: float,
                          segment_ratio: float, k: int, generator: torch.Generator):
    """``merge_frames_dynamic`` on one video: (representative rows [K], tokens [K, C] fp32, group of each [K],
    whether any token changed), in the official order (per segment: static tokens, then each frame's dynamic)."""
    device = features.device
    equal = len({rows.numel() for rows in frames}) == 1
    if len(frames) > 1 and equal:
        lengths = segments(features[torch.stack(frames).to(device)], segment_ratio, k, generator)
    else:
        lengths = [1] * len(frames)  # no temporal part (one frame, or frames without a common grid)
    rows_out, tokens_out, groups = [], [], []
    changed, first = False, 0
    for length in lengths:
        window_rows = frames[first:first + length]
        first += length
        if length > 1:
            window = features[torch.stack(window_rows).to(device)].float()  # [W, P, C]
            static = static_positions(window, tau)
        else:
            static = torch.zeros(window_rows[0].numel(), dtype=torch.bool, device=device)
        if bool(static.any()):
            where = torch.nonzero(static).flatten()
            centres, merged = merge_group(window[:, where].mean(dim=0), ratio, k, generator)
            rows_out.append(window_rows[0].to(device)[where[centres]])  # the segment's first frame
            tokens_out.append(merged)
            groups.append(torch.full((centres.numel(),), len(groups), dtype=torch.long))
            changed = True
        dynamic = torch.nonzero(~static).flatten()
        for rows in window_rows:
            rows = rows.to(device)[dynamic]
            if rows.numel() == 0:
                continue
            centres, merged = merge_group(features[rows].float(), ratio, k, generator)
            changed = changed or centres.numel() < rows.numel()
            rows_out.append(rows[centres])
            tokens_out.append(merged)
            groups.append(torch.full((centres.numel(),), len(groups), dtype=torch.long))
    return torch.cat(rows_out), torch.cat(tokens_out), torch.cat(groups), changed


@register_prune("prunevid_pre_llm", params=[TAU, SEGMENT_RATIO, KNN, SEED], video=True, exact_count=False)
def prunevid_pre_llm(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """PruneVid: temporal segments, static tokens averaged per segment, DPC-kNN spatial merging (ratio KEEP_RATIO)."""
    params = ctx.params
    generator = ctx.generator(params["PRUNEVID_SEED"])
    rows, tokens, groups, changed = spatio_temporal_merge(
        ctx.features, frame_rows(ctx), ctx.ratio, params["PRUNEVID_TAU"], params["PRUNEVID_TEMPORAL_SEGMENT_RATIO"],
        params["PRUNEVID_KNN"], generator)
    order = rows.argsort().to(rows.device)
    rows, tokens, groups = rows[order], tokens[order].to(ctx.features.dtype), groups[order.cpu()]
    return PruneResult(rows, tokens if changed else None, groups=groups)


# ------------------------------------------------------------------------------------------------------
# Intra-LLM stage
# ------------------------------------------------------------------------------------------------------
def prunevid_schedule(num_layers: int, keep_ratio: float) -> list[tuple[int, float]]:
    """One stage before layer 11 (after the official layer 10); in a model of at most 11 layers, at the same
    relative depth of PLLaVA-7B's 32 (raises ValueError if that does not fit)."""
    if OFFICIAL_LAYER < num_layers:
        return [(OFFICIAL_LAYER, keep_ratio)]
    return [(scale_layers([OFFICIAL_LAYER], OFFICIAL_DEPTH, num_layers, min_layer=1)[0], keep_ratio)]


def token_groups(ctx: PruneContext) -> torch.Tensor:
    """[N] group of each visual token: the pre-LLM stage's, else the frame (one group for an image)."""
    if ctx.groups is not None and bool((ctx.groups >= 0).all()):
        return ctx.groups
    if ctx.modality == "image" or ctx.video is None:
        return torch.zeros(ctx.num_tokens, dtype=torch.long)
    return ctx.video.frame.cpu()


def received_attention(ctx: PruneContext, rows: torch.Tensor) -> torch.Tensor:
    """[N] the largest attention probability each visual token gets from ``rows``, over every head, at layer K-1."""
    score = None
    for probs in ctx.attention_to_span_blocks(rows):  # [H, b, N]
        peak = probs.float().amax(dim=(0, 1))
        score = peak if score is None else torch.maximum(score, peak)
    return score


def select_per_group(score: torch.Tensor, groups: torch.Tensor, alpha: float) -> torch.Tensor:
    """Ascending indices of the int(n_g * alpha) highest-scoring tokens of every group (ties to the lower index)."""
    score, groups = score.cpu(), groups.cpu()
    kept = []
    for group in torch.unique(groups).tolist():
        members = torch.nonzero(groups == group).flatten()
        count = int(members.numel() * alpha)
        order = torch.sort(score[members], descending=True, stable=True).indices
        kept.append(members[order[:count]])
    return torch.cat(kept).sort().values


@register_prune("prunevid_intra_llm", default_schedule=prunevid_schedule, min_layer=1, video=True, exact_count=False)
def prunevid_intra_llm(ctx: PruneContext) -> torch.Tensor:
    """PruneVid: keep int(n * ratio) tokens per static / frame group by the question's peak attention at layer K-1."""
    rows = ctx.text_after_span()
    if rows.numel() == 0:
        return torch.arange(ctx.num_tokens)
    return select_per_group(received_attention(ctx, rows), token_groups(ctx), ctx.ratio)
