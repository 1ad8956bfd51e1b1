"""Evaluation throughput: ``--batch-size`` and the in-process sweep give what one sample at a time in one runner call
per configuration gives.

* :meth:`evalkit.PrunedModel.generate_batch` on tiny checkpoints of every family (VLMEvalKit's or the runner's own
  wrapper, prompts of different lengths, images of different sizes, two images in one prompt, text only): the same
  answers and visual-token records as the wrapper's ``generate`` one message at a time.
* The runners on the shipped calibration models (greedy, 4 new tokens): ``--batch-size 4`` gives the run folders,
  predictions, scores and token records of ``--batch-size 1``; ``--configurations`` (one model load for several
  configurations) gives those of one runner call per configuration, and resumes as they do.
* ``scripts/sweep.py --in-process``: which configurations share a runner process, and how their exit codes are read.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evalkit
from calibration import data as calibration_data
from calibration.models import GEMMA4, QWEN
from scripts import sweep
from tests.conftest import run_runner
from tests.support import shapes_data
from tests.support.tiny_checkpoints import save_checkpoint
from utils import PruneConfig

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = 16
FLAGS = ["--device", "cpu", "--judge", "exact_matching", "--model-kwargs", json.dumps({"max_new_tokens": 4})]
CONFIGS = [
    {"label": "stock", "env": {}},
    {"label": "divprune", "env": {"PRUNE_METHOD": "divprune_pre_llm", "KEEP_RATIO": "0.25"}},
    {"label": "fastv", "env": {"PRUNE_METHOD": "fastv_intra_llm", "KEEP_RATIO": "0.111"}},
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- the pieces
def test_a_row_of_a_batch_is_returned_as_its_own_call_would_return_it():
    calls = [{"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
              "pixel_values": torch.ones(2, 4), "max_new_tokens": 3},
             {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
              "pixel_values": torch.zeros(1, 4), "max_new_tokens": 3}]
    assert evalkit._batch_signature((), calls[0]) == evalkit._batch_signature((), calls[1])
    batch = evalkit._collate(calls, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["pixel_values"].shape == (3, 4) and batch["max_new_tokens"] == 3
    # The batch goes on until both rows have ended (end token 2); the first row's pad tokens (0) are not its own.
    output = torch.tensor([[5, 6, 7, 9, 2, 0], [0, 0, 8, 4, 4, 2]])
    assert evalkit._own_output(output, 0, 3, calls[0]["input_ids"], [2]).tolist() == [[5, 6, 7, 9, 2]]
    assert evalkit._own_output(output, 1, 3, calls[1]["input_ids"], [2]).tolist() == [[8, 4, 4, 2]]
    assert evalkit._own_output(output, 1, 3, calls[1]["input_ids"], []).tolist() == [[8, 4, 4, 2]]
    # Calls that cannot share a batch: other settings, other image shapes, a per-call object.
    assert evalkit._batch_signature((), {**calls[1], "max_new_tokens": 4}) != evalkit._batch_signature((), calls[1])
    assert evalkit._batch_signature((), {**calls[1], "pixel_values": torch.zeros(1, 5)}) != \
        evalkit._batch_signature((), calls[1])
    assert evalkit._batch_signature((), {**calls[1], "return_dict_in_generate": True}) is None
    assert evalkit._batch_signature((torch.tensor([[8]]),), {}) is None


# ---------------------------------------------------------------- every family, at the wrapper
TINY = {  # tiny checkpoint family -> runner
    "qwen2_vl": "run_qwenvl", "qwen2_5_vl": "run_qwenvl", "qwen3_vl": "run_qwenvl", "gemma4_e2b": "run_gemma4",
    "llava": "run_llava", "llava_next": "run_llava", "llava_onevision": "run_llava", "internvl": "run_internvl",
}
NO_TEXT_ONLY = {"llava_next", "llava_onevision"}  # VLMEvalKit's wrappers fail on a prompt without an image


def messages(folder: Path, text_only: bool) -> list[list[dict]]:
    paths = []
    for i, size in enumerate([(168, 112), (112, 168), (224, 224)]):
        paths.append(folder / f"image{i}.png")
        shapes_data.make_question(i)["image"].resize(size).save(paths[-1])
    image = lambda i: {"type": "image", "value": str(paths[i])}  # noqa: E731
    text = lambda value: {"type": "text", "value": value}  # noqa: E731
    out = [[image(0), text("Which colour is the shape?")],
           [image(1), text("Please describe the picture with a long and detailed explanation of what it shows.")],
           [image(0), image(2), text("Compare the two images.")],
           [image(2), text("Shape?")]]
    return out + ([[text("Tell me about the quick brown fox.")]] if text_only else [])


@pytest.mark.parametrize("tiny", list(TINY))
def test_a_batch_gives_every_sample_what_it_gets_alone(tmp_path, tiny):
    family = importlib.import_module(TINY[tiny]).FAMILY
    checkpoint = save_checkpoint(tmp_path / tiny, family=tiny)
    model_type = json.loads((checkpoint / "config.json").read_text())["model_type"]
    wrapper = evalkit.adapt(family.wrappers()[model_type], family.mixin)
    config = PruneConfig.from_env({"PRUNE_METHOD": "divprune_pre_llm", "KEEP_RATIO": "0.5"})
    prompts = messages(tmp_path, text_only=tiny not in NO_TEXT_ONLY)

    def run(folder: Path) -> evalkit.ModelRun:
        folder.mkdir()
        return evalkit.ModelRun(family, evalkit.LoadSettings("cpu", "sdpa", "auto"), evalkit.TokenLog(folder, 0))

    family.patches.apply_patches(config)
    try:
        model = wrapper(model_path=str(checkpoint), pruning_run=run(tmp_path / "alone"), max_new_tokens=5)
        alone = [model.generate(message, "D") for message in prompts]
        model.use_run(run(tmp_path / "batch"))
        batched = model.generate_batch(prompts, "D")
    finally:
        family.patches.remove_patches()
    assert batched == alone and len(set(alone)) > 1
    assert model.generate_calls == 1 + (tiny not in NO_TEXT_ONLY)  # a prompt without images goes alone
    records = {mode: sorted((tmp_path / mode / "visual_tokens_D.rank0.jsonl").read_text().splitlines())
               for mode in ("alone", "batch")}
    assert records["batch"] == records["alone"] and len(records["alone"]) >= len(prompts) - 1


# ---------------------------------------------------------------- the runners, on the calibration models
@pytest.fixture(scope="module")
def calibration_lmudata(tmp_path_factory):
    lmudata = tmp_path_factory.mktemp("LMUData")
    calibration_data.write_dataset(lmudata, QUESTIONS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMUData", str(lmudata))
        patch.delenv("MMEVAL_ROOT", raising=False)
        yield lmudata


def runs(work_dir: Path) -> dict[str, dict]:
    """Run folder name -> what must not depend on how it was run: predictions, score, token records, run config."""
    from vlmeval.smp import load

    out = {}
    for folder in sorted(path.parent for path in work_dir.glob(f"*/{evalkit.RUN_CONFIG_FILE}")):
        status = json.loads((folder / evalkit.STATUS_FILE).read_text())["datasets"][calibration_data.NAME]
        frame = load(str(folder / status["prediction_file"]))
        out[folder.name] = {
            "predictions": dict(zip(map(str, frame["index"]), map(str, frame["prediction"]))),
            "metrics": status["metrics"],
            "tokens": sorted(line for path in folder.glob(f"visual_tokens_{calibration_data.NAME}.rank*.jsonl")
                             for line in path.read_text().splitlines()),
            "config": json.loads((folder / evalkit.RUN_CONFIG_FILE).read_text()),
        }
    return out


def evaluate(checkpoint: Path, runner: str, work_dir: Path, configs: list[dict], flags: list[str] = ()) -> int:
    """One runner call for ``configs`` (``--configurations``)."""
    file = work_dir.parent / f"{work_dir.name}.configurations.json"
    file.write_text(json.dumps(configs))
    argv = ["--model", str(checkpoint), "--data", calibration_data.NAME, "--work-dir", str(work_dir),
            "--configurations", str(file), *FLAGS, *flags]
    return run_runner(argv, {}, runner)


@pytest.fixture(scope="module")
def one_call_per_configuration(calibration_lmudata, tmp_path_factory) -> dict[str, dict]:
    """The reference: one runner call per configuration, one sample at a time."""
    work_dir = tmp_path_factory.mktemp("separate")
    for config in CONFIGS:
        argv = ["--model", str(QWEN.checkpoint), "--data", calibration_data.NAME, "--work-dir", str(work_dir), *FLAGS]
        assert run_runner(argv, config["env"], QWEN.runner) == 0
    reference = runs(work_dir)
    assert len(reference) == len(CONFIGS)
    assert len({json.dumps(run["tokens"]) for run in reference.values()}) == len(CONFIGS)  # the configurations differ
    return reference


needs_calibration = pytest.mark.skipif(not (QWEN.checkpoint / "model.safetensors").is_file(),
                                       reason="no calibration model")


@needs_calibration
def test_configurations_in_one_call_give_the_runs_of_one_call_each(one_call_per_configuration, tmp_path, capsys,
                                                                   monkeypatch):
    loads, init = [], evalkit.PrunedModel.__init__
    monkeypatch.setattr(evalkit.PrunedModel, "__init__", lambda self, *a, **k: loads.append(1) or init(self, *a, **k))
    work_dir = tmp_path / "in-process"
    assert evaluate(QWEN.checkpoint, QWEN.runner, work_dir, CONFIGS) == 0
    assert runs(work_dir) == one_call_per_configuration  # same run names (hash), files, predictions, records
    assert len(loads) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if ": configuration " in line] == [
        f"{QWEN.runner}.py: configuration {config['label']}: exit 0" for config in CONFIGS]
    # It resumes as separate calls do: nothing is generated again.
    tokens = {path: path.read_text() for path in work_dir.glob("*/visual_tokens_*.jsonl")}
    assert evaluate(QWEN.checkpoint, QWEN.runner, work_dir, CONFIGS) == 0
    assert {path: path.read_text() for path in work_dir.glob("*/visual_tokens_*.jsonl")} == tokens


@needs_calibration
def test_batches_give_the_predictions_of_one_sample_at_a_time(one_call_per_configuration, tmp_path):
    work_dir = tmp_path / "batched"
    # The first 6 questions, then all: the second call generates only the 10 others, as VLMEvalKit's loop resumes.
    assert evaluate(QWEN.checkpoint, QWEN.runner, work_dir, CONFIGS, ["--batch-size", "4", "--limit", "6"]) == 0
    assert evaluate(QWEN.checkpoint, QWEN.runner, work_dir, CONFIGS, ["--batch-size", "4"]) == 0
    assert runs(work_dir) == one_call_per_configuration  # token records: 6 + 10 lines, none twice


@pytest.mark.skipif(not (GEMMA4.checkpoint / "model.safetensors").is_file(), reason="no calibration model")
def test_gemma_batches_give_the_predictions_of_one_sample_at_a_time(calibration_lmudata, tmp_path):
    configs = CONFIGS[1:2]
    for batch_size in (1, 4):
        flags = ["--batch-size", str(batch_size)]
        assert evaluate(GEMMA4.checkpoint, GEMMA4.runner, tmp_path / f"batch{batch_size}", configs, flags) == 0
    assert runs(tmp_path / "batch4") == runs(tmp_path / "batch1")


# ---------------------------------------------------------------- refusals (before VLMEvalKit starts)
@pytest.mark.parametrize("env, switch", [({"METHOD_TIME": "True"}, "METHOD_TIME"),
                                         ({"PREFILL_TIME": "1", "METHOD_TIME": "1"}, "METHOD_TIME and PREFILL_TIME")])
def test_latency_profiling_refuses_batches(tmp_path, capsys, env, switch):
    argv = ["--model", str(QWEN.checkpoint), "--data", calibration_data.NAME, "--work-dir", str(tmp_path / "out"),
            "--batch-size", "8", *FLAGS]
    assert run_runner(argv, {**env, "PRUNE_METHOD": "divprune_pre_llm", "KEEP_RATIO": "0.25"}) == 2
    assert f"--batch-size 8 with {switch}: latency is profiled per sample" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ("[]", "expected a non-empty JSON list"),
    ('[{"label": "a", "env": {}}, {"label": "a", "env": {}}]', "labels repeat"),
    ('[{"label": "a", "env": {"KEEP_RATIO": "2", "PRUNE_METHOD": "divprune_pre_llm"}}]', "keep ratio out of range"),
])
def test_a_bad_configurations_file_exits_2(tmp_path, capsys, content, message):
    file = tmp_path / "configs.json"
    file.write_text(content)
    argv = ["--model", str(QWEN.checkpoint), "--data", calibration_data.NAME, "--work-dir", str(tmp_path / "out"),
            "--configurations", str(file), *FLAGS]
    assert run_runner(argv, {}) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_configuration_replaces_the_stage_selection_of_the_environment():
    env = {"PRUNE_METHOD_PRE_LLM": "random_pre_llm", "KEEP_RATIO": "0.5", "PRUNE_RANDOM_SEED": "3", "HOME": "/h"}
    ((label, resolved),) = evalkit.configurations(None, env)
    assert label is None and resolved is env


# ---------------------------------------------------------------- scripts/sweep.py --in-process
FAKE_RUNNER = '''import json, os, sys
configs = json.load(open(sys.argv[sys.argv.index("--configurations") + 1]))
for config in configs:
    env = {**{k: v for k, v in os.environ.items() if k in ("KEEP_RATIO", "PRUNE_METHOD", "PRUNE_RANDOM_SEED")},
           **config["env"]}
    print(json.dumps(env))
    print(f"fake.py: configuration {config['label']}: exit {int('bad' in config['env'].get('PRUNE_METHOD', ''))}")
'''


def test_the_in_process_sweep_shares_processes_and_reads_each_exit_code(tmp_path):
    (tmp_path / "fake.py").write_text(FAKE_RUNNER)
    jobs = sweep.plan(str(tmp_path / "fake.py"), ["m1", "m2"], ["D"], ["good", "bad"], [0.5, 0.25], str(tmp_path),
                      True, ["--judge", "exact_matching"])
    assert [p.label for p in sweep.processes(jobs)] == [job.label for job in jobs]  # one process per job
    assert [(p.label, len(p.jobs)) for p in sweep.processes(jobs, in_process=True)] == [
        ("m1__in-process", 5), ("m2__in-process", 5)]
    assert [(p.label, len(p.jobs)) for p in sweep.processes(jobs, 2, in_process=True)] == [
        ("m1__in-process-first", 1), ("m1__in-process-1of2", 2), ("m1__in-process-2of2", 2),
        ("m2__in-process-1of2", 3), ("m2__in-process-2of2", 2)]
    env = {**os.environ, "KEEP_RATIO": "0.9", "PRUNE_RANDOM_SEED": "3"}  # the calling shell's selection is cleared
    failed = sweep.run(jobs, tmp_path / "logs", env, in_process=True)
    assert failed == [f"{model}__bad-{ratio}" for model in ("m1", "m2") for ratio in ("0.5", "0.25")]
    log = (tmp_path / "logs" / "m1__in-process.log").read_text()
    assert '{"PRUNE_RANDOM_SEED": "3"}\nfake.py: configuration m1__stock: exit 0\n' in log
    assert ('{"PRUNE_RANDOM_SEED": "3", "PRUNE_METHOD": "good", "KEEP_RATIO": "0.25"}\n'
            'fake.py: configuration m1__good-0.25: exit 0\n') in log


# ---------------------------------------------------------------- torchrun: each rank batches its own share
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@needs_calibration
@pytest.mark.slow
def test_torchrun_ranks_batch_their_own_shares(one_call_per_configuration, calibration_lmudata, tmp_path):
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PRUNE_", "KEEP_RATIO", "INTRA_LLM_", "METHOD_TIME", "PREFILL_TIME"))
           and key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MMEVAL_ROOT")}
    env.update(CONFIGS[1]["env"], OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(_free_port()), str(ROOT / "run_qwenvl.py"), "--model",
                           str(QWEN.checkpoint), "--data", calibration_data.NAME, "--work-dir", str(tmp_path),
                           "--batch-size", "3", *FLAGS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"{QUESTIONS // 2} samples in 3 generate calls (--batch-size 3)" in done.stdout + done.stderr
    ((name, run),) = runs(tmp_path).items()
    assert run == one_call_per_configuration[name]
