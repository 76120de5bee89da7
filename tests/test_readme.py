"""The README's ten-line example runs as written on the real data."""

import os
import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "her2st"


@pytest.mark.realdata
@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/her2st")
def test_readme_example(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## In ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len([line for line in block.splitlines() if line.strip() and not line.startswith("import")]) <= 10
    # the example downloads the data (st.datasets.her2st()); here it reads the shared copy instead
    assert "st.datasets.her2st()" in block
    block = block.replace("st.datasets.her2st()", f"st.datasets.her2st({str(DATA)!r})")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ns: dict = {}
        exec(
            compile(block.replace('"dual_knn_her2st/"', repr(str(tmp_path / "dual_knn_her2st"))), "README", "exec"), ns
        )
    finally:
        os.chdir(cwd)
    query = ns["query"]
    assert query.layers["predicted"].shape == query.shape
    assert query.uns["predicted_scores"]["summary"]["pcc_all"] > 0.05
    assert (tmp_path / "dual_knn_her2st" / "config.json").is_file()
