"""The benchmark report scripts read what the benchmarks write and pair the right numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method, fold, seed, metric, value):
    return {"method": method, "fold": fold, "seed": seed, "metric": metric, "value": value, "select_on": "x"}


def test_recipe_changes_pairs_folds_and_seeds(tmp_path):
    old = {"protocols": {"p": {"table": [_row("m", f, s, "pcc_all", 0.2) for f in "AB" for s in (0, 1)]}}}
    new_rows = [_row("m", "A", 0, "pcc_all", 0.3), _row("m", "B", 0, "pcc_all", 0.1), _row("m", "A", 1, "pcc_all", 0.2)]
    new_rows.append(_row("m", "C", 0, "pcc_all", 0.9))  # no partner in the old run: left out
    new = {"protocols": {"p": {"table": new_rows}}, "command": "her2st.py"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    out = tmp_path / "out.json"
    argv = ["--old", str(tmp_path / "old.json"), "--new", str(tmp_path / "new.json"), "--out", str(out)]
    assert _script("recipe_changes").main(argv) == 0
    r = json.loads(out.read_text())["p"]["m"]["pcc_all"]
    assert len(r["pairs"]) == 3
    assert r["old_mean"] == pytest.approx(0.2) and r["new_mean"] == pytest.approx(0.2)
    assert r["mean_diff"] == pytest.approx(0.0) and r["diff_range"] == pytest.approx([-0.1, 0.1])
    assert (r["new_wins"], r["new_loses"]) == ("1/3", "1/3")  # the third pair is a tie


def _summary(all_, heg):
    return {"pcc_all_mean": all_, "pcc_all_std": 0.0, "pcc_heg_mean": heg, "pcc_heg_std": 0.0}


def test_imagenet_tables_mark_intervals_above_zero(tmp_path, capsys):
    delta = {"mean_diff": 0.05, "ci": [0.01, 0.09], "wins": "3/3"}
    frozen = {}
    for mpp in ("0.5", "1"):
        for feat in ("hed_fast", "efficientnet_lite0", "both"):
            for proto in ("within_patient_C", "C_to_B"):
                frozen[f"mpp={mpp} {feat} {proto}"] = {
                    "summary": {m: _summary(0.2, 0.3) for m in ("knn", "ridge_gcv", "dual_knn")},
                    "vs_knn": {"dual_knn/pcc_all": delta},
                }
    run = {"methods": ["bleep"], "max_epochs": 2}
    for proto in ("within_patient_C", "C_to_B"):
        run[proto] = {
            "summary": {m: _summary(0.1, 0.15) for m in ("bleep", "knn", "ridge_gcv", "dual_knn")},
            "vs_knn": {"bleep/pcc_all": {**delta, "mean_diff": -0.02, "ci": [-0.03, -0.01]}},
            "vs_dual_knn": {},
        }
    (tmp_path / "imagenet_frozen.json").write_text(json.dumps(frozen))
    (tmp_path / "imagenet_finetune_x.json").write_text(json.dumps(run))
    assert _script("imagenet_tables").main(["--results", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "**+0.050 [+0.010, +0.090] 3/3**" in text  # interval above 0: bold
    assert (
        "| bleep fine-tuned from ImageNet, 2 epochs per stage | 0.100 ± 0.000 | 0.150 ± 0.000 | -0.020 [-0.030, -0.010]"
        in text
    )
    assert text.count("(recommended; another run") == 2


def test_imagenet_tables_one_seed_has_no_sd():
    cell = _script("imagenet_tables")._cell
    assert cell({"pcc_all_mean": 0.1, "pcc_all_std": float("nan")}, "pcc_all") == "0.100"
    assert cell({"pcc_all_mean": 0.1, "pcc_all_std": 0.02}, "pcc_all") == "0.100 ± 0.020"
