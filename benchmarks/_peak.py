"""Peak memory of the current process, shared by both benchmark task scripts (stdlib only).

``benchmarks/_nidask_task.py`` and ``benchmarks/peer_nifreeze.py`` run under different
interpreters (nidask's and the nifreeze venv's); both import this file from their own
directory.
"""

from __future__ import annotations

import resource
import sys


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (``VmHWM``, ``RssAnon``...) in MiB; NaN
    where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def maxrss_mb() -> float:
    """Peak RSS of this process in MiB: ``VmHWM`` of /proc/self/status.

    ``ru_maxrss`` is not used on Linux: the kernel carries the parent's peak RSS
    over fork + exec into the child's ``ru_maxrss``, so a child started by a large
    parent reports the parent's peak.  ``VmHWM`` belongs to the address space that
    exec creates, so it starts from zero.
    """
    peak = status_mb("VmHWM")
    if peak == peak:  # not NaN
        return peak
    # elsewhere ru_maxrss is the best there is (KiB on Linux, bytes on macOS)
    scale = 2**20 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def reset_peak() -> bool:
    """Restart ``VmHWM`` from the current RSS (Linux ``clear_refs``); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
