"""Evaluate Qwen2-VL, Qwen2.5-VL and Qwen3-VL with visual-token pruning through VLMEvalKit.

    export KEEP_RATIO=0.111 PRUNE_METHOD=divprune_pre_llm
    python run_qwenvl.py --model Qwen2.5-VL-7B-Instruct --data MME

``--model`` takes VLMEvalKit's names or a local checkpoint folder; every VLMEvalKit flag passes through. See the
README ("Running evaluations") and ``python run_qwenvl.py --help``.
"""

import sys

import torch

import custom_qwenvl
import evalkit


def _wrappers() -> dict[str, type]:
    from vlmeval.vlm import Qwen2VLChat, Qwen3VLChat

    return {"qwen2_vl": Qwen2VLChat, "qwen2_5_vl": Qwen2VLChat, "qwen3_vl": Qwen3VLChat}


class _InputsOnModelDevice:
    """Stands in for a wrapper's processor: a device given to its outputs' ``.to(...)`` becomes the model's.

    Qwen2VLChat moves the processed inputs with ``inputs.to('cuda')`` whatever the model's placement, which
    fails on a CPU and misplaces a model loaded on another GPU. Dtype moves and everything else are untouched.
    """

    def __init__(self, processor, model):
        self._processor, self._model = processor, model

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, *args, **kwargs):
        inputs = self._processor(*args, **kwargs)
        model, move = self._model, type(inputs).to

        def to(*args, **kwargs):
            args = [model.device if isinstance(a, (str, torch.device)) else a for a in args]
            if "device" in kwargs:
                kwargs["device"] = model.device
            return move(inputs, *args, **kwargs)

        inputs.to = to
        return inputs


class QwenFixes:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.processor = _InputsOnModelDevice(self.processor, self.model)


FAMILY = evalkit.Family(
    name="Qwen-VL",
    patches=custom_qwenvl,
    model_types=frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}),
    wrappers=_wrappers,
    mixin=QwenFixes,
)

if __name__ == "__main__":
    sys.exit(evalkit.main(FAMILY))
