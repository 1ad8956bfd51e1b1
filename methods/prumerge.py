"""LLaVA-PruMerge ("LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models", Shang et
al., ICCV 2025; official code 42Shawn/LLaVA-PruMerge, ``token_prune_merge_advanced`` and ``outlier_dectection``
in llava/model/multimodal_encoder/clip_encoder.py). PruMerge+ is ``prumerge_plus_pre_llm``.

Rule:
  1. attention a_j: the [CLS] row of the last CLIP layer's attention over the patches;
  2. count (adaptive): the fraction of a above Q3 + 1.5 IQR (linear percentiles), keep int(N * fraction)
     tokens with the largest a;
  3. merge: every kept token i adds its k most similar other tokens (cosine of the layer's keys, among all
     tokens, kept or not), weighted by their attention: x_i + sum_j a_j x_j (weights not normalised);
  4. one extra token: sum of a_j x_j over the tokens not kept. No randomness.

Official defaults: adaptive count, k = 32 neighbours, attention and keys of the last CLIP layer (23),
features of the penultimate layer (LLaVA's ``select_layer=-2``).

Count rule (data-dependent, the record shows what was kept per span):
  * PRUMERGE_ADAPTIVE=1 (default, official): the outlier count above, at least 1, plus the extra token
    when some token is not kept; ``KEEP_RATIO`` is not used.
  * PRUMERGE_ADAPTIVE=0: exactly the toolkit's keep count K: K-1 tokens by attention plus the extra token.
    At K = N nothing is pruned and the tokens pass unchanged (the official code always prunes).

Hyper-parameters:
  PRUMERGE_ADAPTIVE (default 1): 1 = IQR outlier count (official), 0 = the keep-count rule.
  PRUMERGE_NEIGHBOURS (default 32): k, the neighbours merged into each kept token.

Signals (``ctx.vision_attention_received``, ``ctx.vision_keys``; see docs/methods.md, "Vision-encoder signals"):
  * On an encoder with a [CLS] token (CLIP in LLaVA-1.5 / LLaVA-NeXT, ``ctx.vision_has_cls``): the official
    signal. The [CLS] row of the last CLIP layer (23 of 24) as one "head" over the full width,
    softmax(q k^T / sqrt(C)) of the whole 1024-d ``q_proj`` / ``k_proj`` outputs (``cls_heads="single"``),
    and keys = that layer's ``k_proj`` output (all heads concatenated). The IQR rule then runs on the [CLS]
    probabilities, as in the official code.
  * Elsewhere (Qwen-VL, Gemma 4: no [CLS]): the substitute, the mean attention received at the encoder's
    last globally attending layer, model heads averaged; keys of that layer, all heads concatenated as the
    official full-width ``k_proj`` output. Qwen2.5-VL: its last full-attention block. The same code serves
    both signals (the official rule has nothing that depends on which one it reads).

Adaptations:
  * Merging uses the span's projected tokens (``ctx.features``); the official code merges CLIP features
    before the projector, which do not exist per LLM token in Qwen (2x2 merge) or Gemma 4 (3x3 pooling).
    On LLaVA they do (one CLIP patch per LLM token), but a method sees only the projector's output, and the
    projector (an MLP with GELU) does not commute with the weighted sums: merged tokens differ from the
    official ones there too (the selection does not).
  * Output order: positional, not attention rank. A kept token keeps its position; the extra token takes
    the position of the most attended token it summarises.
  * The adaptive count keeps at least one token (with no outlier the official code keeps only the extra one).

Flash compatibility: yes (attention recomputed from the encoder's own q/k in chunks).
"""

import torch

from methods._base import HyperParam, PruneContext, PruneResult, VisionNeeds, flag, register_prune


ADAPTIVE = HyperParam("PRUMERGE_ADAPTIVE", True, flag,
                      "1: keep the IQR outliers of the encoder attention (official, data-dependent count); "
                      "0: keep the toolkit's keep count")
NEIGHBOURS = HyperParam("PRUMERGE_NEIGHBOURS", 32, int, "neighbours (by key similarity) merged into each kept token",
                        check=lambda k: None if k >= 0 else "must be >= 0")


def outlier_fraction(attention: torch.Tensor) -> float:
    """Fraction of the scores above Q3 + 1.5 IQR (numpy's default linear percentiles)."""
    values = attention.double().flatten()
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=values.dtype, device=values.device))
    return int((values > q3 + 1.5 * (q3 - q1)).sum()) / values.numel()


def adaptive_count(attention: torch.Tensor) -> tuple[int, float]:
    """(tokens selected by attention, their fraction r): int(N * r) as the official code computes it, at
    least one token (r then counts as 1 / N)."""
    n = attention.numel()
    fraction = outlier_fraction(attention)
    return max(1, int(n * fraction)), max(fraction, 1 / n)


def by_attention(attention: torch.Tensor) -> torch.Tensor:
    """Token indices by decreasing attention, ties to the lower index."""
    return torch.sort(attention, descending=True, stable=True).indices


def merge_into_kept(attention: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, kept: torch.Tensor,
                    neighbours: int) -> PruneResult:
    """PruMerge's merge: each kept token plus its attention-weighted key neighbours, and one extra token for
    the tokens not kept (at the position of the most attended of them). ``keys`` are [N, C]."""
    n = features.shape[0]
    values, weights = features.float(), attention.float()
    kept = kept.to(features.device)
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    similarity = unit[kept] @ unit.T
    similarity[torch.arange(kept.numel(), device=features.device), kept] = float("-inf")  # not its own neighbour
    near = similarity.topk(min(neighbours, n - 1), dim=1).indices
    merged = values[kept] + (weights[near].unsqueeze(-1) * values[near]).sum(dim=1)
    left_out = torch.ones(n, dtype=torch.bool, device=features.device)
    left_out[kept] = False
    rest = torch.nonzero(left_out).flatten()
    if rest.numel():
        extra = (weights[rest].unsqueeze(-1) * values[rest]).sum(dim=0, keepdim=True)
        kept = torch.cat([kept, rest[weights[rest].argmax()].view(1)])
        merged = torch.cat([merged, extra])
    return PruneResult(kept, merged.to(features.dtype))


# The official signal on CLIP-L/336: the last layer's (-1 = 23) [CLS] row over the full width, keys of that layer.
OFFICIAL_SIGNALS = VisionNeeds(keys=True, cls_layers=(-1, -1), cls_heads="single")


@register_prune("prumerge_pre_llm", params=[ADAPTIVE, NEIGHBOURS], exact_count=False, vision=OFFICIAL_SIGNALS)
def prumerge_pre_llm(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """PruMerge: IQR-outlier tokens by encoder attention, each merged with its key neighbours, plus one token."""
    attention = ctx.vision_attention_received()
    if ctx.params["PRUMERGE_ADAPTIVE"]:
        selected, _ = adaptive_count(attention)
    elif ctx.keep >= ctx.num_tokens:
        return torch.arange(ctx.num_tokens)
    else:
        selected = ctx.keep - 1
    kept = by_attention(attention)[:selected]
    return merge_into_kept(attention, ctx.vision_keys().flatten(1), ctx.features, kept,
                           ctx.params["PRUMERGE_NEIGHBOURS"])
