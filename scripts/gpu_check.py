"""The GPU path in one command: exactness in bf16 under the attention kernels users run, and CUDA-timed speed-ups.

On mid-size random models built from config classes (no download): a Qwen2.5-VL (the benchmark's model,
``scripts/bench_pruning.py``) and a Gemma 4 shaped like the on-device release (the calibration model's
architecture, ``calibration/models.py``, widened). For every attention implementation available (``sdpa``, and
``flash_attention_2`` when flash-attn is installed and the device is CUDA), in bfloat16:

1. keep ratio 1.0 is bit-identical to the unpatched model (prefill logits and greedy ids), pre-LLM and intra-LLM,
   both models;
2. Qwen2.5-VL: pre-LLM pruning equals the unpatched language model on the hand-shortened sequence with the
   original positions, and intra-LLM pruning equals a hand-written loop over the decoder layers (prefill logits;
   bf16 tolerance: the reference's greedy token must be the same and the largest difference at most
   ``TOLERANCE`` of the logits' scale: bf16 keeps 8 bits of mantissa, 2^-8 = 0.4 % per rounding);
3. Gemma 4: the same pruned run under each attention implementation keeps the same tokens and greedy ids;
4. the profiler (CUDA events on a GPU) on Qwen2.5-VL: prefill, TTFT and decode time per token for stock and for
   pre-LLM / intra-LLM pruning at keep 0.25 and 0.111, the prefill speed-up next to the FLOPs ideal, the KV-cache
   bytes and the peak memory increase of one generate call;
5. evaluation throughput (``scripts/bench_throughput.py``, part 1): samples per second of the runner's generation
   path vs ``--batch-size`` on the calibration model and the benchmark's mid-size random Qwen2.5-VL, stock and
   pruned; batched greedy answers must equal one-at-a-time answers on the calibration model (the random model's
   are reported: its near-ties may break differently when a kernel rounds a padded batch differently);
6. the ViT stage on a LLaVA-1.5-shaped model (CLIP-L/14-336 tower, ``scripts/bench_pruning.py``'s), sdpa: keep 1.0
   gives the stock image features bit for bit, ToMe halving the patches before block 12 changes them, and the encoder
   time stock vs ToMe / random at that block, next to the FLOPs ideal (``bench_pruning.encoder_part``). FlashAttention-2
   is not checked: the ViT stage refuses it (it needs an additive attention mask).

Part 5, the longest, runs last. Prints PASS/FAIL lines (exit 1 if any fails) and writes one JSON (``--out``), updated
after every part so that a run stopped part-way keeps what it measured. Installs nothing.

    python scripts/gpu_check.py                  # on a GPU machine: a few minutes
    python scripts/gpu_check.py --size 7b        # the same with 7B-class decoders (speed-ups a 7B model sees)
    python scripts/gpu_check.py --dry-run        # structure only, tiny models on the CPU (the tests run this)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import custom_gemma4  # noqa: E402
import custom_llava  # noqa: E402
import custom_qwenvl  # noqa: E402
from calibration.models import GEMMA4, gemma_config  # noqa: E402
from scripts import bench_pruning as bench  # noqa: E402
from scripts import bench_throughput  # noqa: E402
from utils import PruneConfig  # noqa: E402

TOLERANCE = 0.02  # of the largest |logit|: a few bf16 roundings (2^-8 each) between two equal computations
RATIOS = (0.25, 0.111)
STEPS = 4  # greedy steps compared
# name -> sizes; dry-run: tiny, for the structure test on a CPU
SIZES = {
    "full": dict(layers=8, hidden=1024, heads=16, kv_heads=4, intermediate=2816, tokens=2048, new_tokens=32,
                 warmup=2, repeats=5),
    # A 7B-class decoder (Qwen2.5-VL-7B's text shape): a prefill long enough for a GPU to be bound by arithmetic,
    # so that the speed-ups are those a 7B model sees ("full" leaves an H200 bound by kernel launches and the
    # methods' own work: docs/benchmark.md)
    "7b": dict(layers=28, hidden=3584, heads=28, kv_heads=4, intermediate=18944, tokens=2048, new_tokens=32,
               warmup=2, repeats=5),
    "dry-run": dict(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128, tokens=64, new_tokens=3,
                    warmup=0, repeats=1),
}
# Part 6 (the ViT stage): the CLIP tower's shape, the stage block, the batch sizes timed.
VIT = {
    "full": dict(depth=24, hidden=1024, heads=16, intermediate=4096, image=336, patch=14, block=12, batches=(1, 8),
                 warmup=2, repeats=5),
    "dry-run": dict(depth=4, hidden=32, heads=4, intermediate=64, image=84, patch=14, block=2, batches=(1,),
                    warmup=0, repeats=1),
}
# Part 5 (bench_throughput.batch_part): questions, batch sizes, rounds, new tokens, the mid-size model's shape.
THROUGHPUT = {
    "full": dict(samples=64, batch_sizes=(1, 2, 4, 8, 16), rounds=2, new_tokens=(4, 32),
                 mid_size=bench_throughput.MID_SIZE),
    "dry-run": dict(samples=2, batch_sizes=(1, 2), rounds=1, new_tokens=(2,),
                    mid_size=dict(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128)),
}


# --------------------------------------------------------------------------------------------------
# Models and inputs
# --------------------------------------------------------------------------------------------------
def qwen_model(size: dict, attn: str, device, dtype):
    return bench.build_model(size["layers"], size["hidden"], size["heads"], size["kv_heads"], size["intermediate"],
                             device, dtype, attn_implementation=attn, init_on_device=True)


def gemma_model(size: dict, attn: str, device, dtype):
    """The calibration Gemma 4 architecture (per-layer inputs, sliding layers then a full one, soft-capping),
    widened to the check's size; random weights (transformers' init, seed 0)."""
    from transformers import Gemma4ForConditionalGeneration

    head_dim = size["hidden"] // size["heads"]
    config = gemma_config(
        hidden_size=size["hidden"], intermediate_size=size["intermediate"], num_hidden_layers=size["layers"],
        layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * (size["layers"] // 4),
        num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"], head_dim=head_dim,
        global_head_dim=2 * head_dim, max_position_embeddings=8 * size["tokens"],
        sliding_window=max(32, size["tokens"] // 4))  # shorter than the prompt: the window matters
    return bench.random_model(Gemma4ForConditionalGeneration, config, attn, device, dtype, init_on_device=True)


def gemma_inputs(model, size: dict, device) -> dict:
    """One random image at the soft-token budget nearest the check's size, between two stretches of text,
    through the real Gemma 4 processor and chat template."""
    from PIL import Image

    processor = copy.deepcopy(GEMMA4.build_processor())
    budget = min((b for b in (70, 140, 280, 560, 1120) if b >= size["tokens"] // 2), default=1120)
    images = processor.image_processor
    images.max_soft_tokens = budget
    side = images.patch_size * images.pooling_kernel_size * int(np.sqrt(budget))  # px per soft token x tokens per side
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    message = [{"role": "user", "content": [{"type": "text", "text": "Describe the picture."},
                                            {"type": "image", "image": Image.fromarray(pixels)},
                                            {"type": "text", "text": "What colour is the square?"}]}]
    inputs = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    return {k: (v.to(device, model.dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}


FAMILIES = {"qwen2.5-vl": (custom_qwenvl, qwen_model, lambda model, size, device: bench.make_inputs(
    model, size["tokens"], device)), "gemma4": (custom_gemma4, gemma_model, gemma_inputs)}


# --------------------------------------------------------------------------------------------------
# Exactness
# --------------------------------------------------------------------------------------------------
class Patched:
    """A family's patches applied with a configuration given as environment strings (None: unpatched)."""

    def __init__(self, patches, env: dict | None):
        self.patches, self.env = patches, env

    def __enter__(self):
        if self.env is not None:
            self.patches.apply_patches(PruneConfig.from_env(self.env))

    def __exit__(self, *exc):
        self.patches.remove_patches()


def run(model, inputs: dict, patches, env: dict | None) -> dict:
    """Prefill logits, greedy ids, and the kept index of each stage (for the references)."""
    with Patched(patches, env), torch.no_grad():
        logits = model(**inputs).logits.float()
        state = patches.pruning_state(model)
        maps = {"pre": state.pre_map.index.clone() if state and state.pre_map is not None else None,
                "intra": [m.index.clone() for m in state.intra_maps] if state else []}
        ids = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)[:, -STEPS:]
    return {"logits": logits, "ids": ids, "maps": maps}


def lm_inputs(model, inputs: dict) -> dict:
    """The unpatched language model's keyword inputs for this prompt."""
    captured = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return captured


def gather(x, index, dim=1):
    """``x`` gathered along ``dim`` with a (B, L') index. Written here rather than taken from ``hooks`` so that the
    references do not share code with what they check."""
    shape = [1] * x.dim()
    shape[dim - 1], shape[dim] = index.shape
    return torch.gather(x, dim, index.view(shape).expand(*x.shape[:dim], index.shape[1], *x.shape[dim + 1:]))


def qwen_pre_reference(model, lm: dict, keep) -> torch.Tensor:
    """The unpatched language model on the kept embeddings with their original 3-D positions."""
    tm = model.model.language_model
    positions = gather(lm["position_ids"][-3:], keep, dim=2)
    out = tm(inputs_embeds=gather(lm["inputs_embeds"], keep), position_ids=positions, attention_mask=None)
    return model.lm_head(out.last_hidden_state).float()


def qwen_intra_reference(model, lm: dict, keep, layer_k: int) -> torch.Tensor:
    """Every layer by hand: the full sequence before layer K, the kept tokens (with their positions) after."""
    from transformers.masking_utils import create_causal_mask

    tm = model.model.language_model
    hidden = lm["inputs_embeds"]
    cos, sin = tm.rotary_emb(hidden, lm["position_ids"][-3:])
    for i, layer in enumerate(tm.layers):
        if i == layer_k:
            hidden, cos, sin = gather(hidden, keep), gather(cos, keep), gather(sin, keep)
        causal = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None)
        hidden = layer(hidden, attention_mask=causal, position_embeddings=(cos, sin), position_ids=None)
    return model.lm_head(tm.norm(hidden)).float()


def close(pruned: torch.Tensor, reference: torch.Tensor) -> tuple[bool, float]:
    diff = float((pruned - reference).abs().max())
    same_token = bool(torch.equal(pruned[:, -1].argmax(-1), reference[:, -1].argmax(-1)))
    return same_token and diff <= TOLERANCE * float(reference.abs().max()), diff


def exactness(family: str, model, inputs: dict, intra_layer: int) -> list[dict]:
    patches = FAMILIES[family][0]
    checks = []
    stock = run(model, inputs, patches, None)
    ids_vary = len(set(stock["ids"].flatten().tolist())) > 1
    for label, env in (("pre-LLM", {"PRUNE_METHOD": "divprune_pre_llm"}),
                       ("intra-LLM", {"INTRA_LLM_LAYER_SPECS": f"{intra_layer}:fastv_intra_llm"})):
        same = run(model, inputs, patches, {**env, "KEEP_RATIO": "1.0"})
        checks.append({"check": f"keep 1.0 {label} bit-identical", "passed": bool(
            ids_vary and torch.equal(same["logits"], stock["logits"]) and torch.equal(same["ids"], stock["ids"]))})
    if family != "qwen2.5-vl":
        return checks
    lm = lm_inputs(model, inputs)
    with torch.no_grad():
        pre = run(model, inputs, patches, {"PRUNE_METHOD": "divprune_pre_llm", "KEEP_RATIO": "0.25"})
        passed, diff = close(pre["logits"], qwen_pre_reference(model, lm, pre["maps"]["pre"]))
        checks.append({"check": "pre-LLM 0.25 = LM on the shortened sequence", "passed": passed, "max_diff": diff})
        intra = run(model, inputs, patches, {"INTRA_LLM_LAYER_SPECS": f"{intra_layer}:fastv_intra_llm:0.25"})
        passed, diff = close(intra["logits"], qwen_intra_reference(model, lm, intra["maps"]["intra"][0], intra_layer))
        checks.append({"check": f"intra-LLM L{intra_layer} 0.25 = layer loop", "passed": passed, "max_diff": diff})
    return checks


def across_kernels(family: str, runs: dict[str, dict]) -> list[dict]:
    """The same pruned configuration under each attention implementation keeps the same tokens and ids."""
    kernels = list(runs)
    checks = []
    for other in kernels[1:]:
        a, b = runs[kernels[0]], runs[other]
        same_maps = all(torch.equal(x, y) for x, y in zip([a["maps"]["pre"], *a["maps"]["intra"]],
                                                          [b["maps"]["pre"], *b["maps"]["intra"]]) if x is not None)
        checks.append({"check": f"pruned {kernels[0]} vs {other}: same kept tokens and greedy ids",
                       "passed": bool(same_maps and torch.equal(a["ids"], b["ids"]))})
    return checks


# --------------------------------------------------------------------------------------------------
# Speed and memory (Qwen2.5-VL)
# --------------------------------------------------------------------------------------------------
def timings(model, size: dict, device, intra_layer: int) -> dict:
    inputs = bench.make_inputs(model, size["tokens"], device)
    meter = bench.Bench(model, size["warmup"], size["repeats"], new_tokens=size["new_tokens"])
    configs = {"stock": {}}
    for ratio in RATIOS:
        configs[f"pre-LLM {ratio:g}"] = bench.method_env("divprune_pre_llm", ratio)
        configs[f"intra-LLM L{intra_layer} {ratio:g}"] = {
            "INTRA_LLM_LAYER_SPECS": f"{intra_layer}:fastv_intra_llm:{ratio}"}
    try:
        samples = meter.profile(configs, inputs, "timings")
        peaks = {label: meter.peak_memory(env, inputs) for label, env in configs.items()}
    finally:
        custom_qwenvl.remove_patches()  # the meter leaves the last configuration installed
    text = model.config.get_text_config()
    prompt = inputs["input_ids"].shape[1]
    stock_prefill = bench.median(samples["stock"], "prefill_ms")
    stock_flops = bench.prefill_flops(text, [prompt] * text.num_hidden_layers)
    rows = []
    for label, env in configs.items():
        got = samples[label]
        flops = bench.prefill_flops(text, bench.layer_lengths(got[0], prompt, text.num_hidden_layers))
        row = {"config": label, **{metric: bench.median(got, metric) for metric in (
            "prefill_ms", "ttft_ms", "decode_ms_per_token", "kv_cache_bytes") if metric in got[0]["metrics"]}}
        row["speedup"] = stock_prefill / row["prefill_ms"]
        row["ideal"] = stock_flops / flops
        row["peak_memory_increase_bytes"] = peaks[label]
        rows.append(row)
    return {"prompt_tokens": prompt, "clock": samples["stock"][0].get("clock"), "rows": rows}


# --------------------------------------------------------------------------------------------------
# The ViT stage (LLaVA-1.5-shaped)
# --------------------------------------------------------------------------------------------------
def vit_stage(size: dict, device, dtype) -> tuple[list[dict], dict]:
    """Checks (keep 1.0 bit-identical, ToMe at 0.5 changes the features) and the encoder timings."""
    model = bench.build_llava(size["depth"], size["hidden"], size["heads"], size["intermediate"], size["image"],
                              size["patch"], device, dtype)
    pixels = torch.randn(2, 3, size["image"], size["image"], generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device, dtype)
    features = {}
    for label, env in (("stock", None), ("keep 1.0", {"VIT_LAYER_SPECS": f"{size['block']}:tome_vit:1.0"}),
                       ("keep 0.5", {"VIT_LAYER_SPECS": f"{size['block']}:tome_vit:0.5"})):
        with Patched(custom_llava, env):
            features[label] = torch.stack(list(bench.image_features(model, pixels).pooler_output))
    checks = [{"check": f"ViT stage: tome_vit at keep 1.0 before block {size['block']} gives the stock image features "
                        "bit for bit", "passed": bool(torch.equal(features["keep 1.0"], features["stock"]))},
              {"check": "ViT stage: tome_vit at keep 0.5 changes them (the stage ran)",
               "passed": not bool(torch.equal(features["keep 0.5"], features["stock"]))}]
    timing = bench.encoder_part(model, list(size["batches"]), size["block"], 0.5, size["warmup"], size["repeats"],
                                device)
    return checks, timing


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
def attention_implementations(device) -> list[str]:
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return ["sdpa"] + (["flash_attention_2"] if flash else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: the structure only")
    parser.add_argument("--size", choices=[name for name in SIZES if name != "dry-run"], default="full",
                        help="the decoders' shape: full (8 layers, hidden 1024) or 7b (28 layers, hidden 3584)")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--throughput-samples", type=int, default=None,
                        help=f"questions of part 5 (default {THROUGHPUT['full']['samples']}; fewer: a shorter run)")
    parser.add_argument("--throughput-rounds", type=int, default=None,
                        help=f"timed rounds of part 5, best kept (default {THROUGHPUT['full']['rounds']})")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else args.device)
    size = SIZES["dry-run" if args.dry_run else args.size]
    dtype = torch.bfloat16
    intra_layer = 2
    throughput = dict(THROUGHPUT["dry-run" if args.dry_run else "full"])
    throughput["samples"] = args.throughput_samples or throughput["samples"]
    throughput["rounds"] = args.throughput_rounds or throughput["rounds"]
    started = time.time()
    results = {"machine": bench.machine(device, torch.get_num_threads()), "dtype": str(dtype),
               "size": "dry-run" if args.dry_run else args.size, "sizes": size, "dry_run": args.dry_run,
               "attention": attention_implementations(device), "checks": [], "timings": {},
               "throughput_settings": {key: throughput[key] for key in ("samples", "batch_sizes", "rounds",
                                                                        "new_tokens")}}
    out = Path(args.out)

    def save(part: str) -> None:
        bench.save_so_far(results, out, started, part)

    for family, (_, build, make_inputs) in FAMILIES.items():
        pruned_runs = {}
        for attn in results["attention"]:
            model = build(size, attn, device, dtype)
            inputs = make_inputs(model, size, device)
            for check in exactness(family, model, inputs, intra_layer):
                results["checks"].append({"family": family, "attention": attn, **check})
            pruned_runs[attn] = run(model, inputs, FAMILIES[family][0],
                                    {"PRUNE_METHOD": "divprune_pre_llm", "KEEP_RATIO": "0.25"})
            if family == "qwen2.5-vl" and attn == results["attention"][-1]:
                results["timings"] = timings(model, size, device, intra_layer)
            del model
        results["checks"] += [{"family": family, **check} for check in across_kernels(family, pruned_runs)]
        save(family)
    vit_checks, results["vit_stage"] = vit_stage(VIT["dry-run" if args.dry_run else "full"], device, dtype)
    results["checks"] += [{"family": "llava-1.5", "attention": "sdpa", **check} for check in vit_checks]
    save("the ViT stage")
    with tempfile.TemporaryDirectory() as work:
        results["throughput"] = bench_throughput.batch_part(
            str(device), throughput["samples"], throughput["batch_sizes"], throughput["rounds"],
            throughput["new_tokens"], Path(work), throughput["mid_size"])
    for part in results["throughput"]:
        if part["model"] == bench_throughput.QWEN.checkpoint.name:
            results["checks"] += [{"family": "qwen2.5-vl", "check": f"calibration model, {row['config']}, "
                                   f"{part['new_tokens']} new tokens: batched answers = one at a time",
                                   "passed": all(row["same_answers"].values())} for row in part["rows"]]
    save("evaluation throughput")

    for check in results["checks"]:
        where = f"{check['family']}" + (f" [{check['attention']}]" if "attention" in check else "")
        detail = f" (max |diff| {check['max_diff']:.3g})" if "max_diff" in check else ""
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {where}: {check['check']}{detail}")
    print(f"\nQwen2.5-VL, {results['timings']['prompt_tokens']} prompt tokens, clock {results['timings']['clock']}:")
    print(bench.table(["config", "prefill ms", "TTFT ms", "decode ms/token", "speed-up", "FLOPs ideal", "KV MiB",
                       "peak MiB"],
                      [[r["config"], f"{r['prefill_ms']:.2f}", f"{r['ttft_ms']:.2f}",
                        f"{r.get('decode_ms_per_token', float('nan')):.2f}", f"{r['speedup']:.2f}",
                        f"{r['ideal']:.2f}", f"{r.get('kv_cache_bytes', 0) / 2**20:.2f}",
                        f"{r['peak_memory_increase_bytes'] / 2**20:.1f}"] for r in results["timings"]["rows"]]))
    print("\n" + "\n".join(bench_throughput.batch_tables(results["throughput"], throughput["samples"])))
    vit = results["vit_stage"]
    print(f"\nViT stage, LLaVA-1.5-shaped CLIP ({vit['depth']} blocks, {vit['patches']} patches), stage before block "
          f"{vit['block']} at keep {vit['keep']}:")
    print(bench.table(["batch", "config", "encoder ms", "speed-up", "FLOPs ideal", "of ideal"],
                      [[batch, row["config"], f"{row['ms']:.2f}", f"{row['speedup']:.2f}", f"{row['ideal']:.2f}",
                        f"{row['of_ideal']:.2f}"] for batch, part in vit["batches"].items() for row in part["rows"]]))
    print(f"\nwrote {args.out} ({results['seconds']:.0f} s)")
    return 0 if all(check["passed"] for check in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
