"""VisionZip ("VisionZip: Longer is Better but Not Necessary in Vision Language Models", Yang et al., CVPR
2025; official code dvlab-research/VisionZip, ``CLIPVisionTower_VisionZip.forward`` in visionzip/clip_encoder.py,
the key "metric" in visionzip/utils.py, budgets in visionzip/main.py).

Rule, for D dominant and C contextual tokens:
  1. dominant: the D tokens with the largest [CLS] attention of the feature layer (summed over heads: the
     same ranking as the mean), in positional order;
  2. contextual: the remaining R tokens, in positional order, with L2-normalised head-averaged keys of the
     same layer; targets are every step-th of them, step = max(1, R // C), the first C; every other remaining
     token joins the target of highest key cosine similarity (first on ties); a contextual token is its
     target's features plus the mean of the features that joined it (the target alone if none did);
  3. output dominant + contextual tokens. No randomness.

Official defaults: README 54 dominant (the [CLS] token included) + 10 contextual = 64 tokens, and the same
54:10 split at 128 (108 + 20) and 192 (162 + 30); function defaults 191 + 30. Here the total is the toolkit's
keep-count rule on ``KEEP_RATIO`` (exact count), per span: D = round(K * ratio), C = K - D.

Hyper-parameters:
  VISIONZIP_DOMINANT_RATIO (default 54/64 = 0.84375): share of the budget taken by dominant tokens.

Signals (``ctx.vision_attention_received``, ``ctx.vision_keys``; see docs/methods.md, "Vision-encoder signals"):
  * On an encoder with a [CLS] token (CLIP in LLaVA-1.5 / LLaVA-NeXT, ``ctx.vision_has_cls``): the official
    ones, all of CLIP layer -2 (22 of 24, LLaVA's feature layer): the [CLS] row per head, averaged over heads
    (the official code sums them: the same ranking), and the head-averaged ``k_proj`` keys as the "metric".
  * Elsewhere (Qwen-VL, Gemma 4: no [CLS]): the substitute, the mean attention received at the encoder's
    last globally attending layer and that layer's head-averaged keys, as HoliTom's VisionZip port does for
    SigLIP; that layer is the feature layer in Qwen and Gemma 4, as layer -2 is in LLaVA. Qwen2.5-VL: its
    last full-attention block. The same code serves both signals.

Adaptations:
  * The [CLS] token itself is not output. The official output includes the [CLS] token's own hidden state as
    one of the dominant tokens (dominant = the [CLS] + dominant - 1 patches); the models here have no slot
    for it: Qwen and Gemma 4 have no [CLS], and transformers' LLaVA-1.5 (``vision_feature_select_strategy``
    "default") drops it before the projector, so its LLM sequence holds patches only. On LLaVA too the
    whole dominant budget therefore goes to patches (D patches where the official code keeps D - 1 and the
    [CLS]).
  * Merging uses the span's projected tokens (``ctx.features``); the official code merges CLIP features
    before the projector, which do not exist per LLM token in Qwen (2x2 merge) or Gemma 4 (3x3 pooling).
    On LLaVA they do, but a method sees only the projector's output, and the MLP projector does not commute
    with the mean: contextual tokens differ from the official ones there too (the selection does not).
  * Output order: positional, not [dominant, contextual]; a contextual token takes its target's position.
  * Dominant ties go to the lower index (stable sort).

Flash compatibility: yes (attention recomputed from the encoder's own q/k in chunks).
"""

import torch

from methods._base import HyperParam, PruneContext, PruneResult, VisionNeeds, register_prune

DOMINANT_RATIO = HyperParam("VISIONZIP_DOMINANT_RATIO", 54 / 64, float,
                            "share of the budget kept as dominant tokens; the rest are merged contextual tokens",
                            check=lambda r: None if 0.0 <= r <= 1.0 else "must be in [0, 1]")


def visionzip_merge(attention: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, dominant_num: int,
                    contextual_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, features) of the dominant then the contextual tokens; ``keys`` are [N, d]."""
    ranked = torch.sort(attention, descending=True, stable=True).indices
    dominant = ranked[:dominant_num].sort().values
    remaining = ranked[dominant_num:].sort().values
    if contextual_num == 0:
        return dominant, features[dominant]
    step = max(1, remaining.numel() // contextual_num)
    is_target = torch.zeros(remaining.numel(), dtype=torch.bool, device=remaining.device)
    is_target[torch.arange(0, remaining.numel(), step, device=remaining.device)[:contextual_num]] = True
    targets, others = remaining[is_target], remaining[~is_target]
    unit = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    values = features.float()
    assigned = (unit[others] @ unit[targets].T).argmax(dim=1)  # index into targets, first on ties
    sums = torch.zeros(targets.numel(), values.shape[1], device=values.device).index_add_(0, assigned, values[others])
    counts = torch.bincount(assigned, minlength=targets.numel()).clamp(min=1).unsqueeze(1)
    contextual = values[targets] + sums / counts
    merged = torch.cat([features[dominant], contextual.to(features.dtype)])
    return torch.cat([dominant, targets]), merged


# The official signals on CLIP-L/336: layer -2's [CLS] row (heads averaged) and its head-averaged keys.
@register_prune("visionzip_pre_llm", params=[DOMINANT_RATIO], vision=VisionNeeds(keys=True, cls_layers=(-2, -2)))
def visionzip_pre_llm(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """VisionZip: dominant tokens by encoder attention plus contextual tokens merged by key similarity."""
    if ctx.keep >= ctx.num_tokens:
        return torch.arange(ctx.num_tokens)
    dominant_num = min(ctx.keep, round(ctx.keep * ctx.params["VISIONZIP_DOMINANT_RATIO"]))
    indices, features = visionzip_merge(ctx.vision_attention_received(), ctx.vision_keys().mean(dim=1),
                                        ctx.features, dominant_num, ctx.keep - dominant_num)
    return PruneResult(indices, features)
