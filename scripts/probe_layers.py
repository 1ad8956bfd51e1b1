"""Where does a calibration model read the answer into its text? A linear probe per decoder layer.

For each shipped calibration model: the hidden state entering every decoder layer (``hidden_states[l]``: 0 = the
input embeddings, L = the final layer's output) of the last prompt token (the one whose next token is the answer) and
the mean over the text tokens after the image, on ShapesCalib questions; a linear probe (multinomial logistic regression, full-batch L-BFGS, fixed seed) is fitted
per layer on ``--train`` questions of one stream and scored on ``--test`` held-out questions of another, predicting
the answer word (a colour or a shape). Accuracy per layer and question type says from which layer on the answer is
in the text's states: an intra-LLM method pruning before that layer can still change the answer, one pruning after
it cannot (the visual tokens are no longer read).

    python scripts/probe_layers.py                      # every shipped image model; about a minute each on 2 cores
    python scripts/probe_layers.py --out docs/calibration_probe.md

Prints a table per model (and writes it to ``--out`` with the machine and date).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from calibration import data  # noqa: E402
from calibration.models import IMAGE_MODELS  # noqa: E402
from calibration.train import chat_text  # noqa: E402

TRAIN_SEED, TEST_SEED = 1_000, data.EVAL_SEED  # the held-out questions are the calibration evaluation's
WORDS = sorted(set(data.COLOURS) | set(data.SHAPES))  # the probe's classes


@torch.no_grad()
def text_states(model, family, samples, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """(layers + 1, n, D) fp32 states entering every decoder layer (and the output): "last", the last prompt token's;
    "text", the mean over the text tokens after the image (the question, the options, the chat template's end)."""
    processor = family.build_processor()
    visual = model.config.image_token_id
    out = {"last": [], "text": []}
    for first in range(0, len(samples), batch_size):
        chunk = samples[first:first + batch_size]
        inputs = processor(text=[chat_text(s, family) for s in chunk], images=[[s["image"]] for s in chunk],
                           padding=True, padding_side="left", return_tensors="pt")
        states = torch.stack([s.float() for s in model(**inputs, output_hidden_states=True).hidden_states])
        ids, positions = inputs["input_ids"], torch.arange(inputs["input_ids"].shape[1])
        last_visual = torch.where(ids == visual, positions, -1).max(dim=1).values
        after = (positions[None] > last_visual[:, None]) & inputs["attention_mask"].bool()  # (B, L)
        out["last"].append(states[:, :, -1])  # left-padded: the last column is every prompt's end
        out["text"].append((states * after[None, :, :, None]).sum(dim=2) / after.sum(dim=1)[None, :, None])
    return {where: torch.cat(parts, dim=1) for where, parts in out.items()}


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 100, l2: float = 1e-3) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised ``x`` (the mean and scale folded into the layer)."""
    mean, scale = x.mean(dim=0), x.std(dim=0).clamp(min=1e-6)
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], classes)
    optimiser = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    z = (x - mean) / scale

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(z), y) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():  # fold the standardisation in: probe(x) = W (x - mean) / scale + b
        probe.bias -= (probe.weight * (mean / scale)).sum(dim=1)
        probe.weight /= scale
    return probe


def probe_model(name: str, train: int, test: int) -> dict:
    family = IMAGE_MODELS[name]
    model = family.model_class.from_pretrained(family.checkpoint).eval()
    samples = {"train": [data.make_sample(i, TRAIN_SEED) for i in range(train)],
               "test": [data.make_sample(i, TEST_SEED) for i in range(test)]}
    states = {split: text_states(model, family, chunk) for split, chunk in samples.items()}
    labels = {split: torch.tensor([WORDS.index(s["answer_text"]) for s in chunk]) for split, chunk in samples.items()}
    rows = []
    for where in ("last", "text"):
        for layer in range(states["train"][where].shape[0]):
            probe = fit_probe(states["train"][where][layer], labels["train"], len(WORDS))
            with torch.no_grad():
                right = probe(states["test"][where][layer]).argmax(dim=1) == labels["test"]
            row = {"where": where, "layer": layer, "overall": float(right.float().mean())}
            for category in data.CATEGORIES:
                picked = torch.tensor([s["category"] == category for s in samples["test"]])
                row[category] = float(right[picked].float().mean())
            rows.append(row)
    return {"model": family.checkpoint.name, "layers": states["train"]["last"].shape[0] - 1, "train": train,
            "test": test, "rows": rows}


def table(result: dict) -> list[str]:
    lines = [f"### {result['model']} ({result['layers']} decoder layers; probe fitted on {result['train']} questions, "
             f"scored on {result['test']} held-out ones)", "",
             "| probed | hidden state | overall | " + " | ".join(data.CATEGORIES) + " |",
             "|---|---|---|" + "---|" * len(data.CATEGORIES)]
    for row in result["rows"]:
        state = "input embeddings" if row["layer"] == 0 else f"after layer {row['layer'] - 1}"
        probed = "last prompt token" if row["where"] == "last" else "mean of the text after the image"
        lines.append(f"| {probed} | {state} (entering layer {row['layer']}) | {row['overall']:.0%} | "
                     + " | ".join(f"{row[c]:.0%}" for c in data.CATEGORIES) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(IMAGE_MODELS), choices=list(IMAGE_MODELS))
    parser.add_argument("--train", type=int, default=600, help="questions the probe is fitted on")
    parser.add_argument("--test", type=int, default=300, help="held-out questions it is scored on")
    parser.add_argument("--out", help="write the tables (Markdown) here")
    args = parser.parse_args(argv)
    results = [probe_model(name, args.train, args.test) for name in args.models]
    lines = [line for result in results for line in table(result)]
    print("\n".join(lines))
    if args.out:
        cpu = platform.processor() or platform.machine()
        header = [f"Measured {datetime.date.today().isoformat()} with `python scripts/probe_layers.py` on {cpu}, "
                  f"{os.cpu_count()} cores, torch {torch.__version__}.", ""]
        Path(args.out).write_text("\n".join(["# Where the calibration models read the answer", ""] + header + lines))
    return results


if __name__ == "__main__":
    main()
