"""G-Prune (Jiang et al., AAAI 2025; official code jytmelon/G-Prune, ``LLaVA-NeXT/llava/model/llava_arch.py``,
the block after the image features are assembled).

Information flow on a graph of the span's projected visual tokens X (N x D), in fp32:

1. S = cosine similarity of X; entries below the threshold (0.5) are zeroed, the rest divided by the
   temperature (0.03); entries whose magnitude is below 1e-6 (the zeroed ones) are set to -5000;
2. P = row softmax of S: each row is a distribution over the neighbours with similarity >= threshold
   (self included); degree_j = number of non-zero entries in row j of P;
3. score_j = (w P^n)_j / degree_j with w_i = ||x_i|| and n = 5 iterations: the importance flowing into j.

Keep the top K scores (ties: lowest index), returned in original order. The official code forms P^n with
``matrix_power``; ``w`` is multiplied by P n times instead (the same vector, O(n N^2) instead of O(N^3 log n)).
Official defaults are hard-coded constants, exposed here as hyper-parameters: ``GPRUNE_THRESHOLD`` (0.5),
``GPRUNE_TEMPERATURE`` (0.03), ``GPRUNE_ITERATIONS`` (5). Adaptations: the toolkit's keep-count rule
(official: ``int(0.5 N)`` with a hard-coded keep ratio 0.5), one graph per span (official: LLaVA-NeXT's base
image and high-resolution grid scored separately, row-end newline tokens always kept; Qwen has none), fp32
throughout. The threshold and temperature were tuned on LLaVA projector outputs; on other models check that
the graph is neither empty nor complete. Deterministic, exact keep count.
Pre-LLM and feature-based: no attention is read, so it runs with any attention implementation (flash included).
"""

import torch

from methods._base import HyperParam, PruneContext, register_prune
from methods.fastv import top_k_in_order

THRESHOLD = HyperParam("GPRUNE_THRESHOLD", 0.5, float, "cosine similarity below which graph edges are cut",
                       check=lambda t: None if -1.0 <= t <= 1.0 else "must be in [-1, 1]")
TEMPERATURE = HyperParam("GPRUNE_TEMPERATURE", 0.03, float, "softmax temperature of the edge weights",
                         check=lambda t: None if t > 0 else "must be > 0")
ITERATIONS = HyperParam("GPRUNE_ITERATIONS", 5, int, "propagation steps (power of the transition matrix)",
                        check=lambda n: None if n >= 1 else "must be >= 1")


def transition_and_degree(features: torch.Tensor, threshold: float, temperature: float):
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    similarity = unit @ unit.T
    similarity = similarity.masked_fill(similarity < threshold, 0.0) / temperature
    similarity = similarity.masked_fill(similarity.abs() < 1e-6, -5000.0)
    transition = torch.softmax(similarity, dim=1)
    return transition, (transition > 0).sum(dim=1)


def gprune_scores(features: torch.Tensor, threshold: float, temperature: float, iterations: int) -> torch.Tensor:
    transition, degree = transition_and_degree(features, threshold, temperature)
    flow = features.float().norm(dim=1)
    for _ in range(iterations):
        flow = flow @ transition
    return flow / degree


@register_prune("gprune_pre_llm", params=[THRESHOLD, TEMPERATURE, ITERATIONS])
def gprune_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """G-Prune: information flow over a thresholded cosine-similarity graph of the projected tokens."""
    p = ctx.params
    scores = gprune_scores(ctx.features, p["GPRUNE_THRESHOLD"], p["GPRUNE_TEMPERATURE"], p["GPRUNE_ITERATIONS"])
    return top_k_in_order(scores, ctx.keep)
