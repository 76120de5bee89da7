"""Cohorts that do not fit in memory: patches and embeddings in zarr stores, parallel extraction, chunked retrieval.

Every lazy (on-disk) path is checked against the in-memory path on the same toy data: the results must be
identical, not close.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

import sthist as st
from sthist.pp import _patches, _store

S = 32


@lru_cache(maxsize=1)
def _base():
    adata = st.datasets.toy(n_rows=10, n_cols=10, n_genes=30, n_sections=2, seed=3)
    st.pp.normalize_expression(adata)
    return adata


@pytest.fixture
def toy2():
    """Two toy sections (10 x 10 spots each), targets normalised, no patches yet; a fresh copy per test."""
    return _base().copy()


def _with_files(adata, tmp_path, fmt="png"):
    """Save each section's full-resolution image to a file and point uns['spatial'][lib]['metadata'] at it."""
    import tifffile
    from PIL import Image

    for i, (lib, entry) in enumerate(adata.uns["spatial"].items()):
        img = entry["images"].pop("fullres")
        fmt_i = ("png", "tif")[i % 2] if fmt == "mixed" else fmt
        path = tmp_path / f"{lib}.{fmt_i}"
        if fmt_i == "png":
            Image.fromarray(img).save(path)
        else:
            tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb")
        entry.setdefault("metadata", {})["source_image_path"] = str(path)
    return adata


def _snapshot(adata):
    return (list(adata.obsm), list(adata.obs.columns), list(adata.uns), list(adata.layers))


# ------------------------------------------------------------------------------------------------ patches


def test_store_patches_identical_to_memory(toy2, tmp_path):
    mem = toy2.copy()
    st.pp.extract_patches(mem, patch_size=S, library_key="section", progress=False)
    store = tmp_path / "patches.zarr"
    st.pp.extract_patches(toy2, patch_size=S, library_key="section", store=store, progress=False)

    import dask.array as da
    import zarr

    lazy = toy2.obsm["patches"]
    assert isinstance(lazy, da.Array)
    assert lazy.shape == mem.obsm["patches"].shape and lazy.dtype == np.uint8
    np.testing.assert_array_equal(lazy.compute(), mem.obsm["patches"])
    np.testing.assert_array_equal(toy2.obs["patches_at_border"], mem.obs["patches_at_border"])
    assert toy2.uns["patches"]["params"]["store"] == str(store.absolute())
    assert mem.uns["patches"]["params"]["store"] is None
    # one array per library, in obs order: spots of a library are contiguous here, so no re-indexing
    group = zarr.open_group(store, mode="r")
    assert group.attrs["libraries"] == ["toy_0", "toy_1"] and group.attrs["obs_order"] == "grouped"
    n0 = int((toy2.obs["section"] == "toy_0").sum())
    assert group["lib_0000"].shape == (n0, S, S, 3)
    assert group["lib_0001"].shape == (toy2.n_obs - n0, S, S, 3)


def test_store_interleaved_obs_and_small_chunks(toy2, tmp_path, monkeypatch):
    """Libraries interleaved in obs, several chunks per library and several passes per library: still identical."""
    rng = np.random.default_rng(0)
    shuffled = toy2[rng.permutation(toy2.n_obs)].copy()
    mem = shuffled.copy()
    st.pp.extract_patches(mem, patch_size=S, library_key="section", progress=False)
    monkeypatch.setattr(_store, "PATCH_CHUNK", 16)
    monkeypatch.setattr(_store, "BUFFER_BYTES", 2 * 16 * S * S * 3)  # two chunks per tile-order pass
    store = tmp_path / "p.zarr"
    st.pp.extract_patches(shuffled, patch_size=S, library_key="section", store=store, progress=False)
    lazy = shuffled.obsm["patches"]
    assert max(lazy.chunks[0]) <= 16
    np.testing.assert_array_equal(np.asarray(lazy), mem.obsm["patches"])
    np.testing.assert_array_equal(shuffled.obs["patches_at_border"], mem.obs["patches_at_border"])
    import zarr

    assert zarr.open_group(store, mode="r").attrs["obs_order"] == "permuted"
    # subsetting an AnnData keeps the patches lazy and correct
    sub = shuffled[::3]
    np.testing.assert_array_equal(np.asarray(sub.obsm["patches"]), mem.obsm["patches"][::3])


def test_n_jobs_extracts_on_a_local_cluster_with_the_serial_result(toy2, tmp_path, monkeypatch):
    """n_jobs=2: a LocalCluster of two worker processes for the call, each opening its library's file (PNG, TIFF)."""
    import sthist._dask as sd

    adata = _with_files(toy2, tmp_path, "mixed")
    serial = adata.copy()
    st.pp.extract_patches(serial, patch_size=S, library_key="section", progress=False)
    started = []
    original = sd.local_client
    monkeypatch.setattr(sd, "local_client", lambda n: started.append(n) or original(n))
    st.pp.extract_patches(
        adata, patch_size=S, library_key="section", n_jobs=2, store=tmp_path / "par.zarr", progress=False
    )
    assert started == [2]
    np.testing.assert_array_equal(np.asarray(adata.obsm["patches"]), serial.obsm["patches"])
    np.testing.assert_array_equal(adata.obs["patches_at_border"], serial.obs["patches_at_border"])
    assert adata.uns["patches"]["params"]["image_source"] == serial.uns["patches"]["params"]["image_source"]


def test_parallel_with_in_memory_images_falls_back_to_serial(toy2, monkeypatch):
    """In-memory images cannot be read by path on a worker: no cluster is started, the result is the same."""
    import sthist._dask as sd

    monkeypatch.setattr(sd, "local_client", lambda n: pytest.fail("no cluster for in-memory images"))
    serial = toy2.copy()
    st.pp.extract_patches(serial, patch_size=S, library_key="section", progress=False)
    st.pp.extract_patches(toy2, patch_size=S, library_key="section", n_jobs=-1, progress=False)
    np.testing.assert_array_equal(toy2.obsm["patches"], serial.obsm["patches"])


def test_failed_extraction_keeps_store_for_resume_and_leaves_adata(toy2, tmp_path, monkeypatch):
    """A failure keeps the store with the libraries finished so far (for resume=True); adata is left unchanged."""
    before = _snapshot(toy2)
    calls = {"n": 0}
    original = _patches._extract_library

    def fail_on_second_library(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(_patches, "_extract_library", fail_on_second_library)
    store = tmp_path / "p.zarr"
    with pytest.raises(RuntimeError, match="disk full") as err:
        st.pp.extract_patches(toy2, patch_size=S, library_key="section", store=store, progress=False)
    assert _snapshot(toy2) == before
    (note,) = err.value.__notes__  # the user is told the store is kept and how to finish it
    assert "is kept (1 of 2" in note and "extract_patches again" in note and "resume=True" in note
    status = _store.store_status(store)
    assert status.units == ["lib_0000", "lib_0001"] and status.done == {"lib_0000"}
    assert (store / _store.DONE / "lib_0000" / "zarr.json").is_file()
    with pytest.raises(ValueError, match="unfinished"):
        st.pp.read_store(store)
    monkeypatch.setattr(_patches, "_extract_library", original)
    st.pp.extract_patches(toy2, patch_size=S, library_key="section", store=store, resume=True, progress=False)
    mem = _base().copy()
    st.pp.extract_patches(mem, patch_size=S, library_key="section", progress=False)
    np.testing.assert_array_equal(np.asarray(toy2.obsm["patches"]), mem.obsm["patches"])
    assert _store.store_status(store).complete


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"store": "patches.h5"}, ValueError, "must end in '.zarr'"),
        ({"store": 3}, TypeError, "must be a path"),
        ({"store": "no_such_folder/p.zarr"}, FileNotFoundError, "does not exist"),
        ({"n_jobs": 0}, ValueError, "n_jobs"),
        ({"n_jobs": -2}, ValueError, "n_jobs"),
        ({"n_jobs": 1.5}, TypeError, "n_jobs"),
        ({"n_jobs": True}, TypeError, "n_jobs"),
        ({"store": "p.zarr", "overwrite": "yes"}, TypeError, "overwrite"),
    ],
)
def test_bad_store_and_n_jobs_inputs(toy2, tmp_path, monkeypatch, kwargs, error, match):
    monkeypatch.chdir(tmp_path)
    before = _snapshot(toy2)
    with pytest.raises(error, match=match):
        st.pp.extract_patches(toy2, patch_size=S, library_key="section", progress=False, **kwargs)
    assert _snapshot(toy2) == before
    assert not (tmp_path / "p.zarr").exists()


def test_existing_store_needs_overwrite(toy2, tmp_path):
    store = tmp_path / "p.zarr"
    st.pp.extract_patches(toy2, patch_size=S, library_key="section", store=store, progress=False)
    other = _base().copy()
    before = _snapshot(other)
    with pytest.raises(ValueError, match="overwrite=True"):
        st.pp.extract_patches(other, patch_size=S, library_key="section", store=store, progress=False)
    assert _snapshot(other) == before
    st.pp.extract_patches(other, patch_size=16, library_key="section", store=store, overwrite=True, progress=False)
    assert other.obsm["patches"].shape[1] == 16
    # overwrite only replaces zarr stores, never another folder
    folder = tmp_path / "notzarr.zarr"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a zarr store"):
        st.pp.extract_patches(other, patch_size=S, library_key="section", store=folder, overwrite=True)
    assert (folder / "keep.txt").read_text() == "mine"


def test_not_writable_store_folder(toy2, tmp_path):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
            pytest.skip("the folder stays writable for this user")
        with pytest.raises(ValueError, match="not writable"):
            st.pp.extract_patches(toy2, patch_size=S, library_key="section", store=ro / "p.zarr", progress=False)
        assert "patches" not in toy2.obsm
    finally:
        ro.chmod(0o700)


# ------------------------------------------------------------------------------------------------ embeddings


@pytest.fixture
def lazy_and_memory(toy2, tmp_path):
    mem = toy2.copy()
    st.pp.extract_patches(mem, patch_size=S, library_key="section", progress=False)
    st.pp.extract_patches(toy2, patch_size=S, library_key="section", store=tmp_path / "p.zarr", progress=False)
    return toy2, mem


def test_embeddings_from_store_identical(lazy_and_memory, tmp_path, monkeypatch):
    import dask.array as da

    lazy, mem = lazy_and_memory
    st.pp.embed_patches(mem, progress=False)
    # blocks that straddle the store's chunks and the library boundary
    monkeypatch.setattr(_store, "ENCODE_BLOCK", 48)
    monkeypatch.setattr(_store, "PATCH_CHUNK", 40)
    st.pp.embed_patches(lazy, batch_size=16, key_added="in_memory", progress=False)
    st.pp.embed_patches(lazy, batch_size=16, store=tmp_path / "e.zarr", progress=False)
    ref = mem.obsm["X_hed_fast"]
    assert isinstance(lazy.obsm["in_memory"], np.ndarray) and lazy.obsm["in_memory"].dtype == np.float32
    np.testing.assert_array_equal(lazy.obsm["in_memory"], ref)
    emb = lazy.obsm["X_hed_fast"]
    assert isinstance(emb, da.Array) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb.compute(), ref)
    assert lazy.uns["X_hed_fast"]["params"]["store"] == str((tmp_path / "e.zarr").absolute())
    with pytest.raises(ValueError, match="holds the patches"):
        st.pp.embed_patches(lazy, store=tmp_path / "p.zarr", overwrite=True, progress=False)
    with pytest.raises(ValueError, match="overwrite=True"):
        st.pp.embed_patches(lazy, store=tmp_path / "e.zarr", progress=False)


def test_iter_row_blocks_reads_each_chunk_once():
    import dask.array as da

    from sthist._engine.data import iter_row_blocks

    x = np.arange(103 * 2).reshape(103, 2)
    lazy = da.from_array(x, chunks=((30, 7, 40, 26), 2))
    starts, blocks = zip(*iter_row_blocks(lazy, 16), strict=True)
    assert list(starts) == list(range(0, 103, 16))
    assert [len(b) for b in blocks] == [16] * 6 + [7]
    np.testing.assert_array_equal(np.concatenate(blocks), x)


def test_fit_predict_from_stored_features_identical(lazy_and_memory, tmp_path):
    lazy, mem = lazy_and_memory
    st.pp.embed_patches(mem, progress=False)
    st.pp.embed_patches(lazy, store=tmp_path / "e.zarr", progress=False)
    train = (mem.obs["section"] == "toy_0").to_numpy()
    preds = []
    for adata in (mem, lazy):
        ref, query = adata[train].copy(), adata[~train].copy()
        model = st.tl.fit_contrastive(
            ref, layer="targets", features_key="X_hed_fast", max_epochs=3, random_state=0, progress=False
        )
        st.tl.predict_expression(query, model, features_key="X_hed_fast", progress=False)
        preds.append(query.layers["predicted"])
    assert np.isfinite(preds[0]).all()
    np.testing.assert_array_equal(preds[1], preds[0])


def test_fit_from_lazy_patches_encodes_chunkwise(lazy_and_memory):
    """Without features, fit_contrastive encodes the stored patches block by block (same features as in memory)."""
    lazy, mem = lazy_and_memory
    st.pp.embed_patches(mem, progress=False)
    st.tl.fit_contrastive(lazy, layer="targets", max_epochs=2, progress=False)
    np.testing.assert_array_equal(lazy.obsm["X_hed_fast"], mem.obsm["X_hed_fast"])


def test_ridge_and_cv_with_stored_features(lazy_and_memory, tmp_path):
    lazy, mem = lazy_and_memory
    st.pp.embed_patches(mem, progress=False)
    st.pp.embed_patches(lazy, store=tmp_path / "e.zarr", progress=False)
    pred = [
        st.tl.fit_ridge(a, features_key="X_hed_fast", layer="targets").predict(features=a.obsm["X_hed_fast"]).expression
        for a in (mem, lazy)
    ]
    np.testing.assert_array_equal(pred[1], pred[0])
    tables = [
        st.tl.cross_validate(a, groupby="section", method="ridge", features_key="X_hed_fast", layer="targets")
        for a in (mem, lazy)
    ]
    np.testing.assert_array_equal(lazy.layers["cv_predicted"], mem.layers["cv_predicted"])
    import pandas as pd

    cols = [c for c in tables[0].columns if c != "seconds"]
    pd.testing.assert_frame_equal(tables[1][cols], tables[0][cols])


def test_h5ad_round_trip_with_dask_obsm(lazy_and_memory, tmp_path):
    import anndata as ad

    lazy, mem = lazy_and_memory
    st.pp.embed_patches(lazy, store=tmp_path / "e.zarr", progress=False)
    lazy.write_h5ad(tmp_path / "cohort.h5ad")
    back = ad.read_h5ad(tmp_path / "cohort.h5ad")
    np.testing.assert_array_equal(back.obsm["patches"], mem.obsm["patches"])
    np.testing.assert_array_equal(back.obsm["X_hed_fast"], np.asarray(lazy.obsm["X_hed_fast"]))
    assert back.uns["patches"]["params"]["store"] == str((tmp_path / "p.zarr").absolute())
    # the stores can be reattached lazily after reading, through the public reader
    reopened = st.pp.read_store(back.uns["patches"]["params"]["store"])
    assert is_dask(reopened)
    np.testing.assert_array_equal(reopened.compute(), mem.obsm["patches"])
    emb = st.pp.read_store(back.uns["X_hed_fast"]["params"]["store"])
    np.testing.assert_array_equal(emb.compute(), np.asarray(lazy.obsm["X_hed_fast"]))


def is_dask(x):
    import dask.array as da

    return isinstance(x, da.Array)


def test_read_store_bad_paths(tmp_path):
    import zarr

    with pytest.raises(FileNotFoundError, match="no store at"):
        st.pp.read_store(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(ValueError, match="not a store written by"):
        st.pp.read_store(tmp_path / "other.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a"):
        st.pp.read_store(tmp_path / "plain")


# ------------------------------------------------------------------------------------------------ retrieval


def _brute_force_topk(query, keys, k):
    """Exact top-k by numpy over the full similarity matrix: similarity descending, then lower index first."""
    sims = query @ keys.T
    out = np.empty((len(query), k), dtype=np.int64)
    for i, row in enumerate(sims):
        out[i] = np.lexsort((np.arange(len(row)), -row))[:k]
    return sims, out


def test_chunked_topk_equals_brute_force_with_ties():
    from sthist._engine.bank import topk_search

    rng = np.random.default_rng(0)
    # small integers: every dot product is exact in float32, and ties are frequent
    keys = rng.integers(-2, 3, size=(9000, 6)).astype(np.float32)  # > 4 bank tiles of 2048
    query = rng.integers(-2, 3, size=(300, 6)).astype(np.float32)
    k = 25
    sims_ref, idx_ref = _brute_force_topk(query.astype(np.float64), keys.astype(np.float64), k)
    kth = np.sort(sims_ref, axis=1)[:, ::-1][:, k - 1 : k + 1]
    assert (kth[:, 0] == kth[:, 1]).mean() > 0.5  # the k-th place is tied for most queries: ties are tested
    for chunk_size in (1, 7, 4096):
        sims, idx = topk_search(query, keys, k, similarity="dot", chunk_size=chunk_size, device="cpu")
        np.testing.assert_array_equal(idx, idx_ref)
        np.testing.assert_array_equal(sims, np.take_along_axis(sims_ref, idx_ref, axis=1).astype(np.float32))


def test_chunked_cosine_topk_matches_brute_force():
    from sthist._engine.bank import topk_search

    rng = np.random.default_rng(1)
    keys = rng.normal(size=(7000, 16)).astype(np.float32)
    query = rng.normal(size=(200, 16)).astype(np.float32)
    k = 10
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    sims_ref, idx_ref = _brute_force_topk(qn.astype(np.float64), kn.astype(np.float64), k)
    sims, idx = topk_search(query, keys, k, similarity="cosine", chunk_size=3, device="cpu")
    # random data has no near-ties at this size: the indices are those of float64 brute force
    gaps = np.diff(np.sort(sims_ref, axis=1)[:, ::-1][:, : k + 1], axis=1)
    assert np.abs(gaps).min() > 1e-6  # float32 cosine similarities are accurate to about 1e-7
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_allclose(sims, np.take_along_axis(sims_ref, idx, axis=1), atol=1e-6)
    # an all-equal bank: every similarity ties, the lowest indices win
    _, idx_tied = topk_search(query, np.ones((5000, 16), dtype=np.float32), k, chunk_size=5, device="cpu")
    np.testing.assert_array_equal(idx_tied, np.tile(np.arange(k), (len(query), 1)))


def test_predict_expression_chunk_size_does_not_change_results(lazy_and_memory, tmp_path):
    lazy, _ = lazy_and_memory
    st.pp.embed_patches(lazy, store=tmp_path / "e.zarr", progress=False)
    model = st.tl.fit_contrastive(lazy, layer="targets", features_key="X_hed_fast", max_epochs=2, progress=False)
    a, b = lazy.copy(), lazy.copy()
    st.tl.predict_expression(a, model, features_key="X_hed_fast", chunk_size=5, progress=False)
    st.tl.predict_expression(b, model, features_key="X_hed_fast", progress=False)
    np.testing.assert_array_equal(a.layers["predicted"], b.layers["predicted"])
