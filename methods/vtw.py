"""VTW, Visual Tokens Withdrawal (Lin et al., AAAI 2025; official code lzhxmu/VTW,
``llava/model/language_model/VTW.py``).

Before decoder layer K every visual token of every span is withdrawn: layers >= K, and their KV caches, hold
text only; the remaining tokens keep their original positions (the official "keep" position mode). No signal,
no randomness, nothing computed: flash-attention compatible.

Count rule (``exact_count=False``): 0 tokens kept for every span, whatever ``KEEP_RATIO`` says (the ratio is
ignored; the toolkit still asks for one when a method is named, and ``KEEP_RATIO=1`` does *not* disable it).

Layer. The official K is chosen per model offline: the first layer whose withdrawal moves the final-token
output distribution by KL <= eta on a few calibration samples (eta = 0.003 for LLaVA-1.5-7B), which gave
K = 15 of 32 layers for LLaVA-1.5-7B (README; CLI default 16). Named alone (``PRUNE_METHOD=vtw_intra_llm``) it
runs at ``round(15 * depth / 32)`` (e.g. 13 for a 28-layer model); the KL search is not part of this toolkit,
so for a model-specific K run it and set ``INTRA_LLM_LAYER_SPECS=K:vtw_intra_llm:1``.
"""

import torch

from methods._base import PruneContext, register_prune
from methods._schedule import scale_layers

OFFICIAL_LAYER, OFFICIAL_DEPTH = 15, 32


def vtw_schedule(num_layers: int, keep_ratio: float) -> list[tuple[int, float]]:
    """The official K = 15 of 32 scaled to the model's depth (the ratio is carried along, unused)."""
    return [(scale_layers([OFFICIAL_LAYER], OFFICIAL_DEPTH, num_layers)[0], keep_ratio)]


@register_prune("vtw_intra_llm", default_schedule=vtw_schedule, exact_count=False)
def vtw_intra_llm(ctx: PruneContext) -> torch.Tensor:
    """VTW: withdraw every visual token before layer K (keeps 0; KEEP_RATIO is ignored)."""
    return torch.zeros(0, dtype=torch.long)
