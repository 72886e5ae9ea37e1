"""Owned cache directories and atomic outputs.

A :class:`Cache` is one directory that nidask creates for a lineage of datasets
(a dataset and everything derived from it).  It is created on first use under
``nidask.cache-dir`` and removed on :meth:`Cache.close`, when the last object
holding it is garbage-collected, or at interpreter exit.  A copy that travels to a
worker (pickling) only *borrows* the directory and never removes it.

:func:`atomic_output` writes a user-named file under a temporary name in its
destination directory and renames it into place only once it is complete.

Both carry their writer's identity in their names — ``nidask-cache-<pid>-<host>-...``
and ``.<name>.nidask-tmp-<pid>-<host>-...`` — so what a killed process left behind
can be told from what a live one is using: :func:`reclaim` removes the cache
directories, :func:`remove_stale_temporaries` the temporary outputs, of processes of
this host that no longer run.  The first cache a process creates under a root
reclaims that root (one directory listing).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import socket
import tempfile
import uuid
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

from nidask.config import cache_root
from nidask.errors import OutputError

CACHE_PREFIX = "nidask-cache-"
TEMP_MARK = ".nidask-tmp-"


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


@functools.cache
def host_tag() -> str:
    """Eight hex digits naming this host in cache and temporary names.

    A pid only identifies a process on its own host: on a scratch directory shared
    by several nodes, names of other hosts are never judged (nor removed).
    """
    return hashlib.blake2s(socket.gethostname().encode(), digest_size=4).hexdigest()


def owner_tag(pid: int | None = None) -> str:
    """``<pid>-<host>``: the writer part of cache and temporary names."""
    return f"{os.getpid() if pid is None else pid}-{host_tag()}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not; unknown counts as alive)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    try:  # exited but not yet reaped by its parent: state Z (or X)
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _writer_gone(owner: str) -> bool:
    """Whether ``owner`` (``<pid>-<host>-...``) names a process of this host that has ended."""
    pid, _, rest = owner.partition("-")
    host = rest.partition("-")[0]
    return pid.isdigit() and host == host_tag() and not process_alive(int(pid))


def reclaim(root: str | os.PathLike | None = None) -> list[str]:
    """Remove the cache directories that processes of this host left behind.

    A directory ``nidask-cache-<pid>-<host>-*`` under ``root`` is removed when
    ``<host>`` is this host and process ``<pid>`` no longer runs (killed, crashed,
    or ended without running its exit handlers).  Caches of live processes, of
    other hosts and of unknown owners are left alone, so this is safe to call while
    other nidask processes use the same root.

    Parameters
    ----------
    root : path-like, optional
        The cache root; default ``nidask.cache-dir`` (or the system temp dir).

    Returns
    -------
    list of str
        The directories removed.
    """
    root = os.fspath(root) if root is not None else cache_root()
    try:
        names = os.listdir(root)
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(root, name)
        if not name.startswith(CACHE_PREFIX) or not _writer_gone(name[len(CACHE_PREFIX) :]):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            _remove_tree(path)
            if not os.path.exists(path):
                removed.append(path)
    return removed


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Remove temporary outputs whose writer (a process of this host) has ended.

    An atomic write that is killed leaves its ``.<name>.nidask-tmp-<pid>-<host>-*``
    file (or directory) beside the output it never completed.  Only such names
    whose process no longer runs are removed; a write in progress is left alone.

    Parameters
    ----------
    directory : path-like
        An output directory (not searched recursively).

    Returns
    -------
    list of str
        The paths removed.
    """
    directory = os.fspath(directory)
    removed = []
    for name in os.listdir(directory):
        if TEMP_MARK not in name:
            continue
        if not _writer_gone(name[name.rindex(TEMP_MARK) + len(TEMP_MARK) :]):
            continue
        path = os.path.join(directory, name)
        discard([path])
        if not os.path.lexists(path):
            removed.append(path)
    return removed


_RECLAIMED_ROOTS: set[str] = set()


def _reclaim_once(root: str) -> None:
    """:func:`reclaim` ``root`` the first time this process creates a cache there."""
    key = os.path.abspath(root)
    if key not in _RECLAIMED_ROOTS:
        _RECLAIMED_ROOTS.add(key)
        reclaim(key)


class Cache:
    """A directory owned by nidask, removed when no longer used.

    Parameters
    ----------
    root : str, optional
        Parent directory; defaults to ``nidask.cache-dir`` or the system temp dir.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self._root = os.fspath(root) if root is not None else None
        self._path: str | None = None
        self._finalizer: weakref.finalize | None = None
        self._owner = True

    @property
    def path(self) -> str:
        """The cache directory, created on first access."""
        if self._path is None:
            root = self._root or cache_root()
            try:
                os.makedirs(root, exist_ok=True)
                _reclaim_once(root)
                self._path = tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{owner_tag()}-", dir=root)
            except OSError as exc:
                raise OutputError(
                    f"cannot create a cache directory: {exc.strerror}", root
                ) from exc
            self._finalizer = weakref.finalize(self, _remove_tree, self._path)
        return self._path

    @property
    def exists(self) -> bool:
        """Whether the directory has been created and not yet removed."""
        return self._path is not None and os.path.isdir(self._path)

    def new_path(self, suffix: str = "", stem: str = "data") -> str:
        """Return a fresh, unused file name inside the cache."""
        return os.path.join(self.path, f"{stem}-{uuid.uuid4().hex[:12]}{suffix}")

    def owns(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` lies inside this cache directory."""
        if self._path is None:
            return False
        return Path(os.path.abspath(path)).is_relative_to(self._path)

    def close(self) -> None:
        """Remove the directory and everything in it (owned caches only)."""
        if self._finalizer is not None and self._owner:
            self._finalizer()

    def __getstate__(self):
        return {"_root": self._root, "_path": self._path}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._finalizer = None
        self._owner = False

    def __repr__(self) -> str:
        return f"Cache({self._path or 'not created'})"


def _check_destination(path: str, inputs: Iterable[str]) -> None:
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise OutputError("output directory is not a directory", directory)
        raise OutputError("output directory does not exist", directory)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError("output directory is not writable", directory)
    if os.path.isdir(path):
        raise OutputError("output path is a directory", path)
    for source in inputs:
        same = source == path or (
            os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source)
        )
        if same:
            raise OutputError("output path is one of the dataset's input files", path)


def temporary_name(path: str) -> str:
    """A hidden temporary name beside ``path`` (same directory, so rename is atomic).

    ``.<name>.nidask-tmp-<pid>-<host>-<random>``: the writer's identity lets
    :func:`remove_stale_temporaries` tell a killed write from one in progress.
    """
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{TEMP_MARK}{owner_tag()}-{uuid.uuid4().hex[:12]}")


def final_name(path: str) -> str:
    """The file name a :func:`temporary_name` stands for (for messages).

    >>> final_name(temporary_name("/data/out.nii.gz"))
    'out.nii.gz'
    """
    name = os.path.basename(path)
    if name.startswith(".") and TEMP_MARK in name:
        return name[1 : name.rindex(TEMP_MARK)]
    return name


def _describe(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full while writing"
    if exc.errno == errno.EFBIG:
        return "file size limit exceeded while writing (disk full)"
    return f"write failed: {exc.strerror or exc}"


@contextlib.contextmanager
def atomic_outputs(
    paths: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike | None] = ()
) -> Iterator[list[str]]:
    """Write several files atomically: all appear together or none does.

    Yields one temporary path per requested path; on success each is renamed to
    its final name, on any error all of them are removed and the error re-raised
    (``OSError`` as :class:`~nidask.errors.OutputError` naming the file).

    Parameters
    ----------
    paths : iterable of path-like
        Final output names.
    inputs : iterable of path-like
        Files the outputs must not replace (the dataset's inputs).
    """
    finals = [os.path.abspath(os.fspath(p)) for p in paths]
    sources = [os.path.abspath(os.fspath(s)) for s in inputs if s]
    for final in finals:
        _check_destination(final, sources)
    temps = [temporary_name(final) for final in finals]
    try:
        yield temps
        for temp, final in zip(temps, finals, strict=True):
            os.replace(temp, final)
    except OSError as exc:
        discard(temps)
        if isinstance(exc, OutputError):
            raise
        raise OutputError(_describe(exc), finals[0]) from exc
    except BaseException:
        discard(temps)
        raise


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()
) -> Iterator[str]:
    """Write one file atomically (see :func:`atomic_outputs`)."""
    with atomic_outputs([path], inputs) as (temp,):
        yield temp


def save_array(path: str | os.PathLike, array) -> None:
    """``numpy.save`` of ``array`` to ``path`` atomically (see :func:`atomic_output`)."""
    import numpy as np

    with atomic_output(path) as temp, open(temp, "wb") as f:
        np.save(f, array)


def discard(paths: Iterable[str]) -> None:
    """Remove these files or directories, those that exist."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
