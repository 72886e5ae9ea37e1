"""Low-level file access: positional writes, pre-sized files, JSON sidecars."""

from __future__ import annotations

import json
import os

from nidask.errors import InputError


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


def check_readable(path: str | os.PathLike) -> str:
    """Return ``path`` as an absolute string; raise if it is missing or unreadable."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise InputError("file not found", path)
    if os.path.isdir(path):
        raise InputError("is a directory, not a file", path)
    if not os.access(path, os.R_OK):
        raise InputError("file is not readable (permission denied)", path)
    return path


def read_json_object(path) -> dict:
    """A JSON file's content, which must be an object; else an error naming the file."""
    path = check_readable(path)
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"not a valid JSON file ({exc})", path) from exc
    if not isinstance(content, dict):
        raise InputError("a JSON sidecar must hold an object", path)
    return content
