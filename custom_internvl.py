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
* vision-encoder signals (PruMerge, PruMerge+, VisionZip, VisPruner, VTC-CLS): see ``InternVLAdapter.capture_vision``;
* the ViT stage (methods named ``*_vit``, ``encoder_stage``) inside InternViT, every tile an item: see
  ``InternVLAdapter.vit_encoder``. Blocks 1..F may take a stage, F the block whose output the features are read from
  (``vision_feature_layer`` -1: the last block). The kept patches' outputs are put back at full length, zeros at the
  dropped patches, so the model's own [CLS] drop, pixel shuffle and projector run unchanged; an LLM token (one k x k
  patch group of the pixel shuffle) reaches the language model when any of its patches was kept.
"""

from __future__ import annotations

import torch

import encoder_stage
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


def _qk_projection(proj: str, norm: str):
    """Queries or keys of an InternViT attention module as its forward computes them: ``norm(proj(h))`` over the full
    width (q_norm / k_norm: identity unless ``use_qk_norm``), then split into heads: (items, T, D) -> (items, T, heads,
    head_dim)."""

    def project(attn, hidden: torch.Tensor) -> torch.Tensor:
        states = getattr(attn, norm)(getattr(attn, proj)(hidden))
        return states.reshape(*hidden.shape[:2], attn.num_heads, attn.head_dim)

    return project


def _block_attention(block):
    return block.attention  # InternVLVisionAttention: takes attention_mask, which InternVLVisionLayer never passes


class InternVLAdapter(DecoderAdapter):
    """InternVL3 (``InternVLModel``): one span per ``<img>`` run (every tile of one image), InternViT signals per tile,
    and the ViT stage inside InternViT per tile (:meth:`vit_encoder`)."""

    join_runs = True  # one span per <img> ... </img> run: the image with all its tiles

    def visual_ids(self, config):
        return {config.image_token_id: "image"}  # video frames are image runs too

    def span_grids(self, model, modality, features_args):
        pixel_values = features_args.get("pixel_values")
        if modality != "image" or pixel_values is None:
            return None
        return [(1, *tile_tokens(model, pixel_values))] * pixel_values.shape[0]

    def check_vit(self, model) -> None:
        tower = model.vision_tower
        layers = getattr(getattr(tower, "encoder", None), "layer", None)
        if layers is None or not all(hasattr(layer, "attention") for layer in layers):
            raise NotImplementedError(f"the ViT stage needs an InternViT encoder (encoder.layer[i].attention); "
                                      f"{type(tower).__name__} has none")

    def vit_encoder(self, model, modality, features_args):
        """InternViT for the ViT stage: items = the tiles of the call (every tile of every image of the batch, as
        ``get_image_features`` encodes them), each [CLS] + its patches; the [CLS] is always kept (``has_cls``), the
        methods see the patches, grid = the tile's patch grid (H / patch, W / patch) in raster order.

        * Blocks: ``vision_tower.encoder.layer``. An ``InternVLVisionLayer`` calls its attention without a mask; the
          stage hands ``InternVLVisionAttention`` its additive mask (padding keys, log(size) under proportional
          attention) through a pre-hook. Queries and keys for the methods that read them: ``q_norm(q_proj(h))``,
          ``k_norm(k_proj(h))`` split into ``num_heads`` heads of ``head_dim``, at the module's ``scale``.
        * Feature block: the features are ``last_hidden_state`` for ``vision_feature_layer`` -1 (the last block's
          output, then the final layernorm), else ``hidden_states[layer]``, the output of block layer - 1
          (``hidden_states[0]``: the embeddings; a negative layer counts from depth + 1). Stages may run before blocks
          1..that block. Only an int layer (the model indexes ``hidden_states`` with it) and the "default" strategy
          (the [CLS] dropped; with "full" the model cannot reshape the tile's tokens into a square) are taken.
        * Put back: the encoder's outputs return at full length with zeros at the dropped patches (and [CLS]'s
          output at its place), so the model's own [CLS] drop, pixel shuffle and projector run on the usual shapes:
          a dropped patch enters its LLM token's channel concatenation as zeros.
        * Layout (``lay_out``): per-patch values (tiles, 1 + P) lose the [CLS] and go through the model's own
          ``pixel_shuffle`` (one channel per patch), which groups each k x k block of patches (k = 1 /
          downsample_ratio) into the channels of one LLM token; a token is kept when any of its patches was kept
          (the maximum over its group), so every kept patch's output reaches the language model. One (rows * cols,)
          tensor per tile, raster order of its LLM tokens, in ``span_grids`` order (the hooks join an image's tiles).
        """
        if modality != "image":
            raise NotImplementedError(f"the ViT stage on {type(model).__name__} takes images (video frames are image "
                                      f"tiles of their own); not {modality}s")
        strategy = features_args.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
        if strategy != "default":
            raise NotImplementedError(f"the ViT stage on {type(model).__name__} takes the 'default' feature strategy "
                                      f"(the [CLS] dropped, each tile's patches pixel-shuffled); not {strategy!r}")
        chosen = features_args.get("vision_feature_layer")
        chosen = model.config.vision_feature_layer if chosen is None else chosen
        if not isinstance(chosen, int):
            raise NotImplementedError(f"the ViT stage on {type(model).__name__} takes one vision_feature_layer (an "
                                      f"int, as the model reads it); not {chosen!r}")
        tower = model.vision_tower
        blocks = tower.encoder.layer
        # hidden_states[i] is the output of block i - 1; -1 reads last_hidden_state, the last block's output normed.
        feature_block = (chosen if chosen >= 0 else len(blocks) + 1 + chosen) - 1
        pixel_values = features_args["pixel_values"]
        patch_h, patch_w = model.config.vision_config.patch_size
        grid = (pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w)
        ratio = model.config.downsample_ratio

        def lay_out(values):  # (tiles, 1 + P) -> one (rows * cols,) tensor per tile, as the features are laid out
            patches = values[:, 1:].reshape(values.shape[0], *grid, 1)
            groups = model.pixel_shuffle(patches, scale_factor=ratio)  # (tiles, rows, cols, k * k): one token's patches
            return list(groups.amax(dim=-1).flatten(1))

        encoder = encoder_stage.Encoder(tower, blocks, has_cls=True, grid=grid, feature_block=feature_block,
                                        modality=modality, attention=_block_attention,
                                        keys=_qk_projection("k_proj", "k_norm"),
                                        queries=_qk_projection("q_proj", "q_norm"))
        return encoder, lay_out

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
