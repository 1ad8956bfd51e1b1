"""Evaluate Gemma 4 with visual-token pruning through VLMEvalKit.

    export KEEP_RATIO=0.25 PRUNE_METHOD=divprune_pre_llm
    python run_gemma4.py --model Gemma4-E2B-it --data MME
    python run_gemma4.py --model Gemma4-E2B-it --data MME --max-soft-tokens 70    # native budget, no pruning

``--model`` takes VLMEvalKit's names or a local checkpoint folder; every VLMEvalKit flag passes through. See the
docs/gemma4.md and ``python run_gemma4.py --help``.
"""

import re
import sys

import custom_gemma4
import evalkit

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)  # the image-processor budgets transformers accepts
CHANNEL_MARKERS = ("<|channel>", "<channel|>")  # VLMEvalKit's extract_response_for_eval strips thoughts with them


def _wrappers() -> dict[str, type]:
    from vlmeval.vlm import Gemma4

    return {"gemma4": Gemma4}


class _GemmaProcessor(evalkit.InputsOnModel):
    """The processor, with a ``parse_response`` that VLMEvalKit's Gemma4 wrapper can use.

    The wrapper decodes the answer with its special tokens and calls ``processor.parse_response(decoded)``; with
    transformers 5.23 that raises (no ``response_template``; ``prefix=`` is required), and a parsed message dict
    would not be read anyway. Here the text loses every special token but the channel markers and comes back as
    ``{"answer": text}``: the wrapper takes ``answer``, and its ``extract_response_for_eval`` drops the thought
    channel. The wrapper's bfloat16 cast of the inputs follows the model's dtype (``InputsOnModel``).
    """

    def __init__(self, processor, model):
        super().__init__(processor, model)
        tokenizer = processor.tokenizer
        special = set(tokenizer.all_special_tokens)
        special |= {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
        longest_first = sorted(special - set(CHANNEL_MARKERS), key=len, reverse=True)
        self._special = re.compile("|".join(map(re.escape, longest_first)))

    def parse_response(self, text: str) -> dict:
        return {"answer": self._special.sub("", text)}


class GemmaFixes:
    def __init__(self, *args, max_soft_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.processor = _GemmaProcessor(self.processor, self.model)
        if max_soft_tokens is not None:  # the wrapper only sends images
            self.processor.image_processor.max_soft_tokens = max_soft_tokens


FAMILY = evalkit.Family(
    name="Gemma 4",
    patches=custom_gemma4,
    model_types=frozenset({"gemma4"}),
    wrappers=_wrappers,
    mixin=GemmaFixes,
    flags=(evalkit.FamilyFlag(
        "--max-soft-tokens", "max_soft_tokens", int, SOFT_TOKEN_BUDGETS, label="soft{}",
        help="Gemma 4's native visual-token budget per image (the image processor's max_soft_tokens); default: "
             "the checkpoint's processor config (transformers' default: 280). A lower budget is the non-pruning "
             "baseline"),),
)

if __name__ == "__main__":
    sys.exit(evalkit.main(FAMILY))
