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
            h, w = self.encoder.item_grid(i)
            ctx = PruneContext(features=state[first:], keep=budget, grid=(1, h, w) if tokens.full_grid else None,
                               modality=self.encoder.modality, stage=VIT, params=params, span_key=block, layer=block,
                               sizes=size[first:], _encoder=None if signals is None else signals[i])
            local, merged, new_sizes, wants_proportional = hooks.check_result(spec, spec.fn(ctx), n, budget)
            local = local.to(state.device)
            kept = state[first:][local]
            if merged is not None:
                kept = merged.to(state.device, state.dtype)
            kept_sizes = size[first:][local] if new_sizes is None else new_sizes.to(size.device, size.dtype)
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
        n = int(tokens.valid[i].sum()) if tokens is not None else length
        out.append(EncoderSignals(key[i, first:n], None if cls_rows is None else cls_rows[i, first:n]))
    return out


def run(encoder: Encoder, config: PruneConfig, call: Callable[[], Any]):
    """Run ``call()`` (a feature call that runs ``encoder``) with the configured ViT stages. Returns the call's
    output (shortened states put back at full length) and {stage label: (items, full_length) bool kept mask}."""
    stages = resolve_blocks(config.vit, len(encoder.blocks), encoder.feature_block)
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
