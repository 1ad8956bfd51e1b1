"""Models loaded with a ``device_map`` (accelerate's dispatch, as ``--device cuda`` does with ``device_map="auto"``).

The closest honest check on a CPU-only machine: the tiny model is split over two ``device_map`` entries, the
vision tower and head on ``cpu`` and the language model offloaded to ``disk`` (accelerate then installs on every
split module the same ``AlignDevicesHook`` that places a multi-GPU split, here moving weights in from the offload
folder at each call). Pruned runs must equal the same configuration on the model loaded without a device map. What
it cannot show is tensors crossing two real devices: the test machine has one.
"""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import custom_qwenvl
from tests import oracle
from tests.support.tiny_checkpoints import save_checkpoint
from tests.support.tiny_models import build_processor, make_inputs
from utils import PruneConfig

SPLIT = {"model.visual": "cpu", "model.language_model": "disk", "lm_head": "cpu"}
CONFIGS = [dict(PRUNE_METHOD="divprune_pre_llm", KEEP_RATIO="0.5"),
           dict(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.5")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("split") / "tiny", family="qwen2_5_vl")


def load(checkpoint, **kwargs):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, **kwargs).eval()


@pytest.mark.parametrize("env", CONFIGS, ids=lambda e: next(iter(e.values())))
def test_a_dispatched_model_prunes_exactly_as_a_plain_one(checkpoint, tmp_path, env):
    inputs = dict(make_inputs(build_processor("qwen2_5_vl"), "batch"))
    custom_qwenvl.apply_patches(PruneConfig.from_env(env))  # before loading: the dispatch keeps the patched forward
    try:
        plain = load(checkpoint)
        split = load(checkpoint, device_map=SPLIT, offload_folder=str(tmp_path / "offload"))
        assert hasattr(split.model.language_model, "_hf_hook")  # accelerate's dispatch is really in place
        results = []
        for model in (plain, split):
            results.append((oracle.forward_logits(model, inputs), *oracle.greedy(model, inputs),
                            custom_qwenvl.last_record(model).totals()))
    finally:
        custom_qwenvl.remove_patches()
    (logits, ids, steps, tokens), (split_logits, split_ids, split_steps, split_tokens) = results
    assert tokens == split_tokens and tokens["input"] > list(tokens.values())[-1]  # pruned, in both
    assert torch.equal(split_logits, logits) and torch.equal(split_ids, ids) and torch.equal(split_steps, steps)


def test_a_model_dispatched_before_the_patches_is_refused(checkpoint, tmp_path):
    """Loaded with a device map first, its language model keeps the unpatched forward: it would run unpruned."""
    inputs = dict(make_inputs(build_processor("qwen2_5_vl"), "image"))
    split = load(checkpoint, device_map=SPLIT, offload_folder=str(tmp_path / "offload"))
    with oracle.patched(custom_qwenvl, **CONFIGS[0]):
        with pytest.raises(RuntimeError, match=r"loaded with a device_map before the pruning patches were applied"):
            oracle.forward_logits(split, inputs)
