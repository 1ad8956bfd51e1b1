"""FastVID ("FastVID: Dynamic Density Pruning for Fast Video Large Language Models", Shen et al., 2025; official code
LunarShen/FastVID, the Qwen2.5-VL version: ``Qwen2_5_VLForConditionalGeneration.forward`` and the last vision block's
frame attention in fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py, defaults in
fastvid_qwen25vl/scripts/eval.sh and lmms_eval/models/qwen2_5_vl.py).

A video method: one call sees a whole video, T frames (a frame is what the model encodes as one temporal step).

Rule:
  1. DySeg (dynamic temporal segmentation). Every frame's global feature is the mean of its tokens, L2-normalised;
     the transition similarity of frames i and i+1 is their cosine. The video is cut after the c - 1 lowest
     transitions and after every transition below tau; the cuts split it into segments of consecutive frames.
  2. Per segment, a budget of B tokens: C = max(int(B * d), 1) context (density) tokens and S = B - C salient ones.
     * A one-frame segment: S salient tokens and C anchors in that frame.
     * Longer segments are split again wherever a transition is below ``ignore`` (0.95); only the LAST frame of each
       such sub-segment is "valid" (the frames before it are near-duplicates of it: they give no salient token and
       no anchor, their tokens are only merged). S is split evenly over the V valid frames (the first S mod V get
       one more); C is split evenly over ceil(V / p) anchor frames (the first C mod ceil(V/p) chunks get one more),
       which are the valid frames V-1, V-1-p, V-1-2p, ... (counted from the segment's end, chunk 0 to the last
       valid frame). Caps, per frame of n tokens: an anchor frame's anchors <= n // 2 and its salient tokens
       <= n - anchors; another valid frame's salient tokens <= n.
  3. Salient tokens of a frame: its top tokens by the vision encoder's attention (``ctx.vision_attention_received``).
  4. Anchors (density tokens) of an anchor frame: DPC-kNN over that frame's non-salient tokens: distances
     cdist / sqrt(D), density exp(-mean of the squared distances to the 4 nearest (self included)) plus uniform noise
     * 1e-6, delta = distance to the nearest denser token (the largest distance of the matrix for the densest);
     the tokens of largest density * delta, in index order.
  5. Merging, per anchor frame: every token of the segment that is neither salient nor one of THIS frame's anchors
     (other anchor frames' anchors included, as officially) goes to its most cosine-similar anchor (argmax, first on
     ties); an anchor with m tokens becomes w * anchor + (1 - w) * mean(its tokens), w = max(1 / (m + 1), beta)
     (an anchor with none stays as it is). Salient tokens are kept unchanged; a merged anchor keeps its position.

Defaults (official Qwen2.5-VL ``eval.sh`` and the ``Qwen2_5_VL`` model arguments):
  FASTVID_DYSEG_C 8 (``fastvid_DySeg_c``), FASTVID_DYSEG_TAU 0.84 (``fastvid_DySeg_tau``; the LLaVA-OneVision script
  uses 0.9), FASTVID_DYSEG_IGNORE 0.95 (``fastvid_DySeg_ignore``), FASTVID_STPRUNE_D 0.4 (``fastvid_STPrune_d``),
  FASTVID_DTM_P 4 (``fastvid_DTM_p``), FASTVID_DTM_BETA 0.6 (``fastvid_DTM_beta``); the official retention ratio 0.27
  (``fastvid_retention_ratio``) is KEEP_RATIO here. The 4 nearest neighbours of the density are hard-coded officially.
  FASTVID_SEED (0) seeds the official 1e-6 density noise (``torch.rand`` there) through ``ctx.generator``.

Count (exact: ``ctx.keep`` = keep_count(N, KEEP_RATIO) tokens per video). Officially every segment of L frames gets
B = int(h * w * ratio) * L and keeps B minus what the caps of step 2 cut off; here the video's ``ctx.keep`` is shared
by the segments in proportion to their tokens (B_s = floor(K * end_s / N) - floor(K * start_s / N), start_s / end_s
the segment's first / past-the-end token; the official B when K = T * int(h * w * ratio)), and whatever the caps cut
off is filled with the segment's highest-attention tokens that are neither salient nor anchors (kept unchanged, as
extra salient tokens, so not merged; ties to the lower index). A segment whose share is 0 (possible when K < T) keeps
nothing (the official code fails on a zero budget: no salient token to concatenate). An image is a video of one frame: one segment, no temporal step (steps 2-5 on
its tokens, as the official one-frame segment). KEEP_RATIO 1.0 keeps every token unchanged.

Adaptations:
  * Salient score: on the Qwen-VL encoders the official Qwen2.5-VL score itself (``VisionNeeds(mean_query=True)``:
    softmax over the frame's tokens of the frame's mean query . each token's 2x2-mean key, both rotated, at the
    last globally attending block -- Qwen2.5-VL's last block, as officially -- heads averaged; Qwen2-VL and
    Qwen3-VL read it the same way); the [CLS] row of CLIP layer -2 (LLaVA's feature layer) on LLaVA-1.5 / NeXT;
    the attention received elsewhere (Gemma 4, SigLIP, InternViT: the toolkit's per-token signal, the frame's
    mean query is not captured there).
  * Exact count (above): the official caps make the kept count fall below the budget (and ratio 1.0 would merge).
  * Fewer than c frames: every transition is cut (the official ``topk(c - 1)`` would fail). Ties (lowest transitions,
    attention, density score) go to the lower index (stable sorts; ``topk`` order is unspecified). Frames may have
    different token counts (each frame's own n in the caps), the official code assumes one grid.
  * Merging is computed in fp32 and cast back to the features' dtype (the official code uses bf16).

Flash compatibility: yes (a pre-LLM method; the attention signal is recomputed from the encoder's own q/k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods._base import HyperParam, PruneContext, PruneResult, VisionNeeds, register_prune


def _in_unit(name: str):
    return lambda v: None if 0.0 <= v <= 1.0 else f"{name} must be in [0, 1]"


DYSEG_C = HyperParam("FASTVID_DYSEG_C", 8, int, "DySeg: cut after the c - 1 lowest frame transitions (at least)",
                     check=lambda v: None if v >= 1 else "must be >= 1")
DYSEG_TAU = HyperParam("FASTVID_DYSEG_TAU", 0.84, float,
                       "DySeg: also cut after every transition (cosine of adjacent frame means) below tau")
DYSEG_IGNORE = HyperParam("FASTVID_DYSEG_IGNORE", 0.95, float,
                          "inside a segment, a frame whose transition to the next is >= this gives no salient token "
                          "nor anchor (only its sub-segment's last frame does)")
STPRUNE_D = HyperParam("FASTVID_STPRUNE_D", 0.4, float, "share of a segment's budget taken by density anchors",
                       check=_in_unit("d"))
DTM_P = HyperParam("FASTVID_DTM_P", 4, int, "every p-th valid frame of a segment (from its end) is an anchor frame",
                   check=lambda v: None if v >= 1 else "must be >= 1")
DTM_BETA = HyperParam("FASTVID_DTM_BETA", 0.6, float, "least weight of an anchor in its merge, max(1/(m+1), beta)",
                      check=_in_unit("beta"))
SEED = HyperParam("FASTVID_SEED", 0, int, "seed of the 1e-6 noise added to the density (official tie-breaker)")

DENSITY_NEIGHBOURS = 4  # official: topk(dist_matrix, k=4) (the token itself included)
DENSITY_NOISE = 1e-6


def _frame_similarities(unit: torch.Tensor) -> torch.Tensor:
    """[T - 1] cosine of adjacent frames' L2-normalised global features ``unit`` [T, D]."""
    return (unit[:-1] * unit[1:]).sum(dim=1)


def _split(num: int, cuts: list[int]) -> list[int]:
    """Lengths of the pieces of ``num`` frames cut after each (sorted, unique) frame in ``cuts``."""
    bounds = [-1] + cuts + [num - 1]
    return [b - a for a, b in zip(bounds, bounds[1:]) if b > a]


def dyseg(unit: torch.Tensor, c: int, tau: float) -> list[int]:
    """DySeg: segment lengths of the T frames whose normalised global features are ``unit`` [T, D]."""
    frames = unit.shape[0]
    if frames <= 1:
        return [frames]
    sims = _frame_similarities(unit)
    lowest = torch.sort(sims, stable=True).indices[:c - 1]  # official: topk(sims, c - 1, largest=False)
    below = torch.nonzero(sims < tau).flatten()
    cuts = torch.unique(torch.cat([lowest, below])).tolist()
    return _split(frames, cuts)


def valid_frames(unit: torch.Tensor, ignore: float) -> list[int]:
    """Inside one segment: the last frame of every run of frames whose transitions are >= ``ignore``."""
    frames = unit.shape[0]
    cuts = torch.nonzero(_frame_similarities(unit) < ignore).flatten().tolist() if frames > 1 else []
    return sorted(set(cuts) | {frames - 1})


def segment_plan(budget: int, frame_sizes: list[int], valid: list[int], d: float,
                 p: int) -> tuple[list[int], list[int]]:
    """(salient, anchors) per frame of one segment, as the official code counts them (before any top-up)."""
    context = max(int(budget * d), 1)
    salient = budget - context
    frames = len(frame_sizes)
    sal, ctx = [0] * frames, [0] * frames
    if frames == 1:  # official: no sub-segments, no caps
        return [max(salient, 0)], [context]
    v = len(valid)
    per_valid = [salient // v + (1 if i < salient % v else 0) for i in range(v)]
    chunks = -(-v // p)
    per_chunk = [context // chunks + (1 if j < context % chunks else 0) for j in range(chunks)]
    ctx_valid = [0] * v
    for j in range(chunks):  # official: chunk j goes to valid position p * j, then the list is reversed
        pos = v - 1 - p * j
        ctx_valid[pos] = min(per_chunk[j], frame_sizes[valid[pos]] // 2)
    for i, f in enumerate(valid):
        n = frame_sizes[f]
        ctx[f] = min(ctx_valid[i], n // 2)
        sal[f] = min(per_valid[i], n - ctx[f])
    return sal, ctx


def density_peaks(x: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """DPC-kNN centres: positions (ascending) of the ``num`` rows of ``x`` [n, D] with the largest density * delta."""
    n, dim = x.shape
    x = x.float()
    dist = torch.cdist(x, x) / dim ** 0.5
    nearest = torch.topk(dist, k=min(DENSITY_NEIGHBOURS, n), dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(n, generator=generator).to(density.device) * DENSITY_NOISE
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    score = delta * density
    return torch.sort(score, descending=True, stable=True).indices[:num].sort().values


def merge_into_anchors(values: torch.Tensor, unit: torch.Tensor, anchors: torch.Tensor, others: torch.Tensor,
                       beta: float) -> torch.Tensor:
    """Official context merge: each of ``others`` joins its most similar anchor; [len(anchors), D] merged anchors."""
    if others.numel() == 0:
        return values[anchors]
    assigned = (unit[others] @ unit[anchors].T).argmax(dim=1)  # first on ties
    counts = torch.bincount(assigned, minlength=anchors.numel()).to(values.dtype).unsqueeze(1)
    sums = torch.zeros(anchors.numel(), values.shape[1], dtype=values.dtype, device=values.device)
    sums.index_add_(0, assigned, values[others])
    weight = (1 / (counts + 1)).clamp(min=beta)
    return weight * values[anchors] + (1 - weight) * sums / counts.clamp(min=1)


def fastvid_select(features: torch.Tensor, frame: torch.Tensor, attention: torch.Tensor, keep: int,
                   params: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, fp32 features) of the ``keep`` tokens FastVID keeps of one frame-major video."""
    device = features.device
    values = features.float()
    n_total = values.shape[0]
    frame = frame.to(device)
    attention = attention.float().to(device)
    sizes = torch.bincount(frame).tolist()
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    frames = len(sizes)
    global_unit = torch.stack([values[starts[f]:starts[f + 1]].mean(dim=0) for f in range(frames)])
    global_unit = F.normalize(global_unit, dim=1)  # official: x / x.norm() (the same unless a norm is < 1e-12)
    unit = F.normalize(values, dim=1)

    kept_idx, kept_val = [], []
    first = 0
    for length in dyseg(global_unit, params["FASTVID_DYSEG_C"], params["FASTVID_DYSEG_TAU"]):
        seg_frames = list(range(first, first + length))
        first += length
        lo, hi = starts[seg_frames[0]], starts[seg_frames[-1] + 1]
        budget = keep * hi // n_total - keep * lo // n_total
        if budget == 0:
            continue
        frame_sizes = [sizes[f] for f in seg_frames]
        valid = valid_frames(global_unit[seg_frames[0]:seg_frames[-1] + 1], params["FASTVID_DYSEG_IGNORE"])
        sal, ctx = segment_plan(budget, frame_sizes, valid, params["FASTVID_STPRUNE_D"], params["FASTVID_DTM_P"])
        salient, anchors = [], []
        for i, f in enumerate(seg_frames):
            tokens = torch.arange(starts[f], starts[f + 1], device=device)
            order = torch.sort(attention[tokens], descending=True, stable=True).indices
            top = tokens[order[:sal[i]]]
            salient.append(top)
            if ctx[i] > 0:
                rest = tokens[torch.sort(order[sal[i]:]).values]
                anchors.append(rest[density_peaks(values[rest], ctx[i], generator)])
        salient = torch.cat(salient)
        chosen = torch.zeros(hi - lo, dtype=torch.bool, device=device)
        chosen[salient - lo] = True
        for group in anchors:
            chosen[group - lo] = True
        shortfall = budget - int(chosen.sum())
        if shortfall > 0:  # adaptation: what the official caps cut off, by attention (extra salient tokens)
            free = torch.nonzero(~chosen).flatten() + lo
            extra = free[torch.sort(attention[free], descending=True, stable=True).indices[:shortfall]]
            salient = torch.cat([salient, extra])
        is_salient = torch.zeros(hi - lo, dtype=torch.bool, device=device)
        is_salient[salient - lo] = True
        kept_idx.append(salient)
        kept_val.append(values[salient])
        for group in anchors:
            skip = is_salient.clone()
            skip[group - lo] = True
            others = torch.nonzero(~skip).flatten() + lo
            kept_idx.append(group)
            kept_val.append(merge_into_anchors(values, unit, group, others, params["FASTVID_DTM_BETA"]))
    return torch.cat(kept_idx), torch.cat(kept_val)


# The official signal is the last vision block's mean query (Qwen2.5-VL); LLaVA's CLIP: its feature layer -2.
@register_prune("fastvid_pre_llm", params=[DYSEG_C, DYSEG_TAU, DYSEG_IGNORE, STPRUNE_D, DTM_P, DTM_BETA, SEED],
                vision=VisionNeeds(cls_layers=(-2, -2), mean_query=True), video=True)
def fastvid_pre_llm(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """FastVID: DySeg temporal segments, then salient (encoder attention) + density anchors with merging per segment."""
    n = ctx.num_tokens
    if ctx.keep >= n:
        return torch.arange(n, device=ctx.features.device)
    # A context built without ``video`` (outside the hooks) is taken as an image: one frame.
    frame = ctx.video.frame if ctx.video is not None else torch.zeros(n, dtype=torch.long)
    indices, values = fastvid_select(ctx.features, frame, ctx.vision_attention_received(), ctx.keep,
                                     dict(ctx.params), ctx.generator(ctx.params["FASTVID_SEED"]))
    return PruneResult(indices, values.to(ctx.features.dtype))
