"""The summary table, the accuracy plot, the kept-token view and the sweep, on the shared evaluated work dir."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
from PIL import Image

from scripts import kept_tokens, summarize, sweep
from tests.support import shapes_data
from tests.conftest import QUESTIONS, TOKENS_PER_IMAGE
from utils import keep_count


@pytest.fixture(scope="module")
def table(evaluated):
    return summarize.collect(evaluated.work_dir, min_category_samples=3)


def test_summary_has_one_row_per_run_with_measured_values(table, evaluated):
    assert list(table["method"]) == ["stock", "divprune_pre_llm", "fastv_intra_llm"]  # keep ratio 1, 0.5, 0.25
    assert list(table["stage"]) == ["-", "pre-LLM", "intra-LLM L2"]
    assert list(table["keep_ratio"]) == [1.0, 0.5, 0.25]
    assert list(table["tokens_before"]) == [TOKENS_PER_IMAGE] * 3
    assert list(table["tokens_after"]) == [TOKENS_PER_IMAGE, keep_count(TOKENS_PER_IMAGE, 0.5),
                                           keep_count(TOKENS_PER_IMAGE, 0.25)]
    accuracy = 100 * evaluated.answers.count("A") / QUESTIONS
    assert list(table["score"]) == pytest.approx([accuracy] * 3)
    assert list(table["unit"]) == ["%"] * 3
    assert list(table["delta"]) == pytest.approx([0.0] * 3)
    assert list(table["samples"]) == [QUESTIONS] * 3 and list(table["token_records"]) == [QUESTIONS] * 3


def test_self_scheduling_methods_are_described_not_taken_for_stock():
    """PDrop, SparseVLM and VTW pick their layers once the model's depth is known; the run's pruning config
    records them as ``scheduled`` with no layer."""
    pruning = {"pre_llm": None, "intra_llm": [], "scheduled": {"method": "pdrop_intra_llm", "ratio": 0.25,
                                                                  "layer": None}}
    assert summarize.describe_stages(pruning) == ("pdrop_intra_llm", "intra-LLM scheduled", 0.25)
    with_pre = {**pruning, "pre_llm": {"method": "divprune_pre_llm", "ratio": 0.5}}
    assert summarize.describe_stages(with_pre) == ("divprune_pre_llm + pdrop_intra_llm",
                                                   "pre-LLM + intra-LLM scheduled", 0.125)
    assert summarize.describe_stages({"pre_llm": None, "intra_llm": []}) == ("stock", "-", 1.0)


def test_kv_cache_runs_are_described_not_taken_for_stock():
    kv = {"pre_llm": None, "intra_llm": [], "kv": {"method": "snapkv_kv", "fraction": 0.25, "count": None}}
    assert summarize.describe_stages(kv) == ("snapkv_kv", "KV cache", 0.25)
    method, stage, ratio = summarize.describe_stages(dict(kv, kv={"method": "h2o_kv", "fraction": None, "count": 64}))
    assert (method, stage) == ("h2o_kv", "KV cache") and ratio != ratio  # a count: no ratio (NaN)
    with_pre = dict(kv, pre_llm={"method": "divprune_pre_llm", "ratio": 0.5})
    assert summarize.describe_stages(with_pre) == ("divprune_pre_llm + snapkv_kv (0.25)", "pre-LLM + KV cache", 0.5)


def test_categories_with_enough_samples_are_broken_down(table, evaluated):
    # Categories cycle colour, shape, position, count: 10 questions give 3, 3, 2, 2 samples.
    assert sorted(c for c in table if c.startswith("cat:")) == ["cat:colour", "cat:shape"]
    for category, offset in (("colour", 0), ("shape", 1)):
        answers = evaluated.answers[offset::4]
        assert table[f"cat:{category}"].tolist() == pytest.approx([100 * answers.count("A") / len(answers)] * 3)


def test_table_files_and_plot_are_written(table, tmp_path):
    csv_path, json_path = summarize.save_table(table, tmp_path)
    assert pd.read_csv(csv_path)["score"].tolist() == pytest.approx(table["score"].tolist())
    assert [row["method"] for row in json.loads(json_path.read_text())] == list(table["method"])
    plot = summarize.plot_accuracy(table, tmp_path / summarize.PLOT_FILE)
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 300 and len(set(image.getdata())) > 10
    printed = summarize.format_table(table)
    assert "24.0 → 12.0" in printed and "intra-LLM L2" in printed and printed.count("\n") == 4


def test_chance_is_the_mean_of_one_over_the_options():
    four = pd.DataFrame({"A": ["x"] * 3, "B": ["y"] * 3, "C": ["z"] * 3, "D": ["w"] * 3, "hit": [1, 0, 0]})
    assert summarize.chance_accuracy(four) == pytest.approx(0.25)
    mixed = pd.DataFrame({"A": ["x", "x"], "B": ["y", "y"], "C": ["z", None], "D": [" ", float("nan")]})
    assert summarize.chance_accuracy(mixed) == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert summarize.chance_accuracy(pd.DataFrame({"question": ["q"], "hit": [1]})) is None


def test_plot_shows_stock_on_top_chance_and_a_fixed_accuracy_scale(table):
    import matplotlib.pyplot as plt

    assert table["chance"].tolist() == pytest.approx([25.0] * 3)  # four options per question, in percent
    fig = summarize.accuracy_figure(table)
    try:
        (ax,) = fig.axes
        assert ax.get_ylim() == (0, 100) and ax.get_xlim() == pytest.approx((0, 1.05))
        assert list(ax.get_xticks()) == pytest.approx([0.25, 0.5, 1.0])
        lines = {line.get_label(): line for line in ax.get_lines()}
        stock = lines[f"stock ({table['score'][0]:.1f}%)"]
        chance = lines["chance (25%)"]
        methods_ = [lines["divprune_pre_llm (pre-LLM)"], lines["fastv_intra_llm (intra-LLM L2)"]]
        assert (stock.get_color(), stock.get_linestyle()) == ("black", "--")
        assert (chance.get_color(), chance.get_linestyle()) == ("grey", ":") and set(chance.get_ydata()) == {25.0}
        # Every run scores the same here: the stock line must stay visible on top of the method lines.
        assert all(stock.get_zorder() > line.get_zorder() > chance.get_zorder() for line in methods_)
        assert all(line.get_marker() == "o" and line.get_linestyle() == "-" for line in methods_)
        legend = [text.get_text() for text in ax.get_legend().get_texts()]
        assert stock.get_label() in legend and "chance (25%)" in legend
    finally:
        plt.close(fig)


def test_plot_of_a_single_keep_ratio_spans_the_whole_ratio_axis(table):
    import matplotlib.pyplot as plt

    fig = summarize.accuracy_figure(table[table["method"].isin(["stock", "divprune_pre_llm"])])
    try:
        (ax,) = fig.axes
        assert ax.get_xlim() == pytest.approx((0, 1.05)) and list(ax.get_xticks()) == pytest.approx([0.5, 1.0])
        assert [label.get_text() for label in ax.get_xticklabels()] == ["0.5", "1"]
        assert ax.get_ylim() == (0, 100)
    finally:
        plt.close(fig)


def test_summary_cli_writes_everything(evaluated, tmp_path, capsys):
    summarize.main([str(evaluated.work_dir), "--out", str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} == {*summarize.TABLE_FILES, summarize.PLOT_FILE}
    assert "divprune_pre_llm" in capsys.readouterr().out


def test_kept_token_view_shows_what_each_method_keeps(evaluated, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(evaluated.checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(evaluated.checkpoint).eval()
    question = shapes_data.make_question(0)
    configs = {"stock": kept_tokens.method_config(None, 1.0)}
    configs.update({m: kept_tokens.method_config(m, 0.25)
                    for m in ("divprune_pre_llm", "random_pre_llm", "fastv_intra_llm")})
    masks, resized = kept_tokens.kept_masks(model, processor, question["image"], question["question"], configs)
    assert all(mask.shape == (4, 6) for mask in masks.values())
    assert masks["stock"].all()
    for method in ("divprune_pre_llm", "random_pre_llm", "fastv_intra_llm"):
        assert masks[method].sum() == keep_count(TOKENS_PER_IMAGE, 0.25)
    assert not (masks["divprune_pre_llm"] == masks["random_pre_llm"]).all()
    path = kept_tokens.render(resized, masks, tmp_path / "kept.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 4 * resized.width


def test_sweep_plans_one_runner_process_per_configuration():
    jobs = sweep.plan("run_qwenvl.py", ["M"], ["D1", "D2"], ["divprune_pre_llm", "fastv_intra_llm"], [0.25, 0.5],
                      "out", stock=True, extra=["--judge", "exact_matching"])
    assert [job.label for job in jobs] == ["M__stock", "M__divprune_pre_llm-0.25", "M__divprune_pre_llm-0.5",
                                           "M__fastv_intra_llm-0.25", "M__fastv_intra_llm-0.5"]
    assert jobs[0].env == {} and jobs[3].env == {"PRUNE_METHOD": "fastv_intra_llm", "KEEP_RATIO": "0.25"}
    assert jobs[1].command[2:] == ["--model", "M", "--data", "D1", "D2", "--work-dir", "out",
                                   "--judge", "exact_matching"]
    kv = sweep.plan("run_qwenvl.py", ["M"], ["D"], ["snapkv_kv"], [0.25], "out", stock=False, extra=[])
    assert [(job.label, job.env) for job in kv] == [("M__snapkv_kv-0.25", {"KV_METHOD": "snapkv_kv",
                                                                            "KV_BUDGET": "0.25"})]


@pytest.mark.parametrize("parallel", [1, 2])
def test_sweep_sets_each_configuration_and_clears_the_callers_selection(tmp_path, parallel):
    # A stand-in runner that succeeds only when it sees exactly its configuration.
    check = ("import os, sys; sys.exit(0 if (os.environ.get('PRUNE_METHOD'), os.environ.get('KEEP_RATIO'), "
             "os.environ.get('INTRA_LLM_LAYER_SPECS'), os.environ.get('PRUNE_RANDOM_SEED')) == "
             "(sys.argv[1] or None, sys.argv[2] or None, None, '3') else 7)")
    jobs = [sweep.Job("ok", {"PRUNE_METHOD": "x", "KEEP_RATIO": "0.5"}, [sys.executable, "-c", check, "x", "0.5"]),
            sweep.Job("stock", {}, [sys.executable, "-c", check, "", ""]),
            sweep.Job("wrong", {}, [sys.executable, "-c", check, "x", "0.5"])]
    caller = {"PRUNE_METHOD": "leaked", "INTRA_LLM_LAYER_SPECS": "2:fastv_intra_llm", "PRUNE_RANDOM_SEED": "3",
              "PATH": "/usr/bin:/bin"}
    assert sweep.run(jobs, tmp_path, caller, parallel=parallel) == ["wrong"]
    assert (tmp_path / "wrong.log").exists()


def test_sweep_runs_the_first_job_alone_before_the_others(tmp_path):
    """The first run dumps VLMEvalKit's images; the others start only once it has finished."""
    marker = tmp_path / "first-done"
    first = ("import pathlib, sys, time; time.sleep(1.0); pathlib.Path(sys.argv[1]).touch()")
    later = "import pathlib, sys; sys.exit(0 if pathlib.Path(sys.argv[1]).exists() else 5)"
    jobs = [sweep.Job("first", {}, [sys.executable, "-c", first, str(marker)])]
    jobs += [sweep.Job(f"later{i}", {}, [sys.executable, "-c", later, str(marker)]) for i in range(3)]
    assert sweep.run(jobs, tmp_path / "logs", {"PATH": "/usr/bin:/bin"}, parallel=3) == []
