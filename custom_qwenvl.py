"""Visual-token pruning hooks for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers 5.23).

``apply_patches()`` reads the pruning configuration from the environment (see README) and wraps, at class
level, three narrow points of each family (nothing is copied from upstream):

* ``<Family>Model.get_image_features`` / ``get_video_features``: note each span's (t, h, w) grid, because
  ``generate`` pops the grids before ``forward`` runs;
* ``<Family>Model.forward``: note the ``input_ids`` of the call, from which visual spans are found;
* ``<Family>TextModel.forward`` (the language model entry): pre-LLM pruning of the embeddings, positions,
  mask and Qwen3-VL deepstack state, and, for intra-LLM pruning, decoder-layer hooks installed for the
  duration of the call (see ``hooks.intra_llm_hooks``).

Kept tokens keep their original 3-D M-RoPE positions; after pre-LLM pruning ``rope_deltas`` grows by the
number of dropped tokens, so decoding without explicit positions continues where the unpruned model would.
``remove_patches()`` restores the originals. Importing this module changes nothing.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

import hooks
from hooks import FamilyAdapter, PruningState, Selection, gather_positions
from utils import PruneConfig, check_transformers_version

__all__ = ["apply_patches", "remove_patches", "pruning_state", "last_record"]


# --------------------------------------------------------------------------------------------------
# What differs between the three Qwen families
# --------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def text_positions_for(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Contiguous text positions (row 0 of Qwen's 4-row positions) as generate makes them."""
    if mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)


class QwenAdapter(FamilyAdapter):
    def __init__(self, deepstack: bool, frames_are_spans: bool):
        self.deepstack = deepstack  # Qwen3-VL injects vision features after the first decoder layers
        self.frames_are_spans = frames_are_spans  # Qwen3-VL lays every video frame out as its own block

    def visual_ids(self, config) -> dict[int, str]:
        return {config.image_token_id: "image", config.video_token_id: "video"}

    def span_grids(self, modality: str, grid_thw: torch.Tensor, merge: int) -> list[tuple[int, int, int]]:
        grids = []
        for t, h, w in grid_thw.tolist():
            if modality == "video" and self.frames_are_spans:
                grids.extend([(1, h // merge, w // merge)] * t)
            else:
                grids.append((t, h // merge, w // merge))
        return grids

    # -- signals -------------------------------------------------------------------------------------
    def query_key(self, attn, hidden, position_embeddings, sample, rows):
        cos, sin = (p[sample] for p in position_embeddings)  # (L, d)
        d = attn.head_dim

        def project(proj, norm, x, c, s):
            states = proj(x).view(x.shape[0], proj.out_features // d, d)
            if norm is not None:
                states = norm(states)
            states = states.transpose(0, 1)  # (heads, n, d)
            return states * c.unsqueeze(0) + _rotate_half(states) * s.unsqueeze(0)

        rows = rows.to(hidden.device)
        q = project(attn.q_proj, getattr(attn, "q_norm", None), hidden[rows], cos[rows], sin[rows])
        k = project(attn.k_proj, getattr(attn, "k_norm", None), hidden, cos, sin)
        return q, k

    # -- masks and per-token state -------------------------------------------------------------------
    def layer_masks(self, text_model, hidden, mask_2d, cache, layer):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kwargs = dict(config=text_model.config, inputs_embeds=hidden, attention_mask=mask_2d,
                      past_key_values=cache, position_ids=None, layer_idx=layer)
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if getattr(text_model, "has_sliding_layers", False):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def layer_type(self, text_model, layer):
        if getattr(text_model, "has_sliding_layers", False):
            return text_model.config.layer_types[layer]
        return "full_attention"

    def shorten_layer_call(self, args, kwargs, index, mask_2d):
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (gather_positions(cos, index), gather_positions(sin, index))
        if kwargs.get("position_ids") is not None:  # the text row: only masks / flash-attention read it
            kwargs["position_ids"] = text_positions_for(mask_2d, *index.shape, cos.device)
        return args, kwargs

    def shorten_lm_inputs(self, selection: Selection, kwargs: dict, model) -> None:
        """Pre-LLM: shorten the language model's per-token inputs (embeddings are done by the caller)."""
        positions = kwargs.get("position_ids")
        batch, length = selection.index.shape
        device = kwargs["inputs_embeds"].device
        if positions is None:  # the text model would number the full sequence 0..L-1: keep those numbers
            positions = torch.arange(selection.prefill_length, device=device).expand(batch, -1)
        if positions.dim() == 2:  # (B, L) text positions: expand as the text model would
            positions = positions.unsqueeze(0).expand(3, -1, -1)
        rope = positions[-3:] if positions.shape[0] == 4 else positions
        text = text_positions_for(selection.layout.attention_mask, batch, length, device)
        # Row 0 feeds only masks / flash-attention packing: keep it contiguous, or the gaps left by the
        # dropped tokens would be read as packed-sequence boundaries.
        kwargs["position_ids"] = torch.cat([text.unsqueeze(0).to(rope.dtype), selection.gather(rope, dim=2)])
        if self.deepstack and kwargs.get("visual_pos_masks") is not None:
            self._shorten_deepstack(selection, kwargs)
        dropped = selection.prefill_length - length
        if dropped and getattr(model, "rope_deltas", None) is not None:
            model.rope_deltas = model.rope_deltas + dropped

    def _shorten_deepstack(self, selection: Selection, holder: dict) -> None:
        old_mask = holder["visual_pos_masks"]
        kept = torch.zeros_like(old_mask)
        index = selection.index.to(old_mask.device)
        kept.scatter_(1, index.clamp(min=0), index >= 0)
        kept_among_visual = kept[old_mask]
        holder["deepstack_visual_embeds"] = [e[kept_among_visual.to(e.device)] for e in holder["deepstack_visual_embeds"]]
        new_mask = selection.gather(old_mask) & (index >= 0)
        holder["visual_pos_masks"] = new_mask  # a merged token gets its representative's deepstack features

    def on_intra_selection(self, text_model, selection, layer):
        call = _ACTIVE_CALL.get()
        if self.deepstack and call is not None and call.deepstack is not None:
            self._shorten_deepstack(selection, call.deepstack)


_FAMILIES = {
    # family: (module, model class, text model class, adapter)
    "qwen2_vl": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel", "Qwen2VLTextModel",
                 QwenAdapter(deepstack=False, frames_are_spans=False)),
    "qwen2_5_vl": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel", "Qwen2_5_VLTextModel",
                   QwenAdapter(deepstack=False, frames_are_spans=False)),
    "qwen3_vl": ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLModel", "Qwen3VLTextModel",
                 QwenAdapter(deepstack=True, frames_are_spans=True)),
}


# --------------------------------------------------------------------------------------------------
# Per-call and per-model state
# --------------------------------------------------------------------------------------------------
@dataclass
class _Call:
    """One ``Model.forward`` call: what the language-model entry needs to know about it."""

    model: Any
    state: PruningState
    adapter: QwenAdapter
    input_ids: torch.Tensor | None
    deepstack: dict | None = None  # Qwen3-VL: the deepstack kwargs of this call, shortened in place


_ACTIVE_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("qwenvl_pruning_call", default=None)
_IN_FEATURES: contextvars.ContextVar[bool] = contextvars.ContextVar("qwenvl_in_features", default=False)
_STATE_ATTR = "_visual_token_pruning"
_ACTIVE: dict[str, Any] = {"config": None, "originals": {}}


def pruning_state(model) -> PruningState | None:
    """The pruning state of a Qwen-VL model (the ``*ForConditionalGeneration`` or its ``.model``)."""
    inner = getattr(model, "model", model)
    return getattr(inner, _STATE_ATTR, None)


def last_record(model) -> hooks.ForwardRecord | None:
    """Visual tokens per span before and after each stage, for the model's last prefill."""
    state = pruning_state(model)
    return None if state is None else state.record


def _state_for(model) -> PruningState:
    state = getattr(model, _STATE_ATTR, None)
    config = _ACTIVE["config"]
    if state is None or state.config is not config:
        config.check_depth(model.config.text_config.num_hidden_layers)
        state = PruningState(config)
        setattr(model, _STATE_ATTR, state)
    return state


# --------------------------------------------------------------------------------------------------
# The wrappers
# --------------------------------------------------------------------------------------------------
def _wrap_features(original, modality: str, adapter: QwenAdapter):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_features(self, *args, **kwargs):
        if _IN_FEATURES.get():  # Qwen3-VL's get_video_features calls get_image_features: note the outer one only
            return original(self, *args, **kwargs)
        bound = signature.bind_partial(self, *args, **kwargs)
        grid = bound.arguments.get(f"{modality}_grid_thw")
        if grid is not None:
            merge = self.config.vision_config.spatial_merge_size
            _state_for(self).pending_grids[modality] = adapter.span_grids(modality, grid, merge)
        token = _IN_FEATURES.set(True)
        try:
            return original(self, *args, **kwargs)
        finally:
            _IN_FEATURES.reset(token)

    return get_features


def _wrap_model_forward(original, adapter: QwenAdapter):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        bound = signature.bind_partial(self, *args, **kwargs)
        call = _Call(self, _state_for(self), adapter, bound.arguments.get("input_ids"))
        token = _ACTIVE_CALL.set(call)
        try:
            return original(self, *args, **kwargs)
        finally:
            _ACTIVE_CALL.reset(token)

    return forward


def _wrap_text_forward(original, adapter: QwenAdapter):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        call = _ACTIVE_CALL.get()
        if call is None or call.model.language_model is not self:
            return original(self, *args, **kwargs)  # called on its own: spans unknown, nothing to prune
        bound = signature.bind_partial(self, *args, **kwargs)
        extra = bound.arguments.pop("kwargs", {})
        bound.arguments.pop("self")
        kwargs = {**bound.arguments, **extra}
        return _run_language_model(original, self, call, kwargs)

    return forward


def _is_empty(cache) -> bool:
    return cache is None or cache.get_seq_length() == 0


def _run_language_model(original, text_model, call: _Call, kwargs: dict):
    state, adapter, config = call.state, call.adapter, call.state.config
    embeds, cache = kwargs["inputs_embeds"], kwargs.get("past_key_values")
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        raise NotImplementedError("visual-token pruning needs a 2-D attention mask and a DynamicCache "
                                  "(static caches and pre-built 4-D masks are not supported)")

    prefill = (_is_empty(cache) and call.input_ids is not None and call.input_ids.shape[1] == embeds.shape[1])
    if prefill:
        state.reset()
        grids, state.pending_grids = state.pending_grids, {}
        layout = hooks.find_layout(call.input_ids, mask, adapter.visual_ids(call.model.config), grids)
        if not any(layout.spans):
            state.finish_record(layout.spans)
            return original(text_model, **kwargs)  # text-only prompt: untouched
        if config.pre_llm is not None:
            selection = hooks.select_tokens(config.pre_llm, config, layout, embeds)
            kwargs["inputs_embeds"] = selection.gather_tokens(embeds)
            kwargs["attention_mask"] = selection.layout.attention_mask
            adapter.shorten_lm_inputs(selection, kwargs, call.model)
            state.pre_map = hooks.StageMap(0, selection.index, selection.prefill_length)
            layout = selection.layout
        if adapter.deepstack and kwargs.get("visual_pos_masks") is not None:
            call.deepstack = kwargs  # intra-LLM stages shorten the deepstack state the loop reads
        try:
            if config.intra_llm:
                with hooks.intra_llm_hooks(adapter, text_model, state, layout, kwargs["attention_mask"], cache), \
                        _deepstack_redirect(text_model, call):
                    return original(text_model, **kwargs)
            return original(text_model, **kwargs)
        finally:
            state.finish_record(layout.spans)

    if state.pre_map is None and not state.intra_maps:
        return original(text_model, **kwargs)
    # A decode step after a pruned prefill.
    if embeds.shape[1] != 1 and not _is_empty(cache):
        raise NotImplementedError("after a pruned prefill only one-token decode steps are supported "
                                  "(no chunked prefill, no reuse of a pruned cache across generate calls)")
    state.decoded += embeds.shape[1]
    if state.pre_map is not None:
        kwargs["attention_mask"] = state.decode_mask(mask, [state.pre_map])
    if not state.intra_maps:
        return original(text_model, **kwargs)
    with hooks.intra_llm_hooks(adapter, text_model, state, None, mask, cache):
        return original(text_model, **kwargs)


class _deepstack_redirect:
    """Qwen3-VL's loop injects deepstack features with the call's full-length visual mask; after an intra-LLM
    stage the hidden states are shorter, so feed it the shortened mask and features instead."""

    def __init__(self, text_model, call: _Call):
        self.text_model, self.call = text_model, call

    def __enter__(self):
        if self.call.deepstack is None:
            return self
        original = type(self.text_model)._deepstack_process
        call = self.call

        def process(hidden_states, visual_pos_masks, visual_embeds):
            layer = process.calls
            process.calls += 1
            return original(self.text_model, hidden_states, call.deepstack["visual_pos_masks"],
                            call.deepstack["deepstack_visual_embeds"][layer])

        process.calls = 0
        self.text_model._deepstack_process = process
        return self

    def __exit__(self, *exc):
        self.text_model.__dict__.pop("_deepstack_process", None)
        return False


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def apply_patches(config: PruneConfig | None = None) -> PruneConfig:
    """Install the hooks for every Qwen-VL family; the configuration is read from the environment unless
    given. Idempotent: a second call only replaces the configuration. Returns the active configuration."""
    check_transformers_version()
    config = PruneConfig.from_env() if config is None else config
    _ACTIVE["config"] = config
    if _ACTIVE["originals"]:
        return config
    import importlib

    for family, (module_name, model_name, text_name, adapter) in _FAMILIES.items():
        module = importlib.import_module(module_name)
        model_cls, text_cls = getattr(module, model_name), getattr(module, text_name)
        targets = [
            (model_cls, "forward", _wrap_model_forward(model_cls.forward, adapter)),
            (model_cls, "get_image_features", _wrap_features(model_cls.get_image_features, "image", adapter)),
            (model_cls, "get_video_features", _wrap_features(model_cls.get_video_features, "video", adapter)),
            (text_cls, "forward", _wrap_text_forward(text_cls.forward, adapter)),
        ]
        for cls, name, wrapper in targets:
            _ACTIVE["originals"][(cls, name)] = cls.__dict__[name]
            setattr(cls, name, wrapper)
    return config


def remove_patches() -> None:
    """Restore every wrapped method. Idempotent."""
    for (cls, name), original in _ACTIVE["originals"].items():
        setattr(cls, name, original)
    _ACTIVE["originals"].clear()
    _ACTIVE["config"] = None
