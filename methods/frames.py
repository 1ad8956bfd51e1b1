"""Frame-level baselines for video: keep whole frames, evenly spaced or at random.

They answer the first question a temporal method must beat: how much does a video lose if the model simply sees
fewer frames? Both are video methods (``video=True``): they see every frame of one video at once. The share of
frames kept is KEEP_RATIO, by the toolkit's keep-count rule on the frame count: n = max(1, round(ratio * T)) of the
T frames (a frame is what the model encodes as one temporal step: Qwen2/2.5-VL's temporal patch of two frames,
Qwen3-VL's frame block). Every token of a kept frame stays, so the token count is the kept frames' tokens
(``exact_count=False``). An image is a video of one frame and stays whole.
"""

import torch

from methods._base import PruneContext, register_prune
from methods.random_prune import SEED
from utils import keep_count


def _frames_kept(ctx: PruneContext, chosen: torch.Tensor) -> torch.Tensor:
    kept = torch.zeros(ctx.video.count, dtype=torch.bool)
    kept[chosen] = True
    return torch.nonzero(kept[ctx.video.frame.cpu()]).flatten()


def evenly_spaced(frames: int, n: int) -> torch.Tensor:
    """n of ``frames`` frame indices, every (frames / n)-th from the first: floor(i * frames / n), i < n."""
    return torch.arange(n) * frames // n


@register_prune("uniform_frames_pre_llm", video=True, exact_count=False)
def uniform_frames_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """Keep every k-th frame of a video (k = 1 / KEEP_RATIO; evenly spaced from the first frame), whole."""
    frames = ctx.video.count
    return _frames_kept(ctx, evenly_spaced(frames, keep_count(frames, ctx.ratio)))


@register_prune("random_frames_pre_llm", params=[SEED], video=True, exact_count=False)
def random_frames_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """Keep a random KEEP_RATIO share of a video's frames (seeded, ``PRUNE_RANDOM_SEED``), whole."""
    frames = ctx.video.count
    order = torch.randperm(frames, generator=ctx.generator(ctx.params["PRUNE_RANDOM_SEED"]))
    return _frames_kept(ctx, order[:keep_count(frames, ctx.ratio)])

