from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.axes import Axes
from matplotlib.collections import EllipseCollection
from matplotlib.figure import Figure

from sthist.pl import _plots as pl
from sthist.tl._score import score_prediction

SCALEF = 0.1
DIAMETER = 40.0  # full-resolution pixels


def _section(lib: str, *, n_side: int, seed: int) -> ad.AnnData:
    """A hexagonal grid of spots over a tiny hires image, Visium convention."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    x = 200.0 + 100.0 * cols.ravel() + 50.0 * (rows.ravel() % 2)
    y = 200.0 + 86.6 * rows.ravel()
    n = x.size
    g = 12
    base = np.sin(x / 300.0)[:, None] * np.linspace(0.5, 2, g) + np.linspace(1, 4, g)
    true = base + 0.3 * rng.normal(size=(n, g))
    pred = base + 0.5 * rng.normal(size=(n, g))
    pred[:, -1] = np.nan  # not modelled
    adata = ad.AnnData(true)
    adata.obs_names = [f"{lib}_{i}" for i in range(n)]
    adata.var_names = [f"G{i}" for i in range(g)]
    adata.layers["predicted"] = pred
    adata.uns["predicted"] = {"params": {"targets": {"layer": "X", "scale": "unknown"}}}  # as predict_expression
    adata.obsm["spatial"] = np.c_[x, y]
    adata.obs["section"] = lib
    side = int((max(x.max(), y.max()) + 300) * SCALEF)
    img = np.full((side, side, 3), 230, dtype=np.uint8)
    img[::4] = 180
    adata.uns["spatial"] = {
        lib: {
            "images": {"hires": img},
            "scalefactors": {"tissue_hires_scalef": SCALEF, "spot_diameter_fullres": DIAMETER},
            "metadata": {},
        }
    }
    return adata


def _visium(libs=("A",), n_side: int = 6) -> ad.AnnData:
    parts = [_section(lib, n_side=n_side + i, seed=i) for i, lib in enumerate(libs)]
    adata = ad.concat(parts, uns_merge="unique") if len(parts) > 1 else parts[0]
    adata.obs["section"] = pd.Categorical(adata.obs["section"])
    return adata


def _snapshot(adata: ad.AnnData) -> ad.AnnData:
    return adata.copy()


def _assert_same(adata: ad.AnnData, before: ad.AnnData) -> None:
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    pd.testing.assert_frame_equal(adata.var, before.var)
    assert sorted(adata.uns.keys()) == sorted(before.uns.keys())
    assert set(adata.layers.keys()) == set(before.layers.keys())
    for k in before.layers:
        np.testing.assert_array_equal(adata.layers[k], before.layers[k])
    np.testing.assert_array_equal(adata.X, before.X)


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _collections(ax: Axes) -> list[EllipseCollection]:
    return [c for c in ax.collections if isinstance(c, EllipseCollection)]


# --------------------------------------------------------------------------- conventions of every plot
HISTORY = {"train_loss": [3.0, 2.0, 1.5, 1.2], "val_loss": [3.2, 2.4, 2.0, 2.1], "best_epoch": 2}


def _scored_visium() -> ad.AnnData:
    adata = _visium()
    score_prediction(adata, n_top=8)
    adata.uns["contrastive"] = {"params": {"method": "bleep"}, "history": HISTORY}  # as fit_contrastive writes it
    return adata


def _drawn_spots(ax: Axes) -> int:
    return sum(len(c.get_offsets()) for c in _collections(ax))


def _drawn_heatmaps(ax: Axes) -> int:
    return len(ax.images) + sum(len(c.get_offsets()) for c in ax.collections)


def _drawn_bars(ax: Axes) -> int:
    return len(ax.patches)


def _drawn_lines(ax: Axes) -> int:
    return len([ln for ln in ax.get_lines() if ln.get_label() in {"train", "validation"}])


# name -> (call, number of Axes returned (None: one Axes, not a list), what one panel draws, expected count)
PLOTS = {
    "predicted_vs_true": (lambda a, **kw: pl.predicted_vs_true(a, ["G0", "G3"], **kw), 4, _drawn_spots, 36),
    "gene_correlation": (lambda a, **kw: pl.gene_correlation(a, **kw), 3, _drawn_heatmaps, 1),
    "scores": (lambda a, **kw: pl.scores(a, n_genes=3, **kw), None, _drawn_bars, 7),
    "training_history": (lambda a, **kw: pl.training_history(a, **kw), None, _drawn_lines, 2),
}
SINGLE_PANEL = [name for name, (_, n, _, _) in PLOTS.items() if n is None]


def test_every_public_plot_is_covered():
    import sthist as st

    # pl.benchmark plots a BenchmarkResult, not an AnnData: tests/test_benchmark.py covers its show/return_fig/artists;
    # pl.calibration needs a calibrated prediction: tests/test_calibrate.py covers it
    assert set(st.pl.__all__) == set(PLOTS) | {"benchmark", "calibration"}


@pytest.fixture
def shown(monkeypatch):
    """Calls of ``plt.show``, recorded instead of shown."""
    calls: list[int] = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: calls.append(1))
    return calls


@pytest.fixture
def autoshow():
    """Set ``scanpy.settings.autoshow`` for one test (a property of scanpy's settings: set and restore by hand)."""
    from scanpy import settings

    before = settings.autoshow
    yield lambda value: setattr(settings, "autoshow", value)
    settings.autoshow = before


def _as_list(out, n_axes):
    if n_axes is None:
        assert isinstance(out, Axes)
        return [out]
    assert isinstance(out, list) and len(out) == n_axes and all(isinstance(a, Axes) for a in out)
    return out


@pytest.mark.parametrize("name", list(PLOTS))
def test_plot_show_false_returns_the_axes(name, shown):
    call, n_axes, drawn, expected = PLOTS[name]
    adata = _scored_visium()
    before = _snapshot(adata)
    axes = _as_list(call(adata, show=False), n_axes)
    assert drawn(axes[0]) == expected
    assert len({id(a.get_figure(root=True)) for a in axes}) == 1  # one figure
    assert plt.get_fignums() == [axes[0].get_figure(root=True).number]
    assert shown == []
    _assert_same(adata, before)


@pytest.mark.parametrize("name", list(PLOTS))
def test_plot_return_fig_returns_the_figure(name, shown, autoshow):
    call, n_axes, drawn, expected = PLOTS[name]
    autoshow(True)  # return_fig wins over autoshow: the figure comes back and is not shown
    fig = call(_scored_visium(), return_fig=True)
    assert isinstance(fig, Figure)
    assert shown == []
    every = [*fig.axes, *(a for sub in fig.subfigs for a in sub.axes)]  # fig.axes lists subfigures' axes or not
    panels = [a for a in dict.fromkeys(every) if a.get_label() != "<colorbar>"]
    assert len(panels) == (1 if n_axes is None else n_axes)
    assert drawn(panels[0]) == expected


@pytest.mark.parametrize("name", list(PLOTS))
def test_plot_show_follows_autoshow(name, shown, autoshow):
    call, n_axes, _, _ = PLOTS[name]
    adata = _scored_visium()
    assert call(adata, show=True) is None and shown == [1]
    autoshow(True)
    assert call(adata) is None and shown == [1, 1]
    autoshow(False)
    _as_list(call(adata), n_axes)
    assert shown == [1, 1]
    assert call(adata, show=True) is None and shown == [1, 1, 1]  # show=True wins over autoshow


@pytest.mark.parametrize("name", SINGLE_PANEL)
def test_single_panel_plot_draws_into_a_given_ax(name, shown):
    call, _, drawn, expected = PLOTS[name]
    adata = _scored_visium()
    fig, (left, right) = plt.subplots(1, 2)
    assert call(adata, ax=right, show=False) is right
    assert drawn(right) == expected and drawn(left) == 0
    assert plt.get_fignums() == [fig.number]  # no new figure
    assert call(adata, ax=left, return_fig=True) is fig
    assert drawn(left) == expected
    # inside a SubFigure, return_fig still gives the top-level figure
    root = plt.figure()
    ax = root.subfigures(1, 2)[1].subplots()
    assert call(adata, ax=ax, return_fig=True) is root
    assert shown == []


@pytest.mark.parametrize("name", [n for n in PLOTS if n not in SINGLE_PANEL])
def test_multi_panel_plot_takes_no_ax(name):
    call, _, _, _ = PLOTS[name]
    _, ax = plt.subplots()
    with pytest.raises(TypeError, match="ax"):
        call(_scored_visium(), ax=ax, show=False)


# --------------------------------------------------------------------------- predicted_vs_true
def test_predicted_vs_true_draws_true_size_spots_with_a_shared_scale():
    adata = _visium()
    score_prediction(adata)
    before = _snapshot(adata)
    axes = pl.predicted_vs_true(adata, ["G0", "G3", "G5"], show=False)
    assert isinstance(axes, list) and len(axes) == 6 and all(isinstance(a, Axes) for a in axes)
    for i, gene in enumerate(["G0", "G3", "G5"]):
        ax_t, ax_p = axes[2 * i], axes[2 * i + 1]
        (ct,), (cp,) = _collections(ax_t), _collections(ax_p)
        assert len(ct.get_offsets()) == adata.n_obs == len(cp.get_offsets())
        np.testing.assert_allclose(ct.get_offsets(), adata.obsm["spatial"] * SCALEF)
        np.testing.assert_allclose(ct.get_widths(), DIAMETER * SCALEF)  # true size in image pixels
        assert ct.get_clim() == cp.get_clim()
        col = adata.var_names.get_loc(gene)
        vals = np.r_[adata.X[:, col], adata.layers["predicted"][:, col]]
        assert ct.get_clim() == pytest.approx((vals.min(), vals.max()))
        assert len(ax_t.images) == 1 and len(ax_p.images) == 1
        r = adata.var.loc[gene, "predicted_scores_pearson"]
        assert ax_t.get_title() == f"{gene} (true)"
        assert ax_p.get_title() == f"{gene} (predicted, r = {r:.2f})"
        # cropped to the spots, image rows downwards
        x0, x1 = ax_t.get_xlim()
        y0, y1 = ax_t.get_ylim()
        xy = adata.obsm["spatial"] * SCALEF
        assert x0 < xy[:, 0].min() and x1 > xy[:, 0].max() and x1 - x0 < np.ptp(xy[:, 0]) + 3 * DIAMETER * SCALEF
        assert y0 > y1 and y1 < xy[:, 1].min()
    fig = axes[0].get_figure(root=True)
    colorbars = [a for sub in fig.subfigs for a in sub.axes if a.get_label() == "<colorbar>"]
    assert len(colorbars) == 3  # one colour bar per gene
    _assert_same(adata, before)


def test_predicted_vs_true_without_image():
    adata = _visium()
    assert pl.predicted_vs_true(adata, "G1", img_key=None, show=False)[1].get_title() == "G1 (predicted)"
    axes = pl.predicted_vs_true(adata, "G1", show=False)
    assert len(axes[0].images) == 1
    axes = pl.predicted_vs_true(adata, "G1", img_key=None, show=False)
    assert len(axes[0].images) == 0
    np.testing.assert_allclose(_collections(axes[0])[0].get_widths(), DIAMETER)  # full-resolution pixels
    # without uns['spatial'] at all: coordinates and spot_size suffice when no image is asked for
    bare = adata.copy()
    del bare.uns["spatial"]
    axes = pl.predicted_vs_true(bare, "G1", img_key=None, spot_size=55.0, show=False)
    np.testing.assert_allclose(_collections(axes[1])[0].get_widths(), 55.0)
    with pytest.raises(KeyError, match="holds no library"):
        pl.predicted_vs_true(bare, "G1", show=False)


def test_predicted_vs_true_picks_one_library():
    adata = _visium(libs=("A", "B"))
    adata.X = sp.csr_matrix(adata.X)  # sparse truth works too
    n_b = int((adata.obs["section"] == "B").sum())
    axes = pl.predicted_vs_true(adata, "G2", library_key="section", library_id="B", show=False)
    assert len(_collections(axes[0])[0].get_offsets()) == n_b
    with pytest.raises(ValueError, match=r"several libraries \['A', 'B'\].*library_id"):
        pl.predicted_vs_true(adata, "G2", library_key="section", show=False)
    # without library_key, the one obs column naming libraries ('section') is used
    n_a = int((adata.obs["section"] == "A").sum())
    axes = pl.predicted_vs_true(adata, "G2", library_id="A", show=False)
    assert len(_collections(axes[0])[0].get_offsets()) == n_a
    other = adata.copy()
    other.obs["section_copy"] = other.obs["section"].astype(str)  # two such columns: ambiguous again
    with pytest.raises(ValueError, match=r"library_key.*candidates"):
        pl.predicted_vs_true(other, "G2", library_id="A", show=False)
    with pytest.raises(ValueError, match=r"several libraries"):
        pl.predicted_vs_true(adata, "G2", show=False)
    with pytest.raises(KeyError, match=r"'C'.*available: \['A', 'B'\]"):
        pl.predicted_vs_true(adata, "G2", library_key="section", library_id="C", show=False)


@pytest.mark.parametrize(
    ("genes", "kwargs", "exc", "match"),
    [
        ("G0", {"layer": "nope"}, KeyError, r"layers\['nope'\].*available layers: \['predicted'\]"),
        ("G0", {"true_layer": "targets"}, KeyError, r"targets.*available layers"),
        (["G0", "XYZ"], {}, KeyError, r"XYZ"),
        ("G11", {}, ValueError, r"did not cover"),
        ("G0", {"img_key": "lowres"}, KeyError, r"no 'lowres' image; available: \['hires'\]"),
        ("G0", {"ncols": 0}, ValueError, r"ncols"),
    ],
)
def test_predicted_vs_true_bad_input(genes, kwargs, exc, match):
    adata = _visium()
    before = _snapshot(adata)
    with pytest.raises(exc, match=match):
        pl.predicted_vs_true(adata, genes, show=False, **kwargs)
    _assert_same(adata, before)


# --------------------------------------------------------------------------- gene_correlation
def test_gene_correlation():
    adata = _visium()
    score_prediction(adata, n_top=8)
    before = _snapshot(adata)
    axes = pl.gene_correlation(adata, show=False)
    assert len(axes) == 3
    ht, hp = axes[0].images[0].get_array(), axes[1].images[0].get_array()
    out = adata.uns["predicted_scores"]
    assert ht.shape == hp.shape == (8, 8)
    # same order in both heatmaps, a permutation of the stored matrices
    names_t = [t.get_text() for t in axes[0].get_xticklabels()]
    assert names_t == [t.get_text() for t in axes[1].get_xticklabels()]
    assert sorted(names_t) == sorted(out["gene_corr_genes"])
    idx = [list(out["gene_corr_genes"]).index(g) for g in names_t]
    np.testing.assert_allclose(ht, out["gene_corr_true"][np.ix_(idx, idx)])
    np.testing.assert_allclose(hp, out["gene_corr_pred"][np.ix_(idx, idx)])
    assert axes[0].images[0].get_clim() == (-1, 1)
    assert f"r = {out['summary']['gene_corr']:.2f}" in axes[2].get_title()
    assert len(axes[2].collections[0].get_offsets()) == 8 * 7 // 2
    assert isinstance(pl.gene_correlation(adata, return_fig=True), Figure)
    sub = pl.gene_correlation(adata, genes=list(out["gene_corr_genes"])[:4], show=False)
    assert sub[0].images[0].get_array().shape == (4, 4)
    _assert_same(adata, before)


def test_gene_correlation_bad_input():
    adata = _visium()
    with pytest.raises(KeyError, match="score_prediction"):
        pl.gene_correlation(adata, show=False)
    score_prediction(adata, n_top=5, key_added="run")
    with pytest.raises(KeyError, match=r"scores found: \['run'\]"):
        pl.gene_correlation(adata, show=False)
    with pytest.raises(KeyError, match="not among the genes"):
        pl.gene_correlation(adata, key="run", genes=["G0", "XYZ"], show=False)
    assert len(pl.gene_correlation(adata, key="run", show=False)) == 3


# --------------------------------------------------------------------------- scores
def test_scores_plot():
    adata = _visium()
    score_prediction(adata)
    before = _snapshot(adata)
    ax = pl.scores(adata, n_genes=3, show=False)
    assert isinstance(ax, Axes)
    r = adata.var["predicted_scores_pearson"].dropna().sort_values(ascending=False)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [*r.index[:3], "…", *r.index[-3:]]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [*r.to_numpy()[:3], 0, *r.to_numpy()[-3:]])
    mean_line = next(ln for ln in ax.get_lines() if ln.get_linestyle() == "--")
    assert mean_line.get_ydata()[0] == pytest.approx(r.mean())
    # all genes when few, into a given axis
    _, given = plt.subplots()
    out = pl.scores(adata, n_genes=30, ax=given, show=False)
    assert out is given and len(given.patches) == r.size
    _assert_same(adata, before)
    with pytest.raises(KeyError, match="score_prediction"):
        pl.scores(adata, key="other", show=False)


# --------------------------------------------------------------------------- training_history
def test_training_history_inputs():
    hist = {"train_loss": [3.0, 2.0, 1.5, 1.2], "val_loss": [3.2, 2.4, 2.0, 2.1], "best_epoch": 2}

    class Model:
        history = hist

    for source in (hist, Model(), {"params": {}, "history": hist}):
        ax = pl.training_history(source, show=False)
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        np.testing.assert_array_equal(lines["train"].get_xdata(), [1, 2, 3, 4])
        np.testing.assert_array_equal(lines["validation"].get_ydata(), hist["val_loss"])
        best = next(v for k, v in lines.items() if k.startswith("best epoch"))
        assert best.get_xdata()[0] == 3 and best.get_ydata()[0] == 2.0
    _, given = plt.subplots()
    assert pl.training_history({"train_loss": np.array([1.0, 0.5])}, ax=given, show=False) is given
    assert [ln.get_label() for ln in given.get_lines()] == ["train"]
    with pytest.raises(TypeError, match="train_loss"):
        pl.training_history({"loss": [1, 2]}, show=False)
    with pytest.raises(ValueError, match="no epoch"):
        pl.training_history({"train_loss": []}, show=False)


def test_training_history_reads_the_anndata():
    adata = _visium()
    with pytest.raises(KeyError, match=r"fit_contrastive.*loss history: \[\]"):
        pl.training_history(adata, show=False)
    adata.uns["run2"] = {"params": {}, "history": HISTORY}
    with pytest.raises(KeyError, match=r"uns\['contrastive'\] is missing.*loss history: \['run2'\]"):
        pl.training_history(adata, show=False)
    ax = pl.training_history(adata, key="run2", show=False)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    np.testing.assert_array_equal(lines["validation"].get_ydata(), HISTORY["val_loss"])
    adata.uns["contrastive"] = {"params": {}}
    with pytest.raises(TypeError, match=r"uns\['contrastive'\] without 'train_loss'"):
        pl.training_history(adata, show=False)


def test_predicted_vs_true_on_one_section_subset_needs_no_library_key():
    """A one-section subset of a multi-section object keeps every library in uns; the 'section' column says which."""
    import sthist as st

    adata = st.datasets.toy(n_rows=6, n_cols=6, n_genes=8, n_sections=2, seed=0)
    adata.layers["predicted"] = adata.X.toarray()
    adata.uns["predicted"] = {"params": {"targets": {"layer": "X", "scale": "counts"}}}  # as predict_expression
    sub = adata[adata.obs["section"] == "toy_1"].copy()

    assert len(sub.uns["spatial"]) == 2
    fig = st.pl.predicted_vs_true(sub, [sub.var_names[0]], show=False, return_fig=True)
    assert len(fig.axes) >= 2
    both = adata.copy()
    with pytest.raises(ValueError, match="several libraries"):
        st.pl.predicted_vs_true(both, [both.var_names[0]], show=False)
