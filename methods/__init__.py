"""Visual-token pruning methods.

Every ``*.py`` file in this folder whose name does not start with ``_`` is imported on first use, so a new
method is one new file: no import line to add anywhere. Files outside the package are loaded from the
paths given to :func:`load_methods` (the runners pass ``PRUNE_METHODS_PATH``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Iterable

from methods import _base
from methods._base import (
    INTRA_LLM,
    KV,
    PRE_LLM,
    STAGES,
    VIT,
    EncoderSignals,
    HyperParam,
    DecodeSelection,
    KVContext,
    KVMerged,
    KVSignalSource,
    MethodSpec,
    PruneContext,
    PruneResult,
    RegistrationError,
    SignalSource,
    VideoFrames,
    VisionNeeds,
    VisionSignals,
    closest_names,
    register_prune,
    registered_methods,
    stage_of,
)

__all__ = [
    "INTRA_LLM",
    "KV",
    "DecodeSelection",
    "KVContext",
    "KVMerged",
    "KVSignalSource",
    "PRE_LLM",
    "STAGES",
    "VIT",
    "EncoderSignals",
    "HyperParam",
    "MethodFileError",
    "MethodSpec",
    "PruneContext",
    "PruneResult",
    "RegistrationError",
    "SignalSource",
    "VideoFrames",
    "VisionNeeds",
    "VisionSignals",
    "closest_names",
    "load_methods",
    "register_prune",
    "registered_methods",
    "stage_of",
]

_PACKAGE_DIR = Path(__file__).resolve().parent
_loaded_paths: set[Path] = set()


class MethodFileError(ValueError):
    """A PRUNE_METHODS_PATH file that cannot be loaded; the message names the entry, the file (and line) and what
    is allowed. ``utils.PruneConfig.from_env`` turns it into a ``PruneConfigError``."""


def _line_in(err: BaseException, path: Path) -> int | None:
    """The line of ``path`` that was running when ``err`` was raised (the innermost frame in that file)."""
    lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__) if Path(frame.filename) == path]
    return lines[-1] if lines else None


def _file_error(entry: str, path: Path, err: Exception) -> MethodFileError:
    where = f"method file {path}"
    if isinstance(err, SyntaxError):
        if err.filename and Path(err.filename) != path:  # in a file the method file imports
            where += f" (importing {err.filename}, line {err.lineno})"
        elif err.lineno is not None:
            where += f", line {err.lineno}"
        reason = f"syntax error: {err.msg}"
        allowed = "a method file that is valid Python (see methods/_template.py)"
    else:
        line = _line_in(err, path)
        where += f", line {line}" if line is not None else ""
        if isinstance(err, RegistrationError):
            reason, allowed = f"register_prune refused it: {err.reason}", err.allowed
        else:
            reason = f"importing it raised {type(err).__name__}: {err}"
            allowed = "a method file that imports without error (see methods/_template.py)"
    return MethodFileError(f"PRUNE_METHODS_PATH={entry!r}: {where}: {reason}; allowed: {allowed}")


def _import_file(path: Path, entry: str) -> None:
    """Import one method file. A file that fails leaves nothing behind: no module, and none of the methods it
    registered before failing (so that a later load can import it again once it is fixed)."""
    module_name = f"_prune_user_methods.{path.stem}_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise MethodFileError(f"PRUNE_METHODS_PATH={entry!r}: cannot import {path}; allowed: Python files "
                              "(*.py) or folders of them")
    module = importlib.util.module_from_spec(spec)
    registered = set(_base._REGISTRY)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(module_name, None)
        for name in set(_base._REGISTRY) - registered:
            del _base._REGISTRY[name]
        raise _file_error(entry, path, err) from err


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
                _import_file(file, str(extra))
                _loaded_paths.add(file)
    return registered_methods()
