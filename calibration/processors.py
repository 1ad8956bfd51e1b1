"""Tokenizers and processors built offline, for the calibration models and the tests' tiny models.

No Hub access: a tokenizer is trained on the spot on a few lines of text and wrapped in the real transformers
class (``Qwen2Tokenizer``, ``GemmaTokenizer``) with the released special tokens in their released order, so
``input_ids`` and the multimodal markers come out as the real pipeline lays them out, only with a small
vocabulary. The processors are the real ``*Processor`` classes around the PIL image processors.
"""

from __future__ import annotations

import json
import string

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Gemma4AudioFeatureExtractor,
    Gemma4ImageProcessorPil,
    Gemma4Processor,
    Gemma4VideoProcessor,
    GemmaTokenizer,
    Qwen2Tokenizer,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# --------------------------------------------------------------------------------------------------
# Qwen-VL
# --------------------------------------------------------------------------------------------------
# Same order as the real Qwen2/2.5/3-VL added tokens (151643..151656), so that the
# relative layout of special ids matches the released checkpoints.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Structure copied from the released Qwen2-VL-Instruct template (Qwen2.5-VL ships
# the same one): default system prompt, one <|vision_start|>PAD<|vision_end|>
# triple per image/video item, generation prompt "<|im_start|>assistant\n".
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Structure of llava-hf/llava-1.5-*-hf's template: "USER: <image>\n<text> ASSISTANT:" (images first, then the text of
# the turn, each text followed by a space; a system message's text comes first, without a role name).
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The released InternVL3-*-hf tokenizer_config's named tokens (InternVLProcessor reads them by these names).
INTERNVL_NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}

# The default system message of the released InternVL3 chat template (model.chat's and the -hf checkpoints').
INTERNVL3_SYSTEM_PROMPT = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言"
                           "模型。")

def internvl3_chat_template(system_prompt: str) -> str:
    """Structure of OpenGVLab/InternVL3-*-hf's template: a system turn with ``system_prompt`` unless the messages bring
    one, Qwen2.5-style <|im_start|> turns, "<IMG_CONTEXT>\\n" per image and "<video>\\n" per video item
    (InternVLProcessor expands each into its <img>...</img> blocks), generation prompt "<|im_start|>assistant\\n"."""
    return (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "<|im_start|>system\n" + system_prompt + "<|im_end|>\n"
        "{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
        "{% elif content['type'] == 'video' %}<video>\n"
        "{% elif content['type'] == 'text' %}{{ content['text'] }}"
        "{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


INTERNVL3_CHAT_TEMPLATE = internvl3_chat_template(INTERNVL3_SYSTEM_PROMPT)


def train_qwen_tokenizer(lines, vocab_size: int = 400) -> Qwen2Tokenizer:
    """A ``Qwen2Tokenizer`` whose byte-level BPE is trained on ``lines``, + the Qwen special tokens.

    The BPE is trained with exactly Qwen2Tokenizer's normalizer/pre-tokenizer so the
    learnt merges are valid for it; the byte alphabet guarantees any text encodes.
    """
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(lines, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # eos starts as <|endoftext|> so the specials get appended in SPECIAL_TOKENS order;
    # it is then switched to <|im_end|> as in the released Instruct tokenizers.
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tokenizer.eos_token = "<|im_end|>"
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    base = len(model["vocab"])
    assert ids == list(range(base, base + len(SPECIAL_TOKENS))), ids
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Gemma 4
# --------------------------------------------------------------------------------------------------
# Vocabulary layout follows the released tokenizer: control tokens first (<pad>=0,
# <eos>=1, <bos>=2, ..., <|turn>/<turn|> low), the byte-fallback pieces, the learnt
# pieces, and the multimodal markers at the end of the table (255999/256000 and
# 258880..258884 in the real 262144-entry vocabulary, in this relative order).
GEMMA_CONTROL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
GEMMA_CHAT_TOKENS = {
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}
GEMMA_MULTIMODAL_TOKENS = {
    "boi_token": "<|image>",
    "boa_token": "<|audio>",
    "image_token": "<|image|>",
    "audio_token": "<|audio|>",
    "eoi_token": "<image|>",
    "eoa_token": "<audio|>",
}
# Not a named tokenizer attribute in the release either: Gemma4Processor registers it
# itself (as an additional special token) when it is constructed.
GEMMA_VIDEO_TOKEN = "<|video|>"

# Structure of the released Gemma 4 instruct template (system/tools/thinking/tool-call
# branches dropped): <bos>, "<|turn>{role}\n", content items with text trimmed and one
# <|image|> / <|video|> marker per item (the processor expands each marker into the
# <|image> soft-tokens <image|> span), "<turn|>\n", generation prompt "<|turn>model\n".
GEMMA4_CHAT_TEMPLATE = r"""
{{- bos_token -}}
{%- for message in messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<|turn>' + role + '\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] | trim -}}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{- item['text'] | trim -}}
            {%- elif item['type'] == 'image' -%}
                {{- '<|image|>' -}}
            {%- elif item['type'] == 'video' -%}
                {{- '<|video|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\n' -}}
{%- endif -%}
"""

# Smallest budget the image/video processors accept (70, 140, 280, 560, 1120). Images
# are resized *up* to fill it, so every image costs close to 70 soft tokens
# (<= 70 * 3 * 3 = 630 patches of 16 px, pooled 3x3); the real video default is 70 too.
GEMMA_MAX_SOFT_TOKENS = 70
GEMMA_PATCH_SIZE = 16
GEMMA_POOLING_KERNEL_SIZE = 3

def _train_bpe(lines, vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Learnt pieces (ASCII alphabet + merges) in id order, and the merges, trained on ``lines``.

    Trained with GemmaTokenizer's own normalizer (" " -> "▁"); the training-only
    pre-tokenizer keeps merges inside "▁word" units and off punctuation/digits, like
    the released SentencePiece model, so the merges are valid for GemmaTokenizer,
    which applies them to the whole normalised string.
    """
    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("▁", behavior="merged_with_next"),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    alphabet = [c for c in string.printable if c not in " \t\r\x0b\x0c"] + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(lines, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return pieces, merges


def train_gemma_tokenizer(lines, vocab_size: int = 400) -> GemmaTokenizer:
    """Real ``GemmaTokenizer`` (BPE with byte fallback, trained on ``lines``) with the
    Gemma 4 special tokens, configured as the released instruct tokenizer (no automatic
    <bos>: the chat template writes it; left padding).

    Not cached: Gemma4Processor mutates the tokenizer it is given (it registers
    <|video|>), so only a processor's copy is shared.
    """
    pieces, merges = _train_bpe(lines, vocab_size)
    tokens = [
        *GEMMA_CONTROL_TOKENS,
        *GEMMA_CHAT_TOKENS.values(),
        *(f"<0x{b:02X}>" for b in range(256)),
        *pieces,
        *GEMMA_MULTIMODAL_TOKENS.values(),
        GEMMA_VIDEO_TOKEN,
    ]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == len(tokens), "learnt piece collides with a special token"
    return GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=False,
        padding_side="left",
        extra_special_tokens={**GEMMA_MULTIMODAL_TOKENS, **GEMMA_CHAT_TOKENS},
    )


def make_processor(tokenizer: GemmaTokenizer, patch_size: int = GEMMA_PATCH_SIZE,
                   pooling_kernel_size: int = GEMMA_POOLING_KERNEL_SIZE) -> Gemma4Processor:
    """``Gemma4Processor`` around ``tokenizer`` with the smallest soft-token budget and
    the instruct chat template; patches of ``patch_size`` px pooled ``pooling_kernel_size``
    squared per soft token (the model's vision config must say the same)."""
    vision = dict(patch_size=patch_size, max_soft_tokens=GEMMA_MAX_SOFT_TOKENS, pooling_kernel_size=pooling_kernel_size)
    # The audio feature extractor is unused here, but Gemma4Processor requires all four
    # parts. Pixels stay in [0, 1] (no normalisation, as released): the patch embedder
    # rescales them itself.
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessorPil(**vision),
        tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(**vision),
        chat_template=GEMMA4_CHAT_TEMPLATE,
        image_seq_length=GEMMA_MAX_SOFT_TOKENS,
    )


def released_rope_parameters() -> dict:
    """The released per-type RoPE (a fresh dict): default theta 1e4 on sliding layers, proportional (a quarter
    of the head rotated) theta 1e6 on full layers."""
    return {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
    }
