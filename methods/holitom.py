"""HoliTom ("HoliTom: Holistic Token Merging for Fast Video Large Language Models", Shao et al., NeurIPS 2025; official
code cokeshao/HoliTom: holitom/llava_arch.py ``select_static_windows``, ``get_static_dynamic_features``, ``holitom``,
``merge_tokens_by_attention_density``, ``merge_tokens_by_density``, ``cluster_dpc_knn``,
``merge_tokens_by_clustering`` and the defaults read in ``prepare_inputs_labels_for_multimodal``;
holitom/modeling_qwen2.py ``Qwen2Model_holitom.forward``; the vision signal in
LLaVA-NeXT/llava/model/multimodal_encoder/siglip_encoder.py).

Two stages, two methods, combinable: ``PRUNE_METHOD_PRE_LLM=holitom_pre_llm PRUNE_METHOD_INTRA_LLM=holitom_intra_llm
KEEP_RATIO=0.1`` is the official full method ("HoliTom"; the pre-LLM stage alone is "HoliTom (w/o M)").

1. ``holitom_pre_llm`` (outer-LLM, one whole video per call; F frames of n = h * w tokens, budget ratio r):
   a. temporal segmentation: s[f, p] = cosine(token p of frame f, token p of frame f + 1); a token is static over
      frames [a, b] if s[f, p] > HOLITOM_T for every f in [a, b - 1]; a window [a, b] saves
      (static tokens) * (b - a) tokens. A dynamic programme over the frames (windows of at most
      HOLITOM_MAX_WINDOW_SIZE frames) picks the segmentation saving the most (``R`` tokens in all); on equal totals the
      last frame stays alone, else the shortest last window wins (strict ``>``, as the official loop);
   b. the ratio is rescaled for what the temporal step saves: r' = min(1, r / ((F n - R) / (F n)));
   c. per segment [a, b] with s static positions: the static tokens are averaged over the segment's frames, then
      DPC-kNN (k = min(HOLITOM_KNN, c) nearest neighbours, density exp(-mean d^2) plus a 1e-6 noise, centres the c
      largest distance-to-denser x density) picks c = round(s * r') centres; every other static token joins its
      nearest centre and a centre becomes HOLITOM_BETA * itself + (1 - HOLITOM_BETA) * mean(its members) (itself
      alone if none joined; with HOLITOM_NO_BETA the plain mean of itself and its members);
   d. per frame of the segment, the n - s dynamic tokens: ceil((n - s) * r') are kept, of which
      d = round(ceil((n - s) * r') * (1 - HOLITOM_D)) dominant tokens (largest vision-encoder attention received)
      and the rest contextual tokens: DPC-kNN centres among the frame's remaining dynamic tokens, merged as in c.
   Count (``exact_count=False``, decided by the method as officially): sum over segments of
   round(s * r') + (b - a + 1) * ceil((n - s) * r'), at least 1. About r * F * n; on an image (one frame, no
   temporal step) ceil(n * r); at KEEP_RATIO 1 every static position still becomes one token per segment. Indices are
   returned in positional order.
2. ``holitom_intra_llm`` (inner-LLM, before decoder layer HOLITOM_k = 3): the N visual tokens of the video are ranked
   by the attention of the last prompt token at layer k - 1 (heads averaged, as FastV); the top round(N (1 - r))
   stay (r = HOLITOM_R, official HOLITOM_r 0.5; at least 1); every other token, in position order, is merged into
   the kept token of highest cosine similarity of the hidden states entering layer k (similarities computed once,
   before merging): kept = (kept + other) / 2, sequentially, so a kept token that absorbs o_1 .. o_m (in position
   order) ends as kept / 2^m + sum_j o_j / 2^(m - j + 1). Kept tokens keep their positions.

Official defaults (``prepare_inputs_labels_for_multimodal``, ``Qwen2Model_holitom.forward``): RETAIN_RATIO 0.1, T 0.8,
BETA 0.6, D 0 (every kept dynamic token dominant), K 7, MAX_WINDOW_SIZE 1024, NO_BETA unset (Beta weighting),
HOLITOM_k 3, HOLITOM_r 0.5; the README's evaluation uses RETAIN_RATIO 0.15, T 0.80, HOLITOM_k 18, HOLITOM_r 0.5.

Hyper-parameters:
  KEEP_RATIO is RETAIN_RATIO (the pre-LLM stage's configured ratio, ``ctx.ratio``).
  HOLITOM_T (0.8): similarity threshold of a static token (official T).
  HOLITOM_BETA (0.6): weight of a cluster centre in its merged token (official BETA).
  HOLITOM_D (0.0): share of the dynamic budget given to merged contextual tokens (official D).
  HOLITOM_KNN (7): k of DPC-kNN's density, min(k, clusters) (official K).
  HOLITOM_MAX_WINDOW_SIZE (1024): longest temporal segment, in frames (official MAX_WINDOW_SIZE).
  HOLITOM_NO_BETA (false): merge a cluster by a plain mean of centre and members (official NO_BETA=1).
  HOLITOM_SEED (0): seed of DPC-kNN's tie-breaking noise (unseeded officially).
  HOLITOM_R (0.5): intra-LLM share of the video's tokens merged away at layer k (official HOLITOM_r); "stage" makes
    the stage keep the toolkit's keep-count rule on its own ratio instead (KEEP_RATIO, or the ratio of an
    ``INTRA_LLM_LAYER_SPECS`` entry), exactly. The layer (official HOLITOM_k) is set with ``INTRA_LLM_LAYER_SPECS``,
    e.g. ``18:holitom_intra_llm`` (the README's setting).

What was adapted, and why:
  * Frames are the model's temporal steps (Qwen2/2.5-VL: a temporal patch of two frames) and their tokens are the
    projector / merger output, as officially (LLaVA-OneVision's pooled, projected frame tokens). The vision signal
    is the attention received at the encoder's last globally attending layer, averaged over queries and heads
    (officially: SigLIP's last kept layer, ``attentions[-1].mean(1).mean(1)``, 2-D pooled like the features; here
    summed over each LLM token's patches: the same ranking within a frame); on CLIP (LLaVA-1.5 / NeXT) the same
    all-query average at layer -2, LLaVA's feature layer (``VisionNeeds(cls_heads="received")``).
  * Positions: a static (segment) token takes the position of its cluster centre in the segment's first frame, a
    contextual token its centre's, a dominant token its own; the official code concatenates the merged tokens
    (static first) with 1-D positions, without original positions.
  * Images (and every span of another model) are one-frame videos, pruned by the spatial step alone (officially
    only videos are reduced); a frame without a complete grid (LLaVA-NeXT's base view + tiles) is one frame of N
    tokens. If the frames are not complete grids (``ctx.video.size`` None) each frame is its own segment.
  * Contextual tokens (D > 0): the official code cannot run them (``pos.masked_select(mask.unsqueeze(-1))`` on a
    2-D position tensor broadcasts to 3-D and the ``view`` fails); implemented as intended: a contextual token
    takes its centre's position.
  * Count floors: at least one token per video and per intra-LLM stage (officially a tiny video could keep none).
  * Intra-LLM: per video or image span (officially the first image block of the prompt only); the attention row is
    recomputed from layer k - 1's query/key states (officially eager attention of layer k - 1); merging in fp32
    (officially in-place in the model dtype). Ties go to the lower index (stable sorts; official ``topk``).
  * DPC-kNN, similarities and means in fp32 (officially ``cdist`` in fp32, the rest in the model dtype); the
    density noise is seeded per span (``HOLITOM_SEED``).

Flash compatibility: yes (encoder attention recomputed from q/k in chunks; the LLM row from layer k - 1's q/k).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F

from methods._base import HyperParam, PruneContext, PruneResult, VisionNeeds, flag, register_prune

STAGE = "stage"


def merge_ratio(text: str) -> float | str:
    """'stage' or a share in [0, 1)."""
    value = text.strip().lower()
    return STAGE if value == STAGE else float(value)


THRESHOLD = HyperParam("HOLITOM_T", 0.8, float, "cosine similarity above which a token is static between two frames",
                       check=lambda t: None if -1.0 <= t <= 1.0 else "must be in [-1, 1]")
BETA = HyperParam("HOLITOM_BETA", 0.6, float, "weight of a cluster centre in its merged token",
                  check=lambda b: None if 0.0 <= b <= 1.0 else "must be in [0, 1]")
CONTEXTUAL = HyperParam("HOLITOM_D", 0.0, float, "share of a frame's dynamic budget given to merged contextual tokens",
                        check=lambda d: None if 0.0 <= d <= 1.0 else "must be in [0, 1]")
KNN = HyperParam("HOLITOM_KNN", 7, int, "k nearest neighbours of DPC-kNN's density (min(k, clusters))",
                 check=lambda k: None if k >= 1 else "must be >= 1")
MAX_WINDOW = HyperParam("HOLITOM_MAX_WINDOW_SIZE", 1024, int, "longest temporal segment, in frames",
                        check=lambda w: None if w >= 1 else "must be >= 1")
NO_BETA = HyperParam("HOLITOM_NO_BETA", False, flag, "merge a cluster by the plain mean of its centre and members")
SEED = HyperParam("HOLITOM_SEED", 0, int, "seed of DPC-kNN's density tie-breaking noise (unseeded officially)")
MERGED_SHARE = HyperParam("HOLITOM_R", 0.5, merge_ratio,
                          "intra-LLM share of the video's tokens merged away (keep round(N (1 - r))); 'stage': keep "
                          "the keep-count rule on the stage's ratio instead",
                          check=lambda r: None if r == STAGE or 0.0 <= r < 1.0 else "must be 'stage' or in [0, 1)")


# ------------------------------------------------------------------------------------------------------
# Temporal segmentation
# ------------------------------------------------------------------------------------------------------
def static_windows(similar: torch.Tensor, max_window: int) -> tuple[list[tuple[int, int]], int]:
    """The segmentation of F frames maximising the saved tokens, and that total.

    ``similar`` [F - 1, n] bool: token p is similar between frames f and f + 1. A window [a, b] saves
    (tokens similar across all of it) * (b - a). Returns inclusive (first, last) frame pairs in order.
    """
    frames = similar.shape[0] + 1
    saved = [[0] * frames for _ in range(frames)]  # saved[a][b], b > a
    for a in range(frames - 1):
        run = torch.cumprod(similar[a:].to(torch.int64), dim=0).sum(dim=1).tolist()  # static over [a, a + 1 + i]
        for i, count in enumerate(run):
            saved[a][a + 1 + i] = count * (i + 1)
    best, start = [0] * frames, [0] * frames
    for i in range(frames):
        value, first = (best[i - 1] if i > 0 else 0), i
        for window in range(2, min(i + 1, max_window) + 1):
            j = i - window
            candidate = (best[j] if j >= 0 else 0) + saved[j + 1][i]
            if candidate > value:
                value, first = candidate, j + 1
        best[i], start[i] = value, first
    segments, i = [], frames - 1
    while i >= 0:
        segments.append((start[i], i))
        i = start[i] - 1
    return segments[::-1], best[-1]


# ------------------------------------------------------------------------------------------------------
# DPC-kNN clustering and merging
# ------------------------------------------------------------------------------------------------------
def dpc_knn_centres(x: torch.Tensor, clusters: int, k: int, generator: torch.Generator):
    """(centre indices ascending, distance matrix) of DPC-kNN over ``x`` [m, D] fp32, as ``cluster_dpc_knn``."""
    distance = torch.cdist(x, x) / x.shape[1] ** 0.5
    nearest = torch.topk(distance, k, dim=1, largest=False).values
    density = (-(nearest ** 2).mean(dim=1)).exp()
    density = density + torch.rand(density.shape, generator=generator).to(density.device) * 1e-6
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    parent = torch.where(denser, distance, distance.max()).amin(dim=1)
    centres = torch.topk(parent * density, clusters).indices
    return centres.sort().values, distance


def cluster_merge(x: torch.Tensor, centres: torch.Tensor, distance: torch.Tensor, beta: float,
                  no_beta: bool) -> torch.Tensor:
    """[c, D]: every non-centre row of ``x`` joins its nearest centre (first on ties); a centre with members becomes
    beta * centre + (1 - beta) * mean(members) (no_beta: mean of centre and members), else stays itself."""
    others = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    others[centres] = False
    others = torch.nonzero(others).flatten()
    merged = x[centres].clone()
    if others.numel() == 0:
        return merged
    assigned = distance[others][:, centres].argmin(dim=1)
    counts = torch.bincount(assigned, minlength=centres.numel()).to(x.dtype)
    sums = torch.zeros_like(merged).index_add_(0, assigned, x[others])
    has = counts > 0
    if no_beta:
        merged[has] = (merged[has] + sums[has]) / (counts[has, None] + 1)
    else:
        merged[has] = beta * merged[has] + (1 - beta) * sums[has] / counts[has, None]
    return merged


def cluster(x: torch.Tensor, clusters: int, params, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre rows of ``x``, merged tokens) of ``clusters`` DPC-kNN clusters (none if ``clusters`` is 0)."""
    if clusters <= 0 or x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device), x[:0]
    clusters = min(clusters, x.shape[0])
    centres, distance = dpc_knn_centres(x, clusters, min(params["HOLITOM_KNN"], clusters), generator)
    return centres, cluster_merge(x, centres, distance, params["HOLITOM_BETA"], params["HOLITOM_NO_BETA"])


# ------------------------------------------------------------------------------------------------------
# Spatial step of one segment's dynamic tokens
# ------------------------------------------------------------------------------------------------------
def dynamic_tokens(x: torch.Tensor, attention: torch.Tensor, rows: torch.Tensor, ratio: float, params, generator):
    """Kept (indices, features) of the dynamic tokens ``rows`` [W, L] (global indices, one frame a row, positions
    ascending): per frame ceil(L r) tokens, the dominant ones by attention, the rest DPC-kNN contextual tokens."""
    frames, length = rows.shape
    budget = math.ceil(length * ratio)
    dominant = round(budget * (1 - params["HOLITOM_D"]))
    contextual = budget - dominant
    order = torch.sort(attention[rows], dim=1, descending=True, stable=True).indices
    indices = [rows.gather(1, order[:, :dominant]).flatten()]
    features = [x[indices[0]]]
    if contextual > 0:
        for f in range(frames):
            rest = rows[f, order[f, dominant:].sort().values]
            centres, merged = cluster(x[rest], contextual, params, generator)
            indices.append(rest[centres])
            features.append(merged)
    return torch.cat(indices), torch.cat(features)


# ------------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------------
@register_prune("holitom_pre_llm", params=[THRESHOLD, BETA, CONTEXTUAL, KNN, MAX_WINDOW, NO_BETA, SEED], video=True,
                exact_count=False, vision=VisionNeeds(cls_layers=(-2, -2), cls_heads="received"))
def holitom_pre_llm(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """HoliTom: temporal segments of static tokens merged, dominant tokens by encoder attention, DPC-kNN merging."""
    params, n_all = ctx.params, ctx.num_tokens
    # The stage's ratio (RETAIN_RATIO); a hand-made context without one: keep / N, exactly (no float ceil error).
    ratio = ctx.ratio if ctx.ratio is not None else Fraction(ctx.keep, n_all)
    x = ctx.features.float()
    attention = ctx.vision_attention_received().float()
    generator = ctx.generator(params["HOLITOM_SEED"])
    video = ctx.video
    frames = video.count if video is not None else 1
    indices, features, merged_any = [], [], False

    if frames > 1 and video.size is not None:
        n = video.size[0] * video.size[1]
        grid = x.reshape(frames, n, -1)
        unit = F.normalize(grid, dim=-1)
        similarity = F.cosine_similarity(unit[:-1], unit[1:], dim=-1)  # [F - 1, n]
        similar = similarity > params["HOLITOM_T"]
        segments, reduced = static_windows(similar.cpu(), params["HOLITOM_MAX_WINDOW_SIZE"])
        total = frames * n
        ratio = min(ratio / ((total - reduced) / total), 1)
        positions = torch.arange(n, device=x.device)
        for a, b in segments:
            static = similar[a:b].all(dim=0) if b > a else torch.zeros(n, dtype=torch.bool, device=x.device)
            if bool(static.any()):
                merged_any = True
                static_rows = positions[static]
                means = grid[a:b + 1, static_rows].mean(dim=0)
                centres, merged = cluster(means, round(static_rows.numel() * ratio), params, generator)
                indices.append(a * n + static_rows[centres])
                features.append(merged)
            dynamic_rows = positions[~static]
            if dynamic_rows.numel():
                rows = torch.arange(a, b + 1, device=x.device)[:, None] * n + dynamic_rows[None, :]
                kept, kept_features = dynamic_tokens(x, attention, rows, ratio, params, generator)
                indices.append(kept)
                features.append(kept_features)
    else:  # an image, or frames that are not complete grids: every frame its own segment, spatial step only
        frame_of = (video.frame.to(x.device) if video is not None
                    else torch.zeros(n_all, dtype=torch.long, device=x.device))
        for f in range(frames):
            rows = torch.nonzero(frame_of == f).flatten()[None, :]
            if rows.numel():
                kept, kept_features = dynamic_tokens(x, attention, rows, min(ratio, 1), params, generator)
                indices.append(kept)
                features.append(kept_features)

    kept = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=x.device)
    if kept.numel() == 0:  # floor of one token: the most attended one
        return torch.sort(attention, descending=True, stable=True).indices[:1]
    order = kept.argsort()
    if not (merged_any or params["HOLITOM_D"] > 0):
        return kept[order]
    return PruneResult(kept[order], torch.cat(features)[order].to(ctx.features.dtype))


@register_prune("holitom_intra_llm", params=[MERGED_SHARE], default_layer=3, min_layer=1, video=True,
                exact_count=False)
def holitom_intra_llm(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """HoliTom inner-LLM merging: FastV top tokens at layer k-1, the rest merged into the most similar kept token."""
    n, share = ctx.num_tokens, ctx.params["HOLITOM_R"]
    keep = ctx.keep if share == STAGE else min(n, max(1, round(n * (1 - share))))
    if keep >= n:
        return torch.arange(n)
    scores = ctx.attention_to_span().mean(dim=0)[-1].float()  # heads averaged, last prompt token -> [N]
    order = torch.sort(scores, descending=True, stable=True).indices
    kept, others = order[:keep].sort().values, order[keep:].sort().values
    x = ctx.features.float()
    unit = x / x.norm(dim=-1, keepdim=True)
    target = (unit[others] @ unit[kept].T).argmax(dim=1)  # into kept, first on ties
    # Sequential halving in position order: the j-th (0-based) of m members of a kept token weighs 2^-(m - j),
    # the kept token itself 2^-m.
    by_target = torch.sort(target, stable=True).indices  # members grouped by target, in position order
    grouped = target[by_target]
    counts = torch.bincount(target, minlength=keep)
    rank = torch.arange(grouped.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[grouped]
    weights = torch.exp2(-(counts[grouped] - rank).to(x.dtype))
    merged = x[kept] * torch.exp2(-counts.to(x.dtype))[:, None]
    merged.index_add_(0, grouped, x[others[by_target]] * weights[:, None])
    return PruneResult(kept, merged.to(ctx.features.dtype))
