"""Farthest point sampling in cosine distance (Gonzalez 1985), as in the Gemma 4 community benchmark
radosc/vtbench (``compressors/fps.py``).

Seed: the token with the largest L2 norm (ties: lowest index). Then, greedily, the token whose cosine
distance ``1 - cos`` to its nearest already chosen token is largest (ties: lowest index); chosen tokens are
never re-picked. The same max-min greedy as DivPrune with a different seed (DivPrune seeds with the most
isolated token). Computed in fp32 with a running minimum (O(K N) after the N x N similarity).

Exact keep count, deterministic; kept tokens are returned in original order with original positions
(vtbench returns them in selection order, which would reorder the tokens in the sequence). No hyper-parameters.
Pre-LLM and feature-based: no attention is read, so it runs with any attention implementation (flash included).
"""

import torch

from methods._base import PruneContext, register_prune
from methods.divprune import cosine_distance, max_min_greedy


def fps_select(features: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of ``keep`` tokens in selection order."""
    features = features.float()
    return max_min_greedy(cosine_distance(features), int(torch.argmax(features.norm(dim=1))), keep)


@register_prune("fps_pre_llm")
def fps_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """Farthest point sampling in cosine distance, seeded at the highest-L2-norm token."""
    return fps_select(ctx.features, ctx.keep).sort().values
