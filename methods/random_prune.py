"""Random selection: the baseline every method should beat. Seeded and reproducible."""

import torch

from methods._base import HyperParam, PruneContext, register_prune

SEED = HyperParam("PRUNE_RANDOM_SEED", 0, int, "seed of the random selection (per span, reproducible)")


def _random_keep(ctx: PruneContext) -> torch.Tensor:
    order = torch.randperm(ctx.num_tokens, generator=ctx.generator(ctx.params["PRUNE_RANDOM_SEED"]))
    return order[: ctx.keep].sort().values


@register_prune("random_pre_llm", params=[SEED])
def random_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """Keep a uniformly random subset of each span's encoder tokens."""
    return _random_keep(ctx)


@register_prune("random_intra_llm", params=[SEED], default_layer=2)
def random_intra_llm(ctx: PruneContext) -> torch.Tensor:
    """Keep a uniformly random subset of each span's visual tokens at a decoder layer."""
    return _random_keep(ctx)


@register_prune("random_vit", params=[SEED], default_layer=1)
def random_vit(ctx: PruneContext) -> torch.Tensor:
    """Keep a uniformly random subset of each encoded image's patches before an encoder block."""
    return _random_keep(ctx)
