"""Performance benchmark of the pruning hooks, side by side in one process, reported as ratios.

On a random Qwen2.5-VL-shaped model of mid size (8 decoder layers, hidden 512, 8 query / 2 key-value heads,
MLP 2752; a small vision encoder), through the real hooks and the same profiler as the runners
(``profiling.py``, definitions in docs/profiling.md), every configuration's ``generate`` calls interleaved
round-robin so that drifts of the machine hit all of them alike:

1. prefill speed-up vs keep ratio, pre-LLM (``uniform_pre_llm``) and intra-LLM (FastV before layer 2), next to
   the ideal speed-up from the prefill FLOPs; target: pre-LLM at keep 0.25 reaches >= 0.9 of the ideal;
2. each method's own time (every stage of it, the hooks' work to apply the choice included) as a percentage of
   the stock prefill at N visual tokens, at keep 0.25; target: <= 2 % at N = 4096 for every method whose official
   algorithm is not quadratic in N (those are listed as such, with the reason, and their measured exponent);
3. peak memory of the attention-scored intra-LLM methods at an 8k-token prompt vs stock; target: <= 1.1x, on the
   peak *increase* over what was allocated before generate (the weights excluded: the stricter ratio);
4. DivPrune's greedy selection grows as O(K N), not O(K^2 N): its time at fixed N for growing K;
5. the ViT stage (``*_vit`` methods, before an encoder block), on a second random model shaped like LLaVA-1.5's
   encoder (a CLIP-L/14-336 tower: 24 blocks, width 1024, 16 heads, MLP 4096, 576 patches + [CLS]; a tiny language
   model, not timed): the time of ``get_image_features`` stock vs with ToMe (``tome_vit``) halving the patches
   before block 12 (with and without proportional attention) and ``random_vit`` at the same place (selection
   only), next to the encoder's FLOPs ratio; target: the measured speed-up reaches >= 0.8 of the FLOPs ideal.
   And each ViT method's own time (the method function on N = 576 patches) as a share of the stock encoder.
6. video: a 16-frame clip (8 temporal patches of 16 x 16 tokens: 2,048 visual tokens) on the mid-size model, stock
   vs every video method (registered with ``video=True``) at keep 0.25 and 0.1: time to first token's speed-up
   next to its Amdahl limit (the language model's prefill falling by its FLOPs ratio, the encoder and the rest
   measured and unchanged), and each method's own time as a share of the stock prefill; targets: pre-LLM video
   pruning reaches >= 0.9 of the limit, and no video method whose official algorithm is linear in N costs more
   than 2 % of the stock prefill.
7. KV cache: an 8k-token prompt and 256 new tokens on the mid-size model, stock vs every KV-cache method (``*_kv``)
   at budgets 0.5 / 0.25 / 0.1 vs token pruning (pre-LLM ``uniform_pre_llm``, intra-LLM FastV at layer 2) at the
   keep ratio giving the same mean cached tokens per layer: decode time per token, the cache's size, the methods'
   selection time and peak memory; targets: a KV method's decode step at budget 0.25 costs <= 0.6x the stock step,
   and its selection adds <= 5 % to a step (once-per-prompt work spread over the generated tokens; H2O, which reads
   every prompt row's attention, is reported only).

Prefill = the pre-LLM stage + the language model's prefill call (vision encoder, generate's own work and lm_head
excluded); every run is ``generate(max_new_tokens=1)``. Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU;
on a CPU the live bytes of torch's CPU allocations from the profiler's memory events (``torch.profiler``,
``profile_memory=True``), in a separate, untimed pass.

    python scripts/bench_pruning.py --threads 1              # CPU defaults: N = 1k and 4k; ~25 min on 2 cores
    python scripts/bench_pruning.py --sizes 1024 4096 16384  # the full sizes (16k: hours on a CPU)
    python scripts/bench_pruning.py --device cuda --threads 0
    python scripts/bench_pruning.py --threads 1 --only encoder   # only part 5 (``--only`` / ``--skip`` a part)

Prints the tables and the targets as PASS/FAIL lines, and writes everything to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import custom_llava  # noqa: E402
import custom_qwenvl  # noqa: E402
import encoder_stage  # noqa: E402
import methods  # noqa: E402
import profiling  # noqa: E402
from methods import INTRA_LLM, KV, PRE_LLM, VIT, PruneContext, PruneResult  # noqa: E402
from methods.divprune import cosine_distance, divprune_select, max_min_greedy  # noqa: E402
from utils import PruneConfig, keep_count  # noqa: E402

PARTS = ("speedup", "overhead", "memory", "divprune", "compare", "encoder", "video", "kv")

KEEP = 0.25
TEXT_BEFORE, TEXT_AFTER = 16, 32  # text tokens around the image: system prompt, then the instruction
# Methods whose official algorithm is quadratic (or worse) in N at a fixed keep ratio: excluded from the 2 % target.
QUADRATIC = {
    "divprune_pre_llm": "N x N cosine distances",
    "divprune_hybrid_pre_llm": "N x N cosine distances",
    "fps_pre_llm": "N x N cosine distances",
    "gprune_pre_llm": "N x N similarity graph and its softmax",
    "cdpruner_pre_llm": "N x N DPP kernel; greedy MAP O(K^2 N)",
    "prumerge_pre_llm": "K x N key similarities (K grows with N)",
    "prumerge_plus_pre_llm": "K x N key similarities (K grows with N)",
    "visionzip_pre_llm": "(N - K) x C key similarities (C grows with N)",
    "vispruner_pre_llm": "N^2 similarities once, then (N - K) / 8 rounds reading (N/2)^2 of them",
    "fitprune_intra_llm": "attention of all N visual rows to every key",
    "sparsevlm_intra_llm": "DPC-kNN pairwise distances of the pruned tokens",
    "tome_pre_llm": "N/2 x N/2 bipartite cosine similarities per round (2 rounds at keep 0.25)",
    "tome_vit": "N/2 x N/2 bipartite cosine similarities of the keys",
    "vscan_pre_llm": "(N - K) x K cosine similarities of the merge (K grows with N)",
    "h2o_kv": "every prompt row's attention to every cached key, recomputed (officially read from an eager prefill)",
}
ATTENTION_SCORED = ("fastv_intra_llm", "pdrop_intra_llm", "fitprune_intra_llm", "sparsevlm_intra_llm")
# The benchmark's encoder has 2 blocks: VTC-CLS sums its globally attending layers from the last one.
BENCH_PARAMS = {"VTC_CLS_START_LAYER": "-1"}
# Token ids of the random model: 400 text tokens, then the Qwen special tokens in their released order (the
# layout of the tests' tiny tokenizer; no tokenizer is needed, the inputs are generated as ids).
SPECIAL_IDS = dict(image_token_id=412, video_token_id=413, vision_start_token_id=409, vision_end_token_id=410,
                   eos_token_id=402, endoftext_id=400, first_special_id=400, vocab_size=416)


# --------------------------------------------------------------------------------------------------
# Model and inputs
# --------------------------------------------------------------------------------------------------
def build_model(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, device, dtype,
                attn_implementation: str = "sdpa", ids: dict = SPECIAL_IDS, init_on_device: bool = False):
    """A random Qwen2.5-VL (default weight init; by default the tiny models' vocabulary and special ids, ``ids``:
    another tokenizer's, keys as ``SPECIAL_IDS``'). ``init_on_device``: drawn on ``device`` in ``dtype`` (other
    weights than the float32 CPU draw, but a 7B-sized model is ready in seconds instead of minutes)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # Qwen's 16/24/24 of 64 frequencies
    text = dict(vocab_size=ids["vocab_size"], hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=32768, pad_token_id=ids["endoftext_id"], bos_token_id=ids["endoftext_id"],
                eos_token_id=ids["eos_token_id"],
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                  tokens_per_second=2)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_token_id"],
                              video_token_id=ids["video_token_id"], vision_start_token_id=ids["vision_start_token_id"],
                              vision_end_token_id=ids["vision_end_token_id"], tie_word_embeddings=False)
    return random_model(Qwen2_5_VLForConditionalGeneration, config, attn_implementation, device, dtype,
                        init_on_device)


def random_model(model_class, config, attn_implementation: str, device, dtype, init_on_device: bool = False):
    """``model_class`` with transformers' default initialisation, seed 0, in eval mode: drawn in float32 on the CPU
    and moved, or with ``init_on_device`` drawn on ``device`` in ``dtype`` (other weights, in seconds for a 7B)."""
    torch.manual_seed(0)
    if init_on_device:
        with torch.device(device):
            return model_class._from_config(config, attn_implementation=attn_implementation, dtype=dtype).eval()
    return model_class._from_config(config, attn_implementation=attn_implementation).to(device, dtype).eval()


def save_so_far(results: dict, out: Path, started: float, part: str) -> None:
    """Write ``results`` to ``out`` after ``part``: a run stopped later keeps the parts it finished."""
    results["seconds"] = time.time() - started
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\n  [{results['seconds']:.0f} s] {part} done, saved to {out}", file=sys.stderr, flush=True)


def make_inputs(model, tokens: int, device) -> dict:
    """One image of ``tokens`` visual tokens (a grid as square as possible) between two stretches of text, laid
    out as Qwen's processor does; random pixels (the model is random too)."""
    ids = SPECIAL_IDS
    h = 2 ** (int(math.log2(tokens)) // 2)
    w = tokens // h
    generator = torch.Generator().manual_seed(tokens)
    text = torch.randint(0, ids["first_special_id"], (TEXT_BEFORE + TEXT_AFTER,), generator=generator)
    input_ids = torch.cat([text[:TEXT_BEFORE], torch.tensor([ids["vision_start_token_id"]]),
                           torch.full((h * w,), ids["image_token_id"]), torch.tensor([ids["vision_end_token_id"]]),
                           text[TEXT_BEFORE:]]).unsqueeze(0)
    patch = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids, device=device),
            "mm_token_type_ids": (input_ids == ids["image_token_id"]).int().to(device),
            "pixel_values": torch.randn(4 * h * w, patch, generator=generator).to(device, model.dtype),
            "image_grid_thw": torch.tensor([[1, 2 * h, 2 * w]], device=device)}


def make_video_inputs(model, frames: int, side: int, device) -> dict:
    """One video of ``frames`` frames (``frames // 2`` temporal patches of side x side tokens) between two stretches
    of text, laid out as Qwen2.5-VL's processor does; random pixels."""
    ids = SPECIAL_IDS
    temporal = frames // 2
    tokens = temporal * side * side
    generator = torch.Generator().manual_seed(frames * side)
    text = torch.randint(0, ids["first_special_id"], (TEXT_BEFORE + TEXT_AFTER,), generator=generator)
    input_ids = torch.cat([text[:TEXT_BEFORE], torch.tensor([ids["vision_start_token_id"]]),
                           torch.full((tokens,), ids["video_token_id"]), torch.tensor([ids["vision_end_token_id"]]),
                           text[TEXT_BEFORE:]]).unsqueeze(0)
    patch = 3 * 2 * 14 * 14
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids, device=device),
            "mm_token_type_ids": (2 * (input_ids == ids["video_token_id"])).int().to(device),
            "pixel_values_videos": torch.randn(4 * tokens, patch, generator=generator).to(device, model.dtype),
            "video_grid_thw": torch.tensor([[temporal, 2 * side, 2 * side]], device=device),
            "second_per_grid_ts": torch.tensor([1.0], device=device)}


def method_env(method: str | None, ratio: float = KEEP) -> dict | None:
    """Pruning environment of a configuration: None = patches removed, {} = stock through the hooks."""
    if method in (None, "stock"):
        return {} if method == "stock" else None
    declared = {param.env for param in methods.load_methods()[method].params}
    return {"PRUNE_METHOD": method, "KEEP_RATIO": str(ratio),
            **{var: value for var, value in BENCH_PARAMS.items() if var in declared}}


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, model, warmup: int, repeats: int, new_tokens: int = 1):
        self.model, self.warmup, self.repeats, self.new_tokens = model, warmup, repeats, new_tokens
        switches = {"METHOD_TIME": "1", "PREFILL_TIME": "1", "PROFILE_WARMUP": str(warmup)}
        self.profiler = profiling.Profiler(PruneConfig.from_env(switches).profile)
        self.profiler.instrument(model)

    def generate(self, env: dict | None, inputs: dict) -> None:
        if env is None:
            custom_qwenvl.remove_patches()
        else:
            custom_qwenvl.apply_patches(PruneConfig.from_env(env))
        with torch.no_grad():
            self.model.generate(**inputs, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                do_sample=False)

    def profile(self, configs: dict[str, dict | None], inputs: dict, progress: str,
                after_round=None) -> dict[str, list[dict]]:
        """``warmup + repeats`` generate calls per configuration, round-robin; the samples after the warm-up.
        ``after_round(samples)``, if given, is called after every measured round (to save what is measured)."""
        samples: dict[str, list[dict]] = {label: [] for label in configs}
        for round_ in range(self.warmup + self.repeats):
            for i, (label, env) in enumerate(configs.items()):
                print(f"\r  {progress}: round {round_ + 1}/{self.warmup + self.repeats}, {i + 1}/{len(configs)} "
                      f"{label:<28}", end="", file=sys.stderr, flush=True)
                self.generate(env, inputs)
                (record,) = self.profiler.take(label)
                if not record["warmup"]:
                    samples[label].append(record)
            if after_round is not None and round_ >= self.warmup:
                after_round(samples)
        print(file=sys.stderr)
        return samples

    def peak_memory(self, env: dict | None, inputs: dict) -> int:
        """Peak bytes allocated during one generate call, above what was allocated before it (untimed)."""
        device = self.model.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            self.generate(env, inputs)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                self.generate(env, inputs)
            events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]")
            live = peak = 0
            for _, nbytes in events:  # allocations positive, frees negative
                live += nbytes
                peak = max(peak, live)
        self.profiler.take("memory")  # the profiled sample is not a timing sample
        return peak


def median(samples: list[dict], metric: str) -> float:
    return statistics.median(s["metrics"][metric] for s in samples)


def prefill_flops(text_config, lengths: list[int]) -> float:
    """Matmul FLOPs of a prefill whose decoder layer i processes ``lengths[i]`` tokens: q/k/v/o projections, causal
    attention (L(L+1)/2 query-key pairs for QK^T and again for PV), and the gated MLP."""
    d_model, inter = text_config.hidden_size, text_config.intermediate_size
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = d_model // heads
    total = 0.0
    for n in lengths:
        projections = 2 * n * d_model * (heads + 2 * kv_heads) * head_dim + 2 * n * heads * head_dim * d_model
        attention = 2 * 2 * heads * head_dim * n * (n + 1) / 2
        total += projections + attention + 3 * 2 * n * d_model * inter
    return total


def layer_lengths(sample: dict, prompt: int, num_layers: int) -> list[int]:
    """Tokens per decoder layer of a sample: the text plus the visual tokens left at that layer."""
    counts = {label.split("/", 1)[1]: int(n) for label, n in sample["metrics"].items()
              if label.startswith("visual_tokens/")}
    text = prompt - counts["input"]
    return [text + n for n in profiling.tokens_per_layer(counts, num_layers)]


# --------------------------------------------------------------------------------------------------
# The four parts
# --------------------------------------------------------------------------------------------------
def speedup_part(bench: Bench, tokens: int, ratios: list[float], device) -> dict:
    inputs = make_inputs(bench.model, tokens, device)
    configs = {"unpatched": None, "stock": {}}
    for ratio in ratios:
        configs[f"pre-LLM {ratio:g}"] = method_env("uniform_pre_llm", ratio)
        configs[f"intra-LLM L2 {ratio:g}"] = method_env("fastv_intra_llm", ratio)
    samples = bench.profile(configs, inputs, f"speed-up, N={tokens}")
    text_config = bench.model.config.get_text_config()
    prompt = inputs["input_ids"].shape[1]
    stock_prefill = median(samples["stock"], "prefill_ms")
    stock_flops = prefill_flops(text_config, [prompt] * text_config.num_hidden_layers)
    rows = []
    for label in configs:
        if label == "unpatched":
            continue
        speedup = stock_prefill / median(samples[label], "prefill_ms")
        flops = prefill_flops(text_config, layer_lengths(samples[label][0], prompt, text_config.num_hidden_layers))
        ideal = stock_flops / flops
        rows.append({"config": label, "prefill_ms": median(samples[label], "prefill_ms"),
                     "pruning_ms": median(samples[label], "pruning_ms"), "speedup": speedup, "ideal": ideal,
                     "of_ideal": speedup / ideal})
    hook_overhead = median(samples["stock"], "ttft_ms") / median(samples["unpatched"], "ttft_ms") - 1
    return {"tokens": tokens, "prompt_tokens": prompt, "rows": rows, "stock_hook_overhead_ttft": hook_overhead}


def overhead_part(bench: Bench, sizes: list[int], names: list[str], device) -> dict:
    per_size = {}
    for tokens in sizes:
        inputs = make_inputs(bench.model, tokens, device)
        configs = {"stock": {}, **{name: method_env(name) for name in names}}
        samples = bench.profile(configs, inputs, f"method overhead, N={tokens}")
        stock_prefill = median(samples["stock"], "prefill_ms")
        stock_vision = median(samples["stock"], "vision_encoder_ms")
        per_size[tokens] = {"stock_prefill_ms": stock_prefill, "methods": {
            name: {"ms": median(samples[name], "pruning_ms"),
                   "percent": 100 * median(samples[name], "pruning_ms") / stock_prefill,
                   "encoder_extra_percent": 100 * (median(samples[name], "vision_encoder_ms") - stock_vision)
                   / stock_prefill}
            for name in names}}
    if len(sizes) > 1:  # measured growth between the smallest and the largest N
        small, large = per_size[sizes[0]]["methods"], per_size[sizes[-1]]["methods"]
        for name in names:
            ratio = large[name]["ms"] / small[name]["ms"] if small[name]["ms"] > 0 else float("nan")
            large[name]["exponent"] = math.log(ratio) / math.log(sizes[-1] / sizes[0])
    return {"keep": KEEP, "sizes": per_size}


def memory_part(bench: Bench, tokens: int, names: list[str], device) -> dict:
    inputs = make_inputs(bench.model, tokens, device)
    results = {}
    for label in ["stock", *names]:
        print(f"\r  peak memory, prompt {inputs['input_ids'].shape[1]}: {label:<28}", end="", file=sys.stderr,
              flush=True)
        results[label] = bench.peak_memory(method_env(label), inputs)
    print(file=sys.stderr)
    weights = sum(p.numel() * p.element_size() for p in bench.model.parameters())
    return {"prompt_tokens": inputs["input_ids"].shape[1], "keep": KEEP, "weights_bytes": weights,
            "peak_increase_bytes": results,
            "ratio": {name: results[name] / results["stock"] for name in names},
            "ratio_with_weights": {name: (weights + results[name]) / (weights + results["stock"]) for name in names}}


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x: the measured exponent of y ~ x^e."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def timed_ms(fn, device) -> tuple:
    """(``fn()``, its wall time in ms), the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter_ns()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter_ns() - start) / 1e6


def fastest_ms(fn, device, repeats: int) -> tuple:
    """(the best of ``repeats`` timed calls of ``fn`` in ms, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        out, ms = timed_ms(fn, device)
        best = min(best, ms)
    return best, out


def divprune_part(tokens: int, hidden: int, keeps: list[int], sizes: list[int], repeats: int, device) -> dict:
    """DivPrune's greedy selection (``max_min_greedy``) on a precomputed distance matrix: its time for growing K at
    fixed N, and for growing N at fixed K; the K-independent setup (N x N distances, seed) timed apart."""

    def fastest(fn) -> float:
        return fastest_ms(fn, device, repeats)[0]

    def features(n: int) -> torch.Tensor:
        return torch.randn(n, hidden, generator=torch.Generator().manual_seed(n)).to(device)

    x = features(tokens)
    setup = fastest(lambda: cosine_distance(x).topk(2, dim=0, largest=False))
    distance = cosine_distance(x)
    by_keep = [{"keep": k, "ms": fastest(lambda: max_min_greedy(distance, 0, k))} for k in keeps]
    fixed_keep = min(keeps)
    by_tokens = []
    for n in sizes:
        d = cosine_distance(features(n))
        by_tokens.append({"tokens": n, "ms": fastest(lambda: max_min_greedy(d, 0, fixed_keep))})
    for row in by_keep:
        row["us_per_kept_token"] = 1000 * row["ms"] / row["keep"]
    return {"tokens": tokens, "hidden": hidden, "setup_ms": setup, "by_keep": by_keep, "fixed_keep": fixed_keep,
            "by_tokens": by_tokens,
            "exponent_in_k": loglog_slope([r["keep"] for r in by_keep], [r["ms"] for r in by_keep]),
            "exponent_in_n": loglog_slope([r["tokens"] for r in by_tokens], [r["ms"] for r in by_tokens])}


def uniprunebench_divprune(features: torch.Tensor, keep: int) -> torch.Tensor:
    """UniPruneBench's DivPrune (``methods/DivPrune_PreLLM.py``), re-implemented from its description for timing
    only: the N x N cosine distances, the seed from each column's two smallest, then at step i the column minimum
    over the i chosen rows gathered again (O(K^2 N)); selection order."""
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - torch.mm(unit, unit.t())
    chosen = torch.empty(keep, dtype=torch.long, device=features.device)
    for i in range(keep):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1]
        else:
            scores = torch.index_select(distance, 0, chosen[:i]).min(dim=0).values
        chosen[i] = torch.argmax(scores)
    return chosen


def divprune_versus_uniprunebench(tokens: int, hidden: int, keep: int, device) -> dict:
    """DivPrune end to end (distances, seed, greedy) here and in UniPruneBench, on the same features: wall times,
    their ratio, the shared N x N distance product's time (the bound on the ratio), and whether the selections are
    identical."""

    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(device)
    divprune_select(x[:64], 8)  # warm-up
    _, distances_ms = timed_ms(lambda: cosine_distance(x), device)
    ours, ours_ms = timed_ms(lambda: divprune_select(x, keep), device)
    theirs, theirs_ms = timed_ms(lambda: uniprunebench_divprune(x, keep), device)
    return {"tokens": tokens, "hidden": hidden, "keep": keep, "ours_ms": ours_ms, "uniprunebench_ms": theirs_ms,
            "ratio": theirs_ms / ours_ms, "distances_ms": distances_ms,
            "ratio_bound": theirs_ms / distances_ms, "same_selection": bool(torch.equal(ours.cpu(), theirs.cpu()))}


# --------------------------------------------------------------------------------------------------
# The ViT stage (part 5)
# --------------------------------------------------------------------------------------------------
# Configurations of the encoder table: (method at the stage block, its hyper-parameters); None = stock (the hooks
# installed, no method).
ENCODER_CONFIGS = {
    "stock": None,
    "tome_vit": ("tome_vit", {}),
    "tome_vit, TOME_PROP_ATTN=0": ("tome_vit", {"TOME_PROP_ATTN": "0"}),
    "random_vit": ("random_vit", {}),
}
ENCODER_TARGET = "tome_vit"  # the configuration the encoder target is read from
ENCODER_TARGET_SHARE = 0.8  # measured speed-up >= 0.8 x the FLOPs ideal
LLAVA_IMAGE_TOKEN = 500  # the random LLaVA's ids: no tokenizer, no prompt (only the encoder call is timed)


def build_llava(depth: int, hidden: int, heads: int, intermediate: int, image: int, patch: int, device, dtype,
                attn_implementation: str = "sdpa"):
    """A random LLaVA-1.5-shaped model (default weight init): a CLIP vision tower of the given shape (CLIP-L/14-336:
    24 blocks, 1024, 16 heads, 4096, 336 px, patch 14), features of its penultimate layer without the [CLS]
    ("default"), the two-layer projector, and a one-layer Llama of width 64 (never run here)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=depth,
                              num_attention_heads=heads, image_size=image, patch_size=patch,
                              projection_dim=min(hidden, 768), hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(image // patch) ** 2, tie_word_embeddings=False)
    return random_model(LlavaForConditionalGeneration, config, attn_implementation, device, dtype)


def encoder_flops(lengths: list[int], hidden: int, intermediate: int) -> float:
    """Matmul FLOPs of a ViT whose block i processes ``lengths[i]`` tokens (per image): attention projections
    4 N C^2, attention scores and weighted sum 2 N^2 C, MLP 2 N C I (multiply-adds, as the issue counts them;
    only ratios are reported)."""
    return sum(4 * n * hidden ** 2 + 2 * n * n * hidden + 2 * n * hidden * intermediate for n in lengths)


class StageMeter:
    """Records, during feature calls, the tokens each encoder block processes (pre-hooks on the blocks' first
    norm, which run after the ViT stage's own block pre-hooks) and the ViT stage's own work: the signals it
    computes on the block before a stage (keys, [CLS] row), the method's application between the blocks, and the
    outputs put back at full length. The stage functions are wrapped for the meter's lifetime (the instrument of
    this benchmark; ``encoder_stage.py`` itself is unchanged)."""

    WRAPPED = ((encoder_stage, "_block_signals"), (encoder_stage.EncoderRun, "_apply"),
               (encoder_stage.EncoderRun, "restore_outputs"))

    def __init__(self, blocks, device):
        self.device, self.lengths, self.stage_ns = device, [], 0
        self.handles = [block.layer_norm1.register_forward_pre_hook(self._length) for block in blocks]
        self.originals = []
        for owner, name in self.WRAPPED:
            original = getattr(owner, name)
            self.originals.append((owner, name, original))
            setattr(owner, name, self._timed(original))

    def _length(self, module, args):
        self.lengths.append(args[0].shape[1])

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.stage_ns += time.perf_counter_ns() - start
        return timed

    def reset(self):
        self.lengths, self.stage_ns = [], 0

    def close(self):
        for handle in self.handles:
            handle.remove()
        for owner, name, original in self.originals:
            setattr(owner, name, original)


def encoder_env(config: tuple[str, dict] | None, block: int, keep: float) -> dict:
    if config is None:
        return {}
    method, params = config
    return {"VIT_LAYER_SPECS": f"{block}:{method}:{keep:g}", **params}


def image_features(model, pixels: torch.Tensor):
    with torch.no_grad():
        return model.model.get_image_features(pixels, vision_feature_layer=-2, vision_feature_select_strategy="default")


def encoder_part(model, batches: list[int], block: int, keep: float, warmup: int, repeats: int, device) -> dict:
    """``get_image_features`` of each batch size, every configuration of ``ENCODER_CONFIGS`` interleaved
    round-robin (``warmup`` + ``repeats`` calls each; the best measured call), stock = the hooks installed without
    a method. Per configuration: the tokens each block processed, the FLOPs ratio from them, the stage's own time
    (median over the measured calls)."""
    vision = model.config.vision_config
    blocks = custom_llava._encoder_body(model.model.vision_tower).encoder.layers
    side = vision.image_size // vision.patch_size
    meter = StageMeter(blocks, device)
    per_batch = {}
    try:
        for batch in batches:
            pixels = torch.randn(batch, 3, vision.image_size, vision.image_size,
                                 generator=torch.Generator().manual_seed(batch)).to(device, model.dtype)
            times = {label: [] for label in ENCODER_CONFIGS}
            stage_ms = {label: [] for label in ENCODER_CONFIGS}
            lengths = {}
            for round_ in range(warmup + repeats):
                for i, (label, config) in enumerate(ENCODER_CONFIGS.items()):
                    print(f"\r  encoder, batch {batch}: round {round_ + 1}/{warmup + repeats}, "
                          f"{i + 1}/{len(ENCODER_CONFIGS)} {label:<28}", end="", file=sys.stderr, flush=True)
                    custom_llava.apply_patches(PruneConfig.from_env(encoder_env(config, block, keep)))
                    meter.reset()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter_ns()
                    image_features(model, pixels)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    elapsed = (time.perf_counter_ns() - start) / 1e6
                    lengths[label] = list(meter.lengths)
                    if round_ >= warmup:
                        times[label].append(elapsed)
                        stage_ms[label].append(meter.stage_ns / 1e6)
            print(file=sys.stderr)
            stock_ms = min(times["stock"])
            stock_flops = encoder_flops(lengths["stock"], vision.hidden_size, vision.intermediate_size)
            rows = []
            for label in ENCODER_CONFIGS:
                best = min(times[label])
                flops_ratio = encoder_flops(lengths[label], vision.hidden_size, vision.intermediate_size) / stock_flops
                rows.append({"config": label, "ms": best, "all_ms": times[label],
                             "stage_ms": statistics.median(stage_ms[label]), "time_ratio": best / stock_ms,
                             "flops_ratio": flops_ratio, "speedup": stock_ms / best, "ideal": 1 / flops_ratio,
                             "of_ideal": (stock_ms / best) * flops_ratio,
                             "tokens_per_block": sorted(set(lengths[label]), reverse=True),
                             "blocks_run": len(lengths[label])})
            per_batch[batch] = {"stock_ms": stock_ms, "rows": rows}
    finally:
        meter.close()
        custom_llava.remove_patches()
    return {"patches": side * side, "block": block, "keep": keep, "kept": keep_count(side * side, keep),
            "depth": len(blocks), "hidden": vision.hidden_size, "heads": vision.num_attention_heads,
            "intermediate": vision.intermediate_size, "image_size": vision.image_size,
            "patch_size": vision.patch_size, "repeats": repeats, "warmup": warmup, "batches": per_batch}


def vit_block(name: str, depth: int, last: int, fallback: int) -> int:
    """A ViT method's official block (its registered default, negative from the end), or ``fallback`` where that
    block is outside this encoder's 1..last (a toy encoder) or the method has a schedule instead (ToMe: timed as one
    stage making all its merges at ``fallback``)."""
    default = methods.registered_methods()[name].default_layer
    if default is None:
        return fallback
    block = default + depth if default < 0 else default
    return block if 1 <= block <= last else fallback


def vit_methods_part(model, names: list[str], stage_block: int, keep: float, repeats: int, stock_encoder_ms: float,
                     device) -> dict:
    """Each ViT method's own function on one image's N patches, on the hidden states entering its block of a stock
    call (and the signals the stage gives it: keys and [CLS] row of the block before, as the stage computes them):
    best of ``repeats`` calls, vs ``stock_encoder_ms`` (the stock ``get_image_features`` of one image)."""
    vision = model.config.vision_config
    blocks = custom_llava._encoder_body(model.model.vision_tower).encoder.layers
    side = vision.image_size // vision.patch_size
    depth = len(blocks)
    feature_block = depth - 2  # features of the penultimate layer (vision_feature_layer -2): block depth - 2's output
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size,
                         generator=torch.Generator().manual_seed(576)).to(device, model.dtype)
    where = {name: vit_block(name, depth, feature_block, stage_block) for name in names}
    entering, normed = {}, {}

    def capture(store, block):
        def hook(module, args, kwargs):
            store[block] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    handles = []
    for block in set(where.values()):
        handles.append(blocks[block].register_forward_pre_hook(capture(entering, block), with_kwargs=True))
        handles.append(blocks[block - 1].self_attn.register_forward_pre_hook(capture(normed, block), with_kwargs=True))
    try:
        custom_llava.remove_patches()
        image_features(model, pixels)
    finally:
        for handle in handles:
            handle.remove()

    def fastest(fn):
        return fastest_ms(fn, device, repeats)

    reader = encoder_stage.Encoder(model.model.vision_tower, blocks, True, (1, 1), len(blocks) - 1)  # CLIP q/k
    rows = {}
    for name in names:
        block = where[name]
        attn = blocks[block - 1].self_attn
        with torch.no_grad():
            signals_ms, signals = fastest(lambda: encoder_stage._block_signals(reader, attn, normed[block], None, None))
            spec = methods.registered_methods()[name]
            params = PruneConfig.from_env({"VIT_LAYER_SPECS": f"{block}:{name}:{keep:g}"}).params.get(name, {})
            patches = entering[block][0, 1:]
            ctx = PruneContext(features=patches, keep=keep_count(patches.shape[0], keep), grid=(1, side, side),
                               modality="image", stage=VIT, params=params, span_key=block, layer=block,
                               sizes=torch.ones(patches.shape[0], device=patches.device), _encoder=signals[0])
            spec.fn(ctx)  # warm-up
            method_ms, result = fastest(lambda: spec.fn(ctx))
        kept = result.indices if isinstance(result, PruneResult) else result
        rows[name] = {"block": block, "tokens": patches.shape[0], "kept": int(kept.numel()), "ms": method_ms,
                      "signals_ms": signals_ms, "percent": 100 * method_ms / stock_encoder_ms,
                      "signals_percent": 100 * signals_ms / stock_encoder_ms}
    return {"stock_encoder_ms": stock_encoder_ms, "keep": keep, "repeats": repeats, "methods": rows}


def video_part(bench: Bench, names: list[str], frames: int, side: int, ratios: list[float], device) -> dict:
    """Time to first token on one video, stock vs every video method at each ratio, next to the Amdahl limit."""
    inputs = make_video_inputs(bench.model, frames, side, device)
    configs = {"stock": {}, **{f"{name} {ratio:g}": method_env(name, ratio) for name in names for ratio in ratios}}
    samples = bench.profile(configs, inputs, f"video, {frames} frames")
    text_config = bench.model.config.get_text_config()
    prompt = inputs["input_ids"].shape[1]
    stock_ttft, stock_prefill = median(samples["stock"], "ttft_ms"), median(samples["stock"], "llm_prefill_ms")
    stock_flops = prefill_flops(text_config, [prompt] * text_config.num_hidden_layers)
    rows = []
    for label in configs:
        if label == "stock":
            continue
        name, ratio = label.rsplit(" ", 1)
        ttft = median(samples[label], "ttft_ms")
        ideal = stock_flops / prefill_flops(text_config, layer_lengths(samples[label][0], prompt,
                                                                       text_config.num_hidden_layers))
        limit = stock_ttft / (stock_ttft - stock_prefill + stock_prefill / ideal)  # only the LM prefill shrinks
        pruning = median(samples[label], "pruning_ms")
        rows.append({"method": name, "stage": methods.registered_methods()[name].stage, "keep": float(ratio),
                     "kept": int(samples[label][0]["metrics"].get("equivalent_visual_tokens") or 0),
                     "ttft_ms": ttft, "speedup": stock_ttft / ttft, "limit": limit,
                     "of_limit": stock_ttft / ttft / limit, "pruning_ms": pruning,
                     "pruning_percent": 100 * pruning / stock_prefill})
    return {"frames": frames, "tokens": (frames // 2) * side * side, "prompt_tokens": prompt,
            "stock_ttft_ms": stock_ttft, "stock_prefill_ms": stock_prefill,
            "stock_encoder_ms": median(samples["stock"], "vision_encoder_ms"), "rows": rows}


def kv_env(method: str, budget: float) -> dict:
    """A KV-cache configuration; observation windows at their official defaults."""
    return {"KV_METHOD": method, "KV_BUDGET": f"{budget:g}"}


def matched_keep(budget: float, prompt: int, visual: int, num_layers: int, first_layer: int) -> float | None:
    """The keep ratio at which token pruning from ``first_layer`` on (0: pre-LLM) leaves ``budget x prompt`` cached
    tokens per layer on average (the text stays), or None when no ratio in (0, 1] reaches it."""
    text = prompt - visual
    later = num_layers - first_layer
    if later <= 0:  # no layer after the pruning one: nothing to match
        return None
    per_later_layer = (budget * prompt * num_layers - first_layer * prompt) / later
    ratio = (per_later_layer - text) / visual
    return ratio if 0 < ratio <= 1 else None


def kv_part(bench: Bench, tokens: int, new_tokens: int, budgets: list[float], names: list[str],
            memory_budget: float, device, checkpoint=None) -> dict:
    """Decode time per token and peak memory at a long prompt and generation: stock, every KV method at every
    budget, and token pruning (pre-LLM and intra-LLM at layer 2) at the same mean cached tokens per layer.
    ``checkpoint(part)``, if given, receives the part measured so far after every round (``rounds_done``)."""
    inputs = make_inputs(bench.model, tokens, device)
    prompt = inputs["input_ids"].shape[1]
    layers = bench.model.config.get_text_config().num_hidden_layers
    configs = {"stock": {}}
    for budget in budgets:
        configs.update({f"{name} {budget:g}": kv_env(name, budget) for name in names})
        for method, first in (("uniform_pre_llm", 0), ("fastv_intra_llm", 2)):
            keep = matched_keep(budget, prompt, tokens, layers, first)
            if keep is not None:
                configs[f"{method} @{budget:g}"] = method_env(method, round(keep, 4))

    def part(samples: dict, peaks: dict) -> dict:
        stock_step = median(samples["stock"], "decode_ms_per_token")
        rows = []
        for label in configs:
            step = median(samples[label], "decode_ms_per_token")
            selection = median(samples[label], "pruning_ms")
            rows.append({"config": label, "cached_tokens": median(samples[label], "cached_tokens_per_layer"),
                         "kv_cache_mib": median(samples[label], "kv_cache_bytes") / 2 ** 20,
                         "ttft_ms": median(samples[label], "ttft_ms"), "decode_ms_per_token": step,
                         "step_vs_stock": step / stock_step, "selection_ms": selection,
                         "selection_per_step_percent": 100 * selection / (new_tokens - 1) / step,
                         "peak_increase_mib": peaks[label] / 2 ** 20 if label in peaks else None})
        return {"tokens": tokens, "prompt_tokens": prompt, "new_tokens": new_tokens, "budgets": budgets,
                "memory_budget": memory_budget, "rounds_done": len(samples["stock"]), "rows": rows}

    after_round = None if checkpoint is None else (lambda samples: checkpoint(part(samples, {})))
    saved, bench.new_tokens = bench.new_tokens, new_tokens
    try:
        samples = bench.profile(configs, inputs, f"KV cache, prompt {prompt}, {new_tokens} new tokens", after_round)
        memory_labels = ["stock"] + [label for label in configs if label.endswith(f"{memory_budget:g}")]
        peaks = {}
        for label in memory_labels:
            print(f"\r  peak memory, {label:<28}", end="", file=sys.stderr, flush=True)
            peaks[label] = bench.peak_memory(configs[label], inputs)
        print(file=sys.stderr)
    finally:
        bench.new_tokens = saved
    return part(samples, peaks)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def machine(device, threads: int) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "device": str(device), "torch_threads": threads, "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def targets(results: dict, check_size: int) -> list[tuple[str, bool | None, str]]:
    """(target, passed, detail); passed None when the run did not measure it (a part left out by --only / --skip
    gives no line)."""
    out = []
    if "speedup" in results:
        pre = next((r for r in results["speedup"]["rows"] if r["config"] == f"pre-LLM {KEEP:g}"), None)
        out.append(("pre-LLM at keep 0.25 reaches >= 0.9 of the ideal prefill speed-up",
                    None if pre is None else pre["of_ideal"] >= 0.9,
                    "not measured" if pre is None else
                    f"{pre['speedup']:.2f}x of {pre['ideal']:.2f}x ideal = {pre['of_ideal']:.2f}"))
    if "overhead" in results:
        sizes = results["overhead"]["sizes"]
        if check_size in sizes:
            linear = {n: m for n, m in sizes[check_size]["methods"].items() if n not in QUADRATIC}
            over = {n: m["percent"] for n, m in linear.items() if m["percent"] > 2}
            quadratic = sorted(n for n in sizes[check_size]["methods"] if n in QUADRATIC)
            worst = max(linear.items(), key=lambda item: item[1]["percent"], default=None)
            out.append((f"every non-quadratic method's own time <= 2 % of stock prefill at N = {check_size}",
                        None if worst is None else not over,
                        (f"over: {', '.join(f'{n} {p:.2f} %' for n, p in over.items())}" if over else
                         "no non-quadratic method measured" if worst is None else
                         f"worst {worst[0]} {worst[1]['percent']:.2f} %")
                        + f"; quadratic by their official algorithm, reported only: {', '.join(quadratic) or 'none'}"))
        else:
            out.append((f"method time <= 2 % at N = {check_size}", None, f"N = {check_size} not in --sizes"))
    if "memory" in results:
        memory = results["memory"]
        worst = max(memory["ratio"].items(), key=lambda item: item[1])
        out.append((f"attention-scored intra-LLM peak memory <= 1.1x stock at a {memory['prompt_tokens']}-token "
                    f"prompt", worst[1] <= 1.1, f"worst {worst[0]} {worst[1]:.3f}x (peak increase; with the weights "
                                                f"{memory['ratio_with_weights'][worst[0]]:.3f}x)"))
    if "divprune" in results:
        scaling = results["divprune"]
        out.append(("DivPrune's greedy selection is O(K N), not O(K^2 N)", scaling["exponent_in_k"] < 1.5,
                    f"time ~ K^{scaling['exponent_in_k']:.2f} at N = {scaling['tokens']}, "
                    f"~ N^{scaling['exponent_in_n']:.2f} at K = {scaling['fixed_keep']}"))
    versus = results.get("divprune_vs_uniprunebench")
    if versus:
        out.append((f"DivPrune >= 20x faster than UniPruneBench's at N = {versus['tokens']}, keep {versus['keep']}, "
                    f"D = {versus['hidden']}, same selection", versus["ratio"] >= 20 and versus["same_selection"],
                    f"{versus['ratio']:.1f}x ({versus['ours_ms']:.0f} vs {versus['uniprunebench_ms']:.0f} ms), "
                    f"same selection: {versus['same_selection']}; the shared N x N distance product alone takes "
                    f"{versus['distances_ms']:.0f} ms, bounding the ratio at {versus['ratio_bound']:.1f}x"))
    encoder = results.get("encoder")
    if encoder:
        rows = {batch: next(r for r in part["rows"] if r["config"] == ENCODER_TARGET)
                for batch, part in encoder["batches"].items()}
        out.append((f"the encoder's measured time falls to within {ENCODER_TARGET_SHARE} of its FLOPs ratio "
                    f"({ENCODER_TARGET} before block {encoder['block']} of {encoder['depth']}, "
                    f"keep {encoder['keep']:g}: "
                    f"measured speed-up >= {ENCODER_TARGET_SHARE} x the FLOPs ideal, every batch size)",
                    all(r["of_ideal"] >= ENCODER_TARGET_SHARE for r in rows.values()),
                    "; ".join(f"batch {batch}: {r['speedup']:.2f}x measured (time ratio {r['time_ratio']:.3f}) of "
                              f"{r['ideal']:.2f}x ideal (FLOPs ratio {r['flops_ratio']:.3f}) = {r['of_ideal']:.2f}"
                              for batch, r in rows.items())))
    video = results.get("video")
    if video and video["rows"]:
        pre = [r for r in video["rows"] if r["stage"] == "pre_llm"]
        worst = min(pre, key=lambda r: r["of_limit"], default=None)
        out.append((f"pre-LLM video pruning reaches >= 0.9 of the Amdahl limit ({video['frames']}-frame clip)",
                    None if worst is None else all(r["of_limit"] >= 0.9 for r in pre),
                    "no pre-LLM video method" if worst is None else
                    f"worst {worst['method']} at {worst['keep']:g}: {worst['speedup']:.2f}x of {worst['limit']:.2f}x "
                    f"limit = {worst['of_limit']:.2f}"))
        linear = [r for r in video["rows"] if r["method"] not in QUADRATIC]
        over = [r for r in linear if r["pruning_percent"] > 2]
        costly = max(linear, key=lambda r: r["pruning_percent"], default=None)
        out.append(("no linear-cost video method costs more than 2 % of the stock prefill", not over,
                    ", ".join(f"{r['method']} {r['keep']:g}: {r['pruning_percent']:.2f} %" for r in over) if over else
                    "no linear-cost video method" if costly is None else
                    f"worst {costly['method']} {costly['pruning_percent']:.2f} %"))
    kv = results.get("kv")
    if kv:
        at = [r for r in kv["rows"] if r["config"].endswith("_kv 0.25")]
        worst = max(at, key=lambda r: r["step_vs_stock"], default=None)
        out.append((f"a KV method's decode step at budget 0.25 costs <= 0.6x the stock step ({kv['prompt_tokens']}-token "
                    f"prompt, {kv['new_tokens']} new tokens)", None if worst is None else worst["step_vs_stock"] <= 0.6,
                    "budget 0.25 not measured" if worst is None else
                    f"worst {worst['config']}: {worst['step_vs_stock']:.2f}x"))
        methods_rows = [r for r in kv["rows"] if "_kv " in r["config"]]
        linear = [r for r in methods_rows if r["config"].split()[0] not in QUADRATIC]
        costly = max(linear, key=lambda r: r["selection_per_step_percent"], default=None)
        quadratic = sorted({r["config"].split()[0] for r in methods_rows} - {r["config"].split()[0] for r in linear})
        out.append(("a KV method's selection adds <= 5 % to a decode step (its once-per-prompt work over the "
                    "generated tokens)", None if costly is None else costly["selection_per_step_percent"] <= 5,
                    ("no linear-cost KV method measured" if costly is None else
                     f"worst {costly['config']}: {costly['selection_per_step_percent']:.1f} % "
                     f"({costly['selection_ms']:.0f} ms)")
                    + f"; quadratic by their official algorithm, reported only: {', '.join(quadratic) or 'none'}"))
    return out


def table(headers: list[str], rows: list[list]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def report(results: dict, check_size: int) -> str:
    lines = []
    speed = results.get("speedup")
    if speed:
        lines += [f"## Prefill speed-up vs keep ratio (N = {speed['tokens']} visual tokens, prompt "
                  f"{speed['prompt_tokens']} tokens)", "",
                  table(["configuration", "prefill ms", "pruning ms", "speed-up", "ideal (FLOPs)", "of ideal"],
                        [[r["config"], f"{r['prefill_ms']:.1f}", f"{r['pruning_ms']:.2f}", f"{r['speedup']:.2f}x",
                          f"{r['ideal']:.2f}x", f"{r['of_ideal']:.2f}"] for r in speed["rows"]]),
                  "", f"Hooks installed, no method (stock) vs patches removed: TTFT "
                      f"{100 * speed['stock_hook_overhead_ttft']:+.1f} %", ""]
    over = results.get("overhead")
    if over:
        sizes = list(over["sizes"])
        names = list(over["sizes"][sizes[0]]["methods"])
        header = ["method", "official cost"] + [f"% at {n}" for n in sizes] + [f"ms at {sizes[-1]}"]
        if len(sizes) > 1:
            header.append(f"exponent {sizes[0]}→{sizes[-1]}")
        header.append(f"encoder +% at {sizes[-1]}")
        rows = []
        for name in names:
            last = over["sizes"][sizes[-1]]["methods"][name]
            row = [name, f"quadratic: {QUADRATIC[name]}" if name in QUADRATIC else "linear"]
            row += [f"{over['sizes'][n]['methods'][name]['percent']:.2f}" for n in sizes] + [f"{last['ms']:.1f}"]
            if len(sizes) > 1:
                row.append(f"{last['exponent']:.2f}")
            row.append(f"{last['encoder_extra_percent']:+.1f}")
            rows.append(row)
        lines += [f"## Method time as % of stock prefill (keep {over['keep']}; stock prefill: "
                  + ", ".join(f"{over['sizes'][n]['stock_prefill_ms']:.0f} ms at {n}" for n in sizes) + ")", "",
                  table(header, rows), ""]
    memory = results.get("memory")
    if memory:
        lines += [f"## Peak memory at a {memory['prompt_tokens']}-token prompt (keep {memory['keep']}; weights "
                  f"{memory['weights_bytes'] / 2 ** 20:.0f} MiB)", "",
                  table(["configuration", "peak increase MiB", "vs stock", "vs stock, weights included"],
                        [[label, f"{b / 2 ** 20:.1f}", "" if label == "stock" else f"{memory['ratio'][label]:.3f}x",
                          "" if label == "stock" else f"{memory['ratio_with_weights'][label]:.3f}x"]
                         for label, b in memory["peak_increase_bytes"].items()]), ""]
    scaling = results.get("divprune")
    if scaling:
        lines += [f"## DivPrune's greedy selection (D = {scaling['hidden']}; the K-independent setup, N x N distances "
                  f"and seed, at N = {scaling['tokens']}: {scaling['setup_ms']:.1f} ms)", "",
                  table(["K (N = %d)" % scaling["tokens"], "greedy ms", "µs per kept token"],
                        [[r["keep"], f"{r['ms']:.1f}", f"{r['us_per_kept_token']:.1f}"] for r in scaling["by_keep"]]),
                  "", table([f"N (K = {scaling['fixed_keep']})", "greedy ms"],
                            [[r["tokens"], f"{r['ms']:.1f}"] for r in scaling["by_tokens"]]),
                  "", f"Greedy time ~ K^{scaling['exponent_in_k']:.2f} at fixed N and "
                      f"~ N^{scaling['exponent_in_n']:.2f} at fixed K: O(K N) as implemented (a running minimum) "
                      f"gives exponents <= 1; the official loop, which takes the minimum over every chosen row again "
                      f"at each step, is O(K^2 N): 2 in K.", ""]
    encoder = results.get("encoder")
    if encoder:
        lines += [f"## ViT stage: encoder time (CLIP {encoder['depth']} blocks, width {encoder['hidden']}, "
                  f"{encoder['heads']} heads, MLP {encoder['intermediate']}, {encoder['image_size']} px / "
                  f"{encoder['patch_size']}: {encoder['patches']} patches + [CLS]; stage before block "
                  f"{encoder['block']}, keep {encoder['keep']:g} = {encoder['kept']} patches; best of "
                  f"{encoder['repeats']})", "",
                  table(["configuration", "batch", "encoder ms", "stage ms", "time ratio", "FLOPs ratio",
                         "speed-up", "ideal (FLOPs)", "of ideal", "tokens per block"],
                        [[r["config"], batch, f"{r['ms']:.1f}", f"{r['stage_ms']:.1f}", f"{r['time_ratio']:.3f}",
                          f"{r['flops_ratio']:.3f}", f"{r['speedup']:.2f}x", f"{r['ideal']:.2f}x",
                          f"{r['of_ideal']:.2f}", " → ".join(str(n) for n in r["tokens_per_block"])]
                         for batch, part in encoder["batches"].items() for r in part["rows"]]),
                  "", "encoder ms: the whole get_image_features call (projector included), the stage's own work "
                      "included; stage ms: that work alone (the signals of the block before, the method, the outputs "
                      "put back at full length; median); FLOPs ratio: the blocks' matmuls only, from the tokens each "
                      "block processed, the stage excluded.", ""]
    vit = results.get("vit_methods")
    if vit:
        lines += [f"## ViT methods' own time as % of the stock encoder (one image, "
                  f"{vit['stock_encoder_ms']:.0f} ms; keep {vit['keep']:g}; best of {vit['repeats']})", "",
                  table(["method", "official cost", "block", "N", "kept", "method ms", "% of encoder",
                         "signals ms", "signals %"],
                        [[name, f"quadratic: {QUADRATIC[name]}" if name in QUADRATIC else "linear", r["block"],
                          r["tokens"], r["kept"], f"{r['ms']:.2f}", f"{r['percent']:.2f}", f"{r['signals_ms']:.2f}",
                          f"{r['signals_percent']:.2f}"] for name, r in vit["methods"].items()]),
                  "", "method ms: the method function on the hidden states entering its block; signals ms: the keys "
                      "and [CLS] row of the block before, which the stage computes for every ViT method.", ""]
    video = results.get("video")
    if video:
        lines += [f"## Video: {video['frames']} frames, {video['tokens']} visual tokens, prompt {video['prompt_tokens']} "
                  f"(stock: TTFT {video['stock_ttft_ms']:.0f} ms, encoder {video['stock_encoder_ms']:.0f} ms, "
                  f"language-model prefill {video['stock_prefill_ms']:.0f} ms)", "",
                  table(["method", "stage", "keep", "equivalent tokens", "TTFT ms", "speed-up", "Amdahl limit",
                         "of limit", "method ms", "% of stock prefill", "official cost"],
                        [[r["method"], r["stage"], f"{r['keep']:g}", r["kept"], f"{r['ttft_ms']:.0f}",
                          f"{r['speedup']:.2f}x", f"{r['limit']:.2f}x", f"{r['of_limit']:.2f}", f"{r['pruning_ms']:.1f}",
                          f"{r['pruning_percent']:.2f}",
                          f"quadratic: {QUADRATIC[r['method']]}" if r["method"] in QUADRATIC else "linear"]
                         for r in video["rows"]]),
                  "", "Amdahl limit: the TTFT speed-up if the language model's prefill fell by its FLOPs ratio and the "
                      "encoder and the rest of generate stayed as measured in the stock run.", ""]
    kv = results.get("kv")
    if kv:
        lines += [f"## KV cache vs token pruning at equal cache size (prompt {kv['prompt_tokens']} tokens, "
                  f"{kv['new_tokens']} new tokens; peak memory at budget {kv['memory_budget']:g})", "",
                  table(["configuration", "cached tokens / layer", "KV MiB", "TTFT ms", "decode ms / token",
                         "vs stock", "selection ms", "selection / step %", "peak increase MiB"],
                        [[r["config"], f"{r['cached_tokens']:.0f}", f"{r['kv_cache_mib']:.1f}", f"{r['ttft_ms']:.0f}",
                          f"{r['decode_ms_per_token']:.2f}", f"{r['step_vs_stock']:.2f}x", f"{r['selection_ms']:.0f}",
                          f"{r['selection_per_step_percent']:.1f}",
                          "" if r["peak_increase_mib"] is None else f"{r['peak_increase_mib']:.0f}"]
                         for r in kv["rows"]]),
                  "", "`@b`: token pruning at the keep ratio whose mean cached tokens per layer equal KV budget b's.", ""]
    lines += ["## Targets", ""]
    for name, passed, detail in targets(results, check_size):
        verdict = "NOT MEASURED" if passed is None else "PASS" if passed else "FAIL"
        lines.append(f"{verdict}: {name} ({detail})")
    info = results["machine"]
    lines += ["", f"Machine: {info['cpu']}, {info['cpu_count']} cores, torch threads {info['torch_threads']}, "
                  f"{info.get('gpu', 'no GPU')}, torch {info['torch']}; load average at start / end: "
                  f"{results['load_average'][0]} / {results['load_average'][1]}; {results.get('date', '')}; "
                  f"parts: {', '.join(results.get('parts', PARTS))}; {results['seconds']:.0f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=2752)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096],
                        help="visual tokens N for the method-time table (the target is checked at --check-size)")
    parser.add_argument("--check-size", type=int, default=4096)
    parser.add_argument("--speedup-tokens", type=int, default=1024)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--memory-tokens", type=int, default=8192, help="visual tokens of the memory prompt")
    parser.add_argument("--methods", nargs="+", default=None, help="methods of the time table (default: all)")
    parser.add_argument("--divprune-tokens", type=int, default=4096)
    parser.add_argument("--compare-hidden", type=int, default=3584,
                        help="feature width of the DivPrune vs UniPruneBench comparison (Qwen2.5-VL-7B: 3584; "
                             "0 skips it: about a minute on one CPU core)")
    parser.add_argument("--divprune-keeps", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--divprune-sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                        help="N of the second DivPrune table (K fixed at the smallest --divprune-keeps)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up generate calls per configuration")
    parser.add_argument("--repeats", type=int, default=3, help="measured generate calls per configuration")
    parser.add_argument("--vit-depth", type=int, default=24, help="CLIP blocks of the encoder model (CLIP-L: 24)")
    parser.add_argument("--vit-hidden", type=int, default=1024)
    parser.add_argument("--vit-heads", type=int, default=16)
    parser.add_argument("--vit-intermediate", type=int, default=4096)
    parser.add_argument("--vit-image", type=int, default=336, help="image side in pixels (patches: (image/patch)^2)")
    parser.add_argument("--vit-patch", type=int, default=14)
    parser.add_argument("--vit-block", type=int, default=None,
                        help="encoder block the ViT stage runs before (default: depth // 2, 12 of CLIP-L's 24)")
    parser.add_argument("--vit-keep", type=float, default=0.5, help="keep ratio of the ViT stage")
    parser.add_argument("--vit-batches", type=int, nargs="+", default=[1, 4], help="images per encoder call")
    parser.add_argument("--vit-warmup", type=int, default=1, help="warm-up encoder calls per configuration")
    parser.add_argument("--vit-repeats", type=int, default=3, help="measured encoder calls per configuration (best)")
    parser.add_argument("--video-frames", type=int, default=16, help="frames of the video clip (2 per temporal patch)")
    parser.add_argument("--video-side", type=int, default=16, help="tokens per side of one temporal patch")
    parser.add_argument("--video-ratios", type=float, nargs="+", default=[0.25, 0.1])
    parser.add_argument("--kv-tokens", type=int, default=8192, help="visual tokens of the KV-cache part's prompt")
    parser.add_argument("--kv-new-tokens", type=int, default=256, help="tokens generated in the KV-cache part")
    parser.add_argument("--kv-budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--kv-memory-budget", type=float, default=0.25, help="budget of the peak-memory pass")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=None,
                        help="run only these parts (speedup, overhead, memory, divprune, compare = DivPrune vs "
                             "UniPruneBench, encoder = the ViT stage and the ViT methods' own time, video = the "
                             "video methods on a clip)")
    parser.add_argument("--skip", nargs="+", choices=PARTS, default=[], help="leave these parts out")
    parser.add_argument("--out", default="bench_outputs/bench_pruning.json")
    args = parser.parse_args(argv)

    parts = [part for part in (args.only or PARTS) if part not in args.skip]
    if not args.compare_hidden and "compare" in parts:
        parts.remove("compare")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started, load_start = time.time(), os.getloadavg()[0]
    registry = methods.load_methods()
    names = args.methods or list(registry)
    unknown = [name for name in names if name not in registry]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; registered: {', '.join(registry)}")
    llm_names = [name for name in names if registry[name].stage in (PRE_LLM, INTRA_LLM)]  # the prefill table
    vit_names = [name for name in names if registry[name].stage == VIT]  # the ViT table (the CLIP model)
    results = {"model": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                         "kv_heads": args.kv_heads, "intermediate": args.intermediate, "dtype": args.dtype},
               "machine": machine(device, torch.get_num_threads()), "warmup": args.warmup, "repeats": args.repeats,
               "parts": parts, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(part: str) -> None:
        save_so_far(results, out, started, part)

    video_names = [name for name in names if registry[name].video]
    kv_names = [name for name in names if registry[name].stage == KV]
    if {"speedup", "overhead", "memory", "video", "kv"} & set(parts):
        model = build_model(args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate, device,
                            getattr(torch, args.dtype))
        bench = Bench(model, args.warmup, args.repeats)
        try:  # every generate call installs its own configuration; none may outlive the benchmark
            if "speedup" in parts:
                results["speedup"] = speedup_part(bench, args.speedup_tokens, args.ratios, device)
                save("speedup")
            if "overhead" in parts and llm_names:
                results["overhead"] = overhead_part(bench, args.sizes, llm_names, device)
                save("overhead")
            if "memory" in parts:
                results["memory"] = memory_part(bench, args.memory_tokens,
                                                [n for n in ATTENTION_SCORED if n in methods.registered_methods()],
                                                device)
                save("memory")
            if "video" in parts:
                results["video"] = video_part(bench, video_names, args.video_frames, args.video_side,
                                              args.video_ratios, device)
                save("video")
            if "kv" in parts and kv_names:
                def kv_checkpoint(part: dict) -> None:
                    results["kv"] = part
                    save(f"kv round {part['rounds_done']}")

                results["kv"] = kv_part(bench, args.kv_tokens, args.kv_new_tokens, args.kv_budgets, kv_names,
                                        args.kv_memory_budget, device, kv_checkpoint)
                save("kv")
        finally:
            custom_qwenvl.remove_patches()
        del model, bench
    if "divprune" in parts:
        results["divprune"] = divprune_part(args.divprune_tokens, args.hidden, args.divprune_keeps,
                                            args.divprune_sizes, args.repeats, device)
        save("divprune")
    if "compare" in parts:
        print("  DivPrune vs UniPruneBench's implementation", file=sys.stderr, flush=True)
        results["divprune_vs_uniprunebench"] = divprune_versus_uniprunebench(
            args.divprune_tokens, args.compare_hidden, round(KEEP * args.divprune_tokens), device)
        save("divprune_vs_uniprunebench")
    if "encoder" in parts:
        llava = build_llava(args.vit_depth, args.vit_hidden, args.vit_heads, args.vit_intermediate, args.vit_image,
                            args.vit_patch, device, getattr(torch, args.dtype))
        block = args.vit_block if args.vit_block is not None else args.vit_depth // 2
        results["vit_model"] = {"depth": args.vit_depth, "hidden": args.vit_hidden, "heads": args.vit_heads,
                                "intermediate": args.vit_intermediate, "image": args.vit_image,
                                "patch": args.vit_patch, "dtype": args.dtype}
        results["encoder"] = encoder_part(llava, args.vit_batches, block, args.vit_keep, args.vit_warmup,
                                          args.vit_repeats, device)
        one = results["encoder"]["batches"].get(1)
        if vit_names:
            if one is None:  # the share is of one image's stock encoder call
                one = encoder_part(llava, [1], block, args.vit_keep, args.vit_warmup, args.vit_repeats,
                                   device)["batches"][1]
            results["vit_methods"] = vit_methods_part(llava, vit_names, block, args.vit_keep,
                                                      max(args.vit_repeats, 3), one["stock_ms"], device)
        del llava
        save("encoder")
    results["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    results["seconds"] = time.time() - started
    results["targets"] = [{"target": t, "passed": p, "detail": d} for t, p, d in targets(results, args.check_size)]
    text = report(results, args.check_size)
    print(text)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
