"""Configuration from the environment: every bad input raises one clear message, before a model loads."""

import textwrap
import warnings

import pytest
import torch

import custom_qwenvl
from utils import PruneConfig, PruneConfigError, Stage, keep_count


def parse(**env):
    return PruneConfig.from_env({k: str(v) for k, v in env.items()})


def test_no_configuration_means_no_pruning():
    config = parse()
    assert not config.active and config.stages == ()


def test_pre_llm_method_with_ratio():
    config = parse(KEEP_RATIO=0.25, PRUNE_METHOD="divprune_pre_llm")
    assert config.pre_llm == Stage("divprune_pre_llm", 0.25) and config.intra_llm == ()


def test_intra_llm_method_alone_runs_at_its_default_layer():
    config = parse(KEEP_RATIO=0.5, PRUNE_METHOD="fastv_intra_llm")
    assert config.intra_llm == (Stage("fastv_intra_llm", 0.5, 2),)


def test_stage_specific_variables_combine():
    config = parse(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm", PRUNE_METHOD_INTRA_LLM="fastv_intra_llm")
    assert config.pre_llm.method == "random_pre_llm" and config.intra_llm[0].method == "fastv_intra_llm"


def test_layer_specs_sorted_with_default_ratio_and_both_separators():
    config = parse(KEEP_RATIO=0.4, INTRA_LLM_LAYER_SPECS="6:random_intra_llm:0.2, 2:fastv_intra_llm")
    assert config.intra_llm == (Stage("fastv_intra_llm", 0.4, 2), Stage("random_intra_llm", 0.2, 6))
    config = parse(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.5;6:random_intra_llm:0.3")
    assert [s.layer for s in config.intra_llm] == [2, 6]


def test_hyper_parameters_are_read_and_defaulted():
    config = parse(KEEP_RATIO=0.5, PRUNE_METHOD="random_pre_llm", PRUNE_RANDOM_SEED=7)
    assert config.params["random_pre_llm"] == {"PRUNE_RANDOM_SEED": 7}
    assert parse(KEEP_RATIO=0.5, PRUNE_METHOD="random_pre_llm").params["random_pre_llm"]["PRUNE_RANDOM_SEED"] == 0


@pytest.mark.parametrize("n, ratio, expected", [
    (576, 0.111, 64), (10, 0.25, 2), (10, 0.05, 1), (3, 0.5, 2), (5, 0.5, 2), (7, 1.0, 7), (1, 0.01, 1), (0, 0.5, 0),
])
def test_keep_count_rule(n, ratio, expected):
    assert keep_count(n, ratio) == expected


@pytest.mark.parametrize("env, fragments", [
    ({"KEEP_RATIO": "0", "PRUNE_METHOD": "random_pre_llm"}, ["KEEP_RATIO='0'", "(0, 1]"]),
    ({"KEEP_RATIO": "1.5", "PRUNE_METHOD": "random_pre_llm"}, ["KEEP_RATIO='1.5'", "(0, 1]"]),
    ({"KEEP_RATIO": "-0.2", "PRUNE_METHOD": "random_pre_llm"}, ["KEEP_RATIO='-0.2'", "(0, 1]"]),
    ({"KEEP_RATIO": "nan", "PRUNE_METHOD": "random_pre_llm"}, ["KEEP_RATIO='nan'", "(0, 1]"]),
    ({"KEEP_RATIO": "half", "PRUNE_METHOD": "random_pre_llm"}, ["KEEP_RATIO='half'", "not a number"]),
    ({"PRUNE_METHOD": "random_pre_llm"}, ["KEEP_RATIO", "required"]),
    ({"KEEP_RATIO": "0.5", "PRUNE_METHOD": "divprun_pre_llm"}, ["PRUNE_METHOD='divprun_pre_llm'", "divprune_pre_llm"]),
    ({"KEEP_RATIO": "0.5", "PRUNE_METHOD": "fastv"}, ["PRUNE_METHOD='fastv'", "fastv_intra_llm"]),
    ({"KEEP_RATIO": "0.5", "PRUNE_METHOD_PRE_LLM": "fastv_intra_llm"}, ["PRUNE_METHOD_PRE_LLM", "intra-llm method", "divprune_pre_llm"]),
    ({"KEEP_RATIO": "0.5", "PRUNE_METHOD_INTRA_LLM": "divprune_pre_llm"}, ["PRUNE_METHOD_INTRA_LLM", "pre-llm method"]),
    ({"KEEP_RATIO": "0.5", "PRUNE_METHOD": "random_pre_llm", "PRUNE_METHOD_PRE_LLM": "divprune_pre_llm"}, ["conflicts"]),
    ({"INTRA_LLM_LAYER_SPECS": "2:divprune_pre_llm:0.5"}, ["INTRA_LLM_LAYER_SPECS", "pre-llm method"]),
    ({"INTRA_LLM_LAYER_SPECS": "2-fastv_intra_llm"}, ["INTRA_LLM_LAYER_SPECS", "malformed", "LAYER:METHOD[:RATIO]"]),
    ({"INTRA_LLM_LAYER_SPECS": "two:fastv_intra_llm:0.5"}, ["INTRA_LLM_LAYER_SPECS", "'two'", "not a non-negative integer"]),
    ({"INTRA_LLM_LAYER_SPECS": "2:fastv_intra_llm:0.5:9"}, ["INTRA_LLM_LAYER_SPECS", "malformed"]),
    ({"INTRA_LLM_LAYER_SPECS": "2:fastv_intra_llm:big"}, ["INTRA_LLM_LAYER_SPECS", "'big'", "not a number"]),
    ({"INTRA_LLM_LAYER_SPECS": "2:fastv_intra_llm:0.5;2:random_intra_llm:0.3"}, ["layer 2 appears more than once"]),
    ({"INTRA_LLM_LAYER_SPECS": "2:fastv_intra_llm"}, ["no ratio", "KEEP_RATIO is not set"]),
    ({"INTRA_LLM_LAYER_SPECS": "2:fastv_intra_llm:0.3;4:random_intra_llm:0.5"}, ["exceeds", "do not increase"]),
    ({"INTRA_LLM_LAYER_SPECS": ";"}, ["no layer entries"]),
    ({"INTRA_LLM_LAYER_SPECS": "0:fastv_intra_llm:0.5"}, ["fastv_intra_llm cannot run before layer 0", "layer >= 1"]),
    ({"KEEP_RATIO": "0.5", "PRUNE_METHOD": "fastv_intra_llm", "INTRA_LLM_LAYER_SPECS": "3:fastv_intra_llm"}, ["conflicts"]),
    ({"KEEP_RATIO": "0.5", "PRUNE_METHOD": "random_pre_llm", "PRUNE_RANDOM_SEED": "x"}, ["PRUNE_RANDOM_SEED='x'", "int"]),
    ({"PRUNE_METHODS_PATH": "/nonexistent/methods"}, ["PRUNE_METHODS_PATH", "does not exist"]),
])
def test_bad_input_names_variable_value_and_allowed(env, fragments):
    with pytest.raises(PruneConfigError) as err:
        PruneConfig.from_env(env)
    message = str(err.value)
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message


@pytest.mark.parametrize("env, text", [
    ({"KEEP_RATIO": "0.5", "PRUNE_METHOD_PRE_LLM": "fastv_intra_llm"},
     "PRUNE_METHOD_PRE_LLM='fastv_intra_llm': is an intra-LLM method; allowed: pre-LLM methods: cdpruner_pre_llm"),
    ({"KEEP_RATIO": "0.5", "PRUNE_METHOD_INTRA_LLM": "divprune_pre_llm"},
     "PRUNE_METHOD_INTRA_LLM='divprune_pre_llm': is a pre-LLM method; allowed: intra-LLM methods: dart_intra_llm"),
    ({"KEEP_RATIO": "0.5", "PRUNE_METHOD": "random_pre_llm", "PRUNE_RANDOM_SEED": "x"},
     "; allowed: an int, default 0"),
    ({"KEEP_RATIO": "0.5", "PRUNE_METHOD": "gprune_pre_llm", "GPRUNE_THRESHOLD": "x"},
     "; allowed: a float, default 0.5"),
])
def test_messages_use_the_right_article(env, text):
    with pytest.raises(PruneConfigError) as err:
        PruneConfig.from_env(env)
    assert text in str(err.value)


def ignored_warnings(**env) -> list[str]:
    """The 'is set but' warnings of one parse (any other warning passes through)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse(**env)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and " is set but " in str(w.message)]


def test_keep_ratio_without_a_method_warns_once_that_the_run_is_stock():
    with pytest.warns(UserWarning, match=r"^KEEP_RATIO=0\.25 is set but no pruning method is configured \(PRUNE_METHOD, "
                      r"PRUNE_METHOD_VIT, PRUNE_METHOD_PRE_LLM, PRUNE_METHOD_INTRA_LLM, VIT_LAYER_SPECS or "
                      r"INTRA_LLM_LAYER_SPECS\): the run is stock$"):
        assert not parse(KEEP_RATIO=0.25).active
    assert len(ignored_warnings(KEEP_RATIO=0.25)) == 1


def test_hyper_parameters_of_methods_not_configured_warn():
    assert ignored_warnings(KEEP_RATIO=0.5, PRUNE_METHOD="random_pre_llm", DART_PIVOT_IMAGE_TOKENS=8) == [
        "DART_PIVOT_IMAGE_TOKENS=8 is set but dart_intra_llm is not configured: it has no effect"]
    # Stock: each variable once, KEEP_RATIO too.
    assert ignored_warnings(KEEP_RATIO=0.5, DART_PIVOT_TEXT_TOKENS=2, VTC_CLS_START_LAYER=-1) == [
        "KEEP_RATIO=0.5 is set but no pruning method is configured (PRUNE_METHOD, PRUNE_METHOD_VIT, "
        "PRUNE_METHOD_PRE_LLM, PRUNE_METHOD_INTRA_LLM, VIT_LAYER_SPECS or INTRA_LLM_LAYER_SPECS): the run is stock",
        "DART_PIVOT_TEXT_TOKENS=2 is set but dart_intra_llm is not configured: it has no effect",
        "VTC_CLS_START_LAYER=-1 is set but vtc_cls_pre_llm is not configured: it has no effect"]
    with pytest.warns(UserWarning, match="PRUNE_RANDOM_SEED=3 is set but none of random_frames_pre_llm, "
                      "random_intra_llm, random_pre_llm, random_vit is configured: it has no effect"):
        parse(KEEP_RATIO=0.5, PRUNE_METHOD="fastv_intra_llm", PRUNE_RANDOM_SEED=3)


def test_a_variable_shared_by_methods_is_used_if_any_configured_method_reads_it():
    assert ignored_warnings(KEEP_RATIO=0.5, PRUNE_METHOD="random_intra_llm", PRUNE_RANDOM_SEED=3) == []
    assert ignored_warnings(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.5;4:random_intra_llm:0.25",
                            PRUNE_RANDOM_SEED=3) == []


def test_a_normal_configuration_warns_nothing():
    for env in ({}, {"KEEP_RATIO": "0.5", "PRUNE_METHOD": "divprune_pre_llm"},
                {"KEEP_RATIO": "0.5", "PRUNE_METHOD": "dart_intra_llm", "DART_PIVOT_IMAGE_TOKENS": "8"},
                {"KEEP_RATIO": "0.5", "PRUNE_METHOD_PRE_LLM": "vtc_cls_pre_llm", "VTC_CLS_START_LAYER": "-1",
                 "PRUNE_METHOD_INTRA_LLM": "fastv_intra_llm", "DART_PIVOT_TEXT_TOKENS": ""}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            PruneConfig.from_env(env)


def test_layer_beyond_depth_is_refused_when_the_model_is_known():
    config = parse(INTRA_LLM_LAYER_SPECS="9:fastv_intra_llm:0.5")
    config.check_depth(10)
    with pytest.raises(PruneConfigError, match=r"layer 9 .* beyond the model's depth; allowed: 0\.\.7"):
        config.check_depth(8)


def test_bad_configuration_fails_in_apply_patches_and_installs_nothing(monkeypatch):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    before = m.Qwen2_5_VLModel.forward
    monkeypatch.setenv("KEEP_RATIO", "2")
    monkeypatch.setenv("PRUNE_METHOD", "divprune_pre_llm")
    with pytest.raises(PruneConfigError, match="KEEP_RATIO='2'"):
        custom_qwenvl.apply_patches()
    assert m.Qwen2_5_VLModel.forward is before


def test_apply_and_remove_are_idempotent(monkeypatch):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    original = m.Qwen2_5_VLTextModel.forward
    monkeypatch.setenv("KEEP_RATIO", "0.5")
    monkeypatch.setenv("PRUNE_METHOD", "random_pre_llm")
    try:
        custom_qwenvl.apply_patches()
        patched = m.Qwen2_5_VLTextModel.forward
        custom_qwenvl.apply_patches()
        assert m.Qwen2_5_VLTextModel.forward is patched is not original
    finally:
        custom_qwenvl.remove_patches()
        custom_qwenvl.remove_patches()
    assert m.Qwen2_5_VLTextModel.forward is original


def test_method_from_a_file_outside_the_package(tmp_path):
    (tmp_path / "norm_keep.py").write_text(textwrap.dedent('''
        from methods import register_prune

        @register_prune("outside_norm_pre_llm")
        def outside_norm_pre_llm(ctx):
            """Keep the largest-norm tokens."""
            return ctx.features.norm(dim=-1).topk(ctx.keep).indices
    '''))
    config = parse(PRUNE_METHODS_PATH=tmp_path, KEEP_RATIO=0.5, PRUNE_METHOD="outside_norm_pre_llm")
    assert config.pre_llm.method == "outside_norm_pre_llm"


def test_untested_transformers_version_is_refused_loudly(monkeypatch):
    import transformers

    from utils import check_transformers_version

    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    monkeypatch.delenv("PRUNE_ALLOW_UNTESTED_TRANSFORMERS", raising=False)
    with pytest.raises(RuntimeError, match=r"transformers 5\.24\.0 is not supported.*5\.23\.x"):
        custom_qwenvl.apply_patches(PruneConfig())
    monkeypatch.setenv("PRUNE_ALLOW_UNTESTED_TRANSFORMERS", "1")
    with pytest.warns(UserWarning, match="5.24.0"):
        check_transformers_version()


@pytest.fixture
def scheduled_method():
    """A test-only intra-LLM method with its own two-stage schedule (layers 1/4 and 3/4 of the depth)."""
    import methods

    def schedule(num_layers, ratio):
        return [(num_layers // 4, ratio), (3 * num_layers // 4, ratio / 2)]

    @methods.register_prune("two_stage_intra_llm", default_schedule=schedule, min_layer=1)
    def two_stage_intra_llm(ctx):
        """Test method."""
        return torch.arange(ctx.keep)

    yield "two_stage_intra_llm"
    methods._base._REGISTRY.pop("two_stage_intra_llm")


def test_a_scheduled_method_named_alone_is_resolved_when_the_depth_is_known(scheduled_method):
    config = parse(KEEP_RATIO=0.5, PRUNE_METHOD=scheduled_method)
    assert config.active and config.intra_llm == () and config.scheduled == Stage(scheduled_method, 0.5)
    resolved = config.resolved_for(32)
    assert resolved.intra_llm == (Stage(scheduled_method, 0.5, 8), Stage(scheduled_method, 0.25, 24))
    assert resolved.scheduled is None and config.intra_llm == ()  # the parsed configuration is unchanged
    assert config.resolved_for(32) is resolved  # memoised: the pruning state keeps its identity every forward
    assert config.resolved_for(8).intra_llm == (Stage(scheduled_method, 0.5, 2), Stage(scheduled_method, 0.25, 6))
    assert config.describe()["scheduled"] == {"method": scheduled_method, "ratio": 0.5, "layer": None}
    with pytest.raises(PruneConfigError, match=r"PRUNE_METHOD='two_stage_intra_llm'.*cannot run before layer 0"):
        config.resolved_for(2)  # layers (0, 1): below the method's minimum layer


def test_a_scheduled_method_in_layer_specs_runs_exactly_there(scheduled_method):
    config = parse(INTRA_LLM_LAYER_SPECS=f"5:{scheduled_method}:0.4")
    assert config.scheduled is None and config.intra_llm == (Stage(scheduled_method, 0.4, 5),)
    assert config.resolved_for(6).intra_llm == config.intra_llm
    with pytest.raises(PruneConfigError, match="beyond the model's depth"):
        config.resolved_for(5)


def test_default_schedule_that_does_not_fit_the_model_is_a_config_error():
    config = parse(KEEP_RATIO=0.5, PRUNE_METHOD="pdrop_intra_llm")
    assert [s.layer for s in config.resolved_for(28).intra_llm] == [7, 14, 21]
    with pytest.raises(PruneConfigError, match=r"PRUNE_METHOD='pdrop_intra_llm'.*does not fit.*INTRA_LLM_LAYER_SPECS"):
        config.resolved_for(3)


def test_hooks_refuse_a_configuration_whose_schedule_is_not_resolved():
    from hooks import PruningState

    config = parse(KEEP_RATIO=0.5, PRUNE_METHOD="pdrop_intra_llm")
    with pytest.raises(RuntimeError, match="resolved_for"):
        PruningState(config)
    assert PruningState(config.resolved_for(32)).config.intra_llm[0].layer == 8


def test_cls_signal_is_validated_and_named_in_the_run_identity_only_when_set():
    assert PruneConfig.from_env({}).cls_signal == "cls"
    assert "cls_signal" not in PruneConfig.from_env({"KEEP_RATIO": "0.5", "PRUNE_METHOD": "fastervlm_pre_llm"}).describe()
    substitute = PruneConfig.from_env({"KEEP_RATIO": "0.5", "PRUNE_METHOD": "fastervlm_pre_llm",
                                       "CLS_SIGNAL": "Substitute"})
    assert substitute.describe()["cls_signal"] == "substitute"
    with pytest.raises(PruneConfigError, match=r"CLS_SIGNAL='row': unknown vision signal; allowed: cls .* or substitute"):
        PruneConfig.from_env({"CLS_SIGNAL": "row"})
