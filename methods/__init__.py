"""Visual-token pruning methods.

Every ``*.py`` file in this folder whose name does not start with ``_`` is imported on first use, so a new
method is one new file: no import line to add anywhere. Files outside the package are loaded from the
paths given to :func:`load_methods` (the runners pass ``PRUNE_METHODS_PATH``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Iterable

from methods._base import (
    INTRA_LLM,
    PRE_LLM,
    STAGES,
    HyperParam,
    MethodSpec,
    PruneContext,
    PruneResult,
    SignalSource,
    VisionNeeds,
    VisionSignals,
    closest_names,
    register_prune,
    registered_methods,
)

__all__ = [
    "INTRA_LLM",
    "PRE_LLM",
    "STAGES",
    "HyperParam",
    "MethodSpec",
    "PruneContext",
    "PruneResult",
    "SignalSource",
    "VisionNeeds",
    "VisionSignals",
    "closest_names",
    "load_methods",
    "register_prune",
    "registered_methods",
]

_PACKAGE_DIR = Path(__file__).resolve().parent
_loaded_paths: set[Path] = set()


def _import_file(path: Path) -> None:
    module_name = f"_prune_user_methods.{path.stem}_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import pruning method file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)


def _method_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))


def load_methods(extra_paths: Iterable[str | Path] = ()) -> dict[str, MethodSpec]:
    """Import the built-in method files and any extra files or folders; return the registry."""
    for path in _method_files(_PACKAGE_DIR):
        importlib.import_module(f"methods.{path.stem}")
    for extra in extra_paths:
        path = Path(extra).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"PRUNE_METHODS_PATH entry {str(extra)!r} does not exist")
        for file in _method_files(path) if path.is_dir() else [path]:
            if file not in _loaded_paths:
                _import_file(file)
                _loaded_paths.add(file)
    return registered_methods()
