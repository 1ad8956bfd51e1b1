"""Visual-token pruning hooks for Gemma 4 (``Gemma4ForConditionalGeneration``, transformers 5.23).

Same public contract as ``custom_qwenvl``: ``apply_patches()`` / ``remove_patches()`` / ``pruning_state()`` /
``last_record()``, the same configuration and methods. This file only says what is Gemma-specific:

* spans and grids: one span per image and per video frame (each frame is its own ``<boi> ... <eoi>`` block);
  the grid comes from the patch positions and the 3x3 pooling;
* positions: plain 1-D RoPE per layer type; kept tokens keep their original positions;
* per-layer inputs (PLE, E2B/E4B): the token part is shortened with the tokens before the language model,
  the projected part inside it;
* masks: ``Gemma4Model`` builds the language model's masks before calling it, so after pruning they are
  rebuilt for the kept layout, per layer type, sliding windows counted in kept tokens, bidirectional vision
  blocks (``use_bidirectional_attention == "vision"``, prefill only) from the kept tokens;
* KV sharing: the last ``num_kv_shared_layers`` layers reuse keys/values stored by the last non-shared layer
  of each type. Pruning before layer K <= every storing layer shrinks the KV cache of layers >= K; K inside
  the shared region drops query rows only (exact, and the cache keeps every token); K between a storing layer
  and the shared region is refused (its consumers would read keys of a different layout);
* ``logits_to_keep`` is applied after pre-LLM pruning (upstream skips it once the sequence is shorter);
* attention signals use Gemma's scale 1.0, q/k norms, and keys from the shared KV states in shared layers;
* vision-encoder signals (PruMerge, VisionZip, VisPruner, VTC-CLS): every encoder layer attends to the whole
  image or frame, so any layer can be scored; patches are reduced to soft tokens with the pooler's own
  position bins, padding patches (position -1) left out (``Gemma4Adapter.capture_vision``);
* the ViT stage (methods named ``*_vit``, ``encoder_stage``): inside the vision encoder, before its pooler, on
  images and video frames alike (one item = one image or frame, its padding patches left out). The later blocks
  take the kept patches' rotary tables and (x, y) positions; the pooler's output is recomputed as the
  size-weighted mean of the kept patches of each k x k bin (a bin with none gives zeros), and a soft token
  reaches the language model when any patch of its bin was kept (``Gemma4Adapter.vit_encoder``).
"""

from __future__ import annotations

import math
import warnings

import torch
from transformers.masking_utils import (
    _preprocess_mask_arguments,
    blockwise_overlay,
    create_causal_mask,
    create_masks_for_generate,
    create_sliding_window_causal_mask,
    maybe_pad_block_sequence_ids,
    sliding_window_overlay,
)

import encoder_stage
import hooks
from hooks import FamilyAdapter, batch_row, Layout, Selection, gather_positions
from methods import VisionSignals
from patching import ACTIVE_CALL, FamilyPatch, Target, last_record, pruning_state
from utils import PruneConfig, PruneConfigError

__all__ = ["apply_patches", "remove_patches", "pruning_state", "last_record"]

_MODULE = "transformers.models.gemma4.modeling_gemma4"


def _modeling():
    import importlib

    return importlib.import_module(_MODULE)


def _block_ids(is_visual: torch.Tensor) -> torch.Tensor:
    """Bidirectional-attention block of every token, as Gemma derives it from ``mm_token_type_ids``."""
    return _modeling().get_block_sequence_ids_for_mask(is_visual.long(), device=is_visual.device)


def shared_region_start(text_config) -> int:
    return text_config.num_hidden_layers - (text_config.num_kv_shared_layers or 0)


def _query_rows(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows (query positions, (B, L') with -1 slots) of a (B, 1, L, kv) mask; slots copy row 0."""
    rows = rows.clamp(min=0).to(mask.device)
    return torch.stack([batch_row(mask, b)[:, rows[b]] for b in range(rows.shape[0])])


def flash_bidirectional_warning(text_config) -> str | None:
    """The warning for a model whose vision blocks attend bidirectionally (the 31B and 26B-A4B shapes) under
    FlashAttention-2, which transformers cannot express: its flash path computes causal attention there, so the
    model differs from itself under sdpa or eager, pruned or not. Nothing the hooks do can mend it."""
    if getattr(text_config, "use_bidirectional_attention", None) == "vision" and \
            "flash" in (text_config._attn_implementation or ""):
        return ("this Gemma 4 model attends bidirectionally inside images (use_bidirectional_attention='vision'), "
                f"which transformers' {text_config._attn_implementation} path cannot express: it computes causal "
                "attention there, so the model's outputs differ from its sdpa/eager ones (pruned or not). Use "
                "--attn-implementation sdpa (attn_implementation='sdpa') for results comparable with the model's "
                "reference behaviour")
    return None


class Gemma4Adapter(FamilyAdapter):
    # -- spans ---------------------------------------------------------------------------------------
    def span_grids(self, model, modality, features_args):
        positions = features_args.get(f"{modality}_position_ids")  # (items, max_patches, 2) as (x, y), -1 = pad
        if positions is None:
            return None
        k = model.config.vision_config.pooling_kernel_size
        grids = []
        for item in positions:
            xy = item[(item != -1).all(dim=-1)]
            grids.append((1, math.ceil((int(xy[:, 1].max()) + 1) / k), math.ceil((int(xy[:, 0].max()) + 1) / k)))
        return grids

    def frames_per_video(self, model, features_args):
        counts = features_args.get("num_frames_per_video")  # one grid per frame: this many make up each video
        return None if counts is None else [int(n) for n in counts.tolist()]

    def check_model(self, config: PruneConfig, model) -> None:
        text_config = model.config.get_text_config()
        first_shared = shared_region_start(text_config)
        stores = [i for i, mode in enumerate(text_config.kv_sharing_modes) if mode == "store"]
        attn = text_config._attn_implementation or ""
        warning = flash_bidirectional_warning(text_config)
        if warning:
            warnings.warn(warning, stacklevel=2)
        for stage in config.intra_llm:
            if "flash" in attn and text_config.num_kv_shared_layers and stage.layer >= first_shared:
                # Queries-only stage: the kept query rows need per-row key masks, which flash attention cannot
                # take (it gets a 2-D padding mask or reads packed sequences from the gappy position ids).
                raise PruneConfigError(
                    f"intra-LLM layer {stage.layer} ({stage.method}, from INTRA_LLM_LAYER_SPECS or the method's "
                    f"default layers) lies in the KV-shared region (layers {first_shared}..), where only query rows "
                    f"are dropped; attn_implementation={attn!r} cannot mask those rows; allowed under {attn}: a "
                    f"layer <= {min(stores)} (or use attn_implementation='sdpa' or 'eager')")
            producers = [s for s in stores if s < stage.layer < first_shared]
            if producers:
                raise PruneConfigError(
                    f"intra-LLM layer {stage.layer} ({stage.method}, from INTRA_LLM_LAYER_SPECS or the method's "
                    f"default layers) lies after the KV-storing layer {producers[0]} whose keys the shared layers "
                    f"{first_shared}.. reuse, so they would read keys of another layout; allowed: a layer <= "
                    f"{min(stores)} (shrinks the KV cache) or >= {first_shared} (drops query rows only), e.g. in "
                    "INTRA_LLM_LAYER_SPECS")

    # -- the language-model entry ---------------------------------------------------------------------
    def mask_2d(self, kwargs, call):
        # Gemma4Model hands the language model ready-made masks; the padding mask is the one it was given.
        mask = call.args.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise NotImplementedError("visual-token pruning needs a 2-D attention mask and a DynamicCache "
                                      "(static caches and pre-built 4-D masks are not supported)")
        return mask

    def _bidirectional(self, text_config, call) -> bool:
        # As Gemma4Model: vision blocks attend bidirectionally only if asked for and token types were given.
        return text_config.use_bidirectional_attention == "vision" and call.args.get("mm_token_type_ids") is not None

    def shorten_lm_inputs(self, selection: Selection, kwargs, call):
        if kwargs.get("per_layer_inputs") is not None:  # token-identity part of the per-layer embeddings
            kwargs["per_layer_inputs"] = selection.gather(kwargs["per_layer_inputs"])
        kwargs["position_ids"] = selection.gather(kwargs["position_ids"])
        text_config = call.model.config.get_text_config()
        mask_kwargs = dict(config=text_config, inputs_embeds=kwargs["inputs_embeds"],
                           attention_mask=selection.layout.attention_mask, past_key_values=kwargs.get("past_key_values"),
                           position_ids=None)  # kept positions have gaps: never read them as packed sequences
        if self._bidirectional(text_config, call):
            mm = _modeling()
            kwargs["attention_mask"] = mm.create_masks_for_vision_model(
                block_sequence_ids=_block_ids(selection.layout.span_id >= 0), **mask_kwargs)
        else:
            kwargs["attention_mask"] = create_masks_for_generate(**mask_kwargs)

    def decode_lm_inputs(self, kwargs, mask_2d, call):
        # Decode steps are causal (generate passes no token types); rebuild for the kept layout.
        kwargs["attention_mask"] = create_masks_for_generate(
            config=call.model.config.get_text_config(), inputs_embeds=kwargs["inputs_embeds"], attention_mask=mask_2d,
            past_key_values=kwargs.get("past_key_values"), position_ids=None)

    def finish_lm_output(self, output, kwargs, pruned):
        # Upstream applies logits_to_keep only when the output is as long as the input ids; after pruning it
        # is not, so apply it here (generate asks for the last row only).
        keep = kwargs.get("logits_to_keep", 0)
        if isinstance(keep, int) and 0 < keep < output.last_hidden_state.shape[1]:
            output.last_hidden_state = output.last_hidden_state[:, -keep:]
        return output

    # -- inside the language model ---------------------------------------------------------------------
    def queries_only(self, text_model, layer):
        return text_model.config.num_kv_shared_layers and layer >= shared_region_start(text_model.config)

    def cache_owner(self, text_model, layer):
        config = text_model.config
        if config.kv_sharing_modes[layer] != "reuse":
            return layer
        return next(i for i, mode in enumerate(config.kv_sharing_modes)
                    if mode == "store" and config.layer_types[i] == config.layer_types[layer])

    def _first_layers(self, text_model, layer: int) -> dict[str, int]:
        """First layer >= ``layer`` of each type that holds its own cache (masks are sized on it)."""
        config, first = text_model.config, {}
        for i in range(layer, shared_region_start(config)):
            first.setdefault(config.layer_types[i], i)
        return first

    def layer_masks(self, text_model, hidden, mask_2d, cache, layer, layout=None, allow_skip=True):
        config = text_model.config
        kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=mask_2d, past_key_values=cache,
                      position_ids=None, allow_is_causal_skip=allow_skip)
        masks = {}
        for layer_type, index in self._first_layers(text_model, layer).items():
            if layer_type == "full_attention":
                masks[layer_type] = create_causal_mask(**kwargs, layer_idx=index)
            elif layout is not None and self._bidirectional(config, ACTIVE_CALL.get()):
                masks[layer_type] = self._bidirectional_sliding_mask(config, kwargs, layout, index)
            else:
                masks[layer_type] = create_sliding_window_causal_mask(**kwargs, layer_idx=index)
        return masks

    def _bidirectional_sliding_mask(self, config, kwargs, layout: Layout, index: int):
        """AND(sliding window, OR(causal, same vision block)) for the kept tokens, as Gemma4Model builds it."""
        block_ids = _block_ids(layout.span_id >= 0)
        size_kwargs = {k: v for k, v in kwargs.items() if k != "allow_is_causal_skip"}
        early_exit, *_, kv_length, _, kv_offset = _preprocess_mask_arguments(**size_kwargs, layer_idx=index)
        if not early_exit:
            block_ids = maybe_pad_block_sequence_ids(block_ids, kwargs["attention_mask"], kv_length, kv_offset)
        return create_causal_mask(**kwargs, or_mask_function=blockwise_overlay(block_ids),
                                  and_mask_function=sliding_window_overlay(config.sliding_window), layer_idx=index)

    def query_only_masks(self, text_model, hidden, layout, cache, layer, rows):
        # Keys keep the layout the storing layers saw: build its square prefill masks (no cache: the storing
        # layers have already written this prefill; materialised: with fewer queries than keys a missing mask
        # would make SDPA slice the keys) and keep the kept query rows.
        config = text_model.config
        stores = {config.layer_types[i]: i for i, mode in enumerate(config.kv_sharing_modes) if mode == "store"}
        masks = {}
        for layer_type, store in stores.items():
            full = self.layer_masks(text_model, hidden, layout.attention_mask, None, store, layout,
                                    allow_skip=False)[layer_type]
            masks[layer_type] = _query_rows(full, rows) if isinstance(full, torch.Tensor) else full
        return masks

    def shorten_layer_call(self, args, kwargs, index, mask_2d):
        per_layer_input = args[0] if args else kwargs.get("per_layer_input")
        if per_layer_input is not None:
            per_layer_input = gather_positions(per_layer_input, index)
        if args:
            args = (per_layer_input,) + tuple(args[1:])
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (gather_positions(cos, index), gather_positions(sin, index))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = gather_positions(kwargs["position_ids"], index)
        return args, kwargs

    # -- signals ---------------------------------------------------------------------------------------
    def queries(self, attn, inp, sample, rows):
        """Post-norm, post-RoPE queries (H, r, d) of ``rows`` of one sample."""
        hidden = inp.hidden[sample]
        cos, sin = (batch_row(p, sample) for p in inp.position_embeddings)  # (L, d)
        d = attn.head_dim
        rows = rows.to(hidden.device)
        q = attn.q_norm(attn.q_proj(hidden[rows]).view(rows.numel(), attn.q_proj.out_features // d, d))
        return _modeling().apply_rotary_pos_emb(q, cos[rows], sin[rows], unsqueeze_dim=1).transpose(0, 1)

    def query_key(self, attn, inp, sample, rows):
        rope = _modeling().apply_rotary_pos_emb
        hidden = inp.hidden[sample]
        cos, sin = (batch_row(p, sample) for p in inp.position_embeddings)  # (L, d)
        d = attn.head_dim
        q = self.queries(attn, inp, sample, rows)
        if attn.is_kv_shared_layer:  # post-norm, post-RoPE keys of the storing layer
            k = batch_row(inp.extra["shared_kv_states"][attn.layer_type][0], sample)
        else:
            k = attn.k_norm(attn.k_proj(hidden).view(hidden.shape[0], attn.k_proj.out_features // d, d))
            k = rope(k, cos, sin, unsqueeze_dim=1).transpose(0, 1)
        return q, k

    # -- the ViT stage (inside the vision encoder) -----------------------------------------------------
    def check_vit(self, model) -> None:
        tower = getattr(model, "vision_tower", None)
        encoder = getattr(tower, "encoder", None)
        if not hasattr(encoder, "layers") or not hasattr(tower, "pooler"):
            raise NotImplementedError(f"the ViT stage on {type(model).__name__} needs its vision tower "
                                      "(Gemma4VisionModel: encoder.layers and a pooler); this model has "
                                      f"{type(tower).__name__ if tower is not None else 'none'}")

    def vit_encoder(self, model, modality, features_args):
        """Gemma 4's vision encoder (``vision_tower.encoder``), before its pooler; items = the images or video frames
        of the call (``get_image_features`` and ``get_video_features`` run the same tower, the positions given as
        ``image_position_ids`` / ``video_position_ids``).

        * tokens: every patch (no [CLS]); an item's padding patches (position (-1, -1), a suffix of the item, as the
          encoder's own ``valid``) are left out; the item's grid is its patch grid (h, w) = (largest y + 1, largest
          x + 1), patches in raster order (x fastest), as the processor lays them out (checked);
        * per-token block inputs: the rotary (cos, sin) and the (x, y) ``position_ids`` the encoder passes every
          block: the later blocks get the kept patches' own, so a kept patch keeps its 2-D position;
        * keys / queries the methods read: ``k_norm(k_proj(x))`` (``q_norm(q_proj(x))``) per key (query) head, of
          the block's normed input, BEFORE the 2-D rotary embedding: the methods compare what patches contain (ToMe's
          similarity), and the rotation would make equal contents at different positions look different;
        * features: every block (the encoder's last block's output feeds the pooler); the stage puts the output back
          at full length, zeros where no kept token is; the pooler (``Gemma4VisionPooler``, which averages each
          k x k bin of patches with weights 1 / k^2, so zeros would dilute it) is recomputed as the SIZE-WEIGHTED
          mean of the kept tokens in each bin, each weighted by the patches it stands for (a merged token counts
          at its representative's position), a bin without any giving zeros; then the same float32
          sqrt(hidden_size) scaling, the same output (soft tokens, which soft tokens exist) and dtypes as the stock
          pooler. Soft tokens are never added or moved, so the model's own feature code (padding soft tokens
          stripped, standardisation, ``embed_vision``) runs unchanged;
        * lay-out: a soft token is kept when ANY patch of its bin was kept (its feature is then the mean of the
          kept ones); per item (one span per image and per video frame), in the order the soft tokens come out.

        Refused: outputs of the tower's layers asked for (``output_hidden_states`` / ``output_attentions``: the
        tower records them from its blocks, shortened); flash attention (the stage itself: padding and
        proportional attention need an additive mask).
        """
        tower = model.vision_tower
        positions = features_args.get(f"{modality}_position_ids")
        pixels = features_args.get("pixel_values" if modality == "image" else "pixel_values_videos")
        if positions is None or pixels is None or not isinstance(pixels, torch.Tensor):
            raise NotImplementedError(f"the ViT stage on {type(model).__name__} needs {modality} patches as one "
                                      f"tensor with their {modality}_position_ids")
        extra = features_args.get("kwargs") or {}
        for flag in ("output_hidden_states", "output_attentions"):
            if extra.get(flag) or getattr(tower.config, flag, False):
                raise NotImplementedError(f"the ViT stage on {type(model).__name__} shortens the vision encoder's "
                                          f"blocks, whose outputs {flag} would record; allowed: {modality} features "
                                          f"without {flag}")
        k = tower.config.pooling_kernel_size
        items = positions.shape[0]
        output_length = pixels.shape[-2] // (k * k)  # as Gemma4VisionModel
        valid = ~(positions == -1).all(dim=-1)  # as the encoder marks padding
        grids = []
        for i in range(items):
            n = int(valid[i].sum())
            xy = positions[i, :n]
            if n == 0 or bool(valid[i, n:].any()):
                raise NotImplementedError(f"the ViT stage on {type(model).__name__} takes {modality}s whose padding "
                                          "patches (position -1) follow their real patches")
            h, w = int(xy[:, 1].max()) + 1, int(xy[:, 0].max()) + 1
            raster = torch.arange(n, device=xy.device)
            if h * w != n or not torch.equal(xy.long(), torch.stack([raster % w, raster // w], dim=-1)):
                raise NotImplementedError(f"the ViT stage on {type(model).__name__} takes patches in raster order "
                                          f"(x fastest) filling their grid; {modality} {i} has {n} patches "
                                          f"on a {h} x {w} grid in another order")
            grids.append((h, w))
        blocks = tower.encoder.layers[:tower.config.num_hidden_layers]
        encoder = encoder_stage.Encoder(
            tower.encoder, blocks, has_cls=False, grid=grids, feature_block=len(blocks) - 1, modality=modality,
            keys=_vision_heads("k_proj", "k_norm"), queries=_vision_heads("q_proj", "q_norm"),
            per_token=("position_embeddings", "position_ids"), valid=valid.cpu(), pool=(tower.pooler, pool_kept))
        bins, exists = pooler_bins(positions, output_length)
        sizes = exists.sum(dim=1).tolist()
        spans = [t * h * w for t, h, w in self.span_grids(model, modality, features_args)]
        if sizes != spans:
            raise RuntimeError(f"the pooler's bins give {sizes} soft tokens per {modality}, the spans {spans}")

        def lay_out(values):  # (items, P) kept patches -> per item (soft tokens,): 1 where any patch of the bin is
            kept = to_soft_tokens(values.float(), bins, exists, mean=False) > 0
            return list(kept.float().split(sizes))

        return encoder, lay_out

    # -- vision-encoder signals (pre-LLM) -------------------------------------------------------------
    def capture_vision(self, model, modality, features_args, needs, run):
        """Score the encoder's own q/k at the chosen layers while ``run()`` encodes the images or video frames.

        The encoder attends over each item (image or frame) as a whole, bidirectionally with padding keys masked,
        so every layer attends globally. A pre-hook on each chosen layer's attention gets what it attends with:
        the normed hidden states (items, P, D), the 2-D rotary (cos, sin) and the patch positions (x, y; -1 =
        padding). Queries and keys are q_norm(q_proj) and k_norm(k_proj) per head, rotated by the model's own
        multidimensional RoPE, at the module's scale (1.0). Each item's real patches form one attention segment;
        patch scores are then summed (keys averaged) over the pooler's k x k position bins, in the order the soft
        tokens come out of get_image_features / get_video_features: one item is one span.
        """
        tower = model.vision_tower
        depth = len(tower.encoder.layers[:tower.config.num_hidden_layers])
        layers = hooks.vision_layers(needs, list(range(depth)), depth)
        key_layer = layers[-1] if needs.keys else None
        positions = features_args[f"{modality}_position_ids"]  # (items, P, 2)
        items, patches = positions.shape[:2]
        real = ~(positions == -1).all(dim=-1)  # as the encoder marks padding
        # The items are scored as one row of items * P patches, one segment per item: no padding, no other item.
        segments = [torch.nonzero(real[i]).flatten().cpu() + i * patches for i in range(items)]
        rope = _modeling().apply_multidimensional_rope
        received, keys = {}, {}

        def capture(layer):
            def hook(attn, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                cos, sin = (p.float() for p in kwargs["position_embeddings"])
                shape = (*hidden.shape[:-1], -1, attn.head_dim)  # (items, P, heads, d)
                query = attn.q_norm(attn.q_proj(hidden).view(shape)).float()
                key = attn.k_norm(attn.k_proj(hidden).view(shape)).float()
                if layer == key_layer:
                    keys[layer] = key  # before the rotary embedding
                query, key = (rope(x, cos, sin, kwargs["position_ids"]) for x in (query, key))
                key = key.repeat_interleave(query.shape[2] // key.shape[2], dim=2)  # grouped-query key heads
                query, key = (x.flatten(0, 1).transpose(0, 1) for x in (query, key))  # (heads, items * P, d)
                received[layer] = hooks.attention_received(query, key, attn.scaling, segments).view(items, patches)
            return hook

        attention_layers = {tower.encoder.layers[layer].self_attn: capture(layer) for layer in layers}
        output = hooks.run_with_pre_hooks(attention_layers, run)

        bins, kept = pooler_bins(positions, patches // tower.config.pooling_kernel_size ** 2)
        sizes = [t * h * w for t, h, w in self.span_grids(model, modality, features_args)]
        if kept.sum(dim=1).tolist() != sizes:
            raise RuntimeError(f"the pooler's bins give {kept.sum(dim=1).tolist()} soft tokens per item, the spans "
                               f"{sizes}")
        per_layer = {layer: to_soft_tokens(scores, bins, kept, mean=False).split(sizes)
                     for layer, scores in received.items()}
        span_keys = [None] * items
        if key_layer is not None:
            span_keys = to_soft_tokens(keys[key_layer], bins, kept, mean=True).split(sizes)
        return output, [VisionSignals({layer: parts[i] for layer, parts in per_layer.items()}, span_keys[i])
                        for i in range(items)]


def pooler_bins(positions: torch.Tensor, output_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The soft token of every patch, as ``Gemma4VisionPooler`` assigns them, and which soft tokens exist.

    ``positions`` (items, P, 2) are the patch (x, y), -1 for padding. The pooler averages k x k patches, k =
    sqrt(P // output_length), by position: bin = x // k + (W // k) * (y // k) with W the item's largest x + 1
    (raster order of the k x k blocks). It keeps the bins some patch falls in, in bin order, item after item.
    Returns bins (items, P) long, -1 for padding patches (the pooler zeroes them: they are left out here), and
    kept (items, output_length) bool.
    """
    items, patches = positions.shape[:2]
    k = math.isqrt(patches // output_length)
    padding = (positions == -1).all(dim=-1)
    xy = positions.clamp(min=0)
    width = xy[..., 0].max(dim=-1, keepdim=True).values + 1
    block = torch.div(xy, k, rounding_mode="floor")
    bins = (block[..., 0] + (width // k) * block[..., 1]).masked_fill(padding, -1)
    kept = torch.zeros(items, output_length, dtype=torch.bool, device=positions.device)
    item = torch.arange(items, device=positions.device).unsqueeze(1).expand_as(bins)
    kept[item[~padding], bins[~padding]] = True
    return bins, kept


def to_soft_tokens(per_patch: torch.Tensor, bins: torch.Tensor, kept: torch.Tensor, mean: bool) -> torch.Tensor:
    """(items, P, ...) per-patch values -> (soft tokens, ...): summed (or averaged) over each bin's real patches,
    the soft tokens of every item in the order the vision tower returns them (see :func:`pooler_bins`)."""
    items, length = kept.shape
    bins, kept = bins.to(per_patch.device), kept.to(per_patch.device)
    real = bins >= 0
    flat = (bins + length * torch.arange(items, device=per_patch.device).unsqueeze(1))[real]
    values = per_patch[real]
    out = values.new_zeros(items * length, *values.shape[1:]).index_add_(0, flat, values)
    if mean:
        counts = torch.bincount(flat, minlength=items * length).clamp(min=1)
        out = out / counts.view(-1, *[1] * (values.dim() - 1)).to(out.dtype)
    return out[kept.flatten()]


def _vision_heads(projection: str, norm: str):
    """Keys (``k_proj``, ``k_norm``) or queries (``q_proj``, ``q_norm``) of a Gemma 4 vision attention module on its
    normed input (items, T, D): (items, T, heads, head_dim), per-head normed, before the rotary embedding."""

    def heads(attn, hidden: torch.Tensor) -> torch.Tensor:
        return getattr(attn, norm)(getattr(attn, projection)(hidden).view(*hidden.shape[:2], -1, attn.head_dim))

    return heads


def pool_kept(pooler, args, kwargs, output, weights: torch.Tensor):
    """``Gemma4VisionPooler``'s output for the ViT stage's put-back encoder output: each soft token the mean of its
    k x k bin's patches weighted by ``weights`` (items, P), the patches each kept token stands for at its position
    (0 for dropped and padding patches) instead of 1 / k^2 each; zeros for a bin without weight. Then, as the
    pooler: the average cast to the hidden states' dtype, scaled by sqrt(hidden_size) in float32, returned with the
    pooler's own mask of the soft tokens that exist."""
    names = ("hidden_states", "pixel_position_ids", "padding_positions", "output_length")
    bound = {**dict(zip(names, args)), **kwargs}
    hidden, positions, output_length = bound["hidden_states"], bound["pixel_position_ids"], bound["output_length"]
    exists = output[1]
    if output_length == hidden.shape[1]:  # no pooling: each soft token is its patch (zeros where none is kept)
        return output
    bins, _ = pooler_bins(positions, output_length)
    weights = weights.to(hidden.device, torch.float32).masked_fill(bins.to(hidden.device) < 0, 0.0)
    matrix = hidden.new_zeros(*bins.shape, output_length, dtype=torch.float32)
    matrix.scatter_(2, bins.clamp(min=0).to(hidden.device).unsqueeze(-1), weights.unsqueeze(-1))  # (items, P, L)
    total = matrix.sum(dim=1)  # (items, L)
    summed = matrix.transpose(1, 2) @ hidden.float()  # (items, L, D)
    mean = torch.where(total.unsqueeze(-1) > 0, summed / total.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1),
                       torch.zeros((), dtype=torch.float32, device=hidden.device))
    return mean.to(hidden.dtype).float() * pooler.root_hidden_size, exists


_PATCH = FamilyPatch([Target(_MODULE, "Gemma4Model", "Gemma4TextModel", Gemma4Adapter())])


def apply_patches(config: PruneConfig | None = None) -> PruneConfig:
    """Install the Gemma 4 hooks; the configuration is read from the environment unless given. Idempotent: a
    second call only replaces the configuration. Returns the active configuration."""
    return _PATCH.apply(config)


def remove_patches() -> None:
    """Restore every wrapped method. Idempotent."""
    _PATCH.remove()
