"""Tiny, offline, randomly initialised InternVL3 (``InternVLForConditionalGeneration``) model and processor.

The InternVL counterpart of ``tests/support/tiny_models.py``: the released OpenGVLab/InternVL3-*-hf layout (InternViT
with a [CLS] token, pixel-shuffle projector, Qwen2 language model built with ``AutoModel.from_config``), only tiny.

Everything is built in-process (no Hub access): a byte-level BPE tokenizer trained on a small corpus
(``calibration.processors.train_qwen_tokenizer``) plus InternVL's named special tokens (``<img>``, ``</img>``,
``<IMG_CONTEXT>``, ``<video>``, registered as the released tokenizer_config's ``extra_special_tokens`` dict registers
them), the real GotOcr2 PIL image processor (dynamic tiles plus a thumbnail), the real InternVL video processor and
the real ``InternVLProcessor``, so ``input_ids`` and ``pixel_values`` come out as the real pipeline lays them out:
an image is ``<img>`` + tiles * image_seq_length ``<IMG_CONTEXT>`` + ``</img>``, a video one such block per frame
(``Frame1: <img>...</img>``), all tiles and frames of the batch concatenated in ``pixel_values``.

Sizes: a tile is 56 x 56 px = 4 x 4 patches of 14 px, pixel-shuffled (ratio 0.5) to 2 x 2 = 4 LLM tokens. An 84 x 56
image gives 2 tiles + thumbnail (12 tokens), a 112 x 84 one 4 tiles + thumbnail (20 tokens), a 56 x 56 one 1 tile
(4 tokens, no thumbnail).

Linear / Embedding / Conv weights, the [CLS] token and the position table are re-drawn from N(0, 0.15^2): with the
default init greedy decoding collapses to a constant token and pruned-vs-unpruned comparisons would be vacuous.
"""

from __future__ import annotations

import functools

import torch
from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
)

from calibration.processors import INTERNVL_NAMED_TOKENS, SPECIAL_TOKENS, internvl3_chat_template, train_qwen_tokenizer
from tests.support.tiny_models import make_image, make_video

KINDS = ("image", "two_images", "video", "text", "batch")

NAMED_TOKENS = INTERNVL_NAMED_TOKENS  # the released tokenizer_config's (the processor reads them by these names)

_CORPUS = """\
You are InternVL, a multimodal large language model. system user assistant
Describe this image. Describe it. What is shown in the picture? What happens in the video?
Compare the first image with the second one and explain the differences in detail.
Please answer with a long and detailed explanation of what the picture shows.
Frame1: Frame2: Frame3: Frame4: 0 1 2 3 4 5 6 7 8 9
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
"""

# The released InternVL3-*-hf chat template's structure, with a short English system message (the released one is a
# longer Chinese text)
CHAT_TEMPLATE = internvl3_chat_template("You are InternVL, a multimodal large language model.")

TILE, PATCH, RATIO = 56, 14, 0.5
TOKENS_PER_TILE = int(TILE // PATCH * RATIO) ** 2
_IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])  # as released


@functools.lru_cache(maxsize=None)
def build_tokenizer():
    tokenizer = train_qwen_tokenizer(_CORPUS.splitlines())
    tokenizer.add_special_tokens({"extra_special_tokens": list(NAMED_TOKENS.values())},
                                 replace_extra_special_tokens=False)
    # What from_pretrained does with the released tokenizer_config's "extra_special_tokens" dict: the tokens become
    # attributes (tokenizer.start_image_token, tokenizer.context_image_token_id, ...).
    tokenizer._set_model_specific_special_tokens(NAMED_TOKENS)
    return tokenizer


@functools.lru_cache(maxsize=None)
def build_processor() -> InternVLProcessor:
    """Real ``InternVLProcessor`` with 56 px tiles (at most 4 + thumbnail). Cached: do not mutate it."""
    size = {"height": TILE, "width": TILE}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(size=size, crop_to_patches=True, min_patches=1, max_patches=4,
                                                 **_IMAGENET),
        tokenizer=build_tokenizer(),
        video_processor=InternVLVideoProcessor(size=size, **_IMAGENET),
        image_seq_length=TOKENS_PER_TILE,
        chat_template=CHAT_TEMPLATE,
    )


def special_ids() -> dict:
    tok = build_tokenizer()
    get = tok.convert_tokens_to_ids
    return dict(image_token_id=get(NAMED_TOKENS["context_image_token"]), eos_token_id=get("<|im_end|>"),
                endoftext_id=get("<|endoftext|>"), first_special_id=get(SPECIAL_TOKENS[0]),
                vocab_size=-(-len(tok) // 8) * 8)


def _config(num_layers: int, qk_norm: bool, vision_layers: int = 2) -> InternVLConfig:
    ids = special_ids()
    vision = dict(hidden_size=32, num_hidden_layers=vision_layers, num_attention_heads=2, intermediate_size=64,
                  image_size=TILE, patch_size=PATCH)
    if qk_norm:  # InternViT-6B (InternVL3-38B / 78B): RMS norms, q/k norms over the full width
        vision.update(use_qk_norm=True, norm_type="rms_norm")
    text = dict(model_type="qwen2", vocab_size=ids["vocab_size"], hidden_size=64, intermediate_size=128,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                bos_token_id=ids["endoftext_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["endoftext_id"],
                tie_word_embeddings=False)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids["image_token_id"],
                          image_seq_length=TOKENS_PER_TILE, downsample_ratio=RATIO, tie_word_embeddings=False)


_WEIGHT_STD = 0.15


@functools.lru_cache(maxsize=None)
def build_model(attn_implementation: str = "sdpa", num_layers: int = 4, seed: int = 0, qk_norm: bool = False,
                vision_layers: int = 2):
    """Tiny ``InternVLForConditionalGeneration`` in eval mode, float32; identical weights for a given seed. The vision
    tower is InternViT-300M-like (InternVL3-1B..14B), or with ``qk_norm`` InternViT-6B-like; ``vision_layers`` encoder
    blocks. Cached and shared: do not change it (attention implementation included)."""
    ids = special_ids()
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(_config(num_layers, qk_norm, vision_layers),
                                                          attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    embeddings = model.model.vision_tower.embeddings
    with torch.no_grad():
        for module in model.modules():  # registration order: deterministic; norms keep their ones / zeros
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d)):
                module.weight.normal_(0.0, _WEIGHT_STD)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0.0, _WEIGHT_STD)
        embeddings.cls_token.normal_(0.0, _WEIGHT_STD)
        embeddings.position_embeddings.normal_(0.0, _WEIGHT_STD)
        # Special and vocabulary-padding ids never win greedy decoding (no early EOS, no image token generated).
        model.lm_head.weight[ids["first_special_id"]:] = 0.0
    model.generation_config.eos_token_id = [ids["eos_token_id"], ids["endoftext_id"]]
    model.generation_config.pad_token_id = ids["endoftext_id"]
    model.generation_config.bos_token_id = ids["endoftext_id"]
    return model.eval()


def make_inputs(kind: str, *, seed: int = 0):
    """Chat template + processor call, as in the model cards: input_ids, attention_mask, pixel_values (every tile
    of every image and every video frame of the batch, in order)."""
    image, video = {"type": "image"}, {"type": "video"}

    def text(t):
        return {"type": "text", "text": t}

    images, videos = [], []
    if kind == "image":
        conversations = [[image, text("Describe this image.")]]
        # 84 x 56: 2 tiles + thumbnail (seed + 2: with seed's own image greedy decoding starts with a repeated token)
        images = [make_image(seed + 2)]
    elif kind == "two_images":
        conversations = [[image, text("Compare the first image with"), image, text("the second one.")]]
        images = [make_image(seed), make_image(seed + 1, size=(112, 84))]  # 3 and 5 tiles
    elif kind == "video":
        conversations = [[video, text("What happens in the video?")]]
        videos = [make_video(seed)]  # 4 frames of 56 x 56: one tile each
    elif kind == "text":
        conversations = [[text("Tell me about the quick brown fox.")]]
    elif kind == "batch":
        # Left-padded: the long prompt has the smaller image; after pruning the padding changes.
        conversations = [[image, text("Describe it.")],
                         [image, text("Please answer with a long and detailed explanation of what the picture shows.")]]
        images = [make_image(seed, size=(112, 84)), make_image(seed + 1)]
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    processor = build_processor()
    prompts = [processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True) for content in conversations]
    kwargs = dict(padding=True, padding_side="left") if len(prompts) > 1 else {}
    return processor(text=prompts, images=images or None, videos=videos or None, return_tensors="pt", **kwargs)
