"""Visual-token pruning hooks for InternVL (``InternVLForConditionalGeneration``: the OpenGVLab/InternVL3-*-hf
checkpoints, transformers 5.23).

Same public contract as ``custom_qwenvl``: ``apply_patches()`` / ``remove_patches()`` / ``pruning_state()`` /
``last_record()``, the same configuration and methods. The language model (Qwen2, or Qwen3 / Llama in other
InternVL checkpoints) is a standard 1-D RoPE decoder built with ``AutoModel.from_config``: positions, masks, decode
steps and attention signals are ``hooks.DecoderAdapter``'s (kept tokens keep their original positions, with gaps
that only the rotary embedding sees). This file only says what is InternVL-specific:

* spans: the processor writes an image as ``<img>`` + tiles * image_seq_length ``<IMG_CONTEXT>`` + ``</img>`` (its
  dynamic tiles, then a thumbnail when there is more than one), and the model encodes the tiles of every image of the
  batch in one ``get_image_features`` call that does not say which tiles belong together. So ``span_grids`` gives one
  ``(1, h, w)`` grid per tile (h x w LLM tokens after the pixel shuffle) and the layout joins the tiles of one
  ``<img>`` run into one span of grid ``(tiles, h, w)`` (``join_runs``): a span is one image, all its tiles, and
  methods see the tiles along t. The model has no video token: the processor writes a video as one
  ``Frame<i>: <img>...</img>`` block per frame, each frame one tile, so every frame is an image span of grid
  ``(1, h, w)``;
* vision-encoder signals (PruMerge, PruMerge+, VisionZip, VisPruner, VTC-CLS): see ``InternVLAdapter.capture_vision``.
"""

from __future__ import annotations

import torch

import hooks
from hooks import DecoderAdapter
from methods import VisionSignals
from patching import FamilyPatch, Target, last_record, pruning_state
from utils import PruneConfig

__all__ = ["apply_patches", "remove_patches", "pruning_state", "last_record"]


def tile_tokens(model, pixel_values: torch.Tensor) -> tuple[int, int]:
    """(h, w) LLM tokens of one tile: its patches, pixel-shuffled by the downsample ratio (as get_image_features)."""
    patch_h, patch_w = model.config.vision_config.patch_size
    ratio = model.config.downsample_ratio
    return int(pixel_values.shape[-2] // patch_h * ratio), int(pixel_values.shape[-1] // patch_w * ratio)


class InternVLAdapter(DecoderAdapter):
    join_runs = True  # one span per <img> ... </img> run: the image with all its tiles

    def visual_ids(self, config):
        return {config.image_token_id: "image"}  # video frames are image runs too

    def span_grids(self, model, modality, features_args):
        pixel_values = features_args.get("pixel_values")
        if modality != "image" or pixel_values is None:
            return None
        return [(1, *tile_tokens(model, pixel_values))] * pixel_values.shape[0]

    def capture_vision(self, model, modality, features_args, needs, run):
        """Score the encoder's own q/k at the chosen InternViT layers while ``run()`` encodes the tiles.

        Every layer attends globally within a tile over its [CLS] token and its patches, so any layer can be scored. A
        pre-hook on each chosen layer's attention gets the normed hidden states (tiles, 1 + P, D); queries and keys are
        q_norm(q_proj) and k_norm(k_proj) (identity norms unless the model uses q/k norms), split into heads, at the
        module's scale. [CLS] is a token the encoder attends with, so each tile's attention segment is its [CLS] and
        its patches: the softmax runs over every key, [CLS] included, averaged over every query of the tile, [CLS]
        included (the encoder's own attention, as ``hooks.attention_received`` scores a segment); the [CLS] column is
        then dropped, as get_image_features drops its features. A tile's patch scores thus sum to 1 less the attention
        [CLS] receives. InternVL's [CLS] feeds nothing downstream, so its own row is not read as a [CLS] signal
        (``cls=False``). Patch scores are summed (keys, [CLS] left out, averaged) over the k x k patch groups the pixel
        shuffle turns into one LLM token (k = 1 / downsample_ratio), in raster order per tile. One VisionSignals per
        tile, in ``span_grids`` order; the hooks join the tiles of one image in span order.
        """
        tower = model.vision_tower
        depth = len(tower.encoder.layer)
        layers = hooks.vision_layers(needs, list(range(depth)), depth)
        key_layer = layers[-1] if needs.keys else None
        received, keys = {}, {}

        def capture(layer):
            def hook(attn, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                tiles, length = hidden.shape[:2]
                shape = (tiles, length, attn.num_heads, attn.head_dim)
                query = attn.q_norm(attn.q_proj(hidden)).view(shape).float()
                key = attn.k_norm(attn.k_proj(hidden)).view(shape).float()
                if layer == key_layer:
                    keys[layer] = key[:, 1:]
                segments = [torch.arange(t * length, (t + 1) * length) for t in range(tiles)]
                query, key = (x.flatten(0, 1).transpose(0, 1) for x in (query, key))  # (heads, tiles * (1 + P), d)
                scores = hooks.attention_received(query, key, attn.scale, segments)
                received[layer] = scores.view(tiles, length)[:, 1:]
            return hook

        attention_layers = {tower.encoder.layer[layer].attention: capture(layer) for layer in layers}
        output = hooks.run_with_pre_hooks(attention_layers, run)

        pixel_values = features_args["pixel_values"]
        rows, cols = tile_tokens(model, pixel_values)
        k = round(1 / model.config.downsample_ratio)

        def to_tokens(per_patch, reduce):  # (tiles, P, ...) -> (tiles, rows * cols, ...)
            grouped = per_patch.reshape(per_patch.shape[0], rows, k, cols, k, *per_patch.shape[2:])
            return reduce(grouped, dim=(2, 4)).flatten(1, 2)

        attention = {layer: to_tokens(scores, torch.sum) for layer, scores in received.items()}
        tile_keys = to_tokens(keys[key_layer], torch.mean) if key_layer is not None else None
        return output, [VisionSignals({layer: scores[t] for layer, scores in attention.items()},
                                      None if tile_keys is None else tile_keys[t])
                        for t in range(pixel_values.shape[0])]


_PATCH = FamilyPatch([
    Target("transformers.models.internvl.modeling_internvl", "InternVLModel", None, InternVLAdapter(),
           language_models=("transformers.models.qwen2.modeling_qwen2:Qwen2Model",
                            "transformers.models.qwen3.modeling_qwen3:Qwen3Model",
                            "transformers.models.llama.modeling_llama:LlamaModel")),
])


def apply_patches(config: PruneConfig | None = None) -> PruneConfig:
    """Install the InternVL hooks; the configuration is read from the environment unless given. Idempotent: a
    second call only replaces the configuration. Returns the active configuration."""
    return _PATCH.apply(config)


def remove_patches() -> None:
    """Restore every wrapped method. Idempotent."""
    _PATCH.remove()
