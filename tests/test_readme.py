"""The README's ten-line example runs as written on the real data."""

import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "her2st"


@pytest.mark.realdata
@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/her2st")
def test_readme_example(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## In ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len([line for line in block.splitlines() if line.strip() and not line.startswith("import")]) <= 10
    # run as written: st.datasets.her2st() reads the local copy named by STHIST_HER2ST (no download)
    assert "st.datasets.her2st()" in block
    monkeypatch.setenv("STHIST_HER2ST", str(DATA))
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(block, "README", "exec"), ns)
    exec(compile(block, "README", "exec"), ns)  # a notebook cell run twice: model.save(..., overwrite=True)
    query = ns["query"]
    assert query.layers["predicted"].shape == query.shape
    summary = query.uns["predicted_scores"]["summary"]
    assert summary["pcc_all"] > 0.05
    # scored against layers["targets"], the scale the model was fitted on (not the counts in X)
    assert query.uns["predicted_scores"]["params"]["true_layer"] == "targets"
    assert (tmp_path / "her2st_model" / "config.json").is_file()
    # the recommended call chose on patient C and is calibrated; patient B draws the warning the README describes
    model = ns["model"]
    assert model.calibration.provenance["selection"]["chosen"] == "dual_knn"
    assert "predicted_lower" in query.layers and query.uns["predicted"]["calibration"]["unlike_calibration"]
    assert (tmp_path / "her2st_model" / "calibration.json").is_file()
