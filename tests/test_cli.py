import json

import pytest

from sthist._cli import main


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics["summary"]
    assert summary["n_spots"] > 0
    # the recommended configuration first, the two controls and one contrastive method beside it
    assert summary["recommended"] in {"knn", "dual_knn[raw]", "ridge_gcv", "dual_knn[learnt]", "dual_knn"}
    assert metrics["config"]["encoder"] == "hed-fast"
    assert list(summary["scores_on_held_out_section"]) == ["recommended", "knn", "ridge_gcv", "bleep"]
    assert 0 < summary["intervals"]["coverage_all"] <= 1 and "calibration.png" in metrics["figures"]

    for scores in summary["scores_on_held_out_section"].values():
        assert -1 <= scores["pcc_all"] <= 1
    # epochs counted from 1, as the training-history plot draws them
    assert 1 <= summary["bleep_best_epoch"] <= summary["bleep_epochs_run"]
    for fig in metrics["figures"]:
        png = out / fig
        assert png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_requires_command(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "COMMAND" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("sthist ")


def test_fit_predict_evaluate(tmp_path, capsys):
    import anndata as ad
    import numpy as np

    import sthist as st

    adata = st.datasets.toy(n_rows=10, n_cols=10, n_genes=30, n_sections=2, seed=3)
    ref = adata[adata.obs["section"] == "toy_0"].copy()
    query = adata[adata.obs["section"] == "toy_1"].copy()
    query.uns["spatial"] = {"toy_1": query.uns["spatial"]["toy_1"]}
    ref.uns["spatial"] = {"toy_0": ref.uns["spatial"]["toy_0"]}
    ref.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    assert (
        main(
            [
                "fit",
                str(tmp_path / "ref.h5ad"),
                "--out",
                str(tmp_path / "model"),
                "--patch-size",
                "48",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "model" / "config.json").is_file()
    model = st.tl.load_model(tmp_path / "model")  # the default: the recommended call, chosen and calibrated
    assert model.inputs.encoder == "hed-fast" and model.inputs.mpp == 1.0
    selection = model.calibration.provenance["selection"]
    assert selection["candidates"][selection["chosen"]]["within_one_se"]
    assert model.calibration.provenance["how"].startswith("5 spatial blocks")  # one section in ref.h5ad
    assert model.inputs.targets["layer"] == "targets" and model.inputs.targets["scale"] == "log1p"
    assert (
        main(
            [
                "predict",
                str(tmp_path / "query.h5ad"),
                "--model",
                str(tmp_path / "model"),
                "--out",
                str(tmp_path / "pred.h5ad"),
                "--no-progress",
            ]
        )
        == 0
    )
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert pred.layers["predicted"].shape == pred.shape
    assert np.isfinite(pred.layers["predicted"]).all()
    assert "patches" not in pred.obsm
    assert pred.uns["patches"]["params"]["patch_size"] == 48  # the model's patch size was reused
    # the file holds counts in X and no truth layer: the rule of score_prediction, with the command-line fix
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "pred.h5ad"), "--out", str(tmp_path / "scores.json")]) == 2
    err = capsys.readouterr().err
    assert "layers['targets']" in err and "--normalize model" in err and "flavor='log1p'" in err
    argv = ["evaluate", str(tmp_path / "pred.h5ad"), "--normalize", "model", "--out", str(tmp_path / "scores.json")]
    assert main(argv) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())["scores"]
    assert -1 <= scores["all"]["pcc_all"] <= 1
    # the same number as in Python, with the truth made by the call the error names
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    st.pp.normalize_expression(pred, flavor="log1p")
    table = st.tl.score_prediction(pred, inplace=False)
    assert scores["all"]["pcc_all"] == pytest.approx(table.loc["all", "pcc_all"], abs=1e-9)  # JSON keeps 10 digits
    # a truth on another scale than the model's is refused
    assert main(["evaluate", str(tmp_path / "pred.h5ad"), "--normalize", "hist2st"]) == 2
    assert "another scale" in capsys.readouterr().err

    assert (
        main(
            [
                "fit",
                str(tmp_path / "ref.h5ad"),
                "--out",
                str(tmp_path / "ridge"),
                "--method",
                "ridge",
                "--patch-size",
                "48",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                str(tmp_path / "query.h5ad"),
                "--model",
                str(tmp_path / "ridge"),
                "--out",
                str(tmp_path / "pred_ridge.h5ad"),
                "--no-progress",
            ]
        )
        == 0
    )


def test_cli_user_error_is_one_line(tmp_path, capsys):
    import sthist as st

    st.datasets.toy(n_rows=6, n_cols=6, n_genes=10).write_h5ad(tmp_path / "a.h5ad")
    assert (
        main(
            ["predict", str(tmp_path / "a.h5ad"), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o.h5ad")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "error: no model folder" in err and "Traceback" not in err


def test_fit_and_predict_options_reach_the_api(tmp_path, monkeypatch):
    """--finetune / --num-workers reach fit_contrastive, --index reaches predict_expression, k / weighting default
    to the method's values."""
    from types import SimpleNamespace

    import sthist as st

    seen = {}

    class Stop(Exception):
        pass

    def fake_fit(adata, **kwargs):
        seen["fit"] = kwargs
        raise Stop

    def fake_predict(adata, model, **kwargs):
        seen["predict"] = kwargs
        raise Stop

    adata = st.datasets.toy(n_rows=6, n_cols=6, n_genes=10, seed=0)
    path = tmp_path / "ref.h5ad"
    adata.write_h5ad(path)
    monkeypatch.setattr(st.tl, "fit_contrastive", fake_fit)
    with pytest.raises(Stop):
        main(
            [
                "fit",
                str(path),
                "--out",
                str(tmp_path / "m"),
                "--method",
                "bleep",
                "--finetune",
                "--num-workers",
                "3",
                "--no-progress",
            ]
        )
    assert seen["fit"]["finetune"] is True and seen["fit"]["num_workers"] == 3
    monkeypatch.setattr(st.tl, "predict_expression", fake_predict)
    inputs = SimpleNamespace(patch_size=None, mpp=None)
    monkeypatch.setattr(st.tl, "load_model", lambda p: SimpleNamespace(inputs=inputs))  # reach the call only
    monkeypatch.setattr("sthist._cli._prepare", lambda *a, **k: None)
    with pytest.raises(Stop):
        main(
            ["predict", str(path), "--model", str(tmp_path), "--out", str(tmp_path / "o.h5ad"), "--index", "faiss-ivf"]
        )
    assert seen["predict"]["index"] == "faiss-ivf"
    assert seen["predict"]["k"] is None and seen["predict"]["weighting"] is None


def test_fit_options_of_another_method_say_what_it_takes(tmp_path, capsys):
    """The default method is dual_knn, which trains nothing: training options name the method and what it takes."""
    import sthist as st

    adata = st.datasets.toy(n_rows=6, n_cols=6, n_genes=10, seed=0)
    path = tmp_path / "ref.h5ad"
    adata.write_h5ad(path)
    assert main(["fit", str(path), "--out", str(tmp_path / "m"), "--max-epochs", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "method 'recommended'" in err and "does not take ['max_epochs']" in err


def test_fit_dual_knn_uses_each_methods_default_encoder(tmp_path):

    import sthist as st

    adata = st.datasets.toy(n_rows=8, n_cols=8, n_genes=12, n_sections=2, seed=0)
    path = tmp_path / "ref.h5ad"
    adata.write_h5ad(path)
    base = ["fit", str(path), "--method", "dual_knn", "--library-key", "section", "--patch-size", "48", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "m")]) == 0
    # without --encoder every fit keeps its own default: hed-fast for dual_knn
    assert st.tl.load_model(tmp_path / "m").inputs.encoder == "hed-fast"
    assert main([*base, "--out", str(tmp_path / "t"), "--encoder", "hed-texture"]) == 0
    model = st.tl.load_model(tmp_path / "t")
    assert model.inputs.encoder == "hed-texture" and model.method == "dual_knn" and model.n_neighbors == 12
