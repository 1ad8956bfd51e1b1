"""Which image patches each pruning method keeps, for one image and prompt, side by side (PNG).

Runs one prefill per method on a local checkpoint (or any Qwen-VL ``from_pretrained`` path) with the patches
applied, reads which visual tokens survived every stage from the model's pruning state, and dims the patches
(one LLM token = one merged patch) that were dropped.

    python scripts/kept_tokens.py --model CKPT --image IMG --prompt "What is shown?" \\
        --methods divprune_pre_llm fastv_intra_llm --ratio 0.25 --out kept_tokens.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import custom_qwenvl  # noqa: E402
import hooks  # noqa: E402
from utils import PruneConfig  # noqa: E402

PATCHES = {"qwen2_vl": custom_qwenvl, "qwen2_5_vl": custom_qwenvl, "qwen3_vl": custom_qwenvl}


def method_config(method: str | None, ratio: float) -> PruneConfig:
    return PruneConfig.from_env({"PRUNE_METHOD": method, "KEEP_RATIO": str(ratio)} if method else {})


def _inputs(processor, image: Image.Image, prompt: str):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=[image], return_tensors="pt")


def kept_masks(model, processor, image: Image.Image, prompt: str, configs: dict[str, PruneConfig]):
    """``{label: (rows, cols) bool array}``: the image's LLM tokens left after every stage of each config, and
    the image as the processor resized it."""
    if model.config.model_type not in PATCHES:
        raise ValueError(f"no pruning patches for model_type {model.config.model_type!r}; known: {sorted(PATCHES)}")
    patches = PATCHES[model.config.model_type]
    inputs = _inputs(processor, image, prompt).to(model.device)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    merge = processor.image_processor.merge_size
    image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    masks = {}
    for label, config in configs.items():
        patches.apply_patches(config)
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            patches.remove_patches()
        state = patches.pruning_state(model)
        index = None  # positions kept by all stages, composed back to the prompt's own positions
        for stage_map in ([state.pre_map] if state.pre_map else []) + state.intra_maps:
            index = hooks.compose(index, stage_map.index)
        kept = image_positions if index is None else index[0][index[0] >= 0]
        mask = torch.isin(image_positions, kept.to(image_positions.device))
        masks[label] = mask.reshape(h // merge, w // merge).cpu().numpy()
    patch = processor.image_processor.patch_size
    resized = image.convert("RGB").resize((w * patch, h * patch), Image.BICUBIC)
    return masks, resized


def render(image: Image.Image, masks: dict[str, np.ndarray], path: str | Path, scale: int = 3) -> Path:
    """One panel per label: kept patches as they are, dropped ones dimmed; count in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    fig, axes = plt.subplots(1, len(masks), figsize=(2.6 * len(masks), 2.6 * big.height / big.width + 0.5),
                             squeeze=False)
    for ax, (label, mask) in zip(axes[0], masks.items()):
        rows, cols = mask.shape
        cell = (big.width / cols, big.height / rows)
        panel = big.copy()
        shade = Image.new("RGB", big.size, (40, 40, 40))
        dropped = Image.new("L", big.size, 0)
        draw = ImageDraw.Draw(dropped)
        for r, c in zip(*np.nonzero(~mask)):
            draw.rectangle([c * cell[0], r * cell[1], (c + 1) * cell[0] - 1, (r + 1) * cell[1] - 1], fill=190)
        panel.paste(shade, mask=dropped)
        ax.imshow(panel)
        for c in range(1, cols):
            ax.axvline(c * cell[0] - 0.5, color="white", linewidth=0.4, alpha=0.6)
        for r in range(1, rows):
            ax.axhline(r * cell[1] - 0.5, color="white", linewidth=0.4, alpha=0.6)
        ax.set_title(f"{label}\n{int(mask.sum())}/{mask.size} tokens kept", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or from_pretrained name")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", default="Describe the image.")
    parser.add_argument("--methods", nargs="+", required=True, help="registered method names")
    parser.add_argument("--ratio", type=float, default=0.25, help="KEEP_RATIO of every method")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="kept_tokens.png")
    args = parser.parse_args(argv)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, device_map=args.device).eval()
    configs = {"stock": method_config(None, 1.0)}
    configs.update({f"{m} @ {args.ratio:g}": method_config(m, args.ratio) for m in args.methods})
    masks, resized = kept_masks(model, processor, Image.open(args.image), args.prompt, configs)
    print(render(resized, masks, args.out))


if __name__ == "__main__":
    main()
