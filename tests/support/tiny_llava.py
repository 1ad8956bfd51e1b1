"""Tiny, offline, randomly initialised LLaVA models and processors (transformers 5.23 classes).

* ``llava``: ``LlavaForConditionalGeneration`` as LLaVA-1.5: a CLIP vision tower with a [CLS] token, features of its
  penultimate layer (``vision_feature_layer=-2``, the [CLS] dropped by the "default" strategy), a two-layer MLP
  projector and a Llama language model; one image = (84 / 14)^2 = 36 tokens.
* ``llava_next``: ``LlavaNextForConditionalGeneration`` as LLaVA-1.6 (vicuna): the same CLIP tower and Llama,
  any-resolution tiles of 84 px on the pinpoints 84x168, 168x84, 168x168 (an image = its 84 px base view + 2 or 4
  tiles), the tiles' 6 x 6 grids stitched, unpadded to the image's aspect ratio and closed by one ``image_newline``
  token per row.
* ``llava_onevision``: ``LlavaOnevisionForConditionalGeneration``: a SigLIP tower without [CLS] (strategy "full", last
  layer), a Qwen2 language model, the same tiling with ``vision_aspect_ratio="anyres_max_2"`` (a grid of more than
  1.21 * 2 tiles of tokens is bilinearly downscaled: the 2 x 2-tile image is, the 1 x 2-tile one is not), images of a
  multi-image prompt as base view + one newline, videos of 4 frames pooled to 3 x 3 tokens each + one newline.

The processors are the real ``*Processor`` classes around the PIL image processors, with a byte-level BPE tokenizer
trained on the spot (``calibration.processors.train_qwen_tokenizer``) plus the model's own special tokens, and the
structure of the released ``llava-hf`` chat templates. Weights are re-drawn from N(0, 0.15^2) (as
``tests/support/tiny_models.py`` explains: with the default init greedy decoding is constant).
"""

from __future__ import annotations

import copy
import functools

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from calibration.processors import LLAVA_15_CHAT_TEMPLATE, train_qwen_tokenizer
from tests.support.tiny_models import _CORPUS, make_image, make_video

LLAVA_FAMILIES = ("llava", "llava_next", "llava_onevision")
KINDS = ("image", "two_images", "adjacent_images", "text", "batch")
IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 84, 14  # 6 x 6 patches: 36 tokens per image

_WEIGHT_STD = 0.15


@functools.lru_cache(maxsize=None)
def build_tokenizer():
    tokenizer = train_qwen_tokenizer(_CORPUS.splitlines() + ["USER: ASSISTANT:"])
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def special_ids(family: str = "llava") -> dict:
    tok = build_tokenizer() if family != "llava_onevision" else build_onevision_tokenizer()
    first_special = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = dict(image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
               pad_token_id=first_special, first_special_id=first_special, vocab_size=-(-len(tok) // 8) * 8)
    if family == "llava_onevision":
        ids["video_token_id"] = tok.convert_tokens_to_ids(VIDEO_TOKEN)
    return ids


@functools.lru_cache(maxsize=None)
def build_processor(family: str = "llava"):
    """Cached and shared: do not mutate (pass per-call kwargs such as ``padding_side``)."""
    if family != "llava":
        return _ANYRES_PROCESSORS[family]()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN, chat_template=LLAVA_15_CHAT_TEMPLATE)


def _text_config(num_layers: int) -> LlamaConfig:
    ids = special_ids()
    return LlamaConfig(vocab_size=ids["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       pad_token_id=ids["pad_token_id"], bos_token_id=ids["pad_token_id"], eos_token_id=ids["eos_token_id"])


def _vision_config(depth: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=4,
                            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)


def config(family: str = "llava", num_layers: int = 4, vision_depth: int = 4):
    if family != "llava":
        return _anyres_config(family, num_layers, vision_depth)
    ids = special_ids()
    if family == "llava":
        return LlavaConfig(vision_config=_vision_config(vision_depth), text_config=_text_config(num_layers),
                           image_token_id=ids["image_token_id"], vision_feature_layer=-2,
                           vision_feature_select_strategy="default", image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
                           tie_word_embeddings=False)
    raise ValueError(f"unknown family {family!r}; expected one of {LLAVA_FAMILIES}")


_MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
                  "llava_onevision": LlavaOnevisionForConditionalGeneration,
                  "llava_siglip": LlavaForConditionalGeneration}


@functools.lru_cache(maxsize=None)
def build_model(family: str = "llava", attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 4,
                dtype=torch.float32):
    """Tiny model in eval mode, cached per arguments (shared between tests: do not modify it)."""
    ids = special_ids(family)
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[family]._from_config(config(family, num_layers), attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d)):
                module.weight.normal_(0.0, _WEIGHT_STD)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0.0, _WEIGHT_STD)
        for name, param in model.named_parameters():  # class embedding, position embeddings, image_newline
            if name.endswith(("class_embedding", "image_newline")):
                param.normal_(0.0, 1.0)
        model.lm_head.weight[ids["first_special_id"]:] = 0.0  # never generate special ids (see tiny_models)
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    return model.to(dtype).eval()


def make_inputs(processor, kind: str, *, seed: int = 0):
    """Chat template + processor, as in the model cards: a BatchFeature with input_ids, attention_mask, pixel_values."""
    if isinstance(processor, (LlavaNextProcessor, LlavaOnevisionProcessor)):
        return make_anyres_inputs(processor, kind, seed=seed)
    image = {"type": "image"}

    def text(t):
        return {"type": "text", "text": t}

    images, kwargs = [], {}
    if kind == "image":
        conversations = [[image, text("Describe this image.")]]
        images = [make_image(seed)]
    elif kind in ("two_images", "adjacent_images"):
        conversations = [[image, image, text("Compare the first image with the second one.")]]
        images = [make_image(seed), make_image(seed + 1, size=(112, 84))]
    elif kind == "text":
        conversations = [[text("Tell me about the quick brown fox.")]]
    elif kind == "batch":
        conversations = [[image, text("Describe it.")],
                         [image, text("Please answer with a long and detailed explanation of what the picture shows.")]]
        images = [make_image(seed), make_image(seed + 1)]
        kwargs.update(padding=True, padding_side="left")
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    prompts = [processor.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
               for c in conversations]
    if kind == "adjacent_images":  # no text between the two images: one run of placeholders, two spans
        prompts = [p.replace("<image>\n<image>", "<image><image>") for p in prompts]
    return processor(text=prompts, images=images or None, return_tensors="pt", **kwargs)


# --------------------------------------------------------------------------------------------------
# LLaVA-NeXT and LLaVA-OneVision: any-resolution tiles, image_newline tokens, (OneVision) pooled videos
# --------------------------------------------------------------------------------------------------
VIDEO_TOKEN = "<video>"
ANYRES_KINDS = ("image", "large_image", "two_images", "video", "image_video", "text", "batch")
# (height, width) in pixels, as the released configs list them; 84 px tiles of 6 x 6 patches.
GRID_PINPOINTS = [[84, 168], [168, 84], [168, 168]]
VISION_ASPECT_RATIO = "anyres_max_2"  # OneVision: a stitched grid above 1.21 * 2 * 36 tokens is downscaled
VIDEO_FRAMES = 4

# Structure of llava-hf/llava-v1.6-vicuna-7b-hf's template: "USER: <image>\n<text> ASSISTANT:" (a system message is
# written as its bare text).
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Structure of llava-hf/llava-onevision-qwen2-*-ov-hf's template: "<|im_start|>user <image><video>\n<text><|im_end|>"
# (every image first, then every video, then each text after a newline), generation prompt "<|im_start|>assistant\n".
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=None)
def build_onevision_tokenizer():
    """The shared tokenizer plus ``<video>`` (a copy: LLaVA-1.5 and LLaVA-NeXT keep theirs)."""
    tokenizer = copy.deepcopy(build_tokenizer())
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    return tokenizer


def _next_processor():
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                 image_grid_pinpoints=GRID_PINPOINTS)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH_SIZE,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token=IMAGE_TOKEN, chat_template=LLAVA_NEXT_CHAT_TEMPLATE)


def _onevision_processor():
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = LlavaOnevisionImageProcessorPil(size=size, image_grid_pinpoints=GRID_PINPOINTS)
    video_processor = LlavaOnevisionVideoProcessor(size=size)
    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=build_onevision_tokenizer(),
                                   video_processor=video_processor, num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
                                   vision_feature_select_strategy="full", image_token=IMAGE_TOKEN,
                                   video_token=VIDEO_TOKEN, vision_aspect_ratio=VISION_ASPECT_RATIO,
                                   chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)


def _siglip_llava_processor():
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="full", num_additional_image_tokens=0,
                          image_token=IMAGE_TOKEN, chat_template=LLAVA_15_CHAT_TEMPLATE)


_ANYRES_PROCESSORS = {"llava_next": _next_processor, "llava_onevision": _onevision_processor,
                      "llava_siglip": _siglip_llava_processor}

# Not in LLAVA_FAMILIES (no checkpoints, no runner): ``LlavaForConditionalGeneration`` with a SigLIP tower, as
# llava-interleave builds it (no [CLS], strategy "full", last layer): one image = 36 tokens, grid (1, 6, 6).
SIGLIP_LLAVA = "llava_siglip"


def _siglip_config(depth: int) -> SiglipVisionConfig:
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False)


def _anyres_config(family: str, num_layers: int, vision_depth: int):
    ids = special_ids(family)
    if family == "llava_next":
        return LlavaNextConfig(vision_config=_vision_config(vision_depth), text_config=_text_config(num_layers),
                               image_token_id=ids["image_token_id"], vision_feature_layer=-2,
                               vision_feature_select_strategy="default", image_grid_pinpoints=GRID_PINPOINTS,
                               image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, tie_word_embeddings=False)
    if family == SIGLIP_LLAVA:
        return LlavaConfig(vision_config=_siglip_config(vision_depth), text_config=_text_config(num_layers),
                           image_token_id=ids["image_token_id"], vision_feature_layer=-1,
                           vision_feature_select_strategy="full", image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
                           tie_word_embeddings=False)
    if family == "llava_onevision":
        vision = _siglip_config(vision_depth)
        text = Qwen2Config(vocab_size=ids["vocab_size"], hidden_size=64, intermediate_size=128,
                           num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=2048, pad_token_id=ids["pad_token_id"],
                           bos_token_id=ids["pad_token_id"], eos_token_id=ids["eos_token_id"])
        return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=ids["image_token_id"],
                                    video_token_id=ids["video_token_id"], vision_feature_layer=-1,
                                    vision_feature_select_strategy="full", image_grid_pinpoints=GRID_PINPOINTS,
                                    vision_aspect_ratio=VISION_ASPECT_RATIO, tie_word_embeddings=False)
    raise ValueError(f"unknown family {family!r}; expected one of {LLAVA_FAMILIES}")


def make_anyres_inputs(processor, kind: str, *, seed: int = 0):
    """LLaVA-NeXT / OneVision prompts (chat template + processor). Images of (width, height): 112 x 84 (1 x 2 tiles,
    unpadded to 6 x 8 tokens), 84 x 140 (2 x 1 tiles, unpadded to 10 x 6), 168 x 140 (2 x 2 tiles, unpadded to
    10 x 12; OneVision downscales it to 7 x 9). OneVision's images of one multi-image prompt are passed nested, one
    list per prompt, as its processor documents: they get the base view only."""
    onevision = isinstance(processor, LlavaOnevisionProcessor)
    image, video = {"type": "image"}, {"type": "video"}

    def text(t):
        return {"type": "text", "text": t}

    images, videos, kwargs = [], [], {}
    if kind == "image":
        conversations = [[image, text("Describe this image.")]]
        images = [make_image(seed, size=(112, 84))]
    elif kind == "large_image":
        conversations = [[image, text("Describe this image.")]]
        images = [make_image(seed, size=(168, 140))]
    elif kind == "two_images":
        conversations = [[image, image, text("Compare the first image with the second one.")]]
        images = [make_image(seed, size=(112, 84)), make_image(seed + 1, size=(84, 140))]
        if onevision:
            images = [images]
    elif kind in ("video", "image_video"):
        if not onevision:
            raise ValueError("LLaVA-NeXT takes no videos")
        videos = [make_video(seed + 1, frames=VIDEO_FRAMES, size=(IMAGE_SIZE, IMAGE_SIZE))]
        if kind == "video":
            conversations = [[video, text("What happens in the video?")]]
        else:
            conversations = [[image, video, text("Is the picture in the video?")]]
            images = [make_image(seed, size=(112, 84))]
    elif kind == "text":
        conversations = [[text("Tell me about the quick brown fox.")]]
    elif kind == "batch":
        conversations = [[image, text("Describe it.")],
                         [image, text("Please answer with a long and detailed explanation of what the picture shows.")]]
        images = [make_image(seed, size=(112, 84)), make_image(seed + 1, size=(168, 140))]
        kwargs.update(padding=True, padding_side="left")
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {ANYRES_KINDS}")
    prompts = [processor.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                             add_generation_prompt=True) for c in conversations]
    return processor(text=prompts, images=images or None, videos=videos or None, return_tensors="pt", **kwargs)
