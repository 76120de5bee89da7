"""benchmarks/gpu.py, the prepared GPU run, runs end to end on a CPU with tiny sizes (its figures mean nothing here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.mark.slow
def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--tiny", "--repeats", "1", "--workdir", str(tmp_path), "--out", str(out)]
    assert module.main(argv) == 0
    res = json.loads(out.read_text())
    for part, rate in (
        ("finetune_bleep", "ceiling_fp32"),
        ("embed_vit", "ceiling"),
        ("predict_slide", "ceiling_forward"),
    ):
        assert res[part][rate] > 0 and res[part]["sthist_over_ceiling"] > 0
    assert res["finetune_bleep"]["sthist"]["patches_per_second"] > 0
    assert res["predict_slide"]["pseudo_spots"] > 0 and res["embed_vit"]["sthist"]["dim"] == 192
