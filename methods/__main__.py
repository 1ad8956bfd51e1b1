"""`python -m methods [list]`: every registered method with its stage, description, default layer and
hyper-parameters. Extra method files are loaded from PRUNE_METHODS_PATH, as the runners do."""

import argparse
import os

from methods import load_methods


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m methods", description=__doc__)
    parser.add_argument("command", nargs="?", default="list", choices=["list"])
    parser.parse_args(argv)
    extra = [p for p in os.environ.get("PRUNE_METHODS_PATH", "").split(os.pathsep) if p.strip()]
    for name, spec in load_methods(extra).items():
        layer = f"  default layer {spec.default_layer}" if spec.default_layer is not None else ""
        print(f"{name:<28} {spec.stage:<10}{layer}")
        print(f"    {spec.description}")
        for param in spec.params:
            print(f"    {param.env}={param.default!r}  {param.help}")


if __name__ == "__main__":
    main()
