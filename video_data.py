"""Local video multiple-choice data sets for VLMEvalKit, evaluated offline by exact matching.

A local video set is ``$LMUData/<NAME>.tsv`` plus its clips in ``$LMUData/<NAME>/``. The TSV has VLMEvalKit's MCQ
columns with a ``video`` column in place of ``image``:

* ``index``, ``video`` (the clip's id: its file is ``$LMUData/<NAME>/<video>.mp4``), ``question``, ``A``, ``B``, ...
  (at least two options; leave unused ones empty), ``answer`` (the letter);
* optional: ``video_path`` (the clip's file, relative to ``$LMUData/<NAME>/`` or absolute, any container decord
  reads), ``category`` (accuracy per category), ``hint``.

Its class, :class:`LocalVideoMCQ`, is a ``VideoBaseDataset`` like VLMEvalKit's own video sets (MVBench_MP4, Video-MME):
``nframe`` (frames evenly spaced over the clip) or ``fps`` (frames per second of the clip) says how a clip is sampled,
exactly one of them. A video wrapper (``VIDEO_LLM``, e.g. Qwen2VLChat) receives the clip file and samples it itself:
VLMEvalKit sets the wrapper's ``nframe`` / ``fps`` to the data set's. Any other wrapper receives the sampled frames as
images (JPEG, cached in ``$LMUData/images/<NAME>/<video>/``). Scoring is exact matching (VLMEvalKit's ``can_infer``:
an answer that names exactly one option, by letter or text, picks it), never a judge model.

The runners register it in VLMEvalKit for the duration of a run (:func:`data_set_entries`, :func:`registered`); nothing
in the installed package is edited:

* ``--data <NAME>_<N>frame`` / ``--data <NAME>_<F>fps`` (VLMEvalKit's naming of video sets, e.g. ``MVBench_8frame``),
  for every ``$LMUData/<NAME>.tsv`` with a ``video`` column: added to VLMEvalKit's ``supported_video_datasets``;
* run.py's JSON ``--config``: ``"data": {"<NAME>_8frame": {"class": "LocalVideoMCQ", "dataset": "<NAME>",
  "nframe": 8}}`` (the class is added to ``vlmeval.dataset``, where run.py looks classes up);
* VLMEvalKit's own video set names given with ``--data`` (``MVBench_MP4_8frame``) get entries that pass on only the
  options their class takes (:class:`_Lenient`; run.py's ``--data`` path fails on them in ms-vlmeval 0.0.20).

The data set's name inside VLMEvalKit (``dataset_name``: the ``dataset`` argument of the wrapper's ``generate``, and
so the name of the runner's token-count file) is ``<NAME>_<N>frame`` / ``<NAME>_<F>fps``, one per sampling.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import string
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import portalocker
from PIL import Image
from vlmeval.dataset.video_base import VideoBaseDataset
from vlmeval.smp import LMUDataRoot, dump, get_intermediate_file_path, load
from vlmeval.utils.matching_util import can_infer

CLASS_NAME = "LocalVideoMCQ"
# <NAME>_8frame, <NAME>_1fps, <NAME>_0.5fps: the sampling VLMEvalKit's own video set names carry.
SAMPLED_NAME = re.compile(r"^(?P<base>.+)_(?:(?P<nframe>[1-9]\d*)frame|(?P<fps>\d+(?:\.\d+)?)fps)$")
PROMPT = "Please select the correct answer from the options above. \n"  # as VLMEvalKit's image MCQ sets
RESULT_SUFFIX = "_exact_matching_result"  # per-sample file: <prediction file>_exact_matching_result.<fmt>


def sampled_name(base: str, nframe: int = 0, fps: float = -1) -> str:
    """``<base>_<nframe>frame`` or ``<base>_<fps>fps``."""
    return f"{base}_{nframe}frame" if nframe > 0 else f"{base}_{fps:g}fps"


def parse_name(name: str) -> tuple[str, int, float] | None:
    """``(base, nframe, fps)`` of a sampled name (the unused one 0 / -1), or None."""
    match = SAMPLED_NAME.match(name)
    if match is None:
        return None
    if match["nframe"]:
        return match["base"], int(match["nframe"]), -1
    fps = float(match["fps"])
    return (match["base"], 0, fps) if fps > 0 else None


def tsv_path(base: str) -> Path:
    return Path(LMUDataRoot()) / f"{base}.tsv"


def is_local_video_set(base: str) -> bool:
    """``$LMUData/<base>.tsv`` exists and has a ``video`` column (its header is all that is read)."""
    path = tsv_path(base)
    if not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        return "video" in f.readline().rstrip("\r\n").split("\t")


class LocalVideoMCQ(VideoBaseDataset):
    """A local video multiple-choice set (see the module's docstring): ``dataset`` is the TSV's name, ``nframe`` or
    ``fps`` the sampling, ``name`` the set's name inside VLMEvalKit (default ``<dataset>_<N>frame`` /
    ``<dataset>_<F>fps``)."""

    TYPE = "Video-MCQ"
    MODALITY = "VIDEO"
    DEFAULT_JUDGE = "exact_matching"
    names: set[str] = set()  # the names registered or built so far (supported_datasets)

    def __init__(self, dataset: str, nframe: int = 0, fps: float = -1, name: str | None = None):
        if (nframe > 0) == (fps > 0):
            raise ValueError(f"{dataset}: set exactly one of nframe (frames per clip) and fps (frames per second); "
                             f"got nframe={nframe}, fps={fps}")
        super().__init__(dataset=dataset, nframe=nframe, fps=fps)
        self.base_name = dataset
        self.dataset_name = name or sampled_name(dataset, nframe, fps)
        LocalVideoMCQ.names.add(self.dataset_name)  # VLMEvalKit's DATASET_TYPE / DATASET_MODALITY know it
        self.data["video"] = self._video_ids  # as written: "0001" stays "0001"
        self.videos = sorted(set(self._video_ids))

    @classmethod
    def supported_datasets(cls):
        """The local sets' names known so far: with the class in VLMEvalKit's ``DATASET_CLASSES`` (while
        :func:`registered`), ``DATASET_TYPE(name)`` is ``Video-MCQ`` and ``DATASET_MODALITY(name)`` ``VIDEO``, as for
        VLMEvalKit's own video sets (wrappers choose prompts and video handling by them)."""
        return sorted(cls.names)

    def prepare_dataset(self, dataset):
        data_file = tsv_path(dataset)
        if not data_file.is_file():
            raise FileNotFoundError(f"{dataset}: no {data_file} (LMUData: {LMUDataRoot()})")
        root = data_file.with_suffix("")
        data = pd.read_csv(data_file, sep="\t", dtype={"video": str, "video_path": str})
        required = ["index", "video", "question", "A", "B", "answer"]
        missing = [column for column in required if column not in data]
        if missing:
            raise ValueError(f"{data_file}: missing column(s) {', '.join(missing)}; a local video MCQ set needs "
                             f"{', '.join(required)}")
        clips = {self._clip_path(root, row) for _, row in data.iterrows()}
        absent = sorted(str(path) for path in clips if not path.is_file())
        if absent:
            raise FileNotFoundError(f"{dataset}: {len(absent)} clip(s) not found, e.g. {absent[0]}")
        self._video_ids = data["video"].to_numpy()
        return dict(root=str(root), data_file=str(data_file))

    @staticmethod
    def _clip_path(root: Path, line) -> Path:
        given = line.get("video_path")
        if isinstance(given, str) and given.strip():
            return Path(root, given.strip())  # an absolute video_path stays as it is
        return Path(root, f"{line['video']}.mp4")

    def clip_path(self, line) -> str:
        return str(self._clip_path(Path(self.data_root), line))

    def frame_indices(self, total: int, clip_fps: float) -> list[int]:
        """The frames a non-video wrapper sees, as VLMEvalKit's VideoBaseDataset samples them: ``nframe`` evenly
        spaced inside the clip (the i-th of ``nframe + 1`` equal steps), or ``fps`` per second of the clip."""
        if self.nframe > 0:
            step = total / (self.nframe + 1)
            return [int(i * step) for i in range(1, self.nframe + 1)]
        step = clip_fps / self.fps
        count = max(1, int(total / clip_fps * self.fps))
        return [min(int(i * step), total - 1) for i in range(count)]

    def save_video_frames(self, line) -> list[str]:
        """The sampled frames of a sample's clip as JPEG files (written once, then reused)."""
        import decord

        video = str(line["video"])
        reader = decord.VideoReader(self.clip_path(line))
        indices = self.frame_indices(len(reader), reader.get_avg_fps())
        paths = self.frame_paths(video) if self.nframe > 0 else self.frame_paths_fps(video, len(indices))
        if not all(os.path.exists(path) for path in paths):
            with portalocker.Lock(os.path.join(self.frame_root, f"{video}.lock"), "w", timeout=30):
                frames = reader.get_batch(indices).asnumpy()
                for frame, path in zip(frames, paths):
                    if not os.path.exists(path):
                        Image.fromarray(frame).save(path)
        return paths

    def build_prompt(self, line, video_llm=True):
        if isinstance(line, (int, np.integer)):
            line = self.data.iloc[line]
        options = {letter: line[letter] for letter in string.ascii_uppercase
                   if letter in line and not pd.isna(line[letter]) and str(line[letter]).strip()}
        prompt = f"Hint: {line['hint']}\n" if "hint" in line and not pd.isna(line["hint"]) else ""
        prompt += f"Question: {line['question']}\nOptions:\n"
        prompt += "".join(f"{letter}. {text}\n" for letter, text in options.items()) + PROMPT
        if video_llm:
            message = [dict(type="video", value=self.clip_path(line))]
        else:
            message = [dict(type="image", value=path) for path in self.save_video_frames(line)]
        return message + [dict(type="text", value=prompt)]

    def evaluate(self, eval_file, **judge_kwargs):
        """Exact matching of every prediction (``judge_kwargs`` are not used: no judge model). Writes the per-sample
        file (``<prediction file>_exact_matching_result.<fmt>``: the predictions with ``extracted`` and ``hit``) and
        the accuracies (``..._acc.csv``); returns them, one row: ``Overall`` and one column per category."""
        data = load(eval_file)
        letters = [letter for letter in string.ascii_uppercase if letter in data]
        extracted, hits = [], []
        for _, row in data.iterrows():
            options = {letter: str(row[letter]) for letter in letters
                       if not pd.isna(row[letter]) and str(row[letter]).strip()}
            prediction = "" if pd.isna(row["prediction"]) else str(row["prediction"])
            choice = can_infer(prediction, dict(options)) if prediction else False
            choice = choice if choice in options else ""  # False, or "Z" (a refusal): no option
            extracted.append(choice)
            hits.append(int(choice == str(row["answer"]).strip().upper()))
        data["extracted"], data["hit"] = extracted, hits
        dump(data, get_intermediate_file_path(eval_file, RESULT_SUFFIX))
        accuracy = {"Overall": float(np.mean(hits)) if hits else 0.0}
        if "category" in data:
            for category, group in data.groupby("category", sort=True):
                accuracy[str(category)] = float(group["hit"].mean())
        table = pd.DataFrame([accuracy])
        dump(table, get_intermediate_file_path(eval_file, "_acc", "csv"))
        return table


# --------------------------------------------------------------------------------------------------
# Registration in VLMEvalKit, for the duration of a run
# --------------------------------------------------------------------------------------------------
class _Lenient(functools.partial):
    """``partial(cls, **fixed)`` that drops the keyword arguments ``cls`` does not take and keeps its fixed ones:
    run.py's ``--data`` path calls a video set's entry with every command-line option (``build_dataset(name,
    **vars(args))``), which VLMEvalKit's own entries reject (ms-vlmeval 0.0.20: ``MVBench.__init__() got an unexpected
    keyword argument 'data'``). Still a ``partial`` of the class: VLMEvalKit's status report finds the data set's class
    through it."""

    def __call__(self, /, *args, **kwargs):
        accepted = inspect.signature(self.func.__init__).parameters
        return super().__call__(*args, **{key: value for key, value in kwargs.items()
                                          if key in accepted and key not in self.keywords})


def _entry_for_data(name: str, video_sets: Mapping):
    """What ``--data name`` gets in ``supported_video_datasets``: a builder for a local video set, VLMEvalKit's own
    entry made to accept run.py's options, or None (not a video set: VLMEvalKit's own rules apply). Raises
    ValueError for a local video set named without its sampling."""
    if name in video_sets:
        entry = video_sets[name]
        if type(entry) is functools.partial and isinstance(entry.func, type) and not entry.args:
            return _Lenient(entry.func, **entry.keywords)
        return None
    parsed = parse_name(name)
    if parsed is not None and is_local_video_set(parsed[0]):
        base, nframe, fps = parsed
        sampling = {"nframe": nframe} if nframe > 0 else {"fps": fps}
        return _Lenient(LocalVideoMCQ, dataset=base, name=name, **sampling)
    if is_local_video_set(name):
        raise ValueError(f"--data {name}: {tsv_path(name)} is a video set; name its frame sampling: "
                         f"--data {name}_8frame (<N>frame: N frames per clip) or --data {name}_1fps (<F>fps: F "
                         f"frames per second of the clip)")
    return None


def data_set_entries(data_names: Iterable[str]) -> dict:
    """The ``supported_video_datasets`` entries :func:`registered` adds for run.py's ``--data`` names (see
    :func:`_entry_for_data`). Raises ValueError for a local video set named without its sampling."""
    from vlmeval.dataset.video_dataset_config import supported_video_datasets

    entries = {name: _entry_for_data(name, supported_video_datasets) for name in data_names}
    return {name: entry for name, entry in entries.items() if entry is not None}


@contextlib.contextmanager
def registered(entries: Mapping | None = None):
    """While the block runs: ``vlmeval.dataset.LocalVideoMCQ`` (for run.py's ``--config``), the class in VLMEvalKit's
    ``DATASET_CLASSES`` (see :meth:`LocalVideoMCQ.supported_datasets`) and ``entries`` in VLMEvalKit's
    ``supported_video_datasets`` (for ``--data``; :func:`data_set_entries`). Everything is restored afterwards."""
    import vlmeval.dataset
    from vlmeval.dataset.video_dataset_config import supported_video_datasets

    entries = dict(entries or {})
    saved = {name: supported_video_datasets.get(name) for name in entries}
    had_class = hasattr(vlmeval.dataset, CLASS_NAME)
    listed = LocalVideoMCQ in vlmeval.dataset.DATASET_CLASSES
    setattr(vlmeval.dataset, CLASS_NAME, LocalVideoMCQ)
    if not listed:
        vlmeval.dataset.DATASET_CLASSES.append(LocalVideoMCQ)
    supported_video_datasets.update(entries)
    LocalVideoMCQ.names.update(name for name, entry in entries.items() if entry.func is LocalVideoMCQ)
    try:
        yield
    finally:
        for name, entry in saved.items():
            if entry is None:
                supported_video_datasets.pop(name, None)
            else:
                supported_video_datasets[name] = entry
        if not listed:
            vlmeval.dataset.DATASET_CLASSES.remove(LocalVideoMCQ)
        if not had_class:
            delattr(vlmeval.dataset, CLASS_NAME)
