"""Compute dask collections with an optional progress display.

Local schedulers get :class:`dask.diagnostics.ProgressBar`; under an active
``distributed.Client`` (where that bar shows nothing) ``distributed.progress``
is used instead.  ``progress=None`` follows the ``nidask.progress`` config key
(default off, so library calls stay quiet).
"""

from __future__ import annotations

import contextlib
import sys

import dask

dask.config.update_defaults({"nidask": {"progress": False}})


def active_client():
    """The current ``distributed.Client`` or ``None``."""
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()
    except ValueError:
        return None


def compute(*collections, label: str = "computing", progress: bool | None = None):
    """``dask.compute`` with a progress display when asked for.

    Parameters
    ----------
    *collections
        Dask collections.
    label : str
        Shown before the bar.
    progress : bool, optional
        Show progress; default from ``nidask.progress``.
    """
    if progress is None:
        progress = bool(dask.config.get("nidask.progress"))
    if not progress:
        return dask.compute(*collections)
    client = active_client()
    if client is not None:
        from distributed import progress as distributed_progress

        futures = client.compute(list(collections))
        print(label, file=sys.stderr)
        distributed_progress(futures)
        return tuple(f.result() for f in futures)
    from dask.diagnostics import ProgressBar

    print(label, file=sys.stderr)
    with ProgressBar(out=sys.stderr) if sys.stderr else contextlib.nullcontext():
        return dask.compute(*collections)
