"""VLMEvalKit plumbing shared by the runners (``run_<family>.py``, e.g. ``run_qwenvl.py``).

A runner reads the pruning configuration from the environment once, installs its family's patches, registers
an adapted copy of VLMEvalKit's model wrapper under a name that carries the configuration, and hands the
command line over to ``vlmeval.run.main``. This module knows VLMEvalKit (flags, wrappers, output files), not
tensors; the family module (``custom_<family>.py``) is passed in by the runner. Where VLMEvalKit has no transformers
wrapper for a checkpoint, the runner defines one (:func:`vlmeval_model`) and registers names for it
(``Family.models``, added to VLMEvalKit's registry when the run starts).

What the adapter changes in a VLMEvalKit wrapper, without editing the installed package:

* device, attention implementation and dtype of ``from_pretrained`` come from the runner's flags (the wrappers
  hard-code ``device_map="auto"`` and FlashAttention-2 and assert that a GPU is present);
* the wrapper's own vLLM / LMDeploy switches are turned off: the pruning hooks patch transformers models;
* a family's own runner flags (``FamilyFlag``, e.g. Gemma 4's ``--max-soft-tokens``) become keyword arguments of
  its wrapper mixin, and so part of the run's hash and model name;
* after every generate call the family's ``last_record(model)`` (visual tokens per span and stage) is appended
  to a per-rank JSON-lines file next to the predictions;
* with METHOD_TIME / PREFILL_TIME, the model's ``generate`` is profiled (``profiling.py``): each sample's profile is
  appended to per-rank files after the sample, and rank 0 writes a summary per data set at the end of the run.

Two ways to spend less time waiting, both with the predictions of the plain path:

* ``--batch-size N``: VLMEvalKit's per-sample loop (``vlmeval.inference.infer_data``) is replaced, while the runner
  runs, by :func:`infer_data_batched`, which hands N pending samples at a time to
  :meth:`PrunedModel.generate_batch`: each sample goes through the wrapper's own code, and their ``model.generate``
  calls become one left-padded call;
* ``--configurations FILE`` (``scripts/sweep.py --in-process``): several pruning configurations in one runner
  call, one after the other, each registered under its own run name as a separate call would; a model is loaded
  by the first configuration that needs it and reused by the others (:func:`_shared_wrapper`), the family's patches
  switching the configuration in between.

Every run is written to ``WORK_DIR/<model>__<tag>__<hash>/``: ``tag`` names the stages (``stock`` without
pruning), ``hash`` covers everything that decides predictions (model source and a local checkpoint's files, pruning
configuration with hyper-parameters, wrapper keyword overrides, dtype, ``--trust-remote-code``, the transformers
release, and the code of the methods used and of the hook machinery, see :func:`run_identity`), so VLMEvalKit's silent reuse of
predictions in a run directory only ever happens between identical configurations and code.

A run never reports success without its predictions: an unusable ``--device`` or attention implementation and an
intra-LLM layer beyond the model's depth (when its config is readable locally) stop the runner with exit code 2
before VLMEvalKit starts, and after VLMEvalKit returns every data set must have a prediction for every row.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import difflib
import functools
import hashlib
import importlib.util
import json
import os
import re
import sys
import threading
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

import methods
import profiling
from utils import PruneConfig, PruneConfigError

RUN_CONFIG_FILE = "pruning_config.json"
STATUS_FILE = "status.json"  # VLMEvalKit's, per run folder
TOKENS_FILE = "visual_tokens_{dataset}.rank{rank}.jsonl"  # rank="*" globs every rank
# Skip reasons VLMEvalKit records with exit code 0 although nothing was evaluated.
FAILED_SKIPS = {"invalid_dataset", "No infer result found", "Incomplete infer result"}
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
# The hook machinery and the runner plumbing: their code decides predictions as much as a method's does.
MACHINERY_MODULES = ("hooks", "encoder_stage", "kv_stage", "patching", "utils", "evalkit")
_PRUNING_ENV_PREFIXES = ("PRUNE_", "KEEP_RATIO", "INTRA_LLM_", "VIT_", "KV_")
# The variables that select the pruning stages: each entry of --configurations (and each run of scripts/sweep.py) sets
# its own and clears the rest; method hyper-parameters pass through.
SELECTION_VARS = ("KEEP_RATIO", "PRUNE_METHOD", "PRUNE_METHOD_VIT", "PRUNE_METHOD_PRE_LLM", "PRUNE_METHOD_INTRA_LLM",
                  "VIT_LAYER_SPECS", "INTRA_LLM_LAYER_SPECS", "KV_METHOD", "KV_BUDGET")


@dataclass(frozen=True)
class FamilyFlag:
    """A runner flag of one family. Its value is checked by the parser (before anything is loaded), passed to the
    family's mixin as the keyword argument ``kwarg``, hashed with the wrapper's keyword arguments, and appended to
    the model's display name (``-<label>``), so runs with and without it are told apart in the results table."""

    flag: str  # e.g. "--max-soft-tokens"
    kwarg: str  # the mixin's keyword argument, e.g. "max_soft_tokens"
    type: Callable[[str], Any]
    choices: tuple
    help: str
    label: str  # display-name suffix, formatted with the value, e.g. "soft{}"


@dataclass(frozen=True)
class Family:
    """What a runner tells this module about its model family."""

    name: str  # shown in messages, e.g. "Qwen-VL"
    patches: ModuleType  # custom_<family>: apply_patches(config), remove_patches(), last_record(model)
    model_types: frozenset[str]  # config.model_type values the patches handle
    wrappers: Callable[[], dict[str, type]]  # model_type -> VLMEvalKit wrapper class (imported lazily)
    mixin: type | None = None  # family-specific fixes of the wrapper, placed before it in the MRO
    flags: tuple[FamilyFlag, ...] = ()  # family-specific runner flags, handled by the mixin
    # Model names the runner adds to VLMEvalKit's registry (name -> functools.partial of a wrapper, imported lazily),
    # for checkpoints VLMEvalKit has no transformers wrapper for; a name VLMEvalKit registers itself keeps its entry.
    models: Callable[[], Mapping[str, Any]] | None = None


# --------------------------------------------------------------------------------------------------
# Run naming
# --------------------------------------------------------------------------------------------------
def _ratio(value: float) -> str:
    return f"{value:g}"


def run_tag(config: PruneConfig) -> str:
    """Readable name of the pruning stages: ``stock``, ``B12-tome_vit-0.5`` (before encoder block 12),
    ``divprune_pre_llm-0.25``, ``L2-fastv_intra_llm-0.5``, ``pdrop_intra_llm-0.25`` (a method that schedules its own
    layers), or several joined with ``+``; ``+cls_substitute`` under ``CLS_SIGNAL=substitute``."""
    if not config.active:
        return "stock"
    parts = [(f"B{s.layer}-" if s.layer is not None else "") + f"{s.method}-{_ratio(s.ratio)}" for s in config.vit]
    parts += [f"{config.pre_llm.method}-{_ratio(config.pre_llm.ratio)}"] if config.pre_llm else []
    parts += [f"L{s.layer}-{s.method}-{_ratio(s.ratio)}" for s in config.intra_llm]
    if config.scheduled:
        parts.append(f"{config.scheduled.method}-{_ratio(config.scheduled.ratio)}")
    if config.kv:
        budget = _ratio(config.kv.fraction) if config.kv.fraction is not None else str(config.kv.count)
        parts.append(f"{config.kv.method}-{budget}")
    if config.cls_signal == "substitute":  # CLS_SIGNAL: the [CLS] methods read the substitute on a [CLS] encoder
        parts.append("cls_substitute")
    return "+".join(parts)


def _syntax_digest(path: str | Path) -> str:
    """Digest of a Python file's syntax tree without docstrings: edits to comments, docstrings or layout keep it,
    any change to what the code does changes it."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def _display_path(path: str) -> str:
    """A file of this repository relative to its root (stable across clones); any other file absolute."""
    root = Path(__file__).resolve().parent
    resolved = Path(path).resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(resolved)


def _is_method_module(name: str) -> bool:
    return name == "methods" or name.startswith(("methods.", "_prune_user_methods."))  # see methods.load_methods


def method_code(config: PruneConfig) -> dict[str, str]:
    """``file -> digest`` of every method module a run uses: the file of each configured method (built-in or from
    PRUNE_METHODS_PATH) and, transitively, the method modules it imports (e.g. PruMerge+ uses PruMerge's code)."""
    names = {stage.method for stage in config.stages} | ({config.scheduled.method} if config.scheduled else set())
    names |= {config.kv.method} if config.kv else set()
    registry = methods.registered_methods()
    pending = [sys.modules[registry[name].fn.__module__] for name in sorted(names)]
    seen: dict[str, ModuleType] = {}
    while pending:
        module = pending.pop()
        if module.__name__ in seen:
            continue
        seen[module.__name__] = module
        for value in vars(module).values():
            used = value if isinstance(value, ModuleType) else sys.modules.get(getattr(value, "__module__", None) or "")
            if used is not None and _is_method_module(used.__name__) and used.__name__ not in seen:
                pending.append(used)
    files = {module.__file__ for module in seen.values() if getattr(module, "__file__", None)}
    return {_display_path(file): _syntax_digest(file) for file in sorted(files)}


def machinery_code(family: Family) -> dict[str, str]:
    """``file -> digest`` of the hook machinery, the runner plumbing, the family's patches and its runner."""
    modules = [sys.modules[name] for name in MACHINERY_MODULES if name in sys.modules]
    modules.append(family.patches)
    modules.append(sys.modules[family.wrappers.__module__])  # the runner: its own wrapper classes, if any
    if family.mixin is not None:
        modules.append(sys.modules[family.mixin.__module__])
    files = {module.__file__ for module in modules if getattr(module, "__file__", None)}
    return {_display_path(file): _syntax_digest(file) for file in sorted(files)}


_FINGERPRINT_WHOLE = 2**20  # files up to this size are hashed whole; larger ones by their size and both ends


def checkpoint_fingerprint(folder: Path) -> str:
    """Digest of a local checkpoint folder's files (its top level, documentation ``*.md`` left out): each name, size and
    content, or for a file over 1 MiB its first and last MiB. Weights retrained into the same folder change it (a
    retrain changes every tensor), so their runs get new names instead of the old predictions; it reads at most 2 MiB
    of a many-GB weight shard."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix != ".md" and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= 2 * _FINGERPRINT_WHOLE:
                digest.update(f.read())
            else:
                digest.update(f.read(_FINGERPRINT_WHOLE))
                f.seek(-_FINGERPRINT_WHOLE, os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def run_identity(source: str, config: PruneConfig, wrapper_kwargs: Mapping[str, Any], dtype: str,
                 family: Family | None = None, trust_remote_code: bool = False, files: Path | None = None) -> dict:
    """Everything that decides a run's predictions (device and attention kernels aside): the model (and its files:
    :func:`checkpoint_fingerprint` of a local checkpoint folder, or of ``files``, the folder that holds a registered
    or ``--config`` model's files, e.g. its snapshot in the Hugging Face cache, :func:`local_config_dir`), the
    pruning configuration, the wrapper's keyword arguments, the dtype, whether a checkpoint's own code may run, the
    transformers release, and the code of the methods used and of the hook machinery (see :func:`method_code`,
    :func:`machinery_code`)."""
    import transformers

    identity = {"model_source": source, "pruning": config.describe(), "wrapper_kwargs": dict(wrapper_kwargs),
                "dtype": dtype, "trust_remote_code": trust_remote_code, "transformers": transformers.__version__,
                "method_code": method_code(config)}
    # ``files`` too: a new revision of a Hub model in the cache must not reuse the old one's predictions
    folder = Path(source) if source and Path(source).is_dir() else files
    if folder is not None:
        identity["checkpoint_files"] = checkpoint_fingerprint(folder)
    if family is not None:
        identity["machinery_code"] = machinery_code(family)
    return identity


def run_name(base: str, config: PruneConfig, identity: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{base}__{run_tag(config)}__{digest}"


# --------------------------------------------------------------------------------------------------
# Loading and recording inside VLMEvalKit's wrappers
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadSettings:
    device: str  # "cpu", "cuda" (all visible GPUs, device_map="auto") or "cuda:N"
    attn_implementation: str
    dtype: str  # "auto" keeps the checkpoint's
    trust_remote_code: bool = False  # let a checkpoint's own Python code run (transformers' auto_map)

    @staticmethod
    def check_flags(device: str, attn_implementation: str | None) -> None:
        """The flags' spelling, before anything heavy is imported (availability: :meth:`resolve`)."""
        if not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
            raise RunnerError(f"--device {device!r}: unknown device; allowed: auto, cpu, cuda, cuda:N")
        if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise RunnerError(f"--attn-implementation {attn_implementation!r}: unknown attention implementation; "
                              f"allowed: {', '.join(ATTN_IMPLEMENTATIONS)}")

    @classmethod
    def resolve(cls, device: str, attn_implementation: str | None, dtype: str,
                trust_remote_code: bool = False) -> "LoadSettings":
        """The settings a model is loaded with; refuses a device this machine lacks and a kernel it cannot run, so
        that a run never "succeeds" without predictions."""
        import torch

        cls.check_flags(device, attn_implementation)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise RunnerError(f"--device {device}: CUDA is not available on this machine "
                                  f"(torch.cuda.is_available() is False); allowed: cpu")
            if ":" in device and int(device.split(":")[1]) >= count:
                raise RunnerError(f"--device {device}: this process sees {count} GPU(s); allowed: cuda, "
                                  f"cuda:0..cuda:{count - 1} or cpu")
        flash_installed = importlib.util.find_spec("flash_attn") is not None
        if attn_implementation is None:
            attn_implementation = "flash_attention_2" if device.startswith("cuda") and flash_installed else "sdpa"
        if attn_implementation == "flash_attention_2":
            if not flash_installed:
                raise RunnerError("--attn-implementation flash_attention_2: the flash-attn package is not installed "
                                  "(pip install flash-attn --no-build-isolation); allowed here: eager, sdpa")
            if not device.startswith("cuda"):
                raise RunnerError(f"--attn-implementation flash_attention_2 needs a CUDA device (--device {device}); "
                                  f"allowed here: eager, sdpa")
        return cls(device, attn_implementation, dtype, trust_remote_code)

    def from_pretrained_kwargs(self) -> dict:
        return {"device_map": "auto" if self.device == "cuda" else self.device,
                "attn_implementation": self.attn_implementation, "dtype": self.dtype,
                "trust_remote_code": self.trust_remote_code}


@contextlib.contextmanager
def _temporarily(owner, name: str, value):
    """Set a module or class attribute for the duration of a block (a class's own descriptor is restored)."""
    original = vars(owner)[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def _gloo_for_nccl():
    """Under torchrun, VLMEvalKit's run.py calls ``dist.init_process_group(backend='nccl')``, which needs a GPU; for a
    CPU run the backend becomes gloo. run.py looks the function up on the module (``import torch.distributed as
    dist`` inside ``run_local_mode``), so the module attribute is patched while it runs; its barriers, the merge of
    the per-rank prediction pickles and ``destroy_process_group`` work on gloo as they are (nothing else on that
    path needs CUDA: ``torch.cuda.empty_cache()`` after each sample is a no-op without one). One thread per process
    needs nothing here: torchrun sets OMP_NUM_THREADS=1 and torch sizes its thread pool from it."""
    import torch.distributed as dist

    original = dist.init_process_group

    def init_process_group(backend=None, *args, **kwargs):
        return original("gloo" if backend == "nccl" else backend, *args, **kwargs)

    with _temporarily(dist, "init_process_group", functools.wraps(original)(init_process_group)):
        yield


@contextlib.contextmanager
def _temporarily_env(name: str, value: str | None):
    """``os.environ[name]`` set to ``value`` (absent where None) for the duration of a block, then as it was: for
    the settings VLMEvalKit itself reads from the environment."""
    saved = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if saved is not None:
            os.environ[name] = saved


class InputsOnModel:
    """Stands in for a wrapper's processor: a device or dtype given to its outputs' ``.to(...)`` becomes the model's.

    VLMEvalKit's wrappers hard-code both: Qwen2VLChat moves the inputs with ``inputs.to('cuda')`` whatever the
    model's placement (fails on a CPU, misplaces a model loaded on another GPU); Gemma4 casts them with
    ``dtype=torch.bfloat16`` whatever the model's dtype (a float32 model would see its pixel values rounded to
    bfloat16). Everything else is the processor's own.
    """

    def __init__(self, processor, model):
        self._processor, self._model = processor, model

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, *args, **kwargs):
        return self._on_model(self._processor(*args, **kwargs))

    def apply_chat_template(self, *args, **kwargs):
        return self._on_model(self._processor.apply_chat_template(*args, **kwargs))

    def _on_model(self, inputs):
        import torch

        if not hasattr(inputs, "to"):  # a prompt string (tokenize=False)
            return inputs
        model, move = self._model, type(inputs).to

        def on_model(value):
            if isinstance(value, (str, torch.device)):
                return model.device
            return model.dtype if isinstance(value, torch.dtype) else value

        def to(*args, **kwargs):
            return move(inputs, *map(on_model, args), **{key: on_model(v) for key, v in kwargs.items()})

        inputs.to = to
        return inputs


def sample_key(message) -> str:
    """Identifies a VLMEvalKit sample by a hash of its message (records of a resumed run can be de-duplicated)."""
    return hashlib.sha1(json.dumps(message, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TokenLog:
    """Appends the visual-token record of every generate call to ``visual_tokens_<dataset>.rank<r>.jsonl``.

    One file per rank, so torchrun processes never write the same file; ``key`` is :func:`sample_key`.
    """

    run_dir: Path
    rank: int

    def path(self, dataset: str) -> Path:
        return self.run_dir / TOKENS_FILE.format(dataset=dataset, rank=self.rank)

    def write(self, dataset: str | None, message, record, row: int = 0) -> None:
        """``record``: the last prefill's; ``row``: the sample's row in it (a batched generate call's record holds
        every sample of the batch)."""
        kv = {str(layer): {"before": n["before"][row], "after": n["after"][row]} for layer, n in record.kv_layers.items()}
        record = replace(record, spans=[record.spans[row]])
        cached = record.cached[row] if record.cached else None
        line = {"dataset": dataset, "key": sample_key(message), "tokens": record.totals(),
                "spans": record.as_dict()[0], **({"kv_cache": kv} if kv else {}),
                **({"cached_tokens_per_layer": sum(cached) / len(cached)} if cached else {})}
        with open(self.path(dataset or "unknown"), "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


@dataclass(frozen=True)
class ModelRun:
    """What an adapted wrapper receives from the runner (a Python object, through its constructor)."""

    family: Family
    load: LoadSettings
    tokens: TokenLog
    profile: profiling.ProfileLog | None = None  # METHOD_TIME / PREFILL_TIME


class PrunedModel:
    """Placed in front of a VLMEvalKit wrapper class (see :func:`adapt`)."""

    _wrapper: type  # the VLMEvalKit class this adapter derives from

    def __init__(self, *args, pruning_run: ModelRun, **kwargs):
        for switch in ("use_vllm", "use_lmdeploy"):  # other engines would bypass the transformers hooks
            if kwargs.get(switch):
                kwargs[switch] = False
        module = sys.modules[self._wrapper.__module__]
        with contextlib.ExitStack() as stack:
            if not pruning_run.load.device.startswith("cuda") and hasattr(module, "get_gpu_memory"):
                # The wrapper asserts that nvidia-smi reports free GPU memory; the runner places the model itself.
                stack.enter_context(_temporarily(module, "get_gpu_memory", lambda: [1]))
            stack.enter_context(_loading_with(pruning_run.load.from_pretrained_kwargs()))
            super().__init__(*args, **kwargs)
        model_type = self.model.config.model_type
        if model_type not in pruning_run.family.model_types:
            raise TypeError(f"{type(self.model).__name__} (model_type {model_type!r}) is not handled by the "
                            f"{pruning_run.family.name} pruning patches; handled: "
                            f"{', '.join(sorted(pruning_run.family.model_types))}")
        self._pruning_run: ModelRun | None = None
        self._unprofiled_generate = self.model.generate
        self.generate_calls = 0  # the model.generate calls generate_batch has made
        # A video wrapper's own frame sampling (e.g. Qwen2VLChat's nframe / fps), which VLMEvalKit overwrites with a
        # video data set's: see restore_video_sampling.
        self._video_sampling = {name: getattr(self, name) for name in ("nframe", "fps") if hasattr(self, name)}
        self.use_run(pruning_run)

    def restore_video_sampling(self) -> None:
        """The wrapper's frame sampling as constructed. VLMEvalKit's video inference sets a video wrapper's ``nframe``
        / ``fps`` from the data set it runs, and decides from their current values, so a data set sampled by
        ``nframe`` after one sampled by ``fps`` (or the reverse) in the same process would get neither and fall back
        to the wrapper's library default: restored before every video data set and every reuse of this model."""
        for name, value in self._video_sampling.items():
            setattr(self, name, value)

    def use_run(self, pruning_run: ModelRun) -> None:
        """Record the visual tokens (and profile, with METHOD_TIME / PREFILL_TIME) into ``pruning_run``'s folder:
        at construction, and again for each configuration of an in-process sweep that reuses this loaded model
        (the family's patches carry the pruning configuration itself)."""
        self.restore_video_sampling()
        if self._pruning_run is not None and self._pruning_run.profile:
            self.model.generate = self._unprofiled_generate  # the previous run's profiler goes
        self._pruning_run = pruning_run
        if pruning_run.profile:
            pruning_run.profile.profiler.instrument(self.model)

    def generate_inner(self, message, dataset=None):
        last_record = self._pruning_run.family.patches.last_record
        before = last_record(self.model)
        try:
            response = super().generate_inner(message, dataset)
        finally:
            if self._pruning_run.profile:  # after the sample, outside every timed region
                self._pruning_run.profile.write(dataset, sample_key(message))
        record = last_record(self.model)
        if record is not None and record is not before:  # a new prefill happened
            row = getattr(threading.current_thread(), "row", None) or 0  # in generate_batch: the sample's row
            self._pruning_run.tokens.write(dataset, message, record, row)
        return response

    def generate_batch(self, messages: list, dataset=None) -> list:
        """``[self.generate(message, dataset) for message in messages]``, with one ``model.generate`` call for the
        messages whose inputs fit one batch. Returns, in order, each sample's answer or the exception it raised.

        Each message goes through VLMEvalKit's whole ``generate`` (its input checks, the wrapper's prompt, processor,
        decoding and post-processing, this adapter's token record) in a thread of its own (:class:`_SampleThread`);
        the threads run one at a time, each up to its ``model.generate`` call. Those calls are grouped by what they
        must share (:func:`_batch_signature`: generation settings, the shapes of image tensors past the first dim),
        each group is left-padded into one call (:func:`_collate`), and each thread gets its row back as its own
        call would have returned it (:func:`_own_output`), then finishes. A group whose batched call raises is
        generated again one sample at a time, so that an error belongs to its sample.
        """
        samples = [_SampleThread(functools.partial(self.generate, message, dataset)) for message in messages]
        real = self.model.generate

        def generate(*args, **kwargs):  # the model's generate while the batch runs
            thread = threading.current_thread()
            if isinstance(thread, _SampleThread) and thread.row is None:
                return thread.pause_at_generate(args, kwargs)
            return real(*args, **kwargs)  # a second call of the same sample: alone

        with _instance_attribute(self.model, "generate", generate):
            try:
                for sample in samples:
                    sample.advance()
                groups: dict[Any, list[_SampleThread]] = {}
                for sample in samples:
                    if sample.paused:
                        signature = _batch_signature(*sample.paused)
                        groups.setdefault(id(sample) if signature is None else signature, []).append(sample)
                for group in groups.values():
                    self._generate_group(real, group)
            finally:
                for sample in samples:  # only after an error of the adapter itself
                    if sample.paused:
                        sample.advance(RuntimeError("generate_batch stopped before this sample was generated"))
        return [sample.error if sample.error is not None else sample.result for sample in samples]

    def _generate_group(self, real: Callable, group: list[_SampleThread]) -> None:
        """One generate call for the paused samples of ``group``; each gets its output (or the error) and finishes."""
        self.generate_calls += 1
        if len(group) == 1:
            args, kwargs = group[0].paused
            try:
                output = real(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - raised in the sample's own thread
                group[0].advance(err)
            else:
                group[0].advance((0, output))
            return
        calls = [sample.paused[1] for sample in group]
        batch = _collate(calls, _pad_id(self.model))
        try:
            output = real(**batch)
        except Exception:  # noqa: BLE001 - each sample alone: the error is its own, or there is none
            for sample in group:
                self._generate_group(real, [sample])
            return
        end_ids = _end_ids(self.model, calls[0])
        for row, (sample, call) in enumerate(zip(group, calls)):
            sample.advance((row, _own_output(output, row, batch["input_ids"].shape[1], call["input_ids"], end_ids)))


# --------------------------------------------------------------------------------------------------
# Batched generation (--batch-size)
# --------------------------------------------------------------------------------------------------
# Inputs of a generate call with one entry per token: left-padded in a batch (input_ids with the pad token, the others
# with 0). Every other tensor lists the sample's images, videos or patches along its first dim and is concatenated, as
# the processors do for a batch.
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
# generate() arguments with which a call is generated alone: per-call state, or outputs other than one row per sample.
UNBATCHED_ARGS = ("inputs_embeds", "past_key_values", "return_dict_in_generate", "num_return_sequences")


@contextlib.contextmanager
def _instance_attribute(obj, name: str, value):
    """Set an instance attribute for the duration of a block; one the instance had before is restored."""
    had, saved = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, saved)
        else:
            delattr(obj, name)


class _SampleThread(threading.Thread):
    """One sample of :meth:`PrunedModel.generate_batch`: ``call`` in a thread of its own, paused at its first
    ``model.generate`` call until its group has been generated. The caller runs one thread at a time
    (:meth:`advance` returns when the thread has paused or finished), so nothing runs concurrently."""

    def __init__(self, call: Callable):
        super().__init__(daemon=True)
        self.call = call
        self.paused: tuple[tuple, dict] | None = None  # (args, kwargs) of its generate call, while paused there
        self.row: int | None = None  # its row in the generate call it took part in
        self.result = self.error = None
        self._answer = None
        self._stopped, self._resume = threading.Event(), threading.Event()

    def run(self) -> None:
        try:
            self.result = self.call()
        except BaseException as err:  # noqa: BLE001 - handed to the caller with the sample
            self.error = err
        finally:
            self._stopped.set()

    def advance(self, answer: tuple[int, Any] | BaseException | None = None) -> None:
        """Start the thread (``answer`` None) or resume it from its generate call with ``answer`` (``(row,
        output)`` to return, or an exception to raise); returns when it pauses again or finishes."""
        self._stopped.clear()
        if answer is None:
            self.start()
        else:
            self._answer, self.paused = answer, None
            self._resume.set()
        self._stopped.wait()

    def pause_at_generate(self, args: tuple, kwargs: dict):
        """In this thread, instead of ``model.generate``: wait for the batch, then return this sample's output."""
        self.paused = (args, kwargs)
        self._stopped.set()
        self._resume.wait()
        if isinstance(self._answer, BaseException):
            self.row = -1
            raise self._answer
        self.row, output = self._answer
        return output


def _batch_signature(args: tuple, kwargs: dict):
    """What generate calls must share to be batched (every setting, and the shape past the first dim, dtype and
    device of every tensor that is not per token), or None for a call that is generated alone."""
    import torch

    ids = kwargs.get("input_ids")
    if (args or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1
            or "attention_mask" not in kwargs or any(name in kwargs for name in UNBATCHED_ARGS)):
        return None
    signature = []
    for key, value in sorted(kwargs.items()):
        if not isinstance(value, torch.Tensor):
            signature.append((key, repr(value)))  # an object without a value repr (a streamer, ...) stays alone
        elif key in TOKEN_INPUTS:
            if value.shape != ids.shape:
                return None
            signature.append((key, value.dtype, value.device))
        elif value.dim() == 0:
            return None
        else:
            signature.append((key, tuple(value.shape[1:]), value.dtype, value.device))
    return tuple(signature)


def _collate(calls: list[dict], pad_id: int) -> dict:
    """One batch of single-sample generate calls with the same :func:`_batch_signature`: per-token inputs
    left-padded to the longest prompt, other tensors concatenated along their first dim, settings as they are."""
    import torch
    import torch.nn.functional as F

    length = max(call["input_ids"].shape[1] for call in calls)
    batch = {}
    for key, value in calls[0].items():
        if key in TOKEN_INPUTS:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.cat([F.pad(call[key], (length - call[key].shape[1], 0), value=fill) for call in calls])
        elif isinstance(value, torch.Tensor):
            batch[key] = torch.cat([call[key] for call in calls])
        else:
            batch[key] = value
    return batch


def _ids(value) -> list[int]:
    return [] if value is None else [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _pad_id(model) -> int:
    config = model.generation_config
    return (_ids(config.pad_token_id) or _ids(config.eos_token_id) or [0])[0]


def _end_ids(model, kwargs: dict) -> list[int]:
    """The end-of-sequence tokens of a generate call: its own ``eos_token_id``, else its generation config's."""
    if kwargs.get("eos_token_id") is not None:
        return _ids(kwargs["eos_token_id"])
    return _ids(getattr(kwargs.get("generation_config") or model.generation_config, "eos_token_id", None))


def _own_output(output, row: int, padded_length: int, prompt, end_ids: list[int]):
    """Row ``row`` of a batched generate's output as the sample's own call returns it: its prompt without the
    padding, then its new tokens up to and including the first end-of-sequence token (a batch goes on until every
    row has finished, writing pad tokens after a finished row's end)."""
    import torch

    new = output[row, padded_length:]
    if end_ids:
        ends = torch.isin(new, torch.tensor(end_ids, device=new.device)).nonzero()
        if len(ends):
            new = new[:int(ends[0, 0]) + 1]
    return torch.cat([prompt, new[None].to(prompt.device)], dim=1)


def _build_prompt(model, dataset, row):
    """A sample's message, chosen as VLMEvalKit's ``infer_data`` chooses it."""
    if getattr(dataset, "force_use_dataset_prompt", False):
        return dataset.build_prompt(row)
    if hasattr(model, "use_custom_prompt") and model.use_custom_prompt(dataset.dataset_name):
        return model.build_prompt(row, dataset=dataset.dataset_name)
    return dataset.build_prompt(row)


def infer_data_batched(model, model_name, work_dir, dataset, out_file, verbose=False, api_nproc=4, use_vllm=False,
                       retry_failed=True, *, batch_size: int, original: Callable):
    """VLMEvalKit's ``vlmeval.inference.infer_data`` with the pending samples generated ``batch_size`` at a time
    (:meth:`PrunedModel.generate_batch`); in its place while a runner runs with ``--batch-size`` > 1.

    As VLMEvalKit does it: the predictions of an earlier run (``*_PREV.pkl`` and the rank's ``out_file``) are kept
    and only the missing samples generated (none: the model is not even built); each rank takes every
    ``WORLD_SIZE``-th row; the message comes from the data set's or the wrapper's ``build_prompt``; with
    ``SKIP_ERR=1`` a sample whose generation raises a RuntimeError gets VLMEvalKit's failure answer (otherwise the
    error stops the data set); the rank's predictions are dumped to ``out_file`` every 10 samples and at the end. A
    model that is not one of the runner's (an API model) goes through VLMEvalKit's own loop."""
    import torch
    from tqdm import tqdm
    from vlmeval.config import supported_VLM
    from vlmeval.smp import dump, get_logger, get_rank_and_world_size, load

    dataset_name = dataset.dataset_name
    prev_file = f"{work_dir}/{model_name}_{dataset_name}_PREV.pkl"
    res = load(prev_file) if os.path.exists(prev_file) else {}
    if os.path.exists(out_file):
        res.update(load(out_file))
    rank, world_size = get_rank_and_world_size()
    data = dataset.data.iloc[list(range(rank, len(dataset), world_size))]
    data_indices = list(data["index"])
    pending = data[~data["index"].isin(res)]
    if len(pending) == 0:
        dump({k: res[k] for k in data_indices}, out_file)
        return model
    if isinstance(model, str):
        vllm_names = ("Llama-4", "Qwen2-VL", "Qwen2.5-VL")  # VLMEvalKit passes use_vllm to these (refused here)
        kwargs = {"use_vllm": use_vllm} if any(name in model_name for name in vllm_names) else {}
        with _temporarily_env("WORLD_SIZE", None):  # as VLMEvalKit: no tensor parallelism under torchrun
            model = supported_VLM[model_name](**kwargs)
    if not isinstance(model, PrunedModel):
        return original(model=model, model_name=model_name, work_dir=work_dir, dataset=dataset, out_file=out_file,
                        verbose=verbose, api_nproc=api_nproc, use_vllm=use_vllm, retry_failed=retry_failed)
    model.set_dump_image(dataset.dump_image)

    skip_errors = os.environ.get("SKIP_ERR", False) == "1"
    rows = [pending.iloc[i] for i in range(len(pending))]
    calls_before, done = model.generate_calls, 0
    for first in tqdm(range(0, len(rows), batch_size), unit="batch",
                      desc=f"Infer {model_name}/{dataset_name}, Rank {rank}/{world_size}, batch size {batch_size}"):
        chunk = rows[first:first + batch_size]
        answers = model.generate_batch([_build_prompt(model, dataset, row) for row in chunk], dataset_name)
        torch.cuda.empty_cache()
        for row, answer in zip(chunk, answers):
            if isinstance(answer, BaseException):
                if not (skip_errors and isinstance(answer, RuntimeError)):
                    raise answer
                warnings.warn(f"{type(answer)} {answer}")
                answer = f"Failed to obtain answer: {type(answer)} {answer}"
            if verbose:
                print(answer, flush=True)
            res[row["index"]] = answer
            done += 1
            if done % 10 == 0:
                dump(res, out_file)
    get_logger("evalkit").info(f"{model_name} x {dataset_name}: {done} samples in "
                               f"{model.generate_calls - calls_before} generate calls (--batch-size {batch_size})")
    dump({k: res[k] for k in data_indices}, out_file)
    return model


def _one_sample_at_a_time(job: Callable, kind: str) -> Callable:
    """VLMEvalKit's inference job for ``kind`` data sets, which keeps its own per-sample loop, with a note."""

    @functools.wraps(job)
    def run(*args, **kwargs):
        from vlmeval.smp import get_logger

        get_logger("evalkit").warning(f"--batch-size: {kind} data sets are generated one sample at a time")
        return job(*args, **kwargs)

    return run


def _video_sampling_per_data_set(vlmeval_run: ModuleType):
    """While VLMEvalKit runs: a runner's model starts every video data set with its own frame sampling
    (:meth:`PrunedModel.restore_video_sampling`), which VLMEvalKit then sets from the data set."""
    job = vlmeval_run.infer_data_job_video

    @functools.wraps(job)
    def run(model, *args, **kwargs):
        if isinstance(model, PrunedModel):
            model.restore_video_sampling()
        return job(model, *args, **kwargs)

    return _temporarily(vlmeval_run, "infer_data_job_video", run)


@contextlib.contextmanager
def _batched_inference(vlmeval_run: ModuleType, batch_size: int):
    """While VLMEvalKit runs: image (and text) data sets through :func:`infer_data_batched`; video and multi-turn
    data sets one sample at a time, as before, with a note in the log."""
    import vlmeval.inference

    batched = functools.partial(infer_data_batched, batch_size=batch_size, original=vlmeval.inference.infer_data)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_temporarily(vlmeval.inference, "infer_data", batched))
        for name, kind in (("infer_data_job_video", "video"), ("infer_data_job_mt", "multi-turn")):
            stack.enter_context(_temporarily(vlmeval_run, name, _one_sample_at_a_time(getattr(vlmeval_run, name), kind)))
        yield


# transformers' loaders that run a checkpoint's own code (an ``auto_map`` in its config files) when asked to: the
# Auto classes (``_BaseAutoModelClass`` for every AutoModel*). Their ``trust_remote_code`` becomes the runner's.
_AUTO_LOADERS = ("_BaseAutoModelClass", "AutoConfig", "AutoFeatureExtractor", "AutoImageProcessor", "AutoProcessor",
                 "AutoTokenizer", "AutoVideoProcessor")


def _with_kwargs(cls: type, overrides: dict) -> classmethod:
    """``cls.from_pretrained`` with ``overrides`` replacing the caller's keyword arguments."""
    raw = cls.__dict__["from_pretrained"]

    def from_pretrained(klass, *args, **kwargs):
        kwargs.pop("torch_dtype", None)  # the wrappers' old spelling of dtype
        kwargs.pop("use_flash_attention_2", None)  # ... and of the attention implementation (a TypeError in 5.x)
        return raw.__func__(klass, *args, **{**kwargs, **overrides})

    return classmethod(functools.wraps(raw.__func__)(from_pretrained))


@contextlib.contextmanager
def _loading_with(overrides: dict):
    """While a wrapper builds its model and processor: ``from_pretrained`` uses the runner's device, attention, dtype
    and ``trust_remote_code``. VLMEvalKit's Gemma4 wrapper passes ``trust_remote_code=True``, which would import
    Python files named by a checkpoint's ``auto_map``; here it is the runner's setting (off unless
    ``--trust-remote-code``) for every loader the wrapper reaches."""
    import transformers
    from transformers import PreTrainedModel
    from transformers.models.auto import auto_factory

    trust = {"trust_remote_code": overrides["trust_remote_code"]}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_temporarily(PreTrainedModel, "from_pretrained", _with_kwargs(PreTrainedModel, overrides)))
        for name in _AUTO_LOADERS:
            cls = getattr(auto_factory, name, None) or getattr(transformers, name)
            stack.enter_context(_temporarily(cls, "from_pretrained", _with_kwargs(cls, trust)))
        yield


@functools.lru_cache(maxsize=None)
def vlmeval_model(body: type) -> type:
    """A runner's own wrapper class ``body`` as a VLMEvalKit model: a subclass of ``vlmeval.vlm.base.BaseModel`` with
    the same name, built on first use, so that importing the runner does not import VLMEvalKit (slow, and run only
    after the pruning configuration is checked)."""
    from vlmeval.vlm.base import BaseModel

    return type(body.__name__, (body, BaseModel), {"__module__": body.__module__, "__qualname__": body.__qualname__,
                                                    "__doc__": body.__doc__})


@functools.lru_cache(maxsize=None)
def adapt(wrapper: type, mixin: type | None = None) -> type:
    """``Pruned<Wrapper>``: the adapter, then the family's fixes, then VLMEvalKit's wrapper."""
    bases = (PrunedModel,) + ((mixin,) if mixin else ()) + (wrapper,)
    return type(f"Pruned{wrapper.__name__}", bases, {"_wrapper": wrapper})


# --------------------------------------------------------------------------------------------------
# Resolving --model / --config entries
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelEntry:
    base: str  # display name (registry name or checkpoint folder name)
    source: str  # "vlmeval:<name>", "config:<json>" or the checkpoint's absolute path
    wrapper: type
    kwargs: dict = field(default_factory=dict)


class RunnerError(Exception):
    """A problem with the runner's input, reported before VLMEvalKit starts."""


def _family_wrappers(family: Family) -> tuple[type, ...]:
    return tuple(sorted(set(family.wrappers().values()), key=lambda cls: cls.__name__))


def register_models(family: Family, supported: dict[str, Any]) -> list[str]:
    """Add the family's own model names (``Family.models``) to VLMEvalKit's registry ``supported``; a name already
    there keeps its entry. Returns the names added."""
    added = []
    for name, entry in (family.models() if family.models else {}).items():
        if name not in supported:
            supported[name] = entry
            added.append(name)
    return added


def _registered_entry(family: Family, name: str, supported: Mapping[str, Any]) -> ModelEntry:
    entry = supported[name]
    wrapper = getattr(entry, "func", None)
    if not (isinstance(wrapper, type) and issubclass(wrapper, _family_wrappers(family))) or entry.args:
        raise RunnerError(f"--model {name}: VLMEvalKit builds it with {getattr(wrapper, '__name__', entry)}, which "
                          f"is not a {family.name} wrapper ({', '.join(w.__name__ for w in _family_wrappers(family))})")
    return ModelEntry(name, f"vlmeval:{name}", wrapper, dict(entry.keywords))


def _checkpoint_entry(family: Family, folder: Path) -> ModelEntry:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise RunnerError(f"--model {folder}: a checkpoint folder needs a config.json")
    model_type = json.loads(config_file.read_text()).get("model_type")
    wrappers = family.wrappers()
    if model_type not in wrappers:
        raise RunnerError(f"--model {folder}: model_type {model_type!r} is not a {family.name} model; "
                          f"supported: {', '.join(sorted(wrappers))}")
    path = str(folder.resolve())
    return ModelEntry(folder.resolve().name, path, wrappers[model_type], {"model_path": path})


def resolve_model(family: Family, name: str, supported: Mapping[str, Any]) -> ModelEntry:
    """A VLMEvalKit model name or a local checkpoint folder."""
    if Path(name).is_dir():
        return _checkpoint_entry(family, Path(name))
    if name in supported:
        return _registered_entry(family, name, supported)
    ours = [n for n, e in supported.items() if isinstance(getattr(e, "func", None), type)
            and issubclass(e.func, _family_wrappers(family))]
    close = difflib.get_close_matches(name, ours, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise RunnerError(f"--model {name}: neither a VLMEvalKit model name nor a checkpoint folder{hint}")


def _config_entry(family: Family, key: str, entry: dict, supported: Mapping[str, Any]) -> ModelEntry:
    """A model of run.py's JSON ``--config``: ``{"class": ..., kwargs}``, or kwargs for a registered name."""
    import vlmeval.vlm

    kwargs = {k: v for k, v in entry.items() if k != "class"}
    if "class" in entry:
        ours = {wrapper.__name__: wrapper for wrapper in _family_wrappers(family)}  # a runner's own classes too
        wrapper = ours.get(entry["class"], getattr(vlmeval.vlm, entry["class"], None))
        if wrapper not in _family_wrappers(family):
            raise RunnerError(f"--config model {key!r}: class {entry['class']!r} is not a {family.name} wrapper")
        resolved = ModelEntry(key, "", wrapper, kwargs)
    else:
        resolved = _registered_entry(family, key, supported)
        resolved.kwargs.update(kwargs)
    resolved.source = "config:" + json.dumps({"name": key, **entry}, sort_keys=True, default=str)
    return resolved


def local_config_dir(entry: ModelEntry) -> Path | None:
    """The folder holding the model's ``config.json`` when it is readable without a download: a checkpoint folder,
    or a registered name whose files are in the local Hugging Face cache; else None."""
    path = entry.kwargs.get("model_path")
    if not isinstance(path, str):
        return None
    if (Path(path) / "config.json").is_file():
        return Path(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
    except Exception:  # not a repository id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def check_depth(entry: ModelEntry, config: PruneConfig, trust_remote_code: bool) -> None:
    """Check the intra-LLM layers against the model's depth before VLMEvalKit starts, when its config is readable
    locally (otherwise the first forward checks it). Raises ``PruneConfigError``."""
    folder = local_config_dir(entry) if config.intra_llm or config.scheduled else None
    if folder is None:
        return
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception:  # unreadable here: the first forward checks the depth
        return
    config.resolved_for(model_config.get_text_config().num_hidden_layers)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def runner_parser(prog: str, family: Family) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, add_help=False, allow_abbrev=False,
        description=f"Evaluate {family.name} models with visual-token pruning through VLMEvalKit. The pruning "
                    "configuration comes from the environment (KEEP_RATIO, PRUNE_METHOD, ...); every flag not "
                    "listed here goes to VLMEvalKit's run.py (--data, --model, --work-dir, --mode, --judge, "
                    "--reuse, --verbose, --config, ...). --model also accepts a local checkpoint folder.")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda (all visible GPUs, device_map='auto') or cuda:N; default: cuda if "
                             "available, else cpu")
    parser.add_argument("--attn-implementation", default=None,
                        help="eager, sdpa or flash_attention_2 (CUDA with flash-attn installed); default: "
                             "flash_attention_2 on CUDA when flash-attn is installed, else sdpa")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="model dtype; default: the checkpoint's")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON",
                        help="keyword arguments for VLMEvalKit's model wrapper, overriding its registered ones, "
                             "e.g. '{\"max_new_tokens\": 16}'")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a checkpoint's own Python code run (transformers' trust_remote_code, for an "
                             "auto_map in its config files); off by default: every supported family is native to "
                             "transformers")
    parser.add_argument("--configurations", default=None, metavar="FILE",
                        help="run several pruning configurations in turn in this process, loading each model once: "
                             'a JSON list of {"label": ..., "env": {"PRUNE_METHOD": ..., "KEEP_RATIO": ...}}, each '
                             "env replacing the stage-selecting variables of the environment; every configuration "
                             "writes the run folder a runner call with its variables would (scripts/sweep.py "
                             "--in-process writes the file)")
    parser.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                        help="generate the pending samples of a data set N at a time (left-padded, one generate call; "
                             "greedy predictions equal those of N = 1); default 1, one sample at a time. Not with "
                             "METHOD_TIME / PREFILL_TIME, which time single samples")
    for extra in family.flags:
        parser.add_argument(extra.flag, dest=extra.kwarg, type=extra.type, choices=extra.choices, help=extra.help)
    parser.add_argument("-h", "--help", action="store_true", help="show this help and VLMEvalKit's, then exit")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1")
    return value


def check_batching(batch_size: int, config: PruneConfig) -> None:
    """Latency is profiled per sample (one generate call each, the figure papers report): a profiled run generates
    one sample at a time. Raises ``RunnerError``."""
    if batch_size > 1 and config.profile.enabled:
        switches = [name for name, on in (("METHOD_TIME", config.profile.method_time),
                                          ("PREFILL_TIME", config.profile.prefill_time)) if on]
        raise RunnerError(f"--batch-size {batch_size} with {' and '.join(switches)}: latency is profiled per sample "
                          f"(one generate call each); profile with --batch-size 1 (the default) or unset "
                          f"{' and '.join(switches)}")


def _replace_option(argv: list[str], option: str, values: list[str]) -> list[str]:
    """``argv`` with every occurrence of ``option`` (and its values) replaced by ``option values``."""
    out, skipping = [], False
    for token in argv:
        if skipping and not token.startswith("-"):
            continue
        skipping = token == option
        if not skipping and not token.startswith(option + "="):
            out.append(token)
    return out + [option, *values]


def _parse_vlmeval_args(vlmeval_run: ModuleType, prog: str, argv: list[str]) -> argparse.Namespace:
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        return vlmeval_run.parse_args()
    finally:
        sys.argv = saved


def _error(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def main(family: Family, argv: list[str] | None = None, env: Mapping[str, str] | None = None,
         prog: str | None = None) -> int:
    """Parse, patch, hand over to ``vlmeval.run.main``, check the outcome. Returns the exit code (with
    ``--configurations``: the worst of the configurations')."""
    prog = prog or Path(sys.argv[0]).name
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = runner_parser(prog, family)
    options, rest = parser.parse_known_args(argv)
    if options.help:
        parser.print_help()
        print("\n--- VLMEvalKit's flags (passed through) ---", flush=True)
        import vlmeval.run

        _parse_vlmeval_args(vlmeval.run, prog, ["--help"])  # prints and exits
    env = os.environ if env is None else env
    try:  # before anything heavy is imported, and before VLMEvalKit can touch the work dir
        LoadSettings.check_flags(options.device, options.attn_implementation)
        runs = configurations(options.configurations, env)
        configs = [PruneConfig.from_env(run_env) for _, run_env in runs]
        for config in configs:
            check_batching(options.batch_size, config)
        family.patches.apply_patches(configs[0])
    except (RunnerError, PruneConfigError, RuntimeError) as err:  # RuntimeError: untested transformers release
        return _error(prog, str(err))
    try:
        return _run(family, options, rest, list(zip(runs, configs)), prog)
    except (RunnerError, PruneConfigError) as err:
        return _error(prog, str(err))
    finally:
        family.patches.remove_patches()


def configurations(path: str | None, env: Mapping[str, str]) -> list[tuple[str | None, Mapping[str, str]]]:
    """``(label, environment)`` of each pruning configuration of a runner call: ``env`` itself, or with
    ``--configurations FILE`` one per entry of the file, a JSON list of ``{"label": ..., "env": {...}}``, whose
    ``env`` replaces the stage-selecting variables (``SELECTION_VARS``) of ``env``; method hyper-parameters and
    everything else pass through, as for separate runner processes. Raises ``RunnerError``."""
    if path is None:
        return [(None, env)]
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise RunnerError(f"--configurations {path}: {err}") from None
    if not (isinstance(entries, list) and entries and all(
            isinstance(entry, dict) and isinstance(entry.get("label"), str) and isinstance(entry.get("env"), dict)
            for entry in entries)):
        raise RunnerError(f'--configurations {path}: expected a non-empty JSON list of {{"label": ..., "env": {{...}}}}')
    labels = [entry["label"] for entry in entries]
    if len(set(labels)) != len(labels):
        raise RunnerError(f"--configurations {path}: labels repeat")
    base = {key: value for key, value in env.items() if key not in SELECTION_VARS}
    return [(entry["label"], {**base, **{key: str(value) for key, value in entry["env"].items()}})
            for entry in entries]


@dataclass
class _Session:
    """What the configurations of one runner call share: VLMEvalKit's command line and data sets, the models and
    how they are loaded, and the wrappers built so far (``built``: model key -> wrapper), so that an in-process sweep
    loads each model once."""

    family: Family
    prog: str
    vlmeval_run: ModuleType
    rest: list[str]  # VLMEvalKit's command line
    args: argparse.Namespace  # ... parsed
    cfg: dict | None  # --config's JSON
    entries: dict[str, ModelEntry]  # model key (--model name, --config key) -> model
    datasets: list[str]
    wrapper_overrides: dict
    load: LoadSettings
    batch_size: int
    work_dir: Path
    rank: int
    built: dict[str, PrunedModel] = field(default_factory=dict)


def _shared_wrapper(built: dict, key: str, wrapper: type, *, pruning_run: ModelRun, **kwargs) -> PrunedModel:
    """VLMEvalKit's factory of a run's model (``supported_VLM[name](...)``): the wrapper an earlier configuration of
    the same runner call built for this model, switched to this run (:meth:`PrunedModel.use_run`), or a new one."""
    if key in built:
        built[key].use_run(pruning_run)
    else:
        built[key] = wrapper(pruning_run=pruning_run, **kwargs)
    return built[key]


def _run(family: Family, options, rest: list[str], runs: list[tuple[tuple[str | None, Mapping[str, str]], PruneConfig]],
         prog: str) -> int:
    # Slow; under torchrun, importing run.py splits CUDA_VISIBLE_DEVICES (or nvidia-smi's GPUs) between the local
    # processes and asserts there are at least as many GPUs as processes. A --device cpu run uses no GPU: hiding
    # LOCAL_WORLD_SIZE while it is imported skips that split (RANK / WORLD_SIZE, read separately, still apply).
    with _temporarily_env("LOCAL_WORLD_SIZE", None) if options.device == "cpu" else contextlib.nullcontext():
        import vlmeval.run as vlmeval_run
    from vlmeval.config import supported_VLM

    register_models(family, supported_VLM)
    args = _parse_vlmeval_args(vlmeval_run, prog, rest)
    for flag, value in (("--api-mode", args.api_mode), ("--base-url", args.base_url), ("--use-vllm", args.use_vllm)):
        if value:
            raise RunnerError(f"{flag} is not supported: the pruning hooks patch transformers models")
    try:
        wrapper_overrides = json.loads(options.model_kwargs)
    except ValueError:
        wrapper_overrides = None
    if not isinstance(wrapper_overrides, dict):
        raise RunnerError(f"--model-kwargs {options.model_kwargs!r}: not a JSON object")
    name_suffix = ""
    for extra in family.flags:  # one spelling only: checked before loading and shown in the model name
        if extra.kwarg in wrapper_overrides:
            raise RunnerError(f"--model-kwargs: {extra.kwarg!r} is set with {extra.flag}; allowed: "
                              f"{extra.flag} {{{', '.join(map(str, extra.choices))}}}")
        value = getattr(options, extra.kwarg)
        if value is not None:
            wrapper_overrides[extra.kwarg] = value
            name_suffix += "-" + extra.label.format(value)
    load = LoadSettings.resolve(options.device, options.attn_implementation, options.dtype, options.trust_remote_code)

    cfg = None
    if args.config:
        cfg = json.loads(Path(args.config).read_text())
        entries = {key: _config_entry(family, key, value, supported_VLM) for key, value in cfg["model"].items()}
        datasets = list(cfg["data"])
    else:
        if not args.model or not args.data:
            raise RunnerError("--model and --data are required (or --config)")
        entries = {name: resolve_model(family, name, supported_VLM) for name in args.model}
        datasets = list(args.data)
    for entry in entries.values():
        entry.base += name_suffix
        for _, config in runs:  # every configuration before VLMEvalKit starts
            check_depth(entry, config, load.trust_remote_code)
    import video_data  # local video sets; after vlmeval.run: builds on VLMEvalKit's video data set class

    try:
        video_sets = video_data.data_set_entries(datasets if cfg is None else [])
    except ValueError as err:
        raise RunnerError(str(err)) from None

    session = _Session(family, prog, vlmeval_run, rest, args, cfg, entries, datasets, wrapper_overrides, load,
                       options.batch_size, Path(os.environ.get("MMEVAL_ROOT", args.work_dir)),  # VLMEvalKit's own
                       int(os.environ.get("RANK", 0)))
    codes = []
    with video_data.registered(video_sets):
        for (label, env), config in runs:
            family.patches.apply_patches(config)  # only replaces the configuration: the hooks stay installed
            try:
                code = _evaluate(session, config, env)
            except (RunnerError, PruneConfigError) as err:
                code = _error(prog, str(err))
            if label is not None:
                print(f"{prog}: configuration {label}: exit {code}", flush=True)
            codes.append(code)
    return max(codes)


def _evaluate(session: _Session, config: PruneConfig, env: Mapping[str, str]) -> int:
    """Register every model under this configuration's run name, run ``vlmeval.run.main`` on them, check the
    outcome. Returns the exit code."""
    from vlmeval.config import supported_VLM

    family, prog, work_dir, rank, load = session.family, session.prog, session.work_dir, session.rank, session.load
    names = {}
    for key, entry in session.entries.items():
        identity = run_identity(entry.source, config, session.wrapper_overrides, load.dtype, family,
                                load.trust_remote_code, local_config_dir(entry))
        name = run_name(entry.base, config, identity)
        run_dir = work_dir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            _write_run_config(run_dir, name, entry, identity, config, load, env, family)
            print(f"{prog}: {key} [{run_tag(config)}] -> {run_dir}", flush=True)
        profile = (profiling.ProfileLog(run_dir, rank, profiling.Profiler(config.profile))
                   if config.profile.enabled else None)
        model_run = ModelRun(family, load, TokenLog(run_dir, rank), profile)
        supported_VLM[name] = functools.partial(_shared_wrapper, session.built, key, adapt(entry.wrapper, family.mixin),
                                                pruning_run=model_run, **{**entry.kwargs, **session.wrapper_overrides})
        names[key] = name

    cfg = None
    if session.cfg is not None:
        cfg = {**session.cfg, "model": {names[key]: {} for key in session.cfg["model"]}}  # {}: supported_VLM[name]
        digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
        new_config = work_dir / f"vlmeval_config_{digest}.json"
        _atomic_write(new_config, json.dumps(cfg, indent=2), rank)
        option, values, expected = "--config", [str(new_config)], str(new_config)
    else:
        option, values = "--model", list(names.values())
        expected = values
    vlmeval_argv = _replace_option(session.rest, option, values)
    if getattr(_parse_vlmeval_args(session.vlmeval_run, prog, vlmeval_argv), option[2:]) != expected:
        raise RunnerError(f"could not rewrite {option} (spell the flag out in full)")

    started = datetime.datetime.now().astimezone()
    saved = sys.argv
    sys.argv = [prog, *vlmeval_argv]
    try:
        with contextlib.ExitStack() as stack:
            if not load.device.startswith("cuda"):
                stack.enter_context(_gloo_for_nccl())
            stack.enter_context(_video_sampling_per_data_set(session.vlmeval_run))
            if session.batch_size > 1:
                stack.enter_context(_batched_inference(session.vlmeval_run, session.batch_size))
            session.vlmeval_run.main()
    finally:
        sys.argv = saved
    if rank != 0:
        # Rank 0 evaluates and checks the outcome. VLMEvalKit's infer_data_job ends with a barrier after rank 0 has
        # merged every rank's pickle into the prediction file, so a rank returns only once its share is merged.
        return 0
    if config.profile.enabled:  # every rank's samples are written: VLMEvalKit waits for all before evaluating
        _write_profile_summaries(work_dir, list(names.values()), session.datasets, prog)
    failures = check_status(work_dir, list(names.values()), session.datasets, started)
    if not failures:
        failures = check_predictions(work_dir, list(names.values()), session.datasets, session.args, cfg)
    for failure in failures:
        print(f"{prog}: evaluation failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _atomic_write(path: Path, text: str, rank: int) -> None:
    tmp = path.with_name(f"{path.name}.rank{rank}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_run_config(run_dir: Path, name: str, entry: ModelEntry, identity: dict, config: PruneConfig,
                      load: LoadSettings, env: Mapping[str, str], family: Family) -> None:
    """``pruning_config.json``: the resolved configuration of the run, next to its predictions."""
    import importlib.metadata

    identity = json.loads(json.dumps(identity, default=str))
    path = run_dir / RUN_CONFIG_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        if {key: previous.get(key) for key in identity} != identity:
            raise RunnerError(f"{path} describes a different run; refusing to mix predictions")
    record = {
        "model_name": name,
        "base_model": entry.base,
        "family": family.name,
        "wrapper": entry.wrapper.__name__,
        "tag": run_tag(config),
        **identity,
        "pruning_env": {k: v for k, v in sorted(env.items()) if k.startswith(_PRUNING_ENV_PREFIXES)},
        "profiling": asdict(config.profile),
        "load": {"device": load.device, "attn_implementation": load.attn_implementation},
        "versions": {package: importlib.metadata.version(package)
                     for package in ("ms-vlmeval", "transformers", "torch")},
    }
    _atomic_write(path, json.dumps(record, indent=2), 0)


def _write_profile_summaries(work_dir: Path, names: list[str], datasets: list[str], prog: str) -> None:
    for name in names:
        for dataset in datasets:
            path = profiling.write_summary(work_dir / name, dataset)
            if path is None:
                print(f"{prog}: no profiled sample for {name} x {dataset}: predictions reused from an earlier run "
                      f"are not generated again, hence not timed (use a fresh --work-dir)", file=sys.stderr)
            else:
                print(f"{prog}: profile summary -> {path}", flush=True)


def check_predictions(work_dir: Path, names: list[str], datasets: list[str], args: argparse.Namespace,
                      config: dict | None) -> list[str]:
    """Every data set's prediction file exists and holds a prediction for every row of the data set (VLMEvalKit
    can record a data set as done without one, e.g. when the model failed to load)."""
    from vlmeval.smp import get_pred_file_path, load
    from vlmeval.smp.file import INFER_FAIL_MSG

    failures = []
    for dataset_name in datasets:
        try:
            dataset = _build_dataset(dataset_name, args, config)
            expected = [str(index) for index in dataset.data["index"]][:args.limit or None]  # --limit: the first rows
        except Exception as err:  # noqa: BLE001 - reported, never hidden
            failures.append(f"{dataset_name}: cannot check its predictions: the data set does not load ({err})")
            continue
        for name in names:
            where = f"{name} x {dataset_name}"
            recorded = _run_status(work_dir, name).get("datasets", {}).get(dataset_name, {}).get("prediction_file")
            path = work_dir / name / (recorded or get_pred_file_path("", name, dataset_name))  # recorded: in the run dir
            if not path.is_file():
                failures.append(f"{where}: no prediction file ({path})")
                continue
            frame = load(str(path))
            predicted = {str(index): str(prediction) for index, prediction in zip(frame["index"], frame["prediction"])}
            missing = [index for index in expected if index not in predicted]
            failed = [index for index in expected if INFER_FAIL_MSG in predicted.get(index, "")]
            if missing or failed:
                failures.append(f"{where}: {len(missing)} of {len(expected)} rows have no prediction and "
                                f"{len(failed)} a failed one in {path}")
    return failures


def _build_dataset(name: str, args: argparse.Namespace, config: dict | None):
    """The data set as VLMEvalKit's run.py builds it."""
    import vlmeval.run
    from vlmeval.dataset import build_dataset

    if config is not None:
        return vlmeval.run.build_dataset_from_config(config["data"], name)
    return build_dataset(name, **vars(args))


def _run_status(work_dir: Path, name: str) -> dict:
    """VLMEvalKit's ``status.json`` of a run folder ({} before VLMEvalKit wrote one)."""
    path = work_dir / name / STATUS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def check_status(work_dir: Path, names: list[str], datasets: list[str], since: datetime.datetime) -> list[str]:
    """Failures VLMEvalKit recorded in ``status.json`` (it exits 0 regardless)."""
    failures = []
    for name in names:
        status_file, status = work_dir / name / STATUS_FILE, _run_status(work_dir, name)
        for dataset in datasets:
            entry = status.get("datasets", {}).get(dataset)
            where = f"{name} x {dataset}"
            if entry is None or datetime.datetime.fromisoformat(entry["updated_at"]) < since:
                failures.append(f"{where}: not processed (see {status_file})")
            elif entry.get("error_message"):
                failures.append(f"{where}: {entry['error_message']}")
            elif entry.get("skip_reason") in FAILED_SKIPS:
                failures.append(f"{where}: {entry['skip_reason']}")
            elif entry.get("status") != "done":
                failures.append(f"{where}: stopped in state {entry.get('status')!r}")
    return failures
