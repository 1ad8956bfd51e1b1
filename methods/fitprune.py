"""FitPrune (Ye et al., AAAI 2025; official code ywh187/FitPrune,
``LLaVA_1.5/llava/model/language_model/modeling_llama.py``, ``LlamaAttention.forward``).

Score of each visual token j of the span, from one layer's attention probabilities P [H, L, L] reduced by the
**maximum over heads**, A = max_h P_h:

    self(j)  = sum over the span's visual rows i of A[i, j] / N       (attention among the visual tokens)
    cross(j) = sum over the text rows t after the span of A[t, j]    (attention from the instruction)
    score(j) = self(j) * cross(j)

The official code sorts the scores ascending and deletes the first d (the lowest); equivalently the top K
are kept. Here the N - K lowest are removed in a stable ascending sort (ties: the lower index goes first),
and the kept tokens stay in original order with original positions. The UniPruneBench port keeps the
*lowest* scores instead, an inverted FitPrune.

Which layer. Official FitPrune prunes inside layer l, after its attention: a deleted token still contributes
its key/value to layer l (and stays in l's cache) but leaves the residual stream before l's MLP. Pruning
before layer K = l + 1 with layer K-1's attention (what this method does) gives every kept token exactly the
same states, so "layer K" here is the official "layer K-1". The rows are recomputed in fp32 from layer K-1's
query/key states, block by block of query rows (never L x L; each block holds [H, b, L] scores), so it works
under eager, sdpa and flash_attention_2.

Schedule adaptation. The official method deletes a calibrated number of tokens at many layers (``delete_scheme``
tables fitted offline for LLaVA-1.5-7B: 32 layers, 576 tokens, at reductions 10..90 %); those tables do not
transfer to other models and the fit (binary search on attention-mass retention under a FLOPs budget) needs a
calibration set. Here FitPrune runs at one layer K (default 2, i.e. official layer 1) with the toolkit's keep
ratio and keep-count rule; a multi-layer schedule is written with ``INTRA_LLM_LAYER_SPECS``
(e.g. ``2:fitprune_intra_llm:0.6;4:fitprune_intra_llm:0.3``). The text rows are the sample's text tokens after
the span (single-image LLaVA: everything after the image); with none, every score is 0 and the earliest
tokens are removed first. No hyper-parameters; no randomness.
"""

import torch

from methods._base import PruneContext, register_prune


def fitprune_scores(ctx: PruneContext) -> torch.Tensor:
    """self x cross scores [N] of the span from layer K-1's head-max attention probabilities."""
    visual_rows, text_rows = ctx.span_positions, ctx.text_after_span()
    rows = torch.cat([visual_rows, text_rows])
    n = visual_rows.numel()
    self_score = torch.zeros(n, device=ctx.features.device)
    cross_score = torch.zeros(n, device=ctx.features.device)
    done = 0
    for probs in ctx.attention_to_span_blocks(rows):  # [H, b, N], rows in order
        head_max = probs.amax(dim=0)
        is_visual = torch.arange(done, done + head_max.shape[0]) < n
        self_score += head_max[is_visual.to(head_max.device)].sum(dim=0).to(self_score.device)
        cross_score += head_max[~is_visual.to(head_max.device)].sum(dim=0).to(cross_score.device)
        done += head_max.shape[0]
    return (self_score / n) * cross_score


def keep_after_deleting_lowest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The official rule: sort ascending (stable), delete the first N - keep; kept indices ascending."""
    order = torch.sort(scores, stable=True).indices
    return order[scores.numel() - keep:].sort().values


@register_prune("fitprune_intra_llm", default_layer=2, min_layer=1)
def fitprune_intra_llm(ctx: PruneContext) -> torch.Tensor:
    """FitPrune: keep the highest (head-max visual-self x text-cross) attention scores of layer K-1."""
    return keep_after_deleting_lowest(fitprune_scores(ctx), ctx.keep)
