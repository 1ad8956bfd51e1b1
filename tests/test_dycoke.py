"""DyCoke's temporal token merging (methods/dycoke.py) on hand-made videos whose answer is known, and against a loop
written the way the official code (KD-TAO/DyCoke, ``dycole_ttm`` in llava/model/llava_arch.py) computes it, with
the documented fixes (each pair ranked by its own similarity; an unpaired last frame kept whole)."""

import pytest
import torch
import torch.nn.functional as F

import custom_qwenvl
from methods import PRE_LLM, PruneContext, VideoFrames, registered_methods
from methods.dycoke import decode_keep, dycoke_pre_llm, ttm_plan
from tests.oracle import forward_logits, greedy, patched
from tests.support.tiny_models import build_model
from tests.test_qwenvl import inputs_for

pytestmark = pytest.mark.usefixtures("one_thread")


def video_context(features, frames, size, *, keep=None, rate="auto", modality="video"):
    n = features.shape[0]
    frame = torch.arange(frames).repeat_interleave(n // frames) if size else torch.zeros(n, dtype=torch.long)
    video = VideoFrames(frame, frames, size)
    return PruneContext(features=features, keep=n if keep is None else keep, grid=(frames, *size) if size else None,
                        modality=modality, stage=PRE_LLM, params={"DYCOKE_K": rate}, span_key=0, video=video)


def kept(ctx) -> list[int]:
    return sorted(dycoke_pre_llm(ctx).tolist())


def official_ttm(features, tokens, rate):
    """The official ``dycole_ttm`` loops, as kept span indices: frames appended pairwise (frame i whole, frame i + 1's
    least similar int((1 - K) * n) tokens), then every window of four from ``range(0, T - 4, 4)`` replacing frame
    i + 2 by its least similar tokens against frame i. Fixed: ``similarities[i // 2]`` (officially ``(i - 2) // 2``)
    and an odd last frame appended whole (officially dropped)."""
    frames = features.shape[0] // tokens
    keep_share = 1 - rate
    frame = [features[f * tokens:(f + 1) * tokens] for f in range(frames)]
    positions = [torch.arange(f * tokens, (f + 1) * tokens) for f in range(frames)]
    similarities = [F.cosine_similarity(F.normalize(frame[i], p=2, dim=1), F.normalize(frame[i + 1], p=2, dim=1), dim=1)
                    for i in range(0, frames - 1, 2)]
    modified = []
    for i in range(0, frames - 1, 2):
        keep = similarities[i // 2].topk(int(keep_share * tokens), largest=False).indices
        modified += [positions[i], positions[i + 1][keep]]
    if frames % 2:
        modified.append(positions[-1])
    for i in range(0, frames - 4, 4):
        similarity = F.cosine_similarity(frame[i], frame[i + 2], dim=1)
        keep = similarity.topk(int(keep_share * tokens), largest=False).indices
        modified[i], modified[i + 2] = positions[i], positions[i + 2][keep]
    return sorted(torch.cat(modified).tolist())


# ---------------------------------------------------------------- registration and grouping
def test_registration():
    spec = registered_methods()["dycoke_pre_llm"]
    assert spec.stage == PRE_LLM and spec.video and not spec.exact_count and spec.description
    assert {p.env: p.default for p in spec.params} == {"DYCOKE_K": "auto", "DYCOKE_DECODE": 1, "DYCOKE_L": 3,
                                                       "DYCOKE_P": 0.8}  # official dycoke_k, dycoke_l, dycoke_p
    assert spec.params[0].type(" AUTO ") == "auto" and spec.params[0].type("0.7") == 0.7
    assert spec.params[0].check(1.5) and spec.params[0].check(0.7) is None and spec.params[0].check("auto") is None


@pytest.mark.parametrize("frames, whole, compared", [
    (1, [0], []),
    (2, [0], [(1, 0)]),
    (3, [0, 2], [(1, 0)]),  # the unpaired last frame stays whole
    (4, [0, 2], [(1, 0), (3, 2)]),  # official range(0, T - 4, 4) is empty: no pivot step
    (5, [0, 4], [(1, 0), (2, 0), (3, 2)]),
    (8, [0, 4, 6], [(1, 0), (2, 0), (3, 2), (5, 4), (7, 6)]),  # the last window keeps its frame 6 (official)
    (9, [0, 4, 8], [(1, 0), (2, 0), (3, 2), (5, 4), (6, 4), (7, 6)]),
])
def test_frames_are_grouped_in_pairs_and_windows_of_four_as_officially(frames, whole, compared):
    assert ttm_plan(frames) == (whole, compared)


# ---------------------------------------------------------------- planted redundancy
def planted_video(frames=8, side=3, dim=16, seed=0):
    """Each compared frame equals its reference frame except at two planted positions (new random tokens)."""
    gen = torch.Generator().manual_seed(seed)
    n = side * side
    grid = torch.randn(frames, n, dim, generator=gen)
    changed = {}
    for f, ref in ttm_plan(frames)[1]:
        moved = torch.randperm(n, generator=gen)[:2]
        grid[f] = grid[ref]
        grid[f, moved] = torch.randn(2, dim, generator=gen)
        changed[f] = moved
    return grid, changed


def test_static_tokens_of_later_frames_are_dropped_the_changed_ones_kept():
    """K = 0.7 keeps int(0.3 * 9) = 2 tokens per compared frame: exactly the two planted changes, found against the
    frame's own reference (frame 2 against the pivot 0, not its neighbour 1; frame 1 against its own pair)."""
    grid, changed = planted_video()
    n = grid.shape[1]
    ctx = video_context(grid.flatten(0, 1), 8, (3, 3), rate=0.7)
    expected = [t for f in (0, 4, 6) for t in range(f * n, (f + 1) * n)]
    expected += [f * n + p for f, moved in changed.items() for p in moved.tolist()]
    assert kept(ctx) == sorted(expected)


def test_the_least_similar_tokens_are_kept_in_order_of_similarity():
    """Frame 1's token j is frame 0's rotated by an angle growing with j: the m kept are the last m positions."""
    dim, n = 8, 9
    base = F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    other = F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(2)), dim=-1)
    other = F.normalize(other - (other * base).sum(-1, keepdim=True) * base, dim=-1)  # orthogonal to base
    angles = torch.linspace(0.1, 1.5, n)[:, None]
    frame1 = torch.cos(angles) * base + torch.sin(angles) * other
    features = torch.cat([base, frame1])
    for keep, m in [(9 + 3, 3), (9 + 7, 7), (18, 9), (9, 0)]:
        assert kept(video_context(features, 2, (3, 3), keep=keep)) == list(range(9)) + list(range(18 - m, 18))


@pytest.mark.parametrize("frames, rate", [(2, 0.7), (5, 0.5), (8, 0.7), (9, 0.3), (12, 0.8)])
def test_matches_the_official_loops_with_a_fixed_rate(frames, rate):
    side = 4
    features = torch.randn(frames * side * side, 12, generator=torch.Generator().manual_seed(frames))
    assert kept(video_context(features, frames, (side, side), rate=rate)) == official_ttm(features, side * side, rate)


def test_official_default_rate_keeps_58_of_196_tokens_per_compared_frame():
    features = torch.randn(4 * 196, 4, generator=torch.Generator().manual_seed(3))
    result = kept(video_context(features, 4, (14, 14), rate=0.7))
    per_frame = torch.bincount(torch.tensor(result) // 196, minlength=4).tolist()
    assert per_frame == [196, 58, 196, 58]


# ---------------------------------------------------------------- counts
def test_auto_rate_keeps_exactly_the_keep_count_down_to_the_whole_frames():
    """KEEP_RATIO sets K: the whole frames (0, 4, 6 of 8) stay and the rest of the budget is shared evenly by the
    compared frames (the remainder to the earliest); below the whole frames' 27 tokens only they remain."""
    grid, _ = planted_video()
    features, n = grid.flatten(0, 1), 9
    for keep in range(1, 73):
        result = kept(video_context(features, 8, (3, 3), keep=keep))
        assert len(result) == min(72, max(keep, 27)) and len(set(result)) == len(result)
        per_frame = torch.bincount(torch.tensor(result) // n, minlength=8)
        assert per_frame[[0, 4, 6]].tolist() == [n] * 3
        compared = per_frame[[1, 2, 3, 5, 7]]
        assert int(compared.max() - compared.min()) <= 1
        assert compared.tolist() == sorted(compared.tolist(), reverse=True)  # the remainder to the earliest
    spread = torch.bincount(torch.tensor(kept(video_context(features, 8, (3, 3), keep=50))) // n, minlength=8)
    assert spread.tolist() == [9, 5, 5, 5, 9, 4, 9, 4]  # 23 over 5 frames: 5, 5, 5, 4, 4
    assert kept(video_context(features, 8, (3, 3), keep=72)) == list(range(72))


def test_auto_rate_equals_the_official_count_of_the_matching_rate():
    """A keep count that the official rule gives for some K (every compared frame m = int((1 - K) * n) tokens) keeps
    the same tokens as that K."""
    features = torch.randn(8 * 16, 6, generator=torch.Generator().manual_seed(4))
    rate, n = 0.75, 16
    m = int((1 - rate) * n)
    assert kept(video_context(features, 8, (4, 4), keep=3 * n + 5 * m)) == official_ttm(features, n, rate)


# ---------------------------------------------------------------- no temporal part
def test_an_image_or_a_one_frame_video_is_kept_whole():
    features = torch.randn(12, 8)
    assert kept(video_context(features, 1, (3, 4), keep=3, modality="image")) == list(range(12))
    assert kept(video_context(features, 1, (3, 4), keep=3, rate=0.9)) == list(range(12))
    # an image of tiles shown as several "frames" is still an image: no temporal merging
    assert kept(video_context(features, 3, (2, 2), keep=3, modality="image")) == list(range(12))


def test_frames_without_complete_grids_are_kept_whole():
    """Frames of 6 and 4 tokens (e.g. after a ViT stage) have no common positions to compare."""
    ctx = video_context(torch.randn(10, 8), 1, None, keep=4)
    ctx.video = VideoFrames(torch.tensor([0] * 6 + [1] * 4), 2, None)
    assert kept(ctx) == list(range(10))


def test_through_the_qwen_hooks_the_image_stays_whole_and_the_video_follows_the_count():
    """Qwen2.5-VL, an image (6 tokens) and a video of 2 temporal patches of 2 x 2: KEEP_RATIO 0.5 keeps 4 of the
    video's 8 (frame 0 whole, none of frame 1), 0.25 the same (its keep count 2 is below the whole frame 0: the
    floor), 0.75 frame 0 and 2 of frame 1, 1.0 everything."""
    model, inputs = build_model("qwen2_5_vl"), inputs_for("qwen2_5_vl", "image_video")
    counts = {}
    for ratio in ("1.0", "0.75", "0.5", "0.25"):
        with patched(custom_qwenvl, PRUNE_METHOD="dycoke_pre_llm", KEEP_RATIO=ratio):
            forward_logits(model, inputs)
            record = custom_qwenvl.last_record(model)
        counts[ratio] = [(s.modality, s.counts["input"], s.counts["pre_llm"]) for s in record.spans[0]]
    assert counts == {"1.0": [("image", 6, 6), ("video", 8, 8)], "0.75": [("image", 6, 6), ("video", 8, 6)],
                      "0.5": [("image", 6, 6), ("video", 8, 4)], "0.25": [("image", 6, 6), ("video", 8, 4)]}



# ---------------------------------------------------------------- the decode-time stage (dynamic KV-cache pruning)
def test_decode_keep_reselects_only_when_the_attention_moved():
    attention = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])
    first = decode_keep(attention, None, rate=0.6)  # int(5 * 0.4) = 2 kept: the two most attended
    assert first.tolist() == [False, True, False, True, False]
    assert decode_keep(attention * 1.01, attention, rate=0.6) is None  # cosine >= 0.9: no selection this step
    moved = torch.tensor([0.5, 0.01, 0.4, 0.01, 0.08])
    assert F.cosine_similarity(moved, attention, dim=0) < 0.9
    assert decode_keep(moved, attention, rate=0.6).tolist() == [True, False, True, False, False]
    assert not decode_keep(attention, None, rate=1.0).any()  # int(5 * 0) = 0, as officially


def test_decode_stage_equals_masking_the_officially_selected_entries():
    """Qwen2.5-VL (4 layers, eager), a left-padded batch of two images (TTM keeps images whole), DYCOKE_L = 2: every
    decode step equals the run without the decode stage whose layers >= 2 do not see the visual entries the
    official rule leaves out, that rule applied to the model's own eager attention weights of layer 1 (the current
    token's row, heads averaged; re-selected at the first step and whenever the cosine with the previous step's
    falls below 0.9, else nothing hidden)."""
    model = build_model("qwen2_5_vl", attn_implementation="eager")
    inputs = inputs_for("qwen2_5_vl", "batch")
    env = dict(PRUNE_METHOD="dycoke_pre_llm", KEEP_RATIO=1.0, DYCOKE_L=2, DYCOKE_P=0.5)
    with patched(custom_qwenvl, **env):
        ids, steps = greedy(model, inputs)
    with patched(custom_qwenvl, **env, DYCOKE_DECODE=0):
        plain_ids, plain_steps = greedy(model, inputs)
    layers = model.model.language_model.layers
    visual = [torch.nonzero(row == model.config.image_token_id).flatten() for row in inputs["input_ids"]]
    previous, hidden, reselected = {}, {}, []

    def official(module, args, output):
        weights = output[1]  # (B, H, q, kv): eager attention probabilities
        if weights.shape[2] != 1:
            return  # the prefill: no decode stage
        hidden.clear()
        for b in range(weights.shape[0]):
            attention = weights[b].mean(0)[-1][visual[b]]
            moved = b not in previous or F.cosine_similarity(attention, previous[b], dim=0) < 0.9
            previous[b] = attention
            reselected.append(bool(moved))
            if moved:
                keep = torch.topk(attention, int(attention.numel() * 0.5)).indices
                hidden[b] = visual[b][~torch.isin(torch.arange(attention.numel()), keep)]

    def hide(module, args, kwargs):
        mask = kwargs["attention_mask"]
        if mask.shape[2] == 1 and hidden:
            mask = mask.clone()
            for b, entries in hidden.items():
                mask[b, :, :, entries] = torch.finfo(mask.dtype).min
            kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [layers[1].self_attn.register_forward_hook(official)]
    handles += [layer.self_attn.register_forward_pre_hook(hide, with_kwargs=True) for layer in layers[2:]]
    try:
        with patched(custom_qwenvl, **env, DYCOKE_DECODE=0):
            ref_ids, ref_steps = greedy(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert True in reselected and False in reselected  # both branches of the rule
    torch.testing.assert_close(steps, ref_steps, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(steps[0], plain_steps[0]) and not torch.allclose(steps[1:], plain_steps[1:], atol=1e-4)


def test_decode_stage_refusals_and_models_that_cannot_carry_it():
    """Before any model loads: refused with an intra-LLM stage or a KV method (unless off). At the first forward,
    on a model that cannot carry it (its layer beyond the model; sliding or KV-shared layers: Gemma 4) it is left
    out with a warning and TTM runs alone: the generation is that of DYCOKE_DECODE=0."""
    from tests.support.tiny_gemma import build_model as build_gemma, build_processor, make_inputs
    from utils import PruneConfig, PruneConfigError
    import custom_gemma4

    base = {"PRUNE_METHOD_PRE_LLM": "dycoke_pre_llm", "KEEP_RATIO": "0.5"}
    for extra in ({"PRUNE_METHOD_INTRA_LLM": "fastv_intra_llm"}, {"KV_METHOD": "snapkv_kv", "KV_BUDGET": "0.5"}):
        with pytest.raises(PruneConfigError, match=r"^PRUNE_METHOD_PRE_LLM='dycoke_pre_llm': its decode-time stage"):
            PruneConfig.from_env({**base, **extra})
        PruneConfig.from_env({**base, **extra, "DYCOKE_DECODE": "0"})
    cases = [(custom_qwenvl, build_model("qwen2_5_vl"), inputs_for("qwen2_5_vl", "image"), {"DYCOKE_L": 4},
              r"its layer 4 \(DYCOKE_L\) is not one of the model's layers 1\.\.3"),
             (custom_gemma4, build_gemma("e2b"), dict(make_inputs(build_processor(), "image")), {},
              "sliding-window or KV-shared layers")]
    for family, model, inputs, extra, why in cases:
        with patched(family, PRUNE_METHOD="dycoke_pre_llm", KEEP_RATIO=0.5, DYCOKE_DECODE=0, **extra):
            reference = greedy(model, inputs)
        with patched(family, PRUNE_METHOD="dycoke_pre_llm", KEEP_RATIO=0.5, **extra):
            with pytest.warns(UserWarning, match="decode-time stage is left out on this model: .*" + why):
                ids, steps = greedy(model, inputs)
        assert torch.equal(ids, reference[0]) and torch.equal(steps, reference[1])
