"""MustDrop, Multi-Stage Vision Token Dropping (Liu et al., arXiv 2411.10803; official code liuting20/MustDrop:
``llava/model/multimodal_encoder/local_merge.py`` (``conditional_pooling``, ``merge_wavg``),
``llava/model/multimodal_encoder/clip_encoder.py`` (``CLIPVisionModelAcc.custom_forward``),
``llava/model/language_model/modelling_sparse_llama.py`` (``LlamaDynamicvitModel.forward``,
``dual_attention_filter``), budgets in ``scripts/v1_5/eval/textvqa_{192,128,64}.sh``).

Its three stages, as two methods (combine them: ``PRUNE_METHOD_VIT=mustdrop_vit`` and
``PRUNE_METHOD_INTRA_LLM=mustdrop_intra_llm``, or use either alone); the third, the decode-time cache policy, is
part of ``mustdrop_intra_llm``:

``mustdrop_vit`` -- local spatial merge, before encoder block 1 (official: on the output of CLIP layer 0).
  The hidden states of the patches (the residual stream leaving block 0, exactly the tensor the official
  ``conditional_pooling`` receives; [CLS] excluded) are tiled into non-overlapping 3x3 windows of the raster
  grid, windows in raster order. A window's score is the mean cosine similarity of its 9 patches over the 72
  ordered pairs i != j (self-pairs excluded). Every window whose score is ``>= MUSTDROP_MERGE_THRESHOLD``
  (official 0.8; ``torch.ge``) becomes ONE token: the size-weighted average of its patches (``merge_wavg``:
  sum of size x feature over sum of sizes; sizes start at 1, so a plain mean), whose size is the sum of the
  nine sizes. Other patches pass unchanged. No proportional attention (the official later blocks ignore the
  sizes).

``mustdrop_intra_llm`` -- dual-attention filter, official after decoder layers 2, 6, 10, 14 of LLaVA-1.5's 32,
  i.e. here before layers 3, 7, 11, 15 (``round(K x depth / 32)``, pushed up to stay distinct and >= 1), reading
  the attention of the layer just run (K-1), as the official code reads ``layer_outputs[1]`` of the pruning
  layer itself. With A the attention probabilities (fp32, mean over heads) from the text tokens after the span
  (the question and the chat-template suffix: the official ``text_seq``) to the span's current visual tokens:
  ``global(j) = sum_t A[t, j]``, ``individual(j) = max_t A[t, j]``; token j is DROPPED iff
  ``global(j) < MUSTDROP_GLOBAL_THR * sum_j global(j)`` AND ``individual(j) < MUSTDROP_INDIVIDUAL_THR``
  (both strict, as ``candidate_mask``). Survivors keep their original order. No text after the span (the
  official code assumes some; its max over zero rows would fail): nothing scores the span, every token is kept.
  Official budgets (global_thr, individual_thr): ~192 tokens (0.001, 0.001) -- the defaults here --,
  ~128 (0.0012, 0.001), ~64 (0.011, 0.01) (TextVQA scripts; VizWiz-64 uses (0.005, 0.001)). The argparse
  defaults (1.0, 0.0) drop nothing.
  Decode stage (``MUSTDROP_REINDEX_CACHE`` = 1, official; ``LlamaDynamicvitModel.forward``, "Sparse kv cache"):
  after the prefill, the caches of the layers from the one before the first stage to the one before the last
  (official 2-14 of 32; layers before keep everything, later ones already hold the final set) are cut to the last
  stage's survivors, so every decode step reads only those tokens there. With ``INTRA_LLM_LAYER_SPECS`` the
  stages are the listed ones (whatever their methods) when the last is ``mustdrop_intra_llm``. A KV method
  (``KV_METHOD``) is refused with it (both would rewrite those caches); ``MUSTDROP_REINDEX_CACHE=0`` keeps each
  layer's cache as it entered it. Sliding-window layers keep their window.

Count rule (``exact_count=False`` for both): the thresholds decide the count; **KEEP_RATIO is ignored**, as for
the other threshold-decided methods of this toolkit (PruMerge's adaptive count, VTW). The toolkit still asks for
a ratio when a method is named; ``KEEP_RATIO=1`` does *not* disable MustDrop. The ViT stage keeps
``N - 8 x (windows merged)`` tokens; each intra-LLM stage keeps the tokens the filter spares (possibly none). The
per-forward record holds the counts actually kept. Named alone, ``mustdrop_intra_llm`` runs its own four stages
with the ratio carried along unused; in ``INTRA_LLM_LAYER_SPECS`` each entry is one stage (its ratio unused).

Adaptations and deviations:
  * Merged token's position: its window's CENTRE patch (row 1, column 1 of the 3x3 window). The official order
    puts the merged tokens first, by descending window score, then the unmerged patches in raster order, and
    LLaVA's positions are then compacted. Inside CLIP the order has no effect (its only positional signal is
    added before block 0), but in the language model it does, and this toolkit keeps original positions for
    every method: the centre is the patch nearest the window's centroid, so the merged token sits where the
    region it summarises is, and rotary 2-D positions (Qwen-VL) stay on the grid. The official ``dst`` (the
    window's bottom-right patch) only names a slot in its buffer, not a position.
  * Grid sides not divisible by 3 (e.g. dynamic resolutions): the official code asserts a square grid divisible by
    3. Here the windows tile the top-left ``3 floor(h/3) x 3 floor(w/3)`` part; the last ``h mod 3`` rows and
    ``w mod 3`` columns are never merged (a partial window would need another score definition). A grid of
    ``t > 1`` frames is tiled frame by frame.
  * Similarity and merge are computed in fp32 (official: the encoder's dtype, fp16 in LLaVA); the merged token
    is cast back to the features' dtype. Cosine similarity clamps each norm at 1e-8 (``F.cosine_similarity``).
  * Batch: one image at a time. The official ``conditional_pooling`` merges, in a batch, only the top
    ``min over the batch`` windows of every image; LLaVA's evaluation runs batch 1, which this reproduces.
  * Requires the full patch grid (``ctx.grid``); after an earlier ViT stage has merged tokens there is none, and
    it raises.
  * **Key set omitted (known deviation).** The official code keeps, at every LLM stage, the top
    ``ceil(0.08 (N - 1))`` tokens by the [CLS] attention of CLIP layer 23 (heads averaged) -- a set that is
    never dropped. That is a ViT signal an intra-LLM method cannot read in this toolkit, so the filter here can
    drop those tokens too (and can drop every token of a span, which the key set prevents officially).
  * Positions are not compacted (original ones kept), in the prefill as in the re-indexed caches.
  * Attention is recomputed per block of text rows from layer K-1's query/key states (no L x L matrix,
    any attention implementation); the official code materialises it through its own SDPA path.
No randomness.
"""

import math

import torch

from methods._base import HyperParam, PruneContext, PruneResult, register_prune
from methods._schedule import scale_layers

WINDOW = 3  # official (3, 3), hard-coded in clip_encoder.py

MERGE_THRESHOLD = HyperParam("MUSTDROP_MERGE_THRESHOLD", 0.8, float,
                             "ViT stage: a 3x3 window is merged when its mean pairwise cosine similarity is >= this "
                             "(official 0.8; above 1 nothing merges)",
                             check=lambda t: None if math.isfinite(t) else "must be a finite number")
GLOBAL_THR = HyperParam("MUSTDROP_GLOBAL_THR", 0.001, float,
                        "intra-LLM: drop a token whose summed text attention is below this fraction of the span's "
                        "total (and whose peak is below MUSTDROP_INDIVIDUAL_THR); official 0.001 / 0.0012 / 0.011 "
                        "for ~192 / 128 / 64 tokens",
                        check=lambda t: None if math.isfinite(t) and t >= 0 else "must be a finite number >= 0")
INDIVIDUAL_THR = HyperParam("MUSTDROP_INDIVIDUAL_THR", 0.001, float,
                            "intra-LLM: drop a token whose largest attention from one text token is below this "
                            "(and whose summed attention is below MUSTDROP_GLOBAL_THR of the total); official "
                            "0.001 / 0.001 / 0.01 for ~192 / 128 / 64 tokens",
                            check=lambda t: None if math.isfinite(t) and t >= 0 else "must be a finite number >= 0")
REINDEX_CACHE = HyperParam("MUSTDROP_REINDEX_CACHE", 1, int,
                           "decode stage: after the prefill, cut the caches of the layers between the first and the "
                           "last intra-LLM stage to the last stage's survivors (official: 1; 0 keeps each layer's own)",
                           check=lambda v: None if v in (0, 1) else "must be 0 or 1")

# Official pruning after layers 2, 6, 10, 14 (``pruning_layers``) = before layers 3, 7, 11, 15 of 32.
OFFICIAL_LAYERS, OFFICIAL_DEPTH = (3, 7, 11, 15), 32


# ---------------------------------------------------------------- ViT stage: local spatial merge
def window_indices(grid: tuple[int, int, int], window: int = WINDOW, device=None) -> torch.Tensor:
    """[W, window^2] raster indices of the patches of every full window (frames, then window rows, then
    columns; inside a window, raster order). Rows / columns beyond the last full window are left out."""
    t, h, w = grid
    gh, gw = h // window, w // window
    rows = torch.arange(gh * window, device=device).view(gh, 1, window, 1)
    cols = torch.arange(gw * window, device=device).view(1, gw, 1, window)
    tiles = (rows * w + cols).reshape(gh * gw, window * window)
    frames = torch.arange(t, device=device).view(t, 1, 1) * (h * w)
    return (tiles.unsqueeze(0) + frames).reshape(-1, window * window)


def window_scores(features: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """[W] mean cosine similarity of each window's patches over its ordered pairs i != j (fp32)."""
    x = features.float()[windows]  # [W, n, C]
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    sims = unit @ unit.transpose(1, 2)  # [W, n, n]
    n = windows.shape[1]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=sims.device)
    return (sims * off_diagonal).sum(dim=(1, 2)) / (n * (n - 1))


def local_merge(features: torch.Tensor, sizes: torch.Tensor, grid: tuple[int, int, int], threshold: float):
    """MustDrop's local spatial merge of one image. Returns (indices, features, sizes) of the tokens that remain:
    unmerged patches and one token per merged window at its centre patch, in raster order."""
    n = features.shape[0]
    windows = window_indices(grid, device=features.device)
    merged = windows[window_scores(features, windows) >= threshold] if windows.numel() else windows
    out_features, out_sizes = features.clone(), sizes.clone()
    keep = torch.ones(n, dtype=torch.bool, device=features.device)
    if merged.numel():
        weight = sizes.float()[merged]  # [M, 9]
        total = weight.sum(dim=1)
        mean = (features.float()[merged] * weight.unsqueeze(-1)).sum(dim=1) / total.unsqueeze(-1)
        centre = merged[:, merged.shape[1] // 2]  # row 1, column 1 of a 3x3 window
        keep[merged.flatten()] = False
        keep[centre] = True
        out_features[centre] = mean.to(features.dtype)
        out_sizes[centre] = total.to(sizes.dtype)
    indices = torch.nonzero(keep).flatten()
    return indices, out_features[indices], out_sizes[indices]


@register_prune("mustdrop_vit", params=[MERGE_THRESHOLD], default_layer=1, exact_count=False)
def mustdrop_vit(ctx: PruneContext) -> PruneResult:
    """MustDrop ViT stage: each 3x3 patch window of mean cosine >= threshold becomes one token (ratio ignored)."""
    if ctx.grid is None:
        raise RuntimeError("mustdrop_vit needs the full patch grid (ctx.grid), which is gone once an earlier ViT "
                           "stage has merged tokens or when the encoder's grid is unknown; allowed: mustdrop_vit as "
                           "the first ViT stage of an encoder whose patch grid is known")
    t, h, w = ctx.grid
    if t * h * w != ctx.num_tokens:
        raise ValueError(f"mustdrop_vit: grid {tuple(ctx.grid)} has {t * h * w} patches but the span has "
                         f"{ctx.num_tokens} tokens")
    sizes = ctx.sizes if ctx.sizes is not None else torch.ones(ctx.num_tokens, device=ctx.features.device)
    indices, features, sizes = local_merge(ctx.features, sizes, ctx.grid, ctx.params["MUSTDROP_MERGE_THRESHOLD"])
    return PruneResult(indices=indices, features=features, sizes=sizes)


# ---------------------------------------------------------------- Intra-LLM stages: dual-attention filter
def mustdrop_schedule(num_layers: int, keep_ratio: float) -> list[tuple[int, float]]:
    """The official four stages scaled to the model's depth; the ratio is carried along, unused."""
    return [(layer, keep_ratio) for layer in scale_layers(OFFICIAL_LAYERS, OFFICIAL_DEPTH, num_layers, min_layer=1)]


def dual_filter(global_score: torch.Tensor, individual: torch.Tensor, global_thr: float,
                individual_thr: float) -> torch.Tensor:
    """Indices (ascending) of the tokens NOT dropped: dropped iff both scores fall below their thresholds."""
    dropped = (global_score < global_score.sum() * global_thr) & (individual < individual_thr)
    return torch.nonzero(~dropped).flatten()


@register_prune("mustdrop_intra_llm", params=[GLOBAL_THR, INDIVIDUAL_THR, REINDEX_CACHE],
                default_schedule=mustdrop_schedule, min_layer=1, exact_count=False,
                reindex_cache=lambda params: params["MUSTDROP_REINDEX_CACHE"] == 1)
def mustdrop_intra_llm(ctx: PruneContext) -> torch.Tensor:
    """MustDrop: drop tokens with low summed AND low peak text attention at layer K-1 (ratio ignored)."""
    rows = ctx.text_after_span()
    if rows.numel() == 0:  # nothing after the span attends to it: no signal, nothing dropped (as officially)
        return torch.arange(ctx.num_tokens)
    global_score = individual = None
    for probs in ctx.attention_to_span_blocks(rows):  # layer K-1: the layer just run
        block = probs.float().mean(dim=0)  # heads averaged -> [b, N]
        block_sum, block_max = block.sum(dim=0), block.amax(dim=0)
        global_score = block_sum if global_score is None else global_score + block_sum
        individual = block_max if individual is None else torch.maximum(individual, block_max)
    return dual_filter(global_score, individual, ctx.params["MUSTDROP_GLOBAL_THR"],
                       ctx.params["MUSTDROP_INDIVIDUAL_THR"])
