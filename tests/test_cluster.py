"""``nidask.cluster.local_cluster``: process workers started under lean monitoring.

Each test starts a real ``LocalCluster`` of process workers and asks the scheduler,
the nannies and the workers (in their own processes) which settings they run with.
"""

from __future__ import annotations

import os

import dask
import numpy as np
import pytest

import nidask
from nidask.cli.common import scheduler
from nidask.cluster import LEAN_MONITORING, local_cluster


def _worker_monitoring(dask_worker):
    """What a worker runs beside its tasks: (profiler on?, event-loop check in s, pid)."""
    return "profile" in dask_worker.periodic_callbacks, dask_worker._tick_interval, os.getpid()


def _monitoring(cluster, client):
    workers = client.run(_worker_monitoring)
    nannies = [nanny.memory_manager.memory_monitor_interval for nanny in cluster.workers.values()]
    return cluster.scheduler._tick_interval, nannies, list(workers.values())


@pytest.mark.timeout(180)
def test_local_cluster_runs_lean_process_workers_and_keeps_the_global_config():
    from distributed import Client

    before = dask.config.get("distributed.worker.profile.enabled")
    with local_cluster(2, dashboard_address=None) as cluster, Client(cluster) as client:
        tick, nannies, workers = _monitoring(cluster, client)
        assert tick == pytest.approx(0.2)
        assert nannies == [pytest.approx(0.5)] * 2
        assert [(profiled, t) for profiled, t, _ in workers] == [(False, pytest.approx(0.2))] * 2
        pids = {pid for _, _, pid in workers}
        assert len(pids) == 2 and os.getpid() not in pids  # one process per worker
        assert set(client.nthreads().values()) == {1}
        # the settings are the cluster's, not the caller's
        assert dask.config.get("distributed.worker.profile.enabled") == before
        assert dask.config.get("distributed.admin.tick.interval") != "200ms"
        # a worker the nanny restarts comes back lean
        client.restart()
        _, _, restarted = _monitoring(cluster, client)
        assert not {pid for _, _, pid in restarted} & pids
        assert [profiled for profiled, _, _ in restarted] == [False, False]


@pytest.mark.timeout(120)
def test_local_cluster_without_lean_monitoring_has_distributed_defaults():
    from distributed import Client

    with local_cluster(1, lean_monitoring=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            tick, nannies, workers = _monitoring(cluster, client)
    default_tick = dask.utils.parse_timedelta(dask.config.get("distributed.admin.tick.interval"))
    assert default_tick != pytest.approx(0.2)
    assert tick == pytest.approx(default_tick)
    assert workers[0][0] is True  # the statistical profiler runs
    assert nannies[0] != pytest.approx(0.5)
    assert LEAN_MONITORING["distributed.worker.profile.enabled"] is False


@pytest.mark.timeout(180)
def test_cli_local_scheduler_estimates_on_lean_workers(dwi_phantom, tmp_path):
    dwi = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    threaded = nidask.Estimator(model="average", passes=1).run(dwi, workdir=tmp_path / "t")
    with scheduler("local", 2) as client:
        monitoring = client.run(_worker_monitoring)
        on_cluster = nidask.Estimator(model="average", passes=1).run(
            dwi, client=client, workdir=tmp_path / "c"
        )
    assert [profiled for profiled, _, _ in monitoring.values()] == [False, False]
    np.testing.assert_allclose(on_cluster.motion_affines, threaded.motion_affines, atol=1e-9)
    dwi.close()
