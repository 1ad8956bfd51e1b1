"""DyCoke ("DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models", Tao et al., CVPR 2025;
official code KD-TAO/DyCoke: ``dycole_ttm`` in llava/model/llava_arch.py, its defaults in
lmms_eval/models/llava_onevision.py and llava/model/language_model/llava_qwen.py).

This is DyCoke's first stage, temporal token merging (TTM), on the projected visual tokens of one whole video,
before the language model, and its second stage, dynamic KV-cache pruning during decoding (``DYCOKE_DECODE``, on
by default as with the official ``dycoke=True``; official ``modeling_qwen2.py``, ``PrunableDynamicCache``):

  At every decode step (not in the prefill), the current token's attention at layer ``DYCOKE_L`` - 1 (official
  ``dycoke_l`` = 3: the weights of layer 2, heads averaged, over the whole cache) is taken at the visual entries.
  If it is the first step, or its cosine similarity with the previous step's is below 0.9, layers >= ``DYCOKE_L``
  attend in this step only to the ``int(N (1 - DYCOKE_P))`` visual entries it attends to most (official
  ``dycoke_p`` = 0.8; ``torch.topk``) plus every text entry; otherwise (similar attention) the official code
  leaves its selection unset, since it resets it at every step before layer ``dycoke_l``, so that step attends to
  every entry -- kept here. The cache keeps every entry: a later step may select others. The previous step's
  attention is forgotten at each new prompt (officially it carries over to the next sample).
  Composes with nothing that changes the cache's layout after the prefill (with intra-LLM stages or ``KV_METHOD``
  it is refused before any model loads). On a model whose layers do not all own a full-attention cache (Gemma 4)
  or that has no layer ``DYCOKE_L``, it is left out with a warning and TTM runs alone. With ``DYCOKE_DECODE=0``
  TTM alone runs.

Rule (frames are what the model encodes as one temporal step, n tokens each, compared position by position):
  1. pairs: for every pair of frames (2j, 2j + 1), the cosine similarity of each token of frame 2j + 1 with the
     token at the same position of frame 2j (official: ``range(0, T - 1, 2)``);
  2. pivots: for every window of four frames starting at 4j, frame 4j + 2 is compared with the window's first
     frame 4j (the pivot) instead, position by position (official: ``range(0, T - 4, 4)``, which leaves out the
     last window when T is a multiple of 4: its frame T - 2 stays whole, as officially);
  3. each compared frame keeps its m least similar tokens (official: ``similarity.topk(m, largest=False)``); the
     other tokens are dropped as redundant with the earlier frame. The frames nothing is compared against (4j,
     the uncompared 4j + 2, an unpaired last frame) stay whole. Despite the name nothing is averaged: the
     official TTM drops tokens, and so does this one. Similarities are of the original tokens (a frame 4j + 2
     pruned in step 2 still serves whole as frame 4j + 3's reference in step 1). No randomness.

Count (``exact_count=False``). DYCOKE_K is the official pruning rate K (lmms_eval ``dycoke_k``, default 0.7):
  * DYCOKE_K = a number K: m = int((1 - K) * n) in every compared frame (the official count: K = 0.7 keeps
    58 of LLaVA-OneVision's 196 tokens per compared frame: 49 % of its 32-frame videos); KEEP_RATIO is ignored.
  * DYCOKE_K = auto (default): K is derived from KEEP_RATIO so that exactly ``ctx.keep`` tokens remain: the whole
    frames W are kept and the rest of the budget, ``ctx.keep - W * n``, is shared evenly by the C compared frames
    (the same m in each, one more in the earliest frames for the remainder), the official count for
    int((1 - K) * n) = m. TTM cannot go below its whole frames: when ``ctx.keep < W * n`` (KEEP_RATIO under
    W / T, about 1/4: 9 of 32 frames, 5 of 16) only the whole frames remain, W * n tokens.
    Kept = min(N, max(ctx.keep, W * n)).
  An image (also one whose tiles reach the method as several "frames") or a one-frame video is kept whole.

Adaptations (minimal):
  * Pair index: the official code ranks frame 2j + 1 by ``similarities[(i - 2) // 2]``, i.e. by the similarity
    of the previous pair (frame 1 by the last pair's), an off-by-one; here each frame is ranked by its own
    pair's similarity (the pairing the loop builds), as the ports in ModelTC/LLMC and
    mvish7/dycoke_token_compression (linked from the official README) do.
  * Odd T: the official loop appends frames in pairs, so an odd last frame is silently dropped (and T <= 4 makes
    its ``torch.stack`` of no pivot similarities fail); here an unpaired last frame stays whole and short
    videos simply have no pivot step.
  * Frames are the model's temporal steps (Qwen2/2.5-VL: a temporal patch of two input frames; Qwen3-VL: a
    frame block; LLaVA-OneVision: a pooled frame, 196 tokens officially), n = h * w of ``ctx.video.size``.
    Frames that are no complete token grids (``size`` None: after a ViT stage) cannot be compared position by
    position: the video is then kept whole.
  * Similarities in fp32 (``F.cosine_similarity``, eps 1e-8; the official pair step normalises first: the same
    up to eps); ties keep the lower position (stable sort; ``topk`` leaves their order to the backend).

Hyper-parameters:
  DYCOKE_K (default auto; official 0.7): the pruning rate of the compared frames, or auto (from KEEP_RATIO).
  DYCOKE_DECODE (1), DYCOKE_L (3), DYCOKE_P (0.8): the decode-time stage, its layer and its pruning rate.

Flash compatibility: yes (features only).
"""

import torch
import torch.nn.functional as F

from methods._base import DecodeSelection, HyperParam, PruneContext, register_prune

AUTO = "auto"


def prune_rate(text: str) -> str | float:
    """'auto' or a pruning rate."""
    value = text.strip().lower()
    return AUTO if value == AUTO else float(value)


PRUNE_RATE = HyperParam("DYCOKE_K", AUTO, prune_rate,
                        "TTM pruning rate K of the compared frames (each keeps int((1 - K) * n) of its n tokens; "
                        "official dycoke_k 0.7); 'auto': K from KEEP_RATIO so that exactly the keep count remains",
                        check=lambda k: None if k == AUTO or 0.0 <= k <= 1.0 else "must be 'auto' or in [0, 1]")


DECODE = HyperParam("DYCOKE_DECODE", 1, int, "1: the decode-time stage (dynamic KV-cache pruning) runs, as "
                    "officially; 0: TTM alone", check=lambda v: None if v in (0, 1) else "must be 0 or 1")
DECODE_LAYER = HyperParam("DYCOKE_L", 3, int, "decode stage: layers >= L attend to the selected visual entries, "
                          "chosen by layer L-1's attention (official dycoke_l 3)",
                          check=lambda v: None if v >= 1 else "must be >= 1")
DECODE_RATE = HyperParam("DYCOKE_P", 0.8, float, "decode stage: share of the visual entries left out at a "
                         "re-selecting step (official dycoke_p 0.8)",
                         check=lambda v: None if 0.0 <= v <= 1.0 else "must be in [0, 1]")
SIMILAR = 0.9  # official: re-select when the attention's cosine similarity with the previous step's is below this


def decode_keep(attention: torch.Tensor, previous: torch.Tensor | None, rate: float) -> torch.Tensor | None:
    """The visual entries a decode step attends to: the int(N (1 - rate)) most attended ([N] bool), or None (every
    entry) when the attention is as the previous step's (cosine >= 0.9), as the official code behaves."""
    if previous is not None and previous.shape == attention.shape and \
            float(F.cosine_similarity(attention, previous, dim=0)) >= SIMILAR:
        return None
    keep = torch.zeros(attention.numel(), dtype=torch.bool, device=attention.device)
    keep[torch.topk(attention, int(attention.numel() * (1 - rate))).indices] = True
    return keep


def decode_stage(params) -> DecodeSelection | None:
    if not params["DYCOKE_DECODE"]:
        return None
    rate = params["DYCOKE_P"]
    return DecodeSelection(params["DYCOKE_L"], lambda attention, previous: decode_keep(attention, previous, rate))


def ttm_plan(frames: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The official grouping of ``frames`` frames: (the whole frames, [(compared frame, its reference frame)]), both
    in time order."""
    reference = {}
    for i in range(0, frames - 1, 2):  # pairs: frame i + 1 against frame i
        reference[i + 1] = i
    for i in range(0, frames - 4, 4):  # windows of four: frame i + 2 against the pivot frame i (official range)
        reference[i + 2] = i
    return [f for f in range(frames) if f not in reference], sorted(reference.items())


def frame_budgets(rate: str | float, keep: int, tokens: int, whole: int, compared: int) -> list[int]:
    """Tokens each compared frame keeps (see the module docstring, "Count")."""
    if rate != AUTO:
        return [int((1 - rate) * tokens)] * compared  # official: int(merging_ratio * num_tokens_per_frame)
    spare = min(max(keep - whole * tokens, 0), compared * tokens)
    base, extra = divmod(spare, compared)
    return [base + (1 if q < extra else 0) for q in range(compared)]


def least_similar(similarity: torch.Tensor, m: int) -> torch.Tensor:
    """Positions of the ``m`` least similar tokens (official ``topk(m, largest=False)``; ties: the lower position)."""
    return torch.sort(similarity, stable=True).indices[:m]


@register_prune("dycoke_pre_llm", params=[PRUNE_RATE, DECODE, DECODE_LAYER, DECODE_RATE], video=True,
                exact_count=False, decode=decode_stage)
def dycoke_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """DyCoke TTM: drop the tokens of frames 2j+1 (vs 2j) and 4j+2 (vs pivot 4j) most similar at the same position."""
    n_all = ctx.num_tokens
    device = ctx.features.device
    video = ctx.video
    if ctx.modality != "video" or video is None or video.count < 2 or video.size is None:
        return torch.arange(n_all, device=device)
    frames, tokens = video.count, video.size[0] * video.size[1]
    whole, compared = ttm_plan(frames)
    grid = video.frame_tokens(ctx.features).float()
    targets = torch.tensor([f for f, _ in compared], device=device)
    references = torch.tensor([r for _, r in compared], device=device)
    similarity = F.cosine_similarity(grid[targets], grid[references], dim=-1)  # [C, n]
    budgets = frame_budgets(ctx.params["DYCOKE_K"], ctx.keep, tokens, len(whole), len(compared))
    kept = [torch.arange(f * tokens, (f + 1) * tokens, device=device) for f in whole]
    kept += [f * tokens + least_similar(similarity[q], m) for q, ((f, _), m) in enumerate(zip(compared, budgets))]
    return torch.cat(kept)
