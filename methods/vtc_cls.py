"""VTC-CLS ("[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs", Wang et al., arXiv
2412.05819; official code THU-MIG/VTC-CLS, ``cls_token_only`` in llava/model/multimodal_encoder/clip_encoder.py
and the VTC-CLS branch of ``encode_images`` in llava/model/llava_arch.py).

Rule: score every visual token by its [CLS] attention (mean over heads) summed over the encoder layers from
``start_layer`` up to the layer whose output LLaVA feeds the projector (CLIP layers 16..22 of 24 by default:
``attentions[start_layer:-1]``, layer 23 is not used for features), keep the ``token_num`` highest and put
them back in positional order. No randomness.

Official defaults: ``--layer 16``, ``--token_num 36`` (argparse defaults of llava/eval/model_vqa_loader.py).
Here the count is the toolkit's keep-count rule on ``KEEP_RATIO`` (exact count), per span.

Hyper-parameters:
  VTC_CLS_START_LAYER (default 16, the official value): first encoder layer whose attention is summed;
  negative counts from the end. The official default sums 7 layers on CLIP-L (16..22, ending at the feature
  layer). On a [CLS] encoder the range is the official slice ``attentions[start:-1]``: 16 sums layers 16..22
  of CLIP-L's 24, -8 the same 7 layers, -7 six (17..22); a start past layer 22 (e.g. -1) leaves nothing and
  is refused. On a [CLS]-free encoder the range ends at its last layer: 16 sums more on a deeper encoder
  (Qwen2-VL's 32 layers: 16..31), and -7 sums as many as the official default does.

Signal (``ctx.vision_attention_received``, summed over ``ctx.vision_layers()``; see docs/methods.md,
"Vision-encoder signals"):
  * On an encoder with a [CLS] token (CLIP in LLaVA-1.5 / LLaVA-NeXT, ``ctx.vision_has_cls``): the official
    one, the [CLS] row of every layer start_layer..-2 (inclusive; the last layer, 23, is not used), averaged
    over heads, summed over those layers.
  * Elsewhere the [CLS] row is replaced by the mean attention a token receives, as VisPruner and HoliTom do
    for [CLS]-free SigLIP towers; Qwen's and Gemma 4's encoders have no [CLS]. The summed range then ends at
    the encoder's last layer, which is the one feeding the projector in Qwen and Gemma 4 (as layer 22 does
    in LLaVA), so the range is [start_layer, last] inclusive.
  The same code serves both: it sums every layer captured, which are exactly the declared ones.

Adaptations:
  * Qwen2.5-VL: only the full-attention blocks in that range are summed (window blocks score inside their
    window only, not comparable across the image); a range without one is refused at the first forward.
  * Equal scores go to the lower index (stable sort).

Flash compatibility: yes. The encoder's attention is recomputed from the chosen layers' own q/k in chunks;
no ``output_attentions`` and no eager attention anywhere.
"""

import torch

from methods._base import HyperParam, PruneContext, VisionNeeds, register_prune
from methods.fastv import top_k_in_order

START_LAYER = HyperParam("VTC_CLS_START_LAYER", 16, int,
                         "first vision-encoder layer whose attention is summed (negative: from the end)")


def vtc_cls_scores(ctx: PruneContext) -> torch.Tensor:
    return torch.stack([ctx.vision_attention_received(layer) for layer in ctx.vision_layers()]).sum(dim=0)


@register_prune("vtc_cls_pre_llm", params=[START_LAYER],
                vision=lambda params: VisionNeeds(first_layer=params["VTC_CLS_START_LAYER"],
                                                  cls_layers=(params["VTC_CLS_START_LAYER"], -2),
                                                  first_layer_var="VTC_CLS_START_LAYER"))
def vtc_cls_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """VTC-CLS: keep the tokens with the largest encoder attention summed over layers start..last ([CLS]: ..-2)."""
    return top_k_in_order(vtc_cls_scores(ctx), ctx.keep)
