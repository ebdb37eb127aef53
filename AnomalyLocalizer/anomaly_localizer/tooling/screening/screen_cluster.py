"""Screening on Dask distributed: a local cluster of worker processes, or an existing
cluster by its scheduler address (e.g. started with ``dask scheduler`` / ``dask worker``,
dask-jobqueue on SLURM or PBS, or dask-kubernetes), so the scheduling, retries and
monitoring are Dask's and not a scheduler of our own.

Each scan is one task (:func:`.screen.screen_one`); results come back as they finish and
the caller records them. Ctrl-C cancels the tasks not yet finished and shuts the local
cluster down.
"""

from __future__ import annotations

import logging
import signal
from typing import Callable

from ...core.worklist import FAILED, Row
from ...errors import InputError

# A task whose worker dies (e.g. killed for memory) is retried on another worker this many
# times before its scan is recorded as failed.
ALLOWED_FAILURES = 1


def _client(workers: int, address: str | None):
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError("screening on several workers needs Dask distributed (pip install 'distributed'); "
                         "or pass --workers 1 to screen in this process") from None
    import dask
    # Dask sets MALLOC_TRIM_THRESHOLD_ in its workers, to return memory to the system sooner.
    # Setting it turns off glibc's adaptive mmap threshold: every large numpy/torch array is
    # then mapped, page-faulted and unmapped afresh, and the workers spent most of their time
    # in the kernel. Screening workers keep glibc's default.
    dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                     "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # Dask's own INFO lines, unless -v
        for name in ("distributed", "tornado", "asyncio"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if address:
        try:
            return Client(address, timeout="20s"), None
        except (OSError, TimeoutError, ValueError, TypeError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {address} ({exc}); check the address "
                             "(e.g. tcp://host:8786) and that the scheduler is running") from None
    # Ctrl-C in a terminal reaches every process of its group. The worker processes inherit an
    # ignored SIGINT (Python keeps an inherited SIG_IGN), so only this process stops, cancels
    # the tasks and shuts the workers down, without a traceback from each of them.
    previous = None
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to set
        pass
    try:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return Client(cluster), cluster


def connect(address: str):
    """A client of the existing Dask cluster at ``address``, refused in one line when the
    address is not one or nothing answers there: called before a worklist folder is made."""
    return _client(0, address)


def run_on_dask(task: Callable[..., Row], jobs: list, out: str, options, finished: Callable[[Row], None],
                workers: int, threads: int | None, address: str | None = None,
                say: Callable[[str], None] | None = None, client=None) -> None:
    """Run ``task(scan, key, out, options, redo)`` for ``jobs`` ((scan, key, redo)
    triples) as Dask tasks; call ``finished`` with each row as it comes back. ``threads``:
    the torch threads of each scan (None: the worker machine's cores over its task slots),
    set once in each worker process before any task (:func:`worker_threads`).
    ``client``: one already connected (:func:`connect`), closed here."""
    from distributed import as_completed

    client, cluster = (client, None) if client is not None else _client(workers, address)
    futures = []
    try:
        n = len(client.scheduler_info()["workers"])
        if say:
            say(f"screening on {'the Dask cluster at ' + address if address else 'a local Dask cluster'} "
                f"({n} worker{'s' * (n != 1)})")
        client.run(worker_threads, threads)
        by_future = {}
        for scan, key, redo in jobs:
            f = client.submit(task, scan, key, out, options, redo, key=f"screen-{scan.id}-{key[:12]}",
                              pure=False)
            by_future[f.key] = (scan, key)
            futures.append(f)
        for f in as_completed(futures):
            scan, key = by_future[f.key]
            try:
                row = f.result()
            except Exception as exc:  # the worker died or the task could not run: this scan only
                row = Row(scan.id, scan.path, FAILED, series=scan.series, mask=scan.mask, sha256=key,
                          error=f"the worker screening it stopped ({type(exc).__name__}: {str(exc)[:160]}); "
                                "too little memory? Rerun with fewer --workers")
            finished(row)
    finally:
        if futures:
            client.cancel(futures)
        client.close()
        if cluster is not None:
            cluster.close()


def worker_threads(threads: int | None, dask_worker=None) -> int:
    """Run in each Dask worker process once, as its start: torch's threads for the scans it
    runs at once to share its machine's cores (``threads``, else the cores over its task slots)."""
    import os

    from ...core.device import configure_threads
    if threads is None:
        slots = getattr(getattr(dask_worker, "state", None), "nthreads", None) or getattr(dask_worker, "nthreads", 1)
        threads = max(1, (os.cpu_count() or 1) // max(1, int(slots or 1)))
    return configure_threads(threads)
