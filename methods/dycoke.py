"""DyCoke ("DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models", Tao et al., CVPR 2025;
official code KD-TAO/DyCoke: ``dycole_ttm`` in llava/model/llava_arch.py, its defaults in
lmms_eval/models/llava_onevision.py and llava/model/language_model/llava_qwen.py).

This is DyCoke's first stage, temporal token merging (TTM), on the projected visual tokens of one whole video,
before the language model. Its second stage is not here: during decoding the official code re-selects, at layer
``dycoke_l`` = 3, the top (1 - ``dycoke_p``) visual entries of the KV cache (``dycoke_p`` = 0.8) by the last
token's attention whenever that attention's cosine similarity with the previous step's falls below 0.9; the
toolkit's KV stage (kv_stage.py) compresses once after the prefill and has no per-step re-selection yet.

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

Flash compatibility: yes (features only).
"""

import torch
import torch.nn.functional as F

from methods._base import HyperParam, PruneContext, register_prune

AUTO = "auto"


def prune_rate(text: str) -> str | float:
    """'auto' or a pruning rate."""
    value = text.strip().lower()
    return AUTO if value == AUTO else float(value)


PRUNE_RATE = HyperParam("DYCOKE_K", AUTO, prune_rate,
                        "TTM pruning rate K of the compared frames (each keeps int((1 - K) * n) of its n tokens; "
                        "official dycoke_k 0.7); 'auto': K from KEEP_RATIO so that exactly the keep count remains",
                        check=lambda k: None if k == AUTO or 0.0 <= k <= 1.0 else "must be 'auto' or in [0, 1]")


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


@register_prune("dycoke_pre_llm", params=[PRUNE_RATE], video=True, exact_count=False)
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
