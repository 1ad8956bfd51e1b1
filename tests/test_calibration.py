"""The shipped calibration models (``calibration/<family>-shapes``, ``calibration.models.FAMILIES``) measure whether
pruning keeps the right tokens; every test runs on each of them, through its family's patches and runner. Each
has learned all three question types (at least 95 % held-out on each, its ``TRAINING.md``).

Each held-out question is about one object, held by known visual tokens (``target_tokens`` of
``calibration/data.py``). Through the real VLMEvalKit pipeline the model scores at least 95 % at keep 1.0;
test-only methods that read that metadata bound what a method can do: keeping the asked object's tokens (oracle)
keeps the accuracy at keep 25 %, dropping them (anti-oracle) brings it down to about chance, through the pre-LLM
and the intra-LLM hooks alike. A test-only patch that scrambles where the visual tokens sit (their features
permuted over the image's positions) must cost the positional questions their accuracy while the colour and
shape questions, which do not depend on positions, stay.
"""

from __future__ import annotations

import contextvars
import importlib
import re

import pytest
import torch

import methods
from calibration import data
from scripts import summarize
from calibration import train as training
from calibration.models import GEMMA4, INTERNVL, LLAVA, QWEN, QWEN_GRADED
from tests.conftest import run_runner
from tests.oracle import patched

SHIPPED = {family.name: family for family in (QWEN, GEMMA4, LLAVA, INTERNVL)}
# The module that returns the LLM's visual tokens.
VISUAL_TOKENS_MODULE = {QWEN.name: "visual", GEMMA4.name: "embed_vision", LLAVA.name: "multi_modal_projector",
                        INTERNVL.name: "multi_modal_projector"}
QUESTIONS = 60  # held-out questions evaluated in-process per configuration
VLMEVALKIT_QUESTIONS = 150  # through the runner and VLMEvalKit at keep 1.0
KEEP = 0.25
CHANCE = 100.0 / 4  # % for four options
INTRA_LAYER = 1  # the earliest layer an intra-LLM stage can drop tokens after the model has seen them

# The asked object's visual tokens of the sample being generated (set per sample by ``accuracy``).
ASKED_TOKENS: contextvars.ContextVar[list[int]] = contextvars.ContextVar("asked_tokens")


def _oracle_keep(ctx: methods.PruneContext, keep_asked: bool) -> torch.Tensor:
    """``ctx.keep`` tokens: the asked object's tokens first (oracle) or none of them (anti-oracle); the rest of
    the budget drawn at random from the other tokens."""
    asked = torch.tensor(ASKED_TOKENS.get(), dtype=torch.long)
    is_asked = torch.zeros(ctx.num_tokens, dtype=torch.bool)
    is_asked[asked] = True
    others = torch.nonzero(~is_asked).flatten()
    others = others[torch.randperm(others.numel(), generator=ctx.generator(0))]
    chosen = torch.cat([asked, others]) if keep_asked else others
    return chosen[:ctx.keep]


ORACLES = {
    "calibration_oracle_pre_llm": dict(keep_asked=True),
    "calibration_anti_oracle_pre_llm": dict(keep_asked=False),
    "calibration_oracle_intra_llm": dict(keep_asked=True, default_layer=INTRA_LAYER),
    "calibration_anti_oracle_intra_llm": dict(keep_asked=False, default_layer=INTRA_LAYER),
}


@pytest.fixture(scope="module", autouse=True)
def oracle_methods():
    for name, spec in ORACLES.items():
        keep_asked = spec["keep_asked"]
        methods.register_prune(name, default_layer=spec.get("default_layer"))(
            lambda ctx, keep_asked=keep_asked: _oracle_keep(ctx, keep_asked))
    yield
    for name in ORACLES:
        methods._base._REGISTRY.pop(name)


@pytest.fixture(scope="module", params=SHIPPED.values(), ids=SHIPPED)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_and_processor(family):
    from transformers import AutoProcessor

    model = family.model_class.from_pretrained(family.checkpoint).eval()
    return model, AutoProcessor.from_pretrained(family.checkpoint)


@pytest.fixture(scope="module")
def samples():
    return [data.make_sample(i, data.EVAL_SEED) for i in range(QUESTIONS)]


def reply(model, processor, sample, family=QWEN) -> str:
    """The model's answer to one question, prompted exactly as the family's VLMEvalKit wrapper prompts it (its
    messages, the chat template)."""
    text = processor.apply_chat_template(family.conversation(sample), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[[sample["image"]]], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def accuracy(model, processor, samples, family=QWEN) -> dict[str, float]:
    """Accuracy in % per question category and overall (``all``), each sample with its asked tokens set."""
    hits: dict[str, list[bool]] = {}
    for sample in samples:
        token = ASKED_TOKENS.set(sample["target_tokens"])
        try:
            correct = training.score(reply(model, processor, sample, family), sample)
        finally:
            ASKED_TOKENS.reset(token)
        hits.setdefault(sample["category"], []).append(correct)
        hits.setdefault("all", []).append(correct)
    return {category: 100.0 * sum(v) / len(v) for category, v in hits.items()}


# ---------------------------------------------------------------- the shipped checkpoint is the documented one
def test_shipped_checkpoint_is_the_recorded_training_output(family, model_and_processor):
    from transformers import AutoConfig

    model, shipped = model_and_processor
    record = (family.checkpoint / training.RECORD_FILE).read_text()
    recorded = re.search(r"weights checksum: `([0-9a-f]{64})`", record).group(1)
    assert training.weights_checksum(model) == recorded
    shipped_config = AutoConfig.from_pretrained(family.checkpoint).to_dict()
    built = family.build_config().to_dict()
    assert shipped_config["text_config"] == built["text_config"]
    assert shipped_config["vision_config"] == built["vision_config"]
    assert shipped.tokenizer.get_vocab() == family.build_tokenizer().get_vocab()
    assert shipped.chat_template == family.build_processor().chat_template


# ---------------------------------------------------------------- through VLMEvalKit
@pytest.mark.slow
def test_shipped_checkpoint_scores_at_least_95_percent_through_vlmevalkit(family, tmp_path, lmudata_env):
    data.write_dataset(lmudata_env, n=VLMEVALKIT_QUESTIONS)
    argv = ["--model", str(family.checkpoint), "--data", data.NAME, "--work-dir", str(tmp_path), "--device", "cpu",
            "--judge", "exact_matching", "--model-kwargs", '{"max_new_tokens": 4}']
    assert run_runner(argv, {}, runner=family.runner) == 0
    table = summarize.collect(tmp_path)
    row = table.iloc[0]
    assert (row["method"], row["samples"]) == ("stock", VLMEVALKIT_QUESTIONS)
    assert row["score"] >= 95.0, table.to_string()


# ---------------------------------------------------------------- oracle bounds, in-process
@pytest.mark.parametrize("stage", ["pre_llm", "intra_llm"])
def test_oracle_keeps_and_anti_oracle_loses_the_accuracy(family, model_and_processor, samples, stage):
    model, processor = model_and_processor
    patches = importlib.import_module(family.patches)
    with patched(patches, PRUNE_METHOD=f"calibration_oracle_{stage}", KEEP_RATIO=KEEP):
        oracle = accuracy(model, processor, samples, family=family)
    with patched(patches, PRUNE_METHOD=f"calibration_anti_oracle_{stage}", KEEP_RATIO=KEEP):
        anti = accuracy(model, processor, samples, family=family)
    assert oracle["all"] >= 95.0, oracle
    assert anti["all"] <= CHANCE + 15.0, anti


# ---------------------------------------------------------------- positions matter
def test_scrambled_positions_cost_the_positional_questions_only(family, model_and_processor, samples):
    model, processor = model_and_processor
    intact = accuracy(model, processor, samples, family=family)
    # Token (r, c) gets the features of token (r + G/2, c + G/2) (cyclically): every object moves to the opposite
    # quadrant, its shape and colour intact.
    half = data.GRID // 2
    permutation = torch.arange(data.GRID * data.GRID).view(data.GRID, data.GRID).roll((-half, -half), (0, 1))

    def scramble(module, args, output):
        # One image per prompt: the output holds its LLM visual tokens in raster order.
        if isinstance(output, torch.Tensor) and output.dim() == 3:  # LLaVA's, InternVL's projector: (images, tokens, hidden)
            return output[:, permutation.flatten()]
        if isinstance(output, torch.Tensor):  # Gemma 4's embed_vision
            return output[permutation.flatten()]
        output.pooler_output = output.pooler_output[permutation.flatten()]  # Qwen's vision tower (merger output)
        return output

    handle = getattr(model.model, VISUAL_TOKENS_MODULE[family.name]).register_forward_hook(scramble)
    try:
        broken = accuracy(model, processor, samples, family=family)
    finally:
        handle.remove()
    positional = ("position",)  # the only question type that needs to know where each object is
    for category in positional:
        assert broken[category] <= CHANCE + 20.0 and intact[category] - broken[category] >= 40.0, \
            (category, intact, broken)
    for category in set(data.CATEGORIES) - set(positional):
        assert broken[category] >= intact[category] - 10.0, (category, intact, broken)



# ---------------------------------------------------------------- a [CLS] that summarises the image (LLaVA-1.5)
@pytest.mark.parametrize("layer, heads", [(-2, "mean"), (-1, "single")], ids=["feature_layer", "last_layer"])
def test_llava_cls_attends_to_the_objects(layer, heads):
    """The LLaVA model's [CLS] is trained as an image summary (and its row to the objects) at the feature layer, where
    VisionZip, VisPruner and FasterVLM read it (heads averaged), and as a summary at the last layer, where PruMerge
    reads it (one full-width head): there its attention row goes to the object tokens (2-4 of 64), so the [CLS]
    methods are measured on a [CLS] that means something (docs/calibration.md: 99.98 % and 99.99 % of the row on 100
    images; 4.4 % for a uniform row)."""
    import custom_llava
    from transformers import AutoProcessor

    from methods import VisionNeeds

    model = LLAVA.model_class.from_pretrained(LLAVA.checkpoint).eval()
    processor = AutoProcessor.from_pretrained(LLAVA.checkpoint)
    shares = []
    for index in range(20):
        sample = data.make_sample(index, data.EVAL_SEED)
        pixels = processor.image_processor([sample["image"]], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            _, [signals] = custom_llava.LlavaAdapter().capture_vision(
                model.model, "image", {"pixel_values": pixels}, VisionNeeds(cls_layers=(layer, layer), cls_heads=heads),
                lambda: model.model.get_image_features(pixels))
        assert signals.cls and not signals.substitute
        row = signals.attention[model.config.vision_config.num_hidden_layers + layer]
        shares.append(float(row[[o["row"] * data.GRID + o["col"] for o in sample["objects"]]].sum() / row.sum()))
    assert sum(shares) / len(shares) >= 0.9, shares


# ---------------------------------------------------------------- the graded variant: the image is read at layer 2
@pytest.fixture(scope="module")
def graded_model_and_processor():
    from transformers import AutoProcessor

    model = QWEN_GRADED.model_class.from_pretrained(QWEN_GRADED.checkpoint).eval()
    return model, AutoProcessor.from_pretrained(QWEN_GRADED.checkpoint)


def test_graded_variant_is_the_recorded_training_output(graded_model_and_processor):
    model, _ = graded_model_and_processor
    record = (QWEN_GRADED.checkpoint / training.RECORD_FILE).read_text()
    assert training.weights_checksum(model) == re.search(r"weights checksum: `([0-9a-f]{64})`", record).group(1)
    assert model.config.text_config.num_hidden_layers == 6


@pytest.mark.slow
def test_graded_variant_scores_at_least_95_percent_through_vlmevalkit(tmp_path, lmudata_env):
    data.write_dataset(lmudata_env, n=VLMEVALKIT_QUESTIONS)
    argv = ["--model", str(QWEN_GRADED.checkpoint), "--data", data.NAME, "--work-dir", str(tmp_path), "--device",
            "cpu", "--judge", "exact_matching", "--model-kwargs", '{"max_new_tokens": 4}']
    assert run_runner(argv, {}, runner=QWEN_GRADED.runner) == 0
    row = summarize.collect(tmp_path).iloc[0]
    assert (row["method"], row["samples"]) == ("stock", VLMEVALKIT_QUESTIONS) and row["score"] >= 95.0


def test_graded_variant_still_reads_the_image_at_layer_2(graded_model_and_processor, samples):
    """Dropping the asked object's tokens before layer 2 (FastV's default) costs the graded variant its answers, and
    keeping them keeps the answers: intra-LLM methods at their default layer still decide what it sees. The Qwen
    model has read the image into the text by then: there the same drop leaves its answers."""
    import custom_qwenvl
    from transformers import AutoProcessor

    qwen = QWEN.model_class.from_pretrained(QWEN.checkpoint).eval()
    with patched(custom_qwenvl, INTRA_LLM_LAYER_SPECS=f"2:calibration_anti_oracle_intra_llm:{KEEP}"):
        assert accuracy(qwen, AutoProcessor.from_pretrained(QWEN.checkpoint), samples)["all"] >= 90.0
    model, processor = graded_model_and_processor
    with patched(custom_qwenvl, INTRA_LLM_LAYER_SPECS=f"2:calibration_oracle_intra_llm:{KEEP}"):
        oracle = accuracy(model, processor, samples, family=QWEN_GRADED)
    with patched(custom_qwenvl, INTRA_LLM_LAYER_SPECS=f"2:calibration_anti_oracle_intra_llm:{KEEP}"):
        anti = accuracy(model, processor, samples, family=QWEN_GRADED)
    assert oracle["all"] >= 95.0, oracle
    assert anti["all"] <= CHANCE + 15.0, anti
