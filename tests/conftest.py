"""Shared fixtures: the synthetic data prepared once per test session."""

from functools import lru_cache

import pytest


@lru_cache(maxsize=4)
def _prepared_toy(seed: int):
    import sthist as st

    adata = st.datasets.toy(n_rows=12, n_cols=12, n_genes=40, n_sections=2, seed=seed)
    st.pp.extract_patches(adata, patch_size=48, library_key="section", progress=False)
    st.pp.normalize_expression(adata)
    st.pp.embed_patches(adata, progress=False)
    return adata


@pytest.fixture(scope="session")
def prepared_toy():
    """``prepared_toy(seed)``: two toy sections (12 x 12 spots, 40 genes) with 48 px patches, ``layers['targets']``
    and ``obsm['X_hed_fast']`` (the default encoder); a fresh copy on every call, computed once per seed."""
    return lambda seed=0: _prepared_toy(seed).copy()


@pytest.fixture(scope="session")
def toy_split(prepared_toy):
    """``toy_split(seed)``: the two sections of ``prepared_toy(seed)`` as (``toy_0``, ``toy_1``), fresh copies."""

    def split(seed: int = 0):
        adata = prepared_toy(seed)
        sec = adata.obs["section"].to_numpy()
        return adata[sec == "toy_0"].copy(), adata[sec == "toy_1"].copy()

    return split
