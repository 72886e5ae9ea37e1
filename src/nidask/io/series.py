"""What a 4D file holds, answered once: its source, geometry, header, mask and inputs.

The data model builds its datasets from this answer (:func:`open_series`); NFDH5
files, which carry their own fields, are read by :func:`nidask.io.nfdh5.read_nfdh5`.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from nidask.errors import InputError
from nidask.io.cache import Cache
from nidask.io.sources import open_source


def load_mask(path, shape3d: tuple[int, ...], what: str = "brain mask") -> np.ndarray:
    """Read a 3D mask file (NIfTI, .npy) as bool; its shape must be ``shape3d``."""
    # the cache (where a .nii.gz mask is decompressed) must outlive the read
    with contextlib.closing(Cache()) as cache:
        source = open_source(path, cache=cache)
        if source.shape[:3] != tuple(shape3d) or source.shape[3] != 1:
            raise InputError(
                f"{what} shape {source.shape[:3]} differs from the series {shape3d}", path
            )
        return source[:, :, :, 0:1][..., 0] != 0


def open_series(filename, brainmask_file=None, companions=(), *, cache: Cache | None = None):
    """Open a 4D file lazily: ``(source, fields)`` for a :class:`BaseDataset` (sub)class.

    ``fields`` holds ``dataobj``, ``affine``, ``brainmask`` (read from
    ``brainmask_file``), ``datahdr``, ``cache`` and ``inputs``: the file, the
    ``companions`` it was read with and the mask, which outputs must never replace.
    """
    cache = cache or Cache()
    source = open_source(filename, cache=cache)
    inputs = [source.path, *(os.path.abspath(f) for f in companions if f is not None)]
    mask = None
    if brainmask_file is not None:
        mask = load_mask(brainmask_file, source.shape[:3])
        inputs.append(os.path.abspath(brainmask_file))
    fields = {
        "dataobj": source.to_dask(),
        "affine": getattr(source, "affine", np.eye(4)),
        "brainmask": mask,
        "datahdr": getattr(source, "header", None),
        "cache": cache,
        "inputs": tuple(inputs),
    }
    return source, fields
