"""sthist.tl.benchmark: one protocol, repeated seeds, paired statistics, no leakage."""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pandas as pd
import pytest

import sthist as st
from sthist._constants import DEFAULT_ENCODER
from sthist.tl import BenchmarkResult, _registry
from sthist.tl._benchmark import paired_comparison
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
    methods = ["bleep", "ridge_gcv", "knn", "dual_knn"]  # the default baselines
    assert len(res.table) == len(methods) * 3 * 2 * N_METRICS  # methods x groups x seeds x metrics
    assert set(res.table["method"]) == set(methods) and set(res.table["seed"]) == {0, 1}
    bleep = res.table[res.table["method"] == "bleep"].iloc[0]
    assert bleep["optimizer"] == "adamw" and bleep["epochs"] == 2 and bleep["k"] == 50 and bleep["frozen"]
    assert bleep["encoder"] == DEFAULT_ENCODER and bleep["patch_size"] == 32 and "training groups" in bleep["gene_sets"]
    assert bleep["normalisation"] == "log1p"
    # toy_0 and toy_1 share patient P1: within patient; toy_2 is the only section of P2
    splits = res.table.drop_duplicates("fold").set_index("fold")["split"]
    assert splits.to_dict() == {"toy_0": "within patient", "toy_1": "within patient", "toy_2": "across patients"}
    assert {k: set(getattr(data, k)) for k in before} == before  # adata unchanged
    # the default reference is the raw-feature kNN; every other method is compared with it
    assert res.reference == "knn" and set(res.comparison["reference"]) == {"knn"}
    assert set(res.comparison["method"]) == {"bleep", "ridge_gcv", "dual_knn"}
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
    res = _run(
        data,
        methods=[],
        baselines=["ridge", "ridge_copy", "shuffled", "knn"],
        reference="ridge",
        seeds=2,
        fit_kwargs=None,
    )
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
    others = [t.get_text() for t in right.get_yticklabels()]
    assert len(left.collections) >= 3 and others == ["bleep", "ridge_gcv", "dual_knn"]  # all but the reference knn
    axes = st.pl.benchmark(res, metric="pcc_hvg", show=False)
    assert len(axes) == 2
    with pytest.raises(ValueError, match="metric='nope'"):
        st.pl.benchmark(res, metric="nope", show=False)
    with pytest.raises(TypeError, match="BenchmarkResult"):
        st.pl.benchmark(res.table, show=False)
    res.save(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"table.csv", "summary.json", "comparison.csv"}
    assert json.loads((tmp_path / "out" / "benchmark.json").read_text())["reference"] == "knn"


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
    res = BenchmarkResult.load(out)
    assert res.reference == "knn" and set(res.table["method"]) == {"bleep", "ridge_gcv", "knn", "dual_knn"}
    pd.testing.assert_frame_equal(res.compare("knn"), res.comparison, check_exact=True)


def test_default_reference_and_baselines():
    params = inspect.signature(st.tl.benchmark).parameters
    assert params["reference"].default == "knn"
    assert tuple(params["baselines"].default) == ("ridge_gcv", "knn", "dual_knn")
    from sthist._cli import build_parser

    args = build_parser().parse_args(["benchmark", "x.h5ad", "--out", "res"])
    assert args.reference == "knn" and args.baselines == "ridge_gcv,knn,dual_knn"
    # 'ridge' stays available when asked for
    assert "ridge" in st.tl.methods().index


@pytest.fixture(scope="module")
def result(data):
    return _run(data)  # bleep and the default baselines, 2 seeds, reference knn


def _assert_same(loaded, res):
    for name in ("table", "summary", "comparison"):
        pd.testing.assert_frame_equal(getattr(loaded, name), getattr(res, name), check_exact=True)
    assert list(loaded.per_gene) == list(res.per_gene)  # same keys, same order
    for key, r in res.per_gene.items():
        pd.testing.assert_series_equal(loaded.per_gene[key], r, check_exact=True)
    assert loaded.gene_sets == res.gene_sets
    for name in ("reference", "seeds", "groupby", "level", "seconds", "n_boot", "random_state"):
        assert getattr(loaded, name) == getattr(res, name), name


def test_save_load_round_trip(result, tmp_path):
    assert result.n_boot == 1000 and result.random_state == 0
    result.save(tmp_path / "res")
    names = {p.name for p in (tmp_path / "res").iterdir()}
    assert names == {
        *(f"{t}.{ext}" for t in ("table", "summary", "comparison") for ext in ("csv", "json")),
        "per_gene.csv",
        "gene_sets.json",
        "benchmark.json",
    }
    meta = json.loads((tmp_path / "res" / "benchmark.json").read_text())
    assert meta["format"] == "sthist.BenchmarkResult" and meta["version"] == 1
    assert meta["n_boot"] == 1000 and meta["random_state"] == 0 and meta["reference"] == "knn"
    long = pd.read_csv(tmp_path / "res" / "per_gene.csv")
    assert list(long.columns) == ["method", "fold", "seed", "gene", "r"]
    assert len(long) == sum(len(r) for r in result.per_gene.values())

    loaded = BenchmarkResult.load(tmp_path / "res")
    _assert_same(loaded, result)
    assert loaded.table["batch_size"].dtype == "Int64" and loaded.table["k"].dtype == "Int64"
    assert loaded.table["fold"].map(type).eq(str).all() and loaded.table["frozen"].dtype == bool
    # load, then compare, reproduces the saved comparison exactly; other references work without refitting
    pd.testing.assert_frame_equal(loaded.compare("knn"), result.comparison, check_exact=True)
    pd.testing.assert_frame_equal(loaded.compare("ridge_gcv"), result.compare("ridge_gcv"), check_exact=True)
    pd.testing.assert_frame_equal(
        loaded.compare("dual_knn", n_boot=200, random_state=5),
        result.compare("dual_knn", n_boot=200, random_state=5),
        check_exact=True,
    )
    with pytest.raises(ValueError, match="was not benchmarked"):
        loaded.compare("ridge")
    # the plot reads the loaded tables as it reads the fresh ones
    fig = st.pl.benchmark(loaded, return_fig=True)
    left, right = fig.axes[:2]
    assert len(left.collections) >= 3
    assert [t.get_text() for t in right.get_yticklabels()] == ["bleep", "ridge_gcv", "dual_knn"]
    assert st.pl.benchmark(loaded, metric="pcc_heg_pooled", show=False)[0].get_ylabel() == "pcc_heg_pooled"
    # saving the loaded result again gives the same result
    loaded.save(tmp_path / "again")
    _assert_same(BenchmarkResult.load(tmp_path / "again"), result)


def _handmade(**kw):
    """A small result by hand, with what CSV readers get wrong: numeric-looking and 'NA' names, awkward floats."""
    genes = ["NA", "007", "nan", "1e3", "TP53"]
    values = {
        ("m", "1", 0): [1 / 3, 0.1 + 0.2, 5e-324, np.nan, -0.7],
        ("m", "NA", 0): [np.pi / 10, 1 - 1e-16, -1 / 7, 0.25, 2 / 3],
        ("ref", "1", 0): [0.1, 0.2, 0.3, 0.4, 1e-300],
        ("ref", "NA", 0): [np.e / 10, -0.5, 0.3, 1 / 9, 0.0],
    }
    per_gene = {k: pd.Series(v, index=pd.Index(genes, dtype=object)) for k, v in values.items()}
    sets = {"heg": ["NA", "007", "TP53"], "hvg": ["1e3"], "gene_corr": genes}
    gene_sets = {"1": sets, "NA": {**sets, "heg": ["nan", "TP53", "NA"]}}
    table = pd.DataFrame(
        {
            "method": ["m", "m", "ref", "ref"],
            "fold": ["1", "NA", "1", "NA"],
            "seed": np.zeros(4, dtype=np.int64),
            "metric": "pcc_all",
            "value": [1 / 3, np.nan, 0.1 + 0.2, 1e-310],
            "k": pd.array([50, 50, None, None], dtype="Int64"),
            "select_on": ["val_loss", "val_loss", np.nan, np.nan],
            "mpp": pd.Series([None, None, 0.5, None], dtype=object),
            "optimizer": ["adamw", None, np.nan, None],
            "frozen": [True, True, False, False],
        }
    )
    summary = pd.DataFrame({"method": ["m", "ref"], "fold": ["all", "all"], "pcc_all_std": [np.nan, 1 / 3]})
    opts = {"n_boot": 50, "random_state": 3, **kw}
    comparison = paired_comparison(per_gene, gene_sets, ["m"], "ref", n_boot=opts["n_boot"], level=0.9,
                                   random_state=opts["random_state"])  # fmt: skip
    return BenchmarkResult(
        table=table,
        summary=summary,
        comparison=comparison,
        per_gene=per_gene,
        gene_sets=gene_sets,
        reference="ref",
        seeds=[0],
        groupby="section",
        level=0.9,
        seconds=1.5,
        **opts,
    )


def test_save_load_exact_values_and_names(tmp_path):
    res = _handmade()
    res.save(tmp_path)
    loaded = BenchmarkResult.load(tmp_path)
    _assert_same(loaded, res)
    # missing values keep their kind in object columns (None stays None, NaN stays NaN)
    assert loaded.table["mpp"].tolist()[:2] == [None, None] and loaded.table["mpp"][2] == 0.5
    assert loaded.table["optimizer"][1] is None and np.isnan(loaded.table["optimizer"][2])
    assert set(loaded.per_gene) == {("m", "1", 0), ("m", "NA", 0), ("ref", "1", 0), ("ref", "NA", 0)}
    pd.testing.assert_frame_equal(loaded.compare("ref"), res.comparison, check_exact=True)
    # without n_boot / random_state, compare uses those the result was made with
    assert loaded.n_boot == 50 and loaded.random_state == 3
    pd.testing.assert_frame_equal(loaded.compare("m"), res.compare("m", n_boot=50, random_state=3), check_exact=True)


def test_save_overwrites_and_refuses_foreign_files(tmp_path):
    _handmade().save(tmp_path / "out")
    (tmp_path / "out" / "benchmark.png").write_bytes(b"figure")
    second = _handmade(n_boot=20, random_state=1)
    second = dataclasses.replace(second, seconds=9.0, per_gene={k: r + 0.01 for k, r in second.per_gene.items()})
    second.save(tmp_path / "out")  # overwrites every file of the first save
    loaded = BenchmarkResult.load(tmp_path / "out")
    _assert_same(loaded, second)
    assert (tmp_path / "out" / "benchmark.png").read_bytes() == b"figure"  # other files are left alone
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    # a folder whose benchmark.json is something else, and a file, are refused
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "benchmark.json").write_text('{"model": "bleep"}')
    with pytest.raises(FileExistsError, match="not the record of a saved benchmark"):
        second.save(tmp_path / "other")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        second.save(tmp_path / "file")


def test_load_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no benchmark folder at .*nowhere"):
        BenchmarkResult.load(tmp_path / "nowhere")
    _handmade().save(tmp_path / "res")
    (tmp_path / "res" / "per_gene.csv").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"res' lacks \['per_gene.csv'\].*older sthist.*run `sthist.tl.benchmark` again"
    ):
        BenchmarkResult.load(tmp_path / "res")
    # a folder saved by an older version: tables and a benchmark.json without per-gene results or format
    old = tmp_path / "old"
    old.mkdir()
    for name in ("table", "summary", "comparison"):
        (old / f"{name}.csv").write_text("a\n1\n")
        (old / f"{name}.json").write_text("[]")
    (old / "benchmark.json").write_text('{"reference": "ridge", "seeds": [0], "groupby": "patient"}')
    with pytest.raises(FileNotFoundError, match=r"lacks \['per_gene.csv', 'gene_sets.json'\].*older sthist"):
        BenchmarkResult.load(old)
    (old / "per_gene.csv").write_text("method,fold,seed,gene,r\n")
    (old / "gene_sets.json").write_text("{}")
    with pytest.raises(ValueError, match=r"not the record of a saved benchmark.*older sthist"):
        BenchmarkResult.load(old)
    # files of two saves mixed in one folder
    _handmade().save(tmp_path / "a")
    _handmade(n_boot=7).save(tmp_path / "b")
    lines = (tmp_path / "b" / "per_gene.csv").read_text().splitlines()
    (tmp_path / "a" / "per_gene.csv").write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(ValueError, match=r"do not match its benchmark\.json"):
        BenchmarkResult.load(tmp_path / "a")
    (tmp_path / "a" / "per_gene.csv").write_text("method,fold,seed,gene,r\nm,1,zero,TP53,0.5\n")
    with pytest.raises(ValueError, match=r"per_gene\.csv cannot be read"):
        BenchmarkResult.load(tmp_path / "a")
    # a newer format
    meta = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    (tmp_path / "b" / "benchmark.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match=r"format version 99.*update sthist"):
        BenchmarkResult.load(tmp_path / "b")
