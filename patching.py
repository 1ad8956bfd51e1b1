"""Installing the pruning hooks on transformers model classes: the part every model family shares.

Each family (``custom_<family>.py``) names its classes and supplies a :class:`hooks.FamilyAdapter`; this module
wraps, at class level and with ``functools.wraps`` (``generate`` inspects signatures),

* ``<Model>.get_image_features`` / ``get_video_features``: note each span's grid (``generate`` runs these
  before ``forward`` and then drops their arguments);
* ``<Model>.forward``: open a :class:`Call` holding the call's arguments (token ids, 2-D mask, ...);
* ``<TextModel>.forward``, the language-model entry: pre-LLM pruning, intra-LLM layer hooks, decode steps (one
  wrapper per language-model class, shared by every family whose models use it).

Runtime state lives in a per-model :class:`hooks.PruningState` and in context variables scoped to one call;
nothing goes through environment variables or files.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import inspect
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

import encoder_stage
import hooks
import kv_stage
import methods
import profiling
from hooks import FamilyAdapter, PruningState
from utils import PruneConfig, check_transformers_version

STATE_ATTR = "_visual_token_pruning"


@dataclass
class Call:
    """One ``Model.forward`` call, as the language-model entry sees it."""

    model: Any
    state: PruningState
    adapter: FamilyAdapter
    args: dict  # the bound arguments of Model.forward (input_ids, attention_mask, mm_token_type_ids, ...)
    extras: dict = field(default_factory=dict)  # family-specific per-call state

    @property
    def input_ids(self) -> torch.Tensor | None:
        return self.args.get("input_ids")


ACTIVE_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar("pruning_call", default=None)
_IN_FEATURES: contextvars.ContextVar[bool] = contextvars.ContextVar("pruning_in_features", default=False)


def pruning_state(model) -> PruningState | None:
    """The pruning state of a patched model (the ``*ForConditionalGeneration`` or its ``.model``)."""
    inner = getattr(model, "model", model)
    return getattr(inner, STATE_ATTR, None)


def last_record(model) -> hooks.ForwardRecord | None:
    """Visual tokens per span before and after each stage, for the model's last prefill."""
    state = pruning_state(model)
    return None if state is None else state.record


@dataclass(frozen=True)
class Target:
    """One model family: where its classes live and its adapter.

    ``text_class`` names the language-model class in ``module``; families whose language model is built from the
    text config (``AutoModel.from_config``: LLaVA's Llama / Mistral / Qwen2, InternVL's Qwen2) give None and list the
    usual ones in ``language_models`` ("module:Class"). Any other language-model class is wrapped when a model of the
    family is first seen (a model dispatched with a ``device_map`` before that is refused, see :func:`_check_dispatch`).
    """

    module: str
    model_class: str
    text_class: str | None
    adapter: FamilyAdapter
    language_models: tuple[str, ...] = ()


# Language-model classes are shared between families (Qwen2Model under LLaVA-OneVision and InternVL): each is wrapped
# once, however many families' patches are applied, and restored when the last of them is removed.
_TEXT_WRAPPED: dict[type, list] = {}  # class -> [original forward, number of FamilyPatch users]


def _wrap_text_class(cls: type) -> None:
    if cls in _TEXT_WRAPPED:
        _TEXT_WRAPPED[cls][1] += 1
        return
    original = cls.__dict__["forward"]
    _TEXT_WRAPPED[cls] = [original, 1]
    cls.forward = _wrap_text_forward(original)


def _unwrap_text_class(cls: type) -> None:
    entry = _TEXT_WRAPPED[cls]
    entry[1] -= 1
    if entry[1] == 0:
        cls.forward = entry[0]
        del _TEXT_WRAPPED[cls]


def _class(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


class FamilyPatch:
    """The wrappers of one or more model families, installed by :meth:`apply` and removed by :meth:`remove`."""

    def __init__(self, targets: list[Target]):
        self.targets = targets
        self.config: PruneConfig | None = None
        self.originals: dict[tuple[type, str], Any] = {}
        self.text_classes: set[type] = set()  # language-model classes this patch wrapped (shared, see _TEXT_WRAPPED)

    def apply(self, config: PruneConfig | None = None) -> PruneConfig:
        """Read (or take) the configuration and install the wrappers. A second call only replaces the
        configuration. Raises before touching any class if the configuration is bad."""
        check_transformers_version()
        self.config = PruneConfig.from_env() if config is None else config
        if self.originals or self.text_classes:
            return self.config
        for target in self.targets:
            model_cls = getattr(importlib.import_module(target.module), target.model_class)
            wrappers = [(model_cls, "forward", self._wrap_model_forward(model_cls.forward, target.adapter))]
            for modality in ("image", "video"):
                name = f"get_{modality}_features"
                if name in model_cls.__dict__:  # LLaVA-1.5, LLaVA-NeXT and InternVL take no videos
                    wrappers.append((model_cls, name, self._wrap_features(getattr(model_cls, name), modality,
                                                                          target.adapter)))
            for cls, name, wrapper in wrappers:
                self.originals[(cls, name)] = cls.__dict__[name]
                setattr(cls, name, wrapper)
            text_classes = [f"{target.module}:{target.text_class}"] if target.text_class else []
            for path in text_classes + list(target.language_models):
                self._wrap_text(_class(path))
        return self.config

    def _wrap_text(self, cls: type) -> None:
        if cls not in self.text_classes:
            self.text_classes.add(cls)
            _wrap_text_class(cls)

    def remove(self) -> None:
        """Restore every wrapped method. Idempotent."""
        for (cls, name), original in self.originals.items():
            setattr(cls, name, original)
        self.originals.clear()
        for cls in self.text_classes:
            _unwrap_text_class(cls)
        self.text_classes.clear()
        self.config = None

    # -- per-model state ---------------------------------------------------------------------------
    def state_for(self, model, adapter: FamilyAdapter) -> PruningState:
        state = getattr(model, STATE_ATTR, None)
        # Depth-checked, with a multi-stage method's own schedule expanded for this depth (memoised per depth).
        config = self.config.resolved_for(model.config.get_text_config().num_hidden_layers)
        if state is None or state.config is not config:
            _check_dispatch(model)
            self._wrap_text(type(model.language_model))  # a language model of a class not listed in the Target
            adapter.check_model(config, model)
            if config.kv is not None:
                kv_stage.check_model(config.kv, model.language_model, adapter)
            if config.vit:
                adapter.check_vit(model)
            state = PruningState(config)
            state.decode_stage = _decode_stage(config, model.language_model, adapter)
            text_model = model.language_model
            owners = {i: adapter.cache_owner(text_model, i) for i in range(text_model.config.num_hidden_layers)}
            state.cache_owner = {layer: owner for layer, owner in owners.items() if owner != layer}
            setattr(model, STATE_ATTR, state)
        return state

    # -- wrappers ----------------------------------------------------------------------------------
    def _wrap_features(self, original, modality: str, adapter: FamilyAdapter):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def get_features(model, *args, **kwargs):
            if _IN_FEATURES.get():  # e.g. Qwen3-VL's get_video_features calls get_image_features: note the outer
                return original(model, *args, **kwargs)
            bound = signature.bind_partial(model, *args, **kwargs).arguments
            grids = adapter.span_grids(model, modality, bound)
            if grids is not None:
                if modality == "video":
                    grids = hooks.tag_videos(grids, adapter.frames_per_video(model, bound))
                self.state_for(model, adapter).pending_grids[modality] = grids
            needs = self._vision_needs()
            token = _IN_FEATURES.set(True)
            try:
                with profiling.region(profiling.VISION):  # signal capture and ViT stages included
                    if self.config.vit and grids is not None:
                        return self._run_vit_stages(model, adapter, modality, bound,
                                                    lambda: original(model, *args, **kwargs))
                    if needs is None or grids is None:
                        return original(model, *args, **kwargs)
                    output, signals = adapter.capture_vision(model, modality, bound, needs,
                                                             lambda: original(model, *args, **kwargs))
                self.state_for(model, adapter).pending_vision[modality] = signals
                return output
            finally:
                _IN_FEATURES.reset(token)

        return get_features

    def _run_vit_stages(self, model, adapter: FamilyAdapter, modality: str, bound: dict, run):
        """The feature call with the ViT stages inside its encoder; notes each grid's keep masks, laid out as the
        features are, for the language-model entry."""
        encoder, lay_out = adapter.vit_encoder(model, modality, bound)
        output, masks = encoder_stage.run(encoder, self.config, run)
        per_grid: list[dict] = []
        for label, mask in masks.items():
            for g, values in enumerate(lay_out(mask.float())):
                if not bool(((values == 0) | (values == 1)).all()):
                    raise NotImplementedError(f"{type(model).__name__} resamples this {modality}'s patch grid "
                                              "(e.g. LLaVA-OneVision's bilinear downscale of large tile grids), "
                                              "mixing kept and dropped patches: the ViT stage cannot place its "
                                              "tokens; allowed: images the model does not resample")
                if g == len(per_grid):
                    per_grid.append({})
                per_grid[g][label] = values.bool()
        if per_grid:
            self.state_for(model, adapter).pending_vit[modality] = per_grid
        return output

    def _vision_needs(self):
        """What the configured pre-LLM method reads from the vision encoder (None: nothing, no capture)."""
        stage = self.config.pre_llm
        if stage is None:
            return None
        needs = methods.registered_methods()[stage.method].vision_needs(self.config.params.get(stage.method, {}))
        if needs is not None and self.config.cls_signal == "substitute":
            needs = dataclasses.replace(needs, cls_substitute=True)
        return needs

    def _wrap_model_forward(self, original, adapter: FamilyAdapter):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def forward(model, *args, **kwargs):
            bound = dict(signature.bind_partial(model, *args, **kwargs).arguments)
            state = self.state_for(model, adapter)
            if not state.continues_prefill(bound.get("past_key_values")):
                state.undo_model_changes()  # before the model derives positions from its own state
            token = ACTIVE_CALL.set(Call(model, state, adapter, bound))
            try:
                return original(model, *args, **kwargs)
            finally:
                ACTIVE_CALL.reset(token)

        return forward

def _wrap_text_forward(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(text_model, *args, **kwargs):
        call = ACTIVE_CALL.get()
        if call is None or call.model.language_model is not text_model:
            return original(text_model, *args, **kwargs)  # called on its own: spans unknown, nothing to prune
        bound = signature.bind_partial(text_model, *args, **kwargs).arguments
        extra = bound.pop("kwargs", {})
        bound.pop("self", None)
        return run_language_model(original, text_model, call, {**bound, **extra})

    forward._pruning_wrapper = True
    return forward


def _check_dispatch(model) -> None:
    """A model loaded with a ``device_map`` (accelerate's dispatch, e.g. ``device_map="auto"`` over several GPUs or
    with offloading) keeps the ``forward`` its modules had when it was loaded. If that was before ``apply_patches()``,
    the language model would run unpruned while the record says otherwise: refuse."""
    language_model = model.language_model
    kept = getattr(language_model, "_old_forward", None)
    if kept is not None and not getattr(getattr(kept, "__func__", kept), "_pruning_wrapper", False):
        raise RuntimeError(f"{type(model).__name__} was loaded with a device_map before the pruning patches were "
                           "applied, so its language model keeps the unpatched forward; call apply_patches() before "
                           "from_pretrained(..., device_map=...) (the runners do)")


def _is_empty(cache) -> bool:
    return cache is None or cache.get_seq_length() == 0


def run_language_model(original, text_model, call: Call, kwargs: dict):
    """The language-model entry: prune (prefill) or follow the pruned layout (decode), then run the model.

    A call is a decode step only when it continues the cache that the model's last prefill wrote; every other call
    starts fresh. A fresh call the hooks cannot read (no token ids, e.g. ``inputs_embeds`` only) or one that
    continues a cache from elsewhere runs exactly as stock.
    """
    state, adapter, config = call.state, call.adapter, call.state.config
    embeds, cache = kwargs["inputs_embeds"], kwargs.get("past_key_values")
    if state.continues_prefill(cache):
        return _decode_step(original, text_model, call, kwargs)
    state.forget_prefill()
    grids, state.pending_grids = state.pending_grids, {}
    vision, state.pending_vision = state.pending_vision, {}
    vit, state.pending_vit = state.pending_vit, {}
    if not _is_empty(cache):
        _warn_once(state, "foreign-cache", "the language model was called with a cache that no prefill of these hooks "
                   "wrote: the call runs unpruned, exactly as stock")
        return original(text_model, **kwargs)
    if call.input_ids is None or call.input_ids.shape[1] != embeds.shape[1]:
        _warn_once(state, "no-token-ids", "the model was called without token ids matching its inputs (e.g. "
                   "inputs_embeds only): the pruning hooks cannot find the visual tokens, so the call runs unpruned, "
                   "exactly as stock")
        return original(text_model, **kwargs)

    state.record = None  # a new prefill: the last one's record goes (its stage maps went above)
    state.lm_input_length = embeds.shape[1]
    mask = adapter.mask_2d(kwargs, call)
    layout = hooks.find_layout(call.input_ids, mask, adapter.visual_ids(call.model.config), grids, adapter.join_runs)
    for span in (span for sample in layout.spans for span in sample if span.video is not None and span.grid):
        span.times = adapter.frame_times(call.model, call.args, span.video, span.grid[0]) or span.times
    if not any(layout.spans) and config.kv is None:
        state.finish_record(layout.spans, state.cached_entries(mask, *embeds.shape[:2], text_model.config))
        with profiling.region(profiling.LM_PREFILL, cache, layout.spans):
            output = original(text_model, **kwargs)  # text-only prompt: untouched
        _note_prefill_cache(state, output, cache)
        return output
    if any(layout.spans) and (vit or config.pre_llm is not None):
        selection = _before_lm(config, layout, embeds, vit, vision)
        kwargs["inputs_embeds"] = selection.gather_tokens(embeds)
        adapter.shorten_lm_inputs(selection, kwargs, call)
        state.pre_map = hooks.StageMap(0, selection.index, selection.prefill_length)
        layout = selection.layout
    if state.decode_stage is not None:
        state.cache_visual = layout.span_id >= 0  # the decode-time stage's visual entries (the cache's layout)
    cached = None
    try:
        with profiling.region(profiling.LM_PREFILL, cache, layout.spans), adapter.positions_context(text_model, call), \
                _intra_llm(adapter, text_model, call, kwargs, layout, layout.attention_mask, cache):
            output = original(text_model, **kwargs)
        _note_prefill_cache(state, output, cache)
        if 0 in state.kv_maps:  # the model numbers decode steps from layer 0's cache length
            kv_map = state.kv_maps[0]
            adapter.on_cache_shortened(call, kv_map.prefill_length - kv_map.index.shape[1])
        cached = state.cached_entries(mask, *embeds.shape[:2], text_model.config)
        return adapter.finish_lm_output(output, kwargs, pruned=True)
    finally:
        state.finish_record(layout.spans, cached)


def _decode_stage(config: PruneConfig, text_model, adapter: FamilyAdapter):
    """The pre-LLM method's decode-time stage (DyCoke's) where this model can carry it: it needs a layer before its
    own and every layer's cache in one layout (full-attention caches only). Elsewhere it is left out with a
    warning, and the method's pre-LLM stage runs alone."""
    stage = hooks.decode_selection(config)
    if stage is None:
        return None
    depth = text_model.config.num_hidden_layers
    why = None
    if not 1 <= stage.layer < depth:
        why = f"its layer {stage.layer} (DYCOKE_L) is not one of the model's layers 1..{depth - 1}"
    elif not all(adapter.kv_compressible(text_model, layer) for layer in range(depth)):
        why = f"{type(text_model).__name__} has sliding-window or KV-shared layers, whose caches it cannot read in one layout"
    if why is None:
        return stage
    warnings.warn(f"{config.pre_llm.method}'s decode-time stage is left out on this model: {why}; its pre-LLM stage "
                  "runs alone (DYCOKE_DECODE=0 says so and silences this warning)", stacklevel=3)
    return None


def _before_lm(config: PruneConfig, layout: hooks.Layout, embeds: torch.Tensor, vit: dict, vision: dict):
    """One selection for what happens before the language model: the tokens the ViT stages kept (their merged
    states are already in ``embeds``), then the pre-LLM method on those."""
    selection = None
    if vit:
        selection = hooks.select_by_masks(layout, hooks.vit_masks_by_span(layout, vit))
        layout = selection.layout
    if config.pre_llm is None:
        return selection
    with profiling.stage(config.pre_llm):
        tokens = embeds if selection is None else selection.gather_tokens(embeds)
        pre = hooks.select_tokens(config.pre_llm, config, layout, tokens, vision=hooks.vision_by_span(layout, vision))
    if selection is None:
        return pre
    return hooks.Selection(hooks.compose(selection.index, pre.index), pre.replacements, pre.layout,
                           selection.prefill_length)


def _decode_step(original, text_model, call: Call, kwargs: dict):
    """A call that continues the last prefill's cache: follow its pruned layout (nothing to do if it pruned none)."""
    state, adapter = call.state, call.adapter
    if not state.pruned:
        return original(text_model, **kwargs)
    if kwargs["inputs_embeds"].shape[1] != 1:
        raise NotImplementedError("after a pruned prefill only one-token decode steps are supported "
                                  "(no chunked prefill, no reuse of a pruned cache across generate calls)")
    state.decoded += 1
    mask = adapter.mask_2d(kwargs, call)
    entry_maps = state.maps_until(0) if state.kv_maps else [state.pre_map] if state.pre_map else []
    if entry_maps:  # the language model's own mask and positions follow layer 0's cache
        adapter.decode_lm_inputs(kwargs, state.decode_mask(mask, entry_maps), call)
    with adapter.positions_context(text_model, call), \
            _intra_llm(adapter, text_model, call, kwargs, None, mask, kwargs.get("past_key_values")):
        return original(text_model, **kwargs)


def _note_prefill_cache(state: PruningState, output, cache) -> None:
    """Remember the cache this prefill wrote (created inside the model when none was passed)."""
    written = getattr(output, "past_key_values", None)
    written = cache if written is None else written
    state.prefill_cache = weakref.ref(written) if written is not None else None


def _warn_once(state: PruningState, key: str, message: str) -> None:
    if key not in state.warned:
        state.warned.add(key)
        warnings.warn(message, stacklevel=4)


@contextlib.contextmanager
def _intra_llm(adapter: FamilyAdapter, text_model, call: Call, kwargs: dict, layout, mask_2d, cache):
    config = call.state.config
    decode_stage = layout is None and call.state.decode_stage is not None  # its work is in decode steps
    if not config.intra_llm and config.kv is None and not decode_stage:
        yield
        return
    with hooks.intra_llm_hooks(adapter, text_model, call.state, layout, mask_2d, cache), \
            adapter.lm_call_context(text_model, call, kwargs, layout is not None):
        yield
