"""Tiny, offline, randomly initialised Gemma 4 vision-language models and processor.

The Gemma 4 counterpart of ``tests/support/tiny_models.py``: used by the tests (exactness
oracles) and by the offline demo.

Everything is built in-process (no Hub access): a BPE tokenizer with byte fallback is
trained on a small in-code corpus and wrapped in the real ``GemmaTokenizer`` with the
real Gemma 4 special tokens (``<|turn>``/``<turn|>`` chat markers, ``<|image>`` /
``<|image|>`` / ``<image|>`` vision markers, ...), then combined with the real audio
feature extractor, image/video processors and ``Gemma4Processor``, so ``input_ids``,
``mm_token_type_ids``, ``pixel_values`` and the position ids come out exactly as the real
pipeline lays them out.

The three model variants mirror the released families (E2B, 31B dense, 26B-A4B MoE)
in every structural switch the modelling code branches on, only tiny. Their Linear /
Embedding weights (and the vision position table and MoE expert tensors) are re-drawn
from N(0, 0.15^2), the word embedding tied to the output head from N(0, 0.05^2): with
the default 0.02 init greedy decoding collapses to a single constant token, and any
"pruned vs. unpruned generation" comparison would pass vacuously.
"""

from __future__ import annotations

import functools

import numpy as np
import PIL.Image
import torch
from transformers import (
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4Processor,
)
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts, Gemma4VisionPatchEmbedder

from calibration.processors import (
    GEMMA_CHAT_TOKENS,
    GEMMA_MULTIMODAL_TOKENS,
    GEMMA_PATCH_SIZE,
    GEMMA_POOLING_KERNEL_SIZE,
    GEMMA_VIDEO_TOKEN,
    make_processor,
    released_rope_parameters,
    train_gemma_tokenizer,
)
from tests.support import tiny_models

VARIANTS = ("e2b", "dense31b", "moe26b")

KINDS = ("image", "two_images", "video", "text", "batch", "ragged_batch")

_CORPUS = """\
You are a helpful assistant. user model
Describe this image. Describe this video. What is shown in the picture?
What colour is the square in the top left corner? How many objects are there?
Compare the first image with the second one and explain the differences in detail.
Is there anything moving in the video? What happens between the frames?
The image shows a red square, a green circle and a blue triangle on a white background.
The video shows a small ball moving from the left side to the right side.
Please answer briefly. Please answer with a long and detailed explanation.
00:00 00:01 00:02 00:03 0 1 2 3 4 5 6 7 8 9 10 seconds
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
"""

# A pre-decoded clip is declared as sampled at 1 fps, so its frames get the distinct
# "00:00", "00:01", ... timestamps the processor writes in front of each frame.
_VIDEO_FPS = 1.0


@functools.lru_cache(maxsize=None)
def build_processor() -> Gemma4Processor:
    """Real ``Gemma4Processor`` built offline with the smallest soft-token budget.

    Cached and therefore shared between callers: do not mutate it (pass per-call
    kwargs such as ``padding_side`` instead).
    """
    return make_processor(train_gemma_tokenizer(_CORPUS.splitlines()))


def _special_ids() -> dict:
    tok = build_processor().tokenizer
    get = tok.convert_tokens_to_ids
    vocab_size = -(-len(tok) // 8) * 8
    return dict(
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        eot_token_id=get(GEMMA_CHAT_TOKENS["eot_token"]),
        str_token_id=get(GEMMA_CHAT_TOKENS["str_token"]),
        image_token_id=tok.image_token_id,
        video_token_id=get(GEMMA_VIDEO_TOKEN),
        audio_token_id=tok.audio_token_id,
        boi_token_id=get(GEMMA_MULTIMODAL_TOKENS["boi_token"]),
        eoi_token_id=get(GEMMA_MULTIMODAL_TOKENS["eoi_token"]),
        boa_token_id=get(GEMMA_MULTIMODAL_TOKENS["boa_token"]),
        eoa_token_id=get(GEMMA_MULTIMODAL_TOKENS["eoa_token"]),
        vocab_size=vocab_size,
        suppressed_ids=sorted(set(get(tok.all_special_tokens))) + list(range(len(tok), vocab_size)),
    )


_HIDDEN, _HEADS, _HEAD_DIM, _GLOBAL_HEAD_DIM = 64, 4, 16, 32
# 2 sliding : 1 full, ending on a full layer (the config forces the last layer to
# full attention); the released models use 4:1 (E2B) and 5:1 (31B, 26B-A4B).
_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
# Image spans are ~60-70 tokens, so a 12-token window really cuts through them.
_SLIDING_WINDOW = 12

# Per-variant text-config fields, shaped like the released configs
# (transformers' convert_gemma4_weights.py _VARIANTS), only tiny.
_TEXT_VARIANTS = {
    # Per-layer embeddings (PLE) and KV sharing: layers 4, 5 (sliding, full) reuse
    # the K/V of layers 3 and 2, the last non-shared layer of each type. The
    # double-wide MLP widens the shared layers as in the release. Plain causal
    # attention over vision tokens; one KV head everywhere (full layers inherit it).
    "e2b": dict(
        num_key_value_heads=1,
        hidden_size_per_layer_input=16,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        use_bidirectional_attention=None,
        attention_k_eq_v=False,
    ),
    # Bidirectional attention inside each vision span (sliding layers only, per
    # create_masks_for_vision_model), K = V projections and fewer KV heads on the
    # full layers, no PLE, no KV sharing.
    "dense31b": dict(
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        use_bidirectional_attention="vision",
        attention_k_eq_v=True,
    ),
    # As dense31b, plus a routed MoE block (4 experts, top-2) next to the dense MLP,
    # which acts as the shared expert (the release: 128 experts, top-8, 2112 vs 704).
    "moe26b": dict(
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        use_bidirectional_attention="vision",
        attention_k_eq_v=True,
        intermediate_size=96,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=32,
    ),
}

# On-device (E2B/E4B) vs large-model vision towers differ in these two switches.
_VISION_VARIANTS = {
    "e2b": dict(use_clipped_linears=True, standardize=False),
    "dense31b": dict(use_clipped_linears=False, standardize=True),
    "moe26b": dict(use_clipped_linears=False, standardize=True),
}


def _config(variant: str) -> Gemma4Config:
    if variant not in _TEXT_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    ids = _special_ids()
    text = dict(
        vocab_size=ids["vocab_size"],
        vocab_size_per_layer_input=ids["vocab_size"],
        hidden_size=_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=len(_LAYER_TYPES),
        layer_types=list(_LAYER_TYPES),
        num_attention_heads=_HEADS,
        head_dim=_HEAD_DIM,
        global_head_dim=_GLOBAL_HEAD_DIM,
        sliding_window=_SLIDING_WINDOW,
        final_logit_softcapping=30.0,
        max_position_embeddings=4096,
        rope_parameters=released_rope_parameters(),
        pad_token_id=ids["pad_token_id"],
        bos_token_id=ids["bos_token_id"],
        eos_token_id=[ids["eos_token_id"], ids["eot_token_id"]],
    )
    text.update(_TEXT_VARIANTS[variant])
    # Vision tower: 2 layers, 2 heads of 16 (the axial 2-D RoPE splits head_dim in
    # quarters). Patch coordinates stay below 630 / 3 = 210 within the 70-token budget,
    # hence the 256-row position table (10240 in the release).
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=GEMMA_PATCH_SIZE,
        pooling_kernel_size=GEMMA_POOLING_KERNEL_SIZE,
        position_embedding_size=256,
        **_VISION_VARIANTS[variant],
    )
    return Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        audio_token_id=ids["audio_token_id"],
        boi_token_id=ids["boi_token_id"],
        eoi_token_id=ids["eoi_token_id"],
        boa_token_id=ids["boa_token_id"],
        eoa_token_index=ids["eoa_token_id"],
        tie_word_embeddings=True,
    )


_WEIGHT_STD = 0.15
# The word embedding doubles as the output head (tied, as released), and every decoder
# block adds a normalised (~unit RMS) update to the residual stream, so the current
# token's own embedding (scaled by sqrt(hidden)) survives into the final hidden state
# and yields a self-logit ~ std^2 * hidden / rms(residual), against competitors ~ std *
# sqrt(hidden). At 0.15 greedy decoding then keeps re-emitting its input token (17 of
# 90 six-token continuations were one constant token, across variants, seeds and
# kinds); at 0.05 none were.
_TIED_EMBEDDING_STD = 0.05


def build_model(variant: str, attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32):
    """Tiny ``Gemma4ForConditionalGeneration`` in eval mode; identical weights for a given seed."""
    config = _config(variant)
    ids = _special_ids()
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    embed_tokens = model.get_input_embeddings()
    # Re-draw in module-registration order (deterministic). Norm scales, router scales
    # and layer scalars keep their ones; the clipping bounds stay infinite.
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if module is model.lm_head:
                continue  # same Parameter as embed_tokens
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, _TIED_EMBEDDING_STD if module is embed_tokens else _WEIGHT_STD)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0.0, _WEIGHT_STD)
            elif isinstance(module, Gemma4VisionPatchEmbedder):
                # Initialised to ones: every patch would get the same position embedding.
                module.position_embedding_table.normal_(0.0, _WEIGHT_STD)
            elif isinstance(module, Gemma4TextExperts):
                module.gate_up_proj.normal_(0.0, _WEIGHT_STD)
                module.down_proj.normal_(0.0, _WEIGHT_STD)
    assert model.lm_head.weight is embed_tokens.weight, "lm_head no longer tied to embed_tokens"
    # A random model now and then picks EOS, a chat marker or an image token during
    # decoding (ending a comparison early or feeding a placeholder back in). Zeroing
    # their lm_head rows would zero their input embeddings too (tied weights), so
    # generate() masks them (and the vocabulary padding) to -inf instead.
    generation_config = model.generation_config
    generation_config.suppress_tokens = ids["suppressed_ids"]
    # As released: stop on <eos>, <turn|> and <|tool_response>.
    generation_config.eos_token_id = [ids["eos_token_id"], ids["eot_token_id"], ids["str_token_id"]]
    generation_config.pad_token_id = ids["pad_token_id"]
    generation_config.bos_token_id = ids["bos_token_id"]
    return model.to(dtype).eval()


def visual_token_ids(model) -> dict:
    return {"image": model.config.image_token_id, "video": model.config.video_token_id}


def make_image(seed: int, size=(96, 64)) -> PIL.Image.Image:
    """Colourful image with one random 16-px square per Gemma 4 patch (see ``tiny_models.make_image``)."""
    return tiny_models.make_image(seed, size, block=16)


def make_video(seed: int, frames: int = 2, size=(64, 64)) -> np.ndarray:
    """A clip drifting one 16-px block per frame (see ``tiny_models.make_video``)."""
    return tiny_models.make_video(seed, frames, size, block=16)


def _video_metadata(video: np.ndarray) -> dict:
    n = len(video)
    return {"total_num_frames": n, "fps": _VIDEO_FPS, "duration": n / _VIDEO_FPS, "frames_indices": list(range(n))}


def make_inputs(processor, kind: str, *, seed: int = 0):
    """Chat-template + processor call, as in the model cards, returning a BatchFeature
    with input_ids, attention_mask, mm_token_type_ids and the pixel / position tensors."""
    image = {"type": "image"}
    video = {"type": "video"}

    def text(t):
        return {"type": "text", "text": t}

    images, videos = [], []
    if kind == "image":
        conversations = [[image, text("Describe this image.")]]
        images = [[make_image(seed)]]
    elif kind == "two_images":
        conversations = [[image, text("Compare the first image with"), image, text("the second one.")]]
        images = [[make_image(seed), make_image(seed + 1, size=(64, 80))]]
    elif kind == "video":
        conversations = [[video, text("What happens in the video?")]]
        videos = [make_video(seed)]
    elif kind == "text":
        conversations = [[text("Tell me about the quick brown fox.")]]
    elif kind == "batch":
        conversations = [
            [image, text("Describe it.")],
            [image, text("Please answer with a long and detailed explanation of what the picture shows.")],
        ]
        images = [[make_image(seed)], [make_image(seed + 1)]]
    elif kind == "ragged_batch":
        # Equal lengths (no padding) but one image vs two: after pruning, the samples
        # keep different numbers of tokens although neither had padding of its own.
        conversations = [
            [
                image,
                text(
                    "The image shows a red square, a green circle and a blue triangle on a white background."
                    " What colour is the square in the top left corner? How many objects are there?"
                    " Is there anything else in the picture?"
                    " Please answer with a long and detailed explanation of what the picture shows."
                ),
            ],
            [image, image, text("Compare them.")],
        ]
        images = [[make_image(seed)], [make_image(seed + 1), make_image(seed + 2)]]
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")

    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        for content in conversations
    ]
    kwargs = {}
    if videos:
        # Pre-decoded frames are the sampled ones: no re-sampling (the default would
        # ask for 32 frames), timestamps from the metadata.
        kwargs.update(video_metadata=[_video_metadata(v) for v in videos], do_sample_frames=False)
    if kind == "batch":
        kwargs.update(padding=True, padding_side="left")
    inputs = processor(
        text=prompts,
        images=images or None,
        videos=videos or None,
        return_tensors="pt",
        # Already the class default for Gemma4Processor; explicit because the
        # bidirectional vision mask needs it and fixtures must not silently lose it.
        return_mm_token_type_ids=True,
        **kwargs,
    )
    assert "mm_token_type_ids" in inputs, f"{type(processor).__name__} dropped mm_token_type_ids"
    if kind == "ragged_batch":
        assert inputs["attention_mask"].all(), "ragged_batch prompts must have equal lengths"
    return inputs
