"""The shipped describe calibration model (``calibration/qwen2.5-vl-describe``): ShapesDescribe questions are
answered with two words, "<colour> <shape>"; the first comes from the prefill, the second from a decode step that
reads the asked object's visual token through the KV cache, so KV-cache methods are measured by it.

Through VLMEvalKit it scores at least 95 % at keep 1.0. A test-only KV method that drops one visual entry from
every layer's cache after the prefill shows where the second word comes from: without the asked object's entry the
accuracy falls below chance while the first word (the colour, decided in the prefill) stays right; without another
object's entry it stays.
"""

from __future__ import annotations

import contextvars
import re

import pytest
import torch

import custom_qwenvl
import methods
from calibration import data
from calibration import train as training
from calibration.models import QWEN_DESCRIBE
from scripts import summarize
from tests.conftest import run_runner
from tests.oracle import patched
from tests.test_calibration import reply

QUESTIONS = 60
CHANCE = 100.0 / 4
DROPPED: contextvars.ContextVar[int] = contextvars.ContextVar("describe_dropped_token")

pytestmark = pytest.mark.skipif(not (QWEN_DESCRIBE.checkpoint / "model.safetensors").is_file(),
                                reason="no describe calibration model")


def _drop_visual_entry(ctx: methods.KVContext) -> torch.Tensor:
    """Every cache entry but one visual token's, the one ``DROPPED`` names (its raster index among the image's)."""
    keep = torch.ones(ctx.num_entries, dtype=torch.bool)
    keep[torch.nonzero(ctx.visual).flatten()[DROPPED.get()]] = False
    return torch.nonzero(keep).flatten()


@pytest.fixture(scope="module", autouse=True)
def kv_probe():
    methods.register_prune("describe_drop_one_kv")(_drop_visual_entry)
    yield
    methods._base._REGISTRY.pop("describe_drop_one_kv")


@pytest.fixture(scope="module")
def model_and_processor():
    from transformers import AutoProcessor

    model = QWEN_DESCRIBE.model_class.from_pretrained(QWEN_DESCRIBE.checkpoint).eval()
    return model, AutoProcessor.from_pretrained(QWEN_DESCRIBE.checkpoint)


def accuracy(model, processor, samples, dropped=None) -> tuple[float, float]:
    """(% right answers, % answers whose first word is the right colour); ``dropped(sample)``: the visual token
    whose cache entries ``describe_drop_one_kv`` drops for that sample."""
    right = colour = 0
    for sample in samples:
        token = DROPPED.set(dropped(sample) if dropped else -1)
        try:
            answer = reply(model, processor, sample)
        finally:
            DROPPED.reset(token)
        right += training.score(answer, sample)
        colour += answer.startswith(sample["answer_text"].split()[0])
    return 100.0 * right / len(samples), 100.0 * colour / len(samples)


def test_shipped_checkpoint_is_the_recorded_training_output(model_and_processor):
    model, shipped = model_and_processor
    record = (QWEN_DESCRIBE.checkpoint / training.RECORD_FILE).read_text()
    assert training.weights_checksum(model) == re.search(r"weights checksum: `([0-9a-f]{64})`", record).group(1)
    assert shipped.tokenizer.get_vocab() == QWEN_DESCRIBE.build_tokenizer().get_vocab()


@pytest.mark.slow
def test_scores_at_least_95_percent_through_vlmevalkit(tmp_path, lmudata_env):
    data.write_dataset(lmudata_env, n=100, name=data.DESCRIBE_NAME)
    argv = ["--model", str(QWEN_DESCRIBE.checkpoint), "--data", data.DESCRIBE_NAME, "--work-dir", str(tmp_path),
            "--device", "cpu", "--judge", "exact_matching", "--model-kwargs", '{"max_new_tokens": 4}']
    assert run_runner(argv, {}, runner=QWEN_DESCRIBE.runner) == 0
    row = summarize.collect(tmp_path).iloc[0]
    assert (row["method"], row["samples"]) == ("stock", 100) and row["score"] >= 95.0, row.to_dict()


def test_the_second_word_reads_the_asked_object_through_the_kv_cache(model_and_processor):
    """Dropping the asked object's visual entry from every layer's cache after the prefill brings the accuracy to
    about chance while the first word (the colour, from the prefill) stays right; dropping another object's entry
    instead costs little."""
    model, processor = model_and_processor
    samples = [data.make_describe_sample(i, data.EVAL_SEED) for i in range(QUESTIONS)]

    def token(obj):
        return obj["row"] * data.GRID + obj["col"]

    stock, _ = accuracy(model, processor, samples)
    with patched(custom_qwenvl, KV_METHOD="describe_drop_one_kv", KV_BUDGET=1.0):
        asked, asked_colour = accuracy(model, processor, samples, lambda s: s["target_tokens"][0])
        other, _ = accuracy(model, processor, samples,
                            lambda s: next(token(o) for o in s["objects"] if token(o) != s["target_tokens"][0]))
    assert stock >= 95.0 and other >= stock - 10.0, (stock, other)
    assert asked <= CHANCE and asked_colour >= 95.0, (asked, asked_colour)
