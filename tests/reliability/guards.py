"""Helpers shared by the reliability tests (imported as ``guards``)."""

from __future__ import annotations

import contextlib
import os
import resource

import nidask


def status_bytes(field: str) -> int:
    """A size field of ``/proc/self/status`` (``VmSize``, ``VmRSS``, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def virtual_bytes() -> int:
    """This process's address-space size (``VmSize``)."""
    return status_bytes("VmSize")


@contextlib.contextmanager
def bounded_memory(extra: int = 4 * 2**30):
    """Cap the address space at its current size + ``extra`` inside the block.

    A header that makes the code under test allocate gigabytes then fails with
    ``MemoryError`` (a test failure) instead of driving the machine out of memory.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = virtual_bytes() + extra
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def child_env() -> dict:
    """Environment of a child interpreter that imports this very nidask."""
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(nidask.__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env
