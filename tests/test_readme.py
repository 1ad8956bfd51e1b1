"""The README as a door: its size, its links and the docs pages, and its two command blocks.

The quick-start block is checked for its three commands, which ``.ci/run`` runs as written (the demo takes about
90 s, so the suite itself runs only its ``--help``). The own-data block is run as written, except that its data folder and work dir point into
pytest's temporary folder.
"""

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_BYTES = 12_500

# Variables of the calling shell that would change what the own-data block runs.
POLLUTING_ENV = ("KEEP_RATIO", "INTRA_LLM_LAYER_SPECS", "METHOD_TIME", "PREFILL_TIME", "PROFILE_WARMUP",
                 "MMEVAL_ROOT", "PRED_FORMAT", "EVAL_FORMAT", "LMUData")


def bash_block_after(marker: str) -> str:
    """The fenced ```bash block that directly follows the line ``<!-- marker -->`` in the README."""
    match = re.search(rf"^<!-- {re.escape(marker)} -->\n```bash\n(.*?)^```$", README.read_text(encoding="utf-8"),
                      re.MULTILINE | re.DOTALL)
    assert match, f"README.md: no ```bash block directly after <!-- {marker} -->"
    return match.group(1)


def commands(block: str) -> list[str]:
    """The block's commands: comments stripped, continuation lines joined, blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


# --------------------------------------------------------------------------------------------------
# Markdown links and GitHub heading anchors
# --------------------------------------------------------------------------------------------------
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans (links there are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text(encoding="utf-8")))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links and emphasis rendered), lower-cased, punctuation dropped
    (letters, digits, spaces, '-' and '_' kept), spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)  # no scheme (http:, https:, mailto:)


PAGES = [README, *sorted(DOCS.glob("*.md"))]


def test_readme_is_a_short_door():
    size = README.stat().st_size
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; at most {MAX_README_BYTES}: move detail to docs/"


def test_slug_matches_github():
    assert slug("Configuration (environment variables, read once by `apply_patches()`)") == \
        "configuration-environment-variables-read-once-by-apply_patches"
    assert slug("Vision-encoder signals (the [CLS] substitute)") == "vision-encoder-signals-the-cls-substitute"
    assert slug("Sweeps, the results table and plots") == "sweeps-the-results-table-and-plots"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if not relative(target):
            continue
        path_part, _, anchor = target.partition("#")
        file = (page.parent / path_part).resolve() if path_part else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README) if relative(target)}
    missing = [str(p.relative_to(ROOT)) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


# --------------------------------------------------------------------------------------------------
# The command blocks
# --------------------------------------------------------------------------------------------------
def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in POLLUTING_ENV and not k.startswith("PRUNE_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `python` = this one
    return env


def test_quick_start_block():
    quick_start = commands(bash_block_after("quick-start"))
    assert quick_start == ["pip install -r requirements.txt", "python scripts/demo.py", "python -m pytest -q"]
    # CI runs the quick start as written (pip through the interpreter it runs the rest with).
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#") and line.startswith("python")]
    assert ci == ["python -m pip install -q -r requirements.txt", *quick_start[1:]]
    done = subprocess.run([sys.executable, "scripts/demo.py", "--help"], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout


@pytest.mark.slow
def test_own_data_block_runs_as_written(tmp_path):
    block = bash_block_after("own-data")
    # Run from the repository root (the block's relative paths are the repository's), with exactly two
    # substitutions so that nothing is written into the checkout: the data folder `$PWD/my_data` becomes
    # tmp_path/my_data and the work dir `my_outputs` becomes tmp_path/my_outputs.
    assert "$PWD/my_data" in block and "my_outputs" in block
    data, outputs = tmp_path / "my_data", tmp_path / "my_outputs"
    script = block.replace("$PWD/my_data", str(data))
    script = re.sub(r"(?<![\w/])my_outputs\b", str(outputs), script)
    assert re.search(r"(?<![\w/])-n\s+(\d+)", script) and int(re.search(r"-n\s+(\d+)", script).group(1)) <= 20

    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"

    assert (data / "ShapesCalib.tsv").is_file()
    assert (outputs / "summary.csv").is_file() and (outputs / "summary.json").is_file()
    summary = pd.read_csv(outputs / "summary.csv")
    assert len(summary) == 1 and summary["method"].iloc[0] == "divprune_pre_llm"

    runs = [p.parent for p in outputs.glob("*/pruning_config.json")]
    assert len(runs) == 1 and runs[0].name.startswith("qwen2.5-vl-shapes__divprune_pre_llm-0.25__")
    predictions = list(runs[0].glob(f"{runs[0].name}_ShapesCalib.xlsx"))
    assert predictions, f"no prediction file in {runs[0]}: {sorted(p.name for p in runs[0].iterdir())}"
    table = pd.read_excel(predictions[0])
    questions = pd.read_csv(data / "ShapesCalib.tsv", sep="\t")
    assert sorted(table["index"]) == sorted(questions["index"])
    assert table["prediction"].notna().all()
