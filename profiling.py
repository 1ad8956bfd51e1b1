"""Latency and memory profiling of generation with pruning (METHOD_TIME, PREFILL_TIME; see docs/profiling.md).

A :class:`Profiler` wraps a model's ``generate`` (:meth:`Profiler.instrument`); every call becomes one *sample*.
While it runs, the sample is the active one (a context variable), and the hooks mark their regions through
:func:`region` and :func:`stage`, which do nothing when no sample is active:

* ``vision_encoder``: each outer ``get_image_features`` / ``get_video_features`` call (``patching.py``);
* a pruning stage: pre-LLM at the language-model entry (``patching.py``), intra-LLM before its layer (``hooks.py``);
* ``lm_prefill``: the language model's prefill call, intra-LLM stages included (``patching.py``).

The first new token is marked by a stopping criterion added to the call (generate calls it right after each
token is chosen). Marks are CUDA events on the model's device (a single GPU: no synchronisation inside the timed
region, one at the end of the sample) or the monotonic ``perf_counter_ns`` on a CPU (CUDA devices synchronised
at every mark when the model spans several GPUs). Everything else (token counts, KV-cache bytes, memory, the
conversion to milliseconds) is computed after generate returns; nothing is written anywhere by the profiler
itself: :meth:`Profiler.take` hands out the finished samples, and :class:`ProfileLog` writes them (the runners do
so after each sample). Samples are plain dicts; :func:`summarize` reduces them to n, mean, median and p90.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from utils import ProfileConfig, Stage

VISION = "vision_encoder"
LM_PREFILL = "lm_prefill"

SAMPLES_FILE = "profile_{dataset}.rank{rank}.jsonl"  # one line per profiled generate call; rank="*" globs
RAW_DIR = "timings_{dataset}.rank{rank}"  # the predecessor's raw files, under their own names
SUMMARY_FILE = "profile_summary_{dataset}.json"
PREFILL_TIMES = "prefill_times.txt"
METHOD_TIMES = "method_times_{method}.txt"


# --------------------------------------------------------------------------------------------------
# Clocks and memory meters
# --------------------------------------------------------------------------------------------------
class HostClock:
    """``time.perf_counter_ns`` (monotonic). With CUDA devices, each mark first waits for all of them."""

    def __init__(self, cuda_devices: Iterable[torch.device] = ()):
        self.cuda_devices = list(cuda_devices)
        self.name = "perf_counter_ns" + (" after torch.cuda.synchronize" if self.cuda_devices else "")

    def mark(self) -> int:
        for device in self.cuda_devices:
            torch.cuda.synchronize(device)
        return time.perf_counter_ns()

    def finish(self) -> None:
        pass

    @staticmethod
    def ms(start: int, end: int) -> float:
        return (end - start) / 1e6


class EventClock:
    """CUDA events recorded on the device's current stream; read after one synchronisation at the end."""

    name = "torch.cuda.Event"

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def finish(self) -> None:
        torch.cuda.synchronize(self.device)

    @staticmethod
    def ms(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end)


class CudaMemory:
    """Peak of ``torch.cuda.max_memory_allocated`` over the model's devices (summed), reset per sample."""

    name = "torch.cuda.max_memory_allocated"

    def __init__(self, devices: list[torch.device]):
        self.devices = devices
        self.base = 0

    def start(self) -> None:
        for device in self.devices:
            torch.cuda.reset_peak_memory_stats(device)
        self.base = sum(torch.cuda.memory_allocated(device) for device in self.devices)

    def stop(self) -> tuple[int, int]:
        peak = sum(torch.cuda.max_memory_allocated(device) for device in self.devices)
        return peak, peak - self.base


class ProcessMemory:
    """CPU: the process's peak resident set size (Linux ``VmHWM``), reset per sample through
    ``/proc/self/clear_refs``. Coarse: pages, not tensors; it includes the weights, Python objects and memory the
    allocator keeps after freeing it. ``None`` where /proc does not allow it."""

    name = "process peak RSS (VmHWM)"

    def __init__(self):
        self.base: int | None = None

    @staticmethod
    def _status(field_name: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = self._status("VmRSS")
        except (OSError, AttributeError):
            self.base = None

    def stop(self) -> tuple[int | None, int | None]:
        if self.base is None:
            return None, None
        peak = self._status("VmHWM")
        return peak, peak - self.base


def meters_for(model) -> tuple[HostClock | EventClock, CudaMemory | ProcessMemory]:
    """The clock and memory meter for a model's placement: one GPU, several GPUs, or the CPU."""
    cuda = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    if not cuda:
        return HostClock(), ProcessMemory()
    clock = EventClock(cuda[0]) if len(cuda) == 1 else HostClock(cuda)
    return clock, CudaMemory(cuda)


# --------------------------------------------------------------------------------------------------
# One sample (one generate call) and the regions the hooks mark
# --------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    clock: HostClock | EventClock
    start: Any = None
    first_token: Any = None
    end: Any = None
    steps: int = 0  # stopping-criterion calls = new tokens per sequence
    vision: list[tuple[Any, Any]] = field(default_factory=list)
    stages: list[tuple[Stage, Any, Any]] = field(default_factory=list)
    lm_prefill: tuple[Any, Any] | None = None
    spans: list | None = None  # the prefill's spans (hooks.Span), whose counts the stages fill in
    cache: Any = None  # the prefill's KV cache, read again at the end
    kv_cache_bytes: int | None = None
    cached_tokens: float | None = None  # the prefill's cache: entries per layer, mean over the layers that own one
    kv_stage_freed_bytes: int | None = None  # what the KV stage (KV_METHOD) removed from the prefill's cache


_ACTIVE: contextvars.ContextVar[Sample | None] = contextvars.ContextVar("profiled_sample", default=None)
_NOTHING = contextlib.nullcontext()


def region(name: str, cache=None, spans=None):
    """Mark a region of the active sample (``VISION`` or ``LM_PREFILL``); a no-op when none is active.
    ``LM_PREFILL`` takes the prefill's cache (its size is read right after the region) and spans."""
    sample = _ACTIVE.get()
    return _NOTHING if sample is None else _region(sample, name, cache, spans)


def kv_stage_freed(bytes_before: int, bytes_after: int) -> None:
    """Note what the KV stage removed from one layer's cache, for the active sample; a no-op when none is active."""
    sample = _ACTIVE.get()
    if sample is not None:
        sample.kv_stage_freed_bytes = (sample.kv_stage_freed_bytes or 0) + bytes_before - bytes_after


def stage(stage_: Stage):
    """Mark one pruning stage (the method's call on every span of the batch, with the hooks' own work to apply
    the choice) of the active sample; a no-op when none is active."""
    sample = _ACTIVE.get()
    return _NOTHING if sample is None else _stage(sample, stage_)


@contextlib.contextmanager
def _region(sample: Sample, name: str, cache, spans):
    start = sample.clock.mark()
    yield
    end = sample.clock.mark()
    if name == VISION:
        sample.vision.append((start, end))
    else:
        sample.lm_prefill, sample.spans, sample.cache = (start, end), spans, cache
        sample.kv_cache_bytes = cache_bytes(cache)  # tensor metadata only: no synchronisation
        sample.cached_tokens = cached_tokens(cache)


@contextlib.contextmanager
def _stage(sample: Sample, stage_: Stage):
    start = sample.clock.mark()
    yield
    sample.stages.append((stage_, start, sample.clock.mark()))


class _TokenClock(StoppingCriteria):
    """Never stops generation; marks the first token (generate calls criteria right after choosing a token)."""

    def __init__(self, sample: Sample):
        self.sample = sample

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        if self.sample.steps == 0:
            self.sample.first_token = self.sample.clock.mark()
        self.sample.steps += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


# --------------------------------------------------------------------------------------------------
# Derived quantities
# --------------------------------------------------------------------------------------------------
def cache_bytes(cache) -> int | None:
    """Bytes of the storages that a cache's key and value tensors hold, summed over its layers (layers that hold
    nothing, e.g. KV-shared ones, count 0; a sliding layer counts what it really keeps); also of one cache layer."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        if not hasattr(cache, "keys"):
            return None
        layers = [cache]
    storages = {}
    for layer in layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def cached_tokens(cache) -> float | None:
    """Entries per sequence a cache holds, averaged over its layers that hold any (KV-shared layers hold none):
    the size at which token pruning and KV-cache compression are compared ("equivalent cached tokens")."""
    lengths = [layer.keys.shape[-2] for layer in getattr(cache, "layers", None) or ()
               if isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.numel()]
    return sum(lengths) / len(lengths) if lengths else None


def tokens_per_layer(counts: dict[str, int], num_layers: int) -> list[int]:
    """Visual tokens each decoder layer processes, from counts per stage label in stage order ('input', then
    'pre_llm' from layer 0, then 'layer_K' from layer K on)."""
    stages = [(int(label[len("layer_"):]) if label.startswith("layer_") else 0, n) for label, n in counts.items()]
    return [[n for first, n in stages if first <= layer][-1] for layer in range(num_layers)]


def visual_tokens(spans: list) -> dict[str, int]:
    """Visual tokens summed over every span of the batch, per stage label, in stage order."""
    totals: dict[str, int] = {}
    for span in (s for sample in spans for s in sample):
        for label, n in span.counts.items():
            totals[label] = totals.get(label, 0) + n
    return totals


def equivalent_tokens(spans: list, num_layers: int) -> float:
    """Σ over decoder layers of the visual tokens that layer processed, / number of layers (summed over spans)."""
    spans = [s for sample in spans for s in sample]
    return sum(sum(tokens_per_layer(span.counts, num_layers)) for span in spans) / num_layers


# --------------------------------------------------------------------------------------------------
# The profiler
# --------------------------------------------------------------------------------------------------
class Profiler:
    """Profiles every ``generate`` call of the models it instruments; see the module docstring."""

    def __init__(self, config: ProfileConfig):
        self.config = config
        self._finished: list[dict] = []
        self._taken: Counter = Counter()  # samples handed out per data set (the first ones are warm-up)

    def instrument(self, model) -> None:
        """Profile every later ``model.generate(...)`` call (an instance attribute; the class is untouched)."""
        original = model.generate
        clock, memory = meters_for(model)

        @functools.wraps(original)
        def generate(*args, **kwargs):
            if _ACTIVE.get() is not None:  # a generate inside a profiled one belongs to the outer sample
                return original(*args, **kwargs)
            sample = Sample(clock)
            criteria = kwargs.get("stopping_criteria") or []
            kwargs["stopping_criteria"] = StoppingCriteriaList([*criteria, _TokenClock(sample)])
            memory.start()
            token = _ACTIVE.set(sample)
            try:
                sample.start = clock.mark()
                output = original(*args, **kwargs)
                sample.end = clock.mark()
            finally:
                _ACTIVE.reset(token)
            clock.finish()
            self._finished.append(self._result(model, sample, clock, memory))
            return output

        model.generate = generate

    def take(self, dataset: str | None = None, key: str | None = None) -> list[dict]:
        """The samples finished since the last call, labelled with the data set and sample key; the first
        ``config.warmup`` samples of each data set are marked as warm-up."""
        taken, self._finished = self._finished, []
        for record in taken:
            record.update(dataset=dataset, key=key, warmup=self._taken[dataset] < self.config.warmup)
            self._taken[dataset] += 1
        return taken

    @staticmethod
    def _result(model, sample: Sample, clock, memory) -> dict:
        ms = clock.ms
        peak, increase = memory.stop()
        stages = [{"stage": s.label, "method": s.method, "ms": ms(a, b)}
                  for s, a, b in sample.stages]
        metrics: dict[str, float | int | None] = {
            "vision_encoder_ms": sum(ms(a, b) for a, b in sample.vision),
            "pruning_ms": sum(s["ms"] for s in stages),
        }
        for s in stages:
            name = f"pruning_ms/{s['stage']}/{s['method']}"
            metrics[name] = metrics.get(name, 0.0) + s["ms"]
        if sample.lm_prefill is not None:
            lm = ms(*sample.lm_prefill)
            pre_llm = sum(s["ms"] for s in stages if s["stage"] == "pre_llm")
            metrics["prefill_ms"] = pre_llm + lm
            metrics["llm_prefill_ms"] = lm - (metrics["pruning_ms"] - pre_llm)
        if sample.first_token is not None:
            metrics["ttft_ms"] = ms(sample.start, sample.first_token)
            if "prefill_ms" in metrics:
                metrics["ttft_other_ms"] = (metrics["ttft_ms"] - metrics["vision_encoder_ms"]
                                            - metrics["prefill_ms"])
        metrics["decode_ms_per_token"] = (ms(sample.first_token, sample.end) / (sample.steps - 1)
                                          if sample.steps > 1 else None)
        metrics.update(generate_ms=ms(sample.start, sample.end), new_tokens=sample.steps,
                       peak_memory_bytes=peak, peak_memory_increase_bytes=increase,
                       kv_cache_bytes=sample.kv_cache_bytes, kv_cache_final_bytes=cache_bytes(sample.cache),
                       cached_tokens_per_layer=sample.cached_tokens)
        if sample.kv_stage_freed_bytes is not None and sample.kv_cache_bytes is not None:
            metrics["kv_cache_bytes_before_kv_stage"] = sample.kv_cache_bytes + sample.kv_stage_freed_bytes
        if sample.spans is not None:
            tokens = visual_tokens(sample.spans)
            for label, n in tokens.items():
                metrics[f"visual_tokens/{label}"] = n
            if tokens:
                layers = model.config.get_text_config().num_hidden_layers
                metrics["equivalent_visual_tokens"] = equivalent_tokens(sample.spans, layers)
            labels = list(tokens)
            for s in stages:  # tokens entering each stage: the count after the stage before it
                s["tokens_in"] = tokens[labels[labels.index(s["stage"]) - 1]] if s["stage"] in labels else None
        device = next(model.parameters()).device
        return {"device": str(device), "clock": clock.name, "memory": memory.name, "metrics": metrics,
                "stages": stages}


# --------------------------------------------------------------------------------------------------
# Summaries and files
# --------------------------------------------------------------------------------------------------
def summarize(records: Iterable[dict]) -> dict:
    """n, mean, median and p90 (linear interpolation) of every metric over the samples that are not warm-up;
    a metric a sample does not have (e.g. decode time with one new token) is left out of its n."""
    records = list(records)
    kept = [r for r in records if not r.get("warmup")]
    values: dict[str, list[float]] = {}
    for record in kept:
        for name, value in record["metrics"].items():
            if value is not None:
                values.setdefault(name, []).append(float(value))
    stats = {name: {"n": len(v), "mean": float(np.mean(v)), "median": float(np.median(v)),
                    "p90": float(np.percentile(v, 90))} for name, v in sorted(values.items())}
    return {"samples": len(records), "warmup": len(records) - len(kept), "profiled": len(kept),
            "devices": sorted({r["device"] for r in records}), "clocks": sorted({r["clock"] for r in records}),
            "memory": sorted({r["memory"] for r in records}), "metrics": stats}


@dataclass
class ProfileLog:
    """Writes a run's profiled samples into its output folder, one set of files per rank and data set:
    ``profile_<data>.rank<r>.jsonl`` and, in ``timings_<data>.rank<r>/``, the predecessor's raw files
    ``prefill_times.txt`` (PREFILL_TIME: ``<prefill ms>``) and ``method_times_<method>.txt`` (METHOD_TIME:
    ``<stage ms> <visual tokens entering the stage>``), warm-up samples included."""

    run_dir: Path
    rank: int
    profiler: Profiler

    def write(self, dataset: str | None, key: str | None) -> None:
        """Append the samples finished since the last call (after generate: outside any timed region)."""
        dataset = dataset or "unknown"
        records = self.profiler.take(dataset, key)
        if not records:
            return
        with open(self.run_dir / SAMPLES_FILE.format(dataset=dataset, rank=self.rank), "a", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        raw = self.run_dir / RAW_DIR.format(dataset=dataset, rank=self.rank)
        raw.mkdir(exist_ok=True)
        config = self.profiler.config
        for record in records:
            prefill = record["metrics"].get("prefill_ms")
            if config.prefill_time and prefill is not None:
                with open(raw / PREFILL_TIMES, "a") as f:
                    f.write(f"{prefill:.3f}\n")
            for s in record["stages"] if config.method_time else []:
                with open(raw / METHOD_TIMES.format(method=s["method"]), "a") as f:
                    f.write(f"{s['ms']:.3f} {s['tokens_in']}\n")


def read_samples(run_dir: Path, dataset: str) -> list[dict]:
    records = []
    for path in sorted(Path(run_dir).glob(SAMPLES_FILE.format(dataset=dataset, rank="*"))):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def write_summary(run_dir: Path, dataset: str) -> Path | None:
    """``profile_summary_<data>.json`` from every rank's samples of the data set; None if there are none."""
    records = read_samples(run_dir, dataset)
    if not records:
        return None
    path = Path(run_dir) / SUMMARY_FILE.format(dataset=dataset)
    path.write_text(json.dumps({"dataset": dataset, **summarize(records)}, indent=2))
    return path


def load_summary(run_dir: Path, dataset: str) -> dict | None:
    """The written summary, or one computed from the samples (a run stopped before its end); None if neither."""
    path = Path(run_dir) / SUMMARY_FILE.format(dataset=dataset)
    if path.exists():
        return json.loads(path.read_text())
    records = read_samples(run_dir, dataset)
    return {"dataset": dataset, **summarize(records)} if records else None
