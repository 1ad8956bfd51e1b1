"""Local video multiple-choice sets (video_data.py) through run_qwenvl.py and ``vlmeval.run.main``, offline.

A ShapesMotion set of a few generated clips (tests/support/motion_data.py) is evaluated by a tiny Qwen2.5-VL
checkpoint (with its video processor) rigged to always answer "A", so the accuracy is known in advance: stock with
two samplings in one runner call (``--data ShapesMotion_4frame ShapesMotion_4fps``), with a video pruning method
(``uniform_frames_pre_llm``, every other temporal step of each video), and through run.py's JSON ``--config``
(``"class": "LocalVideoMCQ"``, ``nframe`` 8). The clips are 16 frames at 8 fps (2 s) and every frame is resized to
112 x 112 pixels (``min_pixels`` = ``max_pixels``): 4 x 4 LLM tokens per temporal step of two frames, so 4 frames give
a video of grid (2, 4, 4), 32 tokens, and 8 frames (``4fps``, ``8frame``) a grid of (4, 4, 4), 64 tokens.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

import evalkit
from tests.conftest import run_runner
from tests.support import motion_data
from tests.support.tiny_checkpoints import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent

CLIPS = 6  # two of each category
NAME = motion_data.NAME
PIXELS = 112 * 112
WRAPPER_KWARGS = {"max_new_tokens": 1, "min_pixels": PIXELS, "max_pixels": PIXELS}
FLAGS = ["--device", "cpu", "--model-kwargs", json.dumps(WRAPPER_KWARGS)]  # no --judge: exact matching, no judge
UNIFORM = {"PRUNE_METHOD": "uniform_frames_pre_llm", "KEEP_RATIO": "0.5"}
STOCK_SETS = [f"{NAME}_4frame", f"{NAME}_4fps"]


@dataclass
class VideoRuns:
    lmudata: Path
    checkpoint: Path
    work_dir: Path
    exit_codes: dict = field(default_factory=dict)
    run_dirs: dict = field(default_factory=dict)  # label -> run folder

    def run(self, label: str, argv: list[str], env: dict) -> None:
        before = set(self.work_dir.glob(f"*/{evalkit.RUN_CONFIG_FILE}"))
        self.exit_codes[label] = run_runner(argv, env)
        created = set(self.work_dir.glob(f"*/{evalkit.RUN_CONFIG_FILE}")) - before
        if len(created) == 1:
            self.run_dirs[label] = created.pop().parent

    def run_dir(self, label: str) -> Path:
        if label not in self.run_dirs:
            raise AssertionError(f"no run folder for {label} (exit code {self.exit_codes.get(label)})")
        return self.run_dirs[label]


@pytest.fixture(scope="module")
def video_runs(tmp_path_factory, lmudata_env) -> VideoRuns:
    root = tmp_path_factory.mktemp("video")
    motion_data.write_dataset(lmudata_env, CLIPS)
    runs = VideoRuns(lmudata_env, save_checkpoint(root / "always-a", family="qwen2_5_vl", answers="A"),
                     root / "outputs")
    common = ["--model", str(runs.checkpoint), "--work-dir", str(runs.work_dir), *FLAGS]
    runs.run("stock", ["--data", *STOCK_SETS, *common], {})
    runs.run("uniform", ["--data", f"{NAME}_4fps", *common], UNIFORM)
    config = {"model": {"tiny": {"class": "Qwen2VLChat", "model_path": str(runs.checkpoint), **WRAPPER_KWARGS}},
              "data": {f"{NAME}_8frame": {"class": "LocalVideoMCQ", "dataset": NAME, "nframe": 8}}}
    (root / "config.json").write_text(json.dumps(config))
    runs.run("config", ["--config", str(root / "config.json"), "--work-dir", str(runs.work_dir), "--device", "cpu"],
             {})
    return runs


RUN_SETS = {"stock": STOCK_SETS, "uniform": [f"{NAME}_4fps"], "config": [f"{NAME}_8frame"]}


def predictions(run_dir: Path, data: str) -> tuple[Path, pd.DataFrame]:
    from vlmeval.smp import load

    (path,) = run_dir.glob(f"{run_dir.name}_{data}.xlsx")
    return path, load(str(path))


def token_records(run_dir: Path, data: str) -> list[dict]:
    lines = (run_dir / evalkit.TOKENS_FILE.format(dataset=data, rank=0)).read_text().splitlines()
    return [json.loads(line) for line in lines]


# ---------------------------------------------------------------- end to end
def test_every_run_predicts_every_clip_and_is_scored(video_runs):
    assert video_runs.exit_codes == {label: 0 for label in RUN_SETS}
    for label, sets in RUN_SETS.items():
        run_dir = video_runs.run_dir(label)
        status = json.loads((run_dir / evalkit.STATUS_FILE).read_text())["datasets"]
        for data in sets:
            path, preds = predictions(run_dir, data)
            assert sorted(preds["index"]) == list(range(CLIPS)) and list(preds["prediction"]) == ["A"] * CLIPS
            assert status[data]["status"] == "done" and not status[data].get("error_message")
            assert status[data]["judge_model"] == ""  # exact matching: no judge model, no network
            assert (run_dir / f"{path.stem}_acc.csv").is_file()
            scored = pd.read_excel(run_dir / f"{path.stem}_exact_matching_result.xlsx")
            assert list(scored["extracted"]) == ["A"] * CLIPS


def test_the_rigged_model_scores_exactly_the_share_of_a_answers(video_runs):
    truth = motion_data.answers(CLIPS)
    expected = {"Overall": sum(answer == "A" for answer, _ in truth) / CLIPS}
    for category in motion_data.CATEGORIES:
        answers = [answer for answer, cat in truth if cat == category]
        expected[category] = answers.count("A") / len(answers)
    assert 0 < expected["Overall"] < 1  # the assertion below could fail both ways
    for label, sets in RUN_SETS.items():
        status = json.loads((video_runs.run_dir(label) / evalkit.STATUS_FILE).read_text())["datasets"]
        for data in sets:
            assert status[data]["metrics"] == pytest.approx(expected, abs=1e-12)
            assert status[data]["primary_metric"] == "Overall"


def test_nframe_and_fps_decide_the_frames_that_reach_the_model(video_runs):
    """4 frames: 2 temporal steps; 4 fps of a 2 s clip and 8 frames: 4 steps. The 4fps set follows a 4frame one in the
    same process: it gets its own sampling, not what VLMEvalKit left on the wrapper (restore_video_sampling)."""
    expected = {("stock", f"{NAME}_4frame"): [2, 4, 4], ("stock", f"{NAME}_4fps"): [4, 4, 4],
                ("config", f"{NAME}_8frame"): [4, 4, 4]}
    for (label, data), grid in expected.items():
        records = token_records(video_runs.run_dir(label), data)
        assert len(records) == CLIPS and len({r["key"] for r in records}) == CLIPS
        tokens = grid[0] * grid[1] * grid[2]
        for record in records:
            assert record["dataset"] == data and record["tokens"] == {"input": tokens}
            assert [(span["modality"], span["grid"]) for span in record["spans"]] == [("video", grid)]


def test_the_pruned_run_is_namespaced_apart_from_the_stock_run(video_runs):
    stock, pruned = video_runs.run_dir("stock"), video_runs.run_dir("uniform")
    assert stock != pruned
    assert stock.name.startswith("always-a__stock__")
    assert pruned.name.startswith("always-a__uniform_frames_pre_llm-0.5__")
    data = f"{NAME}_4fps"
    assert predictions(stock, data)[0].parent != predictions(pruned, data)[0].parent
    recorded = json.loads((pruned / evalkit.RUN_CONFIG_FILE).read_text())
    assert recorded["pruning"]["pre_llm"]["method"] == "uniform_frames_pre_llm"
    # every other temporal step of each video is dropped: 2 of 4, 32 of 64 tokens
    assert all(r["tokens"] == {"input": 64, "pre_llm": 32} for r in token_records(pruned, data))
    assert all(r["tokens"] == {"input": 64} for r in token_records(stock, data))
    assert video_runs.run_dir("config").name.startswith("tiny__stock__")


def test_a_local_video_set_named_without_its_sampling_exits_2(video_runs, tmp_path, capsys):
    argv = ["--model", str(video_runs.checkpoint), "--data", NAME, "--work-dir", str(tmp_path / "out"), *FLAGS]
    assert run_runner(argv, {}) == 2
    assert f"--data {NAME}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # VLMEvalKit never started


# ---------------------------------------------------------------- the data set class
def test_prompts_give_a_video_wrapper_the_clip_and_others_the_sampled_frames(video_runs):
    import video_data

    with video_data.registered():
        video = video_data.LocalVideoMCQ(NAME, nframe=4)
        by_fps = video_data.LocalVideoMCQ(NAME, fps=2)
    assert video.dataset_name == f"{NAME}_4frame" and by_fps.dataset_name == f"{NAME}_2fps"
    assert len(video) == CLIPS and list(video.data["video"]) == [f"clip{i:04d}" for i in range(CLIPS)]
    clip, text = video.build_prompt(0, video_llm=True)
    assert clip == {"type": "video", "value": str(video_runs.lmudata / NAME / "clip0000.mp4")}
    sample = motion_data.make_clip(0)
    assert text["value"] == (f"Question: {sample['question']}\nOptions:\n"
                             + "".join(f"{letter}. {sample[letter]}\n" for letter in "ABCD")
                             + "Please select the correct answer from the options above. \n")
    # Without video input: nframe frames evenly spaced inside the clip; fps frames per second of the clip.
    for dataset, count in ((video, 4), (by_fps, 2 * motion_data.FRAMES // motion_data.CLIP_FPS)):
        *frames, text = dataset.build_prompt(1, video_llm=False)
        assert [item["type"] for item in frames] == ["image"] * count
        assert all(Path(item["value"]).is_file() for item in frames)
    assert video.frame_indices(16, 8.0) == [3, 6, 9, 12]  # VLMEvalKit's VideoBaseDataset: i * 16 / 5
    assert by_fps.frame_indices(16, 8.0) == [0, 4, 8, 12]


def test_exact_matching_without_a_judge(tmp_path):
    import video_data

    predictions_file = tmp_path / "M_Set.xlsx"
    rows = pd.DataFrame({"index": range(6), "question": ["q"] * 6, "A": ["left"] * 6, "B": ["right"] * 6,
                         "C": ["up"] * 6, "D": [None] * 6, "answer": list("ABCABC"),
                         "category": ["x", "x", "x", "y", "y", "y"],
                         "prediction": ["A", "The answer is B.", "up", "right", "A or B", "D"]})
    rows.to_excel(predictions_file, index=False)
    table = video_data.LocalVideoMCQ.evaluate(object.__new__(video_data.LocalVideoMCQ), str(predictions_file))
    assert table.to_dict("records") == [{"Overall": 0.5, "x": 1.0, "y": 0.0}]
    scored = pd.read_excel(tmp_path / "M_Set_exact_matching_result.xlsx", keep_default_na=False)
    assert list(scored["extracted"]) == ["A", "B", "C", "B", "", ""]  # D is no option here
    assert list(scored["hit"]) == [1, 1, 1, 0, 0, 0]


def test_registration_lasts_for_the_run_only():
    import functools

    import vlmeval.dataset
    from vlmeval.dataset.video_dataset_config import supported_video_datasets

    import video_data

    class Official:  # stands in for one of VLMEvalKit's own video sets
        def __init__(self, dataset, nframe=0, fps=-1):
            self.args = (dataset, nframe, fps)

    # run.py's --data path calls a video set's entry with every command-line option; the entry keeps its own
    entry = video_data._entry_for_data("Off_8frame", {"Off_8frame": functools.partial(Official, dataset="Off",
                                                                                        nframe=8)})
    assert entry(data=["Off_8frame"], model=["m"], nframe=2, work_dir=".").args == ("Off", 8, -1)
    assert video_data.parse_name("Set_16frame") == ("Set", 16, -1)
    assert video_data.parse_name("Set_0.5fps") == ("Set", 0, 0.5)
    assert video_data.parse_name("Set_0fps") is None and video_data.parse_name("Set") is None
    assert isinstance(entry, functools.partial) and entry.func is Official  # VLMEvalKit's report finds the class
    mine = video_data._Lenient(video_data.LocalVideoMCQ, dataset="Mine", name="Mine_8frame", nframe=8)
    with video_data.registered({"Off_8frame": entry, "Mine_8frame": mine}):
        assert vlmeval.dataset.LocalVideoMCQ is video_data.LocalVideoMCQ
        assert supported_video_datasets["Off_8frame"] is entry and supported_video_datasets["Mine_8frame"] is mine
        # as VLMEvalKit's own video sets: wrappers choose their video path and prompts by these
        assert vlmeval.dataset.DATASET_MODALITY("Mine_8frame") == "VIDEO"
        assert vlmeval.dataset.DATASET_TYPE("Mine_8frame") == "Video-MCQ"
    assert not hasattr(vlmeval.dataset, "LocalVideoMCQ")
    assert video_data.LocalVideoMCQ not in vlmeval.dataset.DATASET_CLASSES
    assert "Off_8frame" not in supported_video_datasets and "Mine_8frame" not in supported_video_datasets


# ---------------------------------------------------------------- the documented commands
@pytest.mark.slow
def test_the_docs_block_runs_as_written(tmp_path):
    """docs/video.md's command block, from the repository root, with its data folder and work dir in tmp_path: the
    calibration model on ShapesMotion at 8 frames and 2 fps, pruned by uniform_frames_pre_llm at 0.5."""
    match = re.search(r"^<!-- video-data -->\n```bash\n(.*?)^```$", (ROOT / "docs" / "video.md").read_text(),
                      re.MULTILINE | re.DOTALL)
    assert match, "docs/video.md: no ```bash block after <!-- video-data -->"
    block = match.group(1)
    assert "$PWD/my_data" in block and "my_outputs" in block
    data, outputs = tmp_path / "my_data", tmp_path / "my_outputs"
    script = re.sub(r"(?<![\w/])my_outputs\b", str(outputs), block.replace("$PWD/my_data", str(data)))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PRUNE_", "KEEP_RATIO", "INTRA_LLM_", "VIT_", "METHOD_TIME", "PREFILL_TIME"))
           and k not in ("LMUData", "MMEVAL_ROOT", "PRED_FORMAT", "EVAL_FORMAT")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `python` = this one
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    summary = pd.read_csv(outputs / "summary.csv").set_index("dataset")
    assert sorted(summary.index) == ["ShapesMotion_2fps", "ShapesMotion_8frame"]
    assert set(summary["method"]) == {"uniform_frames_pre_llm"}
    # 8 frames: 4 temporal steps of 8 x 8 tokens; 2 fps of a 2 s clip: 4 frames, 2 steps; half of the steps kept
    assert summary.loc["ShapesMotion_8frame", ["tokens_before", "tokens_after"]].tolist() == [256, 128]
    assert summary.loc["ShapesMotion_2fps", ["tokens_before", "tokens_after"]].tolist() == [128, 64]
    assert (summary["samples"] == 12).all()
