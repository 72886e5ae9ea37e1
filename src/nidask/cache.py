"""Owned cache directories and atomic outputs.

A :class:`Cache` is one directory that nidask creates for a lineage of datasets
(a dataset and everything derived from it).  It is created on first use under
``nidask.cache-dir`` and removed on :meth:`Cache.close`, when the last object
holding it is garbage-collected, or at interpreter exit.  A copy that travels to a
worker (pickling) only *borrows* the directory and never removes it.

:func:`atomic_output` writes a user-named file under a temporary name in its
destination directory and renames it into place only once it is complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

from .config import cache_root
from .errors import OutputError

CACHE_PREFIX = "nidask-cache-"
TEMP_MARK = ".nidask-tmp-"


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


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
                self._path = tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-", dir=root)
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
    """A hidden temporary name beside ``path`` (same directory, so rename is atomic)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{TEMP_MARK}{uuid.uuid4().hex[:12]}")


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
        _discard(temps)
        if isinstance(exc, OutputError):
            raise
        raise OutputError(_describe(exc), finals[0]) from exc
    except BaseException:
        _discard(temps)
        raise


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()
) -> Iterator[str]:
    """Write one file atomically (see :func:`atomic_outputs`)."""
    with atomic_outputs([path], inputs) as (temp,):
        yield temp


def _discard(paths: Iterable[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
