"""Resumable training: a checkpoint holds the whole training state, and a resumed run equals an uninterrupted one.

A crash is simulated in-process by an exception raised right after the checkpoint of a given epoch (the state in
memory is then thrown away and the resumed call builds everything anew), and for real by SIGKILL of a training
process. Before every resume the global random number generators are scrambled, so that only what the checkpoint
restores can make the runs agree.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sthist as st  # noqa: E402
from sthist._engine import train  # noqa: E402
from sthist._engine.base import ModelFileError  # noqa: E402
from sthist._engine.plan import Optim, Schedule, Stage, TrainPlan  # noqa: E402


class _Crash(Exception):
    """Stands in for a crash right after a checkpoint was written."""


@pytest.fixture(autouse=True)
def one_thread():
    """Train on one CPU thread, as the killed subprocess does (float sums in the same order; and fast on a busy CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _toy_arrays(n=120, g=10, d=12, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    expr = np.log1p(np.exp(feats @ rng.normal(size=(d, g)) / 3)).astype(np.float32)
    return feats, expr, [f"g{i}" for i in range(g)]


def _scramble_generators():
    random.seed(987)
    np.random.seed(987)  # noqa: NPY002
    torch.manual_seed(987)


def _crash_after(monkeypatch, epoch, **kw):
    """``train.fit(**kw)`` with a checkpoint after every epoch, crashing right after the checkpoint of ``epoch``."""
    after_epoch = train._Checkpointer.after_epoch

    def crash(self, state):
        after_epoch(self, state)
        if state.epoch == epoch:
            raise _Crash

    with monkeypatch.context() as m:
        m.setattr(train._Checkpointer, "after_epoch", crash)
        with pytest.raises(_Crash):
            train.fit(**kw, checkpoint_every=1)
    _scramble_generators()


def _same_model(a, b, features=None, images=None):
    sa, sb = a._net.state_dict(), b._net.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    kw = {"features": features} if features is not None else {"images": images}
    np.testing.assert_allclose(a.predict(**kw).expression, b.predict(**kw).expression, rtol=0, atol=1e-6)
    for key in ("train_loss", "val_loss", "train_components", "stages", "best_epoch", "stopped_early"):
        assert a.history[key] == b.history[key], key


FEATS, EXPR, GENES = _toy_arrays(n=80)
FROZEN = {
    "method": "bleep_es",
    "expression": EXPR,
    "genes": GENES,
    "features": FEATS,
    "progress": False,
    "method_kwargs": {"projection_dim": 32},
}
EARLY = {"max_epochs": 10, "batch_size": 16, "lr": 0.01, "early_stopping_patience": 2, "random_state": 3}
TWO_STAGES = TrainPlan(
    batch_size=32,
    validation_fraction=0.2,
    early_stopping_patience=2,
    select_on="val_pearson",
    stages=(
        Stage("heads", epochs=3, trainable=("image_projection",), optimizer=Optim("sgd", lr=0.05)),
        Stage("all", epochs=4, schedule=Schedule("cosine", min_lr=1e-5)),
    ),
)


@pytest.mark.parametrize(
    ("settings", "crash_after"),
    [
        # sthist's recipe (AdamW, 10 % validation) stopping early: crashes mid-run, and after the early stop
        (EARLY, 2),
        (EARLY, None),
        # two stages (SGD then AdamW with a cosine schedule), selection on the validation Pearson r
        ({"plan": TWO_STAGES}, 2),
        ({"plan": TWO_STAGES}, 3),  # at the end of the first stage, before its best weights are restored
        ({"plan": TWO_STAGES}, 5),
    ],
)
def test_resumed_frozen_run_equals_uninterrupted(tmp_path, monkeypatch, settings, crash_after):
    ref = train.fit(**FROZEN, **settings)
    epochs = len(ref.history["train_loss"])
    crash_after = epochs - 1 if crash_after is None else crash_after
    assert 0 < crash_after < epochs
    _crash_after(monkeypatch, crash_after, **FROZEN, **settings, checkpoint_dir=tmp_path)
    resumed = train.fit(**FROZEN, **settings, checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)
    assert resumed.history["resumed_from_epoch"] == crash_after and ref.history["resumed_from_epoch"] is None
    _same_model(resumed, ref, features=FEATS)
    if "plan" not in settings:
        assert ref.history["stopped_early"]  # the early stop and its patience counter survived the crash


@pytest.fixture(scope="module")
def patches():
    adata = st.datasets.toy(n_rows=6, n_cols=6, n_genes=8, seed=2)
    st.pp.extract_patches(adata, patch_size=32, progress=False)
    st.pp.normalize_expression(adata)
    t = adata.layers["targets"]
    return np.asarray(adata.obsm["patches"]), np.asarray(t.toarray() if hasattr(t, "toarray") else t, np.float32)


def test_resumed_finetuning_restores_loader_order_and_augmentation(tmp_path, monkeypatch, patches):
    images, expr = patches
    kw = {
        "method": "bleep",  # BLEEP's heads have dropout: torch's global generator matters too
        "expression": expr,
        "genes": [f"g{i}" for i in range(expr.shape[1])],
        "images": images,
        "encoder": "test_vit",
        "finetune": True,
        "augment": True,
        "max_epochs": 3,
        "batch_size": 8,
        "device": "cpu",
        "random_state": 5,
        "progress": False,
        "method_kwargs": {"projection_dim": 16},
    }
    ref = train.fit(**kw)
    _crash_after(monkeypatch, 1, **kw, checkpoint_dir=tmp_path)
    doc = json.loads((tmp_path / train.CHECKPOINT_FILE).read_text())
    assert doc["position"] == {
        "epoch": 1,
        "stage": 0,
        "stage_name": "main",
        "stage_epoch": 1,
        "stopped_early": False,
        "completed": False,
    }
    from safetensors import safe_open

    with safe_open(str(tmp_path / doc["tensors"]["file"]), framework="pt") as f:
        parts = {"/".join(n.split("/")[:2]) for n in f.keys()}
    assert {"model/method", "model/encoder", "best/method", "best/encoder", "rng/augment", "rng/torch"} <= parts
    # the resumed run reads the patches through DataLoader workers: the batches' order is the sampler's, restored
    resumed = train.fit(**kw, num_workers=1, checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)
    _same_model(resumed, ref, images=images)
    # the generators are what makes it equal: without restoring them, shuffling, augmentation and dropout differ
    _crash_after(monkeypatch, 1, **kw, checkpoint_dir=tmp_path)
    monkeypatch.setattr(train, "_set_rng_state", lambda *args: None)
    other = train.fit(**kw, checkpoint_dir=tmp_path, resume=True)
    assert not np.allclose(other.predict(images=images).expression, ref.predict(images=images).expression, atol=1e-4)


KILLED = textwrap.dedent(
    """
    import sys, time
    import torch

    torch.set_num_threads(1)
    import sthist as st
    from sthist._engine import train

    adata = st.datasets.toy(n_rows=8, n_cols=8, n_genes=12, n_sections=2, seed=0)
    st.pp.extract_patches(adata, patch_size=32, library_key="section", progress=False)
    st.pp.normalize_expression(adata)
    # hold the process after each checkpoint, so that the test's SIGKILL lands between epochs 1 and 2 (training this
    # small model takes milliseconds an epoch); nothing else is changed
    write = train._Checkpointer.write

    def write_and_wait(self, state):
        write(self, state)
        time.sleep(120)

    train._Checkpointer.write = write_and_wait
    st.tl.fit_contrastive(
        adata, layer="targets", method="bleep_es", max_epochs=6, checkpoint_every=1, save_dir=sys.argv[1],
        random_state=0, progress=False,
    )
    """
)


def _killed_toy():
    adata = st.datasets.toy(n_rows=8, n_cols=8, n_genes=12, n_sections=2, seed=0)
    st.pp.extract_patches(adata, patch_size=32, library_key="section", progress=False)
    st.pp.normalize_expression(adata)
    return adata


def test_killed_process_resumes_to_the_uninterrupted_model(tmp_path):
    script, save_dir = tmp_path / "fit.py", tmp_path / "model"
    script.write_text(KILLED)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(save_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    doc_path = save_dir / train.CHECKPOINT_DIR / train.CHECKPOINT_FILE
    deadline = time.monotonic() + 120
    try:
        while not doc_path.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the training process ended before its first checkpoint:\n{proc.stderr.read()}")
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(doc_path.read_text())["position"]["epoch"] == 1
    assert not (save_dir / "config.json").exists()  # killed: no final model

    adata, ref_data = _killed_toy(), _killed_toy()
    fit = {"layer": "targets", "method": "bleep_es", "max_epochs": 6, "random_state": 0, "progress": False}
    _scramble_generators()
    model = st.tl.fit_contrastive(adata, **fit, checkpoint_every=1, save_dir=save_dir, resume=True)
    ref = st.tl.fit_contrastive(ref_data, **fit)
    assert model.history["resumed_from_epoch"] == 1 and len(model.history["train_loss"]) == 6
    assert adata.uns["contrastive"]["history"]["resumed_from_epoch"] == 1
    st.tl.predict_expression(adata, model, progress=False)
    st.tl.predict_expression(ref_data, ref, progress=False)
    np.testing.assert_allclose(adata.layers["predicted"], ref_data.layers["predicted"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(adata.obsm["X_contrastive_image"], ref_data.obsm["X_contrastive_image"], atol=1e-6)
    assert model.history["train_loss"] == ref.history["train_loss"]
    # the final model is saved as without checkpoints, the checkpoint (of the finished run) is kept
    again, feats = st.tl.load_model(save_dir), adata.obsm["X_hed_fast"]
    np.testing.assert_array_equal(again.predict(features=feats).expression, model.predict(features=feats).expression)
    assert json.loads(doc_path.read_text())["position"]["completed"] is True


def test_checkpoint_layout(tmp_path):
    model = train.fit(**FROZEN, max_epochs=5, batch_size=16, checkpoint_dir=tmp_path, checkpoint_every=2)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0] == train.CHECKPOINT_FILE and files[1].startswith("state-00005-")
    doc = json.loads((tmp_path / train.CHECKPOINT_FILE).read_text())
    assert doc["format"] == "sthist-checkpoint" and doc["format_version"] == 1
    assert doc["position"] == {
        "epoch": 5,
        "stage": 1,
        "stage_name": None,
        "stage_epoch": 0,
        "stopped_early": False,
        "completed": True,
    }
    assert doc["history"]["train_loss"] == model.history["train_loss"]
    assert doc["fingerprint"]["method"] == "bleep_es" and doc["fingerprint"]["random_state"] == 0
    assert doc["fingerprint"]["inputs"] == {"features": list(FEATS.shape)}
    assert set(doc["fingerprint"]) >= {"plan", "method_config", "genes_sha256", "expression_sha256", "n_genes"}
    assert doc["optimizer"]["class"] == "AdamW" and doc["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert set(doc["rng"]) == {"python", "numpy", "shuffle"}
    assert doc["tensors"]["file"] == files[1] and len(doc["tensors"]["sha256"]) == 64
    from safetensors import safe_open

    with safe_open(str(tmp_path / files[1]), framework="pt") as f:  # no pickle: loading executes no code
        names = set(f.keys())
        assert f.metadata()["format"] == "sthist-checkpoint"
    assert {"rng/torch", "rng/augment"} <= names
    # a finished run: its best weights are restored into model/, the last stage's optimiser is kept
    assert {n.split("/")[0] for n in names} == {"model", "optimizer", "rng"}
    assert {n[len("model/method/") :] for n in names if n.startswith("model/method/")} == set(model.module.state_dict())
    assert any(n.endswith("/exp_avg_sq") for n in names)


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    kw = {**FROZEN, "max_epochs": 4, "batch_size": 16, "checkpoint_dir": tmp_path}
    ref = train.fit(**FROZEN, max_epochs=4, batch_size=16)
    _crash_after(monkeypatch, 2, **kw)
    # the third checkpoint dies between its tensor file and its JSON document
    replace = os.replace

    def dies_on_the_document(src, dst):
        if str(dst).endswith(train.CHECKPOINT_FILE):
            raise _Crash
        replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", dies_on_the_document)
        with pytest.raises(_Crash):
            train.fit(**kw, checkpoint_every=1, resume=True)
    assert len(list(tmp_path.glob("state-*.safetensors"))) == 2 and list(tmp_path.glob(".*.tmp"))
    assert json.loads((tmp_path / train.CHECKPOINT_FILE).read_text())["position"]["epoch"] == 2
    _scramble_generators()
    resumed = train.fit(**kw, checkpoint_every=1, resume=True)
    assert resumed.history["resumed_from_epoch"] == 2
    _same_model(resumed, ref, features=FEATS)
    assert len(list(tmp_path.glob("state-*.safetensors"))) == 1 and not list(tmp_path.glob(".*.tmp"))


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    base = {**FROZEN, "max_epochs": 2, "batch_size": 16, "checkpoint_dir": tmp_path}
    train.fit(**base, checkpoint_every=1)
    cases = [
        ({"max_epochs": 3}, r"plan\.stages\[0\]\.epochs: 2 in the checkpoint, 3 now"),
        ({"random_state": 4}, "random_state: 0 in the checkpoint, 4 now"),
        ({"method": "bleep"}, 'method: "bleep_es" in the checkpoint, "bleep" now'),
        ({"genes": [f"x{i}" for i in range(len(GENES))]}, "genes_sha256"),
        ({"expression": EXPR[::-1].copy()}, "expression_sha256"),
        ({"features": FEATS[:, :6]}, r"inputs\.features\[1\]: 12 in the checkpoint, 6 now"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            train.fit(**{**base, **change}, checkpoint_every=1, resume=True)
        assert "resume=False" in str(err.value)
    # resume=False starts afresh and replaces the checkpoint
    train.fit(**{**base, "random_state": 4}, checkpoint_every=1)
    assert json.loads((tmp_path / train.CHECKPOINT_FILE).read_text())["fingerprint"]["random_state"] == 4


def test_damaged_checkpoint_raises_with_the_fix(tmp_path):
    train.fit(**FROZEN, max_epochs=2, batch_size=16, checkpoint_dir=tmp_path, checkpoint_every=1)
    (state,) = tmp_path.glob("state-*.safetensors")
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"SHA-256.*resume=False"):
        train.fit(**FROZEN, max_epochs=2, batch_size=16, checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)
    (tmp_path / train.CHECKPOINT_FILE).write_text("{not json")
    with pytest.raises(ModelFileError, match="not readable JSON"):
        train.fit(**FROZEN, max_epochs=2, batch_size=16, checkpoint_dir=tmp_path, resume=True)


def test_resume_without_a_checkpoint_trains_from_the_start(tmp_path, monkeypatch):
    import sthist._logging

    said = []
    monkeypatch.setattr(sthist._logging, "info", lambda msg, **kw: said.append(msg))
    kw = {**FROZEN, "max_epochs": 3, "batch_size": 16}
    model = train.fit(**kw, checkpoint_dir=tmp_path / "new", checkpoint_every=1, resume=True)
    assert any("holds no checkpoint yet: training from the start" in m for m in said)
    assert model.history["resumed_from_epoch"] is None
    _same_model(model, train.fit(**kw), features=FEATS)
    # resuming a finished run trains nothing and gives the same model
    said.clear()
    again = train.fit(**kw, checkpoint_dir=tmp_path / "new", checkpoint_every=1, resume=True)
    assert any("nothing left to train" in m for m in said) and again.history["resumed_from_epoch"] == 3
    _same_model(again, model, features=FEATS)


def test_checkpoint_arguments_are_checked(prepared_toy, tmp_path):
    adata = prepared_toy()
    fit = {"layer": "targets", "max_epochs": 1, "progress": False}
    with pytest.raises(ValueError, match="pass save_dir="):
        st.tl.fit_contrastive(adata, **fit, checkpoint_every=2)
    with pytest.raises(ValueError, match="pass the save_dir= of the interrupted call"):
        st.tl.fit_contrastive(adata, **fit, resume=True)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
            st.tl.fit_contrastive(adata, **fit, save_dir=tmp_path, checkpoint_every=bad)
    with pytest.raises(TypeError, match="resume must be True or False"):
        st.tl.fit_contrastive(adata, **fit, save_dir=tmp_path, resume="yes")
    assert not tmp_path.joinpath("config.json").exists() and "contrastive" not in adata.uns  # checked before work
    with pytest.raises(ValueError, match="checkpoint_dir="):
        train.fit(**FROZEN, checkpoint_every=1)


def test_fit_contrastive_writes_checkpoints_next_to_the_model(prepared_toy, tmp_path):
    adata = prepared_toy()
    st.tl.fit_contrastive(
        adata, layer="targets", method="bleep_es", max_epochs=3, save_dir=tmp_path, checkpoint_every=2, progress=False
    )
    assert (tmp_path / "config.json").is_file()  # the model, as without checkpoints
    doc = json.loads((tmp_path / "checkpoint" / "checkpoint.json").read_text())
    assert doc["position"]["completed"] and doc["position"]["epoch"] == 3
    params = adata.uns["contrastive"]["params"]
    assert params["checkpoint_every"] == 2 and not params["resume"]
    assert isinstance(st.tl.load_model(tmp_path), st.tl.ContrastiveModel)


def test_engine_fit_is_a_typed_entry_point():
    sig = inspect.signature(train.fit)
    kinds = {p.kind for p in sig.parameters.values()}
    assert kinds == {inspect.Parameter.KEYWORD_ONLY}  # no **kwargs: a misspelt setting is a TypeError
    assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values())
    assert sig.parameters["checkpoint_every"].default is None and sig.parameters["resume"].default is False
    doc = train.fit.__doc__
    for name in sig.parameters:
        assert name in doc, name
    assert list(inspect.signature(train._prepare).parameters) == [
        n for n in sig.parameters if n not in ("checkpoint_dir", "checkpoint_every", "resume")
    ]
    with pytest.raises(TypeError, match="learning_rate"):
        train.fit(**FROZEN, learning_rate=1e-3)
