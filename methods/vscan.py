"""VScan ("VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models", Zhang et al.,
arXiv 2505.22654, TMLR 2026; official code Tencent/SelfEvolvingAgent, folder VScan/: README and scripts/; the Qwen2.5-VL
implementation in qwen/model/qwen2_5_vl_custom.py (``Qwen2_5_VisionTransformerPretrainedModel_X.forward``,
``Qwen2_5_VLForConditionalGeneration_X.forward``, ``Qwen2_5_VLModel_X.forward`` / ``layer_prune``) and
qwen/model/qwen2_5_vl_utils.py (``window_selection``, ``token_merging``). The stored copy of the official repository
holds only README and scripts; the two files were read in derived repositories that vendor them: ocy1/TRIO (the vision
forward and the selection block), ocy1/PIO-FVLM (``window_selection``, ``token_merging``), and two further copies whose
``layer_prune`` is the official PDrop-style one (the others replace it with their own variants).)

Two stages, two methods, combinable (``PRUNE_METHOD_PRE_LLM=vscan_pre_llm`` with
``PRUNE_METHOD_INTRA_LLM=vscan_intra_llm`` or ``INTRA_LLM_LAYER_SPECS=14:vscan_intra_llm:0.333``).

1. ``vscan_pre_llm``, the vision side (official: at the end of the Qwen encoder, on the merger's output), budget K:
   a. local scan: L = int(K * VSCAN_LOCAL_RATIO) tokens (official: K // 2) by the encoder attention of a *shallow*
      layer (Qwen2.5-VL: ``fullatt_block_indexes[0]`` = block 7, its first full-attention block), spread over
      non-overlapping windows of VSCAN_WINDOW x VSCAN_WINDOW LLM tokens (official 4: 8 x 8 patches, Qwen's own 112-px
      attention window): floor(h / 4) x floor(w / 4) windows, the last window row / column absorbing the h mod 4 /
      w mod 4 leftover rows / columns; every token is visited once in descending shallow score and taken while its
      window holds fewer than ceil(L / windows) taken tokens, until L are taken;
   b. global scan: the K - L tokens with the largest attention at the deep layer (Qwen2.5-VL: the last block, 31)
      among the tokens the local scan left (official: their deep scores set to 0, then ``topk``);
   c. merging: every dropped token joins the kept token of highest cosine similarity of the projected features (the
      merger output, what the LLM receives); a kept token becomes (itself + the tokens that joined it) / (1 + their
      count) (``token_merging`` with scaling 1: a plain mean). Exactly K tokens, positional order.
   Scores: the official Qwen score is the block's attention (softmax of q k^T / sqrt(d) with RoPE, per image) summed
   over heads, averaged over every query, averaged over the 2 x 2 merge group, un-permuted from window order. Here
   the toolkit's substitute ("attention received": mean over the image's queries and heads, summed over the merge
   group): the same numbers up to a positive factor per image, so the same ranking inside a span. On CLIP (LLaVA)
   the [CLS] row (the paper's global scan reads the output layer's [CLS] attention, the mean self-attention on
   encoders without a [CLS]: this substitute).
2. ``vscan_intra_llm``, the language side: before decoder layer K (official "after layer 14" of Qwen2.5-VL-7B's 28,
   ``layer_list [14]``; LLaVA-1.5 / NeXT "after layer 16" of 32, ``layer_list [16]``: the middle of the model), the
   last prompt token's attention to the span computed with layer K's *own* q/k projections (input norm of layer K,
   ``q_proj`` / ``k_proj``, GQA keys repeated), softmax in fp32 over every key, averaged over heads; keep the top
   tokens (official ``topk``, then sorted). Named alone it runs before layer ``round(16 * depth / 32)`` (14 of 28:
   exactly the Qwen setting, 16 of 32: the LLaVA setting).

Official defaults. Qwen2.5-VL (README, scripts/qwen2_5_vl/*.sh): ``--image-token-ratio 0.167`` (vision side, of the
encoder's tokens), ``--layer-list [14]``, ``--image-token-ratio-list [0.333]`` (of the tokens that entered the LLM:
``int(0.333 * current)``), i.e. on average 11.1 % over the 28 layers; RefCOCO: 0.6 then 0.67. LLaVA-1.5 / NeXT
(scripts/llava1_5, llava1_6): ``--visual_token_num 96``, ``--layer_list [16]``, ``--image_token_list [32]`` (64 on
average over 32 layers). Here both budgets follow the toolkit's keep-count rule: ``KEEP_RATIO`` for the pre-LLM
stage, the stage ratio (cumulative over the tokens entering the LLM, as the official ratio list) for the intra-LLM
one, e.g. ``KEEP_RATIO=0.167 PRUNE_METHOD_PRE_LLM=vscan_pre_llm INTRA_LLM_LAYER_SPECS=14:vscan_intra_llm:0.333``.

Hyper-parameters (pre-LLM):
  VSCAN_LOCAL_RATIO (0.5): share of the budget chosen by the local scan, L = int(K * ratio) (official K // 2).
  VSCAN_WINDOW (4): side of the local-scan windows in LLM tokens (official 4 on Qwen2.5-VL).
  VSCAN_LOCAL_LAYER ("auto"): 0-based encoder layer of the local scan. "auto": the first captured layer at or after
    depth // 4 - 1 (Qwen2.5-VL's 32 blocks: 7, the official ``fullatt_block_indexes[0]``; CLIP-L's 24: 5; Qwen3-VL's
    27: 5; Gemma 4's 16: 3); it captures every globally attending layer (on Qwen2.5-VL only its 4 full-attention
    blocks, elsewhere every layer: set a number to capture fewer). A number captures only that layer onwards and
    reads the first captured one at or after it. The global scan reads the deep layer: the last captured one (the
    last globally attending layer; on CLIP layer -2, LLaVA's feature layer).

What was adapted, and why:
  * Where it runs. Officially inside the Qwen vision tower's forward (scores returned with the merger output) and
    before the LLM; here the pre-LLM stage on the same merger output with the toolkit's captured encoder signals:
    the kept set and the merged features are the official ones up to the points below. Window blocks of Qwen2.5-VL
    are never read (neither officially: both official layers are full-attention blocks).
  * Per span. The official code scores and budgets every image of a prompt together (``int(ratio * all image
    tokens)``, windows from the first image's grid only, asserting one image, dropped tokens may merge into another
    image's kept token) and does not prune videos; here every span (image, video, frame) is reduced alone with the
    toolkit's keep-count rule (``int`` officially), video frames get their own windows.
  * Local windows: an axis shorter than the window gets one window (officially zero windows: a division by zero);
    if the per-window caps cannot supply L tokens (a very high local share on few windows: the official assertion
    fails) the rest is filled in descending shallow score. A span without a usable grid (``ctx.grid`` None or not N
    tokens: LLaVA-NeXT's base view + tiles) is one window: its local scan is a plain top-L.
  * LLaVA (CLIP with [CLS]): the official LLaVA file (llava/model/llava_arch.py ``encode_images``) is not in the
    stored sources, so its local layer and window could not be checked: the shallow layer defaults by relative depth
    (5 of 24, as 7 of Qwen's 32), the window to 4, the deep layer to -2 (the paper's output / penultimate layer).
  * Scores and similarities in fp32 (official: the model dtype); equal scores go to the lower index (stable sorts;
    official ``argsort`` / ``topk`` / ``argmax`` leave ties to the backend).
  * Intra-LLM: layer K's q/k are taken with the rotary embedding applied (the toolkit's attention signal is the
    layer's own attention); the official ``layer_prune`` leaves RoPE out (commented out) when it recomputes them.
    Image positions per span (officially one block from the first image token, which spans the text between
    images); kept tokens keep their original positions, as in the official code (position ids gathered).

Flash compatibility: yes (encoder attention recomputed from q/k in chunks; the LLM row from layer K's q/k).
"""

from __future__ import annotations

import math

import torch

from methods._base import HyperParam, PruneContext, PruneResult, VisionNeeds, register_prune
from methods._schedule import scale_layers
from methods.fastv import top_k_in_order

AUTO = "auto"
OFFICIAL_LAYERS, OFFICIAL_DEPTH = (16,), 32  # LLaVA-1.5 / NeXT; Qwen2.5-VL's 14 of 28 is the same place


def local_layer(text: str) -> str | int:
    """'auto' or a 0-based encoder layer."""
    value = text.strip().lower()
    return AUTO if value == AUTO else int(value)


LOCAL_RATIO = HyperParam("VSCAN_LOCAL_RATIO", 0.5, float,
                         "share of the budget chosen by the local (windowed, shallow-layer) scan: int(K * ratio); "
                         "the rest by the global (deep-layer) scan",
                         check=lambda r: None if 0.0 <= r <= 1.0 else "must be in [0, 1]")
WINDOW = HyperParam("VSCAN_WINDOW", 4, int, "side of the local-scan windows, in LLM tokens",
                    check=lambda w: None if w >= 1 else "must be >= 1")
LOCAL_LAYER = HyperParam("VSCAN_LOCAL_LAYER", AUTO, local_layer,
                         "0-based encoder layer of the local scan; 'auto': the first captured layer at or after "
                         "depth // 4 - 1 (Qwen2.5-VL: 7, the official first full-attention block)",
                         check=lambda v: None if v == AUTO or v >= 0 else "must be 'auto' or a layer >= 0")


def vision_needs(params) -> VisionNeeds:
    """Every globally attending layer from the local layer on ('auto': from layer 0); on CLIP the [CLS] rows from
    there to layer -2."""
    setting = params["VSCAN_LOCAL_LAYER"]
    if setting == AUTO:
        return VisionNeeds(first_layer=0, cls_layers=(0, -2))
    return VisionNeeds(first_layer=setting, cls_layers=(setting, -2), first_layer_var="VSCAN_LOCAL_LAYER")


def vscan_layers(ctx: PruneContext) -> tuple[int, int]:
    """(local layer, global layer) among the captured encoder layers."""
    captured = ctx.vision_layers()
    deep = captured[-1]
    setting = ctx.params["VSCAN_LOCAL_LAYER"]
    if setting == AUTO:
        depth = deep + 2 if ctx.vision_encoder_has_cls else deep + 1  # the captured range ends at layer -2 ([CLS]) or -1
        setting = max(0, depth // 4 - 1)
    later = [index for index in captured if index >= setting]
    if not later:
        raise RuntimeError(f"VSCAN_LOCAL_LAYER={setting}: no captured encoder layer at or after it "
                           f"(captured: {list(captured)})")
    return later[0], deep


def window_ids(n: int, grid: tuple[int, int, int] | None, window: int) -> tuple[torch.Tensor, int]:
    """(window of every raster token [n], number of windows). Per frame, floor(h / window) x floor(w / window)
    windows (at least 1 per axis), the leftover rows / columns in the last window row / column; no usable grid:
    one window."""
    if grid is None or math.prod(grid) != n:
        return torch.zeros(n, dtype=torch.long), 1
    t, h, w = grid
    rows, cols = max(1, h // window), max(1, w // window)
    index = torch.arange(n)
    frame, position = index // (h * w), index % (h * w)
    row = torch.clamp((position // w) // window, max=rows - 1)
    col = torch.clamp((position % w) // window, max=cols - 1)
    return (frame * rows + row) * cols + col, t * rows * cols


def local_scan(scores: torch.Tensor, count: int, grid: tuple[int, int, int] | None, window: int) -> torch.Tensor:
    """``count`` tokens, in the order taken: descending ``scores``, at most ceil(count / windows) per window (the
    official greedy ``window_selection``), topped up in descending score if the caps fall short."""
    n = scores.numel()
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    windows, num_windows = window_ids(n, grid, window)
    limit = math.ceil(count / num_windows)
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
    # Rank of each token inside its window, in the global order: the greedy takes a token while its window has
    # taken fewer than `limit`, i.e. exactly the tokens of rank < limit, in global order, until `count`.
    in_order = windows[order]
    ranks = torch.empty(n, dtype=torch.long)
    sorted_windows, by_window = torch.sort(in_order, stable=True)
    starts = torch.searchsorted(sorted_windows, sorted_windows, right=False)
    ranks[by_window] = torch.arange(n) - starts
    eligible = order[ranks < limit]
    taken = eligible[:count]
    if taken.numel() < count:  # caps too tight for the count: the rest by score
        rest = order[ranks >= limit]
        taken = torch.cat([taken, rest[:count - taken.numel()]])
    return taken.to(scores.device)


def global_scan(scores: torch.Tensor, count: int, taken: torch.Tensor) -> torch.Tensor:
    """The ``count`` tokens of largest ``scores`` that are not in ``taken`` (ties: lower index)."""
    free = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    free[taken] = False
    rest = torch.nonzero(free).flatten()
    order = torch.sort(scores[rest].float(), descending=True, stable=True).indices
    return rest[order[:count]]


def merge_into_nearest(features: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[K, D] fp32: each kept token averaged with the dropped tokens whose most cosine-similar kept token it is
    (first on ties), (kept + sum) / (1 + count); ``kept`` ascending."""
    values = features.float()
    mask = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    mask[kept] = True
    retained, dropped = values[kept], values[~mask]
    if dropped.shape[0] == 0:
        return retained
    unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)  # a zero vector stays 0
    nearest = (unit(dropped) @ unit(retained).T).argmax(dim=1)
    sums = retained.clone().index_add_(0, nearest, dropped)
    counts = torch.bincount(nearest, minlength=kept.numel()).to(values.dtype)
    return sums / (1 + counts).unsqueeze(1)


def vscan_select(local_scores: torch.Tensor, global_scores: torch.Tensor, keep: int, local_ratio: float,
                 grid: tuple[int, int, int] | None, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(local picks in the order taken, global picks in descending deep score): ``keep`` distinct tokens."""
    keep = max(0, min(keep, local_scores.numel()))
    local_count = min(keep, int(keep * local_ratio))
    local = local_scan(local_scores, local_count, grid, window)
    return local, global_scan(global_scores, keep - local_count, local)


@register_prune("vscan_pre_llm", params=[LOCAL_RATIO, WINDOW, LOCAL_LAYER], vision=vision_needs)
def vscan_pre_llm(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """VScan: local scan (windows, shallow encoder layer) + global scan (deep layer), the rest merged by similarity."""
    if ctx.keep >= ctx.num_tokens:
        return torch.arange(ctx.num_tokens, device=ctx.features.device)
    shallow, deep = vscan_layers(ctx)
    local, chosen = vscan_select(ctx.vision_attention_received(shallow), ctx.vision_attention_received(deep),
                                 ctx.keep, ctx.params["VSCAN_LOCAL_RATIO"], ctx.grid, ctx.params["VSCAN_WINDOW"])
    kept = torch.cat([local, chosen]).sort().values
    return PruneResult(kept, merge_into_nearest(ctx.features, kept).to(ctx.features.dtype))


def vscan_schedule(num_layers: int, keep_ratio: float) -> list[tuple[int, float]]:
    """One stage in the middle of the model: layer 16 of 32 (LLaVA), 14 of 28 (Qwen2.5-VL-7B), scaled."""
    return [(layer, keep_ratio) for layer in scale_layers(OFFICIAL_LAYERS, OFFICIAL_DEPTH, num_layers)]


@register_prune("vscan_intra_llm", default_schedule=vscan_schedule)
def vscan_intra_llm(ctx: PruneContext) -> torch.Tensor:
    """VScan: keep the visual tokens most attended by the last prompt token, with the middle layer K's own q/k."""
    scores = ctx.attention_to_span(layer=ctx.layer).mean(dim=0)[-1]  # heads averaged, last query row -> [N]
    return top_k_in_order(scores, ctx.keep)
