"""PyramidDrop (Xing et al., CVPR 2025; official code Cooperx521/PyramidDrop,
``llava/model/modeling_llama_pdrop.py``: ``pdrop_forward``, ``pdrop_rank_drop``).

Multi-stage. Before each pruning layer K, layer K's *own* input norm, q/k projections and RoPE are applied to
the hidden states entering it, and the last instruction token's attention row (the final token of the
generation prompt) is taken: softmax over every key it may attend to, in fp32, averaged over heads. The
span's visual tokens with the highest scores are kept, in original order (ties: lower index). One query
row, computed from q/k without an L x L matrix: works under eager, sdpa and flash_attention_2.

Schedule. Official: layers [8, 16, 24] of LLaVA-1.5's 32, keeping lambda, lambda^2, lambda^3 (lambda = 0.5)
of the *original* visual count: cumulative fractions, as the toolkit's intra-LLM ratios already are. Named
alone (``PRUNE_METHOD=pdrop_intra_llm``) it runs its own schedule: layers ``round(l * depth / 32)`` for
l in (8, 16, 24) (e.g. 7, 14, 21 for a 28-layer model), and **KEEP_RATIO is lambda**: stage s keeps
``K = max(1, round(KEEP_RATIO^s * N))`` of the N visual tokens that entered the language model, so
``KEEP_RATIO=0.5`` is the official setting (50 % / 25 % / 12.5 %), and the fraction of visual tokens averaged
over a 32-layer model's layers is (1 + lambda + lambda^2 + lambda^3) / 4 (about 0.47 at lambda = 0.5).
In ``INTRA_LLM_LAYER_SPECS`` each ``K:pdrop_intra_llm:RATIO`` entry is one stage with exactly that cumulative
ratio (e.g. ``8:pdrop_intra_llm:0.5;16:pdrop_intra_llm:0.25;24:pdrop_intra_llm:0.125``).

Adaptations: the toolkit's keep-count rule (official ``int(N * ratio)``); kept tokens keep their original
positions (official PDrop compacts position ids to 0..len-1 in prefill and shifts them in decoding; not
offered, since the toolkit keeps original positions for every method); GQA keys are repeated per head (the
official code assumes MHA). No hyper-parameters; no randomness.
"""

import torch

from methods._base import PruneContext, register_prune
from methods._schedule import scale_layers
from methods.fastv import top_k_in_order

OFFICIAL_LAYERS, OFFICIAL_DEPTH = (8, 16, 24), 32


def pdrop_schedule(num_layers: int, keep_ratio: float) -> list[tuple[int, float]]:
    """The official layers scaled to the model's depth; stage s keeps keep_ratio^s (keep_ratio = lambda)."""
    layers = scale_layers(OFFICIAL_LAYERS, OFFICIAL_DEPTH, num_layers)
    return [(layer, keep_ratio ** stage) for stage, layer in enumerate(layers, start=1)]


@register_prune("pdrop_intra_llm", default_schedule=pdrop_schedule)
def pdrop_intra_llm(ctx: PruneContext) -> torch.Tensor:
    """PyramidDrop: keep the visual tokens most attended by the last prompt token, with layer K's own q/k."""
    scores = ctx.attention_to_span(layer=ctx.layer).mean(dim=0).mean(dim=0)  # heads, then the query row -> [N]
    return top_k_in_order(scores, ctx.keep)
