"""Low-level file writes: positional writes and pre-sized files."""

from __future__ import annotations

import os


def pwrite_all(fd: int, buffer, offset: int) -> None:
    """Write all of ``buffer`` at byte ``offset`` of the open file ``fd``."""
    view = memoryview(buffer).cast("B")
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def presize(path: str, nbytes: int) -> None:
    """Extend ``path`` to ``nbytes`` (sparse), failing early when the disk is full."""
    with open(path, "r+b") as f:
        f.truncate(nbytes)
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as exc:
            if exc.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: filesystem can't
                raise


def reserve(path: str, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` allocated: fail now if they will not fit on disk.

    For writers (HDF5) that cannot recover from a full disk part-way through.
    The space is only checked, not kept: the writer may truncate the file.
    """
    with open(path, "wb"):
        pass
    presize(path, nbytes)
