"""A local ``distributed`` cluster for estimation: one single-threaded process per core.

An estimator's fold task keeps one core busy for seconds.  Beside it, on every
worker, ``distributed`` runs its own monitoring in the worker's event loop: the
statistical profiler samples the task's stack every 10 ms, every server checks its
event loop every 20 ms, and each nanny (in the client's process) reads its worker's
memory every 100 ms.  On this project's 2-core machine that took 0.08-0.09 core per
worker and 0.06 in the client's process, and 0.01-0.02 and 0.02 with
:data:`LEAN_MONITORING` (docs/cluster.md, "Monitoring costs cores").  Where every
core runs a worker, those cores are taken from the tasks.

:func:`local_cluster` starts the cluster with :data:`LEAN_MONITORING`, which keeps
every safeguard (memory limits, heartbeats, the dashboard) but samples less often and
drops the per-task profile (the dashboard's "Profile" page stays empty).
"""

from __future__ import annotations

import os

import dask

#: ``distributed`` settings that :func:`local_cluster` applies to its scheduler,
#: nannies and workers (defaults in brackets): no statistical profile of the tasks
#: (on, every 10 ms), event-loop checks every 200 ms (20 ms), the nanny's memory
#: reading every 500 ms (100 ms) and system metrics every 2 s (500 ms).
LEAN_MONITORING: dict[str, object] = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "200ms",
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
}


def local_cluster(n_workers: int | None = None, *, lean_monitoring: bool = True, **options):
    """Start a ``distributed.LocalCluster`` suited to nidask's CPU-bound tasks.

    One worker process per core, one thread each (the numpy/scipy parts that hold
    the GIL do not share a process), started under :data:`LEAN_MONITORING`.  The
    settings are captured by the scheduler and the nannies when they start, so a
    worker that a nanny restarts keeps them; dask's global configuration is left as
    it was.

    Parameters
    ----------
    n_workers : int, optional
        Worker processes (default: one per core, ``os.cpu_count()``).
    lean_monitoring : bool, default True
        Apply :data:`LEAN_MONITORING`; ``False`` gives ``distributed``'s defaults.
    **options
        Passed to ``distributed.LocalCluster`` (e.g. ``memory_limit``,
        ``dashboard_address``); they override ``threads_per_worker=1`` and
        ``processes=True``.

    Returns
    -------
    distributed.LocalCluster
        Close it (or use it as a context manager) when done.

    Examples
    --------
    >>> from distributed import Client
    >>> with local_cluster(2) as cluster, Client(cluster) as client:  # doctest: +SKIP
    ...     estimate = nidask.Estimator().run(dwi, client=client)
    """
    from distributed import LocalCluster

    settings = {
        "n_workers": n_workers or os.cpu_count() or 1,
        "threads_per_worker": 1,
        "processes": True,
        **options,
    }
    if not lean_monitoring:
        return LocalCluster(**settings)
    with dask.config.set(LEAN_MONITORING):
        if settings["processes"]:
            # a nanny holds the global "distributed" settings by reference: a worker it
            # restarts after this block would start with the caller's; give it a copy
            own = {"distributed": dask.config.get("distributed")}
            settings["config"] = dask.config.merge(own, settings.get("config") or {})
        return LocalCluster(**settings)
