"""FastV (Chen et al., ECCV 2024; official code pkunlp-icler/FastV, ``fastv_forward``).

Before decoder layer K (default 2), score each visual token by the attention it receives from the last
prompt token at layer K-1, averaged over heads, and keep the top tokens in their original order. The
"last prompt token" is the final token of the generation prompt (chat-template suffix included), as in
the official code. The attention row is recomputed from layer K-1's query/key states in fp32 with the
model's scale and mask, so no eager L x L attention matrix is needed. Scores are per span; equal scores
go to the lower index (stable sort). Layer: set it with ``INTRA_LLM_LAYER_SPECS`` (e.g. ``3:fastv_intra_llm``).
"""

import torch

from methods._base import PruneContext, register_prune


def top_k_in_order(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, ties to the lower index, returned in ascending order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:keep].sort().values


@register_prune("fastv_intra_llm", default_layer=2, min_layer=1)
def fastv_intra_llm(ctx: PruneContext) -> torch.Tensor:
    """FastV: keep the visual tokens most attended by the last prompt token at layer K-1."""
    scores = ctx.attention_to_span().mean(dim=0)[-1]  # heads averaged, last query row -> [N]
    return top_k_in_order(scores, ctx.keep)
