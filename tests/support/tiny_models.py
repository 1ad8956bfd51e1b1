"""Tiny, offline, randomly initialised Qwen2-VL / Qwen2.5-VL / Qwen3-VL models and processors.

Used by the tests (exactness oracles) and by the offline demo (tiny local checkpoints).

Everything here is built in-process (no Hub access): a byte-level BPE tokenizer is
trained on a small in-code corpus, wrapped in the real ``Qwen2Tokenizer`` and
combined with the real image/video processors and the real ``*Processor``
classes, so that ``input_ids``, ``mm_token_type_ids``, ``pixel_values`` and the
grids come out exactly as the real pipeline would lay them out, only smaller.

The models are real ``*ForConditionalGeneration`` classes with tiny configs whose
Linear/Embedding/Conv weights are re-drawn from N(0, 0.15^2): with the default
0.02 init, greedy decoding collapses to a single constant token and any
"pruned vs. unpruned generation" comparison would pass vacuously.
"""

from __future__ import annotations

import functools

import numpy as np
import PIL.Image
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from calibration.processors import QWEN2_VL_CHAT_TEMPLATE, SPECIAL_TOKENS, train_qwen_tokenizer

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

KINDS = ("image", "two_images", "video", "image_video", "text", "batch", "ragged_batch")

_CORPUS = """\
You are a helpful assistant.
system user assistant
Describe this image. Describe this video. What is shown in the picture?
What colour is the square in the top left corner? How many objects are there?
Compare the first image with the second one and explain the differences in detail.
Is there anything moving in the video? What happens between the frames?
The image shows a red square, a green circle and a blue triangle on a white background.
The video shows a small ball moving from the left side to the right side.
Please answer briefly. Please answer with a long and detailed explanation.
<0.2 seconds> <1.2 seconds> <2.5 seconds> 0 1 2 3 4 5 6 7 8 9 10 seconds
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
"""

# Structure of the released Qwen3-VL-Instruct template (tools/thinking/assistant
# history branches dropped): no default system prompt; same vision triples as
# Qwen2-VL. Newlines are emitted as expressions because `{%-` would eat literal ones.
_QWEN3_VL_CHAT_TEMPLATE = r"""
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' -%}
                {%- set image_count.value = image_count.value + 1 -%}
                {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                <|vision_start|><|image_pad|><|vision_end|>
            {%- elif 'video' in item or item.type == 'video' -%}
                {%- set video_count.value = video_count.value + 1 -%}
                {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                <|vision_start|><|video_pad|><|vision_end|>
            {%- elif 'text' in item -%}
                {{- item.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- for message in messages -%}
    {{- '<|im_start|>' + message.role + '\n' + render_content(message.content) + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# Only the size budgets differ from the released preprocessor configs: they are
# shrunk so an 84x56 image costs 6 LLM tokens and nothing exceeds 24.
_PROCESSOR_SPECS = {
    "qwen2_vl": dict(
        cls=Qwen2VLProcessor,
        video_cls=Qwen2VLVideoProcessor,
        patch_size=14,
        mean_std={},  # OpenAI-CLIP defaults of the classes, as released
        template=QWEN2_VL_CHAT_TEMPLATE,
    ),
    "qwen2_5_vl": dict(
        cls=Qwen2_5_VLProcessor,
        video_cls=Qwen2VLVideoProcessor,
        patch_size=14,
        mean_std={},
        template=QWEN2_VL_CHAT_TEMPLATE,
    ),
    "qwen3_vl": dict(
        cls=Qwen3VLProcessor,
        video_cls=Qwen3VLVideoProcessor,
        patch_size=16,
        mean_std=dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
        template=_QWEN3_VL_CHAT_TEMPLATE,
    ),
}

_MAX_LLM_TOKENS_PER_IMAGE = 24

# A 4-frame clip is treated as sampled at 2 fps (the Qwen default sampling rate):
# Qwen2.5-VL derives second_per_grid_ts from it and Qwen3-VL its "<t seconds>" text.
_VIDEO_FPS = 2.0


@functools.lru_cache(maxsize=None)
def build_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE (256 byte symbols + 144 merges) + the Qwen special tokens, trained on a small corpus.
    Shared by all families (the real ones share a vocabulary too)."""
    return train_qwen_tokenizer(_CORPUS.splitlines())


@functools.lru_cache(maxsize=None)
def build_processor(family: str):
    """Real Qwen{2,2.5,3}-VL processor, built offline with small pixel budgets.

    Cached and therefore shared between callers: do not mutate it (pass per-call
    kwargs such as ``padding_side`` instead).
    """
    spec = _PROCESSOR_SPECS[family]
    factor = spec["patch_size"] * 2  # patch_size * merge_size: one LLM token per factor^2 pixels
    common = dict(patch_size=spec["patch_size"], temporal_patch_size=2, merge_size=2, **spec["mean_std"])
    # Images: budget is per image (one frame duplicated to temporal_patch_size).
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 4 * factor**2, "longest_edge": _MAX_LLM_TOKENS_PER_IMAGE * factor**2},
        **common,
    )
    # Videos: Qwen2VL budgets per frame, Qwen3VL per whole clip (t*h*w), hence the
    # larger longest_edge. cap_pixels_per_frame=False is the current default
    # behaviour, stated explicitly to silence its deprecation warning.
    video_processor = spec["video_cls"](
        size={"shortest_edge": 4 * factor**2, "longest_edge": 4 * _MAX_LLM_TOKENS_PER_IMAGE * factor**2},
        cap_pixels_per_frame=False,
        **common,
    )
    return spec["cls"](
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        video_processor=video_processor,
        chat_template=spec["template"],
    )


def special_ids() -> dict:
    tok = build_tokenizer()
    get = tok.convert_tokens_to_ids
    return dict(
        image_token_id=get("<|image_pad|>"),
        video_token_id=get("<|video_pad|>"),
        vision_start_token_id=get("<|vision_start|>"),
        vision_end_token_id=get("<|vision_end|>"),
        eos_token_id=get("<|im_end|>"),
        endoftext_id=get("<|endoftext|>"),
        first_special_id=get(SPECIAL_TOKENS[0]),
        vocab_size=-(-len(tok) // 8) * 8,
    )


_HIDDEN, _HEADS, _KV_HEADS, _HEAD_DIM = 64, 4, 2, 16
# Sums to head_dim / 2 = 8 rotary frequencies (t, h, w).
_MROPE_SECTION = [2, 3, 3]


def _config(family: str, num_layers: int, vision_overrides: dict | None = None):
    ids = special_ids()
    text = dict(
        vocab_size=ids["vocab_size"],
        hidden_size=_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS,
        max_position_embeddings=2048,
        pad_token_id=ids["endoftext_id"],
    )
    special = dict(
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=False,
    )
    if family == "qwen2_vl":
        text.update(
            bos_token_id=ids["endoftext_id"],
            eos_token_id=ids["eos_token_id"],
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": _MROPE_SECTION},
        )
        vision = dict(
            depth=2, embed_dim=32, hidden_size=_HIDDEN, num_heads=2, mlp_ratio=2,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        )
        return Qwen2VLConfig(text_config=text, vision_config={**vision, **(vision_overrides or {})}, **special)
    if family == "qwen2_5_vl":
        text.update(
            bos_token_id=ids["endoftext_id"],
            eos_token_id=ids["eos_token_id"],
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": _MROPE_SECTION},
        )
        # window_size 56 px = 2x2 merged tokens per window (56 // merge 2 // patch 14),
        # so the 2x3-token test image spans 2 windows; block 1 uses full attention.
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=_HIDDEN,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=56, fullatt_block_indexes=[1], tokens_per_second=2,
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config={**vision, **(vision_overrides or {})}, **special)
    if family == "qwen3_vl":
        text.update(
            head_dim=_HEAD_DIM,
            rope_parameters={
                "rope_type": "default", "rope_theta": 5e6,
                "mrope_section": _MROPE_SECTION, "mrope_interleaved": True,
            },
        )
        # deepstack_visual_indexes=[0, 1]: features of vision blocks 0 and 1 are
        # added to the visual positions after LLM decoder layers 0 and 1.
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=_HIDDEN,
            patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
            num_position_embeddings=144, deepstack_visual_indexes=[0, 1],
        )
        return Qwen3VLConfig(text_config=text, vision_config={**vision, **(vision_overrides or {})}, **special)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


_MODEL_CLASSES = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}

_WEIGHT_STD = 0.15


def build_model(
    family: str,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    num_layers: int = 4,
    dtype=torch.float32,
    vision_overrides: dict | None = None,
):
    """Tiny ``*ForConditionalGeneration`` in eval mode; identical weights for a given seed. ``vision_overrides``:
    vision-config fields to change (e.g. a deeper encoder)."""
    config = _config(family, num_layers, vision_overrides)
    ids = special_ids()
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[family]._from_config(config, attn_implementation=attn_implementation)
    # Re-draw in module-registration order (deterministic); norms keep their ones/zeros.
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv3d)):
                module.weight.normal_(0.0, _WEIGHT_STD)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0.0, _WEIGHT_STD)
        # Zero logits for special and vocab-padding ids: ordinary logits are ~N(0, 1) so
        # greedy decoding never picks them. Otherwise a random model now and then emits
        # EOS (ending the comparison early) or an <|image_pad|> during decoding.
        model.lm_head.weight[ids["first_special_id"] :] = 0.0
    model.generation_config.eos_token_id = [ids["eos_token_id"], ids["endoftext_id"]]
    model.generation_config.pad_token_id = ids["endoftext_id"]
    model.generation_config.bos_token_id = ids["endoftext_id"]
    return model.to(dtype).eval()


def visual_token_ids(model) -> dict:
    return {"image": model.config.image_token_id, "video": model.config.video_token_id}


def make_image(seed: int, size=(84, 56), block: int = 14) -> PIL.Image.Image:
    """Colourful image of PIL ``size`` (width, height): random ``block``-px squares (one per patch) plus noise,
    so that different patches carry clearly different content."""
    rng = np.random.default_rng(seed)
    width, height = size
    blocks = rng.integers(0, 256, size=(-(-height // block), -(-width // block), 3), dtype=np.uint8)
    img = np.kron(blocks, np.ones((block, block, 1), dtype=np.uint8))[:height, :width]
    noise = rng.integers(-30, 31, size=img.shape)
    return PIL.Image.fromarray(np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8))


def make_video(seed: int, frames: int = 4, size=(56, 56), block: int = 14) -> np.ndarray:
    """(frames, height, width, 3) uint8 clip: a random scene drifting one block per
    frame, so consecutive frames are related but not identical."""
    rng = np.random.default_rng(seed)
    width, height = size
    scene = np.asarray(make_image(int(rng.integers(2**31)), size=(width + block * frames, height), block=block))
    return np.stack([scene[:, block * f : block * f + width] for f in range(frames)])


def _video_metadata(video: np.ndarray) -> dict:
    n = len(video)
    return {"total_num_frames": n, "fps": _VIDEO_FPS, "duration": n / _VIDEO_FPS, "frames_indices": list(range(n))}


def make_inputs(processor, kind: str, *, seed: int = 0):
    """Chat-template + processor call, as in the model cards, returning a BatchFeature
    with input_ids, attention_mask, mm_token_type_ids and the pixel/grid tensors."""
    image = {"type": "image"}
    video = {"type": "video"}

    def text(t):
        return {"type": "text", "text": t}

    images, videos = [], []
    if kind == "image":
        conversations = [[image, text("Describe this image.")]]
        images = [make_image(seed)]
    elif kind == "two_images":
        conversations = [[image, text("Compare the first image with"), image, text("the second one.")]]
        images = [make_image(seed), make_image(seed + 1, size=(112, 84))]
    elif kind == "video":
        conversations = [[video, text("What happens in the video?")]]
        videos = [make_video(seed)]
    elif kind == "image_video":
        conversations = [[image, text("Is the picture in the video?"), video]]
        images, videos = [make_image(seed)], [make_video(seed + 1)]
    elif kind == "text":
        conversations = [[text("Tell me about the quick brown fox.")]]
    elif kind == "batch":
        conversations = [
            [image, text("Describe it.")],
            [image, text("Please answer with a long and detailed explanation of what the picture shows.")],
        ]
        images = [make_image(seed), make_image(seed + 1)]
    elif kind == "ragged_batch":
        # Equal prompt lengths (no padding) but 12 vs 6 visual tokens: after pruning, sample 0 is the shorter one
        # and must be re-padded with masked slots although it had no padding of its own.
        conversations = [[image, text("Describe it.")], [image, text("Describe it, please.")]]
        images = [make_image(seed, size=(112, 84)), make_image(seed + 1)]
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
        kwargs["video_metadata"] = [_video_metadata(v) for v in videos]
    if kind in ("batch", "ragged_batch"):
        kwargs.update(padding=True, padding_side="left")
    inputs = processor(
        text=prompts,
        images=images or None,
        videos=videos or None,
        return_tensors="pt",
        # Already the class default for these processors; explicit because the
        # models need it for M-RoPE and fixtures must not silently lose it.
        return_mm_token_type_ids=True,
        **kwargs,
    )
    assert "mm_token_type_ids" in inputs, f"{type(processor).__name__} dropped mm_token_type_ids"
    return inputs
