"""CDPruner (Zhang et al., NeurIPS 2025; official code Theia-4869/CDPruner, ``llava/model/llava_arch.py``
``encode_images`` and ``multimodal_encoder/clip_encoder.py``).

Conditional determinantal point process over the span's projected visual tokens, in fp32:

* similarity S = cosine similarity of the projected tokens (N x N);
* relevance r_j = mean over the instruction embeddings t_m of ``sign * cos(v_j, t_m)``, min-max normalised to
  (0, 1] as ``(r - min + 1e-6) / (max - min)``;
* kernel L = diag(r) S diag(r); greedy MAP inference of the DPP for K steps (fast incremental Cholesky,
  Chen et al. 2018): pick the largest remaining marginal gain (initially diag L; ties: lowest index), append
  the new Cholesky row ``e = (L[j] - C[:, j]^T C) / sqrt(gain_j)``, subtract ``e^2`` from the gains.

Kept tokens are returned in original order with original positions; exact keep count; no randomness.
Official default budget: an absolute T in {64, 128, 192}; here the toolkit's keep-count rule.

Adaptation (the official method needs a CLIP text tower, which Qwen and Gemma do not have): relevance is
measured in the language model's input space, between each projected visual token v_j (what the LM receives)
and the LM input embeddings of the span's instruction, i.e. every text token after the span (the question and
the chat-template suffix; the template cannot be told apart generically). The official code uses CLIP's
image-patch embeddings against CLIP text embeddings of the instruction split into 77-token segments, and
*negates* the cosine before averaging (``sign = -1``). Whether the same sign suits LM-space embeddings is not
established; the default keeps the official sign and ``CDPRUNER_RELEVANCE_SIGN=1`` flips it. With no text after
the span, or equal relevance everywhere, r = 1 (a pure diversity DPP). Once the remaining gains are no longer
positive (rank-deficient kernel, e.g. duplicate tokens) the official update would divide by zero; from there
the remaining picks take the largest gain left without updating, so the count stays exact.

Hyper-parameter: ``CDPRUNER_RELEVANCE_SIGN`` (-1 official, or 1).
Pre-LLM and feature-based: no attention is read, so it runs with any attention implementation (flash included).
"""

import torch

from methods._base import HyperParam, PruneContext, register_prune

SIGN = HyperParam("CDPRUNER_RELEVANCE_SIGN", -1, int, "sign applied to the cosine relevance (-1: official CLIP sign)",
                  check=lambda s: None if s in (-1, 1) else "must be -1 or 1")


def relevance(visual: torch.Tensor, instruction: torch.Tensor, sign: int) -> torch.Tensor:
    """Min-max normalised mean signed cosine of each visual token to the instruction tokens, in (0, 1]."""
    if instruction.shape[0] == 0:
        return torch.ones(visual.shape[0], device=visual.device)
    unit_v = torch.nn.functional.normalize(visual.float(), dim=1)
    unit_t = torch.nn.functional.normalize(instruction.float(), dim=1)
    raw = (sign * (unit_v @ unit_t.T)).mean(dim=1)
    spread = raw.max() - raw.min()
    if spread <= 0:
        return torch.ones_like(raw)
    return (raw - raw.min() + 1e-6) / spread


def dpp_greedy_map(kernel: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy MAP of a DPP with kernel ``kernel`` (N x N, PSD): ``keep`` indices in selection order."""
    n = kernel.shape[0]
    rows = torch.zeros(keep, n, dtype=kernel.dtype, device=kernel.device)  # incremental Cholesky factors
    gains = kernel.diagonal().clone()
    chosen = torch.empty(keep, dtype=torch.long, device=kernel.device)
    # Every step stays on the device (no Python int, no branch on a tensor): see divprune.max_min_greedy. A pick
    # whose gain is not positive leaves its factor row at zero and the gains unchanged, as a skipped update would.
    for i in range(keep):
        j = torch.argmax(gains, dim=0, keepdim=True)
        chosen[i:i + 1] = j
        gain = gains.index_select(0, j)
        residual = kernel.index_select(0, j)[0] - rows[:i].index_select(1, j)[:, 0] @ rows[:i]
        e = torch.where(gain > 0, residual / gain.clamp(min=0).sqrt(), torch.zeros_like(residual))
        rows[i] = e
        gains -= e.square()
        gains.index_fill_(0, j, -float("inf"))
    return chosen


@register_prune("cdpruner_pre_llm", params=[SIGN])
def cdpruner_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """CDPruner: conditional DPP (instruction relevance x cosine similarity), greedy MAP."""
    visual = ctx.features.float()
    unit = torch.nn.functional.normalize(visual, dim=1)
    instruction = ctx.input_embeddings()[ctx.text_after_span().to(ctx.hidden_states.device)]
    rel = relevance(visual, instruction, ctx.params["CDPRUNER_RELEVANCE_SIGN"])
    kernel = rel[:, None] * (unit @ unit.T) * rel[None, :]
    return dpp_greedy_map(kernel, ctx.keep).sort().values
