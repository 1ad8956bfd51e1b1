"""VisPruner ("Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs",
Zhang et al., ICCV 2025; official code Theia-4869/VisPruner, ``encode_images`` in llava/model/llava_arch.py and
the [CLS]-free SigLIP tower in llava/model/multimodal_encoder/siglip_encoder.py).

Rule, for a budget of T tokens and important ratio r:
  1. important: the int(T * r) tokens with the largest [CLS] attention of the feature layer (mean over heads);
     the rest is the residual, kept in descending-attention order;
  2. diverse: with L2-normalised features, while the residual has more than T - int(T * r) tokens, split it
     into even (a) and odd (b) positions, score every a-token by its largest cosine similarity to any
     b-token, drop the min(8, excess) highest-scoring a-tokens; the new residual is the surviving a-tokens
     (descending score) followed by all b-tokens;
  3. keep important + residual, in positional order. No randomness.

Official defaults: ``visual_token_num`` T (64 / 128 / 192 in the scripts), ``important_ratio`` 0.5. Here
T is the toolkit's keep-count rule on ``KEEP_RATIO`` (exact count), per span.

Hyper-parameters:
  VISPRUNER_IMPORTANT_RATIO (default 0.5): fraction r of the budget chosen by attention.

Signal (``ctx.vision_attention_received``; see docs/methods.md, "Vision-encoder signals"):
  * On an encoder with a [CLS] token (CLIP in LLaVA-1.5 / LLaVA-NeXT, ``ctx.vision_has_cls``): the official
    one, the [CLS] row of the feature layer (``attentions[select_layer]``, CLIP layer -2 = 22 of 24), averaged
    over heads.
  * Elsewhere (Qwen-VL, Gemma 4: no [CLS]): the mean attention received at the encoder's last globally
    attending layer, exactly the official SigLIP path for towers without [CLS]; in Qwen and Gemma 4 that
    layer is the feature layer, as CLIP layer -2 is in LLaVA. Qwen2.5-VL: its last full-attention block.
  The same code serves both.

Adaptations:
  * Similarity uses the span's projected tokens (``ctx.features``, what the language model receives); the
    official code compares CLIP features before the projector, which do not exist per LLM token in Qwen
    (2x2 merge) or Gemma 4 (3x3 pooling). On LLaVA they do, but a method sees only the projector's output, so
    the diverse tokens can differ from the official ones there (the important ones do not).
  * Odd residual sizes (the official tensor code assumes even) give one more a-token than b-tokens.
  * Sorts are stable: equal scores keep the lower index / earlier rank.
  * The residual tokens' cosine similarities are computed once and read per round (the official code multiplies
    the a- and b-tokens again every round, which makes it grow as N^3): same rule, O(N^2 D + rounds N^2).

Flash compatibility: yes (attention recomputed from the encoder's own q/k in chunks).
"""

import torch

from methods._base import HyperParam, PruneContext, VisionNeeds, register_prune

IMPORTANT_RATIO = HyperParam("VISPRUNER_IMPORTANT_RATIO", 0.5, float,
                             "fraction of the budget kept by encoder attention; the rest by diversity",
                             check=lambda r: None if 0.0 <= r <= 1.0 else "must be in [0, 1]")
STEP = 8  # official: at most 8 a-tokens dropped per round


def vispruner_select(attention: torch.Tensor, features: torch.Tensor, keep: int, important_ratio: float) -> torch.Tensor:
    """Indices of the ``keep`` tokens (important first, then diverse; unsorted)."""
    important_num = int(keep * important_ratio)
    diverse_num = keep - important_num
    ranked = torch.sort(attention, descending=True, stable=True).indices
    important, residual = ranked[:important_num], ranked[important_num:]
    if diverse_num == 0:
        return important
    # Cosine similarities among the residual tokens, computed once (O(N^2 D)); each round then reads the rows of its
    # a-tokens and the columns of its b-tokens (O(N^2) per round) instead of multiplying them again.
    unit = features.float() / features.float().norm(dim=-1, keepdim=True)
    similarity = unit[residual] @ unit[residual].T
    where = torch.empty(features.shape[0], dtype=torch.long, device=residual.device)  # token -> row of similarity
    where[residual] = torch.arange(residual.numel(), device=residual.device)
    while (drop := min(STEP, residual.numel() - diverse_num)) > 0:
        a, b = residual[0::2], residual[1::2]
        rows, cols = where[a].to(similarity.device), where[b].to(similarity.device)
        redundancy = similarity.index_select(0, rows).index_select(1, cols).max(dim=1).values
        survivors = torch.sort(redundancy, descending=True, stable=True).indices[drop:]
        residual = torch.cat([a[survivors.to(a.device)], b])
    return torch.cat([important, residual])


# The official signal on CLIP-L/336: the [CLS] row of layer -2 (LLaVA's select_layer), heads averaged.
@register_prune("vispruner_pre_llm", params=[IMPORTANT_RATIO], vision=VisionNeeds(cls_layers=(-2, -2)))
def vispruner_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """VisPruner: encoder-attention-important tokens plus diverse tokens from iterative de-duplication."""
    chosen = vispruner_select(ctx.vision_attention_received(), ctx.features, ctx.keep,
                              ctx.params["VISPRUNER_IMPORTANT_RATIO"])
    return chosen.sort().values
