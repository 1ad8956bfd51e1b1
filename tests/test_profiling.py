"""Latency and memory profiling (profiling.py): switches, outputs unchanged, what a sample records, summaries, and
the runner's files. Timings are only checked for presence, never for their values."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import custom_qwenvl
import evalkit
import profiling
from scripts import summarize
from tests.support import shapes_data
from tests.support.tiny_models import build_model, build_processor, make_inputs
from tests import oracle
from tests.conftest import QUESTIONS, TOKENS_PER_IMAGE, run_runner
from utils import PruneConfig, PruneConfigError, keep_count

PRUNED = {  # label -> pruning environment
    "stock": {},
    "pre": {"PRUNE_METHOD": "divprune_pre_llm", "KEEP_RATIO": "0.5"},
    "intra": {"PRUNE_METHOD": "fastv_intra_llm", "KEEP_RATIO": "0.5"},
    "both": {"PRUNE_METHOD_PRE_LLM": "divprune_pre_llm", "KEEP_RATIO": "0.5",
             "INTRA_LLM_LAYER_SPECS": "2:fastv_intra_llm:0.25"},
}
PROFILED = {"METHOD_TIME": "True", "PREFILL_TIME": "True"}
TIMES = ("vision_encoder_ms", "pruning_ms", "prefill_ms", "llm_prefill_ms", "ttft_ms", "ttft_other_ms",
         "decode_ms_per_token", "generate_ms")


def parse(**env) -> PruneConfig:
    return PruneConfig.from_env({k: str(v) for k, v in env.items()})


# ---------------------------------------------------------------- configuration
def test_profile_switches_and_warmup_are_parsed():
    assert not parse().profile.enabled
    config = parse(METHOD_TIME="True", PREFILL_TIME="0", PROFILE_WARMUP=5)
    assert (config.profile.method_time, config.profile.prefill_time, config.profile.warmup) == (True, False, 5)
    assert parse(PREFILL_TIME="yes").profile.enabled and parse(PREFILL_TIME="yes").profile.warmup == 2


@pytest.mark.parametrize("env, fragments", [
    ({"METHOD_TIME": "sometimes"}, ["METHOD_TIME='sometimes'", "not a switch", "True or False"]),
    ({"PREFILL_TIME": "2"}, ["PREFILL_TIME='2'", "not a switch"]),
    ({"PROFILE_WARMUP": "-1"}, ["PROFILE_WARMUP='-1'", "non-negative integer", "default 2"]),
    ({"PROFILE_WARMUP": "two"}, ["PROFILE_WARMUP='two'"]),
])
def test_bad_profile_values_are_refused_with_the_variable_and_what_is_allowed(env, fragments):
    with pytest.raises(PruneConfigError) as err:
        parse(**env)
    assert all(fragment in str(err.value) for fragment in fragments)


def test_profiling_is_not_part_of_a_runs_identity():
    pruned = PRUNED["pre"]
    assert parse(**pruned, **PROFILED).describe() == parse(**pruned).describe()


# ---------------------------------------------------------------- on a tiny model
@pytest.fixture(scope="module")
def tiny():
    model = build_model("qwen2_5_vl")
    return model, dict(make_inputs(build_processor("qwen2_5_vl"), "image"))


def profiled_generate(model, inputs, env, samples=1, steps=oracle.STEPS):
    """Greedy ids and step logits of the last of ``samples`` profiled generate calls, and every sample's record."""
    with oracle.patched(custom_qwenvl, **env, **PROFILED) as config:
        profiler = profiling.Profiler(config.profile)
        profiler.instrument(model)
        try:
            for _ in range(samples):
                result = oracle.greedy(model, inputs, steps)
        finally:
            del model.generate  # the instance attribute: back to the class's generate
    return result, profiler.take("data", "key")


@pytest.mark.parametrize("label", list(PRUNED))
def test_profiling_changes_no_output(tiny, label):
    model, inputs = tiny
    with oracle.patched(custom_qwenvl, **PRUNED[label]):
        ids, logits = oracle.greedy(model, inputs)
    (profiled_ids, profiled_logits), records = profiled_generate(model, inputs, PRUNED[label])
    assert torch.equal(profiled_ids, ids) and torch.equal(profiled_logits, logits)
    assert len(records) == 1


def test_a_sample_records_every_region_tokens_and_kv_cache_bytes(tiny):
    model, inputs = tiny
    _, (record,) = profiled_generate(model, inputs, PRUNED["both"], steps=4)
    metrics, stages = record["metrics"], record["stages"]
    assert (record["dataset"], record["key"], record["warmup"]) == ("data", "key", True)
    assert record["device"] == "cpu" and record["clock"] == "perf_counter_ns"
    assert all(isinstance(metrics[name], float) for name in TIMES)
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    pre = keep_count(n, 0.5)
    intra = keep_count(pre, 0.25)  # intra-LLM ratios are fractions of the tokens that entered the LM
    assert [(s["stage"], s["method"], s["tokens_in"]) for s in stages] == [
        ("pre_llm", "divprune_pre_llm", n), ("layer_2", "fastv_intra_llm", pre)]
    assert {k: v for k, v in metrics.items() if k.startswith("visual_tokens/")} == {
        "visual_tokens/input": n, "visual_tokens/pre_llm": pre, "visual_tokens/layer_2": intra}
    assert metrics["equivalent_visual_tokens"] == (2 * pre + 2 * intra) / 4  # 4 decoder layers
    assert metrics["new_tokens"] == 4
    # Key + value bytes per token and layer: 2 x 2 KV heads x 16 dims x 4 bytes; layers 0-1 keep the pre-LLM
    # sequence, layers 2-3 the intra-LLM one; decoding appends 3 tokens (the 4th is never fed) to every layer.
    per_token = 2 * 2 * 16 * 4
    length = inputs["input_ids"].shape[1]
    prefill = (2 * (length - n + pre) + 2 * (length - n + intra)) * per_token
    assert metrics["kv_cache_bytes"] == prefill
    assert metrics["kv_cache_final_bytes"] == prefill + 4 * 3 * per_token
    assert metrics["cached_tokens_per_layer"] == prefill / per_token / 4
    assert "kv_cache_bytes_before_kv_stage" not in metrics  # no KV stage configured
    assert metrics["peak_memory_bytes"] > 0 and record["memory"] == "process peak RSS (VmHWM)"


def test_the_kv_stage_reports_cached_tokens_and_bytes_before_and_after(tiny):
    model, inputs = tiny
    _, (record,) = profiled_generate(model, inputs, {"KV_METHOD": "streamingllm_kv", "KV_BUDGET": "0.25"}, steps=2)
    metrics, stages = record["metrics"], record["stages"]
    length = inputs["input_ids"].shape[1]
    kept = keep_count(length, 0.25)
    per_token = 2 * 2 * 16 * 4  # key + value, 2 KV heads, 16 dims, fp32
    assert [(s["stage"], s["method"]) for s in stages] == [("kv", "streamingllm_kv")] * 4  # one per layer
    assert metrics["cached_tokens_per_layer"] == kept
    assert metrics["kv_cache_bytes"] == 4 * kept * per_token
    assert metrics["kv_cache_bytes_before_kv_stage"] == 4 * length * per_token


def test_stock_and_text_only_samples_have_no_pruning_stage(tiny):
    model, inputs = tiny
    _, (record,) = profiled_generate(model, inputs, PRUNED["stock"], steps=1)
    assert record["stages"] == [] and record["metrics"]["pruning_ms"] == 0.0
    assert record["metrics"]["decode_ms_per_token"] is None  # one new token: no decode step
    text = dict(make_inputs(build_processor("qwen2_5_vl"), "text"))
    _, (record,) = profiled_generate(model, text, PRUNED["pre"], steps=2)
    assert record["stages"] == [] and "prefill_ms" in record["metrics"]
    assert "equivalent_visual_tokens" not in record["metrics"]


def test_warmup_is_counted_per_data_set():
    profiler = profiling.Profiler(parse(METHOD_TIME=1, PROFILE_WARMUP=2).profile)
    flags = []
    for dataset in ["A", "A", "B", "A", "B", "B"]:
        profiler._finished.append({"metrics": {}})
        flags += [record["warmup"] for record in profiler.take(dataset)]
    assert flags == [True, True, True, False, True, False]


# ---------------------------------------------------------------- summaries
def test_summary_statistics_leave_out_warmup_and_missing_values():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    records = [{"warmup": i == 0, "device": "cpu", "clock": "c", "memory": "m",
                "metrics": {"ttft_ms": v, "decode_ms_per_token": None if i == 1 else v}}
               for i, v in enumerate(values)]
    summary = profiling.summarize(records)
    assert (summary["samples"], summary["warmup"], summary["profiled"]) == (6, 1, 5)
    kept = values[1:]
    assert summary["metrics"]["ttft_ms"] == pytest.approx(
        {"n": 5, "mean": np.mean(kept), "median": np.median(kept), "p90": np.percentile(kept, 90)})
    assert summary["metrics"]["decode_ms_per_token"]["n"] == 4


def test_equivalent_tokens_weight_each_count_by_the_layers_it_covers():
    span = SimpleNamespace(counts={"input": 100, "pre_llm": 50, "layer_2": 20, "layer_6": 10})
    other = SimpleNamespace(counts={"input": 8, "layer_4": 2})
    assert profiling.equivalent_tokens([[span], [other]], 8) == (2 * 50 + 4 * 20 + 2 * 10 + 4 * 8 + 4 * 2) / 8
    assert profiling.visual_tokens([[span], [other]]) == {"input": 108, "pre_llm": 50, "layer_2": 20,
                                                           "layer_6": 10, "layer_4": 2}


def test_only_generate_calls_are_profiled(tiny):
    model, inputs = tiny
    with oracle.patched(custom_qwenvl, **PRUNED["both"], **PROFILED) as config:
        profiler = profiling.Profiler(config.profile)
        profiler.instrument(model)
        try:
            oracle.forward_logits(model, inputs)  # a forward outside generate: the hooks' regions are no-ops
        finally:
            del model.generate
    assert profiler.take() == []


# ---------------------------------------------------------------- through the runner
RUN_ENV = {**PRUNED["both"], **PROFILED, "PROFILE_WARMUP": "2"}


@pytest.fixture(scope="module")
def profiled_run(evaluated, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("profiled")
    argv = ["--model", str(evaluated.checkpoint), "--data", shapes_data.NAME, "--work-dir", str(work_dir),
            "--device", "cpu", "--judge", "exact_matching", "--model-kwargs", json.dumps({"max_new_tokens": 3})]
    assert run_runner(argv, RUN_ENV) == 0
    (run_dir,) = [p.parent for p in work_dir.glob(f"*/{evalkit.RUN_CONFIG_FILE}")]
    return work_dir, run_dir


def test_a_profiled_run_writes_raw_files_per_rank_and_data_set(profiled_run):
    _, run_dir = profiled_run
    samples = [json.loads(line) for line in (run_dir / f"profile_{shapes_data.NAME}.rank0.jsonl").read_text().splitlines()]
    assert len(samples) == QUESTIONS and len({s["key"] for s in samples}) == QUESTIONS
    assert [s["warmup"] for s in samples] == [True] * 2 + [False] * (QUESTIONS - 2)
    pre, intra = keep_count(TOKENS_PER_IMAGE, 0.5), keep_count(keep_count(TOKENS_PER_IMAGE, 0.5), 0.25)
    for sample in samples:
        metrics = sample["metrics"]
        assert (metrics["visual_tokens/input"], metrics["visual_tokens/pre_llm"], metrics["visual_tokens/layer_2"]) \
            == (TOKENS_PER_IMAGE, pre, intra)
        assert metrics["new_tokens"] == 3 and all(isinstance(metrics[name], float) for name in TIMES)
    raw = run_dir / f"timings_{shapes_data.NAME}.rank0"
    assert {p.name for p in raw.iterdir()} == {"prefill_times.txt", "method_times_divprune_pre_llm.txt",
                                               "method_times_fastv_intra_llm.txt"}
    for name, tokens_in in (("divprune_pre_llm", TOKENS_PER_IMAGE), ("fastv_intra_llm", pre)):
        lines = (raw / f"method_times_{name}.txt").read_text().splitlines()
        assert len(lines) == QUESTIONS and all(line.split()[1] == str(tokens_in) for line in lines)
        assert [float(line.split()[0]) for line in lines] == pytest.approx([
            s["metrics"][f"pruning_ms/{'pre_llm' if name.endswith('pre_llm') else 'layer_2'}/{name}"]
            for s in samples], abs=1e-3)
    prefill = [float(line) for line in (raw / "prefill_times.txt").read_text().splitlines()]
    assert prefill == pytest.approx([s["metrics"]["prefill_ms"] for s in samples], abs=1e-3)
    assert json.loads((run_dir / evalkit.RUN_CONFIG_FILE).read_text())["profiling"] == {
        "method_time": True, "prefill_time": True, "warmup": 2}


def test_a_profiled_run_ends_with_a_summary_without_the_warmup(profiled_run):
    work_dir, run_dir = profiled_run
    summary = json.loads((run_dir / f"profile_summary_{shapes_data.NAME}.json").read_text())
    assert (summary["samples"], summary["warmup"], summary["profiled"]) == (QUESTIONS, 2, QUESTIONS - 2)
    expected = {*TIMES, "new_tokens", "kv_cache_bytes", "kv_cache_final_bytes", "cached_tokens_per_layer",
                "peak_memory_bytes", "peak_memory_increase_bytes", "equivalent_visual_tokens", "visual_tokens/input",
                "visual_tokens/pre_llm", "visual_tokens/layer_2", "pruning_ms/pre_llm/divprune_pre_llm",
                "pruning_ms/layer_2/fastv_intra_llm"}
    assert set(summary["metrics"]) == expected
    for stats in summary["metrics"].values():
        assert set(stats) == {"n", "mean", "median", "p90"} and stats["n"] == QUESTIONS - 2
    assert summary["metrics"]["visual_tokens/layer_2"]["median"] == keep_count(keep_count(TOKENS_PER_IMAGE, 0.5), 0.25)
    table = summarize.collect(work_dir)
    assert table["profiled_samples"].tolist() == [QUESTIONS - 2]
    assert table["ttft_ms"].tolist() == [summary["metrics"]["ttft_ms"]["median"]]
    assert "TTFT ms" in summarize.format_table(table)


def test_runs_without_profiling_write_no_profile(evaluated):
    for label in ("stock", "divprune", "fastv"):
        run_dir = evaluated.run_dir(label)
        assert not list(run_dir.glob("profile*")) and not list(run_dir.glob("timings_*"))
    assert "TTFT ms" not in summarize.format_table(summarize.collect(evaluated.work_dir))


# ---------------------------------------------------------------- the benchmark script (structure only)
def test_benchmark_runs_and_reports_the_six_targets(tmp_path, capsys):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    import encoder_stage
    from scripts import bench_pruning

    unpatched = Qwen2_5_VLTextModel.forward
    unwrapped = encoder_stage._block_signals, encoder_stage.EncoderRun._apply
    out = tmp_path / "bench.json"
    llm_methods = ["uniform_pre_llm", "divprune_pre_llm", "fastv_intra_llm", "tome_pre_llm", "hiprune_pre_llm",
                   "mustdrop_intra_llm", "vscan_pre_llm", "vscan_intra_llm"]
    # 5 decoder layers: MustDrop's four scaled stages need at least 5
    bench_pruning.main(["--layers", "5", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
                        "--sizes", "16", "64", "--check-size", "64", "--speedup-tokens", "64", "--ratios", "0.25",
                        "--memory-tokens", "64", "--methods", *llm_methods, "tome_vit", "mustdrop_vit",
                        "--divprune-tokens", "64", "--divprune-keeps", "8", "16", "--divprune-sizes", "32", "64",
                        "--compare-hidden", "48", "--warmup", "0", "--repeats", "1",
                        "--vit-depth", "4", "--vit-hidden", "32", "--vit-heads", "4", "--vit-intermediate", "64",
                        "--vit-image", "84", "--vit-batches", "1", "2", "--vit-warmup", "0", "--vit-repeats", "1",
                        "--out", str(out)])
    results = json.loads(out.read_text())
    assert [row["config"] for row in results["speedup"]["rows"]] == ["stock", "pre-LLM 0.25", "intra-LLM L2 0.25"]
    assert set(results["overhead"]["sizes"]["64"]["methods"]) == set(llm_methods)  # the ViT methods: their own table
    assert set(results["memory"]["ratio"]) == set(bench_pruning.ATTENTION_SCORED)
    assert [row["keep"] for row in results["divprune"]["by_keep"]] == [8, 16]
    assert [row["tokens"] for row in results["divprune"]["by_tokens"]] == [32, 64]
    versus = results["divprune_vs_uniprunebench"]
    assert (versus["tokens"], versus["hidden"], versus["keep"]) == (64, 48, 16) and versus["same_selection"]
    # the ViT stage: 36 patches + [CLS], the stage before block 2 of 4 halves them; every block runs
    encoder = results["encoder"]
    assert (encoder["patches"], encoder["block"], encoder["kept"]) == (36, 2, 18)
    assert list(encoder["batches"]) == ["1", "2"]
    for part in encoder["batches"].values():
        rows = {row["config"]: row for row in part["rows"]}
        assert list(rows) == list(bench_pruning.ENCODER_CONFIGS)
        assert rows["stock"]["tokens_per_block"] == [37] and rows["stock"]["flops_ratio"] == 1
        for label in list(rows)[1:]:
            assert rows[label]["tokens_per_block"] == [37, 19] and rows[label]["blocks_run"] == 4
            assert 0 < rows[label]["flops_ratio"] < 1 and rows[label]["stage_ms"] > 0
    vit = results["vit_methods"]["methods"]
    assert set(vit) == {"tome_vit", "mustdrop_vit"}
    assert (vit["tome_vit"]["block"], vit["tome_vit"]["tokens"], vit["tome_vit"]["kept"]) == (2, 36, 18)
    assert vit["mustdrop_vit"]["block"] == 1 and all(row["ms"] > 0 for row in vit.values())
    assert len(results["targets"]) == 6 and all(t["passed"] in (True, False) for t in results["targets"])
    printed = capsys.readouterr().out
    assert printed.count("PASS: ") + printed.count("FAIL: ") == 6 and "Machine: " in printed
    assert "ViT stage: encoder time" in printed and "ViT methods' own time" in printed
    assert Qwen2_5_VLTextModel.forward is unpatched  # no configuration outlives the benchmark
    assert (encoder_stage._block_signals, encoder_stage.EncoderRun._apply) == unwrapped  # nor the stage meter

    # --only: the chosen parts alone, their targets alone
    bench_pruning.main(["--only", "divprune", "--hidden", "32", "--divprune-tokens", "64", "--divprune-keeps", "8",
                        "16", "--divprune-sizes", "32", "64", "--repeats", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["parts"] == ["divprune"] and "speedup" not in results and "encoder" not in results
    assert [t["target"] for t in results["targets"]] == ["DivPrune's greedy selection is O(K N), not O(K^2 N)"]


def test_benchmark_kv_part_compares_kv_methods_and_token_pruning_at_equal_cache(tmp_path):
    from scripts import bench_pruning

    out = tmp_path / "bench.json"
    bench_pruning.main(["--only", "kv", "--layers", "4", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
                        "--intermediate", "128", "--methods", "streamingllm_kv", "snapkv_kv", "--kv-tokens", "64",
                        "--kv-new-tokens", "3", "--kv-budgets", "0.75", "0.5", "0.25", "--warmup", "0", "--repeats", "1",
                        "--out", str(out)])
    results = json.loads(out.read_text())
    kv = results["kv"]
    rows = {row["config"]: row for row in kv["rows"]}
    prompt = kv["prompt_tokens"]
    # 64 visual tokens in a 114-token prompt. Budget 0.75: both token-pruning kinds can match it; 0.5: only pre-LLM
    # (intra-LLM layers 0-1 keep the whole prompt); 0.25: neither (the text alone is more than a quarter)
    assert list(rows) == ["stock", "streamingllm_kv 0.75", "snapkv_kv 0.75", "uniform_pre_llm @0.75",
                          "fastv_intra_llm @0.75", "streamingllm_kv 0.5", "snapkv_kv 0.5", "uniform_pre_llm @0.5",
                          "streamingllm_kv 0.25", "snapkv_kv 0.25"]
    assert rows["stock"]["cached_tokens"] == prompt == 114
    assert rows["streamingllm_kv 0.25"]["cached_tokens"] == keep_count(prompt, 0.25)
    for budget in ("0.75", "0.5"):  # equal cache size, within the keep-count rounding
        assert abs(rows[f"uniform_pre_llm @{budget}"]["cached_tokens"] - float(budget) * prompt) <= 1
    assert abs(rows["fastv_intra_llm @0.75"]["cached_tokens"] - 0.75 * prompt) <= 1
    assert rows["stock"]["peak_increase_mib"] is not None and rows["snapkv_kv 0.75"]["peak_increase_mib"] is None
    assert [t["target"].split(" (")[0] for t in results["targets"]] == [
        "a KV method's decode step at budget 0.25 costs <= 0.6x the stock step",
        "a KV method's selection adds <= 5 % to a decode step"]


def test_benchmark_saves_each_measured_round_so_a_stopped_run_keeps_it(tmp_path, monkeypatch):
    from scripts import bench_pruning

    def stopped(*args, **kwargs):  # the run is stopped after the timed rounds, before the memory pass
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_pruning.Bench, "peak_memory", stopped)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench_pruning.main(["--only", "kv", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
                            "--intermediate", "128", "--methods", "streamingllm_kv", "--kv-tokens", "64",
                            "--kv-new-tokens", "3", "--kv-budgets", "0.5", "--warmup", "0", "--repeats", "2",
                            "--out", str(out)])
    kv = json.loads(out.read_text())["kv"]
    assert kv["rounds_done"] == 2
    # 2 decoder layers: FastV before layer 2 leaves no layer to shrink, so no intra-LLM row to match
    assert [row["config"] for row in kv["rows"]] == ["stock", "streamingllm_kv 0.5", "uniform_pre_llm @0.5"]
    assert all(row["peak_increase_mib"] is None for row in kv["rows"])  # the memory pass did not run
