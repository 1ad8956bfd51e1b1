"""scripts/probe_layers.py on the shipped Qwen2.5-VL calibration model, at a small size: one row per probed reading
and hidden state, accuracies in [0, 1], the answer decodable from the last prompt token at the last layer and not
from its input embedding (the same token in every prompt)."""

import pytest

from calibration.models import QWEN
from scripts import probe_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.skipif(not (QWEN.checkpoint / "model.safetensors").is_file(), reason="no calibration model")
def test_probe_reads_the_answer_from_the_last_token_at_the_last_layer_only(tmp_path):
    (result,) = probe_layers.main(["--models", "qwen2.5-vl", "--train", "90", "--test", "45",
                                   "--out", str(tmp_path / "probe.md")])
    rows = {(row["where"], row["layer"]): row for row in result["rows"]}
    assert set(rows) == {(where, layer) for where in ("last", "text") for layer in range(result["layers"] + 1)}
    assert all(0.0 <= row[key] <= 1.0 for row in rows.values() for key in ("overall", "colour", "shape", "position"))
    assert rows[("last", result["layers"])]["overall"] >= 0.9
    assert rows[("last", 0)]["overall"] <= 0.4  # one input embedding for every prompt: a constant prediction
    assert "| last prompt token |" in (tmp_path / "probe.md").read_text()
