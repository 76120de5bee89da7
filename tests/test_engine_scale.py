"""The engine at scale: lazy (dask / zarr) patch arrays, the DataLoader path of fine-tuning, fit options."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
da = pytest.importorskip("dask.array")
zarr = pytest.importorskip("zarr")

from sthist._engine import train  # noqa: E402
from sthist._engine.data import read_rows, row_chunks  # noqa: E402
from sthist._engine.encoders import build_image_encoder, check_patches, encode_patches  # noqa: E402

ENCODER = "test_vit"  # timm's tiny ViT: fast on a CPU, takes 32 px patches as they are


@pytest.fixture(scope="module")
def toy():
    """64 toy spots with 32 px patches as numpy, zarr (chunks of 24 rows, on disk) and dask (chunks of 20 rows)."""
    import sthist as st

    adata = st.datasets.toy(n_rows=8, n_cols=8, n_genes=16, seed=2)
    st.pp.extract_patches(adata, patch_size=32, progress=False)
    st.pp.normalize_expression(adata)
    t = adata.layers["targets"]
    expression = np.asarray(t.toarray() if hasattr(t, "toarray") else t, dtype=np.float32)
    patches = np.asarray(adata.obsm["patches"])
    return {
        "patches": patches,
        "expression": expression,
        "genes": list(adata.var_names),
        "coords": np.asarray(adata.obsm["spatial"])[:, :2],
    }


@pytest.fixture(scope="module")
def lazy(toy, tmp_path_factory):
    p = toy["patches"]
    z = zarr.open_array(
        tmp_path_factory.mktemp("zarr") / "p.zarr", mode="w", shape=p.shape, chunks=(24, 32, 32, 3), dtype="uint8"
    )
    z[:] = p
    return {"zarr": z, "dask": da.from_array(p, chunks=(20, 32, 32, 3)), "dask(zarr)": da.from_zarr(z)}


def _fit(toy, images, **kw):
    args = dict(
        method="bleep",
        expression=toy["expression"],
        genes=toy["genes"],
        images=images,
        encoder=ENCODER,
        finetune=True,
        max_epochs=2,
        batch_size=16,
        device="cpu",
        random_state=5,
        progress=False,
        method_kwargs={"projection_dim": 32},
    )
    args.update(kw)
    return train.fit(**args)


def _same_weights(a, b):
    sa, sb = a._net.state_dict(), b._net.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---- reading rows ---------------------------------------------------------------------------------------------------


def test_read_rows_matches_numpy_indexing(toy, lazy):
    p = toy["patches"]
    orders = [np.array([40, 3, 3, 63, 0, 25]), np.arange(10, 30), np.array([7]), np.array([], dtype=np.int64)]
    for arr in lazy.values():
        for idx in orders:
            got = read_rows(arr, idx)
            assert isinstance(got, np.ndarray)
            np.testing.assert_array_equal(got, p[idx])
        np.testing.assert_array_equal(read_rows(arr, slice(5, 50)), p[5:50])
    assert row_chunks(p) is None
    np.testing.assert_array_equal(row_chunks(lazy["zarr"]), [0, 24, 48, 64])
    np.testing.assert_array_equal(row_chunks(lazy["dask"]), [0, 20, 40, 60, 64])


def test_check_patches_reads_nothing_of_a_lazy_array(toy):
    def explode(block):
        raise AssertionError("the lazy array was computed")

    arr = da.from_array(toy["patches"], chunks=(16, 32, 32, 3)).map_blocks(explode, dtype=np.uint8)
    assert check_patches(arr) is arr
    with pytest.raises(ValueError, match="uint8"):
        check_patches(da.zeros((4, 8, 8, 3), dtype=np.float32, chunks=2))
    with pytest.raises(ValueError, match=r"\(n, S, S, 3\)"):
        check_patches(zarr.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(TypeError, match="numpy, dask or zarr"):
        check_patches(toy["patches"].tolist())


# ---- encoding -------------------------------------------------------------------------------------------------------


def test_encode_patches_of_lazy_arrays_equals_numpy(toy, lazy):
    enc = build_image_encoder(ENCODER, pretrained=False)
    ref = encode_patches(enc, toy["patches"], batch_size=16, device="cpu", progress=False)
    for name, arr in lazy.items():
        out = encode_patches(enc, arr, batch_size=16, device="cpu", progress=False)
        np.testing.assert_array_equal(out, ref, err_msg=name)


def test_encode_patches_reads_every_chunk_once(toy):
    reads = []

    def record(block, block_info=None):
        reads.append(block_info[0]["chunk-location"][0])
        return block

    arr = da.from_array(toy["patches"], chunks=(20, 32, 32, 3)).map_blocks(record, dtype=np.uint8)
    enc = build_image_encoder(ENCODER, pretrained=False)
    for batch_size in (7, 16, 64):
        reads.clear()
        encode_patches(enc, arr, batch_size=batch_size, device="cpu", progress=False)
        # chunk by chunk: each of the 4 chunks computed once, in order (never the whole array at once)
        assert sorted(reads) == [0, 1, 2, 3]


# ---- training and prediction ----------------------------------------------------------------------------------------


def test_finetuning_on_lazy_patches_equals_numpy(toy, lazy):
    ref = _fit(toy, toy["patches"])
    ref_pred, ref_spread = ref.predict(images=toy["patches"], k=5, progress=False)
    ref_emb = ref.embed_images(images=toy["patches"])
    assert ref.config["training"]["num_workers"] == 0  # the CPU default
    for name, arr in lazy.items():
        model = _fit(toy, arr)
        _same_weights(model, ref)
        assert model.history["train_loss"] == ref.history["train_loss"]
        pred, spread = model.predict(images=arr, k=5, progress=False)
        np.testing.assert_array_equal(pred, ref_pred, err_msg=name)
        np.testing.assert_array_equal(spread, ref_spread, err_msg=name)
        np.testing.assert_array_equal(model.embed_images(images=arr), ref_emb, err_msg=name)
        # the numpy-trained model predicts the same from the lazy array
        np.testing.assert_array_equal(ref.predict(images=arr, k=5, progress=False)[0], ref_pred, err_msg=name)


def test_loader_workers_give_the_same_model(toy, lazy):
    ref = _fit(toy, toy["patches"], max_epochs=3)
    for images in (toy["patches"], lazy["zarr"]):
        model = _fit(toy, images, max_epochs=3, num_workers=2)
        assert model.config["training"]["num_workers"] == 2
        _same_weights(model, ref)
        assert model.history["val_loss"] == ref.history["val_loss"]


def test_neighbour_method_on_lazy_patches_equals_numpy(toy, lazy):
    kw = {"method": "bleep_ctx", "coords": toy["coords"], "max_epochs": 1}
    ref = _fit(toy, toy["patches"], **kw)
    model = _fit(toy, lazy["zarr"], **kw)
    _same_weights(model, ref)
    np.testing.assert_array_equal(
        model.predict(images=lazy["zarr"], coords=toy["coords"], k=5, progress=False)[0],
        ref.predict(images=toy["patches"], coords=toy["coords"], k=5, progress=False)[0],
    )


def test_frozen_mode_encodes_lazy_patches_like_numpy(toy, lazy):
    kw = {"finetune": False, "max_epochs": 3}
    ref = _fit(toy, toy["patches"], **kw)
    model = _fit(toy, lazy["dask"], **kw)
    _same_weights(model, ref)
    np.testing.assert_array_equal(
        model.predict(images=lazy["dask"], k=5, progress=False)[0],
        ref.predict(images=toy["patches"], k=5, progress=False)[0],
    )


# ---- options --------------------------------------------------------------------------------------------------------


def test_fit_options_are_validated_and_recorded(toy):
    sig = inspect.signature(train._prepare)  # fit(**kwargs) hands its keywords to _prepare
    assert sig.parameters["compile"].default is False
    assert sig.parameters["num_workers"].default is None
    with pytest.raises(ValueError, match="num_workers"):
        _fit(toy, toy["patches"], num_workers=-1)
    with pytest.raises(TypeError, match="compile"):
        _fit(toy, toy["patches"], compile="yes")
    model = _fit(toy, toy["patches"], max_epochs=1)
    training = model.config["training"]
    assert training["compile"] is False
    assert training["channels_last"] is False  # CUDA only
    assert training["world_size"] == 1


def test_compile_failure_names_the_fix(toy, monkeypatch):
    def broken_compile(module, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(RuntimeError, match="compile=False"):
        _fit(toy, toy["patches"], compile=True, max_epochs=1)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch.compile of a timm encoder takes ~90 s on a CPU; checked on CUDA only"
)
def test_compiled_encoder_trains(toy):  # pragma: no cover - needs a GPU
    model = _fit(toy, toy["patches"], compile=True, max_epochs=1, device="cuda")
    assert model.config["training"]["compile"] is True
    assert np.isfinite(model.history["train_loss"]).all()


def test_fit_contrastive_passes_the_options(toy):
    import sthist as st

    adata = st.datasets.toy(n_rows=6, n_cols=6, n_genes=12, seed=3)
    st.pp.extract_patches(adata, patch_size=32, progress=False)
    st.pp.normalize_expression(adata)
    model = st.tl.fit_contrastive(
        adata,
        layer="targets",
        finetune=True,
        encoder=ENCODER,
        max_epochs=1,
        batch_size=8,
        num_workers=1,
        device="cpu",
        progress=False,
    )
    assert model.config["training"]["num_workers"] == 1
    assert adata.uns["contrastive"]["params"]["num_workers"] == 1
    assert adata.uns["contrastive"]["params"]["compile"] is False or adata.uns["contrastive"]["params"]["compile"] == 0
