"""Retrieval from a reference bank: chunked exact top-k search and aggregation of the retrieved profiles.

Queries (image embeddings) are compared with the bank keys (expression embeddings of reference spots) tile by
tile, over the queries and over the bank (256 x 2048 on a CPU, 2048 x 16384 on a GPU), keeping a running top-k,
so memory does not grow with the bank: a bank of a million spots fits. Results are exact and do not depend on the
chunking: every similarity product has the same fixed tile shape (GEMM kernels may round differently for
different shapes), and similarity and bank index are packed into one int64 key (the order-preserving integer image
of the float32 similarity in the high 32 bits, the inverted index in the low 32 bits), so the top-k is unique,
ties go to the lower bank index and merging tiles is exact.

Similarity (``similarity=``)
    ``"cosine"``: both sides L2-normalised, then dot products (BLEEP's ``find_matches`` in
    ``BLEEP_inference.ipynb``, also used by mclSTExp); ``"dot"``: raw dot products.
Aggregation of the k retrieved expression profiles (``weighting=``)
    ``"average"``: plain mean (BLEEP's default ``method = "average"``, top 50);
    ``"distance"``: weights proportional to 1 / d^2 with d the L1 distance between the raw query and key
    embeddings (mclSTExp's ``evel_*.py``, top 200);
    ``"softmax"``: weights softmax(similarity / temperature).
Spread per spot
    The weighted standard deviation of each gene over the k retrieved profiles, averaged over genes: low when the
    neighbours in the joint space agree, high when the prediction averages dissimilar spots.
Search (``index=``)
    ``"exact"`` (default): the chunked exact search above. ``"faiss-ivf"``: an approximate inverted-file index of
    faiss (``IndexIVFFlat`` over inner products of the normalised keys, ``sqrt(n)`` lists trained by k-means
    on at most 128 keys per list, ``n_probe`` lists visited per query) for banks of millions of spots where exact
    search is too slow; needs ``pip install faiss-cpu`` (or ``faiss-gpu``). Approximate: a query may miss some of
    its true k nearest keys (``benchmarks/retrieval.py`` measures recall and speed).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from ._utils import check_float, check_int, progress_bar, resolve_device

SIMILARITIES = ("cosine", "dot")
WEIGHTINGS = ("average", "distance", "softmax")
INDEXES = ("exact", "faiss-ivf")
_LOW = (1 << 32) - 1
_MAX_ELEMENTS = 1 << 24  # elements per gathered (rows, k, width) block in aggregation


def _pack(sims: torch.Tensor, start: int) -> torch.Tensor:
    """int64 keys ordering by similarity (desc) then bank index (asc); ``sims`` is (r, c) float32."""
    b = sims.contiguous().view(torch.int32)
    b = torch.where(b >= 0, b, b ^ 0x7FFFFFFF).to(torch.int64)
    idx = torch.arange(start, start + sims.shape[1], device=sims.device, dtype=torch.int64)
    return (b << 32) | (_LOW - idx)


def _unpack(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = _LOW - (keys & _LOW)
    hi = (keys >> 32).to(torch.int32)
    hi = torch.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    return hi.view(torch.float32), idx


def _as_float32(name: str, x: np.ndarray, ndim: int = 2) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-d array, got shape {x.shape}.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values.")
    return x


def _check_common(query, keys, k, similarity, chunk_size):
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity={similarity!r} is not valid; choose one of {list(SIMILARITIES)}.")
    query = _as_float32("query embeddings", query)
    keys = _as_float32("bank embeddings", keys)
    if query.shape[1] != keys.shape[1]:
        raise ValueError(f"query embeddings have width {query.shape[1]} but the bank has width {keys.shape[1]}.")
    k = check_int("k", k)
    if k > keys.shape[0]:
        raise ValueError(f"k={k} is larger than the reference bank ({keys.shape[0]} spots); use k <= {keys.shape[0]}.")
    if keys.shape[0] >= 1 << 32:
        raise ValueError("banks of more than 2**32 spots are not supported.")
    chunk_size = check_int("chunk_size", chunk_size)
    return query, keys, k, chunk_size


def _retrieval_device(device) -> torch.device:
    # int64 top-k is not available on every backend: MPS retrieval runs on the CPU
    dev = resolve_device(device)
    return torch.device("cpu") if dev.type == "mps" else dev


def _tile_sizes(device: torch.device) -> tuple[int, int]:
    """Return the fixed (query, bank) tile shapes of the similarity products on this kind of device."""
    return (256, 2048) if device.type == "cpu" else (2048, 16384)


class _Bank:
    """Bank keys cut into fixed-size tiles (zero-padded), normalised once for cosine.

    Every similarity product has exactly the shape (query tile, bank tile), so a similarity value never depends on
    how the caller chunks the queries: GEMM kernels may round differently for different matrix shapes.
    """

    def __init__(self, keys: np.ndarray, similarity: str, device: torch.device):
        self.similarity = similarity
        self.device = device
        self.tq, self.tk = _tile_sizes(device)
        self.n = keys.shape[0]
        self.on_device = device.type == "cpu" or keys.nbytes <= (2 << 30)
        t = torch.from_numpy(keys)
        self.keys = t.to(device) if self.on_device else t

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k similarities and bank indices of one query tile (see :func:`_topk_tile`)."""
        return _topk_tile(q, self, k)

    def tiles(self):
        for s in range(0, self.n, self.tk):
            kc = self.keys[s : s + self.tk]
            if not self.on_device:
                kc = kc.to(self.device, non_blocking=True)
            if kc.shape[0] < self.tk:
                kc = torch.cat([kc, kc.new_zeros(self.tk - kc.shape[0], kc.shape[1])])
            if self.similarity == "cosine":
                kc = F.normalize(kc, dim=-1)
            yield s, kc


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (as ``F.normalize``: zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _topk_tile(q: torch.Tensor, bank: _Bank, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of one query tile (at most ``bank.tq`` rows) over all bank tiles."""
    rows = q.shape[0]
    if rows < bank.tq:
        q = torch.cat([q, q.new_zeros(bank.tq - rows, q.shape[1])])
    if bank.similarity == "cosine":
        q = F.normalize(q, dim=-1)
    best = None
    for s, kc in bank.tiles():
        keys = _pack(q @ kc.T, s)
        if s + bank.tk > bank.n:
            keys[:, bank.n - s :] = torch.iinfo(torch.int64).min  # padding never wins
        if best is not None:
            keys = torch.cat([best, keys], dim=1)
        best = torch.topk(keys, min(k, keys.shape[1]), dim=1, largest=True, sorted=True).values
    sims, idx = _unpack(best[:rows])
    return sims, idx


class _FaissBank:
    """An approximate faiss inverted-file index over the bank keys with the tile interface of :class:`_Bank`."""

    def __init__(self, keys: np.ndarray, similarity: str, device: torch.device, n_probe: int):
        try:
            import faiss
        except ImportError as err:
            raise ImportError(
                "index='faiss-ivf' needs faiss: `pip install faiss-cpu` (or `pip install 'sthist[faiss]'`); "
                "or use the exact search, index='exact'."
            ) from err
        self.similarity = similarity
        self.device = device
        self.tq = 4096
        self.n = keys.shape[0]
        self.keys = keys
        self._exact = None  # built on first need: the exact search that completes short result rows
        x = np.ascontiguousarray(keys, dtype=np.float32)
        if similarity == "cosine":
            x = _unit_rows(x)
        n_list = int(max(1, min(np.sqrt(self.n), self.n // 39)))
        quantizer = faiss.IndexFlatIP(x.shape[1])
        self.index = faiss.IndexIVFFlat(quantizer, x.shape[1], n_list, faiss.METRIC_INNER_PRODUCT)
        # k-means on an evenly spaced sample of at most 128 keys per list (deterministic)
        step = max(1, self.n // (128 * n_list))
        self.index.train(x[::step])
        self.index.add(x)
        self.index.nprobe = min(n_probe, n_list)
        self.n_list = n_list

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate top-k similarities and bank indices of one query tile."""
        x = q.float().cpu().numpy()
        if self.similarity == "cosine":
            x = _unit_rows(x)
        sims, idx = self.index.search(np.ascontiguousarray(x), k)
        if (idx < 0).any():
            # fewer than k keys in the visited lists: fill from an exact search of those rows (rare; small n_probe)
            rows = np.flatnonzero((idx < 0).any(axis=1))
            if self._exact is None:
                self._exact = _Bank(self.keys, self.similarity, torch.device("cpu"))
            s2, i2 = self._exact.search(q[torch.as_tensor(rows, device=q.device)].float().cpu(), k)
            sims[rows], idx[rows] = s2.numpy(), i2.numpy()
        return torch.from_numpy(sims).to(q.device), torch.from_numpy(idx).to(q.device)


def _make_bank(keys: np.ndarray, similarity: str, device: torch.device, index: str, n_probe: int):
    if index not in INDEXES:
        raise ValueError(f"index={index!r} is not valid; choose one of {list(INDEXES)} ('exact' is the default).")
    n_probe = check_int("n_probe", n_probe)
    if index == "exact":
        return _Bank(keys, similarity, device)
    return _FaissBank(keys, similarity, device, n_probe)


def _query_tiles(query: np.ndarray, chunk_size: int, bank: _Bank):
    """Yield (start, tensor) query tiles; ``chunk_size`` rows are moved to the device at a time."""
    step = max(bank.tq, -(-chunk_size // bank.tq) * bank.tq)
    for s in range(0, query.shape[0], step):
        block = torch.from_numpy(query[s : s + step]).to(bank.device)
        for t in range(0, block.shape[0], bank.tq):
            yield s + t, block[t : t + bank.tq]


def topk_search(
    query: np.ndarray,
    keys: np.ndarray,
    k: int,
    *,
    similarity: Literal["cosine", "dot"] = "cosine",
    chunk_size: int = 4096,
    device: str | torch.device | None = None,
    index: Literal["exact", "faiss-ivf"] = "exact",
    n_probe: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Find the k most similar bank entries of every query, best first.

    ``index="faiss-ivf"`` searches approximately with faiss (``n_probe`` inverted lists per query); see the module
    docstring.

    Returns
    -------
    similarities (n_query, k) float32 and bank indices (n_query, k) int64; ties go to the lower index.
    """
    query, keys, k, chunk_size = _check_common(query, keys, k, similarity, chunk_size)
    dev = _retrieval_device(device)
    bank = _make_bank(keys, similarity, dev, index, n_probe)
    sims = np.empty((query.shape[0], k), dtype=np.float32)
    idx = np.empty((query.shape[0], k), dtype=np.int64)
    with torch.inference_mode():
        for s, q in _query_tiles(query, chunk_size, bank):
            v, i = bank.search(q, k)
            sims[s : s + v.shape[0]] = v.cpu().numpy()
            idx[s : s + v.shape[0]] = i.cpu().numpy()
    return sims, idx


def _weights(sims, idx, q, keys_host, weighting, temperature, dev):
    if weighting == "average":
        return torch.full(sims.shape, 1.0 / sims.shape[1], device=dev)
    if weighting == "softmax":
        return torch.softmax(sims / temperature, dim=1)
    # "distance": 1 / (L1 distance between raw embeddings)^2, normalised (mclSTExp)
    kk = keys_host[idx.cpu().flatten()].view(*idx.shape, -1).to(dev)
    d = (kk - q.unsqueeze(1)).abs().sum(-1)
    w = 1.0 / (d * d).clamp_min(1e-12)
    return w / w.sum(dim=1, keepdim=True)


def retrieve(
    query: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    *,
    k: int = 50,
    similarity: Literal["cosine", "dot"] = "cosine",
    weighting: Literal["average", "distance", "softmax"] = "average",
    temperature: float = 0.1,
    chunk_size: int = 4096,
    device: str | torch.device | None = None,
    progress: bool = False,
    index: Literal["exact", "faiss-ivf"] = "exact",
    n_probe: int = 32,
    gene_spread: bool = False,
) -> tuple[np.ndarray, ...]:
    """Predict profiles of the queries from the k nearest bank entries.

    Parameters
    ----------
    query
        (n, p) query embeddings (image side).
    keys
        (n_ref, p) bank embeddings (expression side).
    values
        (n_ref, g) expression of the bank spots.
    k
        Number of bank spots retrieved per query.
    similarity
        ``"cosine"`` or ``"dot"``.
    weighting
        ``"average"``, ``"distance"`` (1/d^2, mclSTExp) or ``"softmax"`` (over similarity / ``temperature``).
    temperature
        Temperature of the ``"softmax"`` weighting.
    chunk_size
        Query rows moved to the device at a time. Similarities are computed in fixed tiles (256 queries x 2048
        bank spots on a CPU, 2048 x 16384 on a GPU) whatever ``chunk_size`` is, so results do not depend on it.
    device
        ``None`` picks cuda, then mps, then cpu.
    progress
        Progress bar over query chunks.
    index
        ``"exact"`` (default) or ``"faiss-ivf"`` (approximate, needs faiss; see the module docstring).
    n_probe
        Inverted lists visited per query with ``index="faiss-ivf"`` (more: slower, closer to exact).
    gene_spread
        Also return the weighted standard deviation of every gene over the k profiles (n, g).

    Returns
    -------
    prediction (n, g) float32 and spread (n,) float32 (mean over genes of the weighted std of the k profiles), and
    with ``gene_spread`` that std per gene (n, g) float32.
    """
    query, keys, k, chunk_size = _check_common(query, keys, k, similarity, chunk_size)
    values = _as_float32("bank expression", values)
    if values.shape[0] != keys.shape[0]:
        raise ValueError(f"the bank has {keys.shape[0]} embeddings but {values.shape[0]} expression profiles.")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is not valid; choose one of {list(WEIGHTINGS)}.")
    temperature = check_float("temperature", temperature, minimum=0.0, strict=True)
    dev = _retrieval_device(device)
    bank = _make_bank(keys, similarity, dev, index, n_probe)
    keys_host = torch.from_numpy(keys)
    values_host = torch.from_numpy(values)
    n, g = query.shape[0], values.shape[1]
    pred = np.empty((n, g), dtype=np.float32)
    spread = np.empty(n, dtype=np.float32)
    per_gene = np.empty((n, g), dtype=np.float32) if gene_spread else None
    rows = min(bank.tq, max(1, _MAX_ELEMENTS // (k * max(g, keys.shape[1]))))
    n_tiles = -(-n // bank.tq)
    with torch.inference_mode():
        for s, q in progress_bar(
            _query_tiles(query, chunk_size, bank), enabled=progress, total=n_tiles, desc="retrieving", leave=False
        ):
            sims, idx = bank.search(q, k)
            for r in range(0, q.shape[0], rows):
                sl = slice(r, r + rows)
                w = _weights(sims[sl], idx[sl], q[sl], keys_host, weighting, temperature, dev)
                e = values_host[idx[sl].cpu().flatten()].view(*idx[sl].shape, g).to(dev)
                mean = (w.unsqueeze(-1) * e).sum(dim=1)
                var = (w.unsqueeze(-1) * (e - mean.unsqueeze(1)) ** 2).sum(dim=1)
                pred[s + r : s + r + mean.shape[0]] = mean.cpu().numpy()
                sd = var.clamp_min(0).sqrt()
                spread[s + r : s + r + mean.shape[0]] = sd.mean(dim=1).cpu().numpy()
                if per_gene is not None:
                    per_gene[s + r : s + r + mean.shape[0]] = sd.cpu().numpy()
    return (pred, spread, per_gene) if gene_spread else (pred, spread)
