"""Evaluate Qwen2-VL, Qwen2.5-VL and Qwen3-VL with visual-token pruning through VLMEvalKit.

    export KEEP_RATIO=0.111 PRUNE_METHOD=divprune_pre_llm
    python run_qwenvl.py --model Qwen2.5-VL-7B-Instruct --data MME

``--model`` takes VLMEvalKit's names or a local checkpoint folder; every VLMEvalKit flag passes through. See the
docs/running.md and ``python run_qwenvl.py --help``.
"""

import sys

import custom_qwenvl
import evalkit


def _wrappers() -> dict[str, type]:
    from vlmeval.vlm import Qwen2VLChat, Qwen3VLChat

    return {"qwen2_vl": Qwen2VLChat, "qwen2_5_vl": Qwen2VLChat, "qwen3_vl": Qwen3VLChat}


class QwenFixes:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.processor = evalkit.InputsOnModel(self.processor, self.model)  # Qwen2VLChat: inputs.to('cuda')


FAMILY = evalkit.Family(
    name="Qwen-VL",
    patches=custom_qwenvl,
    model_types=frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}),
    wrappers=_wrappers,
    mixin=QwenFixes,
)

if __name__ == "__main__":
    sys.exit(evalkit.main(FAMILY))
