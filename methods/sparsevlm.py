"""SparseVLM v1.5 (Zhang et al., ICML 2025; official code Gumpest/SparseVLMs, main branch:
``llava/model/language_model/modelling_sparse_llama.py`` (``LlamaDynamicvitModel.forward``), ``score.py``
(per-budget stage counts, ``attn_postprocess_topk``), ``utils.py`` (``cluster_and_merge``)).

Text raters (once per span, from the language model's input embeddings, as the official code does before the
first layer): with V the span's visual input embeddings (all of them, as the span entered the LM) and T the
input embeddings of the text tokens after the span, ``softmax(V T^T)`` over the text axis is averaged over the
visual rows; the raters are the text tokens whose value exceeds the mean of those values (all of T if none;
with no text after the span every score is 0 and the earliest tokens are kept).

At each stage, official "after layer l" = here "before layer K = l + 1", with layer l = K-1's attention:

1. the raters' attention rows to the span (softmax over every key, fp32, from layer K-1's query/key states;
   rater rows only, never L x L: flash-attention compatible), averaged over heads and raters;
2. keep the ``K_s`` highest (ties: lower index); the rest are pruned;
3. recycling: of the pruned tokens, the ``m = int(0.3 n_pruned) + 1`` with the highest scores are clustered by
   DPC-kNN into ``c = int(m / 10) + 1`` clusters (distance ``||x_i - x_j|| / sqrt(D)`` of the hidden states
   entering layer K; density ``exp(-mean of the squared distances to the c nearest)`` plus uniform noise
   x 1e-6 to break ties, *unseeded* officially and seeded here (``SPARSEVLM_SEED``); centres = the c largest
   density x distance-to-a-denser-token; every token joins its nearest centre), and each cluster becomes one
   token, ``sum / (size + 1e-6)`` as in the official code. A merged token takes the position of its cluster's
   centre (officially the merged tokens are inserted after the kept visual tokens, with compacted positions).

Count rule (``exact_count=False``): ``K_s + c`` tokens when something is pruned (recycling on), else ``K_s``;
recycled tokens are visual tokens for the later stages. ``K_s`` follows the toolkit's keep-count rule with the
stage's cumulative ratio (officially ``min(count_s, N_cur - 1)``, which always drops a token; here ratio 1
keeps everything).

Schedule. Official: prune after layers [2, 6, 15] of 32 (here before layers round(3, 7, 16 x depth / 32),
pushed up to stay distinct and >= 1), with per-stage visual counts of LLaVA's 576 chosen by ``RETAIN_TOKN``, an
*equivalent average* token count over the 32 layers: 192 -> [300, 200, 110], 128 -> [303, 110, 36],
96 -> [238, 48, 26], 64 -> [66, 30, 17]. Named alone, **KEEP_RATIO is that average budget as a fraction**
(``RETAIN_TOKN / 576``): at 1/3, 2/9, 1/6 and 1/9 the stage ratios are exactly the official counts / 576;
in between they are interpolated linearly, towards (1, 1, 1) above 1/3 and towards (0, 0, 0) below 1/9.
In ``INTRA_LLM_LAYER_SPECS`` each entry is one stage with that cumulative ratio.

Not reproduced: v2.0 ("SparseVLM+": gravity correction, head selection, no recycling) and position compaction.
Hyper-parameters: ``SPARSEVLM_RECYCLE`` (1: recycle, as v1.5; 0: plain top-K), ``SPARSEVLM_SEED`` (0).
"""

import torch

from methods._base import HyperParam, PruneContext, PruneResult, register_prune
from methods._schedule import scale_layers

RECYCLE = HyperParam("SPARSEVLM_RECYCLE", 1, int, "merge the best pruned tokens into DPC-kNN cluster tokens (1) or not (0)",
                     check=lambda v: None if v in (0, 1) else "must be 0 or 1")
SEED = HyperParam("SPARSEVLM_SEED", 0, int, "seed of the density tie-breaking noise (unseeded officially)")

# Official stage boundaries (pruning after layers 2, 6, 15 = before layers 3, 7, 16) of LLaVA-1.5's 32 layers,
# and per-stage visual counts of its 576 tokens for each RETAIN_TOKN budget (v1.5 ``score.py``).
OFFICIAL_LAYERS, OFFICIAL_DEPTH, OFFICIAL_TOKENS = (3, 7, 16), 32, 576
OFFICIAL_COUNTS = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}


def stage_ratios(keep_ratio: float) -> tuple[float, float, float]:
    """Per-stage cumulative ratios for an average budget ``keep_ratio`` (piecewise linear through the
    official budgets, with (0, 0, 0) at 0 and (1, 1, 1) at 1)."""
    anchors = [(0.0, (0.0, 0.0, 0.0))]
    anchors += [(t / OFFICIAL_TOKENS, tuple(c / OFFICIAL_TOKENS for c in counts))
                for t, counts in sorted(OFFICIAL_COUNTS.items())]
    anchors += [(1.0, (1.0, 1.0, 1.0))]
    for (x0, y0), (x1, y1) in zip(anchors, anchors[1:]):
        if keep_ratio <= x1:
            w = (keep_ratio - x0) / (x1 - x0)
            return tuple((1 - w) * a + w * b for a, b in zip(y0, y1))  # exact at both anchors
    return anchors[-1][1]


def sparsevlm_schedule(num_layers: int, keep_ratio: float) -> list[tuple[int, float]]:
    layers = scale_layers(OFFICIAL_LAYERS, OFFICIAL_DEPTH, num_layers, min_layer=1)
    return list(zip(layers, stage_ratios(keep_ratio)))


def text_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices into ``text`` of the rater tokens: softmax(V T^T) over text, mean over V, above its mean."""
    relation = torch.softmax(visual.float() @ text.float().T, dim=1).mean(dim=0)
    raters = torch.nonzero(relation > relation.mean()).flatten()
    return raters if raters.numel() else torch.arange(text.shape[0], device=text.device)


def dpc_knn_merge(tokens: torch.Tensor, clusters: int, generator: torch.Generator):
    """DPC-kNN clustering of ``tokens`` [m, D] into ``clusters`` groups, each averaged as the official code does
    (sum / (size + 1e-6)). Returns (centre index of each cluster, merged tokens [clusters, D])."""
    x = tokens.float()
    distance = torch.cdist(x, x) / x.shape[1] ** 0.5
    nearest = torch.topk(distance, k=clusters, dim=1, largest=False).values
    noise = torch.rand(x.shape[0], generator=generator).to(x.device) * 1e-6
    density = (-(nearest ** 2).mean(dim=1)).exp() + noise
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    parent_distance = torch.where(denser, distance, distance.max()).amin(dim=1)
    centres = torch.topk(parent_distance * density, k=clusters).indices
    assignment = distance[centres].argmin(dim=0)  # nearest centre of every token
    assignment[centres] = torch.arange(clusters, device=x.device)  # a centre always joins its own cluster
    sizes = torch.zeros(clusters, device=x.device).index_add_(0, assignment, torch.ones(x.shape[0], device=x.device))
    merged = torch.zeros(clusters, x.shape[1], device=x.device).index_add_(0, assignment, x)
    return centres, merged / (sizes[:, None] + 1e-6)


@register_prune("sparsevlm_intra_llm", params=[RECYCLE, SEED], default_schedule=sparsevlm_schedule,
                min_layer=1, exact_count=False)
def sparsevlm_intra_llm(ctx: PruneContext) -> torch.Tensor | PruneResult:
    """SparseVLM v1.5: text-rater attention of layer K-1, top-K, pruned tokens recycled by DPC-kNN merging."""
    text_rows = ctx.text_after_span()
    if text_rows.numel():
        embeddings = ctx.input_embeddings()
        raters = text_rows[text_raters(ctx.span_input_embeddings(), embeddings[text_rows.to(embeddings.device)]).cpu()]
        scores = ctx.attention_to_span(raters).mean(dim=0).mean(dim=0)  # heads, then raters -> [N]
    else:  # nothing after the span can attend to it: no signal, the earliest tokens are kept
        scores = torch.zeros(ctx.num_tokens, device=ctx.features.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    kept, pruned = order[:ctx.keep].sort().values, order[ctx.keep:]  # pruned: best score first
    if pruned.numel() == 0 or not ctx.params["SPARSEVLM_RECYCLE"]:
        return kept
    candidates = pruned[:int(0.3 * pruned.numel()) + 1]
    clusters = int(candidates.numel() / 10) + 1
    centres, merged = dpc_knn_merge(ctx.features[candidates], clusters, ctx.generator(ctx.params["SPARSEVLM_SEED"]))
    indices = torch.cat([kept, candidates[centres]])
    return PruneResult(indices, torch.cat([ctx.features[kept].float(), merged]))
