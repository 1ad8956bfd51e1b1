"""DivPrune-hybrid: DivPrune's max-min diversity mixed with an L2-norm importance term, as in the Gemma 4
community benchmark radosc/vtbench (``compressors/divprune_hybrid.py``; a research extension, not a paper).

importance_i = min-max normalised L2 norm of token i (all ones if every norm is equal);
diversity_i = d_i / max_j d_j, where d_i is token i's cosine distance ``1 - cos`` to its nearest chosen token
(max over all tokens; left unnormalised if that max is 0).
Seed: the most important token. Then greedily the unchosen token maximising
``alpha * importance + (1 - alpha) * diversity`` (ties: lowest index). ``alpha = 0`` is farthest point
sampling seeded at the largest norm; ``alpha = 1`` is plain top-K by norm. Computed in fp32.

Exact keep count, deterministic; kept tokens are returned in original order with original positions
(vtbench returns them in selection order). Hyper-parameter: ``DIVPRUNE_HYBRID_ALPHA`` (default 0.5, vtbench's).
Pre-LLM and feature-based: no attention is read, so it runs with any attention implementation (flash included).
"""

import torch

from methods._base import HyperParam, PruneContext, register_prune
from methods.divprune import cosine_distance

ALPHA = HyperParam("DIVPRUNE_HYBRID_ALPHA", 0.5, float, "weight of the L2-norm importance (1 - weight: diversity)",
                   check=lambda a: None if 0.0 <= a <= 1.0 else "must be in [0, 1]")


def divprune_hybrid_select(features: torch.Tensor, keep: int, alpha: float) -> torch.Tensor:
    """Indices of ``keep`` tokens in selection order."""
    features = features.float()
    norms = features.norm(dim=1)
    spread = norms.max() - norms.min()
    importance = torch.where(spread > 0, (norms - norms.min()) / spread, torch.ones_like(norms))
    distance = cosine_distance(features)
    # Every step stays on the device (no Python int, no branch on a tensor): see divprune.max_min_greedy.
    chosen = torch.empty(keep, dtype=torch.long, device=features.device)
    taken = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    pick = torch.argmax(importance, dim=0, keepdim=True)
    chosen[0:1] = pick
    taken.index_fill_(0, pick, True)
    min_to_chosen = distance.index_select(0, pick)[0].clone()
    for i in range(1, keep):
        top = min_to_chosen.max()
        diversity = torch.where(top > 0, min_to_chosen / top, min_to_chosen)
        score = (alpha * importance + (1.0 - alpha) * diversity).masked_fill(taken, -1.0)
        pick = torch.argmax(score, dim=0, keepdim=True)
        chosen[i:i + 1] = pick
        taken.index_fill_(0, pick, True)
        min_to_chosen = torch.minimum(min_to_chosen, distance.index_select(0, pick)[0])
    return chosen


@register_prune("divprune_hybrid_pre_llm", params=[ALPHA])
def divprune_hybrid_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """DivPrune diversity mixed with L2-norm importance (weight alpha), seeded at the largest norm."""
    return divprune_hybrid_select(ctx.features, ctx.keep, ctx.params["DIVPRUNE_HYBRID_ALPHA"]).sort().values
