"""Model-independent hook machinery: visual spans, sequence layouts, running a method on every span, the
per-forward token-count record, lazily computed attention signals, and the decoder-layer hooks that drop
tokens inside the language model.

A model family (``custom_<family>.py``) supplies a :class:`FamilyAdapter` that knows its internals
(positions, masks, extra per-token tensors, how to project queries and keys); this module knows nothing
about any particular model, and nothing about which method runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

import methods
import kv_stage
import profiling
from methods import PRE_LLM, VIT, PruneContext, PruneResult, SignalSource, VideoFrames, VisionNeeds, VisionSignals
from utils import ATTENTION_BLOCK_ELEMENTS, PruneConfig, PruneConfigError, Stage, keep_count

TEXT = -1  # span id of a text token in a Layout
PAD = -2  # span id of a padding slot
FIXED = -3  # span id of a placeholder token that is no visual feature (a newline): kept, never pruned


# --------------------------------------------------------------------------------------------------
# Spans, layouts, records
# --------------------------------------------------------------------------------------------------
@dataclass
class Span:
    """One image, video or frame of one sample, and its visual-token count after each stage."""

    modality: str
    grid: tuple[int, int, int] | None
    counts: dict[str, int] = field(default_factory=dict)  # stage label -> tokens left ('input', 'pre_llm', 'layer_2')
    # Whether the span's shape came from the feature call's SpanShapes (find_layout); False for a run no shape fitted,
    # which therefore gets no vision signals. A shaped span may still have no grid (LLaVA-NeXT's image with tiles).
    shaped: bool = True
    # The video this span belongs to (an id unique within the forward), None for an image: the spans of one video
    # (Qwen3-VL's frames) are shown to a video method together.
    video: int | None = None
    times: tuple[float, ...] | None = None  # seconds of each frame of the span, where the model is given them

    @property
    def llm_input(self) -> int:
        """Tokens the language model received (after the ViT and pre-LLM stages, if any)."""
        before_lm = [n for label, n in self.counts.items() if not label.startswith("layer_")]
        return before_lm[-1]

    @property
    def current(self) -> int:
        return list(self.counts.values())[-1]


@dataclass
class Layout:
    """What each position of the current (B, L) sequence is: text, padding, or a token of span s."""

    span_id: torch.Tensor  # (B, L) long: TEXT, PAD, FIXED or a span index into spans[b]
    attention_mask: torch.Tensor | None  # (B, L) 2-D padding mask of this layout, None = no padding
    spans: list[list[Span]]
    # (B, L) long: the group an earlier stage of this prefill gave each token (PruneResult.groups), -1 for none;
    # None until a stage gives groups
    groups: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.span_id.shape[1]


@dataclass
class ForwardRecord:
    """Visual tokens per span before and after each stage, for one prefill; read by runners and profilers."""

    spans: list[list[Span]]  # per sample
    # The KV stage's per-layer outcome: layer -> {"before": [entries per sample], "after": [kept per head per sample]}
    kv_layers: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    # Per sample, the prompt entries each decoder layer's cache holds after the prefill (padding slots excluded):
    # the cache size at which token pruning and KV-cache compression compare
    cached: list[list[int]] = field(default_factory=list)

    def as_dict(self) -> list[list[dict]]:
        return [[{"modality": s.modality, "grid": s.grid, "tokens": dict(s.counts)} for s in sample]
                for sample in self.spans]

    def totals(self) -> dict[str, int]:
        """Visual tokens summed over every span of the batch, per stage label."""
        out: dict[str, int] = {}
        for sample in self.spans:
            for span in sample:
                for label, n in span.counts.items():
                    out[label] = out.get(label, 0) + n
        return out


@dataclass(frozen=True)
class SpanShape:
    """What a feature call says of one span: its token grid and the placeholder tokens that are not its features.

    length: placeholder tokens the span occupies in the sequence (grid tokens plus fixed ones).
    grid:   (t, h, w) of the span's prunable tokens in LLM tokens, raster order; None when they form no single grid
            (e.g. LLaVA-NeXT's base image followed by its unpadded tiles).
    fixed:  span-local offsets of tokens that are never pruned and keep their positions (LLaVA-NeXT/OneVision's
            ``image_newline`` rows ends, OneVision's newline after a video); they are not counted as visual tokens.
    """

    length: int
    grid: tuple[int, int, int] | None = None
    fixed: tuple[int, ...] = ()
    video: int | None = None  # see Span.video
    times: tuple[float, ...] | None = None

    @classmethod
    def of(cls, grid) -> "SpanShape":
        """A SpanShape as given, or from a bare (t, h, w) grid (every placeholder token is a feature)."""
        if isinstance(grid, SpanShape):
            return grid
        grid = tuple(int(v) for v in grid)
        return cls(grid[0] * grid[1] * grid[2], grid)


def find_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    visual_ids: dict[int, str],
    grids: dict[str, list],
    join_runs: bool = False,
) -> Layout:
    """Find every span of visual placeholder tokens in every sample.

    ``grids[modality]`` lists the :class:`SpanShape` (or bare (t, h, w) grid) of each span of that modality in
    order of appearance, batch-major (the order in which the model scatters features). A contiguous run of one
    placeholder id takes the next shapes whose lengths add up to the run exactly: one span each (two images whose
    placeholders touch are two spans), or, with ``join_runs``, one span together (InternVL's tiles of one image,
    laid out between ``<img>`` and ``</img>``; the grid stacks the tiles along t). A run no shapes fit is one span
    without a grid. Fixed tokens get span id FIXED: kept, never shown to a method, not counted.
    """
    batch, length = input_ids.shape
    span_id = torch.full((batch, length), TEXT, dtype=torch.long)
    if attention_mask is not None:
        span_id[attention_mask.cpu() == 0] = PAD
    queues = {modality: [SpanShape.of(g) for g in shapes] for modality, shapes in grids.items()}
    spans: list[list[Span]] = []
    ids = input_ids.cpu()
    for b in range(batch):
        sample: list[Span] = []
        row = ids[b].tolist()
        i = 0
        while i < length:
            modality = visual_ids.get(row[i])
            if modality is None or span_id[b, i] == PAD:
                i += 1
                continue
            j = i
            while j < length and row[j] == row[i]:
                j += 1
            for start, shape, shaped in _fit_run(queues.setdefault(modality, []), j - i, join_runs):
                begin = i + start
                span_id[b, begin:begin + shape.length] = len(sample)
                for offset in shape.fixed:
                    span_id[b, begin + offset] = FIXED
                sample.append(Span(modality, shape.grid, {"input": shape.length - len(shape.fixed)}, shaped,
                                   shape.video, shape.times))
            i = j
        spans.append(sample)
    return Layout(span_id.to(input_ids.device), attention_mask, spans)


def _fit_run(queue: list[SpanShape], n: int, join: bool) -> list[tuple[int, SpanShape, bool]]:
    """(offset in the run, shape, whether it came from the queue) of the spans a run of ``n`` placeholders holds,
    taking their shapes from the queue's head; one span without a grid if no prefix of the queue adds up to ``n``."""
    total, count = 0, 0
    while count < len(queue) and total < n:
        total += queue[count].length
        count += 1
    if total != n or count == 0:
        return [(0, SpanShape(n), False)]
    taken, queue[:count] = queue[:count], []
    if join:
        grids = {s.grid[1:] if s.grid else None for s in taken}
        grid = None
        if len(grids) == 1 and None not in grids:
            grid = (sum(s.grid[0] for s in taken), *taken[0].grid[1:])
        offsets, fixed = 0, []
        for shape in taken:
            fixed += [offsets + f for f in shape.fixed]
            offsets += shape.length
        return [(0, SpanShape(n, grid, tuple(fixed)), True)]
    out, offset = [], 0
    for shape in taken:
        out.append((offset, shape, True))
        offset += shape.length
    return out


# --------------------------------------------------------------------------------------------------
# Choosing tokens and applying the choice
# --------------------------------------------------------------------------------------------------
def gather_positions(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather a per-token tensor along ``dim`` (its batch dim is dim - 1) with a (B, L') index; -1 slots copy
    position 0 (they are masked out)."""
    index = index.clamp(min=0).to(x.device)
    if x.shape[dim - 1] == 1 and index.shape[0] > 1:  # a tensor shared by the batch, e.g. (1, L) positions
        x = x.expand(*x.shape[:dim - 1], index.shape[0], *x.shape[dim:])
    shape = [1] * x.dim()
    shape[dim - 1], shape[dim] = index.shape
    index = index.view(shape).expand(*x.shape[:dim], index.shape[1], *x.shape[dim + 1:])
    return torch.gather(x, dim, index)


def compose(outer: torch.Tensor | None, inner: torch.Tensor) -> torch.Tensor:
    """Index of two successive selections (``inner`` picks from what ``outer`` kept); -1 slots propagate."""
    if outer is None:
        return inner
    composed = torch.gather(outer, 1, inner.clamp(min=0))
    return composed.masked_fill(inner < 0, -1)


@dataclass
class Selection:
    """The outcome of one pruning stage on a batch.

    index: (B, L') positions into the sequence before the stage, ascending; -1 marks a new left padding
           slot (samples that keep fewer tokens than the longest are left-padded with masked slots).
    """

    index: torch.Tensor
    replacements: list[tuple[int, torch.Tensor, torch.Tensor]]  # (sample, positions in L', new features)
    layout: Layout
    prefill_length: int  # L, the sequence length before the stage

    @property
    def is_identity(self) -> bool:
        return self.index.shape[1] == self.prefill_length and not self.replacements

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return gather_positions(x, self.index, dim)

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Gather (B, L, D) token states and put merged features in place."""
        out = self.gather(x)
        for b, positions, features in self.replacements:
            out[b, positions.to(out.device)] = features.to(out.device, out.dtype)
        return out


def remap_mask(mask: torch.Tensor | None, index: torch.Tensor, prefill_length: int) -> torch.Tensor | None:
    """Carry a 2-D padding mask of the pre-stage layout (prefill tokens + later tokens) to the kept layout."""
    has_slots = bool((index < 0).any())
    if mask is None and not has_slots:
        return None
    if mask is None:
        mask = torch.ones(index.shape[0], prefill_length, dtype=torch.long, device=index.device)
    index = index.to(mask.device)
    kept = torch.gather(mask[:, :prefill_length], 1, index.clamp(min=0)) * (index >= 0)
    return torch.cat([kept.to(mask.dtype), mask[:, prefill_length:]], dim=1)


def select_tokens(
    stage: Stage,
    config: PruneConfig,
    layout: Layout,
    tokens: torch.Tensor,
    signals: Callable[[int], SignalSource] | None = None,
    vision: Callable[[int, int], VisionSignals | None] | None = None,
) -> Selection:
    """Run the stage's method on every span of every sample and return the kept positions.

    ``tokens`` (B, L, D) are the states the method sees: the LLM input embeddings before the language model,
    the hidden states entering the layer inside it. Methods also get the whole sample's row of ``tokens``
    (e.g. the instruction's embeddings, for instruction-aware pre-LLM methods). ``vision(b, s)`` gives span s
    of sample b its vision-encoder signals (see :func:`vision_by_span`).
    """
    spec = methods.registered_methods()[stage.method]
    params = config.params.get(stage.method, {})
    label = stage.label
    batch, length = layout.span_id.shape
    span_id = layout.span_id.cpu()
    kept_rows: list[torch.Tensor] = []
    merged: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (sample, original positions, features)
    given: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (sample, original positions, groups)
    for b in range(batch):
        keep = [torch.nonzero(span_id[b] < 0).flatten()]  # text, padding and fixed tokens always stay
        text_positions = torch.nonzero(span_id[b] == TEXT).flatten()
        for call in method_calls(spec, config.image_methods_on_video, layout.spans[b], span_id[b]):
            group, parts = call.spans, call.parts
            positions = torch.cat(parts)
            n = positions.numel()
            spans = [layout.spans[b][s] for s in group]
            if n == 0:
                for span in spans:
                    span.counts[label] = 0
                continue
            if call.frame is None:
                base = sum(span.counts["input"] if spec.stage == PRE_LLM else span.llm_input for span in spans)
                grid = spans[0].grid if len(group) == 1 else _stacked_grid(spans)
                vision_signals = None if vision is None else _group_signals([vision(b, s) for s in group])
            else:  # one frame of a whole one-span video: its own count, grid and rows of the span's signals
                base, grid = n, (1, *spans[0].grid[1:])
                vision_signals = None if vision is None else _frame_signals(vision(b, group[0]), call.frame, n)
            budget = min(n, keep_count(base, stage.ratio))
            ctx = PruneContext(
                features=tokens[b, positions.to(tokens.device)],
                keep=budget,
                grid=grid,
                modality=spans[0].modality,
                stage=spec.stage,
                params=params,
                span_key=group[0] * 1009 + (stage.layer or 0) + (0 if call.frame is None else 65_537 * (call.frame + 1)),
                layer=stage.layer,
                hidden_states=tokens[b],
                span_positions=positions,
                text_positions=text_positions,
                video=video_frames(spans, [p.numel() for p in parts]) if spec.video else None,
                ratio=stage.ratio,
                groups=None if layout.groups is None else layout.groups[b, positions.to(layout.groups.device)].cpu(),
                _signals=None if signals is None else signals(b),
                _vision=vision_signals,
            )
            result = spec.fn(ctx)
            local, features, _, _ = check_result(spec, result, n, budget)
            keep.append(positions[local])
            if features is not None:
                merged.append((b, positions[local], features))
            if isinstance(result, PruneResult) and result.groups is not None:
                if result.groups.shape[0] != local.numel():
                    raise ValueError(f"pruning method {spec.name} returned {result.groups.shape[0]} groups for "
                                     f"{local.numel()} indices")
                order = result.indices.cpu().argsort()
                given.append((b, positions[local], result.groups.cpu()[order].long()))
            owner = torch.repeat_interleave(torch.arange(len(group)), torch.tensor([p.numel() for p in parts]))
            kept_per_span = torch.bincount(owner[local.cpu()], minlength=len(group))
            for span, count in zip(spans, kept_per_span.tolist()):
                # The frames of one span add up (the first frame's call starts the count).
                span.counts[label] = count + (span.counts[label] if call.frame else 0)
        kept_rows.append(torch.cat(keep).sort().values)
    selection = _selection(layout, kept_rows, merged)
    if given:
        groups = (torch.full(layout.span_id.shape, -1, dtype=torch.long) if layout.groups is None
                  else layout.groups.cpu().clone())
        for b, positions, values in given:
            groups[b, positions] = values
        selection.layout.groups = torch.gather(groups, 1, selection.index.cpu().clamp(min=0))
    return selection


def tag_videos(grids: list, frames_per_video: list[int] | None) -> list[SpanShape]:
    """The span shapes of a video feature call (a forward's videos are encoded in one call), each naming its video:
    one grid per video, or (``frames_per_video``) that many consecutive grids per video."""
    shapes = [SpanShape.of(g) for g in grids]
    owners = list(range(len(shapes))) if frames_per_video is None else [
        v for v, n in enumerate(frames_per_video) for _ in range(n)]
    if len(owners) != len(shapes):
        raise RuntimeError(f"{len(shapes)} video grids for videos of {frames_per_video} frames")
    return [replace(shape, video=owner) for shape, owner in zip(shapes, owners)]


@dataclass
class MethodCall:
    """The tokens of one call of a method: ``parts[i]`` are positions of span ``spans[i]`` of the sample; ``frame``
    names the frame when the call sees one frame of a one-span video."""

    spans: list[int]
    parts: list[torch.Tensor]
    frame: int | None = None


def method_calls(spec: methods.MethodSpec, image_methods_on_video: str, spans: list[Span],
                 span_id: torch.Tensor) -> list[MethodCall]:
    """How one sample's spans are shown to a method. A video method sees each video whole (:func:`video_groups`).
    Another method sees each image alone and each video as ``image_methods_on_video`` says: ``"video"``, whole;
    ``"frame"``, one frame per call -- a span per frame where the model lays frames out so, the temporal steps of a
    one-span video (Qwen2-VL / Qwen2.5-VL) while the span is whole (after a stage removed some of its tokens their
    frames are no longer known, and later stages see the span whole)."""
    positions = [torch.nonzero(span_id == s).flatten() for s in range(len(spans))]
    whole_video = spec.video or image_methods_on_video == "video"
    groups = video_groups(spans) if whole_video else [[s] for s in range(len(spans))]
    calls = []
    for group in groups:
        span = spans[group[0]]
        t, h, w = span.grid if span.grid else (1, 0, 0)
        if whole_video or len(group) > 1 or span.modality != "video" or t == 1 or positions[group[0]].numel() != t * h * w:
            calls.append(MethodCall(group, [positions[s] for s in group]))
            continue
        for frame, part in enumerate(positions[group[0]].split(h * w)):
            calls.append(MethodCall(group, [part], frame))
    return calls


def _frame_signals(signals: VisionSignals | None, frame: int, size: int) -> VisionSignals | None:
    """Rows ``frame * size ..`` of one span's vision signals (one frame of a one-span video)."""
    if signals is None:
        return None
    rows = slice(frame * size, (frame + 1) * size)
    return VisionSignals({layer: a[rows] for layer, a in signals.attention.items()},
                         None if signals.keys is None else signals.keys[rows], signals.cls)


def video_groups(spans: list[Span]) -> list[list[int]]:
    """The spans of one sample as a video method sees them: the consecutive spans of one video together (Qwen3-VL's
    frames), every other span alone."""
    groups: list[list[int]] = []
    for s, span in enumerate(spans):
        if groups and span.video is not None and spans[groups[-1][-1]].video == span.video:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def _stacked_grid(spans: list[Span]) -> tuple[int, int, int] | None:
    """The (t, h, w) grid of frames laid out as separate spans, stacked along t (None unless all share h, w)."""
    sizes = {span.grid[1:] if span.grid else None for span in spans}
    if len(sizes) != 1 or None in sizes:
        return None
    return (sum(span.grid[0] for span in spans), *spans[0].grid[1:])


def video_frames(spans: list[Span], counts: list[int]) -> VideoFrames:
    """A video method's view of the frames of a group of spans holding ``counts`` tokens each (see VideoFrames)."""
    frame, first, complete, sizes, times = [], 0, True, set(), []
    for span, n in zip(spans, counts):
        t, h, w = span.grid if span.grid else (1, None, None)
        if span.modality != "video" and t > 1:  # an image's tiles stacked along t (InternVL): one frame, no grid
            t, h, w = 1, None, None
        whole = h is not None and n == t * h * w
        complete = complete and whole
        sizes.add((h, w))
        frame.append(first + (torch.arange(t).repeat_interleave(h * w) if whole else torch.zeros(n, dtype=torch.long)))
        first += t if whole else 1
        times += list(span.times) if span.times is not None else []
    size = sizes.pop() if complete and len(sizes) == 1 else None
    return VideoFrames(torch.cat(frame), first, size, torch.tensor(times) if len(times) == first else None,
                       separate_spans=len(spans) > 1)


def _selection(layout: Layout, kept_rows: list[torch.Tensor], merged: list) -> Selection:
    """The Selection keeping ``kept_rows[b]`` (ascending positions) of each sample, merged features in place."""
    batch, length = layout.span_id.shape
    new_length = max(row.numel() for row in kept_rows)
    index = torch.full((batch, new_length), -1, dtype=torch.long)
    for b, row in enumerate(kept_rows):
        index[b, new_length - row.numel():] = row  # left-pad shorter samples
    replacements = []
    for b, original, features in merged:
        new_positions = torch.searchsorted(index[b], original)
        replacements.append((b, new_positions, features))

    device = layout.span_id.device
    index = index.to(device)
    new_span_id = torch.gather(layout.span_id, 1, index.clamp(min=0)).masked_fill(index < 0, PAD)
    mask = remap_mask(layout.attention_mask, index, length)
    groups = None if layout.groups is None else torch.gather(layout.groups, 1, index.clamp(min=0).to(
        layout.groups.device))
    return Selection(index, replacements, Layout(new_span_id, mask, layout.spans, groups), length)


def select_by_masks(layout: Layout, masks: Callable[[int, int], dict[str, torch.Tensor] | None]) -> Selection:
    """Keep the tokens the ViT stages kept: ``masks(b, s)`` gives span s of sample b its {stage label: (N,) bool}
    masks in stage order (None: a span the stages did not see, kept whole). Each label's count is recorded."""
    span_id = layout.span_id.cpu()
    kept_rows = []
    for b in range(span_id.shape[0]):
        keep = [torch.nonzero(span_id[b] < 0).flatten()]
        for s, span in enumerate(layout.spans[b]):
            positions = torch.nonzero(span_id[b] == s).flatten()
            span_masks = masks(b, s)
            if not span_masks:
                keep.append(positions)
                continue
            for label, mask in span_masks.items():
                span.counts[label] = int(mask.sum())
            keep.append(positions[mask.cpu()])
        kept_rows.append(torch.cat(keep).sort().values)
    return _selection(layout, kept_rows, [])


def record_stage(layout: Layout, stage: Stage, count: Callable[[Span, torch.Tensor], int]) -> None:
    """Record a stage that chose nothing itself: ``count(span, positions)`` tokens of each span remain."""
    label = stage.label
    span_id = layout.span_id.cpu()
    for b, spans in enumerate(layout.spans):
        for s, span in enumerate(spans):
            span.counts[label] = count(span, torch.nonzero(span_id[b] == s).flatten())


def check_result(spec, result, n: int, budget: int):
    """A method's result for a span of ``n`` tokens, checked: (sorted local indices, merged features, sizes,
    proportional attention), the last three in the same order as the indices (None / False when not given)."""
    features = sizes = None
    proportional = False
    if isinstance(result, PruneResult):
        result, features, sizes, proportional = (result.indices, result.features, result.sizes,
                                                 result.proportional_attention)
    if not isinstance(result, torch.Tensor) or result.dim() != 1:
        raise TypeError(f"pruning method {spec.name} must return a 1-D index tensor or a PruneResult")
    if result.dtype == torch.bool or result.is_floating_point() or result.is_complex():
        # Converting would truncate fractions silently, or read a mask as the indices 0 and 1.
        raise TypeError(f"pruning method {spec.name} returned indices of dtype {result.dtype} for a span of {n} "
                        f"tokens; allowed: an integer tensor (e.g. torch.long) of span-local indices in [0, {n})")
    local = result.to("cpu", torch.long)
    order = local.argsort()
    local = local[order]
    if local.numel() and (local[0] < 0 or local[-1] >= n or bool((local[1:] == local[:-1]).any())):
        raise ValueError(f"pruning method {spec.name} returned out-of-range or repeated indices for a span of {n}; "
                         f"allowed: distinct span-local indices in [0, {n})")
    if spec.exact_count and local.numel() != budget:
        raise ValueError(f"pruning method {spec.name} kept {local.numel()} tokens of {n}; the keep rule asks {budget}")
    if spec.stage == VIT and local.numel() == 0:
        raise ValueError(f"pruning method {spec.name} kept no token of {n}; allowed: at least one")
    for what, value in (("merged tokens", features), ("sizes", sizes)):
        if value is not None and value.shape[0] != local.numel():
            raise ValueError(f"pruning method {spec.name} returned {value.shape[0]} {what} for {local.numel()} indices")
    features = None if features is None else features[order.to(features.device)]
    sizes = None if sizes is None else sizes[order.to(sizes.device)]
    return local, features, sizes, proportional


# --------------------------------------------------------------------------------------------------
# Attention signals without an L x L matrix
# --------------------------------------------------------------------------------------------------
@dataclass
class AttentionInput:
    """What a layer's attention module receives: normed hidden states, (cos, sin) and its mask."""

    hidden: torch.Tensor  # (B, L, D)
    position_embeddings: Any
    attention_mask: Any
    extra: dict = field(default_factory=dict)  # other attention kwargs a family needs (e.g. shared KV states)


@dataclass
class EntryView:
    """The language model's input for one prefill, and where the current rows came from in it."""

    embeddings: torch.Tensor  # (B, L0, D) what decoder layer 0 received
    span_id: torch.Tensor  # (B, L0) the entry layout's span ids
    index: torch.Tensor | None  # (B, L) current row -> entry row (-1: padding slot); None: nothing dropped yet




class LayerSignals(SignalSource):
    """Signals of one sample at pruning layer K: attention rows of layer K-1 (captured) or K (computed)."""

    def __init__(self, adapter: "FamilyAdapter", text_model, sample: int, inputs: dict[int, Callable[[], AttentionInput]],
                 hidden: torch.Tensor, entry: EntryView | None = None):
        self.adapter, self.text_model, self.sample, self.inputs, self.hidden = adapter, text_model, sample, inputs, hidden
        self.entry = entry
        self._cache: dict = {}

    def _input(self, layer: int) -> AttentionInput:
        if layer not in self.inputs:
            raise ValueError(f"attention signals are available for layers {sorted(self.inputs)} here, not {layer}")
        if layer not in self._cache:
            self._cache[layer] = self.inputs[layer]()
        return self._cache[layer]

    def _query_key(self, layer: int, rows: torch.Tensor):
        key = ("qk", layer, tuple(rows.tolist()))
        if key not in self._cache:
            inp = self._input(layer)
            attn = self.text_model.layers[layer].self_attn
            self._cache[key] = self.adapter.query_key(attn, inp, self.sample, rows)
        return self._cache[key]

    def attention(self, query_rows: torch.Tensor, layer: int) -> torch.Tensor:
        return next(self.attention_blocks(query_rows, layer, max(1, query_rows.numel())))

    def attention_blocks(self, query_rows: torch.Tensor, layer: int, block_rows: int | None = None):
        rows = query_rows.to("cpu", torch.long)
        q, k = self._query_key(layer, rows)  # (H, r, d), (H_kv, L, d): one projection shared by every block
        attn = self.text_model.layers[layer].self_attn
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0).float()
        step = block_rows or max(1, ATTENTION_BLOCK_ELEMENTS // (q.shape[0] * k.shape[1]))
        for start in range(0, max(1, rows.numel()), step):
            block = rows[start:start + step]
            scores = (q[:, start:start + step].float() @ k.transpose(-1, -2)) * self.adapter.attention_scale(attn)
            allowed = self.adapter.allowed_keys(attn, self._input(layer).attention_mask, self.sample, block,
                                                k.shape[1], scores.device)
            scores = scores.masked_fill(~allowed.unsqueeze(0), float("-inf"))
            yield torch.softmax(scores, dim=-1)  # (H, b, L)

    def key_states(self, layer: int) -> torch.Tensor:
        _, k = self._query_key(layer, torch.zeros(0, dtype=torch.long))
        return k.transpose(0, 1)

    def final_normed_hidden_states(self) -> torch.Tensor:
        return self.text_model.norm(self.hidden[self.sample])

    def _entry_rows(self) -> torch.Tensor:
        if self.entry is None:
            raise RuntimeError("the language model's input embeddings were not captured for this call")
        if self.entry.index is None:
            return torch.arange(self.entry.embeddings.shape[1], device=self.entry.embeddings.device)
        return self.entry.index[self.sample].to(self.entry.embeddings.device)

    def input_embeddings(self) -> torch.Tensor:
        return self.entry.embeddings[self.sample, self._entry_rows().clamp(min=0)]

    def span_input_embeddings(self, span_positions: torch.Tensor) -> torch.Tensor:
        """Every entry token of the spans the current rows belong to (all the frames' spans of a video method)."""
        entry = self._entry_rows()[span_positions.to(self.entry.embeddings.device)]
        span_ids = self.entry.span_id[self.sample].to(entry.device)
        return self.entry.embeddings[self.sample, torch.isin(span_ids, span_ids[entry].unique())]


def batch_row(x: torch.Tensor, sample: int) -> torch.Tensor:
    """Sample ``sample`` of a batched tensor, or its only row if the batch dimension is broadcast (size 1)."""
    return x[sample if x.shape[0] > 1 else 0]


def causal_allowed(mask: Any, sample: int, rows: torch.Tensor, kv_length: int, device,
                   window: int | None = None) -> torch.Tensor:
    """(r, kv) bool: which keys each query row may attend to, read from the mask the attention module got.

    4-D masks (eager: additive floats, sdpa: bools) are used as given; a 2-D padding mask (flash attention)
    or None (sdpa's causal fast path, flash attention) means causal plus padding, plus the layer's sliding
    ``window`` if it has one (flash applies it from the layer's ``sliding_window``, not from a mask).
    """
    rows = rows.to(device)
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        block = batch_row(mask, sample)[0].to(device)[rows][:, -kv_length:]
        return block if block.dtype == torch.bool else block == 0
    # Prefill: the layer's cache was empty, so query row i sits at key index i.
    keys = torch.arange(kv_length, device=device).unsqueeze(0)
    allowed = keys <= rows.unsqueeze(1)
    if window:
        allowed = allowed & (keys > rows.unsqueeze(1) - window)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        allowed = allowed & batch_row(mask, sample)[-kv_length:].to(device).bool().unsqueeze(0)
    return allowed


# --------------------------------------------------------------------------------------------------
# Vision-encoder signals (pre-LLM methods that replace a [CLS] attention row)
# --------------------------------------------------------------------------------------------------
VISION_CHUNK_ELEMENTS = 1 << 24  # probabilities held at once (64 MiB in fp32) while scoring encoder attention


def vision_layers(needs: VisionNeeds, global_layers: list[int], depth: int) -> list[int]:
    """The encoder layers whose attention ``needs`` asks for, among the globally attending ``global_layers``
    of an encoder with ``depth`` layers. A first layer beyond the encoder (either way) is a PruneConfigError
    naming the variable that set it (``needs.first_layer_var``) when the method declared one."""
    if needs.first_layer is None:
        return [global_layers[-1]]
    first = needs.first_layer + depth if needs.first_layer < 0 else needs.first_layer
    layers = [layer for layer in global_layers if layer >= first] if first >= 0 else []
    if not layers:
        last = global_layers[-1]
        reason = ("leaves no globally attending layer to score" if first >= 0
                  else f"counts back past the first of the encoder's {depth} layers")
        allowed = (f"{-depth}..{last}" if last == depth - 1 else f"0..{last} or {-depth}..{last - depth}")
        allowed += (f" (a negative index counts from the end) for this encoder of {depth} layers, whose globally "
                    f"attending layers are {global_layers}")
        if needs.first_layer_var:
            raise PruneConfigError(f"{needs.first_layer_var}={str(needs.first_layer)!r}: first vision-encoder layer "
                                   f"{needs.first_layer} {reason}; allowed: {allowed}")
        raise PruneConfigError(f"first vision-encoder layer {needs.first_layer} (a hyper-parameter of the pre-LLM "
                               f"method, see `python -m methods`) {reason}; allowed: {allowed}")
    return layers


def cls_vision_layers(needs: VisionNeeds, depth: int) -> list[int]:
    """The encoder layers whose [CLS] row ``needs.cls_layers`` asks for, in an encoder of ``depth`` layers (every
    layer of a CLIP encoder attends globally). A range outside the encoder is a PruneConfigError naming the variable
    that set it (``needs.first_layer_var``) when the method declared one."""
    first, last = (layer + depth if layer < 0 else layer for layer in needs.cls_layers)
    if 0 <= first <= last < depth:
        return list(range(first, last + 1))
    allowed = f"a layer in {-depth}..{depth - 1} (a negative index counts from the end) for this encoder of {depth} layers"
    what = f"[CLS] layers {needs.cls_layers[0]}..{needs.cls_layers[1]} leave no layer of the encoder to read"
    if needs.first_layer_var:
        raise PruneConfigError(f"{needs.first_layer_var}={str(needs.first_layer)!r}: {what}; allowed: {allowed}, "
                               f"up to the method's last [CLS] layer ({needs.cls_layers[1]})")
    raise PruneConfigError(f"{what} (a hyper-parameter of the pre-LLM method, see `python -m methods`); allowed: "
                           f"{allowed}")


def cls_attention_row(query: torch.Tensor, key: torch.Tensor, scale: float, heads: str) -> torch.Tensor:
    """[P] attention of the [CLS] query (row 0) to the patches of one image, fp32.

    ``query`` / ``key`` are (H, 1 + P, d), [CLS] first. "mean": softmax per head, averaged over heads; "single": one
    head over the full width H * d (``scale`` is then ignored: 1 / sqrt(H * d)); "received": not the [CLS] row but the
    attention each patch receives, averaged over every query ([CLS] included) and over heads. The softmax runs over
    every key, [CLS] included, as the encoder's own attention does; the [CLS] column is then dropped."""
    query, key = query.float(), key.float()
    if heads == "received":
        return attention_received(query, key, scale, [torch.arange(query.shape[1])])[1:]
    if heads == "single":
        q = query[:, 0].reshape(1, 1, -1)
        k = key.transpose(0, 1).reshape(1, key.shape[1], -1)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    else:
        probs = torch.softmax(query[:, :1] @ key.transpose(-1, -2) * scale, dim=-1)
    return probs[:, 0, 1:].mean(dim=0)


def run_with_pre_hooks(hooks_by_module: dict, run: Callable[[], Any]):
    """``run()`` with forward pre-hooks (``hook(module, args, kwargs)``) on the given modules, removed afterwards
    whatever happens: how every family reads its vision encoder's chosen attention layers."""
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in hooks_by_module.items()]
    try:
        return run()
    finally:
        for handle in handles:
            handle.remove()


def attention_received(query: torch.Tensor, key: torch.Tensor, scale: float,
                       segments: list[torch.Tensor]) -> torch.Tensor:
    """[P] attention each key patch receives: softmax(q k^T * scale) inside its segment, averaged over the
    segment's queries, then over heads. ``query``/``key`` are (H, P, d); each segment is an index tensor of the
    patches that attend to each other (one image or frame, padding left out). fp32, chunked over query rows so
    that at most VISION_CHUNK_ELEMENTS probabilities exist at once; patches in no segment score 0."""
    heads, patches, _ = query.shape
    received = torch.zeros(patches, dtype=torch.float32, device=query.device)
    for segment in segments:
        segment = segment.to(query.device)
        q, k = query[:, segment].float(), key[:, segment].float()
        n = segment.numel()
        rows = max(1, VISION_CHUNK_ELEMENTS // (heads * n))
        total = torch.zeros(heads, n, dtype=torch.float32, device=query.device)
        for start in range(0, n, rows):
            total += torch.softmax(q[:, start:start + rows] @ k.transpose(-1, -2) * scale, dim=-1).sum(dim=1)
        received[segment] = total.mean(dim=0) / n
    return received


def mean_query_attention(query: torch.Tensor, key: torch.Tensor, scale: float, bounds: list[int],
                         unit: int) -> torch.Tensor:
    """[P / unit] attention of each segment's mean query to its tokens (``VisionNeeds.mean_query``): the keys of every
    ``unit`` consecutive patches (one LLM token) are averaged, then per segment softmax(q_mean . k_token * scale)
    over the segment's tokens, averaged over heads. ``query``/``key`` are (P, H, d), rotated; ``bounds`` are the
    segments' patch boundaries (multiples of ``unit``). fp32; linear in P."""
    token_keys = key.float().view(-1, unit, *key.shape[1:]).mean(dim=1)  # (T, H, d)
    scores = torch.zeros(token_keys.shape[0], dtype=torch.float32, device=key.device)
    for start, end in zip(bounds, bounds[1:]):
        mean_query = query[start:end].float().mean(dim=0)  # (H, d)
        logits = torch.einsum("hd,thd->ht", mean_query, token_keys[start // unit:end // unit]) * scale
        scores[start // unit:end // unit] = torch.softmax(logits, dim=-1).mean(dim=0)
    return scores


def vision_by_span(layout: Layout, pending: dict[str, list[VisionSignals]]) -> Callable[[int, int], VisionSignals | None]:
    """Hand every span the vision signals noted for it (see :func:`entries_by_span`)."""
    def length(signals: VisionSignals) -> int:
        per_layer = {t.shape[0] for t in signals.attention.values()}
        if len(per_layer) != 1:
            raise RuntimeError(f"vision signals of {per_layer} tokens at different layers")
        return per_layer.pop()

    return entries_by_span(layout, pending, length, _join_signals, "vision signals")


def vit_masks_by_span(layout: Layout, pending: dict[str, list[dict[str, torch.Tensor]]]):
    """Hand every span the ViT stages' keep masks noted for it (see :func:`entries_by_span`)."""
    return entries_by_span(layout, pending, lambda masks: next(iter(masks.values())).shape[0],
                           lambda parts: {label: torch.cat([p[label] for p in parts]) for label in parts[0]},
                           "ViT-stage masks")


def entries_by_span(layout: Layout, pending: dict[str, list], length: Callable[[Any], int],
                    join: Callable[[list], Any], what: str) -> Callable[[int, int], Any]:
    """Hand every span the per-token entries a feature call noted for it. ``pending[modality]`` holds one entry per
    grid of that modality (span_grids' order), and find_layout gives grids to spans in that order (a span whose size
    did not match got none: ``Span.shaped`` is False), so a shaped span (with or without a grid) takes the next
    entries until their tokens (``length``) make up the span: one entry, or, where find_layout joined several grids
    into one span (``join_runs``: InternVL's tiles of one image), those grids' entries joined in span order."""
    queues = {modality: list(entries) for modality, entries in pending.items()}
    by_span: dict[tuple[int, int], Any] = {}
    for b, sample in enumerate(layout.spans):
        for s, span in enumerate(sample):
            queue = queues.get(span.modality)
            if not span.shaped or not queue:
                continue
            parts, lengths = [], []
            while queue and sum(lengths) < span.counts["input"]:
                parts.append(queue.pop(0))
                lengths.append(length(parts[-1]))
            if sum(lengths) != span.counts["input"]:
                raise RuntimeError(f"{what} of {'+'.join(map(str, lengths))} tokens for the {span.modality} "
                                   f"span of {span.counts['input']} tokens")
            by_span[(b, s)] = parts[0] if len(parts) == 1 else join(parts)
    return lambda b, s: by_span.get((b, s))


def _group_signals(parts: list[VisionSignals | None]) -> VisionSignals | None:
    """The signals of a video method's group of spans (its frames), joined in span order; None if one has none."""
    if any(p is None for p in parts):
        return None
    return parts[0] if len(parts) == 1 else _join_signals(parts)


def _join_signals(parts: list[VisionSignals]) -> VisionSignals:
    """One span's signals from those of its grids (e.g. the tiles of one image), in span order."""
    attention = {layer: torch.cat([p.attention[layer] for p in parts]) for layer in parts[0].attention}
    keys = None if parts[0].keys is None else torch.cat([p.keys for p in parts])
    return VisionSignals(attention, keys, parts[0].cls)


# --------------------------------------------------------------------------------------------------
# The family adapter and the per-model pruning state
# --------------------------------------------------------------------------------------------------
class FamilyAdapter:
    """What the machinery needs to know about one model family. ``custom_<family>.py`` subclasses it."""

    # -- spans ---------------------------------------------------------------------------------------
    def visual_ids(self, config) -> dict[int, str]:
        """Placeholder token id -> modality."""
        return {config.image_token_id: "image", config.video_token_id: "video"}

    # One span per image even where the model lays out several feature blocks in one run (InternVL's tiles).
    join_runs = False

    def span_grids(self, model, modality: str, features_args: dict) -> list[tuple[int, int, int] | SpanShape] | None:
        """(t, h, w) in LLM tokens, or the :class:`SpanShape`, of each span, from the arguments of a
        get_<modality>_features call."""
        return None

    def check_model(self, config: PruneConfig, model) -> None:
        """Refuse, with a PruneConfigError, a configuration this model cannot run exactly."""

    # -- the language-model entry ---------------------------------------------------------------------
    def mask_2d(self, kwargs: dict, call) -> torch.Tensor | None:
        """The call's 2-D padding mask (original layout)."""
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise NotImplementedError("visual-token pruning needs a 2-D attention mask and a DynamicCache "
                                      "(static caches and pre-built 4-D masks are not supported)")
        return mask

    def shorten_lm_inputs(self, selection: Selection, kwargs: dict, call) -> None:
        """Pre-LLM: shorten every per-token input of the language model (the embeddings are done)."""
        raise NotImplementedError

    def on_cache_shortened(self, call, dropped: int) -> None:
        """The prefill left ``dropped`` fewer entries in layer 0's cache than the language model's input had (the KV
        stage): a model that numbers decode steps from that cache's length must number them as stock."""

    def decode_lm_inputs(self, kwargs: dict, mask_2d: torch.Tensor | None, call) -> None:
        """A decode step after pre-LLM pruning: give the language model the kept-layout 2-D mask."""
        kwargs["attention_mask"] = mask_2d

    def positions_context(self, text_model, call):
        """A context manager around every language-model call of a pruned prefill and its decode steps (e.g. handing
        the rotary embedding the kept tokens' original positions, see :class:`DecoderAdapter`)."""
        return contextlib.nullcontext()

    def lm_call_context(self, text_model, call, kwargs: dict, prefill: bool):
        """A context manager around an intra-LLM language-model call (family-specific redirections);
        ``kwargs`` are the (already pre-LLM-shortened) language-model arguments of the call."""
        return contextlib.nullcontext()

    def finish_lm_output(self, output, kwargs: dict, pruned: bool):
        return output

    # -- inside the language model ---------------------------------------------------------------------
    def layer_masks(self, text_model, hidden: torch.Tensor, mask_2d, cache, layer: int,
                    layout: Layout | None = None) -> dict[str, Any]:
        """Attention masks per layer type for layers >= ``layer``, sized on that layer's cache. ``layout`` is the
        kept layout during prefill (None in decode steps)."""
        raise NotImplementedError

    def queries_only(self, text_model, layer: int) -> bool:
        """True where layers >= ``layer`` read keys and values computed before it (Gemma 4's KV-shared layers):
        a stage there drops query rows only, and the KV cache keeps every token."""
        return False

    def query_only_masks(self, text_model, hidden: torch.Tensor, layout: Layout, cache, layer: int,
                         rows: torch.Tensor) -> dict[str, Any]:
        """Masks for a queries-only stage: the keys keep ``layout``; the query rows are ``rows`` of it."""
        raise NotImplementedError

    def layer_type(self, text_model, layer: int) -> str:
        return text_model.config.layer_types[layer]

    def kv_compressible(self, text_model, layer: int) -> bool:
        """Whether the KV stage compresses ``layer``'s cache: a full-attention cache the layer owns (a sliding-window
        cache is already bounded by its window, and a shared layer reads another layer's)."""
        return self.layer_type(text_model, layer) == "full_attention" and self.cache_owner(text_model, layer) == layer

    def cache_owner(self, text_model, layer: int) -> int:
        """The layer whose cache ``layer`` reads in decode steps (itself, or the storing layer of a KV-shared one)."""
        return layer

    def shorten_layer_call(self, args: tuple, kwargs: dict, index: torch.Tensor, mask_2d) -> tuple[tuple, dict]:
        """Gather the per-token inputs of one decoder-layer call (everything but the hidden states and the
        mask: position embeddings, text positions, per-layer inputs...) from the loop's full-length values.
        ``index`` (B, L') points into the language model's input sequence; ``mask_2d`` is the kept layout's."""
        raise NotImplementedError

    def on_intra_selection(self, text_model, selection: Selection, layer: int) -> None:
        """Shorten family-specific per-token state that later layers read (e.g. Qwen3-VL deepstack)."""

    # -- signals ---------------------------------------------------------------------------------------
    def query_key(self, attn, inp: AttentionInput, sample: int, rows: torch.Tensor):
        """Post-RoPE queries (H, r, d) of ``rows`` and keys (H_kv, L, d) of one sample, model dtype."""
        raise NotImplementedError

    def attention_scale(self, attn) -> float:
        return attn.scaling

    def allowed_keys(self, attn, mask, sample: int, rows: torch.Tensor, kv_length: int, device) -> torch.Tensor:
        return causal_allowed(mask, sample, rows, kv_length, device, getattr(attn, "sliding_window", None))

    def vit_encoder(self, model, modality: str, features_args: dict):
        """The vision encoder of this feature call for the ViT stage (``encoder_stage.Encoder``), and a function laying
        per-patch values of its items out as the call's features are, one tensor per grid of ``span_grids``:
        ``(items, full_length) -> [per grid (N,)]``. Families where a shorter patch sequence is not well defined
        raise NotImplementedError saying why."""
        raise NotImplementedError(f"{type(model).__name__}: the ViT stage (methods named '*_vit') is not supported for "
                                  "this model family; supported: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 4, "
                                  "InternVL3, LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision images")

    def frames_per_video(self, model, features_args: dict) -> list[int] | None:
        """Where ``span_grids`` gives one grid per frame of a video (Qwen3-VL), how many consecutive grids make up each
        video of this video feature call; None: one grid per video."""
        return None

    def frame_times(self, model, forward_args: dict, video: int, frames: int) -> tuple[float, ...] | None:
        """Seconds of each of the ``frames`` frames of video ``video`` (its index among the forward's videos) as the
        model places them in time, from the model call's arguments ``forward_args``; None where it is given none."""
        return None

    def check_vit(self, model) -> None:
        """Raise (NotImplementedError, saying why) if this model's encoder cannot take the ViT stage."""
        raise NotImplementedError(f"{type(model).__name__}: the ViT stage (methods named '*_vit') is not supported for "
                                  "this model family; supported: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 4, "
                                  "InternVL3, LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision images")

    def capture_vision(self, model, modality: str, features_args: dict, needs: VisionNeeds,
                       run: Callable[[], Any]) -> tuple[Any, list[VisionSignals]]:
        """Run the encoder call ``run()`` (the original get_<modality>_features) while capturing what ``needs``
        asks for; return its output and one VisionSignals per grid of ``span_grids``, in that order (one per span, or
        per tile where find_layout joins tiles into spans: :func:`vision_by_span` joins their signals). Called only
        when the configured pre-LLM method declared ``vision=``. Implementations hook the chosen encoder
        layers (see :func:`vision_layers`), score them with :func:`attention_received` from the layer's own
        q/k, and reduce patches to LLM tokens as documented on :class:`methods.VisionSignals`."""
        raise NotImplementedError(f"{type(self).__name__} does not capture vision-encoder signals")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def text_positions_for(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Contiguous 1-D positions of a (B, length) sequence as generate numbers it (left padding counted out)."""
    if mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)


class DecoderAdapter(FamilyAdapter):
    """A language model of transformers' standard decoder form: Llama, Mistral, Qwen2/2.5/3 (LLaVA's, InternVL's)
    and the Qwen-VL text models. The model computes one rotary (cos, sin) per call from ``position_ids`` and hands
    it to every layer; masks come from ``create_causal_mask`` (and its sliding-window twin); attention projects with
    ``q_proj`` / ``k_proj`` (with ``q_norm`` / ``k_norm`` where the model has them).

    Kept tokens keep their original 1-D positions, which have gaps. Only the rotary embedding may see those: masks and
    FlashAttention-2 read gaps in ``position_ids`` as boundaries of packed sequences. So after pre-LLM pruning the
    language model gets contiguous ``position_ids`` (for masks and layers) and its rotary embedding is handed the
    original ones (:meth:`positions_context`); inside it, every layer's (cos, sin) is gathered from the loop's.
    """

    def layer_masks(self, text_model, hidden, mask_2d, cache, layer, layout=None):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kwargs = dict(config=text_model.config, inputs_embeds=hidden, attention_mask=mask_2d,
                      past_key_values=cache, position_ids=None, layer_idx=layer)
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in (getattr(text_model.config, "layer_types", None) or ()):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def layer_type(self, text_model, layer):
        return (getattr(text_model.config, "layer_types", None) or ["full_attention"] * (layer + 1))[layer]

    def shorten_layer_call(self, args, kwargs, index, mask_2d):
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (gather_positions(cos, index), gather_positions(sin, index))
        if kwargs.get("position_ids") is not None:  # only masks / flash-attention read them: keep them contiguous
            kwargs["position_ids"] = text_positions_for(mask_2d, *index.shape, cos.device)
        return args, kwargs

    def shorten_lm_inputs(self, selection: Selection, kwargs: dict, call) -> None:
        kwargs["attention_mask"] = selection.layout.attention_mask
        batch, length = selection.index.shape
        device = kwargs["inputs_embeds"].device
        positions = kwargs.get("position_ids")
        if positions is None:  # the text model would number the full sequence 0..L-1: keep those numbers
            positions = torch.arange(selection.prefill_length, device=device).expand(batch, -1)
        call.extras["rope_positions"] = selection.gather(positions)
        kwargs["position_ids"] = text_positions_for(selection.layout.attention_mask, batch, length, device)

    def decode_lm_inputs(self, kwargs, mask_2d, call):
        kwargs["attention_mask"] = mask_2d
        if kwargs.get("position_ids") is None:  # the text model would count the pruned cache: number as stock
            step = call.state.lm_input_length + call.state.decoded - 1
            embeds = kwargs["inputs_embeds"]
            kwargs["position_ids"] = torch.full((embeds.shape[0], 1), step, dtype=torch.long, device=embeds.device)

    def positions_context(self, text_model, call):
        positions = call.extras.get("rope_positions")
        if positions is None:
            return contextlib.nullcontext()

        def original_positions(module, args, kwargs):
            if len(args) > 1:
                args = (args[0], positions) + tuple(args[2:])
            else:
                kwargs["position_ids"] = positions
            return args, kwargs

        return _pre_hook(text_model.rotary_emb, original_positions)

    def query_key(self, attn, inp, sample, rows):
        hidden = inp.hidden[sample]
        return self.queries(attn, inp, sample, rows), _project(attn, attn.k_proj, getattr(attn, "k_norm", None), hidden,
                                                               *(batch_row(p, sample) for p in inp.position_embeddings))

    def queries(self, attn, inp, sample, rows):
        """Post-RoPE queries (H, r, d) of ``rows`` of one sample (the KV stage reads the keys from the cache)."""
        hidden = inp.hidden[sample]
        cos, sin = (batch_row(p, sample) for p in inp.position_embeddings)  # (L, d)
        rows = rows.to(hidden.device)
        return _project(attn, attn.q_proj, getattr(attn, "q_norm", None), hidden[rows], cos[rows], sin[rows])


def _project(attn, proj, norm, x, cos, sin):
    """(heads, n, d) rotated projections of the rows ``x``, after the head norm where the model has one."""
    d = attn.head_dim
    states = proj(x).view(x.shape[0], proj.out_features // d, d)
    if norm is not None:
        states = norm(states)
    states = states.transpose(0, 1)
    return states * cos.unsqueeze(0) + rotate_half(states) * sin.unsqueeze(0)


@contextlib.contextmanager
def _pre_hook(module, hook):
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class StageMap:
    """How one prefill stage shortened the sequence, kept for the decode steps that follow."""

    layer: int  # 0 for pre-LLM
    index: torch.Tensor  # Selection.index
    prefill_length: int
    queries_only: bool = False  # the stage dropped query rows only; the KV cache keeps every token


@dataclass
class PruningState:
    """Per-model runtime state: the last prefill's record and the stage maps its decode steps need."""

    config: PruneConfig
    record: ForwardRecord | None = None
    pre_map: StageMap | None = None
    intra_maps: list[StageMap] = field(default_factory=list)
    kv_maps: dict = field(default_factory=dict)  # decoder layer -> kv_stage.KVMap of its compressed cache
    cache_owner: dict = field(default_factory=dict)  # KV-shared layer -> the layer whose cache it reads (Gemma 4)
    decode_stage: Any = None  # the pre-LLM method's methods.DecodeSelection where the model can carry it (DyCoke)
    cache_visual: torch.Tensor | None = None  # (B, L') the visual entries of the prefill's cache (a decode stage's)
    decode_previous: dict = field(default_factory=dict)  # sample -> its last decode step's visual attention
    lm_input_length: int = 0  # the language model's input length in the last prefill, before any stage
    decoded: int = 0  # tokens fed after the prefill (to size masks when generate drops an all-ones mask)
    # The cache the last prefill wrote (a weak reference): a later call is a decode step of that prefill only when it
    # continues this very cache; any other call starts fresh.
    prefill_cache: Callable[[], Any] | None = None
    warned: set[str] = field(default_factory=set)  # one-time warnings already given for this model
    # Changes a pruned prefill made to the model object for its decode steps (Qwen's rope_deltas), undone when a
    # call that does not continue it arrives, so that call sees what the unpatched model would.
    undo: list[Callable[[], None]] = field(default_factory=list)
    pending_grids: dict[str, list] = field(default_factory=dict)  # span grids noted by the vision hooks
    pending_vision: dict[str, list[VisionSignals]] = field(default_factory=dict)  # per modality, in grid order
    pending_vit: dict[str, list[dict]] = field(default_factory=dict)  # ViT-stage keep masks, per modality, grid order
    listeners: list[Callable[[ForwardRecord], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.config.scheduled is not None:  # its stages would silently never run
            raise RuntimeError(f"{self.config.scheduled.method}'s schedule is not resolved: build the pruning state "
                               "from PruneConfig.resolved_for(num_decoder_layers)")

    def forget_prefill(self) -> None:
        """Drop what decode steps of the last prefill would need (its stage maps and cache)."""
        self.pre_map, self.intra_maps, self.kv_maps, self.decoded, self.prefill_cache = None, [], {}, 0, None
        self.cache_visual, self.decode_previous = None, {}

    @property
    def pruned(self) -> bool:
        return self.pre_map is not None or bool(self.intra_maps) or bool(self.kv_maps)

    def maps_until(self, layer: int) -> list:
        """The maps that shaped decoder layer ``layer``'s cache, in order: pre-LLM, the intra-LLM stages at layers
        <= ``layer`` that dropped keys, and the KV-stage map of the cache the layer reads."""
        kept_keys = [m for m in self.intra_maps if m.layer <= layer and not m.queries_only]
        owner = self.cache_owner.get(layer, layer)
        kv = [self.kv_maps[owner]] if owner in self.kv_maps else []
        return ([self.pre_map] if self.pre_map else []) + kept_keys + kv

    def undo_model_changes(self) -> None:
        while self.undo:
            self.undo.pop()()

    def continues_prefill(self, cache) -> bool:
        """Whether a call with ``cache`` is a decode step of the last prefill: it continues the cache it wrote."""
        return cache is not None and self.prefill_cache is not None and self.prefill_cache() is cache

    def finish_record(self, spans: list[list[Span]], cached: list[list[int]] | None = None) -> None:
        self.record = ForwardRecord(spans, {layer: {"before": m.before, "after": m.after}
                                            for layer, m in sorted(self.kv_maps.items())}, cached or [])
        for listener in self.listeners:
            listener(self.record)

    def cached_entries(self, mask: torch.Tensor | None, batch: int, length: int, text_config) -> list[list[int]]:
        """Per sample, the prompt entries each decoder layer caches (or, KV-shared, reads) after this prefill:
        generate's 2-D ``mask`` of the ``length``-token input (None: no padding) carried through the maps that shaped
        each layer's cache; a sliding-window layer keeps the last ``sliding_window - 1`` of them, as its cache does."""
        per_layer = []
        layer_types = getattr(text_config, "layer_types", None)
        for layer in range(text_config.num_hidden_layers):
            maps = self.maps_until(layer)
            carried = self.decode_mask(mask, maps) if maps else mask
            size = maps[-1].index.shape[1] if maps else length
            first = 0
            if layer_types and layer_types[layer] == "sliding_attention":
                first = max(0, size - (text_config.sliding_window - 1))
            per_layer.append([size - first] * batch if carried is None else carried[:, first:size].sum(dim=1).tolist())
        return [[int(counts[b]) for counts in per_layer] for b in range(batch)]

    def decode_mask(self, mask: torch.Tensor | None, maps: list[StageMap]) -> torch.Tensor | None:
        """Carry generate's original-layout 2-D mask through ``maps`` (in stage order)."""
        for stage_map in maps:
            if mask is None and bool((stage_map.index < 0).any()):
                first = stage_map.prefill_length + self.decoded
                mask = torch.ones(stage_map.index.shape[0], first, dtype=torch.long, device=stage_map.index.device)
            mask = remap_mask(mask, stage_map.index, stage_map.prefill_length)
        return mask


# --------------------------------------------------------------------------------------------------
# Intra-LLM: decoder-layer hooks installed for the duration of one language-model call
# --------------------------------------------------------------------------------------------------
def _attention_input(hidden, kwargs) -> AttentionInput:
    extra = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "position_embeddings", "attention_mask")}
    return AttentionInput(hidden, kwargs.get("position_embeddings"), kwargs.get("attention_mask"), extra)


def decode_selection(config: PruneConfig):
    """The pre-LLM method's decode-time stage (``methods.DecodeSelection``; DyCoke), or None."""
    pre = config.pre_llm
    return None if pre is None else methods.registered_methods()[pre.method].decode_selection(
        config.params.get(pre.method, {}))


def reindexes_cache(config: PruneConfig, stage) -> bool:
    """Whether an intra-LLM stage's method cuts the earlier layers' caches to its survivors after the prefill."""
    return methods.registered_methods()[stage.method].reindexes_cache(config.params.get(stage.method, {}))


@contextlib.contextmanager
def intra_llm_hooks(adapter: FamilyAdapter, text_model, state: PruningState, layout: Layout | None,
                    attention_mask_2d, cache):
    """Install the decoder-layer pre-hooks for one call of the language model (prefill or decode step).

    Prefill: before each configured layer K, choose tokens from the hidden states and shorten them; every
    layer >= K gets its per-token inputs gathered from the loop's full-length ones and masks rebuilt for the
    shorter sequence (sized on layer K's cache, since earlier layers hold the full prompt). Decode: layers >= K
    get masks built from the remapped 2-D mask and sized on layer K's cache.
    """
    config = state.config
    stages = {s.layer: s for s in config.intra_llm}
    layers = text_model.layers
    handles = []
    kv = config.kv
    # Prefill: the current layout, the index of the kept tokens into the language model's input sequence
    # (the loop's per-token tensors stay full length), and the masks rebuilt at the last stage.
    current: dict[str, Any] = {"layout": layout, "index": None, "masks": None}
    captured: dict[int, AttentionInput] = {}
    entry: dict[str, torch.Tensor] = {}  # prefill: decoder layer 0's input (the language model's input embeddings)
    prefill = layout is not None

    def capture_entry(module, args, kwargs):
        entry["embeddings"] = args[0] if args else kwargs["hidden_states"]
        entry["span_id"] = layout.span_id  # the layout the language model was called with
        entry["cache"] = kwargs.get("past_key_values", cache)

    def capture_attention_input(layer, store=captured):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            store[layer] = _attention_input(hidden, kwargs)
        return hook

    def shortened(layer, rows, loop_args, loop_kwargs):
        """The layer's inputs for the kept tokens (the loop's per-token inputs are full length)."""
        if current["index"] is None:
            return loop_args, loop_kwargs
        mask = current["masks"][adapter.layer_type(text_model, layer)]
        if rows < current["layout"].length:
            # The model itself already kept only the last query rows (Gemma 4 does so before its KV-shared layers
            # under generate), in its per-token inputs too; those rows are the prompt's end, kept by every stage.
            kwargs = dict(loop_kwargs, attention_mask=mask[:, :, -rows:] if isinstance(mask, torch.Tensor) else mask)
            return loop_args, kwargs
        args, kwargs = adapter.shorten_layer_call(loop_args, dict(loop_kwargs), current["index"],
                                                  current["layout"].attention_mask)
        kwargs["attention_mask"] = mask
        return args, kwargs

    def layer_pre_hook(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            loop_args, loop_kwargs = tuple(args[1:]), kwargs
            if prefill:
                rest, kwargs = shortened(layer, hidden.shape[1], loop_args, loop_kwargs)
                if layer in stages:
                    with profiling.stage(stages[layer]):
                        hidden = prune_here(layer, stages[layer], hidden, kwargs)
                    rest, kwargs = shortened(layer, hidden.shape[1], loop_args, loop_kwargs)
            else:
                rest = loop_args
                if state.kv_maps:  # each layer's cache has its own layout: rebuild where it differs from the last's
                    owner = state.cache_owner.get(layer, layer)
                    if owner != layer:  # a KV-shared layer: the masks its storing layer got (built before it wrote)
                        current["masks"] = current["owner_masks"][owner]
                    else:
                        maps = state.maps_until(layer)
                        if current.get("mask_maps") != [id(m) for m in maps]:
                            mask = state.decode_mask(attention_mask_2d, maps)
                            current["masks"] = adapter.layer_masks(text_model, hidden, mask, cache, layer)
                            current["mask_maps"] = [id(m) for m in maps]
                    current.setdefault("owner_masks", {})[layer] = current["masks"]
                elif layer in stages and not adapter.queries_only(text_model, layer):
                    mask = state.decode_mask(attention_mask_2d, state.maps_until(layer))
                    current["masks"] = adapter.layer_masks(text_model, hidden, mask, cache, layer)
                if decode_stage is not None and layer == decode_stage.layer and state.cache_visual is not None:
                    current["masks"] = decode_step_masks(layer, hidden) or current["masks"]
                if current["masks"] is not None:
                    kwargs["attention_mask"] = current["masks"][adapter.layer_type(text_model, layer)]
            return (hidden,) + rest, kwargs
        return hook

    decode_stage = state.decode_stage
    decode_inputs: dict[int, AttentionInput] = {}  # decode steps: layer decode_stage.layer - 1's attention input

    def decode_step_masks(layer, hidden):
        """A decode step before ``layer`` (the decode-time stage, e.g. DyCoke's): per sample, the current token's
        attention at the layer before over its whole cache, heads averaged, read at the visual entries, chooses
        which of them layers >= ``layer`` attend to now; None when every entry stays visible."""
        before = layer - 1
        inp, attn = decode_inputs.pop(before), layers[before].self_attn
        keys = cache.layers[before].keys  # this step's entry included
        mask = state.decode_mask(attention_mask_2d, state.maps_until(before))
        mask = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.long, device=keys.device) if mask is None \
            else mask.to(keys.device)
        hide = torch.zeros(mask.shape, dtype=torch.bool, device=keys.device)
        for b in range(keys.shape[0]):
            q = adapter.queries(attn, inp, b, torch.zeros(1, dtype=torch.long)).float()  # (H, 1, d)
            k = keys[b].float().repeat_interleave(q.shape[0] // keys.shape[1], dim=0)
            scores = (q @ k.transpose(-1, -2)) * adapter.attention_scale(attn)
            probs = torch.softmax(scores.masked_fill(mask[b] == 0, float("-inf")), dim=-1).mean(dim=0)[0]
            visual = torch.nonzero(state.cache_visual[b]).flatten().to(keys.device)
            attention = probs[visual]
            keep = decode_stage.select(attention, state.decode_previous.get(b))
            state.decode_previous[b] = attention
            if keep is not None:
                hide[b, visual[~keep.to(keys.device)]] = True
        if not bool(hide.any()):
            return None
        return adapter.layer_masks(text_model, hidden, mask.masked_fill(hide, 0), cache, layer)

    kv_inputs: dict[int, AttentionInput] = {}  # the KV stage's: each layer's attention input, until it compresses

    def compress_cache(layer):
        """After decoder layer ``layer``'s prefill: the KV stage on its cache (kv_stage.py)."""
        def hook(module, args, kwargs, output):
            inp = kv_inputs.pop(layer)
            holder = kwargs.get("past_key_values", cache)
            if holder is None:
                raise RuntimeError("KV_METHOD needs the prefill to write a cache (use_cache=True)")
            layer_cache = holder.layers[layer]
            before = profiling.cache_bytes(layer_cache)
            attn, length = layers[layer].self_attn, layer_cache.keys.shape[2]
            with profiling.stage(kv):
                state.kv_maps[layer] = kv_stage.compress_layer(
                    kv, config.params.get(kv.method, {}), layer, layer_cache,
                    lambda b, rows: adapter.queries(attn, inp, b, rows),
                    lambda b, rows: adapter.allowed_keys(attn, inp.attention_mask, b, rows, length, layer_cache.keys.device),
                    adapter.attention_scale(attn), current["layout"], len(layers),
                    text_model.config.num_attention_heads)
            profiling.kv_stage_freed(before, profiling.cache_bytes(layer_cache))
        return hook

    def prune_here(layer, stage, hidden, kwargs):
        layout = current["layout"]
        if hidden.shape[1] != layout.length:  # the model already dropped every query row but the last ones
            record_stage(layout, stage, lambda span, positions: 0)
            return hidden
        # Layer K's own attention input is computed only if a method asks for it (PyramidDrop-style).
        inputs = {layer: lambda: _attention_input(layers[layer].input_layernorm(hidden), kwargs)}
        if layer - 1 in captured:
            inputs[layer - 1] = lambda c=captured[layer - 1]: c

        view = EntryView(entry["embeddings"], entry["span_id"], current["index"]) if entry else None
        selection = select_tokens(
            stage, config, layout, hidden,
            signals=lambda b: LayerSignals(adapter, text_model, b, inputs, hidden, view),
        )
        captured.pop(layer - 1, None)
        new_hidden = selection.gather_tokens(hidden)
        queries_only = adapter.queries_only(text_model, layer)
        state.intra_maps.append(StageMap(layer, selection.index, selection.prefill_length, queries_only))
        if queries_only:
            # Keys and values come from earlier layers: keep their layout, drop query rows only.
            current["masks"] = adapter.query_only_masks(text_model, hidden, layout, cache, layer, selection.index)
        else:
            current["masks"] = adapter.layer_masks(text_model, new_hidden, selection.layout.attention_mask, cache,
                                                   layer, selection.layout)
        current["layout"] = selection.layout
        layouts[layer] = selection.layout
        current["index"] = compose(current["index"], selection.index)
        adapter.on_intra_selection(text_model, selection, layer)
        return new_hidden

    layouts: dict[int, Layout] = {}  # prefill: the layout after each intra-LLM stage, by its layer

    def reindex_caches():
        """After the prefill: a method that asks for it (MustDrop) cuts the caches of the layers from the one before
        its first stage to the one before its last to the last stage's survivors (kv_stage.reindex_layer)."""
        kept_keys = [m for m in state.intra_maps if not m.queries_only]
        holder = entry.get("cache")
        if not kept_keys or holder is None or not reindexes_cache(config, stages[kept_keys[-1].layer]):
            return

        def counts(lay):
            mask = lay.attention_mask
            return [lay.length] * lay.span_id.shape[0] if mask is None else mask.sum(dim=1).tolist()

        final = counts(current["layout"])
        for layer in range(kept_keys[0].layer - 1, kept_keys[-1].layer):
            if not adapter.kv_compressible(text_model, layer):
                continue  # a sliding-window cache keeps its window
            index = None  # the last stage's survivors as positions in this layer's cache
            for later in (m for m in kept_keys if m.layer > layer):
                index = compose(index, later.index)
            own = [lay for k, lay in sorted(layouts.items()) if k <= layer]
            state.kv_maps[layer] = kv_stage.reindex_layer(layer, holder.layers[layer], index,
                                                          counts(own[-1] if own else layout), final)

    starts = list(stages) + ([decode_stage.layer] if decode_stage is not None else [])
    first = 0 if kv is not None or state.kv_maps else min(starts)  # decode: every layer whose cache was cut
    try:
        if prefill:  # registered first: a stage at layer 0 must see it captured
            handles.append(layers[0].register_forward_pre_hook(capture_entry, with_kwargs=True))
        for i in range(first, len(layers)):
            handles.append(layers[i].register_forward_pre_hook(layer_pre_hook(i), with_kwargs=True))
            if prefill and kv is not None and adapter.kv_compressible(text_model, i):
                handles.append(layers[i].self_attn.register_forward_pre_hook(
                    capture_attention_input(i, kv_inputs), with_kwargs=True))
                handles.append(layers[i].register_forward_hook(compress_cache(i), with_kwargs=True))
        if not prefill and decode_stage is not None:
            handles.append(layers[decode_stage.layer - 1].self_attn.register_forward_pre_hook(
                capture_attention_input(decode_stage.layer - 1, decode_inputs), with_kwargs=True))
        if prefill:
            for k in stages:
                if k >= 1:
                    handles.append(layers[k - 1].self_attn.register_forward_pre_hook(
                        capture_attention_input(k - 1), with_kwargs=True))
        yield
        if prefill and stages:
            reindex_caches()
    finally:
        for handle in handles:
            handle.remove()
