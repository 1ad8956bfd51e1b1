"""Evaluate LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (transformers' ``llava-hf`` checkpoints) with visual-token pruning
through VLMEvalKit.

    export KEEP_RATIO=0.25 PRUNE_METHOD=divprune_pre_llm
    python run_llava.py --model llava-1.5-7b-hf --data MME
    python run_llava.py --model llava_next_vicuna_7b --data MMBench_DEV_EN
    python run_llava.py --model llava-onevision-qwen2-7b-ov-hf --data POPE

``--model`` takes VLMEvalKit's names, the names registered here, or a local checkpoint folder (its ``model_type``
picks the wrapper); every VLMEvalKit flag passes through. See docs/running.md and ``python run_llava.py --help``.

The wrappers:

* ``llava`` (LLaVA-1.5 ``-hf``): :class:`LLaVA_HF`, defined here. VLMEvalKit's ``llava_v1.5_7b`` entry (``LLaVA``)
  needs the original LLaVA package and its checkpoints; this wrapper loads ``LlavaForConditionalGeneration`` and
  builds the same prompts: VLMEvalKit's LLaVA question text for multiple choice (``LLaVA.build_prompt``: options,
  then "Answer with the option's letter from the given choices directly."), the data set's own prompt otherwise
  (Y/N sets such as MME already ask "Please answer yes or no."), LLaVA-1.5's system prompt, images padded to a
  square with the image mean as original LLaVA-1.5 does (``image_aspect_ratio="pad"``), greedy decoding with up to
  2048 new tokens. The conversation format is the checkpoint's chat template
  (``<system prompt> USER: <image>\\n<question> ASSISTANT:``).
* ``llava_next``: VLMEvalKit's ``LLaVA_Next`` (``llava_next_*`` names), which hard-codes ``.cuda()``, float16 and
  FlashAttention-2 and calls the processor as ``processor(prompt, images)``, which transformers 5 reads as
  ``images=prompt``; see :class:`LlavaFixes`.
* ``llava_onevision``: VLMEvalKit's ``LLaVA_OneVision_HF`` (``llava-onevision-qwen2-*-hf`` names), which hard-codes
  ``.to('cuda')``, float16 and ``max_new_tokens=2048`` in ``generate``; see :class:`LlavaFixes`.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import custom_llava
import evalkit

ONEVISION_KWARGS = ("model_path", "video_kwargs", "nframe")  # what LLaVA_OneVision_HF reads; the rest: generate
# LLaVA-1.5's conversation template ("llava_v1"), as VLMEvalKit's LLaVA writes it before "USER: ".
LLAVA_V1_SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
                          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


# --------------------------------------------------------------------------------------------------
# LLaVA-1.5 -hf (VLMEvalKit has no transformers wrapper for it)
# --------------------------------------------------------------------------------------------------
def expand_to_square(image, background: tuple[int, ...]):
    """Original LLaVA-1.5's ``expand2square``: the image centred on a square canvas of the background colour."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class LLaVA_HF:
    """LLaVA-1.5 ``-hf`` checkpoints (``LlavaForConditionalGeneration``), prompted like VLMEvalKit's ``LLaVA``; a
    VLMEvalKit model as ``evalkit.vlmeval_model(LLaVA_HF)`` (``_wrappers()["llava"]``).

    Keyword arguments: ``system_prompt`` (default: LLaVA-1.5's own, which VLMEvalKit's LLaVA writes first; the chat
    template renders it before ``USER:``; ``""`` leaves it out, as the llava-hf model cards do), ``pad_to_square``
    (default True: original LLaVA-1.5's image preprocessing; False gives the checkpoint's image processor alone,
    which for ``llava-hf/llava-1.5-*-hf`` centre-crops) and generation settings for ``generate`` (VLMEvalKit's
    LLaVA defaults: greedy, ``max_new_tokens=2048``).
    """

    INSTALL_REQ = False
    INTERLEAVE = True

    def __init__(self, model_path: str = "llava-hf/llava-1.5-7b-hf", system_prompt: str = LLAVA_V1_SYSTEM_PROMPT,
                 pad_to_square: bool = True, **kwargs):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.model_path = model_path
        self.processor = AutoProcessor.from_pretrained(model_path)
        # The runner replaces device_map and dtype with its --device / --dtype (evalkit._loading_with).
        self.model = LlavaForConditionalGeneration.from_pretrained(model_path, dtype="auto", device_map="auto").eval()
        self.system_prompt = system_prompt
        self.pad_to_square = pad_to_square
        self.kwargs = {"do_sample": False, "num_beams": 1, "max_new_tokens": 2048, "use_cache": True, **kwargs}

    def use_custom_prompt(self, dataset):
        from vlmeval.vlm.llava.llava import LLaVA

        return LLaVA.use_custom_prompt(self, dataset)

    def build_prompt(self, line, dataset=None):
        from vlmeval.vlm.llava.llava import LLaVA

        return LLaVA.build_prompt(self, line, dataset)

    def _image(self, path: str):
        from PIL import Image

        image = Image.open(path).convert("RGB")
        if self.pad_to_square:
            mean = self.processor.image_processor.image_mean
            image = expand_to_square(image, tuple(int(value * 255) for value in mean))
        return image

    def conversation(self, turns: list[dict]) -> tuple[list[dict], list]:
        """VLMEvalKit turns (``role``, ``content``: items with ``type`` and ``value``) as chat-template messages, and
        their images in order."""
        messages, images = [], []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        for turn in turns:
            content = []
            for item in turn["content"]:
                if item["type"] == "image":
                    content.append({"type": "image"})
                    images.append(self._image(item["value"]))
                elif item["type"] == "text":
                    content.append({"type": "text", "text": item["value"]})
                else:
                    raise ValueError(f"{type(self).__name__}: {item['type']!r} input is not supported")
            messages.append({"role": turn["role"], "content": content})
        return messages, images

    def prompt(self, turns: list[dict]) -> str:
        messages, _ = self.conversation(turns)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _answer(self, turns: list[dict]) -> str:
        messages, images = self.conversation(turns)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=prompt, images=images or None, return_tensors="pt")
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)  # dtype: floating tensors only
        output = self.model.generate(**inputs, **self.kwargs)
        return self.processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def generate_inner(self, message, dataset=None):
        return self._answer([{"role": "user", "content": message}])

    def chat_inner(self, message, dataset=None):
        return self._answer(message)


# --------------------------------------------------------------------------------------------------
# Fixes of VLMEvalKit's LLaVA_Next and LLaVA_OneVision_HF
# --------------------------------------------------------------------------------------------------
class _Processor(evalkit.InputsOnModel):
    """Inputs on the model's device and dtype (the wrappers send them to ``'cuda'`` as float16), and VLMEvalKit's
    ``processor(prompt, images)`` call order of transformers 4 (transformers 5 takes ``images`` first)."""

    def __call__(self, *args, **kwargs):
        if len(args) == 2 and isinstance(args[0], str):
            args, kwargs = (), {"text": args[0], "images": args[1], **kwargs}
        return super().__call__(*args, **kwargs)


@contextlib.contextmanager
def _kept_where_loaded():
    """While a wrapper is built, a model it loads stays where ``from_pretrained`` put it (the runner's --device,
    ``device_map``): its ``.cuda()`` / ``.to(<device>)`` return it unmoved (a dtype is still applied). The wrappers
    move the loaded model to the default GPU, which on a CPU run fails and on ``cuda:N`` or a model spread over
    several GPUs is the wrong place."""
    import torch
    from transformers import PreTrainedModel

    raw = vars(PreTrainedModel)["from_pretrained"]  # the runner's (evalkit._loading_with), restored below
    loaded = []

    def stay(model):
        move = type(model).to

        def to(*args, **kwargs):
            kwargs.pop("device", None)
            args = [a for a in args if not isinstance(a, (str, int, torch.device))]
            return move(model, *args, **kwargs) if args or kwargs else model

        return to

    @functools.wraps(raw.__func__)
    def from_pretrained(cls, *args, **kwargs):
        model = raw.__get__(None, cls)(*args, **kwargs)
        model.to = stay(model)
        model.cuda = lambda *args, **kwargs: model
        loaded.append(model)
        return model

    try:
        with evalkit._temporarily(PreTrainedModel, "from_pretrained", classmethod(from_pretrained)):
            yield
    finally:
        for model in loaded:  # the instance attributes go: the classes' own methods again
            del model.to, model.cuda


class LlavaFixes:
    """Placed before the VLMEvalKit wrapper (see ``evalkit.adapt``).

    * every wrapper: the model stays on the runner's device (:func:`_kept_where_loaded`) in the runner's dtype and
      attention implementation (``evalkit._loading_with`` replaces the wrappers' float16 and their
      ``use_flash_attention_2`` choice), and the processor's outputs follow it (:class:`_Processor`);
    * ``LLaVA_OneVision_HF``: keyword arguments other than ``model_path``, ``video_kwargs``, ``nframe`` are generation
      settings (the wrapper ignores them and calls ``generate(..., max_new_tokens=2048)``); they override its own.
    """

    def __init__(self, *args, **kwargs):
        from vlmeval.vlm import LLaVA_OneVision_HF

        generation = {}
        if isinstance(self, LLaVA_OneVision_HF):
            generation = {key: kwargs.pop(key) for key in list(kwargs) if key not in ONEVISION_KWARGS}
        with _kept_where_loaded():
            super().__init__(*args, **kwargs)
        self.processor = _Processor(self.processor, self.model)
        if generation:
            generate = self.model.generate

            @functools.wraps(generate)
            def generate_with(*args, **kwargs):
                return generate(*args, **{**kwargs, **generation})

            self.model.generate = generate_with  # an instance attribute, as the profiler's


# --------------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------------
def _wrappers() -> dict[str, type]:
    from vlmeval.vlm import LLaVA_Next, LLaVA_OneVision_HF

    return {"llava": evalkit.vlmeval_model(LLaVA_HF), "llava_next": LLaVA_Next, "llava_onevision": LLaVA_OneVision_HF}


# LLaVA-1.5 -hf names; VLMEvalKit 0.0.20 registers LLaVA-NeXT (llava_next_vicuna_7b, llava_next_mistral_7b, ...) and
# LLaVA-OneVision -hf (llava-onevision-qwen2-0.5b-ov-hf, llava-onevision-qwen2-7b-ov-hf, ...) itself.
LLAVA_HF_CHECKPOINTS = {
    "llava-1.5-7b-hf": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b-hf": "llava-hf/llava-1.5-13b-hf",
}


def _models() -> dict[str, functools.partial]:
    wrapper = evalkit.vlmeval_model(LLaVA_HF)
    return {name: functools.partial(wrapper, model_path=path) for name, path in LLAVA_HF_CHECKPOINTS.items()}


FAMILY = evalkit.Family(
    name="LLaVA",
    patches=custom_llava,
    model_types=frozenset({"llava", "llava_next", "llava_onevision"}),
    wrappers=_wrappers,
    mixin=LlavaFixes,
    models=_models,
)

if __name__ == "__main__":
    sys.exit(evalkit.main(FAMILY))
