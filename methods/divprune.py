"""DivPrune (Alvar et al., CVPR 2025; official code vbdi/divprune, ``DivPrune`` in llava_arch.py).

Max-min diversity on the cosine distance ``D = 1 - cos`` of the span's projected visual tokens:
the first token is the most isolated one (largest distance to its nearest *other* token, i.e. the
second-smallest entry of its column of D), then greedily the token whose distance to the already chosen
set is largest. Ties go to the lowest index (``argmax``). The official loop re-takes the minimum over all
chosen rows at every step (O(K^2 N)); a running minimum gives the identical choice in O(K N).
Computed in fp32. Differences from the official code: the toolkit's keep-count rule (see docs/configuration.md),
per-span pruning (each image or video is its own set), and a chosen token is never chosen again (the
official loop re-picks one when every remaining token duplicates a chosen one, e.g. in flat image regions,
because a token's float distance to itself can exceed 0). No hyper-parameters.
"""

import torch

from methods._base import PruneContext, register_prune


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    unit = features / features.norm(dim=1, keepdim=True)
    return 1.0 - unit @ unit.T


def divprune_select(features: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of ``keep`` tokens in selection order (unsorted)."""
    distance = cosine_distance(features.float())
    if distance.shape[0] == 1:
        return torch.zeros(keep, dtype=torch.long)
    # Seed: column-wise second-smallest distance = distance to the nearest other token (topk of 2 is several times
    # faster than kthvalue on large N, and gives the same value).
    nearest_other = distance.topk(2, dim=0, largest=False).values[1]
    return max_min_greedy(distance, int(torch.argmax(nearest_other)), keep)


def max_min_greedy(distance: torch.Tensor, first: int, keep: int) -> torch.Tensor:
    """From ``first``, repeatedly the token farthest from the chosen set (a running minimum: O(K N)). Every step
    stays on ``distance``'s device (one-element index tensors, no Python int): on a GPU the loop queues its
    kernels without waiting for each pick to reach the host."""
    chosen = torch.empty(keep, dtype=torch.long, device=distance.device)
    chosen[0] = first
    min_to_chosen = distance[first].clone()
    min_to_chosen[first] = float("-inf")  # never re-picked, even where float error leaves a self-distance above 0
    for i in range(1, keep):
        pick = torch.argmax(min_to_chosen, dim=0, keepdim=True)
        chosen[i:i + 1] = pick
        min_to_chosen = torch.minimum(min_to_chosen, distance.index_select(0, pick)[0])
        min_to_chosen.index_fill_(0, pick, float("-inf"))
    return chosen


@register_prune("divprune_pre_llm")
def divprune_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """DivPrune: greedy max-min cosine diversity on the projected visual tokens."""
    return divprune_select(ctx.features, ctx.keep).sort().values
