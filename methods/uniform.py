"""Uniform stride subsampling: the floor any pruning method should beat (no paper; a baseline).

Keeps ``K`` tokens evenly spaced along the span's raster order (t, h, w): token ``floor((2i + 1) N / (2K))`` for
``i = 0..K-1``, i.e. the centre of each of ``K`` equal slices of the span, so the choice is symmetric and
``K = N`` keeps everything. It ignores the tokens' content; on a 2-D grid a 1-D stride can fall on the same
columns row after row (see ``pool_pre_llm`` for a spatial baseline on the real grid). Exact keep count,
deterministic, original order and positions. No hyper-parameters.
Pre-LLM and feature-based: no attention is read, so it runs with any attention implementation (flash included).
"""

import torch

from methods._base import PruneContext, register_prune


def uniform_indices(num_tokens: int, keep: int) -> torch.Tensor:
    """Centres of ``keep`` equal slices of ``range(num_tokens)``, ascending and distinct (keep <= num_tokens)."""
    return (torch.arange(keep) * 2 + 1) * num_tokens // (2 * keep)


@register_prune("uniform_pre_llm")
def uniform_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """Uniform stride subsampling along each span's raster order (content-blind baseline)."""
    return uniform_indices(ctx.num_tokens, ctx.keep)
