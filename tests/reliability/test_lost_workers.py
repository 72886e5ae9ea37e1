"""A worker process killed mid-job: the job completes with the clean run's results.

On a process-based ``LocalCluster`` (2 workers, 1 thread each, nannies restart lost
workers) one worker is SIGKILLed while it runs a task of ``materialize``,
``to_nifti`` (``.nii`` and ``.nii.gz``) or ``Estimator.run``.  dask reschedules the
lost tasks; nidask's tasks are idempotent (blocks written at fixed offsets, gzip
members and fold records renamed into place), so the outputs must be byte-identical
to a run without the kill.  Slow blocks (a ``map_blocks`` sleep) make sure the kill
lands mid-run.
"""

from __future__ import annotations

import filecmp
import os
import signal
import sys
import threading
import time

import cloudpickle
import dask
import nibabel as nb
import numpy as np
import pytest

import nidask
from nidask.estimation.registration import get_registration
from nidask.io.cache import TEMP_MARK

# tasks defined here travel by value: workers need not import this test module
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: Seconds each block of the slowed series takes.
BLOCK_DELAY = 0.3


@pytest.fixture(scope="module")
def cluster():
    """A client on its own cluster: killing its workers disturbs no other test.

    ``SpecCluster`` closes a lost worker's nanny if, ``lost-worker-timeout`` (15 s)
    after the loss, no worker of that name is registered.  A worker killed twice
    within that time (one test, then the next) can be down, mid-restart, when the
    first kill's timer fires: its nanny is closed and the cluster stays at one worker.
    The tests kill workers on purpose, so the timeout outlives the module.
    """
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}):
        local = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(local, set_as_default=False)
        yield client
        client.close()
        local.close()


def slowly(block, markers):
    """Identity on a block, after a pause; leaves a marker file once started."""
    open(os.path.join(markers, f"{os.getpid()}-{time.monotonic_ns()}"), "w").close()
    time.sleep(BLOCK_DELAY)
    return block


def slowed(dataset, markers):
    """``dataset`` whose every block takes ``BLOCK_DELAY`` seconds (same values)."""
    data = dataset.dataobj.map_blocks(slowly, markers, dtype=dataset.dtype)
    dataset.dataobj = data
    return dataset


class Killer(threading.Thread):
    """Kills one busy worker (SIGKILL) once ``ready()`` holds."""

    def __init__(self, client, ready, timeout: float = 60.0):
        super().__init__(daemon=True)
        self.client, self.ready, self.timeout = client, ready, timeout
        self.pids = client.run(os.getpid)  # worker address -> pid
        self.killed: int | None = None
        self.when = float("inf")

    def run(self):
        deadline = time.monotonic() + self.timeout
        while not self.ready():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        busy = [a for a, keys in self.client.processing().items() if keys and a in self.pids]
        address = busy[0] if busy else next(iter(self.pids))
        self.killed = self.pids[address]
        os.kill(self.killed, signal.SIGKILL)
        self.when = time.monotonic()


class SlowRegistration:
    """Rigid registration after a pause, so that folds take a while."""

    def __init__(self, delay: float):
        self.delay = delay
        self.inner = get_registration("rigid")

    def __call__(self, fixed, moving, affine, mask=None, init=None):
        time.sleep(self.delay)
        return self.inner(fixed, moving, affine, mask=mask, init=init)

    def __repr__(self) -> str:
        return f"SlowRegistration({self.delay})"


def run_with_a_kill(client, job, ready):
    """Run ``job()`` on ``client`` while a worker is killed; return its result.

    The client is made current with ``as_current``, not ``dask.config.set(scheduler=
    client)``: distributed passes the global config to the processes it starts, and a
    Client in it makes the nanny's restart of the lost worker fail.
    """
    client.wait_for_workers(2, timeout=60)
    killer = Killer(client, ready)
    killer.start()
    with client.as_current(), dask.config.set(scheduler=None):
        result = job()
    finished = time.monotonic()
    killer.join()
    assert killer.when < finished, "the job finished before a worker could be killed"
    # the nanny replaced the lost worker: the cluster is whole again
    client.wait_for_workers(2, timeout=60)
    assert killer.killed not in client.run(os.getpid).values()
    return result


def _count(directory) -> int:
    return len(os.listdir(directory))


@pytest.fixture
def series(tmp_path, dwi_phantom):
    """The DWI phantom as a plain series, one volume per chunk (10 tasks)."""
    with dask.config.set({"nidask.chunk-size": 8000}):
        return nidask.load(dwi_phantom.image)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sink", ["materialize", "out.nii", "out.nii.gz"])
def test_worker_killed_during_write(cluster, series, tmp_path, sink, inputs_unchanged):
    inputs_unchanged(os.path.dirname(series.inputs[0]))
    clean_dir, killed_dir, markers = tmp_path / "clean", tmp_path / "killed", tmp_path / "m"
    for directory in (clean_dir, killed_dir, markers):
        directory.mkdir()
    name = "series.npy" if sink == "materialize" else sink

    def write(dataset, directory):
        if sink == "materialize":
            return dataset.materialize(directory / name)
        return dataset.to_nifti(directory / name)

    write(series, clean_dir)  # the reference: threads, no kill
    slow = slowed(series, os.fspath(markers))
    run_with_a_kill(cluster, lambda: write(slow, killed_dir), lambda: _count(markers) >= 3)
    assert filecmp.cmp(clean_dir / name, killed_dir / name, shallow=False)
    assert not [n for n in os.listdir(killed_dir) if TEMP_MARK in n]
    if sink != "materialize":
        expected = np.asanyarray(nb.load(clean_dir / name).dataobj)
        np.testing.assert_array_equal(np.asanyarray(nb.load(killed_dir / name).dataobj), expected)
    series.close()


@pytest.mark.timeout(180)
def test_worker_killed_during_estimation(cluster, dwi_phantom, tmp_path):
    dwi = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    clean = nidask.Estimator(model="average", registration="rigid", passes=1).run(
        dwi, client=cluster, workdir=tmp_path / "clean"
    )
    slow = nidask.Estimator(model="average", registration=SlowRegistration(0.3), passes=1)
    folds = tmp_path / "killed" / "pass-1"

    def some_folds_recorded():
        return folds.is_dir() and len([n for n in os.listdir(folds) if n.startswith("fold")]) >= 2

    result = run_with_a_kill(
        cluster,
        lambda: slow.run(dwi, client=cluster, workdir=tmp_path / "killed"),
        some_folds_recorded,
    )
    np.testing.assert_array_equal(result.motion_affines, clean.motion_affines)
    # no temporary record of the lost worker is left in the run directory
    for directory, _, files in os.walk(tmp_path / "killed"):
        assert not [n for n in files if TEMP_MARK in n], directory
    dwi.close()
