"""scripts/gpu_check.py in its --dry-run mode: tiny models on the CPU, the structure of its checks and report.

The real run needs a GPU (flash-attn optional); here every check it makes must run and pass on the CPU with sdpa,
and the report must hold every figure it promises.
"""

import json

from transformers.models.gemma4.modeling_gemma4 import Gemma4TextModel
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

from scripts import gpu_check


def test_dry_run_checks_and_reports_everything(tmp_path, capsys):
    unpatched = Qwen2_5_VLTextModel.forward, Gemma4TextModel.forward
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    assert (Qwen2_5_VLTextModel.forward, Gemma4TextModel.forward) == unpatched  # nothing left installed
    results = json.loads(out.read_text())
    printed = capsys.readouterr().out
    checks = {(c["family"], c["check"]) for c in results["checks"]}
    assert {("qwen2.5-vl", "keep 1.0 pre-LLM bit-identical"), ("qwen2.5-vl", "keep 1.0 intra-LLM bit-identical"),
            ("qwen2.5-vl", "pre-LLM 0.25 = LM on the shortened sequence"),
            ("qwen2.5-vl", "intra-LLM L2 0.25 = layer loop"),
            ("gemma4", "keep 1.0 pre-LLM bit-identical"), ("gemma4", "keep 1.0 intra-LLM bit-identical")} <= checks
    assert all(c["passed"] for c in results["checks"])
    assert results["attention"] == ["sdpa"] and results["dtype"] == "torch.bfloat16"
    rows = {row["config"]: row for row in results["timings"]["rows"]}
    assert set(rows) == {"stock", "pre-LLM 0.25", "pre-LLM 0.111", "intra-LLM L2 0.25", "intra-LLM L2 0.111"}
    for row in rows.values():
        assert {"prefill_ms", "ttft_ms", "decode_ms_per_token", "kv_cache_bytes", "speedup", "ideal",
                "peak_memory_increase_bytes"} <= set(row)
    assert rows["stock"]["ideal"] == 1.0
    assert rows["pre-LLM 0.111"]["ideal"] > rows["pre-LLM 0.25"]["ideal"] > 1.0
    assert rows["pre-LLM 0.25"]["kv_cache_bytes"] < rows["stock"]["kv_cache_bytes"]
    assert printed.count("PASS") == len(results["checks"]) and "FAIL" not in printed
    # Throughput vs batch size (scripts/bench_throughput.py's part 1): both models, every configuration.
    parts = results["throughput"]
    assert [(part["model"], part["new_tokens"]) for part in parts] == [
        ("qwen2.5-vl-shapes", 2), ("qwen2.5-vl-mid-size-random", 2)]
    assert all(set(row["samples_per_s"]) == {"1", "2"} and row["samples_per_s"]["2"] > 0
               for part in parts for row in part["rows"])
    assert {("qwen2.5-vl", "calibration model, stock, 2 new tokens: batched answers = one at a time")} <= checks
    # The ViT stage on the LLaVA-1.5-shaped model: keep 1.0 exact, keep 0.5 effective, the encoder timed per config.
    assert {("llava-1.5", "ViT stage: tome_vit at keep 1.0 before block 2 gives the stock image features bit for bit"),
            ("llava-1.5", "ViT stage: tome_vit at keep 0.5 changes them (the stage ran)")} <= checks
    vit = results["vit_stage"]
    assert vit["block"] == 2 and vit["kept"] == 18
    rows = {row["config"]: row for row in vit["batches"]["1"]["rows"]}
    assert rows["stock"]["flops_ratio"] == 1.0 and rows["tome_vit"]["flops_ratio"] < 1.0
    assert "ViT stage, LLaVA-1.5-shaped CLIP" in printed


def test_a_run_stopped_in_the_throughput_part_keeps_the_parts_before_it(tmp_path, monkeypatch):
    def stopped(*args, **kwargs):  # part 5, the longest and the last, is cut off
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check.bench_throughput, "batch_part", stopped)
    out = tmp_path / "gpu_check.json"
    try:
        gpu_check.main(["--dry-run", "--out", str(out), "--throughput-samples", "3", "--throughput-rounds", "1"])
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the throughput part was not reached")
    results = json.loads(out.read_text())
    assert results["timings"]["rows"] and results["vit_stage"]["batches"] and "throughput" not in results
    assert all(c["passed"] for c in results["checks"]) and len(results["checks"]) == 8
    assert results["throughput_settings"]["samples"] == 3 and results["throughput_settings"]["rounds"] == 1


def test_the_7b_size_builds_7b_class_decoders_on_the_device_in_bf16():
    # Built on the meta device (no memory, no time): the shapes and dtype a GPU run gets with --size 7b.
    import torch

    for build in (gpu_check.qwen_model, gpu_check.gemma_model):
        model = build(gpu_check.SIZES["7b"], "sdpa", torch.device("meta"), torch.bfloat16)
        layers = model.model.language_model.layers
        assert len(layers) == 28 and 6.4e9 < sum(p.numel() for p in layers.parameters()) < 6.9e9
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert {p.device.type for p in model.parameters()} == {"meta"}
