"""The ViT stage: pruning and merging between the blocks of a vision encoder (methods named ``<name>_vit``).

A ViT stage runs before one encoder block, on every encoded image (a tile, a frame) of a feature call separately:
the method sees the hidden states entering the block (patch tokens; a [CLS] token is always kept, first), chooses
representatives and, when it merges, their merged states and sizes (patches per token). The later blocks then
run on the shorter sequence, which is what saves the encoder's own work; where the method asks for proportional
attention (ToMe), they add log(size) to every key's attention logit. Items of one call that keep different counts
are right-padded and their padding keys masked out.

The encoder's outputs (``hidden_states`` of every block, ``last_hidden_state``) are then put back at full length
(each kept token at its representative's patch position, zeros elsewhere), so that the model's own feature code
(feature layer, [CLS] drop, projector, tiles' packing) runs unchanged and every token it emits sits where the
representative's would. The family adapter lays the per-patch keep masks out as the features are laid out, and the
language-model entry drops the tokens no representative kept (``hooks.select_by_masks``): those that reach the
language model keep their representatives' positions.

Supported where a shorter patch sequence is well defined, see each family's ``FamilyAdapter.vit_encoder``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence, Union

import torch

import hooks
import methods
import profiling
from methods import EncoderSignals, PruneContext, VIT
from utils import PruneConfig, PruneConfigError, Stage, keep_count


def clip_projection(name: str):
    """Queries or keys (``name``: "q_proj" / "k_proj") of an attention module with ``num_heads`` and ``head_dim``:
    (items, T, D) -> (items, T, heads, head_dim) (CLIP, SigLIP)."""

    def project(attn, hidden: torch.Tensor) -> torch.Tensor:
        return getattr(attn, name)(hidden).view(*hidden.shape[:2], attn.num_heads, attn.head_dim)

    return project


@dataclass(frozen=True)
class Encoder:
    """What the stage needs of one vision-encoder call, given by the family adapter.

    tower:  the module whose output carries ``hidden_states`` / ``last_hidden_state`` (put back at full length).
    blocks: the encoder blocks, each called with the hidden states (items, T, D) first; the attention module of a
            block (``attention(block)``) takes an additive ``attention_mask`` keyword (None: no mask), which the
            stage sets once it has changed the tokens (padding keys, proportional attention).
    has_cls: whether every item's sequence starts with a [CLS] token.
    grid:   (h, w) patches of one item, raster order; or one (h, w) per item (items of their own sizes).
    feature_block: the last block whose output the features are read from (a later stage would change nothing).
    keys, queries: the attention's keys / queries of its input (items, T, D) -> (items, T, heads, d), as the
            methods read them (the [CLS] row also needs ``attn.scale``).
    per_token: block keywords holding one value per token along dim 1 (rotary tables, patch positions): the later
            blocks get them for the current tokens.
    valid:  (items, T) bool, False for an item's padding patches (a suffix): the encoder's own padding.
    pool:   (module, fn): a module that pools the put-back outputs (Gemma 4's pooler); its output is replaced by
            ``fn(module, args, kwargs, output, weights)``, weights (items, T) the patches each kept token stands
            for at its position, 0 elsewhere.
    """

    tower: torch.nn.Module
    blocks: Sequence[torch.nn.Module]
    has_cls: bool
    grid: Union[tuple[int, int], Sequence[tuple[int, int]]]
    feature_block: int
    modality: str = "image"
    attention: Callable[[torch.nn.Module], torch.nn.Module] = lambda block: block.self_attn
    keys: Callable[[Any, torch.Tensor], torch.Tensor] = clip_projection("k_proj")
    queries: Callable[[Any, torch.Tensor], torch.Tensor] = clip_projection("q_proj")
    per_token: tuple[str, ...] = ()
    valid: torch.Tensor | None = None
    pool: tuple[torch.nn.Module, Callable] | None = None

    def item_grid(self, item: int) -> tuple[int, int]:
        return self.grid if isinstance(self.grid[0], int) else self.grid[item]


def resolve_blocks(stages: Sequence[Stage], depth: int, last: int, var: str = "VIT_LAYER_SPECS"
                   ) -> list[tuple[int, Stage]]:
    """The stages' encoder blocks for an encoder of ``depth`` blocks (negative blocks count from the end): each in
    1..last (block 0 sees the embeddings, whose keys no block has computed; ``last``: the block whose output the
    features are read from), strictly increasing."""
    expanded = []
    for stage in stages:
        if stage.layer is None:  # the method's own schedule (e.g. ToMe's merges in every block), for this encoder
            schedule = methods.registered_methods()[stage.method].default_schedule(last, stage.ratio)
            expanded += [replace(stage, layer=block, ratio=ratio) for block, ratio in schedule]
        else:
            expanded.append(stage)
    resolved = []
    for stage in expanded:
        block = stage.layer + depth if stage.layer < 0 else stage.layer
        if not 1 <= block <= last:
            raise PruneConfigError(f"{var}: block {stage.layer} ({stage.method}) is outside what this vision encoder's "
                                   f"features depend on; allowed: 1..{last} (or {1 - depth}..{last - depth} from the "
                                   f"end) for an encoder of {depth} blocks whose features are block {last}'s output")
        if resolved and block <= resolved[-1][0]:
            raise PruneConfigError(f"{var}: block {stage.layer} ({stage.method}) does not come after block "
                                   f"{resolved[-1][0]}; allowed: ViT stages in increasing block order")
        resolved.append((block, replace(stage, layer=block)))
    return resolved


@dataclass
class _Tokens:
    """The current tokens of every item of the call: where each came from, how many patches it stands for."""

    index: torch.Tensor  # (items, T) long: position in the full sequence ([CLS] 0 if any) of each current token
    valid: torch.Tensor  # (items, T) bool: False for right padding
    sizes: torch.Tensor  # (items, T) float: patches per token ([CLS] 1)
    proportional: bool = False
    full_grid: bool = True  # every patch still present, in raster order


def choose(spec, params: dict, state: torch.Tensor, size: torch.Tensor, budget: int, grid, block: int,
           modality: str, signals: EncoderSignals | None):
    """One item's ViT-stage method call on its current patch tokens ``state`` (n, D) of ``size`` patches each:
    (kept local indices, their states (merged where the method merges), their sizes, proportional attention)."""
    ctx = PruneContext(features=state, keep=budget, grid=grid, modality=modality, stage=VIT, params=params,
                       span_key=block, layer=block, sizes=size, _encoder=signals)
    local, merged, new_sizes, proportional = hooks.check_result(spec, spec.fn(ctx), state.shape[0], budget)
    local = local.to(state.device)
    kept = state[local] if merged is None else merged.to(state.device, state.dtype)
    kept_sizes = size[local] if new_sizes is None else new_sizes.to(size.device, size.dtype)
    return local, kept, kept_sizes, proportional


@dataclass
class EncoderRun:
    """One feature call's ViT stages: installed around ``run`` (the call), undone after it."""

    encoder: Encoder
    stages: list[tuple[int, Stage]]
    config: PruneConfig
    tokens: _Tokens | None = None
    full_length: int = 0
    patches: list[int] = field(default_factory=list)  # per item: its patches entering the first stage ([CLS] not)
    signals: dict[int, list[EncoderSignals]] = field(default_factory=dict)  # stage block -> per item
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # stage label -> (items, full_length) kept
    outputs: list[tuple[torch.Tensor, _Tokens]] = field(default_factory=list)  # block outputs and their tokens
    changed: bool = False  # whether any stage changed any item's tokens (if not, the call is the stock one)

    # -- the blocks ----------------------------------------------------------------------------------
    def before_block(self, block: int):
        stage = dict(self.stages).get(block)

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.tokens is None:
                self._start(hidden)
            if stage is not None:
                with profiling.stage(stage):
                    hidden = self._apply(block, stage, hidden)
            if not self.changed:
                return args, kwargs  # the stock call
            args = (hidden, *args[1:]) if args else args
            kwargs = {**kwargs, **({} if args else {"hidden_states": hidden}),
                      **{name: _gather(kwargs[name], self.tokens.index) for name in self.encoder.per_token}}
            return args, kwargs

        return hook

    def set_mask(self, attn, args, kwargs):
        """The attention of a block after a stage that changed the tokens: the current tokens' additive mask (the
        encoder's own mask, if any, was built for the full sequence)."""
        if self.changed:
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs = {**kwargs, "attention_mask": self._attention_bias(hidden)}
        return args, kwargs

    def after_block(self, module, args, output):
        if self.changed:  # outputs of blocks after a stage that changed the tokens: put back by restore_outputs
            self.outputs.append((output, self.tokens))

    def capture_signals(self, block: int):
        """A pre-hook on the attention of the block before a stage: the keys (and [CLS] row) its method reads."""

        def hook(attn, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            bias = self._attention_bias(hidden) if self.changed else None
            self.signals[block + 1] = _block_signals(self.encoder, attn, hidden, self.tokens, bias)
        return hook

    def _start(self, hidden: torch.Tensor) -> None:
        items, length = hidden.shape[:2]
        self.full_length = length
        index = torch.arange(length, device=hidden.device).expand(items, length)
        valid = self.encoder.valid
        valid = torch.ones(items, length, dtype=torch.bool) if valid is None else valid.bool()
        counts = valid.sum(dim=1)
        if not torch.equal(valid, torch.arange(length) < counts[:, None].cpu()):
            raise RuntimeError("the ViT stage takes padding patches only at the end of an item")
        self.patches = [int(c) - int(self.encoder.has_cls) for c in counts]
        self.tokens = _Tokens(index, valid.to(hidden.device), torch.ones(items, length, device=hidden.device))

    def _apply(self, block: int, stage: Stage, hidden: torch.Tensor) -> torch.Tensor:
        spec = methods.registered_methods()[stage.method]
        params = self.config.params.get(stage.method, {})
        tokens, first = self.tokens, int(self.encoder.has_cls)
        rows, sizes, index, proportional = [], [], [], tokens.proportional
        signals = self.signals.get(block)
        for i in range(hidden.shape[0]):
            n_valid = int(tokens.valid[i].sum())
            state, size, where = hidden[i, :n_valid], tokens.sizes[i, :n_valid], tokens.index[i, :n_valid]
            n = n_valid - first
            budget = min(n, keep_count(self.patches[i], stage.ratio))
            if budget == n and spec.exact_count:  # nothing to choose: the tokens stay as they are
                rows.append(state), sizes.append(size), index.append(where)
                continue
            self.changed = True
            grid = (1, *self.encoder.item_grid(i)) if tokens.full_grid else None
            local, kept, kept_sizes, wants_proportional = choose(
                spec, params, state[first:], size[first:], budget, grid, block, self.encoder.modality,
                None if signals is None else signals[i])
            proportional = proportional or wants_proportional
            rows.append(torch.cat([state[:first], kept]))
            sizes.append(torch.cat([size[:first], kept_sizes]))
            index.append(torch.cat([where[:first], where[first:][local]]))
        length = max(r.shape[0] for r in rows)
        out = hidden.new_zeros(hidden.shape[0], length, hidden.shape[2])
        new = _Tokens(torch.zeros(hidden.shape[0], length, dtype=torch.long, device=hidden.device),
                      torch.zeros(hidden.shape[0], length, dtype=torch.bool, device=hidden.device),
                      torch.ones(hidden.shape[0], length, device=hidden.device), proportional,
                      full_grid=tokens.full_grid and all(r.shape[0] == first + p for r, p in zip(rows, self.patches)))
        for i, (row, size, where) in enumerate(zip(rows, sizes, index)):
            out[i, :row.shape[0]] = row
            new.sizes[i, :row.shape[0]] = size
            new.index[i, :row.shape[0]] = where
            new.valid[i, :row.shape[0]] = True
        kept = torch.zeros(hidden.shape[0], self.full_length + 1, dtype=torch.bool, device=hidden.device)
        kept.scatter_(1, new.index.masked_fill(~new.valid, self.full_length), True)  # padding -> the extra column
        self.masks[stage.label] = kept[:, :-1].cpu()
        if not self.changed:
            return hidden  # the stock states, unpadded: keep 1.0 is the unpatched call
        self.tokens = new
        return out

    def _attention_bias(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The additive attention mask of the current tokens: log(size) per key under proportional attention,
        the most negative value on padding keys; None when neither applies (the stock call)."""
        tokens = self.tokens
        if tokens is None or (not tokens.proportional and bool(tokens.valid.all())):
            return None
        bias = torch.zeros(tokens.valid.shape, dtype=hidden.dtype, device=hidden.device)
        if tokens.proportional:
            bias = tokens.sizes.clamp(min=1).log().to(hidden.dtype)
        bias = bias.masked_fill(~tokens.valid, torch.finfo(hidden.dtype).min)
        return bias[:, None, None, :]  # (items, 1, 1, T): every head and query

    # -- the tower's output ----------------------------------------------------------------------------
    def restore_outputs(self, module, args, output):
        """Put every shortened output of the call back at full length (see the module docstring)."""
        if not self.changed:
            return output
        known = {id(tensor): tokens for tensor, tokens in self.outputs}
        states = getattr(output, "hidden_states", None)
        if states is not None:
            restored = []
            for position, state in enumerate(states):
                if state is None or id(state) not in known and state.shape[1] == self.full_length:
                    restored.append(state)  # not selected by the caller, or the output of a block before the stages
                    continue
                if id(state) not in known and position == len(states) - 1:
                    known[id(state)] = self.tokens  # the last entry, tied to last_hidden_state by transformers
                if id(state) not in known:
                    raise RuntimeError(f"{type(module).__name__} returned a hidden state of {state.shape[1]} tokens "
                                       "that no encoder block produced; the ViT stage cannot place it")
                restored.append(_scatter(state, known[id(state)], self.full_length))
            output.hidden_states = tuple(restored)
        last = getattr(output, "last_hidden_state", None)
        if last is not None and last.shape[1] != self.full_length:
            output.last_hidden_state = _scatter(last, self.tokens, self.full_length)
        return output


    def reweight_pool(self, module, args, kwargs, output):
        """The pooling module's output recomputed by ``Encoder.pool`` with the patches each kept token stands for."""
        if not self.changed:
            return output
        tokens = self.tokens
        weights = torch.zeros(tokens.index.shape[0], self.full_length + 1, device=tokens.sizes.device)
        weights.scatter_(1, tokens.index.masked_fill(~tokens.valid, self.full_length), tokens.sizes * tokens.valid)
        return self.encoder.pool[1](module, args, kwargs, output, weights[:, :-1])


def _scatter(state: torch.Tensor, tokens: _Tokens, full_length: int) -> torch.Tensor:
    out = state.new_zeros(state.shape[0], full_length, state.shape[2])
    for i in range(state.shape[0]):
        valid = tokens.valid[i]
        out[i, tokens.index[i, valid]] = state[i, valid]
    return out


def _gather(value, index: torch.Tensor):
    """A per-token block input (a tensor, or a tuple of them, one value per token along dim 1) for the current
    tokens; padding rows take token 0's (their keys are masked)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_gather(v, index) for v in value)
    expanded = index.to(value.device).view(*index.shape, *[1] * (value.dim() - 2)).expand(
        *index.shape, *value.shape[2:])
    return value.expand(index.shape[0], *value.shape[1:]).gather(1, expanded)


def _block_signals(encoder: Encoder, attn, hidden: torch.Tensor, tokens: _Tokens, bias) -> list[EncoderSignals]:
    """Per item: the keys (T, H, d) of ``attn`` on its normed input ``hidden`` and, with a [CLS] token, the [CLS]
    query's attention row (softmax over the valid keys with the block's own mask, mean over heads)."""
    items, length = hidden.shape[:2]
    key = encoder.keys(attn, hidden).float()
    first = int(encoder.has_cls)
    cls_rows = None
    if encoder.has_cls:
        query = encoder.queries(attn, hidden[:, :1]).float()
        logits = torch.einsum("bqhd,bkhd->bhqk", query, key)[:, :, 0] * attn.scale  # (items, H, T)
        if bias is not None:
            logits = logits + bias[:, 0].float()
        cls_rows = torch.softmax(logits, dim=-1).mean(dim=1)  # (items, T)
    out = []
    for i in range(items):
        n = int(tokens.valid[i].sum()) if tokens is not None else \
            length if encoder.valid is None else int(encoder.valid[i].sum())  # the encoder's own padding left out
        out.append(EncoderSignals(key[i, first:n], None if cls_rows is None else cls_rows[i, first:n]))
    return out


# ------------------------------------------------------------------------------------------------------
# Encoders over one packed sequence (Qwen-VL)
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedEncoder:
    """A vision encoder that runs every item of a call as one packed sequence (Qwen-VL), given by the adapter.

    Its tokens are merge units: ``unit`` consecutive rows (the m x m patches the merger concatenates into one
    feature token), so the stage keeps, drops and merges whole units; a method sees an item's units in raster order,
    each as the concatenation of its patches' states (and keys), which is what the merger reads.

    tower:  the module whose output's ``last_hidden_state`` (rows) is put back at full length.
    blocks: called as ``block(hidden (S, D), cu_seqlens=..., max_seqlen=..., position_embeddings=(cos, sin), ...)``;
            ``attention(block)`` gets the normed rows; ``keys(attn, rows)`` -> (S, heads, d).
    unit_token: (U,) long, per unit in the encoder's order: the feature token it becomes (the order the features
            come out of the feature call). An item's tokens are contiguous there, in raster order.
    item_grids: per item (an image, a video frame), in token order: its (h, w) tokens.
    unit_window: (U,) long, per unit in the encoder's order: its attention window (None: no windowed blocks); the
            windows, like the items, are contiguous runs of units.
    full_blocks: the blocks that attend over each item whole (the others attend within windows).
    mergers: modules reading the block outputs unit by unit (the merger, Qwen3-VL's deepstack mergers): their
            outputs are put back at one row per unit of the encoder's order, zeros where no unit is kept.
    """

    tower: torch.nn.Module
    blocks: Sequence[torch.nn.Module]
    attention: Callable[[torch.nn.Module], torch.nn.Module]
    keys: Callable[[Any, torch.Tensor], torch.Tensor]
    unit: int
    unit_token: torch.Tensor
    item_grids: Sequence[tuple[int, int]]
    unit_window: torch.Tensor | None
    full_blocks: frozenset[int]
    mergers: Sequence[torch.nn.Module]
    feature_block: int
    modality: str = "image"


@dataclass
class PackedRun:
    """One feature call's ViT stages on a packed encoder: the current units and what the later blocks need."""

    encoder: PackedEncoder
    stages: list[tuple[int, Stage]]
    config: PruneConfig
    units: torch.Tensor | None = None  # (K,) the current units' positions in the encoder's order, ascending
    sizes: torch.Tensor | None = None  # (K,) original units each current unit stands for
    signals: dict[int, torch.Tensor] = field(default_factory=dict)  # stage block -> keys (K, heads, unit * d)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # stage label -> (U,) kept, token order
    changed: bool = False

    def __post_init__(self):
        enc = self.encoder
        self.item_start = torch.tensor([0] + [h * w for h, w in enc.item_grids]).cumsum(0)
        self.item_of_unit = torch.bucketize(enc.unit_token, self.item_start[1:], right=True)

    def before_block(self, block: int):
        stage = dict(self.stages).get(block)

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.units is None:
                self.units = torch.arange(hidden.shape[0] // self.encoder.unit)
                self.sizes = torch.ones(self.units.shape[0])
            if stage is not None:
                with profiling.stage(stage):
                    hidden = self._apply(block, stage, hidden)
            if not self.changed:
                return args, kwargs  # the stock call
            args = (hidden, *args[1:]) if args else args
            kwargs = {**kwargs, **({} if args else {"hidden_states": hidden}), **self._segments(block, kwargs)}
            return args, kwargs

        return hook

    def capture_signals(self, block: int):
        """A pre-hook on the attention of the block before a stage: the current units' keys, patches concatenated."""

        def hook(attn, args, kwargs):
            rows = args[0] if args else kwargs["hidden_states"]
            keys = self.encoder.keys(attn, rows).float()  # (S, H, d)
            units = keys.view(-1, self.encoder.unit, *keys.shape[1:]).transpose(1, 2)  # (K, H, unit, d)
            self.signals[block + 1] = units.flatten(2)
        return hook

    def _apply(self, block: int, stage: Stage, hidden: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        spec = methods.registered_methods()[stage.method]
        params = self.config.params.get(stage.method, {})
        states = hidden.view(-1, enc.unit * hidden.shape[1])  # (K, unit * D)
        tokens = enc.unit_token[self.units]
        items = self.item_of_unit[self.units]
        keys = self.signals.get(block)
        chosen, new_states, new_sizes = [], [], []
        for i, (h, w) in enumerate(enc.item_grids):
            current = torch.nonzero(items == i).flatten()
            current = current[tokens[current].argsort()]  # the item's units in raster order
            n, budget = current.numel(), min(current.numel(), keep_count(h * w, stage.ratio))
            if budget == n and spec.exact_count:
                chosen.append(current), new_states.append(states[current]), new_sizes.append(self.sizes[current])
                continue
            self.changed = True
            signals = None if keys is None else EncoderSignals(keys[current.to(keys.device)])
            local, kept, kept_sizes, proportional = choose(
                spec, params, states[current.to(states.device)], self.sizes[current], budget,
                (1, h, w) if n == h * w else None, block, enc.modality, signals)
            if proportional:
                raise NotImplementedError(
                    f"{stage.method} asks for proportional attention, which this vision encoder cannot add: its "
                    "attention runs over packed per-item segments and takes no attention mask; allowed here: the "
                    "method with proportional attention off (TOME_PROP_ATTN=0 for ToMe)")
            chosen.append(current[local.cpu()]), new_states.append(kept), new_sizes.append(kept_sizes.cpu())
        positions = torch.cat(chosen)
        order = self.units[positions].argsort()  # back to the encoder's order: items and windows stay contiguous
        kept_tokens = torch.zeros(enc.unit_token.shape[0], dtype=torch.bool)
        kept_tokens[enc.unit_token[self.units[positions]]] = True
        self.masks[stage.label] = kept_tokens
        if not self.changed:
            return hidden
        self.units, self.sizes = self.units[positions][order], torch.cat(new_sizes)[order]
        return torch.cat(new_states)[order.to(hidden.device)].reshape(-1, hidden.shape[1])

    def _segments(self, block: int, kwargs: dict) -> dict:
        """The block's per-row inputs for the current units: rotary tables, attention segments, their longest."""
        enc = self.encoder
        rows = (self.units[:, None] * enc.unit + torch.arange(enc.unit)).flatten()
        out = {}
        if "position_embeddings" in kwargs:
            out["position_embeddings"] = tuple(t[rows.to(t.device)] for t in kwargs["position_embeddings"])
        groups = self.item_of_unit[self.units] if block in enc.full_blocks else enc.unit_window[self.units]
        lengths = torch.unique_consecutive(groups, return_counts=True)[1] * enc.unit
        cu_seqlens = kwargs["cu_seqlens"]
        out["cu_seqlens"] = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(cu_seqlens.device, cu_seqlens.dtype)
        longest = kwargs.get("max_seqlen")
        if longest is not None:
            longest = int(lengths.max()) if isinstance(longest, int) else lengths.max().to(longest.device, longest.dtype)
        out["max_seqlen"] = longest
        return out

    def restore_units(self, module, args, output):
        """A merger's output (one row per current unit) put back at one row per unit, encoder's order."""
        if not self.changed:
            return output
        full = output.new_zeros(self.encoder.unit_token.shape[0], *output.shape[1:])
        full[self.units.to(output.device)] = output
        return full

    def restore_outputs(self, module, args, output):
        last = getattr(output, "last_hidden_state", None)
        if self.changed and last is not None:
            rows = (self.units[:, None] * self.encoder.unit + torch.arange(self.encoder.unit)).flatten()
            full = last.new_zeros(self.encoder.unit_token.shape[0] * self.encoder.unit, last.shape[1])
            full[rows.to(last.device)] = last
            output.last_hidden_state = full
        return output

    def run(self, call: Callable[[], Any]):
        enc, first = self.encoder, self.stages[0][0]
        handles = []
        try:
            for block in range(first, len(enc.blocks)):
                handles.append(enc.blocks[block].register_forward_pre_hook(self.before_block(block),
                                                                           with_kwargs=True))
            for block, _ in self.stages:
                handles.append(enc.attention(enc.blocks[block - 1]).register_forward_pre_hook(
                    self.capture_signals(block - 1), with_kwargs=True))
            for merger in enc.mergers:
                handles.append(merger.register_forward_hook(self.restore_units))
            handles.append(enc.tower.register_forward_hook(self.restore_outputs))
            output = call()
        finally:
            for handle in handles:
                handle.remove()
        return output, self.masks


def run(encoder: Encoder, config: PruneConfig, call: Callable[[], Any]):
    """Run ``call()`` (a feature call that runs ``encoder``) with the configured ViT stages. Returns the call's
    output (shortened states put back at full length) and {stage label: (items, full_length) bool kept mask}."""
    stages = resolve_blocks(config.vit, len(encoder.blocks), encoder.feature_block)
    if isinstance(encoder, PackedEncoder):  # no attention mask: any attention implementation
        return PackedRun(encoder, stages, config).run(call)
    if encoder.tower.config._attn_implementation == "flash_attention_2":
        raise NotImplementedError("the ViT stage masks padding keys and adds proportional attention through an "
                                  "additive attention mask, which flash_attention_2 does not take; allowed: "
                                  "--attn-implementation sdpa or eager")
    state = EncoderRun(encoder, stages, config)
    first = stages[0][0]
    handles = []
    try:
        for block in range(first, len(encoder.blocks)):
            handles.append(encoder.blocks[block].register_forward_pre_hook(state.before_block(block), with_kwargs=True))
            handles.append(encoder.blocks[block].register_forward_hook(state.after_block))
            handles.append(encoder.attention(encoder.blocks[block]).register_forward_pre_hook(state.set_mask,
                                                                                             with_kwargs=True))
        for block, _ in stages:
            handles.append(encoder.attention(encoder.blocks[block - 1]).register_forward_pre_hook(
                state.capture_signals(block - 1), with_kwargs=True))
        handles.append(encoder.tower.register_forward_hook(state.restore_outputs))
        if encoder.pool is not None:
            handles.append(encoder.pool[0].register_forward_hook(state.reweight_pool, with_kwargs=True))
        output = call()
    finally:
        for handle in handles:
            handle.remove()
    return output, state.masks
