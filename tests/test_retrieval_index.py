"""Approximate retrieval with a faiss index next to the exact default."""

from __future__ import annotations

import numpy as np
import pytest

from sthist._engine import bank


def _clustered(n: int, d: int, n_centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, d)).astype(np.float32)
    x = centres[rng.integers(0, n_centres, n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    return x.astype(np.float32)


def test_invalid_index_and_n_probe_raise():
    keys = _clustered(100, 8, 4, 0)
    with pytest.raises(ValueError, match="index='annoy' is not valid"):
        bank.topk_search(keys[:5], keys, 3, index="annoy")
    with pytest.raises(ValueError, match="n_probe must be an integer >= 1"):
        bank.retrieve(keys[:5], keys, np.ones((100, 2), np.float32), k=3, index="faiss-ivf", n_probe=0)


def test_faiss_missing_gives_the_install_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    keys = _clustered(200, 8, 4, 0)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        bank.topk_search(keys[:5], keys, 3, index="faiss-ivf")


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_ivf_visiting_every_list_is_exact(similarity):
    pytest.importorskip("faiss")
    keys = _clustered(6000, 16, 30, 1)
    query = _clustered(300, 16, 30, 2)
    s_exact, i_exact = bank.topk_search(query, keys, 10, similarity=similarity)
    s_ivf, i_ivf = bank.topk_search(query, keys, 10, similarity=similarity, index="faiss-ivf", n_probe=10_000)
    np.testing.assert_array_equal(i_ivf, i_exact)
    np.testing.assert_allclose(s_ivf, s_exact, rtol=1e-5, atol=1e-5)


def test_ivf_recall_and_predictions_close_to_exact():
    pytest.importorskip("faiss")
    keys = _clustered(20_000, 32, 50, 3)
    query = _clustered(500, 32, 50, 4)
    values = np.abs(keys[:, :5])  # expression that follows the embedding, as in a trained model
    _, i_exact = bank.topk_search(query, keys, 20)
    _, i_ivf = bank.topk_search(query, keys, 20, index="faiss-ivf", n_probe=16)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(i_exact, i_ivf, strict=True)])
    assert recall > 0.9
    p_exact, _ = bank.retrieve(query, keys, values, k=20)
    p_ivf, _ = bank.retrieve(query, keys, values, k=20, index="faiss-ivf", n_probe=16)
    assert np.corrcoef(p_exact.ravel(), p_ivf.ravel())[0, 1] > 0.95


def test_ivf_fills_rows_whose_visited_lists_hold_fewer_than_k_keys():
    pytest.importorskip("faiss")
    keys = _clustered(4000, 8, 100, 6)
    query = _clustered(50, 8, 100, 7)
    # one list visited and k larger than most lists: faiss returns -1 there, sthist completes those rows exactly
    _, idx = bank.topk_search(query, keys, 120, index="faiss-ivf", n_probe=1)
    assert (idx >= 0).all() and (idx < 4000).all()
    assert all(len(set(row)) == 120 for row in idx)


def _fitted_toy(prepared_toy):
    import sthist as st

    adata = prepared_toy(0)
    ref = adata[adata.obs["section"] == adata.obs["section"].cat.categories[0]].copy()
    query = adata[adata.obs["section"] == adata.obs["section"].cat.categories[1]].copy()
    model = st.tl.fit_contrastive(ref, layer="targets", max_epochs=3, progress=False, random_state=0)
    return st, model, query


def test_predict_expression_with_faiss_index_visiting_every_list_equals_exact(prepared_toy):
    pytest.importorskip("faiss")
    st, model, query = _fitted_toy(prepared_toy)
    exact = st.tl.predict_expression(query, model, k=10, progress=False, copy=True)
    approx = st.tl.predict_expression(query, model, k=10, index="faiss-ivf", n_probe=10_000, progress=False, copy=True)
    np.testing.assert_allclose(approx.layers["predicted"], exact.layers["predicted"], rtol=1e-5, atol=1e-6)
    assert approx.uns["predicted"]["params"]["index"] == "faiss-ivf"
    assert exact.uns["predicted"]["params"]["index"] == "exact"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"index": "hnsw"}, "index='hnsw' is not valid"), ({"n_probe": 0}, "n_probe must be a positive integer")],
)
def test_predict_expression_bad_index_leaves_adata_unchanged(prepared_toy, kwargs, message):
    st, model, query = _fitted_toy(prepared_toy)
    before = query.copy()
    with pytest.raises(ValueError, match=message):
        st.tl.predict_expression(query, model, progress=False, **kwargs)
    assert set(query.layers) == set(before.layers) and list(query.uns) == list(before.uns)
