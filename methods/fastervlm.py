"""FasterVLM ("[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference Faster",
Zhang et al., arXiv 2412.01818; official code Theia-4869/FasterVLM, ``encode_images`` in llava/model/llava_arch.py
and ``feature_select`` in llava/model/multimodal_encoder/clip_encoder.py).

Stage: pre-LLM, on the vision encoder's output.

Rule: score every patch by the [CLS] query's attention to it in the encoder layer whose output feeds the
projector (``attentions[select_layer]``, CLIP layer -2 = 22 of 24 in LLaVA-1.5), averaged over heads; keep the
T patches with the largest score (``topk``) and put them back in their original order (the official code
turns them into an index mask over the patches, so the kept tokens reach the language model in positional
order). No merging, no randomness.

Official defaults: T = ``--visual-token-num`` (an absolute count per image; the abstract reports 95 % of the
tokens pruned at 90 % of LLaVA-1.5-7B's performance). Here T is the toolkit's keep-count rule on
``KEEP_RATIO`` (exact count), per span.

Hyper-parameters: none.

Signal (``ctx.vision_attention_received``; see docs/methods.md, "Vision-encoder signals"):
  * On an encoder with a [CLS] token (CLIP in LLaVA-1.5 / LLaVA-NeXT, ``ctx.vision_has_cls``): the official one,
    the [CLS] row of layer -2 (softmax over every key, [CLS] included, the [CLS] column dropped), heads averaged.
  * Elsewhere (Qwen-VL, Gemma 4: no [CLS]): the substitute, the mean attention received at the encoder's last
    globally attending layer (the feature layer there, as layer -2 is in LLaVA), as VisPruner's official
    SigLIP tower does. Qwen2.5-VL: its last full-attention block.
  The same code serves both.

Adaptations:
  * Equal scores go to the lower index (stable sort; ``torch.topk`` leaves the choice unspecified).
  * LLaVA-NeXT: the official code keeps T tokens in every crop (base image and each tile, the index masks are
    computed per crop); here the span's keep count is taken over the whole span by score.

Flash compatibility: yes (the [CLS] row, or its substitute, is recomputed from the encoder layer's own q/k).
"""

import torch

from methods._base import PruneContext, VisionNeeds, register_prune
from methods.fastv import top_k_in_order


# The official signal on CLIP-L/336: the [CLS] row of layer -2 (LLaVA's select_layer), heads averaged.
@register_prune("fastervlm_pre_llm", vision=VisionNeeds(cls_layers=(-2, -2)))
def fastervlm_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """FasterVLM: keep the tokens with the largest [CLS] attention of the encoder's feature layer."""
    return top_k_in_order(ctx.vision_attention_received(), ctx.keep)
