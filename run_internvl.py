"""Evaluate InternVL3 (transformers' ``-hf`` checkpoints, ``InternVLForConditionalGeneration``) with visual-token
pruning through VLMEvalKit.

    export KEEP_RATIO=0.25 PRUNE_METHOD=divprune_pre_llm
    python run_internvl.py --model InternVL3-8B-hf --data MME

``--model`` takes the names registered here (``InternVL3-1B-hf`` ... ``InternVL3-78B-hf``) or a local checkpoint
folder; every VLMEvalKit flag passes through. See docs/running.md and ``python run_internvl.py --help``.

VLMEvalKit's own ``InternVL3-*`` entries (``InternVLChat``) load the original checkpoints with their remote code
(``trust_remote_code``, ``model.chat``), which the pruning hooks do not patch. :class:`InternVL_HF` loads the ``-hf``
conversion and prompts it as ``InternVLChat`` (version V2.0, its settings for InternVL3) does, so that scores compare
with VLMEvalKit's leaderboard entries for the same model:

* the question text is ``InternVLChat``'s own (``use_custom_prompt`` / ``build_prompt``, called as they are: e.g.
  multiple choice: options, then "Answer with the option's letter from the given choices directly."; MME:
  "Answer the question using a single word or phrase."; HallusionBench: "Please answer yes or no. Answer the
  question using a single word or phrase.");
* the images are placed as ``InternVLChat`` places them (``reorganize_prompt``: one image before the text,
  several as ``Image-1: <image>`` lines), inside the checkpoint's chat template (its default system message,
  ``<|im_start|>`` turns); the template writes an image as ``<IMG_CONTEXT>\\n``, which the processor expands to
  ``<img>`` + tiles x 256 ``<IMG_CONTEXT>`` + ``</img>``, as ``model.chat`` does;
* tiles: the processor's own dynamic tiling (GotOcr2 image processor: the same tile-grid choice as InternVL's
  ``dynamic_preprocess``, 448 px tiles, a thumbnail when there is more than one tile), with ``max_patches`` set per
  call to ``InternVLChat``'s ``max_num`` (``set_max_num``: 6 for most data sets, 12 / 18 / 24 for the document and
  high-resolution sets it lists, 1 per video frame, at most 64 tiles over all images of a sample). The ``-hf``
  checkpoints' processor config says 12, so without this a run would see up to twice as many tiles as
  VLMEvalKit's InternVL3 entries; ``--model-kwargs '{"max_num": N}'`` fixes another number for every data set. For
  MMMU the first image is upscaled 2x, as in ``InternVLChat``;
* greedy decoding, up to 4096 new tokens (``InternVLChat``'s default; its best-of-N, lmdeploy and GUI-grounding
  paths are not reproduced).
"""

from __future__ import annotations

import functools
import os
import re
import sys

import custom_internvl
import evalkit

IMAGE = "<image>"  # VLMEvalKit's placeholder in InternVLChat's prompts


def split_images(prompt: str, images: int) -> list[dict]:
    """``InternVLChat``'s prompt (``<image>`` placeholders) as chat-template content: text and image items in order. The
    newline after a placeholder is the template's (it writes an image as ``<IMG_CONTEXT>\\n``)."""
    pieces = prompt.split(IMAGE)
    if len(pieces) - 1 != images:
        raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE} placeholders for {images} images")
    content = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
    for piece in pieces[1:]:
        content.append({"type": "image"})
        piece = piece.removeprefix("\n")
        if piece:
            content.append({"type": "text", "text": piece})
    return content


class InternVL_HF:
    """InternVL ``-hf`` checkpoints (``InternVLForConditionalGeneration``), prompted like VLMEvalKit's ``InternVLChat``
    (version V2.0); a VLMEvalKit model as ``evalkit.vlmeval_model(InternVL_HF)`` (``_wrappers()["internvl"]``).

    Keyword arguments as ``InternVLChat``'s: ``use_custom_prompt`` (default True), ``use_mpo_prompt`` and
    ``use_postprocess`` (default False; chain-of-thought prompts follow USE_COT=1 as there), plus ``max_num`` (tiles
    per image for every data set; default: ``InternVLChat``'s per-data-set choice) and generation settings for
    ``generate`` (default: greedy, ``max_new_tokens=4096``).
    """

    INSTALL_REQ = False
    INTERLEAVE = True

    def __init__(self, model_path: str = "OpenGVLab/InternVL3-8B-hf", use_custom_prompt: bool = True,
                 use_mpo_prompt: bool = False, use_postprocess: bool = False, max_num: int | None = None, **kwargs):
        from transformers import AutoProcessor, InternVLForConditionalGeneration

        self.model_path = model_path
        self.processor = AutoProcessor.from_pretrained(model_path)
        # The runner replaces device_map and dtype with its --device / --dtype (evalkit._loading_with).
        self.model = InternVLForConditionalGeneration.from_pretrained(model_path, dtype="auto",
                                                                      device_map="auto").eval()
        # What InternVLChat's use_custom_prompt / build_prompt / set_max_num read (its cot_prompt_version "v1").
        self._use_custom_prompt = use_custom_prompt
        self.use_mpo_prompt = use_mpo_prompt
        self.use_cot = os.getenv("USE_COT") == "1"
        self.use_postprocess = use_postprocess
        self.cot_prompt = None
        self.screen_parse = True
        self.fixed_max_num = max_num
        self.kwargs = {"do_sample": False, "max_new_tokens": 4096, **kwargs}
        self.chat_kwargs = {"do_sample": False, "max_new_tokens": 512, "num_beams": 1, **kwargs}  # InternVLChat's chat

    # VLMEvalKit's InternVLChat, called as they are
    def use_custom_prompt(self, dataset):
        from vlmeval.vlm.internvl.internvl_chat import InternVLChat

        return InternVLChat.use_custom_prompt(self, dataset)

    def build_prompt(self, line, dataset=None):
        from vlmeval.vlm.internvl.internvl_chat import InternVLChat

        return InternVLChat.build_prompt(self, line, dataset)

    def set_max_num(self, dataset):
        from vlmeval.vlm.internvl.internvl_chat import InternVLChat

        InternVLChat.set_max_num(self, dataset)
        if self.fixed_max_num is not None:
            self.max_num = self.fixed_max_num

    def tiles_per_image(self, images: int) -> int:
        return max(1, min(self.max_num, self.total_max_num // max(images, 1)))

    def user_content(self, message, dataset=None) -> tuple[list[dict], list[str]]:
        """The user turn's chat-template content for a VLMEvalKit message, and the image paths in order."""
        from vlmeval.dataset import DATASET_MODALITY
        from vlmeval.vlm.internvl.utils import build_video_prompt, reorganize_prompt

        paths = [item["value"] for item in message if item["type"] == "image"]
        prompt = reorganize_prompt(message, len(paths), dataset=dataset)
        if dataset is not None and DATASET_MODALITY(dataset) == "VIDEO":
            prompt = build_video_prompt(prompt, dataset)
        return split_images(prompt, len(paths)), paths

    def _images(self, paths: list[str], upscale_first: bool = False) -> list:
        from PIL import Image

        images = []
        for index, path in enumerate(paths):
            image = Image.open(path).convert("RGB")
            if index == 0 and upscale_first:  # InternVLChat's load_image(..., upscale=True) for MMMU
                image = image.resize((image.width * 2, image.height * 2), Image.BILINEAR)
            images.append(image)
        return images

    def _generate(self, messages: list[dict], images: list, max_num: int, kwargs: dict) -> str:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=text, images=images or None, return_tensors="pt",
                                images_kwargs={"crop_to_patches": True, "min_patches": 1, "max_patches": max_num})
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)  # dtype: floating tensors only
        output = self.model.generate(**inputs, **kwargs)
        return self.processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def generate_inner(self, message, dataset=None):
        from vlmeval.smp import listinstr
        from vlmeval.vlm.internvl.internvl_chat import extract_boxed_content
        from vlmeval.vlm.internvl.utils import mpo_post_processing

        self.set_max_num(dataset)
        content, paths = self.user_content(message, dataset)
        upscale = dataset is not None and listinstr(["MMMU"], dataset)
        images = self._images(paths, upscale_first=upscale)
        response = self._generate([{"role": "user", "content": content}], images, self.tiles_per_image(len(paths)),
                                  self.kwargs)
        use_mpo_prompt = self.use_mpo_prompt and (self.use_cot or dataset in ["MMStar", "HallusionBench", "OCRBench"])
        if dataset is not None and not listinstr(["WeMath"], dataset):
            if use_mpo_prompt:
                response = mpo_post_processing(response, dataset)
            elif self.use_cot and self.use_postprocess:
                response = extract_boxed_content(response)
        return response

    def chat_inner(self, message, dataset=None):
        """Multi-turn data sets, as ``InternVLChat.chat_inner`` (V2.0): "Image1" is written "Image-1" in the questions
        and back in the answer, images in order, up to 512 new tokens."""
        from vlmeval.smp import listinstr

        self.set_max_num(dataset)
        messages, paths = [], []
        for turn in message:
            content = []
            for item in turn["content"]:
                if item["type"] == "text":
                    content.append({"type": "text", "text": re.sub(r"Image(\d+)", r"Image-\1", item["value"])})
                elif item["type"] == "image":
                    content.append({"type": "image"})
                    paths.append(item["value"])
            messages.append({"role": turn["role"], "content": content})
        upscale = dataset is not None and listinstr(["MMMU_DEV_VAL"], dataset)
        images = self._images(paths, upscale_first=upscale)
        response = self._generate(messages, images, self.max_num, self.chat_kwargs)
        return re.sub(r"Image-(\d+)", r"Image\1", response)


def _wrappers() -> dict[str, type]:
    return {"internvl": evalkit.vlmeval_model(InternVL_HF)}


# OpenGVLab's transformers-native conversions of InternVL3 (VLMEvalKit 0.0.20 registers none).
INTERNVL_HF_CHECKPOINTS = {f"InternVL3-{size}-hf": f"OpenGVLab/InternVL3-{size}-hf"
                           for size in ("1B", "2B", "8B", "14B", "38B", "78B")}


def _models() -> dict[str, functools.partial]:
    wrapper = evalkit.vlmeval_model(InternVL_HF)
    return {name: functools.partial(wrapper, model_path=path) for name, path in INTERNVL_HF_CHECKPOINTS.items()}


FAMILY = evalkit.Family(
    name="InternVL",
    patches=custom_internvl,
    model_types=frozenset({"internvl"}),
    wrappers=_wrappers,
    models=_models,
)

if __name__ == "__main__":
    sys.exit(evalkit.main(FAMILY))
