"""Work on a Dask cluster: the ``client=`` of sthist's cohort tools, and ``n_jobs`` as a local cluster.

Every tool that takes ``client=`` splits its work into pure tasks (one library, slide or block of rows each: inputs
read by path or sent with the task, one region of an output written, a small result returned) and submits them with
:meth:`distributed.Client.submit`. ``client=None`` runs them one after the other in this process; ``n_jobs > 1``
(where a tool has it) starts a :class:`distributed.LocalCluster` of that many single-threaded worker processes for
the call and closes it afterwards. Dask retries a task whose worker died (``retries``), so a killed worker costs its
task, not the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

#: Times a task is retried on another worker when its worker dies (or the task raises).
RETRIES = 3


def check_client(client: Any, *, fn: str) -> Any:
    """``client`` when it is a :class:`distributed.Client` (or ``None``); otherwise raise with the fix."""
    if client is None:
        return None
    try:
        from distributed import Client
    except ImportError as err:  # pragma: no cover - distributed ships with dask[distributed]
        raise ImportError(f"{fn}: client= needs dask.distributed: `pip install 'dask[distributed]'`.") from err
    if not isinstance(client, Client):
        raise TypeError(
            f"{fn}: client must be a dask.distributed.Client (e.g. `Client(LocalCluster())`, or the client of a "
            f"dask-jobqueue SLURMCluster), got {type(client).__name__}; pass client=None to run here."
        )
    if client.status not in ("running", "connecting"):
        raise ValueError(f"{fn}: the dask client is {client.status!r}; pass a running client or client=None.")
    return client


@contextlib.contextmanager
def local_client(n_jobs: int) -> Iterator[Any]:
    """A :class:`distributed.Client` on a new local cluster of ``n_jobs`` single-threaded processes, closed after.

    The workers run without dask's default ``MALLOC_TRIM_THRESHOLD_=65536``: setting it turns off glibc's adaptive
    mmap threshold, so every large temporary array is mapped and unmapped afresh, which made the weight-free
    encoders 1.5 to 1.7 times slower in a worker than in this process (``benchmarks/cohort.py --dask``).
    """
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = LocalCluster(n_workers=int(n_jobs), threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@contextlib.contextmanager
def resolve_client(client: Any, n_jobs: int, *, fn: str) -> Iterator[Any]:
    """The client to run on: the caller's, a local cluster for ``n_jobs > 1``, or ``None`` (this process)."""
    client = check_client(client, fn=fn)
    if client is not None or n_jobs <= 1:
        yield client
        return
    with local_client(n_jobs) as local:
        yield local


def run_tasks(
    client: Any,
    func: Any,
    tasks: Sequence[tuple],
    *,
    weights: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "tasks",
    unit: str = "task",
    on_result: Any = None,
    shared: dict[str, Any] | None = None,
) -> list[Any]:
    """Run ``func(*task, **shared)`` for every task, in order of completion; return the results in task order.

    With a client the tasks are submitted at once (``shared`` values scattered to every worker once), retried
    :data:`RETRIES` times when a worker dies, and gathered as they finish; without one they run here. ``on_result(i,
    result)`` is called as each finishes (e.g. to place a block); the progress bar advances by ``weights[i]``.
    """
    from ._engine._utils import progress_bar

    weights = [1] * len(tasks) if weights is None else list(weights)
    shared = dict(shared or {})
    results: list[Any] = [None] * len(tasks)
    with progress_bar(total=int(sum(weights)), enabled=progress, desc=desc, unit=unit) as bar:
        if client is None:
            for i, task in enumerate(tasks):
                results[i] = func(*task, **shared)
                if on_result is not None:
                    on_result(i, results[i])
                bar.update(weights[i])
            return results
        from distributed import as_completed

        scattered = {k: client.scatter(v, broadcast=True) for k, v in shared.items()}
        futures = [client.submit(func, *task, **scattered, pure=False, retries=RETRIES) for task in tasks]
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            for fut in as_completed(futures, loop=client.loop):  # not the default client: this one
                i = index[fut.key]
                results[i] = fut.result()
                fut.release()
                if on_result is not None:
                    on_result(i, results[i])
                bar.update(weights[i])
        except BaseException:
            client.cancel(futures)
            raise
    return results


def is_lazy(array: Any) -> bool:
    """Whether ``array`` is a dask collection (whose rows a worker can read itself, see :class:`LazyRows`)."""
    return hasattr(array, "__dask_graph__") and not isinstance(array, type)


class LazyRows:
    """Rows ``start:stop`` of a dask array, for a task to read on its worker.

    Holds the task graph of those rows only (culled: it names the chunks they touch, e.g. the zarr arrays of a store
    by path, so a task stays a few kB whatever the size of the whole array); :meth:`read` computes it with the
    synchronous scheduler in the worker, never through the cluster. An opaque object, so that
    :meth:`distributed.Client.submit` sends it as it is rather than computing the collection first.
    """

    def __init__(self, array: Any, start: int, stop: int):
        import dask

        (self.array,) = dask.optimize(array[int(start) : int(stop)])
        self.start, self.stop = int(start), int(stop)

    def read(self) -> Any:
        import numpy as np

        return np.asarray(self.array.compute(scheduler="sync"))

    def __len__(self) -> int:
        return self.stop - self.start


class LazyTake:
    """The rows ``rows`` (any index array) of a dask array, for a task to read on its worker (as :class:`LazyRows`)."""

    def __init__(self, array: Any, rows: Any):
        import dask
        import numpy as np

        self.rows = np.asarray(rows)
        (self.array,) = dask.optimize(array[self.rows])

    def read(self) -> Any:
        import numpy as np

        return np.asarray(self.array.compute(scheduler="sync"))

    def __len__(self) -> int:
        return int(self.rows.size)
