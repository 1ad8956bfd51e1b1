"""`python -m methods [list]`: every registered method with its stage, description, default layer and
hyper-parameters. Extra method files are loaded from PRUNE_METHODS_PATH, as the runners do."""

import argparse
import os

from methods import MethodFileError, load_methods


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m methods", description=__doc__)
    parser.add_argument("command", nargs="?", default="list", choices=["list"])
    parser.parse_args(argv)
    extra = [p for p in os.environ.get("PRUNE_METHODS_PATH", "").split(os.pathsep) if p.strip()]
    try:
        registry = load_methods(extra)
    except (FileNotFoundError, MethodFileError) as err:
        raise SystemExit(f"python -m methods: error: {err}") from None
    for name, spec in registry.items():
        where = "default encoder block" if spec.stage == "vit" else "default layer"
        layer = f"  {where} {spec.default_layer}" if spec.default_layer is not None else ""
        if spec.default_schedule is not None and spec.stage == "vit":
            # Shown for LLaVA-1.5's CLIP-L (features of block 22) at KEEP_RATIO=0.5.
            stages = spec.default_schedule(22, 0.5)
            shown = ", ".join(f"{k}:{r:.3g}" for k, r in stages[:2]) + f", ..., {stages[-1][0]}:{stages[-1][1]:.3g}"
            layer = f"  default schedule (features of block 22, KEEP_RATIO=0.5) {shown}"
        elif spec.default_schedule is not None:
            # Shown for a 32-layer model at KEEP_RATIO=0.5; the layers scale with the model's depth.
            stages = ", ".join(f"{k}:{r:.3g}" for k, r in spec.default_schedule(32, 0.5))
            layer = f"  default schedule (32 layers, KEEP_RATIO=0.5) {stages}"
        count = "" if spec.exact_count else "  [count decided by the method]"
        video = "  [video: sees every frame of a video at once]" if spec.video else ""
        print(f"{name:<28} {spec.stage:<10}{layer}{count}{video}")
        print(f"    {spec.description}")
        for param in spec.params:
            print(f"    {param.env}={param.default!r}  {param.help}")


if __name__ == "__main__":
    main()
