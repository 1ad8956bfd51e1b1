"""LLaVA-PruMerge+ (Shang et al., ICCV 2025; official code 42Shawn/LLaVA-PruMerge,
``token_prune_merge_advanced_plus`` in llava/model/multimodal_encoder/clip_encoder.py, the ``forward`` the
committed code calls). Read ``methods/prumerge.py`` first: PruMerge+ is PruMerge with spatially uniform
tokens added before the merge.

Rule: as PruMerge (adaptive IQR fraction r, the int(N * r) most attended tokens), then with
step = int(1 / r), add every index of range(0, N - 1, int(step / 3)) not already selected (about three times
as many uniformly spaced tokens; the official range stops at 575 for 576 patches), then merge every selected
token with its attention-weighted key neighbours and add the extra token for the rest. No randomness.

Official defaults: adaptive count (about 25 % of the tokens reported), k = 32 neighbours.

Count rule (data-dependent, the record shows what was kept per span):
  * PRUMERGE_ADAPTIVE=1 (default, official): as above plus the extra token.
  * PRUMERGE_ADAPTIVE=0: exactly the toolkit's keep count K: of S = K - 1 slots, A = max(1, round(S / 4))
    go to the most attended tokens (the official one-to-three proportion) and S - A to tokens evenly spaced
    among the others in positional order, plus the extra token. At K = N the tokens pass unchanged.

Hyper-parameters (shared with PruMerge): PRUMERGE_ADAPTIVE (default 1), PRUMERGE_NEIGHBOURS (default 32).

Signals: those of PruMerge (``prumerge.OFFICIAL_SIGNALS``). On an encoder with a [CLS] token (CLIP in LLaVA-1.5 /
LLaVA-NeXT, ``ctx.vision_has_cls``) the official ones: the [CLS] row of the last CLIP layer (23) as one full-width
head over the 1024-d ``q_proj`` / ``k_proj`` outputs, keys = that layer's ``k_proj`` output. Elsewhere the
substitute: mean attention received at the encoder's last globally attending layer, keys of all its heads. The
same code serves both.

Adaptations: those of PruMerge (merging on projected tokens, positional output, extra token at its most
attended member's position), plus: the uniform stride is at least 1 (the official int(step / 3) is 0 when
r > 1/3 and crashes). The official uniform samples are indices of CLIP-L/336's 576-patch raster
(range(0, 575, ...)); here of the span's N tokens (the same on LLaVA-1.5).

Flash compatibility: yes (attention recomputed from the encoder's own q/k in chunks).
"""

import torch

from methods._base import PruneContext, PruneResult, register_prune
from methods.prumerge import ADAPTIVE, NEIGHBOURS, OFFICIAL_SIGNALS, adaptive_count, by_attention, merge_into_kept


def uniform_complement(selected: torch.Tensor, n: int, count: int) -> torch.Tensor:
    """``count`` indices evenly spaced, in positional order, among the n tokens not in ``selected``."""
    free = torch.ones(n, dtype=torch.bool)
    free[selected.cpu()] = False
    rest = torch.nonzero(free).flatten()
    return rest[torch.arange(count) * rest.numel() // max(count, 1)]


def official_uniform(selected: torch.Tensor, n: int, fraction: float) -> torch.Tensor:
    """The official spatial samples: range(0, n - 1, int(int(1 / r) / 3)) minus the already selected."""
    stride = max(1, int(int(1 / fraction) / 3))
    samples = torch.arange(0, n - 1, stride)
    return samples[~torch.isin(samples, selected.cpu())]


@register_prune("prumerge_plus_pre_llm", params=[ADAPTIVE, NEIGHBOURS], exact_count=False,
                vision=OFFICIAL_SIGNALS)
def prumerge_plus_pre_llm(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """PruMerge+: PruMerge plus spatially uniform tokens, all merged with their key neighbours, plus one token."""
    attention = ctx.vision_attention_received()
    ranked = by_attention(attention).cpu()
    if ctx.params["PRUMERGE_ADAPTIVE"]:
        selected, fraction = adaptive_count(attention)
        kept = torch.cat([ranked[:selected], official_uniform(ranked[:selected], ctx.num_tokens, fraction)])
    elif ctx.keep >= ctx.num_tokens:
        return torch.arange(ctx.num_tokens)
    else:
        slots = ctx.keep - 1
        selected = max(1, round(slots / 4)) if slots else 0
        kept = torch.cat([ranked[:selected], uniform_complement(ranked[:selected], ctx.num_tokens, slots - selected)])
    return merge_into_kept(attention, ctx.vision_keys().flatten(1), ctx.features, kept,
                           ctx.params["PRUMERGE_NEIGHBOURS"])
