"""Visual-token pruning hooks for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers 5.23).

``apply_patches()`` reads the pruning configuration from the environment (see docs/configuration.md) and installs the shared
wrappers of ``patching.py`` on each family's ``Model`` and ``TextModel`` classes; this file only says what is
Qwen-specific: span grids, 3-D M-RoPE positions and ``rope_deltas``, the text-position row, Qwen3-VL's
deepstack state, and how to read the vision encoder's attention for pre-LLM methods that need it
(``QwenAdapter.capture_vision``). Masks and attention signals are the standard decoder's (``hooks.DecoderAdapter``).

Kept tokens keep their original 3-D M-RoPE positions; after pre-LLM pruning ``rope_deltas`` grows by the
number of dropped tokens, so decoding without explicit positions continues where the unpruned model would.
``remove_patches()`` restores the originals. Importing this module changes nothing.
"""

from __future__ import annotations

import torch

import encoder_stage
import hooks
from hooks import DecoderAdapter, Selection, rotate_half, text_positions_for
from methods import VisionSignals
from patching import ACTIVE_CALL, FamilyPatch, Target, last_record, pruning_state
from utils import PruneConfig

__all__ = ["apply_patches", "remove_patches", "pruning_state", "last_record"]


# --------------------------------------------------------------------------------------------------
# What differs between the three Qwen families
# --------------------------------------------------------------------------------------------------
class QwenAdapter(DecoderAdapter):
    """Qwen-VL on top of the standard decoder: 3-D M-RoPE positions (rows 1-3 of ``position_ids``; row 0, the text
    row, feeds only masks / flash-attention), ``rope_deltas``, Qwen3-VL's deepstack, the vision encoder's windows."""

    def __init__(self, deepstack: bool, frames_are_spans: bool):
        self.deepstack = deepstack  # Qwen3-VL injects vision features after the first decoder layers
        self.frames_are_spans = frames_are_spans  # Qwen3-VL lays every video frame out as its own block

    def span_grids(self, model, modality, features_args):
        grid_thw = features_args.get(f"{modality}_grid_thw")
        if grid_thw is None:
            return None
        merge = model.config.vision_config.spatial_merge_size
        grids = []
        for t, h, w in grid_thw.tolist():
            if modality == "video" and self.frames_are_spans:
                grids.extend([(1, h // merge, w // merge)] * t)
            else:
                grids.append((t, h // merge, w // merge))
        return grids

    def frames_per_video(self, model, features_args):
        grid_thw = features_args.get("video_grid_thw")
        if not self.frames_are_spans or grid_thw is None:
            return None
        return [int(t) for t in grid_thw[:, 0].tolist()]

    def frame_times(self, model, forward_args, video, frames):
        # Qwen2.5-VL spaces temporal patches by second_per_grid_ts (its temporal M-RoPE index is t * seconds *
        # tokens_per_second); Qwen2-VL has no times and Qwen3-VL writes them into the text.
        seconds = forward_args.get("second_per_grid_ts")
        if seconds is None or self.frames_are_spans:
            return None
        return tuple(t * float(seconds[video]) for t in range(frames))

    # -- vision-encoder signals (pre-LLM) -------------------------------------------------------------
    def capture_vision(self, model, modality, features_args, needs, run):
        """Score the encoder's own q/k at the chosen blocks while ``run()`` encodes the images or videos.

        A pre-hook on each chosen block's attention receives exactly what the block attends with: the normed
        hidden states, the 2-D rotary (cos, sin) and ``cu_seqlens`` (one attention segment per image / video
        frame in full-attention blocks). Patches are in the encoder's order: groups of ``merge**2`` contiguous
        patches form one LLM token, and in Qwen2.5-VL the groups are window-permuted, so token scores are
        gathered with ``argsort(window_index)``, the merger's own reverse permutation. ``needs.mean_query``
        scores each segment's mean query against the tokens' mean keys instead (linear in the patches).
        """
        visual = model.visual
        grid_thw = features_args[f"{modality}_grid_thw"]
        depth = len(visual.blocks)
        windowed = getattr(visual, "fullatt_block_indexes", None)  # Qwen2.5-VL: only these attend globally
        layers = hooks.vision_layers(needs, list(windowed) if windowed else list(range(depth)), depth)
        key_layer = layers[-1] if needs.keys else None
        received, per_token, keys = {}, {}, {}
        unit = visual.spatial_merge_size ** 2

        def capture(layer):
            def hook(attn, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                qkv = attn.qkv(hidden).view(hidden.shape[0], 3, attn.num_heads, attn.head_dim).float()
                query, key = qkv[:, 0], qkv[:, 1]  # (P, H, d)
                if layer == key_layer:
                    keys[layer] = key
                cos, sin = (p.float().unsqueeze(1) for p in kwargs["position_embeddings"])
                query, key = (x * cos + rotate_half(x) * sin for x in (query, key))
                bounds = kwargs["cu_seqlens"].tolist()
                if needs.mean_query:  # already one score per LLM token
                    per_token[layer] = hooks.mean_query_attention(query, key, attn.scaling, bounds, unit)
                    return
                segments = [torch.arange(start, end) for start, end in zip(bounds, bounds[1:])]
                received[layer] = hooks.attention_received(query.transpose(0, 1), key.transpose(0, 1),
                                                           attn.scaling, segments)
            return hook

        output = hooks.run_with_pre_hooks({visual.blocks[layer].attn: capture(layer) for layer in layers}, run)

        order = None
        if windowed:
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                                      visual.patch_size)
            order = torch.argsort(window_index)

        def to_tokens(per_patch, reduce):
            per_token = reduce(per_patch.view(-1, unit, *per_patch.shape[1:]), dim=1)
            return per_token if order is None else per_token[order.to(per_token.device)]

        attention = {layer: to_tokens(scores, torch.sum) for layer, scores in received.items()}
        attention.update({layer: scores if order is None else scores[order.to(scores.device)]
                          for layer, scores in per_token.items()})
        token_keys = to_tokens(keys[key_layer], torch.mean) if key_layer is not None else None
        sizes = [t * h * w for t, h, w in self.span_grids(model, modality, features_args)]
        per_layer = {layer: scores.split(sizes) for layer, scores in attention.items()}
        span_keys = token_keys.split(sizes) if token_keys is not None else [None] * len(sizes)
        return output, [VisionSignals({layer: parts[i] for layer, parts in per_layer.items()}, span_keys[i])
                        for i in range(len(sizes))]

    # -- the ViT stage -------------------------------------------------------------------------------------
    def check_vit(self, model) -> None:
        visual = model.visual
        if not hasattr(visual, "blocks") or not hasattr(visual, "merger"):
            raise NotImplementedError(f"the ViT stage needs Qwen-VL's vision transformer (blocks, merger); "
                                      f"{type(visual).__name__} has none")

    def vit_encoder(self, model, modality, features_args):
        """Qwen's vision transformer as a packed encoder (``encoder_stage.PackedEncoder``): items are the images and
        video frames of the call (each frame is its own attention segment), tokens are 2x2 merge units.

        Which blocks: any block from 1 to the last (the merger reads the last block's output; block 0 sees the patch
        embeddings, whose keys no block has computed). Why it is well defined there: the merger concatenates the m x m
        patches of a unit into one feature token, so units are kept, dropped or merged whole (a lone patch could not
        be merged into a token); the full-attention blocks attend per item and Qwen2.5-VL's windowed blocks within
        fixed spatial windows of units, so after a stage every block attends over the kept units of the same item
        (window) as before, with their own rotary positions; a merged unit stays in its representative's window.
        Qwen3-VL's deepstack mergers read earlier blocks; their outputs, like the merger's, are put back at full
        length and the language-model entry drops the same tokens from both. Not available: proportional attention
        (the packed attention takes no mask; ToMe with TOME_PROP_ATTN=0 runs)."""
        from transformers.vision_utils import get_vision_window_index

        visual = model.visual
        grid_thw = features_args[f"{modality}_grid_thw"]
        merge = visual.spatial_merge_size
        items = [(h // merge, w // merge) for t, h, w in grid_thw.tolist() for _ in range(t)]
        units = sum(h * w for h, w in items)
        windowed = getattr(visual, "fullatt_block_indexes", None)  # Qwen2.5-VL: only these attend per item
        unit_token, unit_window = torch.arange(units), None
        full_blocks = frozenset(range(len(visual.blocks)))
        if windowed is not None:
            unit_token, cu_window = get_vision_window_index(grid_thw.cpu(), merge, visual.window_size,
                                                            visual.patch_size)
            row_window = torch.bucketize(torch.arange(units * merge ** 2), cu_window[1:].long(), right=True)
            unit_window, full_blocks = row_window[::merge ** 2], frozenset(windowed)
        mergers = [visual.merger, *getattr(visual, "deepstack_merger_list", [])]

        def keys(attn, rows):  # before the rotary embedding: the methods compare content
            return attn.qkv(rows).view(rows.shape[0], 3, attn.num_heads, attn.head_dim)[:, 1]

        encoder = encoder_stage.PackedEncoder(
            visual, visual.blocks, lambda block: block.attn, keys, merge ** 2, unit_token.long(), items,
            unit_window, full_blocks, mergers, len(visual.blocks) - 1, modality)
        sizes = [t * h * w for t, h, w in self.span_grids(model, modality, features_args)]
        return encoder, lambda kept: list(kept.split(sizes))

    # -- positions and per-token state ------------------------------------------------------------------
    def shorten_lm_inputs(self, selection: Selection, kwargs: dict, call) -> None:
        kwargs["attention_mask"] = selection.layout.attention_mask
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
        self.on_cache_shortened(call, selection.prefill_length - length)

    def on_cache_shortened(self, call, dropped):
        # Decode steps are numbered from layer 0's cache length plus rope_deltas: grow the deltas by what was dropped.
        if dropped and getattr(call.model, "rope_deltas", None) is not None:
            model, stock = call.model, call.model.rope_deltas
            model.rope_deltas = pruned = stock + dropped

            def undo():  # unless generate has since computed a new prompt's deltas
                if model.rope_deltas is pruned:
                    model.rope_deltas = stock

            call.state.undo.append(undo)

    def decode_lm_inputs(self, kwargs, mask_2d, call):
        kwargs["attention_mask"] = mask_2d  # positions: the model continues from the grown rope_deltas

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
        call = ACTIVE_CALL.get()
        if call is not None and "deepstack" in call.extras:
            self._shorten_deepstack(selection, call.extras["deepstack"])

    def lm_call_context(self, text_model, call, kwargs, prefill):
        if not (self.deepstack and prefill and kwargs.get("visual_pos_masks") is not None):
            return super().lm_call_context(text_model, call, kwargs, prefill)
        call.extras["deepstack"] = kwargs  # intra-LLM stages shorten it in place (on_intra_selection)
        return _DeepstackRedirect(text_model, call)


class _DeepstackRedirect:
    """Qwen3-VL's loop injects deepstack features with the call's full-length visual mask; after an intra-LLM
    stage the hidden states are shorter, so feed it the shortened mask and features instead."""

    def __init__(self, text_model, call):
        self.text_model, self.call = text_model, call

    def __enter__(self):
        deepstack = self.call.extras["deepstack"]
        original = type(self.text_model)._deepstack_process
        text_model, calls = self.text_model, [0]

        def process(hidden_states, visual_pos_masks, visual_embeds):
            layer = calls[0]
            calls[0] += 1
            return original(text_model, hidden_states, deepstack["visual_pos_masks"],
                            deepstack["deepstack_visual_embeds"][layer])

        text_model._deepstack_process = process
        return self

    def __exit__(self, *exc):
        self.text_model.__dict__.pop("_deepstack_process", None)
        return False


_PATCH = FamilyPatch([
    Target("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel", "Qwen2VLTextModel",
           QwenAdapter(deepstack=False, frames_are_spans=False)),
    Target("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel", "Qwen2_5_VLTextModel",
           QwenAdapter(deepstack=False, frames_are_spans=False)),
    Target("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLModel", "Qwen3VLTextModel",
           QwenAdapter(deepstack=True, frames_are_spans=True)),
])


def apply_patches(config: PruneConfig | None = None) -> PruneConfig:
    """Install the hooks for every Qwen-VL family; the configuration is read from the environment unless
    given. Idempotent: a second call only replaces the configuration. Returns the active configuration."""
    return _PATCH.apply(config)


def remove_patches() -> None:
    """Restore every wrapped method. Idempotent."""
    _PATCH.remove()
