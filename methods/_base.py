"""The method contract: the context a method receives, what it returns, and the registry.

A pruning method is a function ``fn(ctx: PruneContext) -> indices | PruneResult`` registered with
``@register_prune('<name>_vit')`` (inside the vision encoder, before one of its blocks),
``@register_prune('<name>_pre_llm')`` or ``@register_prune('<name>_intra_llm')``. It sees tensors only:
no model classes, no environment variables (its hyper-parameters arrive validated in ``ctx.params``).
See ``methods/_template.py`` for a commented example.

A KV-cache method (``@register_prune('<name>_kv')``) is a function ``fn(ctx: KVContext) -> indices``: after the
prefill it chooses, per decoder layer and KV head, which cached entries the decode steps keep.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

VIT = "vit"
PRE_LLM = "pre_llm"
INTRA_LLM = "intra_llm"
KV = "kv"
STAGES = (VIT, PRE_LLM, INTRA_LLM, KV)


@dataclass(frozen=True)
class HyperParam:
    """One method hyper-parameter, read from the environment variable ``env`` when patches are applied."""

    env: str
    default: Any
    type: Callable[[str], Any]
    help: str
    # Optional check on the parsed value; returns an error text or None.
    check: Callable[[Any], str | None] | None = None


def flag(text: str) -> bool:
    """The ``type`` of an on/off hyper-parameter: 1/true/yes/on or 0/false/no/off (any case); else ValueError."""
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(text)


@dataclass(frozen=True)
class VisionNeeds:
    """The vision-encoder signals a pre-LLM method reads, declared at registration (``vision=``) so that the
    encoder is hooked only when the configured method needs it.

    Signals come from the encoder's *globally attending* layers: every layer of Qwen2-VL, Qwen3-VL and Gemma 4,
    only the full-attention blocks of Qwen2.5-VL (window blocks give window-local, incomparable scores).

    first_layer: capture the attention received at every globally attending layer with index >= first_layer
                 (a negative value counts from the end of the encoder, as Python indexes do); None: only at
                 the last globally attending layer (the CLS-substitute layer of PruMerge, VisionZip, VisPruner).
    keys:        whether the method reads ``ctx.vision_keys()`` (taken at the last globally attending layer).

    On an encoder with a true [CLS] token (CLIP in LLaVA-1.5 and LLaVA-NeXT) the signals are the [CLS] row itself, read
    where the method's official code reads it:

    cls_layers:  (first, last) encoder layers, inclusive (negative values count from the end), whose [CLS] attention
                 rows are captured; keys come from the last of them. Default: the last layer.
    cls_heads:   "mean": the [CLS] row of every head, averaged over heads; "single": one head over the full width
                 (softmax(q k^T / sqrt(C)) of the whole q_proj / k_proj outputs, as PruMerge computes it);
                 "received": instead of the [CLS] row, the attention each patch receives averaged over every query
                 ([CLS] included) and head (``attentions[l].mean(1).mean(1)[:, 1:]``, as HiPrune reads CLIP).

    cls_substitute: set by the runtime under ``CLS_SIGNAL=substitute``: on a [CLS] encoder, the attention each patch
                 receives (as ``cls_heads="received"``) instead of the [CLS] row, at the same layers, and
                 ``ctx.vision_has_cls`` False, as on an encoder without a [CLS]. Methods do not set it.

    mean_query:  on the Qwen-VL encoders, score each LLM token by the attention of its segment's MEAN query instead
                 of the attention it receives: softmax over the segment's tokens of q_mean . k_token * scale, q_mean
                 the mean of the segment's rotated queries and k_token the mean of the token's rotated patch keys,
                 then averaged over heads (FastVID's official Qwen2.5-VL salient score; linear in the patches where
                 the attention received is quadratic). Other encoders give their usual signal.
    """

    first_layer: int | None = None
    keys: bool = False
    cls_layers: tuple[int, int] = (-1, -1)
    cls_heads: str = "mean"
    mean_query: bool = False
    cls_substitute: bool = False
    # The environment variable that set first_layer (e.g. "VTC_CLS_START_LAYER"), named in the error raised
    # when it leaves no layer of the encoder to score; not part of equality.
    first_layer_var: str | None = field(default=None, compare=False)


@dataclass
class VisionSignals:
    """The vision encoder's signals for ONE span, row i belonging to the span's LLM visual token i.

    attention: encoder layer -> [N] fp32 "attention received" (the substitute for a [CLS] attention row, as
               the model has no [CLS] token): for every key patch, its attention probability averaged over the
               queries of its attention segment (one image or video frame, padding excluded), then over heads;
               summed over the patches that form LLM token i (Qwen: the 2x2 merge group, Gemma 4: the 3x3
               pooling bin). Each attention segment's scores therefore sum to 1. With ``VisionNeeds.mean_query``
               on a Qwen-VL encoder: the segment's mean query's attention instead (also summing to 1 per segment).
    keys:      [N, H, d] fp32 key vectors of the last globally attending layer (H: its key heads), post
               key-norm (if the model has one) and before the rotary embedding, averaged over the patches that
               form each LLM token; None unless the method asked for keys.
    cls:       True on an encoder with a [CLS] token: ``attention`` then holds, at the layers of
               ``VisionNeeds.cls_layers``, the [CLS] query's attention probabilities to the patches (softmax over
               every key, [CLS] included, then the [CLS] column dropped; reduced over heads as ``cls_heads`` says),
               and ``keys`` are the patches' keys of the last of those layers.
    substitute: on such an encoder under ``CLS_SIGNAL=substitute``: ``attention`` holds, at the same layers, the
               attention each patch receives (every query, [CLS] included, and head averaged; the [CLS] column
               dropped) instead of the [CLS] row.
    """

    attention: dict[int, torch.Tensor]
    keys: torch.Tensor | None = None
    cls: bool = False
    substitute: bool = False


class SignalSource:
    """What the hook machinery provides for lazily computed intra-LLM signals (one per sample and layer).

    Implemented by the hook machinery; a method only calls the ``PruneContext`` helpers below.
    """

    def attention(self, query_rows: torch.Tensor, layer: int) -> torch.Tensor:  # [H, r, L] probabilities
        raise NotImplementedError

    def attention_blocks(self, query_rows: torch.Tensor, layer: int, block_rows: int | None = None):
        """``attention`` of consecutive blocks of ``query_rows`` (yields [H, b, L]), for methods that reduce over
        many rows; a source that can share the query/key projections between blocks overrides this."""
        step = block_rows or max(1, query_rows.numel())
        for start in range(0, query_rows.numel(), step):
            yield self.attention(query_rows[start:start + step], layer)

    def key_states(self, layer: int) -> torch.Tensor:  # [L, H_kv, d], post-RoPE
        raise NotImplementedError

    def final_normed_hidden_states(self) -> torch.Tensor:  # [L, D]
        raise NotImplementedError

    def input_embeddings(self) -> torch.Tensor:  # [L, D] the LM input embedding of each current row
        raise NotImplementedError

    def span_input_embeddings(self, span_positions: torch.Tensor) -> torch.Tensor:  # [N0, D]
        """The LM input embeddings of every token the span (named by its current rows) had when it entered."""
        raise NotImplementedError


@dataclass(frozen=True)
class VideoFrames:
    """The frames of one video as a video method (``register_prune(..., video=True)``) sees them; an image is a
    video of one frame.

    frame:  [N] long, the frame of each token of ``PruneContext.features`` (tokens are frame-major: frame 0's, then
            frame 1's, ...). A "frame" is what the model encodes as one temporal step: Qwen2-VL / Qwen2.5-VL's
            temporal patch (two video frames), Qwen3-VL's frame block, LLaVA-OneVision's pooled frame.
    count:  frames in the video.
    size:   (h, w) tokens of one frame in raster order, or None when a frame's tokens form no grid (an image with
            tiles) or are no longer complete (an intra-LLM stage after another stage).
    times:  [count] float seconds of each frame as the model places it in time (Qwen2.5-VL: temporal patch t at
            ``t * second_per_grid_ts``), or None where the model is given no times as numbers (Qwen2-VL; Qwen3-VL
            and Gemma 4 write them into the text).
    separate_spans: True where the model lays every frame out as its own block between text (Qwen3-VL's
            timestamps); False where the video is one block of placeholders.
    """

    frame: torch.Tensor
    count: int
    size: tuple[int, int] | None
    times: torch.Tensor | None = None
    separate_spans: bool = False

    def frame_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """[count, h * w, D] the tokens of each frame (only while every frame is complete: ``size`` not None)."""
        if self.size is None:
            raise RuntimeError("this video's frames are not complete token grids (see VideoFrames.size)")
        return features.view(self.count, self.size[0] * self.size[1], *features.shape[1:])


@dataclass
class PruneContext:
    """Everything a method may use to choose the visual tokens of ONE span (one image, video or frame).

    features:  [N, D] the span's visual tokens. Pre-LLM: the vision encoder + merger output, exactly what
               the language model would receive. Intra-LLM: the hidden states entering decoder layer ``layer``.
               ViT: the hidden states entering encoder block ``layer`` of ONE encoded image (a tile, a frame),
               patch tokens only (a [CLS] token is kept by the stage and not shown).
    keep:      how many tokens to keep (the toolkit's keep-count rule has already been applied).
    grid:      (t, h, w) of the span in LLM tokens (after the spatial merge), raster order; None if unknown.
               ViT: the patch grid (1, h, w) while the tokens are still every patch in raster order; None after
               an earlier ViT stage.
    sizes:     ViT: [N] float, how many patches each token stands for (1 until a merge); a merging method returns
               the merged tokens' sizes in ``PruneResult.sizes``.
    video:     video methods only (registered with ``video=True``): the context holds a whole video (every frame,
               also where the model lays frames out as separate spans) and ``video`` says which frame each token
               belongs to (see ``VideoFrames``); an image is a video of one frame. None for other methods.
    """

    features: torch.Tensor
    keep: int
    grid: tuple[int, int, int] | None
    modality: str
    stage: str
    params: Mapping[str, Any]
    # Stable integer naming this span within its sample and stage (span ordinal, layer); seeds random choices
    # so that a sample gives the same selection alone or inside a batch.
    span_key: int
    # The whole sample (text, every span, padding) at this stage: pre-LLM the language model's input
    # embeddings, intra-LLM the hidden states entering ``layer``.
    hidden_states: torch.Tensor | None = None  # [L, D]
    span_positions: torch.Tensor | None = None  # [N] indices of this span inside hidden_states
    text_positions: torch.Tensor | None = None  # indices of the sample's real text tokens (no padding)
    layer: int | None = None  # intra-LLM: the decoder layer the pruning runs before; ViT: the encoder block
    sizes: torch.Tensor | None = None  # ViT: [N] patches per token
    video: VideoFrames | None = None
    ratio: float | None = None  # the stage's configured keep ratio (``keep`` = keep_count(base tokens, ratio))
    # [N] long: the group an earlier stage of this prefill gave each token (``PruneResult.groups``, e.g. PruneVid's
    # static / per-frame groups), -1 where it gave none; None when no earlier stage gave groups
    groups: torch.Tensor | None = None
    _signals: SignalSource | None = field(default=None, repr=False)
    _vision: VisionSignals | None = field(default=None, repr=False)
    _encoder: "EncoderSignals | None" = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    def _need_signals(self, what: str) -> SignalSource:
        if self._signals is None:
            raise RuntimeError(f"{what} is only available to intra-LLM methods")
        return self._signals

    def last_query_row(self) -> torch.Tensor:
        """Index of the sample's last real token (the end of the generation prompt)."""
        return self.text_positions[-1:].clone()

    def attention_to_span(self, query_rows: torch.Tensor | None = None, layer: int | None = None) -> torch.Tensor:
        """Attention probabilities [H, r, N] from ``query_rows`` (default: the last prompt token) to this span.

        Computed in fp32 from the query/key states of decoder layer ``layer`` (default ``self.layer - 1``, the
        layer just before pruning, as in FastV), with the model's own scale and mask, softmax over every key the
        query may attend to. Never materialises an L x L matrix.
        """
        rows = self.last_query_row() if query_rows is None else query_rows
        layer = self.layer - 1 if layer is None else layer
        probs = self._need_signals("attention").attention(rows, layer)
        return probs[..., self.span_positions]

    def attention_to_span_blocks(self, query_rows: torch.Tensor, layer: int | None = None,
                                 block_rows: int | None = None):
        """``attention_to_span`` for many query rows, yielded block by block ([H, b, N] each, rows in order), so
        that reducing over thousands of rows (e.g. every visual row) never holds more than one block."""
        layer = self.layer - 1 if layer is None else layer
        for probs in self._need_signals("attention").attention_blocks(query_rows, layer, block_rows):
            yield probs[..., self.span_positions]

    def text_after_span(self) -> torch.Tensor:
        """Rows of the sample's text tokens after this span: the only tokens that can attend to it (causal
        attention), i.e. the instruction and the chat-template suffix when the image precedes the question."""
        return self.text_positions[self.text_positions > self.span_positions.max()]

    def input_embeddings(self) -> torch.Tensor:
        """The language model's input embeddings [L, D] of the rows of ``hidden_states`` (pre-LLM: those states)."""
        if self.stage == PRE_LLM:
            return self.hidden_states
        return self._need_signals("input embeddings").input_embeddings()

    def span_input_embeddings(self) -> torch.Tensor:
        """Input embeddings [N0, D] of every token this span had when it entered the language model, including
        those an earlier intra-LLM stage dropped (pre-LLM: ``features``)."""
        if self.stage == PRE_LLM:
            return self.features
        return self._need_signals("input embeddings").span_input_embeddings(self.span_positions)

    def key_states(self, layer: int | None = None) -> torch.Tensor:
        """Post-RoPE key states [L, H_kv, d] of decoder layer ``layer`` (default ``self.layer - 1``)."""
        layer = self.layer - 1 if layer is None else layer
        return self._need_signals("key states").key_states(layer)

    def final_normed_hidden_states(self) -> torch.Tensor:
        """``hidden_states`` passed through the language model's final norm, [L, D]."""
        return self._need_signals("normed hidden states").final_normed_hidden_states()

    def _need_vision(self) -> VisionSignals:
        if self._vision is None:
            raise RuntimeError("vision-encoder signals are only available to pre-LLM methods registered with "
                               "vision=VisionNeeds(...), on a model family that captures them, for spans whose "
                               "encoder ran inside the patched get_image_features / get_video_features")
        return self._vision

    def vision_layers(self) -> tuple[int, ...]:
        """Encoder layers whose attention was captured, ascending; the last one is the default layer."""
        return tuple(sorted(self._need_vision().attention))

    @property
    def vision_has_cls(self) -> bool:
        """True when the vision signals are the encoder's true [CLS] row (LLaVA-1.5 / LLaVA-NeXT's CLIP), False when
        they are the substitute (attention received; Qwen-VL, Gemma 4, SigLIP, InternViT, and CLIP under
        ``CLS_SIGNAL=substitute``)."""
        signals = self._need_vision()
        return signals.cls and not signals.substitute

    @property
    def vision_encoder_has_cls(self) -> bool:
        """True when the encoder has a [CLS] token (CLIP), whichever signal the method gets: its layers are then
        captured as ``VisionNeeds.cls_layers`` says, up to LLaVA's feature layer -2."""
        return self._need_vision().cls

    def vision_attention_received(self, layer: int | None = None) -> torch.Tensor:
        """[N] attention each LLM visual token of this span gets inside the vision encoder at ``layer`` (default: the
        last captured layer): the [CLS] row where the encoder has a [CLS] token (``vision_has_cls``), else its
        substitute, the attention received; see ``VisionSignals``. On the device of ``features`` (the encoder may
        sit on another one)."""
        attention = self._need_vision().attention
        return attention[max(attention) if layer is None else layer].to(self.features.device)

    def vision_keys(self) -> torch.Tensor:
        """[N, H, d] key vectors of the last globally attending encoder layer, see ``VisionSignals``; on the
        device of ``features``."""
        keys = self._need_vision().keys
        if keys is None:
            raise RuntimeError("vision keys were not captured: register the method with VisionNeeds(keys=True)")
        return keys.to(self.features.device)

    def _need_encoder(self) -> "EncoderSignals":
        if self._encoder is None:
            raise RuntimeError("encoder keys and [CLS] rows are only available to ViT-stage methods (names ending "
                               "in '_vit') running before an encoder block >= 1")
        return self._encoder

    def encoder_keys(self) -> torch.Tensor:
        """ViT: [N, H, d] fp32 keys of the current tokens in the attention of encoder block ``layer - 1`` (the block
        just run), before any rotary embedding; ToMe's similarity metric is their mean over heads."""
        return self._need_encoder().keys.to(self.features.device)

    def encoder_cls_attention(self) -> torch.Tensor:
        """ViT: [N] fp32 attention of the [CLS] query to the current tokens in block ``layer - 1`` (softmax over every
        key, the [CLS] and the tokens' sizes included, mean over heads); raises on an encoder without a [CLS]."""
        encoder = self._need_encoder()
        if encoder.cls_attention is None:
            raise RuntimeError("this vision encoder has no [CLS] token")
        return encoder.cls_attention.to(self.features.device)

    def generator(self, seed: int) -> torch.Generator:
        """A CPU generator for this span derived from the method's ``seed``: reproducible run to run."""
        return torch.Generator().manual_seed(seed * 1_000_003 + self.span_key)


class KVSignalSource:
    """What the KV stage provides for lazily computed signals of one sample and layer (implemented by the hooks)."""

    def window_attention(self, window: int) -> torch.Tensor:  # [H_q, w, L]
        raise NotImplementedError

    def attention_column_sums(self, block_rows: int | None = None) -> torch.Tensor:  # [H_q, L]
        raise NotImplementedError


@dataclass
class KVContext:
    """ONE decoder layer's cache of ONE sample after the prefill, as a KV-cache method (``*_kv``) sees it.

    keys:        [H_kv, L, d] the cached keys of the sample's L prompt entries (padding left out), exactly as the
                 layer caches them: after the key norm and the rotary embedding.
    values:      [H_kv, L, d] the cached values.
    budget:      entries per KV head the configured KV_BUDGET gives this layer (a fraction of L, or a count capped at
                 L); a method with its own per-layer budgets (PyramidKV) derives them from it.
    layer:       the decoder layer; ``num_layers`` the model's depth.
    visual:      [L] bool, True for the entries of image and video tokens.
    query_heads: H_q, the layer's query heads; query head h reads KV head h // (H_q // H_kv).

    A method returns LongTensor indices into the L entries: [K] (the same entries for every KV head) or [H_kv, K]
    (per head, the same count K for every head). Entries are kept in their original order whatever the order of
    the indices; the kept keys keep their rotary positions, and the tokens generated next are numbered as without
    compression.
    """

    keys: torch.Tensor
    values: torch.Tensor
    budget: int
    layer: int
    num_layers: int
    visual: torch.Tensor
    query_heads: int
    params: Mapping[str, Any]
    _signals: KVSignalSource | None = field(default=None, repr=False)

    @property
    def num_entries(self) -> int:
        return self.keys.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[0]

    def _need_signals(self) -> KVSignalSource:
        if self._signals is None:
            raise RuntimeError("attention signals are only available inside the KV stage")
        return self._signals

    def window_attention(self, window: int) -> torch.Tensor:
        """[H_q, w, L] fp32 attention probabilities of the last ``w`` prompt tokens (the observation window, clipped
        to L) to every entry, as the layer computed them in the prefill (causal; softmax over the entries each row
        may see). Computed from the layer's own queries and the cached keys, never an L x L matrix."""
        return self._need_signals().window_attention(window)

    def attention_column_sums(self) -> torch.Tensor:
        """[H_q, L] fp32 attention each entry received in the prefill, summed over every prompt row (H2O's
        accumulated attention score); computed in blocks of rows, never an L x L matrix."""
        return self._need_signals().attention_column_sums()

    def per_kv_head(self, scores: torch.Tensor) -> torch.Tensor:
        """[H_q, ...] query-head scores to [H_kv, ...]: the mean over each KV head's group of query heads."""
        return scores.view(self.kv_heads, self.query_heads // self.kv_heads, *scores.shape[1:]).mean(dim=1)


@dataclass(frozen=True)
class DecodeSelection:
    """A pre-LLM method's decode-time stage (DyCoke's second stage). At every decode step, before decoder layer
    ``layer``, the current token's attention at layer ``layer - 1`` (probabilities over the whole cache, heads
    averaged), taken at the sample's visual entries ([N] fp32), goes to ``select(attention, previous)``
    (``previous``: the same at the step before, None at the first step); it returns which of those entries layers
    >= ``layer`` attend to in this step ([N] bool), or None for every entry. The cache itself keeps every entry."""

    layer: int
    select: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None]


@dataclass
class KVMerged:
    """What a merging KV method (LOOK-M) returns instead of bare indices: the entries it keeps and, for each kept
    entry, the key and value that replace the cached one (the kept entry merged with the entries folded into it).

    index:  [H_kv, K] indices into the L entries, ascending per head.
    keys:   [H_kv, K, d] replacement keys, in ``index`` order (None: the cached keys of the kept entries).
    values: [H_kv, K, d] replacement values, in ``index`` order.
    """

    index: torch.Tensor
    keys: torch.Tensor | None
    values: torch.Tensor


@dataclass
class EncoderSignals:
    """What a ViT-stage method may read of the encoder block just run (one encoded image), see ``PruneContext``."""

    keys: torch.Tensor  # [N, H, d]
    cls_attention: torch.Tensor | None = None  # [N], None without a [CLS] token


@dataclass
class PruneResult:
    """What a merging method returns.

    indices:  [K] original (span-local) indices; for a merged token, the representative whose position the
              merged token takes.
    features: [K, D] replacement tokens in the same order as ``indices``, or None to keep the originals.
    sizes:    ViT only: [K] patches each returned token stands for (None: the kept tokens' own sizes).
    proportional_attention: ViT only: the later encoder blocks add log(size) to every attention logit of a key
              (ToMe's proportional attention), so a merged token weighs as the patches it stands for.
    groups:   pre-LLM and intra-LLM: [K] long labels of the returned tokens (same order as ``indices``), which the
              later stages of the same prefill read as ``ctx.groups`` (a multi-stage method passing its structure on).
    """

    indices: torch.Tensor
    features: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    proportional_attention: bool = False
    groups: torch.Tensor | None = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    stage: str
    fn: Callable[[PruneContext], torch.Tensor | PruneResult]
    description: str
    params: tuple[HyperParam, ...] = ()
    default_layer: int | None = None  # intra-LLM: the layer it runs before when named alone; ViT: the encoder block
    # (negative: counted from the encoder's end)
    min_layer: int = 0  # intra-LLM: e.g. 1 for methods that read the previous layer's attention
    exact_count: bool = True  # False: the method may keep fewer or more than ctx.keep (documented by it)
    source: str = ""
    # intra-LLM: (num_layers, keep_ratio) -> [(layer, ratio), ...], the method's own multi-stage schedule for a
    # model of that depth, used when the method is named alone (the depth is known at the first forward).
    # ViT: (feature_block, keep_ratio) -> [(block, ratio), ...] over blocks 1..feature_block (the block whose output
    # the features are read from), known when the encoder first runs.
    default_schedule: Callable[[int, float], Sequence[tuple[int, float]]] | None = None
    # Pre-LLM: the vision-encoder signals it reads, or a function of its validated hyper-parameters giving them.
    vision: VisionNeeds | Callable[[Mapping[str, Any]], VisionNeeds] | None = None
    video: bool = False  # sees a whole video per call (all its frames, ``ctx.video``); images as one-frame videos
    # Intra-LLM: after the prefill, re-index the caches of the layers between the first and the last intra-LLM stage
    # to the last stage's survivors (MustDrop's decode-time stage); or a function of its validated hyper-parameters.
    reindex_cache: bool | Callable[[Mapping[str, Any]], bool] = False
    # Pre-LLM: its decode-time stage, a function of its validated hyper-parameters (None: it has none, or it is off).
    decode: Callable[[Mapping[str, Any]], DecodeSelection | None] | None = None

    def vision_needs(self, params: Mapping[str, Any]) -> VisionNeeds | None:
        return self.vision(params) if callable(self.vision) else self.vision

    def decode_selection(self, params: Mapping[str, Any]) -> DecodeSelection | None:
        return None if self.decode is None else self.decode(params)

    def reindexes_cache(self, params: Mapping[str, Any]) -> bool:
        return bool(self.reindex_cache(params) if callable(self.reindex_cache) else self.reindex_cache)


_REGISTRY: dict[str, MethodSpec] = {}


class RegistrationError(ValueError):
    """A ``register_prune`` call the registry refuses: the message says why and what is allowed."""

    def __init__(self, reason: str, allowed: str):
        super().__init__(f"{reason}; allowed: {allowed}")
        self.reason, self.allowed = reason, allowed


def _module_file(module: str) -> str:
    """The file of an imported module (for messages), else the module's name."""
    return getattr(sys.modules.get(module), "__file__", None) or module


def stage_of(name: str) -> str | None:
    for stage in STAGES:
        if name.endswith("_" + stage):
            return stage
    return None


def register_prune(
    name: str,
    *,
    params: Sequence[HyperParam] = (),
    default_layer: int | None = None,
    min_layer: int = 0,
    exact_count: bool = True,
    default_schedule: Callable[[int, float], Sequence[tuple[int, float]]] | None = None,
    vision: VisionNeeds | Callable[[Mapping[str, Any]], VisionNeeds] | None = None,
    video: bool = False,
    reindex_cache: bool | Callable[[Mapping[str, Any]], bool] = False,
    decode: Callable[[Mapping[str, Any]], DecodeSelection | None] | None = None,
):
    """Register a pruning method. The name's suffix (``_vit`` / ``_pre_llm`` / ``_intra_llm`` / ``_kv``) fixes its
    stage (a ``_kv`` method receives a :class:`KVContext` instead of a :class:`PruneContext`).

    ``vision``: the vision-encoder signals a pre-LLM method reads (``ctx.vision_attention_received()``,
    ``ctx.vision_keys()``), or a function of its hyper-parameters returning them (e.g. a layer range).
    ``video``: a video method (pre-LLM or intra-LLM): each call gets one whole video, every frame (``ctx.video``).
    ``reindex_cache``: an intra-LLM method whose decode steps read only its last stage's survivors: after the
    prefill, the caches of the layers between the first and the last intra-LLM stage are cut to them (MustDrop).
    ``decode``: a pre-LLM method's decode-time stage, ``fn(params) -> DecodeSelection | None`` (DyCoke).
    """
    stage = stage_of(name)
    if stage is None:
        raise RegistrationError(f"method name {name!r} must end with '_vit', '_pre_llm', '_intra_llm' or '_kv'",
                                "a method name ending in '_vit', '_pre_llm', '_intra_llm' or '_kv' (the suffix "
                                "fixes the stage)")
    if stage == KV and (default_layer is not None or default_schedule is not None or video or not exact_count):
        raise RegistrationError(f"KV-cache method {name!r} takes no default_layer, default_schedule, video or "
                                "exact_count", "register_prune(name, params=[...]) for a method whose name ends in "
                                "'_kv' (it runs on every decoder layer's cache)")
    if stage == INTRA_LLM and default_layer is None and default_schedule is None:
        raise RegistrationError(f"intra-LLM method {name!r} needs a default_layer or a default_schedule",
                                "register_prune(name, default_layer=K) or default_schedule=...")
    if stage == VIT and (default_layer is None) == (default_schedule is None):
        raise RegistrationError(f"ViT-stage method {name!r} needs either a default_layer (the encoder block it runs "
                                "before) or a default_schedule", "register_prune(name, default_layer=B), B an encoder "
                                "block (negative: from the end), or default_schedule=fn(feature_block, keep_ratio)")
    if stage == PRE_LLM and (default_layer is not None or default_schedule is not None):
        raise RegistrationError(f"pre-LLM method {name!r} takes no default_layer or default_schedule",
                                "no default_layer / default_schedule for a method whose name ends in '_pre_llm'")
    if stage == VIT and video:
        raise RegistrationError(f"ViT-stage method {name!r} cannot be a video method (the encoder runs frame by frame)",
                                "video=True on pre-LLM and intra-LLM methods")
    if stage != PRE_LLM and decode is not None:
        raise RegistrationError(f"{stage} method {name!r} cannot have a decode-time stage (pre-LLM only)",
                                "decode=... on pre-LLM methods only")
    if stage != INTRA_LLM and reindex_cache:
        raise RegistrationError(f"{stage} method {name!r} cannot re-index the cache (intra-LLM only)",
                                "reindex_cache=... on intra-LLM methods only")
    if stage != PRE_LLM and vision is not None:
        raise RegistrationError(f"{stage} method {name!r} cannot read vision-encoder signals (pre-LLM only)",
                                "vision=... on pre-LLM methods only")

    def decorator(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            previous = _module_file(_REGISTRY[name].source)
            raise RegistrationError(f"pruning method {name!r} is registered twice ({previous} and "
                                    f"{_module_file(fn.__module__)})",
                                    "a name not registered yet: rename it (see `python -m methods` for the names "
                                    "in use)")
        doc = (fn.__doc__ or "").strip()
        _REGISTRY[name] = MethodSpec(
            name=name,
            stage=stage,
            fn=fn,
            description=doc.splitlines()[0] if doc else "",
            params=tuple(params),
            default_layer=default_layer,
            min_layer=min_layer,
            exact_count=exact_count,
            source=fn.__module__,
            default_schedule=default_schedule,
            vision=vision,
            video=video,
            reindex_cache=reindex_cache,
            decode=decode,
        )
        return fn

    return decorator


def registered_methods() -> dict[str, MethodSpec]:
    return dict(sorted(_REGISTRY.items()))


def closest_names(name: str, n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, list(_REGISTRY), n=n, cutoff=0.3)
