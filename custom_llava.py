"""Visual-token pruning hooks for the LLaVA families (transformers 5.23): ``LlavaForConditionalGeneration``
(LLaVA-1.5, llava-interleave), ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / 1.6) and
``LlavaOnevisionForConditionalGeneration``.

Same public contract as ``custom_qwenvl``: ``apply_patches()`` / ``remove_patches()`` / ``pruning_state()`` /
``last_record()``, the same configuration and methods. The language model is a standard decoder (Llama / Vicuna,
Mistral, Qwen2), so positions, masks and attention signals are ``hooks.DecoderAdapter``'s: kept tokens keep their
original 1-D positions. This file only says what is LLaVA-specific:

* spans: LLaVA-1.5: one image = one span of (image_size / patch_size)^2 tokens, grid (1, h, w) (the "default"
  feature strategy drops the [CLS]; with "full" on a CLIP tower the [CLS] is the span's first token and the span has
  no grid; a SigLIP tower has no [CLS], so "full" gives the grid);
* LLaVA-NeXT / OneVision: one image = one span with its any-resolution tiles, laid out as ``pack_image_features``
  lays out the features: the base view's h x w tokens, then the tiles stitched into one grid, unpadded to the image's
  aspect ratio (OneVision: bilinearly downscaled when larger than ``anyres_max_N`` tiles allow), each of its rows
  closed by one ``image_newline`` token; an image without tiles (OneVision's multi-image prompts) is its base view
  closed by one newline. Newline tokens are ``hooks.SpanShape.fixed``: never pruned, never counted, positions kept.
  The span has the grid (1, h, w) when it is the base view alone, else none. OneVision: one video = one span of
  frames x ceil(h / 2) x ceil(w / 2) pooled tokens (grid (frames, ph, pw)) and one newline token after the video;
* vision-encoder signals: CLIP has a true [CLS] token, so the methods that read encoder attention (PruMerge,
  PruMerge+, VisionZip, VisPruner, VTC-CLS, FasterVLM) get the [CLS] query's attention row at the layers their
  official code reads (``VisionNeeds.cls_layers`` / ``cls_heads``), computed from the layer's own q/k projections
  (``clip_cls_signals``), one row per tile. SigLIP (OneVision, llava-interleave) has none: those methods get the
  substitute, the attention each patch receives inside its tile or frame (``received_signals``). Per-tile or
  per-frame values (scores, keys) are then laid out exactly as the model lays out the features, by the model's own
  code (``pack_image_features`` without newlines, ``apply_pooling``): one value per prunable token.
"""

from __future__ import annotations

import dataclasses
import math

import torch

import encoder_stage
import hooks
from hooks import DecoderAdapter, SpanShape
from methods import VisionSignals
from patching import FamilyPatch, Target, last_record, pruning_state
from utils import PruneConfig

__all__ = ["apply_patches", "remove_patches", "pruning_state", "last_record"]

# The language models LLaVA checkpoints are built with (AutoModel.from_config of the text config); others are
# wrapped when a model is first seen.
LANGUAGE_MODELS = (
    "transformers.models.llama.modeling_llama:LlamaModel",
    "transformers.models.mistral.modeling_mistral:MistralModel",
    "transformers.models.qwen2.modeling_qwen2:Qwen2Model",
)


def _strategy(model, features_args) -> str:
    return features_args.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy


def _tile_side(model) -> int:
    """Patches along each side of one encoded image (a tile, a base view, a video frame)."""
    vision = model.config.vision_config
    return vision.image_size // vision.patch_size


def _tile_tokens(model, features_args) -> int:
    """Features one tile gives: its patches, plus the [CLS] kept by "full", minus the first token dropped by
    "default" (the [CLS] on CLIP; on a [CLS]-free tower that drops a patch, as the model does)."""
    return _tile_side(model) ** 2 + int(has_cls_token(model.vision_tower)) - int(
        _strategy(model, features_args) == "default")


def has_cls_token(tower) -> bool:
    """Whether the vision tower is CLIP-like, with a [CLS] token first in every image's sequence."""
    return hasattr(getattr(_encoder_body(tower), "embeddings", None), "class_embedding")


def _encoder_body(tower):
    return getattr(tower, "vision_model", tower)  # older releases nest CLIPVisionModel's modules one level deeper


def clip_cls_signals(tower, needs, run):
    """Run ``run()`` (a feature call that encodes images with the CLIP ``tower``) while reading the [CLS] row.

    A pre-hook on each chosen layer's attention gets the normed hidden states (items, 1 + P, C); the [CLS] query's
    attention to the patches is computed from the module's own q/k projections (``hooks.cls_attention_row``).
    Returns the call's output, {layer: (items, P)} rows, and (items, P, H, d) patch keys of the last chosen layer
    (None unless ``needs.keys``).
    """
    layers_of = _encoder_body(tower).encoder.layers
    depth = tower.config.num_hidden_layers
    layers = hooks.cls_vision_layers(needs, depth)
    rows, keys = {}, {}

    def capture(layer):
        def hook(attn, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            shape = (*hidden.shape[:-1], attn.num_heads, attn.head_dim)
            query = attn.q_proj(hidden).view(shape).transpose(1, 2)  # (items, H, 1 + P, d)
            key = attn.k_proj(hidden).view(shape).transpose(1, 2)
            rows[layer] = torch.stack([hooks.cls_attention_row(q, k, attn.scale, needs.cls_heads)
                                       for q, k in zip(query, key)])
            if needs.keys and layer == layers[-1]:
                keys["keys"] = key[:, :, 1:].transpose(1, 2).float()
        return hook

    output = hooks.run_with_pre_hooks({layers_of[layer].self_attn: capture(layer) for layer in layers}, run)
    return output, rows, keys.get("keys")


def received_signals(tower, needs, run):
    """Run ``run()`` (a feature call that encodes images with the [CLS]-free ``tower``, e.g. SigLIP) while scoring the
    substitute for a [CLS] row: the attention each patch receives inside its own image (tile or frame).

    A pre-hook on each chosen layer's attention (``hooks.vision_layers``: every layer attends globally) gets the
    normed hidden states (items, P, C); queries and keys come from the module's own q/k projections, heads of
    ``head_dim``, at its scale; every item is one attention segment (``hooks.attention_received``). Returns the
    call's output, {layer: (items, P)} fp32 scores, and (items, P, H, d) fp32 keys of the last chosen layer (None
    unless ``needs.keys``).
    """
    layers_of = _encoder_body(tower).encoder.layers
    depth = len(layers_of)
    layers = hooks.vision_layers(needs, list(range(depth)), depth)
    key_layer = layers[-1] if needs.keys else None
    received, keys = {}, {}

    def capture(layer):
        def hook(attn, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            items, patches = hidden.shape[:2]
            shape = (items, patches, attn.num_heads, attn.head_dim)
            query = attn.q_proj(hidden).view(shape).float()
            key = attn.k_proj(hidden).view(shape).float()
            if layer == key_layer:
                keys["keys"] = key
            segments = [torch.arange(i * patches, (i + 1) * patches) for i in range(items)]
            query, key = (x.flatten(0, 1).transpose(0, 1) for x in (query, key))  # (heads, items * P, d)
            received[layer] = hooks.attention_received(query, key, attn.scale, segments).view(items, patches)
        return hook

    output = hooks.run_with_pre_hooks({layers_of[layer].self_attn: capture(layer) for layer in layers}, run)
    return output, received, keys.get("keys")


def tile_signals(model, features_args, needs, run):
    """Per encoded image (tile, base view or frame): a CLIP tower's [CLS] rows (strategy "default", the [CLS] dropped
    from the features), else a [CLS]-free tower's substitute (strategy "full", every patch a feature). Returns the
    call's output, {layer: (items, P)}, (items, P, H, d) keys or None, and the ``VisionSignals`` flags: ``cls`` (the
    tower has a [CLS]) and ``substitute`` (its rows are the substitute anyway, ``CLS_SIGNAL=substitute``)."""
    tower, strategy = model.vision_tower, _strategy(model, features_args)
    cls = has_cls_token(tower)
    if strategy != ("default" if cls else "full"):
        raise NotImplementedError(f"vision-encoder signals on {type(tower).__name__} with the {strategy!r} feature "
                                  "strategy are not supported; supported: a tower with a [CLS] token (CLIP) with "
                                  "'default', one without (SigLIP) with 'full' (one feature per patch)")
    if cls and needs.cls_substitute:
        # CLS_SIGNAL=substitute: the attention received at the same layers, the [CLS] column dropped, as on an encoder
        # without a [CLS] (HiPrune's official CLIP signal is that already).
        needs = dataclasses.replace(needs, cls_heads="received")
    output, rows, keys = (clip_cls_signals if cls else received_signals)(tower, needs, run)
    return output, rows, keys, {"cls": cls, "substitute": cls and needs.cls_substitute}


class LlavaAdapter(DecoderAdapter):
    """LLaVA-1.5 and llava-interleave (``LlavaModel``, a CLIP or SigLIP tower): one span per image."""

    def visual_ids(self, config):
        return {config.image_token_id: "image"}

    def span_grids(self, model, modality, features_args):
        pixel_values = features_args.get("pixel_values")
        if pixel_values is None:
            return None
        vision = model.config.vision_config
        if features_args.get("image_sizes") is not None:  # variable-size images (Pixtral towers): one patch grid each
            return [(1, int(h) // vision.patch_size, int(w) // vision.patch_size)
                    for h, w in features_args["image_sizes"]]
        side = vision.image_size // vision.patch_size
        tokens = _tile_tokens(model, features_args)
        if tokens == side * side:  # CLIP with "default", SigLIP with "full": the patch grid
            return [(1, side, side)] * pixel_values.shape[0]
        return [SpanShape(tokens)] * pixel_values.shape[0]  # [CLS] first (CLIP, "full"): no grid

    def check_vit(self, model) -> None:
        tower = _encoder_body(model.vision_tower)
        if not hasattr(getattr(tower, "encoder", None), "layers"):
            raise NotImplementedError(f"the ViT stage needs a CLIP- or SigLIP-style encoder (encoder.layers); "
                                      f"{type(model.vision_tower).__name__} has none")

    def vit_encoder(self, model, modality, features_args):
        """The CLIP / SigLIP tower; items = encoded images (tiles, frames), every patch one feature token (the [CLS]
        dropped by "default", kept by "full"). Per-patch values are laid out by :meth:`per_span`."""
        tower = model.vision_tower
        if modality != "image" or self._variable_size(features_args):
            raise NotImplementedError(f"the ViT stage on {type(model).__name__} takes images of the tower's own size; "
                                      f"not {modality}s or variable-size images (image_sizes)")
        blocks = _encoder_body(tower).encoder.layers
        chosen = features_args.get("vision_feature_layer")
        chosen = model.config.vision_feature_layer if chosen is None else chosen
        # hidden_states[i] is the output of block i - 1 (hidden_states[0]: the embeddings); the features read the
        # earliest of the chosen layers, so a stage must run at or before the block producing it.
        last_block = min(layer if layer >= 0 else len(blocks) + 1 + layer
                         for layer in ([chosen] if isinstance(chosen, int) else chosen)) - 1
        side = _tile_side(model)
        cls, strategy = has_cls_token(tower), _strategy(model, features_args)
        drop_first = int(strategy == "default")  # as the model: the [CLS] on CLIP, a patch on a [CLS]-free tower
        if drop_first and not cls:
            raise NotImplementedError("the ViT stage on a tower without a [CLS] token needs the 'full' feature strategy")

        def lay_out(values):  # (items, 1 + P or P) -> one (N,) tensor per grid, as the features are laid out
            return [v[:, 0] for v in self.per_span(model, modality, features_args, values[:, drop_first:, None])]

        return encoder_stage.Encoder(tower, blocks, cls, (side, side), last_block, modality), lay_out

    def per_span(self, model, modality, features_args, values):
        """Per-item values (items, P, C) laid out as the model lays out the features: one (N, C) per span."""
        return list(values)

    def _variable_size(self, features_args) -> bool:
        """Whether the images are encoded at their own sizes (``image_sizes`` on LlavaModel: Pixtral towers), which
        the per-patch signals and the ViT stage do not take; LLaVA-NeXT's ``image_sizes`` only lay out its tiles."""
        return features_args.get("image_sizes") is not None

    def capture_vision(self, model, modality, features_args, needs, run):
        tower = model.vision_tower
        if self._variable_size(features_args):
            raise NotImplementedError(f"vision-encoder signals on {type(tower).__name__} with image_sizes "
                                      "(variable-size images) are not supported; supported: a CLIP tower with the "
                                      "'default' strategy (LLaVA-1.5), a SigLIP tower with the 'full' strategy")
        output, rows, keys, flags = tile_signals(model, features_args, needs, run)
        items = features_args["pixel_values"].shape[0]
        return output, [VisionSignals({layer: r[i] for layer, r in rows.items()},
                                      None if keys is None else keys[i], **flags) for i in range(items)]


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (``LlavaNextModel``): one span per image with its any-resolution tiles and ``image_newline`` tokens.

    Shapes and signal layouts come from the model's own ``pack_image_features``: run on an index-valued stand-in for the
    features (one channel, the newline a -1), it says where every token of an image lands and which are newlines;
    run without a newline on per-tile scores or keys, it lays them out exactly as the features."""

    def _variable_size(self, features_args) -> bool:
        return False

    def _tiles(self, model, features_args) -> list[int]:
        """Tiles (base view first) each image is encoded as, as ``get_image_features`` counts them."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        image_size = model.config.vision_config.image_size
        return [image_size_to_num_patches(size, model.config.image_grid_pinpoints, image_size)
                for size in features_args["image_sizes"]]

    def _pack(self, model, features_args, per_image: list[torch.Tensor], newline):
        """``pack_image_features`` of (tiles, tokens, C) tensors, one per image: (N, C) each."""
        packed, _ = model.pack_image_features(per_image, features_args["image_sizes"],
                                              _strategy(model, features_args), image_newline=newline)
        return packed

    def _image_shapes(self, model, features_args) -> list[SpanShape]:
        side, tokens = _tile_side(model), _tile_tokens(model, features_args)
        tiles = self._tiles(model, features_args)
        stand_ins = [torch.arange(n * tokens, dtype=torch.float32).view(n, tokens, 1) for n in tiles]
        shapes = []
        for n, packed in zip(tiles, self._pack(model, features_args, stand_ins, torch.full((1,), -1.0))):
            fixed = tuple(torch.nonzero(packed[:, 0] < 0).flatten().tolist())
            grid = (1, side, side) if n == 1 and tokens == side * side else None  # the base view alone
            shapes.append(SpanShape(packed.shape[0], grid, fixed))
        return shapes

    def span_grids(self, model, modality, features_args):
        if modality != "image" or features_args.get("pixel_values") is None or \
                features_args.get("image_sizes") is None:
            return None
        return self._image_shapes(model, features_args)

    def capture_vision(self, model, modality, features_args, needs, run):
        output, rows, keys, flags = tile_signals(model, features_args, needs, run)
        layout = lambda values: self.per_span(model, modality, features_args, values)
        # (items, P) -> one (N,) tensor per span, and (items, P, H, d) -> (N, H, d): the model's layout of features.
        per_layer = {layer: [v[:, 0] for v in layout(r.unsqueeze(-1))] for layer, r in rows.items()}
        span_keys = None
        if keys is not None:
            heads, dim = keys.shape[2:]
            span_keys = [v.view(-1, heads, dim) for v in layout(keys.flatten(2))]
        spans = len(next(iter(per_layer.values())))
        return output, [VisionSignals({layer: parts[i] for layer, parts in per_layer.items()},
                                      None if span_keys is None else span_keys[i], **flags) for i in range(spans)]

    def per_span(self, model, modality, features_args, values):
        if modality == "image":
            # Per-tile values through pack_image_features without a newline: the base view, then the stitched tiles
            # unpadded; where OneVision downscales the stitched grid, the values are bilinearly interpolated with it,
            # so a token's score (key) is the same bilinear mix of its patches' scores (keys) as its feature is of
            # theirs (not a sum over a partition of patches: downscaled grids have none).
            sizes = self._tiles(model, features_args)
            return self._pack(model, features_args, list(values.split(sizes)), None)
        return self._pool_video(model, features_args, values)

    def _pool_video(self, model, features_args, values):
        raise NotImplementedError(f"{type(model).__name__} takes no videos")


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (``LlavaOnevisionModel``): images as LLaVA-NeXT's (tiles only for single-image prompts, grids
    downscaled per ``vision_aspect_ratio``), plus videos: one span per video, frames pooled, one newline after it."""

    def visual_ids(self, config):
        return {config.image_token_id: "image", config.video_token_id: "video"}

    def _tiles(self, model, features_args) -> list[int]:
        tiles = super()._tiles(model, features_args)
        per_sample = features_args.get("batch_num_images")
        if per_sample is None:  # as get_image_features: every image tiled
            return tiles
        single = [int(n) == 1 for n in per_sample for _ in range(int(n))]  # multi-image prompts: base view only
        return [n if tiled else 1 for n, tiled in zip(tiles, single)]

    def _pack(self, model, features_args, per_image, newline):
        aspect = features_args.get("vision_aspect_ratio") or model.config.vision_aspect_ratio
        packed, _ = model.pack_image_features(per_image, features_args["image_sizes"], image_newline=newline,
                                              vision_aspect_ratio=aspect)
        return packed

    def span_grids(self, model, modality, features_args):
        if modality == "image":
            return super().span_grids(model, modality, features_args)
        pixel_values = features_args.get("pixel_values_videos")
        if pixel_values is None:
            return None
        videos, frames = pixel_values.shape[:2]
        side = _tile_side(model)
        pooled = math.ceil(side / 2)  # apply_pooling's bilinear resize to ceil(h / 2) x ceil(w / 2)
        tokens = frames * pooled * pooled
        return [SpanShape(tokens + 1, (frames, pooled, pooled), (tokens,))] * videos

    def _pool_video(self, model, features_args, values):
        # Per-frame values pooled by the model's own apply_pooling, the bilinear resize its features get: a pooled
        # token's score (key) is the same bilinear mix of its patches' scores (keys) as its feature is of theirs.
        videos = features_args["pixel_values_videos"].shape[0]
        pooled = model.apply_pooling(values)  # (videos * frames, ph * pw, C)
        return list(pooled.reshape(videos, -1, pooled.shape[-1]))


_PATCH = FamilyPatch([
    Target("transformers.models.llava.modeling_llava", "LlavaModel", None, LlavaAdapter(), LANGUAGE_MODELS),
    Target("transformers.models.llava_next.modeling_llava_next", "LlavaNextModel", None, LlavaNextAdapter(),
           LANGUAGE_MODELS),
    Target("transformers.models.llava_onevision.modeling_llava_onevision", "LlavaOnevisionModel", None,
           LlavaOnevisionAdapter(), LANGUAGE_MODELS),
])


def apply_patches(config: PruneConfig | None = None) -> PruneConfig:
    """Install the hooks for every LLaVA family; the configuration is read from the environment unless given.
    Idempotent: a second call only replaces the configuration. Returns the active configuration."""
    return _PATCH.apply(config)


def remove_patches() -> None:
    """Restore every wrapped method. Idempotent."""
    _PATCH.remove()
