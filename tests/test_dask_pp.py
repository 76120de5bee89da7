"""extract_patches and embed_patches on a Dask cluster, and stores that survive a killed worker or driver.

Every run on the cluster, and every resumed run, is compared with the serial, uninterrupted run: patches, border
flags and weight-free embeddings must be identical, and so must every file of the stores (the chunks and the zarr
metadata), except the completion markers (which record when and where a unit finished).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

import sthist as st
from sthist.pp import _embed, _patches, _store

S = 32
KW = {"patch_size": S, "library_key": "section", "progress": False}


@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes (the machine has 2 cores); not the default client of the session."""
    import cloudpickle
    from distributed import Client, LocalCluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's task wrappers travel by value
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@lru_cache(maxsize=1)
def _toy():
    """Three toy sections of 100 spots; the first spot of each lies at the image corner (a padded patch)."""
    adata = st.datasets.toy(n_rows=10, n_cols=10, n_genes=20, n_sections=3, seed=5)
    first = np.unique(adata.obs["section"].to_numpy(), return_index=True)[1]
    adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64).copy()
    adata.obsm["spatial"][first] = [3.2, 5.7]
    return adata


def _with_files(adata, folder: Path):
    """Each section's image as a file (tiled TIFF, PNG, tiled TIFF) named in uns['spatial'][lib]['metadata']."""
    import tifffile
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for i, (lib, entry) in enumerate(adata.uns["spatial"].items()):
        img = entry["images"].pop("fullres")
        path = folder / f"{lib}.{'png' if i == 1 else 'tif'}"
        if not path.exists():
            if i == 1:
                Image.fromarray(img).save(path)
            else:
                tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb")
        entry.setdefault("metadata", {})["source_image_path"] = str(path)
    return adata


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("images")


@pytest.fixture
def cohort(image_dir):
    """Three toy sections (100 spots each) whose images are files that every worker opens by path."""
    return _with_files(_toy().copy(), image_dir)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 spots and passes of two chunks: several chunks, passes and writes per library."""
    monkeypatch.setattr(_store, "PATCH_CHUNK", 16)
    monkeypatch.setattr(_store, "BUFFER_BYTES", 2 * 16 * S * S * 3)
    monkeypatch.setattr(_store, "ENCODE_BLOCK", 48)  # 7 blocks of 48 rows (batch_size 16) over 300 spots


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store (chunks and zarr metadata) but the completion markers, by relative path."""
    files = {}
    for f in sorted(Path(path).rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_file() and not rel.startswith(_store.DONE + "/"):
            files[rel] = f.read_bytes()
    return files


def assert_same_store(a: Path, b: Path) -> None:
    fa, fb = store_files(a), store_files(b)
    assert sorted(fa) == sorted(fb)
    assert not any(name.endswith(".partial") for name in fa)
    for name in fa:
        assert fa[name] == fb[name], name
    np.testing.assert_array_equal(np.asarray(st.pp.read_store(a)), np.asarray(st.pp.read_store(b)))


def assert_same_patches(a, b):
    np.testing.assert_array_equal(np.asarray(a.obsm["patches"]), np.asarray(b.obsm["patches"]))
    np.testing.assert_array_equal(a.obs["patches_at_border"], b.obs["patches_at_border"])


# ------------------------------------------------------------------------------------------------ same results


def test_extraction_on_a_cluster_equals_the_serial_run(client, cohort, tmp_path, small_chunks):
    serial = cohort.copy()
    st.pp.extract_patches(serial, store=tmp_path / "serial.zarr", **KW)
    assert serial.obs["patches_at_border"].any()  # border flags are compared on both values
    dist = cohort.copy()
    st.pp.extract_patches(dist, store=tmp_path / "dist.zarr", client=client, **KW)
    assert_same_patches(serial, dist)
    assert_same_store(tmp_path / "serial.zarr", tmp_path / "dist.zarr")
    assert dist.uns["patches"]["params"]["image_source"] == serial.uns["patches"]["params"]["image_source"]
    # without a store the tasks return the patches; resampled (mpp) patches as well
    for kw in ({}, {"mpp": 1.5}):
        mem, dist_mem = cohort.copy(), cohort.copy()
        st.pp.extract_patches(mem, **KW, **kw)
        st.pp.extract_patches(dist_mem, client=client, **KW, **kw)
        assert isinstance(dist_mem.obsm["patches"], np.ndarray)
        assert_same_patches(mem, dist_mem)


def test_in_memory_images_are_extracted_here(client, image_dir, tmp_path):
    """Libraries whose image is an array in uns cannot be read by path on a worker: same result, run locally."""
    adata = _toy().copy()
    files = _with_files(_toy().copy(), image_dir)
    adata.uns["spatial"]["toy_0"] = files.uns["spatial"]["toy_0"]  # one library by path, two in memory
    serial, dist = adata.copy(), adata.copy()
    st.pp.extract_patches(serial, store=tmp_path / "s.zarr", **KW)
    st.pp.extract_patches(dist, store=tmp_path / "d.zarr", client=client, **KW)
    assert_same_patches(serial, dist)
    assert_same_store(tmp_path / "s.zarr", tmp_path / "d.zarr")


@pytest.mark.parametrize("encoder", ["hed-fast", "hed-texture"])
def test_embedding_on_a_cluster_equals_the_serial_run(client, cohort, tmp_path, small_chunks, encoder):
    st.pp.extract_patches(cohort, store=tmp_path / "p.zarr", **KW)
    serial, dist = cohort.copy(), cohort.copy()
    kw = {"encoder": encoder, "batch_size": 16, "progress": False}
    st.pp.embed_patches(serial, store=tmp_path / "serial.zarr", **kw)
    st.pp.embed_patches(dist, store=tmp_path / "dist.zarr", client=client, **kw)
    key = _embed.default_key(encoder)
    assert len(_store.store_status(tmp_path / "dist.zarr").units) == 7
    np.testing.assert_array_equal(np.asarray(dist.obsm[key]), np.asarray(serial.obsm[key]))
    assert_same_store(tmp_path / "serial.zarr", tmp_path / "dist.zarr")
    # without an embedding store the blocks come back to this process; a subset of the spots reads its own rows
    sub = cohort[::2].copy()
    ref = sub.copy()
    st.pp.embed_patches(ref, **kw)
    st.pp.embed_patches(sub, client=client, **kw)
    assert isinstance(sub.obsm[key], np.ndarray)
    np.testing.assert_array_equal(sub.obsm[key], ref.obsm[key])
    np.testing.assert_array_equal(sub.obsm[key], np.asarray(serial.obsm[key])[::2])


def test_in_memory_patches_are_encoded_here(client, cohort):
    st.pp.extract_patches(cohort, **KW)
    serial, dist = cohort.copy(), cohort.copy()
    st.pp.embed_patches(serial, progress=False)
    st.pp.embed_patches(dist, client=client, progress=False)
    np.testing.assert_array_equal(dist.obsm["X_hed_fast"], serial.obsm["X_hed_fast"])


# ------------------------------------------------------------------------------------------------ bad input


def test_client_of_the_wrong_type(cohort, tmp_path):
    match = r"client must be a dask.distributed.Client.*got str; pass client=None"
    with pytest.raises(TypeError, match=match):
        st.pp.extract_patches(cohort, client="tcp://scheduler:8786", store=tmp_path / "p.zarr", **KW)
    assert "patches" not in cohort.obsm
    st.pp.extract_patches(cohort, **KW)
    with pytest.raises(TypeError, match=match):
        st.pp.embed_patches(cohort, client="tcp://scheduler:8786", store=tmp_path / "e.zarr", progress=False)
    assert "X_hed_fast" not in cohort.obsm
    assert not list(tmp_path.glob("*.zarr"))


def test_resume_refuses_other_parameters_and_names_each(cohort, tmp_path):
    store = tmp_path / "p.zarr"
    st.pp.extract_patches(cohort, store=store, **KW)
    before = store_files(store)
    other = cohort.copy()
    del other.obsm["patches"]
    with pytest.raises(ValueError, match=r"patch_size: store 32, call 16") as err:
        st.pp.extract_patches(other, store=store, resume=True, **{**KW, "patch_size": 16})
    assert "overwrite=True" in str(err.value)
    moved = other.copy()
    moved.obsm["spatial"] = moved.obsm["spatial"] + 1.0
    with pytest.raises(ValueError, match=r"coords_sha256\['toy_0'\]: store .*, call .*") as err:
        st.pp.extract_patches(moved, store=store, resume=True, pad_value=0, **KW)
    assert "pad_value: store 255, call 0" in str(err.value)
    with pytest.raises(ValueError, match=r"n_spots\['toy_2'\]: store 100, call 50"):
        st.pp.extract_patches(other[100:250].copy(), store=store, resume=True, **KW)
    assert "patches" not in other.obsm and store_files(store) == before
    # the embedding store: another encoder or other patches
    st.pp.embed_patches(cohort, store=tmp_path / "e.zarr", progress=False)
    with pytest.raises(ValueError, match=r"encoder: store 'hed-fast', call 'hed-texture'"):
        st.pp.embed_patches(
            cohort,
            encoder="hed-texture",
            key_added="X_hed_fast",
            store=tmp_path / "e.zarr",
            resume=True,
            progress=False,
        )
    with pytest.raises(ValueError, match=r"batch_size: store 64, call 32"):
        st.pp.embed_patches(cohort, batch_size=32, store=tmp_path / "e.zarr", resume=True, progress=False)
    with pytest.raises(ValueError, match=r"resume=True but store=.* holds embeddings, not patches"):
        st.pp.extract_patches(other, store=tmp_path / "e.zarr", resume=True, **KW)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"store": "p.zarr", "resume": True, "overwrite": True}, ValueError, "not both"),
        ({"resume": True}, ValueError, "resume=True needs store="),
        ({"store": "p.zarr", "resume": "yes"}, TypeError, "resume must be True or False"),
        ({"client": object()}, TypeError, "client must be"),
    ],
)
def test_bad_resume_and_client_inputs(cohort, tmp_path, monkeypatch, kwargs, error, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        st.pp.extract_patches(cohort, **KW, **kwargs)
    st.pp.extract_patches(cohort, **KW)
    with pytest.raises(error, match=match):
        st.pp.embed_patches(cohort, progress=False, **kwargs)
    assert not (tmp_path / "p.zarr").exists()


def _fail_on(original, failing_unit):
    """A store writer (``write_rows`` or ``mark_done``) that raises when it writes ``failing_unit``."""

    def write(path, unit, *args, **kwargs):
        if unit == failing_unit:
            raise RuntimeError("disk full")
        return original(path, unit, *args, **kwargs)

    return write


def test_incomplete_store_is_kept_refused_and_resumed(cohort, tmp_path, monkeypatch, small_chunks):
    ref = cohort.copy()
    st.pp.extract_patches(ref, store=tmp_path / "ref.zarr", resume=True, **KW)  # no store yet: a new one

    store = tmp_path / "p.zarr"
    original = _store.write_rows
    monkeypatch.setattr(_store, "write_rows", _fail_on(original, "lib_0002"))
    with pytest.raises(RuntimeError, match="disk full") as err:
        st.pp.extract_patches(cohort, store=store, **KW)
    assert "resume=True" in "".join(getattr(err.value, "__notes__", []))
    assert "patches" not in cohort.obsm
    status = _store.store_status(store)
    assert status.done == {"lib_0000", "lib_0001"} and not status.complete
    with pytest.raises(ValueError, match=r"unfinished patches store \(2 of 3 libraries finished.*resume=True"):
        st.pp.read_store(store)
    with pytest.raises(ValueError, match=r"unfinished.*resume=True.*overwrite=True"):
        st.pp.extract_patches(cohort, store=store, **KW)
    monkeypatch.setattr(_store, "write_rows", original)
    st.pp.extract_patches(cohort, store=store, resume=True, **KW)
    assert_same_patches(cohort, ref)
    assert_same_store(store, tmp_path / "ref.zarr")
    # a complete store: resume=True opens it without writing anything; without resume it needs overwrite
    stamp = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    again = cohort.copy()
    st.pp.extract_patches(again, store=store, resume=True, **KW)
    assert_same_patches(again, ref)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == stamp
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        st.pp.extract_patches(again, store=store, **KW)

    # embeddings: the fourth block fails, three are kept; resuming finishes the rest
    uninterrupted = cohort.copy()
    st.pp.embed_patches(uninterrupted, batch_size=16, store=tmp_path / "ref_e.zarr", progress=False)
    emb = tmp_path / "e.zarr"
    mark_done = _store.mark_done
    monkeypatch.setattr(_store, "mark_done", _fail_on(mark_done, "block_000003"))
    with pytest.raises(RuntimeError, match="disk full"):
        st.pp.embed_patches(cohort, batch_size=16, store=emb, progress=False)
    assert _store.store_status(emb).done == {"block_000000", "block_000001", "block_000002"}
    with pytest.raises(ValueError, match=r"unfinished embeddings store \(3 of 7 blocks"):
        st.pp.read_store(emb)
    monkeypatch.setattr(_store, "mark_done", mark_done)
    st.pp.embed_patches(cohort, batch_size=16, store=emb, resume=True, progress=False)
    np.testing.assert_array_equal(np.asarray(cohort.obsm["X_hed_fast"]), np.asarray(uninterrupted.obsm["X_hed_fast"]))
    assert_same_store(emb, tmp_path / "ref_e.zarr")


# ------------------------------------------------------------------------------------------------ crashes


def _dies_once(*args, flag: str, **kwargs):
    """Run :func:`_patches._extract_unit` on a worker, but the first worker to write rows dies right after.

    The worker process exits (``os._exit``) after the first pass of its library is written, so the library's array
    is half written and has no marker; the flag file makes this happen once in the whole cluster.
    """
    from sthist.pp import _patches as patches_module
    from sthist.pp import _store as store_module

    if not os.path.exists(flag) and not getattr(store_module.write_rows, "dies", False):
        original = store_module.write_rows

        def write_then_die(*a, **k):
            original(*a, **k)
            try:
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os._exit(1)

        write_then_die.dies = True
        store_module.write_rows = write_then_die
    return patches_module._extract_unit(*args, **kwargs)  # in the worker, the module's own (unpatched) task


def test_a_worker_killed_mid_extraction_costs_its_task_only(client, cohort, tmp_path, monkeypatch, small_chunks):
    import functools

    serial = cohort.copy()
    st.pp.extract_patches(serial, store=tmp_path / "serial.zarr", **KW)
    flag = tmp_path / "worker_died"
    monkeypatch.setattr(_patches, "_extract_unit", functools.partial(_dies_once, flag=str(flag)))
    dist = cohort.copy()
    st.pp.extract_patches(dist, store=tmp_path / "dist.zarr", client=client, **KW)
    assert flag.exists()  # a worker did die mid-library
    assert_same_patches(serial, dist)
    assert_same_store(tmp_path / "serial.zarr", tmp_path / "dist.zarr")


_DRIVER = """
import sys, time
import anndata as ad
import sthist as st
from sthist.pp import _store

S, flag = {S}, {flag!r}
_store.PATCH_CHUNK, _store.BUFFER_BYTES = 16, 2 * 16 * S * S * 3
original = _store.write_rows

def write_and_stall(path, name, start, block):
    original(path, name, start, block)
    if name == "lib_0001":  # library 0 finished, library 1 half written: now wait to be killed
        open(flag, "w").close()
        time.sleep(600)

_store.write_rows = write_and_stall
adata = ad.read_h5ad({h5ad!r})
st.pp.extract_patches(adata, patch_size=S, library_key="section", store={store!r}, progress=False)
"""


def test_the_driver_killed_mid_extraction_is_resumed(cohort, tmp_path, small_chunks):
    ref = cohort.copy()
    st.pp.extract_patches(ref, store=tmp_path / "ref.zarr", **KW)
    h5ad, store, flag = tmp_path / "cohort.h5ad", tmp_path / "p.zarr", tmp_path / "stalled"
    cohort.write_h5ad(h5ad)
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(_DRIVER).format(S=S, flag=str(flag), h5ad=str(h5ad), store=str(store)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            if proc.poll() is not None:
                pytest.fail("the driver ended before it was killed:\n" + proc.stdout.read().decode()[-3000:])
            assert time.monotonic() < deadline, "the driver never reached library 1"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    status = _store.store_status(store)
    assert status.done == {"lib_0000"} and not status.complete
    assert (store / "lib_0001" / "c").is_dir()  # half written
    with pytest.raises(ValueError, match="unfinished"):
        st.pp.read_store(store)
    st.pp.extract_patches(cohort, store=store, resume=True, **KW)
    assert_same_patches(cohort, ref)
    assert_same_store(store, tmp_path / "ref.zarr")
