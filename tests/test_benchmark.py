"""sthist.tl.benchmark: one protocol, repeated seeds, paired statistics, no leakage."""

from __future__ import annotations

import json

import numpy as np
import pytest

import sthist as st
from sthist.tl import _registry
from sthist.tl._cv import FOLD_METRICS

N_METRICS = 2 * len(FOLD_METRICS)  # per section and pooled


@pytest.fixture(scope="module")
def data():
    adata = st.datasets.toy(n_rows=9, n_cols=9, n_genes=24, n_sections=3, seed=2)
    st.pp.extract_patches(adata, patch_size=32, library_key="section", progress=False)
    st.pp.normalize_expression(adata)
    st.pp.embed_patches(adata, progress=False)
    # two patients: toy_0 and toy_1 are serial sections of P1
    adata.obs["patient"] = np.where(adata.obs["section"] == "toy_2", "P2", "P1")
    return adata


@pytest.fixture
def extra_baselines():
    """Two test predictors: an exact copy of ridge, and ridge fitted on shuffled targets (a broken method)."""

    def shuffled(adata, *, features_key=None, layer=None, random_state=0, progress=True):
        adata = adata.copy()
        rng = np.random.default_rng(0)
        adata.X = np.asarray(adata.X)[rng.permutation(adata.n_obs)]
        return st.tl.fit_ridge(
            adata, features_key=features_key, layer=layer, random_state=random_state, progress=progress
        )

    _registry.BASELINES["ridge_copy"] = ("test: ridge again", st.tl.fit_ridge)
    _registry.BASELINES["shuffled"] = ("test: ridge on shuffled targets", shuffled)
    yield
    del _registry.BASELINES["ridge_copy"], _registry.BASELINES["shuffled"]


def _run(adata, **kw):
    opts = dict(
        methods=["bleep"],
        groupby="section",
        seeds=2,
        layer="targets",
        n_top=8,
        fit_kwargs={"max_epochs": 2},
        progress=False,
    )
    opts.update(kw)
    with pytest.warns(UserWarning, match="within patient"):
        return st.tl.benchmark(adata, **opts)


def test_rows_configuration_and_repeatability(data):
    before = {k: set(getattr(data, k)) for k in ("obsm", "layers", "uns", "obs")}
    res = _run(data)
    methods = ["bleep", "ridge", "knn"]
    assert len(res.table) == len(methods) * 3 * 2 * N_METRICS  # methods x groups x seeds x metrics
    assert set(res.table["method"]) == set(methods) and set(res.table["seed"]) == {0, 1}
    bleep = res.table[res.table["method"] == "bleep"].iloc[0]
    assert bleep["optimizer"] == "adamw" and bleep["epochs"] == 2 and bleep["k"] == 50 and bleep["frozen"]
    assert bleep["encoder"] == "hed-texture" and bleep["patch_size"] == 32 and "training groups" in bleep["gene_sets"]
    assert bleep["normalisation"] == "log1p"
    # toy_0 and toy_1 share patient P1: within patient; toy_2 is the only section of P2
    splits = res.table.drop_duplicates("fold").set_index("fold")["split"]
    assert splits.to_dict() == {"toy_0": "within patient", "toy_1": "within patient", "toy_2": "across patients"}
    assert {k: set(getattr(data, k)) for k in before} == before  # adata unchanged
    overall = res.summary[res.summary["fold"] == "all"].set_index("method")
    assert {"pcc_all_mean", "pcc_all_std", "pcc_heg_pooled_mean"} <= set(overall.columns)
    again = _run(data)
    np.testing.assert_array_equal(res.table["value"].to_numpy(), again.table["value"].to_numpy())
    assert res.comparison.equals(again.comparison)


def test_gene_sets_are_chosen_on_the_training_groups(data):
    res = _run(data, methods=[], seeds=1)
    heg = {fold: tuple(res.gene_sets[fold]["heg"]) for fold in ("toy_0", "toy_1", "toy_2")}
    assert len(set(heg.values())) > 1  # chosen per fold on the training sections, so they differ
    train = data[data.obs["section"] != "toy_2"]
    t = train.layers["targets"]
    means = np.asarray(t.toarray() if hasattr(t, "toarray") else t).mean(0)
    assert set(heg["toy_2"]) == set(train.var_names[np.argsort(-means)[:8]])


def test_paired_statistics(data, extra_baselines):
    res = _run(data, methods=[], baselines=["ridge", "ridge_copy", "shuffled", "knn"], seeds=2, fit_kwargs=None)
    comp = res.comparison.set_index(["method", "metric"])
    same = comp.loc[("ridge_copy", "pcc_all")]
    assert same["ci_low"] <= 0 <= same["ci_high"] and same["mean_diff"] == pytest.approx(0, abs=1e-6)
    assert same["verdict"] == "no difference shown"
    broken = comp.loc[("shuffled", "pcc_all")]
    assert broken["ci_high"] < 0 and broken["verdict"] == "worse" and broken["wins"] == 0 and broken["n"] == 6
    # against another reference, from the same fits
    vs_knn = res.compare("knn").set_index(["method", "metric"])
    assert set(vs_knn.index.get_level_values(0)) == {"ridge", "ridge_copy", "shuffled"}
    assert vs_knn.loc[("ridge", "pcc_all"), "mean_diff"] == pytest.approx(-comp.loc[("knn", "pcc_all"), "mean_diff"])
    with pytest.raises(ValueError, match="was not benchmarked"):
        res.compare("bleep")


def test_plot(data, tmp_path):
    res = _run(data, seeds=1)
    fig = st.pl.benchmark(res, return_fig=True)
    left, right = fig.axes[:2]
    assert len(left.collections) >= 3 and [t.get_text() for t in right.get_yticklabels()] == ["bleep", "knn"]
    axes = st.pl.benchmark(res, metric="pcc_hvg", show=False)
    assert len(axes) == 2
    with pytest.raises(ValueError, match="metric='nope'"):
        st.pl.benchmark(res, metric="nope", show=False)
    with pytest.raises(TypeError, match="BenchmarkResult"):
        st.pl.benchmark(res.table, show=False)
    res.save(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"table.csv", "summary.json", "comparison.csv"}
    assert json.loads((tmp_path / "out" / "benchmark.json").read_text())["reference"] == "ridge"


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"groupby": "tissue"}, KeyError, "groupby='tissue' is not a column"),
        ({"methods": ["bleep2"]}, ValueError, r"not registered; choose one of \[.*'bleep'"),
        ({"seeds": 0}, ValueError, "seeds must be a positive integer"),
        ({"seeds": [1, 1]}, ValueError, "seeds must be distinct"),
        ({"reference": "nh2st"}, ValueError, "reference='nh2st' is not among"),
        ({"folds": ["toy_9"]}, ValueError, "must name groups"),
    ],
)
def test_bad_input(data, kwargs, exc, match):
    before = data.copy()
    with pytest.raises(exc, match=match):
        st.tl.benchmark(data, **{"methods": ["bleep"], "groupby": "section", "layer": "targets", **kwargs})
    assert set(data.obs) == set(before.obs) and set(data.uns) == set(before.uns)


def test_groups_that_cannot_be_held_out(data):
    one = data[data.obs["section"] == "toy_0"].copy()
    with pytest.raises(ValueError, match="has 1 group"):
        st.tl.benchmark(one, groupby="section", layer="targets")
    tiny = data.copy()
    tiny.obs["group"] = np.where(np.arange(tiny.n_obs) == 0, "lonely", "rest")
    with pytest.raises(ValueError, match=r"'lonely': 1.*fewer than the 2 spots"):
        st.tl.benchmark(tiny, groupby="group", layer="targets")


def test_command_line(data, tmp_path):
    from sthist._cli import main

    path = tmp_path / "d.h5ad"
    data.write_h5ad(path)
    out = tmp_path / "res"
    with pytest.warns(UserWarning, match="within patient"):
        main(
            [
                "benchmark",
                str(path),
                "--methods",
                "bleep",
                "--groupby",
                "section",
                "--seeds",
                "1",
                "--max-epochs",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
    assert (out / "benchmark.png").is_file() and (out / "table.json").is_file()
