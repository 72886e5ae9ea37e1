"""nidask's settings, kept in dask's configuration under the ``nidask`` key.

``nidask.chunk-size``
    Bytes of data per chunk (whole volumes; at least one volume per chunk).
    Peak memory of every streamed operation follows this budget.
``nidask.cache-dir``
    Directory under which owned caches are created (default: the system temp dir).
``nidask.b0-threshold``
    Diffusion volumes with a b-value at or below this (s/mm², default 50, as dipy
    and nifreeze) are b=0 volumes.
``nidask.kernels``
    ``"auto"`` (default): resample with the compiled kernels of :mod:`nidask.ops.kernels`
    where numba is installed; ``"scipy"``: always with ``scipy.ndimage``.

Set them like any dask setting::

    with dask.config.set({"nidask.chunk-size": "32MiB"}):
        ds = nidask.load("dwi.h5")
"""

from __future__ import annotations

import math
import tempfile

import dask
import numpy as np
from dask.utils import parse_bytes

#: Default b-value (s/mm²) at or below which a diffusion volume counts as a b=0.
B0_THRESHOLD = 50.0
DEFAULTS = {
    "nidask": {
        "chunk-size": "64MiB",
        "cache-dir": None,
        "kernels": "auto",
        "b0-threshold": B0_THRESHOLD,
    }
}
dask.config.update_defaults(DEFAULTS)


def chunk_bytes() -> int:
    """Return the chunk budget in bytes (``nidask.chunk-size``)."""
    value = dask.config.get("nidask.chunk-size")
    size = parse_bytes(value) if isinstance(value, str) else int(value)
    if size <= 0:
        raise ValueError(f"nidask.chunk-size must be positive, got {value!r}")
    return size


def b0_threshold() -> float:
    """b-value (s/mm²) at or below which a diffusion volume is a b=0 (``nidask.b0-threshold``)."""
    value = float(dask.config.get("nidask.b0-threshold", B0_THRESHOLD))
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"nidask.b0-threshold must be a non-negative number, got {value!r}")
    return value


def cache_root() -> str:
    """Return the directory under which owned caches are created."""
    return dask.config.get("nidask.cache-dir") or tempfile.gettempdir()


def volumes_per_chunk(shape3d, dtype, budget: int | None = None) -> int:
    """Number of whole volumes that fit in the chunk budget (at least one).

    >>> volumes_per_chunk((10, 10, 10), "int16", budget=10_000)
    5
    """
    volume_bytes = math.prod(shape3d) * np.dtype(dtype).itemsize
    budget = chunk_bytes() if budget is None else budget
    return max(1, budget // max(volume_bytes, 1))


def volume_chunks(n_volumes: int, per_chunk: int) -> tuple[int, ...]:
    """Chunk sizes along the volume axis for ``n_volumes`` in blocks of ``per_chunk``.

    >>> volume_chunks(7, 3)
    (3, 3, 1)
    """
    full, rest = divmod(n_volumes, per_chunk)
    return (per_chunk,) * full + ((rest,) if rest else ())
