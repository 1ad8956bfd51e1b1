"""Configuration from environment variables, the keep-count rule, and the transformers version guard.

Environment variables are read once, by :func:`PruneConfig.from_env`, when patches are applied (before a
model is loaded). Everything below the entry point receives the resulting immutable object.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

import methods
from methods import INTRA_LLM, KV, PRE_LLM, VIT, MethodSpec

TESTED_TRANSFORMERS = "5.23"  # the patches read transformers internals of this release series

VIDEO_SCOPES = ("frame", "video")
CLS_SIGNALS = ("cls", "substitute")  # CLS_SIGNAL: what a method reading a [CLS] row gets on an encoder that has one
_NONE_VALUES = {"", "none", "null", "off", "0", "false"}
_SWITCH_VALUES = {"1": True, "true": True, "yes": True, "on": True,
                  "": False, "0": False, "false": False, "no": False, "off": False}
DEFAULT_PROFILE_WARMUP = 2


class PruneConfigError(ValueError):
    """Bad pruning configuration: the message names the variable, the value and what is allowed."""


# Attention probabilities computed per block of query rows (the hooks' and the KV stage's signals): about 16 MB of
# fp32 scores per block. A block lives in a few copies (scores, softmax, the span's columns); at 64 MB, FitPrune's
# peak at an 8k-token prompt of a hidden-512 model exceeded the stock prefill's by 13 % (scripts/bench_pruning.py),
# and it ran slower on a CPU.
ATTENTION_BLOCK_ELEMENTS = 1 << 22


def keep_count(num_tokens: int, ratio: float) -> int:
    """The one keep-count rule for every method: K = max(1, round(ratio * N)), never more than N.

    ``round`` is Python's (half to even), as in DivPrune's official code.
    """
    if num_tokens <= 0:
        return 0
    return min(num_tokens, max(1, round(ratio * num_tokens)))


def check_transformers_version() -> None:
    """Refuse a transformers release the patches were not tested on (override: PRUNE_ALLOW_UNTESTED_TRANSFORMERS=1)."""
    import transformers

    version = transformers.__version__
    if version == TESTED_TRANSFORMERS or version.startswith(TESTED_TRANSFORMERS + "."):
        return
    message = (
        f"transformers {version} is not supported: the pruning patches depend on transformers internals and "
        f"were tested on {TESTED_TRANSFORMERS}.x only. Install it with `pip install -r requirements.txt`"
    )
    if os.environ.get("PRUNE_ALLOW_UNTESTED_TRANSFORMERS", "").lower() in {"1", "true", "yes"}:
        warnings.warn(message + " (continuing because PRUNE_ALLOW_UNTESTED_TRANSFORMERS is set)", stacklevel=2)
        return
    raise RuntimeError(message + ", or set PRUNE_ALLOW_UNTESTED_TRANSFORMERS=1 to try anyway.")


@dataclass(frozen=True)
class Stage:
    """One pruning step: a method, its keep ratio and (intra-LLM) the decoder layer it runs before, (ViT) the
    encoder block it runs before (negative: counted from the encoder's end)."""

    method: str
    ratio: float
    layer: int | None = None  # None for pre-LLM

    @property
    def label(self) -> str:
        """The record's name of the stage: 'vit_<B>' (before encoder block B), 'pre_llm' or 'layer_<K>'."""
        vit = methods.stage_of(self.method) == VIT
        if self.layer is None:
            return "vit" if vit else PRE_LLM  # "vit": a ViT schedule before its expansion
        return f"vit_{self.layer}" if vit else f"layer_{self.layer}"


@dataclass(frozen=True)
class KVStage:
    """The KV-cache stage (KV_METHOD, KV_BUDGET): after the prefill, every decoder layer's cache keeps ``budget``
    entries per KV head, a fraction of the layer's cached prompt entries (``fraction``) or a count (``count``)."""

    method: str
    fraction: float | None = None
    count: int | None = None

    def budget(self, entries: int) -> int:
        """Entries to keep per head of a layer that cached ``entries`` prompt tokens (at least 1, at most all)."""
        if self.count is not None:
            return max(1, min(self.count, entries))
        return keep_count(entries, self.fraction)

    @property
    def label(self) -> str:
        return "kv"


@dataclass(frozen=True)
class ProfileConfig:
    """Latency and memory profiling (``profiling.py``): METHOD_TIME, PREFILL_TIME and PROFILE_WARMUP.

    Either switch turns the per-sample profile on; each also writes its predecessor-format raw file.
    """

    method_time: bool = False
    prefill_time: bool = False
    warmup: int = DEFAULT_PROFILE_WARMUP  # first samples of each data set per process left out of summaries

    @property
    def enabled(self) -> bool:
        return self.method_time or self.prefill_time


@dataclass(frozen=True)
class PruneConfig:
    # ViT stages, by encoder block as given (negative blocks are resolved against each encoder's depth when it runs);
    # ratios are fractions of an encoded image's patches, non-increasing.
    vit: tuple[Stage, ...] = ()
    pre_llm: Stage | None = None
    intra_llm: tuple[Stage, ...] = ()  # sorted by layer, ratios non-increasing
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # method name -> hyper-parameters
    # An intra-LLM method named alone that has its own multi-stage schedule (e.g. PyramidDrop): its layers depend
    # on the model's depth, so it becomes concrete stages in ``resolved_for`` (layer None until then).
    scheduled: Stage | None = None
    # How a method that is not a video method sees a video (IMAGE_METHODS_ON_VIDEO): "frame", each frame alone with
    # its own keep count (also where the model lays a video out as one span, Qwen2-VL / Qwen2.5-VL), or "video",
    # every frame of the video in one call (also where the model lays frames out as separate spans).
    image_methods_on_video: str = "frame"
    kv: KVStage | None = None  # the KV-cache stage after the prefill (KV_METHOD, KV_BUDGET)
    # CLS_SIGNAL: "cls", the [CLS] row where the encoder has a [CLS] (CLIP); "substitute", the attention received there
    # too, at the same layers, to measure what the substitution costs. Part of describe() only when not the default,
    # so the run names of every other configuration are unchanged.
    cls_signal: str = "cls"
    profile: ProfileConfig = ProfileConfig()  # changes no prediction, so it is not part of describe()
    _resolved: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # depth -> config

    @property
    def active(self) -> bool:
        return (bool(self.vit) or self.pre_llm is not None or bool(self.intra_llm) or self.scheduled is not None
                or self.kv is not None)

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.vit + ((self.pre_llm,) if self.pre_llm else ()) + self.intra_llm

    def method(self, name: str) -> MethodSpec:
        return methods.registered_methods()[name]

    def check_depth(self, num_layers: int) -> None:
        """Called once the model is known: every layer spec must name an existing decoder layer."""
        for stage in self.intra_llm:
            if stage.layer >= num_layers:
                raise PruneConfigError(
                    f"INTRA_LLM_LAYER_SPECS: layer {stage.layer} ({stage.method}) is beyond the model's depth; "
                    f"allowed: 0..{num_layers - 1} for this model with {num_layers} decoder layers"
                )

    def resolved_for(self, num_layers: int) -> "PruneConfig":
        """The configuration for a model with ``num_layers`` decoder layers: depth checked, a scheduled method
        expanded into its stages. Immutable and memoised per depth (the same object for every forward)."""
        if num_layers not in self._resolved:
            config = self
            if self.scheduled is not None:
                spec = self.method(self.scheduled.method)
                try:
                    schedule = spec.default_schedule(num_layers, self.scheduled.ratio)
                except ValueError as err:
                    raise PruneConfigError(f"PRUNE_METHOD={spec.name!r}: its default schedule does not fit this "
                                           f"model ({err}); allowed: an explicit INTRA_LLM_LAYER_SPECS") from None
                stages = [Stage(spec.name, ratio, layer) for layer, ratio in schedule]
                _check_intra(stages, "PRUNE_METHOD", spec.name, methods.registered_methods())
                config = replace(self, intra_llm=tuple(stages), scheduled=None)
            config.check_depth(num_layers)
            self._resolved[num_layers] = config
        return self._resolved[num_layers]

    def describe(self) -> dict:
        """JSON-friendly form, e.g. to namespace and record a run."""
        public = {f.name: getattr(self, f.name) for f in fields(self)
                  if not f.name.startswith("_") and f.name != "profile"}
        if self.cls_signal == "cls":
            del public["cls_signal"]
        return json.loads(json.dumps(public, default=lambda v: asdict(v) if isinstance(v, (Stage, KVStage)) else str(v)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "PruneConfig":
        return _parse(os.environ if env is None else env)


def _fail(var: str, value: str, reason: str, allowed: str) -> PruneConfigError:
    return PruneConfigError(f"{var}={value!r}: {reason}; allowed: {allowed}")


def _parse_ratio(var: str, text: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        raise _fail(var, text, "not a number", "a number in (0, 1], e.g. 0.25") from None
    if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
        raise _fail(var, text, "keep ratio out of range", "a number in (0, 1], e.g. 0.25")
    return ratio


def _lookup_method(var: str, name: str, registry: Mapping[str, MethodSpec], stage: str | None = None) -> MethodSpec:
    if name not in registry:
        close = methods.closest_names(name)
        hint = f"closest registered names: {', '.join(close)}" if close else "see `python -m methods`"
        raise _fail(var, name, "unknown pruning method", f"a registered method name ({hint})")
    spec = registry[name]
    if stage is not None and spec.stage != stage:
        allowed = sorted(n for n, s in registry.items() if s.stage == stage)
        found, wanted = _STAGE_LABELS[spec.stage], _STAGE_LABELS[stage]
        raise _fail(var, name, f"is {_article(found)} {found} method", f"{wanted} methods: {', '.join(allowed)}")
    return spec


_STAGE_LABELS = {VIT: "ViT", PRE_LLM: "pre-LLM", INTRA_LLM: "intra-LLM", KV: "KV-cache"}


def _article(word: str) -> str:
    """'a' or 'an' before ``word`` (by its first letter: enough for type names such as int, float, str)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _parse_switch(var: str, env: Mapping[str, str]) -> bool:
    text = env.get(var, "").strip()
    if text.lower() not in _SWITCH_VALUES:
        raise _fail(var, text, "not a switch", "True or False (also 1/0, yes/no, on/off; unset: False)")
    return _SWITCH_VALUES[text.lower()]


def _parse_profile(env: Mapping[str, str]) -> ProfileConfig:
    var, text = "PROFILE_WARMUP", env.get("PROFILE_WARMUP", "").strip()
    if text and not re.fullmatch(r"\d+", text):
        raise _fail(var, text, "not a non-negative integer",
                    f"an integer >= 0, the samples of each data set and process left out of the profile "
                    f"summaries as warm-up (default {DEFAULT_PROFILE_WARMUP})")
    return ProfileConfig(method_time=_parse_switch("METHOD_TIME", env), prefill_time=_parse_switch("PREFILL_TIME", env),
                         warmup=int(text) if text else DEFAULT_PROFILE_WARMUP)


def _parse_layer_specs(text: str, default_ratio: float | None, registry, stage: str = INTRA_LLM) -> list[Stage]:
    var = "INTRA_LLM_LAYER_SPECS" if stage == INTRA_LLM else "VIT_LAYER_SPECS"
    allowed = ("'LAYER:METHOD[:RATIO]' entries separated by ';' or ',', e.g. '2:fastv_intra_llm:0.5;6:pdrop_intra_llm:0.3'"
               if stage == INTRA_LLM else "'BLOCK:METHOD[:RATIO]' entries separated by ';' or ',', BLOCK an encoder "
               "block (negative: from the end), e.g. '8:tome_vit:0.5;16:tome_vit:0.25'")
    stages: list[Stage] = []
    for entry in filter(None, (e.strip() for e in re.split(r"[;,]", text))):
        parts = [p.strip() for p in entry.split(":")]
        if len(parts) not in (2, 3) or not parts[1]:
            raise _fail(var, text, f"malformed entry {entry!r}", allowed)
        if not re.fullmatch(r"\d+" if stage == INTRA_LLM else r"-?\d+", parts[0]):
            what = "a non-negative integer" if stage == INTRA_LLM else "an integer"
            raise _fail(var, text, f"layer {parts[0]!r} in {entry!r} is not {what}", allowed)
        spec = _lookup_method(var, parts[1], registry, stage)
        if len(parts) == 3:
            ratio = _parse_ratio(f"{var} (entry {entry!r})", parts[2])
        elif default_ratio is None:
            raise _fail(var, text, f"entry {entry!r} has no ratio and KEEP_RATIO is not set", allowed)
        else:
            ratio = default_ratio
        stages.append(Stage(spec.name, ratio, int(parts[0])))
    if not stages:
        raise _fail(var, text, "no layer entries", allowed)
    return stages


def _parse_params(spec: MethodSpec, env: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for param in spec.params:
        raw = env.get(param.env)
        if raw is None or raw == "":
            values[param.env] = param.default
            continue
        try:
            value = param.type(raw)
        except (TypeError, ValueError):
            kind = param.type.__name__
            raise _fail(param.env, raw, f"not a valid {kind} ({spec.name}: {param.help})",
                        f"{_article(kind)} {kind}, default {param.default!r}") from None
        problem = param.check(value) if param.check else None
        if problem:
            raise _fail(param.env, raw, f"{problem} ({spec.name}: {param.help})", f"default {param.default!r}")
        values[param.env] = value
    return values


def _parse(env: Mapping[str, str]) -> PruneConfig:
    profile = _parse_profile(env)
    extra = [p for p in env.get("PRUNE_METHODS_PATH", "").split(os.pathsep) if p.strip()]
    try:
        registry = methods.load_methods(extra)
    except (FileNotFoundError, methods.MethodFileError) as err:
        raise PruneConfigError(str(err)) from None

    keep_text = env.get("KEEP_RATIO", "").strip()
    keep_ratio = _parse_ratio("KEEP_RATIO", keep_text) if keep_text else None

    def named(var: str) -> str | None:
        value = env.get(var, "").strip()
        return None if value.lower() in _NONE_VALUES else value

    by_stage = {VIT: named("PRUNE_METHOD_VIT"), PRE_LLM: named("PRUNE_METHOD_PRE_LLM"),
                INTRA_LLM: named("PRUNE_METHOD_INTRA_LLM")}
    for stage, name in by_stage.items():
        if name:
            _lookup_method(f"PRUNE_METHOD_{stage.upper()}", name, registry, stage)
    generic = named("PRUNE_METHOD")
    if generic:
        spec = _lookup_method("PRUNE_METHOD", generic, registry)
        if spec.stage == KV:
            raise _fail("PRUNE_METHOD", generic, "is a KV-cache method, configured by KV_METHOD and KV_BUDGET",
                        f"KV_METHOD={generic} with KV_BUDGET (a fraction in (0, 1] or a count of entries)")
        var, other = f"PRUNE_METHOD_{spec.stage.upper()}", by_stage[spec.stage]
        if other and other != generic:
            raise _fail("PRUNE_METHOD", generic, f"conflicts with {var}={other!r}", f"set only one of PRUNE_METHOD and {var}")
        by_stage[spec.stage] = generic
    vit_name, pre_name, intra_name = by_stage[VIT], by_stage[PRE_LLM], by_stage[INTRA_LLM]

    specs_text = env.get("INTRA_LLM_LAYER_SPECS", "").strip()
    if specs_text and intra_name:
        raise _fail("INTRA_LLM_LAYER_SPECS", specs_text, f"conflicts with the intra-LLM method {intra_name!r} set by "
                    "PRUNE_METHOD/PRUNE_METHOD_INTRA_LLM", "either a layer spec or a single intra-LLM method")

    vit_text = env.get("VIT_LAYER_SPECS", "").strip()
    if vit_text and vit_name:
        raise _fail("VIT_LAYER_SPECS", vit_text, f"conflicts with the ViT method {vit_name!r} set by "
                    "PRUNE_METHOD/PRUNE_METHOD_VIT", "either a block spec or a single ViT method")

    if (vit_name or pre_name or intra_name) and keep_ratio is None:
        raise _fail("KEEP_RATIO", keep_text, "required when a pruning method is set", "a number in (0, 1], e.g. 0.25")

    vit = _parse_layer_specs(vit_text, keep_ratio, registry, VIT) if vit_text else []
    if vit_name:  # a method with its own schedule gets layer None: expanded per encoder (encoder_stage.py)
        vit = [Stage(vit_name, keep_ratio, registry[vit_name].default_layer)]
    _check_vit(vit, "VIT_LAYER_SPECS" if vit_text else "PRUNE_METHOD", vit_text or vit_name)
    pre = Stage(pre_name, keep_ratio) if pre_name else None
    if vit and pre and registry[pre.method].vision is not None:
        raise _fail("PRUNE_METHOD_PRE_LLM", pre.method, "reads the vision encoder's attention, which a ViT stage "
                    f"({vit[0].method}) changes", "a pre-LLM method without vision-encoder signals together with a "
                    "ViT stage, or no ViT stage")
    intra, scheduled = [], None
    if specs_text:
        intra = _parse_layer_specs(specs_text, keep_ratio, registry)
    elif intra_name and registry[intra_name].default_schedule is not None:
        scheduled = Stage(intra_name, keep_ratio)  # layers known once the model's depth is (resolved_for)
    elif intra_name:
        intra = [Stage(intra_name, keep_ratio, registry[intra_name].default_layer)]

    intra.sort(key=lambda s: s.layer)
    _check_intra(intra, "INTRA_LLM_LAYER_SPECS" if specs_text else "PRUNE_METHOD", specs_text or intra_name, registry)

    scope_text = env.get("IMAGE_METHODS_ON_VIDEO", "").strip().lower() or "frame"
    if scope_text not in VIDEO_SCOPES:
        raise _fail("IMAGE_METHODS_ON_VIDEO", env["IMAGE_METHODS_ON_VIDEO"], "unknown scope",
                    "frame (each frame alone, the default) or video (all frames of a video in one call)")

    cls_text = env.get("CLS_SIGNAL", "").strip().lower() or "cls"
    if cls_text not in CLS_SIGNALS:
        raise _fail("CLS_SIGNAL", env["CLS_SIGNAL"], "unknown vision signal",
                    "cls (the [CLS] row where the encoder has a [CLS], the default) or substitute (the attention each "
                    "patch receives, as on encoders without one)")

    kv = _parse_kv(env, registry)
    used = {s.method for s in vit + ([pre] if pre else []) + intra + ([scheduled] if scheduled else [])}
    used |= {kv.method} if kv else set()
    params = {name: _parse_params(registry[name], env) for name in sorted(used)}
    if pre and registry[pre.method].decode_selection(params[pre.method]) and (intra or scheduled or kv):
        raise _fail("PRUNE_METHOD_PRE_LLM" if env.get("PRUNE_METHOD_PRE_LLM", "").strip() else "PRUNE_METHOD",
                    pre.method, "its decode-time stage reads every layer's cache in the pre-LLM layout, which an "
                    "intra-LLM stage or KV_METHOD changes", f"{pre.method} with its decode stage off "
                    "(DYCOKE_DECODE=0) together with them, or without them")
    last = (intra or [scheduled])[-1] if intra or scheduled else None
    if kv and last and registry[last.method].reindexes_cache(params[last.method]):
        raise _fail("KV_METHOD", kv.method, f"{last.method} cuts the earlier layers' caches to its survivors after the "
                    "prefill, and the KV method would compress them too", "one of them (MUSTDROP_REINDEX_CACHE=0 "
                    "leaves MustDrop's caches to the KV method)")
    _warn_ignored(env, keep_text, used, registry)
    return PruneConfig(vit=tuple(vit), pre_llm=pre, intra_llm=tuple(intra), params=params, scheduled=scheduled,
                       image_methods_on_video=scope_text, kv=kv, cls_signal=cls_text, profile=profile)


def _parse_kv(env: Mapping[str, str], registry: Mapping[str, MethodSpec]) -> KVStage | None:
    """KV_METHOD and KV_BUDGET: a budget is required with a method and refused without one."""
    name = env.get("KV_METHOD", "").strip()
    budget_text = env.get("KV_BUDGET", "").strip()
    allowed_budget = "a fraction in (0, 1] of each layer's cached prompt entries (e.g. 0.25) or a count of entries >= 1 " \
                     "(e.g. 512)"
    if name.lower() in _NONE_VALUES:
        if budget_text:
            raise _fail("KV_BUDGET", budget_text, "is set but KV_METHOD is not", "KV_METHOD=<a *_kv method> with it")
        return None
    spec = _lookup_method("KV_METHOD", name, registry, KV)
    if not budget_text:
        raise _fail("KV_BUDGET", budget_text, f"required with KV_METHOD={name}", allowed_budget)
    if re.fullmatch(r"\d+", budget_text) and int(budget_text) > 1:
        return KVStage(spec.name, count=int(budget_text))
    try:
        fraction = float(budget_text)
    except ValueError:
        raise _fail("KV_BUDGET", budget_text, "not a number", allowed_budget) from None
    if not (0.0 < fraction <= 1.0) or math.isnan(fraction):
        raise _fail("KV_BUDGET", budget_text, "out of range", allowed_budget)
    return KVStage(spec.name, fraction=fraction)


def _warn_ignored(env: Mapping[str, str], keep_text: str, used: set[str], registry: Mapping[str, MethodSpec]) -> None:
    """One warning per set variable this configuration ignores: KEEP_RATIO with no method, and hyper-parameters
    that no configured method declares (several methods may share one, e.g. PRUNE_RANDOM_SEED)."""
    if keep_text and not used:
        warnings.warn(f"KEEP_RATIO={keep_text} is set but no pruning method is configured (PRUNE_METHOD, "
                      "PRUNE_METHOD_VIT, PRUNE_METHOD_PRE_LLM, PRUNE_METHOD_INTRA_LLM, VIT_LAYER_SPECS or "
                      "INTRA_LLM_LAYER_SPECS): the run is stock",
                      UserWarning, stacklevel=4)
    declared: dict[str, list[str]] = {}  # variable -> the registered methods that read it
    for name, spec in registry.items():
        for param in spec.params:
            declared.setdefault(param.env, []).append(name)
    for var, names in sorted(declared.items()):
        value = env.get(var, "").strip()
        if not value or used.intersection(names):
            continue
        names = sorted(set(names))
        if len(names) == 1:
            unused = f"{names[0]} is not configured"
        elif len(names) == 2:
            unused = f"neither {names[0]} nor {names[1]} is configured"
        else:
            unused = f"none of {', '.join(names)} is configured"
        warnings.warn(f"{var}={value} is set but {unused}: it has no effect", UserWarning, stacklevel=4)


def _check_vit(vit: list[Stage], var: str, value: str) -> None:
    """ViT stages as given: distinct blocks, ratios non-increasing in the order given. (Negative blocks count from
    the encoder's end, so the order and the range are checked again against each encoder, see encoder_stage.py.)"""
    blocks = [s.layer for s in vit if s.layer is not None]
    duplicates = sorted({block for block in blocks if blocks.count(block) > 1})
    if duplicates:
        raise _fail(var, value, f"block {duplicates[0]} appears more than once", "each encoder block at most once")
    for earlier, later in zip(vit, vit[1:]):
        if later.ratio > earlier.ratio:
            raise _fail(var, value, f"ratio {later.ratio} at block {later.layer} exceeds {earlier.ratio} at block "
                        f"{earlier.layer}", "entries in block order with ratios that do not increase (each is a "
                        "fraction of an encoded image's patches)")


def _check_intra(intra: list[Stage], var: str, value: str, registry) -> None:
    """Intra-LLM stages (sorted by layer): distinct layers, each method's minimum layer, non-increasing ratios."""
    layers = [s.layer for s in intra]
    duplicates = sorted({layer for layer in layers if layers.count(layer) > 1})
    if duplicates:
        raise _fail(var, value, f"layer {duplicates[0]} appears more than once", "each layer at most once")
    for stage in intra:
        spec = registry[stage.method]
        if stage.layer < spec.min_layer:
            raise _fail(var, value, f"{stage.method} cannot run before layer {stage.layer}",
                        f"layer >= {spec.min_layer} for {stage.method}")
    for earlier, later in zip(intra, intra[1:]):
        if later.ratio > earlier.ratio:
            raise _fail(var, value,
                        f"ratio {later.ratio} at layer {later.layer} exceeds {earlier.ratio} at layer {earlier.layer}",
                        "ratios that do not increase with depth (each is a fraction of the tokens that entered "
                        "the language model)")
