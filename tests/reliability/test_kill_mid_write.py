"""SIGKILL of a process while it writes: no output, inputs intact, leftovers reclaimable.

A child process streams a ~200 MB series (``nidask.validation.phantom.write_series``) into a
sink and is killed with SIGKILL as soon as its temporary output appears.  Nothing
may exist at the final path, the input must be byte-identical, and what the dead
process left — its ``.nidask-tmp-<pid>-...`` output and its ``nidask-cache-<pid>-...``
directory — must be removed by :func:`nidask.io.cache.remove_stale_temporaries` and
:func:`nidask.io.cache.reclaim` (or by the next process creating a cache there), while
the same leftovers of a *live* process are left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from guards import child_env

import nidask
from conftest import checksum_tree
from nidask.io.cache import (
    CACHE_PREFIX,
    TEMP_MARK,
    Cache,
    owner_tag,
    reclaim,
    remove_stale_temporaries,
)
from nidask.validation import phantom

#: 96 x 96 x 64 x 176 int16: 208 MB.
BIG_SHAPE = (96, 96, 64, 176)

WRITER = textwrap.dedent(
    """
    import sys, time
    import dask
    import nidask

    mode, source, output, cache_dir = sys.argv[1:5]

    def slow(block):
        time.sleep(0.005)  # a few seconds in all: the kill lands mid-write
        return block

    config = {"nidask.chunk-size": "2MiB", "nidask.cache-dir": cache_dir,
              "scheduler": "threads", "num_workers": 2}
    with dask.config.set(config):
        ds = nidask.load(source)
        ds.dataobj = ds.dataobj.map_blocks(slow, dtype=ds.dtype)
        if mode == "materialize":
            ds.materialize()
        elif mode == "materialize-path":
            ds.materialize(output)
        elif mode in ("to_nifti", "to_nifti-gz"):
            ds.to_nifti(output)
        elif mode == "to_filename":
            ds.to_filename(output)
        print("finished", flush=True)
    """
)

HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from nidask.io.cache import Cache, temporary_name
    cache = Cache(sys.argv[1])
    temp = temporary_name(os.path.join(sys.argv[2], "live.nii"))
    open(temp, "w").close()
    print(cache.path, temp, flush=True)
    time.sleep(600)
    """
)

_TEXT = {"capture_output": True, "text": True, "check": True}
OUTPUT_NAMES = {
    "materialize": None,
    "materialize-path": "series.npy",
    "to_nifti": "out.nii",
    "to_nifti-gz": "out.nii.gz",
    "to_filename": "out.h5",
}


@pytest.fixture(scope="module")
def big_series(tmp_path_factory):
    """A ~200 MB NIfTI in its own directory, with the directory's checksums."""
    directory = tmp_path_factory.mktemp("big_input")
    path = phantom.write_series(directory / "series.nii", BIG_SHAPE)
    return path, checksum_tree(directory)


def _temporaries(directory, pid=None) -> list[str]:
    mark = TEMP_MARK if pid is None else f"{TEMP_MARK}{pid}-"
    return sorted(n for n in os.listdir(directory) if mark in n)


def _caches(root, pid=None) -> list[str]:
    prefix = CACHE_PREFIX if pid is None else f"{CACHE_PREFIX}{pid}-"
    return sorted(n for n in os.listdir(root) if n.startswith(prefix))


def _writing_started(mode, outdir, cache_root, pid) -> bool:
    """Whether writer ``pid``'s temporary output exists (and, for .nii.gz, a member)."""
    if mode == "materialize":
        caches = [os.path.join(cache_root, c) for c in _caches(cache_root, pid)]
        return any(_temporaries(c, pid) for c in caches)
    temps = _temporaries(outdir, pid)
    if mode == "to_nifti-gz":
        members = [os.path.join(outdir, t) for t in temps if t.endswith(".members")]
        return any(os.listdir(m) for m in members if os.path.isdir(m))
    return bool(temps)


def kill_when_writing(mode, source, outdir, cache_root) -> int:
    """Run the writer, SIGKILL it once it writes, return its pid."""
    output = os.path.join(outdir, OUTPUT_NAMES[mode] or "unused")
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, mode, source, output, str(cache_root)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    try:
        while not _writing_started(mode, outdir, cache_root, child.pid):
            assert child.poll() is None, f"writer ended first: {child.communicate()}"
            assert time.monotonic() < deadline, "writer never started writing"
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        out, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, (child.returncode, out, err)
    assert b"finished" not in out
    return child.pid


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", list(OUTPUT_NAMES))
def test_sigkill_mid_write_leaves_nothing_final(big_series, tmp_path, mode):
    source, sums = big_series
    outdir, cache_root = tmp_path / "out", tmp_path / "cache"
    outdir.mkdir()
    cache_root.mkdir()
    # a live process holding a cache and a temporary output in the same places
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(cache_root), str(outdir)],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        live_cache, live_temp = holder.stdout.readline().split()
        pid = kill_when_writing(mode, source, outdir, cache_root)

        # no file at the final path; the input is byte-identical
        if OUTPUT_NAMES[mode]:
            assert not (outdir / OUTPUT_NAMES[mode]).exists()
            assert not (outdir / "out.bval").exists()
        assert checksum_tree(os.path.dirname(source)) == sums
        # what the dead writer left is marked with its pid
        leftovers = _temporaries(outdir, pid)
        dead_caches = _caches(cache_root, pid)
        if mode == "materialize":
            assert len(dead_caches) == 1 and _temporaries(cache_root / dead_caches[0])
        else:
            assert leftovers

        removed = remove_stale_temporaries(outdir)
        assert sorted(os.path.basename(p) for p in removed) == leftovers
        assert [os.path.basename(p) for p in reclaim(cache_root)] == dead_caches
        # the live process's cache and temporary output are untouched
        assert os.path.isdir(live_cache) and os.path.exists(live_temp)
        assert os.listdir(outdir) == [os.path.basename(live_temp)]
        assert _caches(cache_root) == [os.path.basename(live_cache)]
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone, its leftovers are stale too
    assert remove_stale_temporaries(outdir) == [live_temp]
    assert reclaim(cache_root) == [live_cache]
    assert os.listdir(outdir) == [] and os.listdir(cache_root) == []
    assert checksum_tree(os.path.dirname(source)) == sums


@pytest.mark.timeout(120)
def test_next_cache_reclaims_a_killed_process(big_series, tmp_path):
    """Creating a cache under a root reclaims the dead processes' caches there (once)."""
    source, sums = big_series
    cache_root = tmp_path / "cache"
    cache_root.mkdir()
    pid = kill_when_writing("materialize", source, tmp_path, cache_root)
    assert len(_caches(cache_root, pid)) == 1
    mine = Cache(cache_root)
    try:
        created = os.path.basename(mine.path)  # creating it reclaims the root first
        assert _caches(cache_root) == [created]
        assert _caches(cache_root, os.getpid())
    finally:
        mine.close()
    assert _caches(cache_root) == []
    assert checksum_tree(os.path.dirname(source)) == sums


@pytest.mark.timeout(120)
def test_estimator_removes_temporaries_of_dead_writers(dwi_phantom, tmp_path):
    """A run directory holding a killed attempt's (or lost worker's) temporaries is cleaned."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **_TEXT)
    dead_pid = int(dead.stdout)
    workdir = tmp_path / "run"
    (workdir / "pass-1").mkdir(parents=True)
    stale = [
        workdir / f".data.npy{TEMP_MARK}{owner_tag(dead_pid)}-0123456789ab",
        workdir / "pass-1" / f".fold-00003.npy{TEMP_MARK}{owner_tag(dead_pid)}-0123456789ab",
    ]
    live = workdir / f".notes.txt{TEMP_MARK}{owner_tag()}-0123456789ab"  # this process's
    for path in [*stale, live]:
        path.write_bytes(b"partial")
    with nidask.load(dwi_phantom.image, **dwi_phantom.companions) as dwi:
        estimator = nidask.Estimator(model="average", registration="rigid", passes=1)
        result = estimator.run(dwi, workdir=workdir)
    assert result.motion_affines.shape == (len(result), 4, 4)
    assert not any(path.exists() for path in stale)
    assert live.exists()
