"""DART, "Stop Looking for Important Tokens..." (Wen et al., EMNLP 2025; official code ZichenWen1/DART, read
through the fork xqy1111111/DART at upstream commit 5a19452: ``Qwen2_5-VL/Qwen2_5VL_DART/
modeling_qwen2_5_vl_self.py`` and ``llava/model/language_model/modeling_llama_self.py``, ``get_retained_image_token``).

Before decoder layer K (default 2), from layer K-1:

* keys k: layer K-1's post-RoPE key states, flattened over heads; h: the hidden states entering layer K passed
  through the language model's *final* norm (UniPruneBench uses the pruning layer's input norm instead);
* pivots: the ``P_img`` visual tokens of the span with the largest L1 norm of k, and the ``P_txt`` text tokens
  after the span with the largest L1 norm of k (ties: lower index);
* the other visual tokens form a pool; each pivot in turn takes the pool tokens *least* cosine-similar to it
  (in h) and removes them from the pool;
* kept = the image pivots and everything the pivots took (text pivots are text: never pruned), in original
  order with original positions.

The pivots are visited in the official order, the iteration order of a Python ``set`` built from the list of
their sequence indices (image pivots, then text pivots, each in score order; neither score nor position order
results); the indices are taken relative to the sample's first real token, so a sample visits its pivots in the
same order alone or inside a left-padded batch.

Count rule (exact, the toolkit's K). Official: each pivot takes ``TOPK = int(N (1 - r) / (P_img + P_txt))``
(Qwen2.5-VL) or ``ceil(128 // 8)`` (LLaVA), so ``P_img + (P_img + P_txt) TOPK`` tokens are kept, only about
the target. Here the image pivots are ``min(P_img, K)`` of the K kept tokens, the remaining
``R = K - #image pivots`` are shared by the pivots: each takes ``R // P`` and the first ``R mod P`` pivots in
visiting order one more (P = number of pivots), so exactly K tokens are kept (and the pool never runs dry,
where the official ``topk`` fails). With fewer than ``P_txt`` text tokens after the span, all of them are pivots.

Signals are key states and normed hidden states only (no attention matrix): flash-attention compatible.
Hyper-parameters: ``DART_PIVOT_IMAGE_TOKENS`` (4), ``DART_PIVOT_TEXT_TOKENS`` (4), the official defaults
(UniPruneBench: 10 and 5). No randomness.
"""

import torch

from methods._base import HyperParam, PruneContext, register_prune

PIVOT_IMAGE = HyperParam("DART_PIVOT_IMAGE_TOKENS", 4, int, "visual pivot tokens (largest key L1 norm)",
                         check=lambda n: None if n >= 1 else "must be >= 1")
PIVOT_TEXT = HyperParam("DART_PIVOT_TEXT_TOKENS", 4, int, "text pivot tokens after the span (largest key L1 norm)",
                        check=lambda n: None if n >= 0 else "must be >= 0")


def top_rows(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest scores (ties: lower index), in score order."""
    return torch.sort(scores, descending=True, stable=True).indices[:count]


def dart_select(keys: torch.Tensor, normed: torch.Tensor, span_rows: torch.Tensor, text_rows: torch.Tensor,
                keep: int, pivot_image: int, pivot_text: int, origin: int = 0) -> torch.Tensor:
    """Span-local indices (ascending) kept by DART.

    keys [L, H*d] and normed [L, D] cover the sample's sequence; ``span_rows`` / ``text_rows`` are sequence
    rows of the span and of the text after it; ``origin`` is the sequence row the official indices count from.
    """
    n = span_rows.numel()
    l1 = keys.float().abs().sum(dim=-1)
    image_pivots = top_rows(l1[span_rows], min(pivot_image, keep))  # span-local
    text_pivots = text_rows[top_rows(l1[text_rows], min(pivot_text, text_rows.numel()))]  # sequence rows
    # Official visiting order: iterate ``set(image_indices + query_indices)``, a set built from a *list* of the
    # pivots' sequence indices, image pivots then text pivots, each in score order. (CPython sizes a set built from
    # a dict differently, so ``set(<dict>)`` of the same indices can iterate in another order.)
    official = [int(span_rows[i]) - origin for i in image_pivots] + [int(t) - origin for t in text_pivots]
    visit = [index + origin for index in set(official)]

    share, extra = divmod(keep - image_pivots.numel(), len(visit))
    unit = torch.nn.functional.normalize(normed.float(), dim=-1)
    span_unit = unit[span_rows]
    in_pool = torch.ones(n, dtype=torch.bool, device=span_unit.device)
    in_pool[image_pivots] = False
    kept = [image_pivots.to(span_unit.device)]
    for order, row in enumerate(visit):
        take = share + (1 if order < extra else 0)
        if take == 0:
            continue
        similarity = (span_unit @ unit[row]).masked_fill(~in_pool, float("inf"))
        chosen = torch.sort(similarity, stable=True).indices[:take]  # least similar first
        in_pool[chosen] = False
        kept.append(chosen)
    return torch.cat(kept).sort().values


@register_prune("dart_intra_llm", params=[PIVOT_IMAGE, PIVOT_TEXT], default_layer=2, min_layer=1)
def dart_intra_llm(ctx: PruneContext) -> torch.Tensor:
    """DART: keep the visual tokens least similar to key-norm pivots (final-norm hidden states, layer K-1)."""
    keys = ctx.key_states().flatten(1)  # [L, H_kv * d], post-RoPE, layer K-1
    device = keys.device
    span_rows, text_rows = ctx.span_positions.to(device), ctx.text_after_span().to(device)
    origin = int(torch.cat([ctx.text_positions[:1], ctx.span_positions[:1]]).min())
    return dart_select(keys, ctx.final_normed_hidden_states(), span_rows, text_rows, ctx.keep,
                       ctx.params["DART_PIVOT_IMAGE_TOKENS"], ctx.params["DART_PIVOT_TEXT_TOKENS"], origin)
