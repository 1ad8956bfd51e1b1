"""Model-independent hook machinery: visual spans, sequence layouts, running a method on every span, the
per-forward token-count record, lazily computed attention signals, and the decoder-layer hooks that drop
tokens inside the language model.

A model family (``custom_<family>.py``) supplies a :class:`FamilyAdapter` that knows its internals
(positions, masks, extra per-token tensors, how to project queries and keys); this module knows nothing
about any particular model, and nothing about which method runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import methods
import profiling
from methods import PRE_LLM, PruneContext, PruneResult, SignalSource, VisionNeeds, VisionSignals
from utils import PruneConfig, PruneConfigError, Stage, keep_count

TEXT = -1  # span id of a text token in a Layout
PAD = -2  # span id of a padding slot


# --------------------------------------------------------------------------------------------------
# Spans, layouts, records
# --------------------------------------------------------------------------------------------------
@dataclass
class Span:
    """One image, video or frame of one sample, and its visual-token count after each stage."""

    modality: str
    grid: tuple[int, int, int] | None
    counts: dict[str, int] = field(default_factory=dict)  # stage label -> tokens left ('input', 'pre_llm', 'layer_2')

    @property
    def llm_input(self) -> int:
        """Tokens the language model received (after the pre-LLM stage, if any)."""
        return self.counts.get(PRE_LLM, self.counts["input"])

    @property
    def current(self) -> int:
        return list(self.counts.values())[-1]


@dataclass
class Layout:
    """What each position of the current (B, L) sequence is: text, padding, or a token of span s."""

    span_id: torch.Tensor  # (B, L) long: TEXT, PAD or a span index into spans[b]
    attention_mask: torch.Tensor | None  # (B, L) 2-D padding mask of this layout, None = no padding
    spans: list[list[Span]]

    @property
    def length(self) -> int:
        return self.span_id.shape[1]


@dataclass
class ForwardRecord:
    """Visual tokens per span before and after each stage, for one prefill; read by runners and profilers."""

    spans: list[list[Span]]  # per sample

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


def find_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    visual_ids: dict[int, str],
    grids: dict[str, list[tuple[int, int, int]]],
) -> Layout:
    """Find every contiguous run of visual placeholder tokens in every sample.

    ``grids[modality]`` lists the (t, h, w) of each span of that modality in order of appearance, batch-major
    (the order in which the model scatters features). A run gets the next grid whose token count matches.
    """
    batch, length = input_ids.shape
    span_id = torch.full((batch, length), TEXT, dtype=torch.long)
    if attention_mask is not None:
        span_id[attention_mask.cpu() == 0] = PAD
    queues = {modality: list(g) for modality, g in grids.items()}
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
            n = j - i
            queue = queues.get(modality) or []
            grid = None
            if queue and queue[0][0] * queue[0][1] * queue[0][2] == n:
                grid = tuple(int(v) for v in queue.pop(0))
            span_id[b, i:j] = len(sample)
            sample.append(Span(modality, grid, {"input": n}))
            i = j
        spans.append(sample)
    return Layout(span_id.to(input_ids.device), attention_mask, spans)


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
    label = stage_label(stage)
    batch, length = layout.span_id.shape
    span_id = layout.span_id.cpu()
    kept_rows: list[torch.Tensor] = []
    merged: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (sample, original positions, features)
    for b in range(batch):
        keep = [torch.nonzero(span_id[b] < 0).flatten()]  # text and padding always stay
        text_positions = torch.nonzero(span_id[b] == TEXT).flatten()
        for s, span in enumerate(layout.spans[b]):
            positions = torch.nonzero(span_id[b] == s).flatten()
            n = positions.numel()
            if n == 0:
                span.counts[label] = 0
                continue
            base = span.counts["input"] if spec.stage == PRE_LLM else span.llm_input
            budget = min(n, keep_count(base, stage.ratio))
            ctx = PruneContext(
                features=tokens[b, positions.to(tokens.device)],
                keep=budget,
                grid=span.grid,
                modality=span.modality,
                stage=spec.stage,
                params=params,
                span_key=s * 1009 + (stage.layer or 0),
                layer=stage.layer,
                hidden_states=tokens[b],
                span_positions=positions,
                text_positions=text_positions,
                _signals=None if signals is None else signals(b),
                _vision=None if vision is None else vision(b, s),
            )
            local, features = _check_result(spec, spec.fn(ctx), n, budget)
            keep.append(positions[local])
            if features is not None:
                merged.append((b, positions[local], features))
            span.counts[label] = local.numel()
        kept_rows.append(torch.cat(keep).sort().values)

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
    return Selection(index, replacements, Layout(new_span_id, mask, layout.spans), length)


def stage_label(stage: Stage) -> str:
    """The record's name of a stage: 'pre_llm' or 'layer_<K>'."""
    return PRE_LLM if stage.layer is None else f"layer_{stage.layer}"


def record_stage(layout: Layout, stage: Stage, count: Callable[[Span, torch.Tensor], int]) -> None:
    """Record a stage that chose nothing itself: ``count(span, positions)`` tokens of each span remain."""
    label = stage_label(stage)
    span_id = layout.span_id.cpu()
    for b, spans in enumerate(layout.spans):
        for s, span in enumerate(spans):
            span.counts[label] = count(span, torch.nonzero(span_id[b] == s).flatten())


def _check_result(spec, result, n: int, budget: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    features = None
    if isinstance(result, PruneResult):
        result, features = result.indices, result.features
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
    if features is not None:
        if features.shape[0] != local.numel():
            raise ValueError(f"pruning method {spec.name} returned {features.shape[0]} merged tokens for {local.numel()} indices")
        features = features[order.to(features.device)]
    return local, features


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


# Attention probabilities computed per block of query rows: about 16 MB of fp32 scores per block. A block lives
# in a few copies (scores, softmax, the span's columns); at 64 MB, FitPrune's peak at an 8k-token prompt of a
# hidden-512 model exceeded the stock prefill's by 13 % (scripts/bench_pruning.py), and it ran slower on a CPU.
_BLOCK_ELEMENTS = 1 << 22


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
        step = block_rows or max(1, _BLOCK_ELEMENTS // (q.shape[0] * k.shape[1]))
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
        first = self._entry_rows()[span_positions[0].to(self.entry.embeddings.device)]
        span_ids = self.entry.span_id[self.sample].to(first.device)
        return self.entry.embeddings[self.sample, span_ids == span_ids[first]]


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


def vision_by_span(layout: Layout, pending: dict[str, list[VisionSignals]]) -> Callable[[int, int], VisionSignals | None]:
    """Hand every span the vision signals noted for it. ``pending[modality]`` is in the order of that modality's
    grids, and find_layout gives grids to spans in that order (a span whose size did not match got none), so
    the k-th span of a modality that has a grid takes the k-th entry."""
    queues = {modality: list(signals) for modality, signals in pending.items()}
    by_span: dict[tuple[int, int], VisionSignals] = {}
    for b, sample in enumerate(layout.spans):
        for s, span in enumerate(sample):
            queue = queues.get(span.modality)
            if span.grid is None or not queue:
                continue
            signals = queue.pop(0)
            lengths = {t.shape[0] for t in signals.attention.values()}
            if lengths != {span.counts["input"]}:
                raise RuntimeError(f"vision signals of {lengths} tokens for the {span.modality} span of "
                                   f"{span.counts['input']} tokens")
            by_span[(b, s)] = signals
    return lambda b, s: by_span.get((b, s))


# --------------------------------------------------------------------------------------------------
# The family adapter and the per-model pruning state
# --------------------------------------------------------------------------------------------------
class FamilyAdapter:
    """What the machinery needs to know about one model family. ``custom_<family>.py`` subclasses it."""

    # -- spans ---------------------------------------------------------------------------------------
    def visual_ids(self, config) -> dict[int, str]:
        """Placeholder token id -> modality."""
        return {config.image_token_id: "image", config.video_token_id: "video"}

    def span_grids(self, model, modality: str, features_args: dict) -> list[tuple[int, int, int]] | None:
        """(t, h, w) in LLM tokens of each span, from the arguments of a get_<modality>_features call."""
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

    def decode_lm_inputs(self, kwargs: dict, mask_2d: torch.Tensor | None, call) -> None:
        """A decode step after pre-LLM pruning: give the language model the kept-layout 2-D mask."""
        kwargs["attention_mask"] = mask_2d

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

    def capture_vision(self, model, modality: str, features_args: dict, needs: VisionNeeds,
                       run: Callable[[], Any]) -> tuple[Any, list[VisionSignals]]:
        """Run the encoder call ``run()`` (the original get_<modality>_features) while capturing what ``needs``
        asks for; return its output and one VisionSignals per span, in the order of ``span_grids``. Called only
        when the configured pre-LLM method declared ``vision=``. Implementations hook the chosen encoder
        layers (see :func:`vision_layers`), score them with :func:`attention_received` from the layer's own
        q/k, and reduce patches to LLM tokens as documented on :class:`methods.VisionSignals`."""
        raise NotImplementedError(f"{type(self).__name__} does not capture vision-encoder signals")


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
    listeners: list[Callable[[ForwardRecord], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.config.scheduled is not None:  # its stages would silently never run
            raise RuntimeError(f"{self.config.scheduled.method}'s schedule is not resolved: build the pruning state "
                               "from PruneConfig.resolved_for(num_decoder_layers)")

    def forget_prefill(self) -> None:
        """Drop what decode steps of the last prefill would need (its stage maps and cache)."""
        self.pre_map, self.intra_maps, self.decoded, self.prefill_cache = None, [], 0, None

    @property
    def pruned(self) -> bool:
        return self.pre_map is not None or bool(self.intra_maps)

    def undo_model_changes(self) -> None:
        while self.undo:
            self.undo.pop()()

    def continues_prefill(self, cache) -> bool:
        """Whether a call with ``cache`` is a decode step of the last prefill: it continues the cache it wrote."""
        return cache is not None and self.prefill_cache is not None and self.prefill_cache() is cache

    def finish_record(self, spans: list[list[Span]]) -> None:
        self.record = ForwardRecord(spans)
        for listener in self.listeners:
            listener(self.record)

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
    # Prefill: the current layout, the index of the kept tokens into the language model's input sequence
    # (the loop's per-token tensors stay full length), and the masks rebuilt at the last stage.
    current: dict[str, Any] = {"layout": layout, "index": None, "masks": None}
    captured: dict[int, AttentionInput] = {}
    entry: dict[str, torch.Tensor] = {}  # prefill: decoder layer 0's input (the language model's input embeddings)
    prefill = layout is not None

    def capture_entry(module, args, kwargs):
        entry["embeddings"] = args[0] if args else kwargs["hidden_states"]
        entry["span_id"] = layout.span_id  # the layout the language model was called with

    def capture_attention_input(layer):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[layer] = _attention_input(hidden, kwargs)
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
                if layer in stages and not adapter.queries_only(text_model, layer):
                    mask = state.decode_mask(attention_mask_2d, state_maps_until(layer))
                    current["masks"] = adapter.layer_masks(text_model, hidden, mask, cache, layer)
                if current["masks"] is not None:
                    kwargs["attention_mask"] = current["masks"][adapter.layer_type(text_model, layer)]
            return (hidden,) + rest, kwargs
        return hook

    def state_maps_until(layer):
        kept_keys = [m for m in state.intra_maps if m.layer <= layer and not m.queries_only]
        return ([state.pre_map] if state.pre_map else []) + kept_keys

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
        current["index"] = compose(current["index"], selection.index)
        adapter.on_intra_selection(text_model, selection, layer)
        return new_hidden

    first = min(stages)
    try:
        if prefill:  # registered first: a stage at layer 0 must see it captured
            handles.append(layers[0].register_forward_pre_hook(capture_entry, with_kwargs=True))
        for i in range(first, len(layers)):
            handles.append(layers[i].register_forward_pre_hook(layer_pre_hook(i), with_kwargs=True))
        if prefill:
            for k in stages:
                if k >= 1:
                    handles.append(layers[k - 1].self_attn.register_forward_pre_hook(
                        capture_attention_input(k - 1), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
