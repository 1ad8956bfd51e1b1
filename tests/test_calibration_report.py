"""scripts/calibration_report.py end to end: one runner process per configuration, the table, the plot and
report.md. The checkpoint is the calibration architecture after a few training steps (the report's plumbing does
not depend on what the model knows)."""

from __future__ import annotations

import importlib
import json

import pytest

import evalkit

from scripts import calibration_report, summarize
from calibration import train as training
from calibration.models import FAMILIES, QWEN


def few_steps_checkpoint(family, folder):
    model = training.train(family, steps=2, seed=1, batch_size=2, log_every=0, workers=0)
    return training.save(model, folder / f"few-steps-{family.name}", family)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return few_steps_checkpoint(QWEN, tmp_path_factory.mktemp("calibration"))


def test_plan_runs_stock_then_each_method_and_ratio_and_ratio_free_methods_once(checkpoint, tmp_path):
    jobs = calibration_report.plan(checkpoint, ["random_pre_llm", "vtw_intra_llm"], [0.5, 0.25], tmp_path)
    assert [job.label.split("__")[1] for job in jobs] == ["stock", "random_pre_llm-0.5", "random_pre_llm-0.25",
                                                          "vtw_intra_llm-0.5"]  # VTW ignores the keep ratio
    assert all("--judge" in job.command and str(checkpoint) in job.command for job in jobs)


def test_the_report_runs_every_token_pruning_method_and_no_kv_cache_method():
    names = calibration_report.registered_methods()
    assert "divprune_pre_llm" in names and "fastv_intra_llm" in names and "tome_vit" in names
    assert not [name for name in names if name.endswith("_kv")]


def test_plan_can_move_single_layer_intra_llm_methods_to_another_layer(checkpoint, tmp_path):
    names = ["random_pre_llm", "fastv_intra_llm", "pdrop_intra_llm", "mustdrop_vit"]
    jobs = calibration_report.plan(checkpoint, names, [0.25], tmp_path, intra_layer=1)
    assert [(job.label.split("__")[1], job.env) for job in jobs] == [
        ("stock", {}),
        ("random_pre_llm-0.25", {"PRUNE_METHOD": "random_pre_llm", "KEEP_RATIO": "0.25"}),
        ("L1-fastv_intra_llm-0.25", {"INTRA_LLM_LAYER_SPECS": "1:fastv_intra_llm:0.25"}),
        ("pdrop_intra_llm-0.25", {"PRUNE_METHOD": "pdrop_intra_llm", "KEEP_RATIO": "0.25"}),  # its own schedule
        ("mustdrop_vit-0.25", {"PRUNE_METHOD": "mustdrop_vit", "KEEP_RATIO": "0.25"}),  # a ViT block, not a layer
    ]


@pytest.mark.slow
def test_report_across_families_writes_each_familys_report_and_one_cross_family_table(tmp_path):
    """``--family all`` on the shipped models: each family's runs through its own runner, table, plot and report.md in
    its folder; the [CLS] method also under ``CLS_SIGNAL=substitute`` on the LLaVA model (the one with a [CLS]) only;
    then the cross-family table and plot."""
    code = calibration_report.main(["--family", "all", "--work-dir", str(tmp_path), "--samples", "6",
                                    "--methods", "random_pre_llm", "fastervlm_pre_llm", "--ratios", "0.25",
                                    "--parallel", "1"])
    assert code == 0
    tokens = calibration_report.calibration_data.GRID ** 2
    for family in FAMILIES.values():
        work = tmp_path / family.name
        table = summarize.collect(work / "runs")
        expected = ["fastervlm_pre_llm", "random_pre_llm", "stock"]
        if family.reads_cls_row:
            expected.insert(1, "fastervlm_pre_llm ([CLS] substitute)")
        assert sorted(table["method"]) == expected, family.name
        assert set(table["samples"]) == {6}
        assert set(table.loc[table["method"] != "stock", "tokens_after"]) == {round(0.25 * tokens)}
        report = (work / calibration_report.REPORT_FILE).read_text()
        assert "random_pre_llm" in report and "VTC_CLS_START_LAYER=-" in report and family.name in report
        runner = importlib.import_module(family.runner)  # the family's runner evaluated every run
        configs = (work / "runs").glob(f"*/{evalkit.RUN_CONFIG_FILE}")
        assert {json.loads(path.read_text())["family"] for path in configs} == {runner.FAMILY.name}
        assert (work / calibration_report.PLOT_FILE).stat().st_size > 0
    cross = (tmp_path / f"{calibration_report.CROSS_FAMILY_FILE}.md").read_text()
    for family in FAMILIES:
        assert f"{family} @ 0.25" in cross and f"{family} @ stock" in cross
    assert "fastervlm_pre_llm ([CLS] substitute)" in cross
    assert (tmp_path / f"{calibration_report.CROSS_FAMILY_FILE}.png").stat().st_size > 0


def test_cross_family_table_scores_each_model_on_its_learned_question_types():
    import pandas as pd

    def table(stock, pruned):  # (colour, shape) accuracies of stock and of one pruned run
        return pd.DataFrame({"method": ["stock", "random_pre_llm"], "stage": ["-", "pre-LLM"], "keep_ratio": [1.0, 0.25],
                             "score": [sum(stock) / 2, sum(pruned) / 2], "cat:colour": [stock[0], pruned[0]],
                             "cat:shape": [stock[1], pruned[1]]})

    wide, learned = calibration_report.cross_family_table({"a": table((100.0, 98.0), (60.0, 40.0)),
                                                           "b": table((100.0, 50.0), (30.0, 50.0))})
    assert learned == {"a": ["colour", "shape"], "b": ["colour"]}
    assert list(wide.columns) == ["method", "stage", "a @ stock", "a @ 0.25", "b @ stock", "b @ 0.25"]
    assert wide["method"].tolist() == ["stock", "random_pre_llm"]
    assert wide.iloc[0, 2:].tolist()[::2] == [99.0, 100.0]  # stock: a on both types, b on colour only
    assert wide.iloc[1, 2:].tolist()[1::2] == [50.0, 30.0]


def test_cls_methods_get_substitute_runs_and_others_do_not(tmp_path):
    names = ["random_pre_llm", "fastervlm_pre_llm", "hiprune_pre_llm", "prumerge_pre_llm", "fastv_intra_llm"]
    assert calibration_report.cls_row_methods(names) == ["fastervlm_pre_llm", "prumerge_pre_llm"]
    jobs = calibration_report.plan(tmp_path, names[:2], [0.25], tmp_path)
    extra = calibration_report.with_cls_substitute(jobs, ["fastervlm_pre_llm"])
    assert [(job.label.split("__")[1], job.env) for job in extra] == [
        ("fastervlm_pre_llm-0.25+cls_substitute",
         {"PRUNE_METHOD": "fastervlm_pre_llm", "KEEP_RATIO": "0.25", "CLS_SIGNAL": "substitute"})]


def test_a_missing_checkpoint_is_named_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        calibration_report.main(["--checkpoint", str(tmp_path / "nothing"), "--work-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "nothing: no model there" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_video_plot_keeps_video_methods_apart_from_image_methods_frame_by_frame():
    assert calibration_report.panel("fastvid_pre_llm", "pre-LLM", video=True) == "video"
    assert calibration_report.panel("divprune_pre_llm", "pre-LLM", video=True) == "pre-LLM image (frame by frame)"
    assert calibration_report.panel("fastv_intra_llm", "intra-LLM L2", video=True) == "intra-LLM image (frame by frame)"
    assert calibration_report.panel("holitom_intra_llm", "intra-LLM L2", video=True) == "video"
    assert calibration_report.panel("divprune_pre_llm", "pre-LLM", video=False) == "pre-LLM"
    assert calibration_report.panel("tome_vit", "ViT scheduled", video=True) is None  # in the table only


def test_the_video_task_refuses_another_family_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        calibration_report.main(["--task", "video", "--family", "gemma4", "--work-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--family gemma4" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_video_report_runs_video_and_image_methods_on_the_shipped_video_model(tmp_path):
    code = calibration_report.main(["--task", "video", "--work-dir", str(tmp_path), "--samples", "3",
                                    "--methods", "uniform_frames_pre_llm", "random_pre_llm", "--ratios", "0.25",
                                    "--parallel", "1"])
    assert code == 0
    table = summarize.collect(tmp_path / "runs").set_index("method")
    assert set(table["dataset"]) == {"ShapesMotionCalib_8frame"} and set(table["samples"]) == {3}
    assert table.loc["uniform_frames_pre_llm", "tokens_after"] == 16  # one of the 4 temporal steps, whole
    assert table.loc["random_pre_llm", "tokens_after"] == 4 * 4  # frame by frame: 4 of each step's 16 tokens
    assert "frame by frame" in (tmp_path / calibration_report.REPORT_FILE).read_text()


def test_methods_whose_schedule_does_not_fit_the_model_are_left_out_with_the_reason():
    from calibration import video

    unfit = calibration_report.unfit_schedules(["mustdrop_intra_llm", "pdrop_intra_llm", "fastv_intra_llm"],
                                               video.CHECKPOINT, 0.05)
    assert list(unfit) == ["mustdrop_intra_llm"]  # four stages on a 4-layer model; PyramidDrop's three fit
    assert "4 decoder layers" in unfit["mustdrop_intra_llm"]


def test_the_describe_task_adds_kv_methods_at_the_token_methods_cache_sizes(tmp_path):
    """ShapesDescribe answers take two words, so the KV methods are measured; their budgets make each layer cache as
    many entries as a token method at each keep ratio (the prompt minus the visual tokens it drops); the cache plot
    puts both kinds on one axis."""
    import pandas as pd

    from calibration import data

    assert "snapkv_kv" in calibration_report.registered_methods(kv=True)
    samples = [data.make_describe_sample(i, data.EVAL_SEED) for i in range(4)]
    processor = QWEN.build_processor()
    lengths = [len(processor(text=[training.chat_text(s, QWEN)], images=[[s["image"]]])["input_ids"][0]) for s in samples]
    visual = data.GRID ** 2
    budgets = calibration_report.equal_cache_budgets([0.5, 0.25], samples)
    for ratio, budget in zip([0.5, 0.25], budgets):
        mean = sum(lengths) / len(lengths)
        assert abs(budget * mean - (mean - (1 - ratio) * visual)) < 0.5  # equal cached entries, to the rounding
    table = pd.DataFrame({"method": ["stock", "divprune_pre_llm", "divprune_pre_llm", "snapkv_kv", "snapkv_kv"],
                          "stage": ["-", "pre-LLM", "pre-LLM", "KV cache", "KV cache"],
                          "cached_tokens": [137.0, 105.0, 89.0, 105.0, 89.0], "score": [97.0, 95.0, 90.0, 96.0, 80.0]})
    path = calibration_report.plot_cache(table, tmp_path / "cache.png", "test")
    assert path.stat().st_size > 10_000
