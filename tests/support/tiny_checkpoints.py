"""Tiny Qwen-VL, Gemma 4, LLaVA and InternVL checkpoints in a folder, loadable offline like a downloaded one
(``from_pretrained``).

The weights are the random ones of :mod:`tests.support.tiny_models` (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``),
:mod:`tests.support.tiny_gemma` (``gemma4_e2b``, ``gemma4_dense31b``, ``gemma4_moe26b``),
:mod:`tests.support.tiny_llava` (``llava``, ``llava_next``, ``llava_onevision``) and :mod:`tests.support.tiny_internvl`
(``internvl``). ``answers`` restricts what the model can say through its saved generation config: every token but the
given letters is suppressed, so with ``max_new_tokens=1`` the model answers a multiple-choice question with one of
those letters. ``answers="A"`` rigs it to always answer A (an exactly known accuracy); ``answers="ABCD"`` gives a
random model whose letter depends on the image and prompt (the offline demo's stand-in for a trained model).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from tests.support import tiny_gemma  # noqa: E402
from tests.support import tiny_internvl  # noqa: E402
from tests.support import tiny_llava  # noqa: E402
from tests.support import tiny_models  # noqa: E402

GEMMA_PREFIX = "gemma4_"
INTERNVL = "internvl"
FAMILIES = (tiny_models.FAMILIES + tuple(GEMMA_PREFIX + variant for variant in tiny_gemma.VARIANTS)
            + tiny_llava.LLAVA_FAMILIES + (INTERNVL,))


def _build(family: str, seed: int, num_layers: int):
    """Model and processor of a family (Gemma 4 variants have their own fixed depth). The LLaVA and InternVL builders
    cache their models: those are shared, never changed here."""
    if family.startswith(GEMMA_PREFIX):
        return tiny_gemma.build_model(family.removeprefix(GEMMA_PREFIX), seed=seed), tiny_gemma.build_processor()
    if family in tiny_llava.LLAVA_FAMILIES:
        return (tiny_llava.build_model(family, seed=seed, num_layers=num_layers),
                tiny_llava.build_processor(family))
    if family == INTERNVL:
        return tiny_internvl.build_model(num_layers=num_layers, seed=seed), tiny_internvl.build_processor()
    return tiny_models.build_model(family, seed=seed, num_layers=num_layers), tiny_models.build_processor(family)


def letter_ids(tokenizer, letters: str) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(letter) for letter in letters]
    if None in ids or tokenizer.unk_token_id in ids:
        raise ValueError(f"not every letter of {letters!r} is a single token")
    return ids


def save_checkpoint(folder: str | Path, family: str = "qwen2_5_vl", answers: str | None = None, seed: int = 0,
                    num_layers: int = 4) -> Path:
    """Save model, processor (tokenizer, image and video processors, chat template) and generation config."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: allowed: {', '.join(FAMILIES)}")
    folder = Path(folder)
    model, processor = _build(family, seed, num_layers)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if answers:  # written over the saved generation config: the built model may be a shared, cached one
        allowed = set(letter_ids(processor.tokenizer, answers))
        generation_config = copy.deepcopy(model.generation_config)
        generation_config.suppress_tokens = [i for i in range(model.config.get_text_config().vocab_size)
                                             if i not in allowed]
        generation_config.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--family", default="qwen2_5_vl", choices=FAMILIES)
    parser.add_argument("--answers", default=None, help="letters the model may answer with, e.g. ABCD")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(save_checkpoint(args.folder, args.family, args.answers, args.seed))


if __name__ == "__main__":
    main()
