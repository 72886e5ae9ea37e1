"""One entry point for every supported file: :func:`load`."""

from __future__ import annotations

import os

import h5py
import numpy as np

from nidask import dmri, pet
from nidask.dataset import BaseDataset
from nidask.errors import InputError
from nidask.io.cache import Cache
from nidask.io.nfdh5 import read_nfdh5
from nidask.io.sources import check_readable, open_source

GRADIENT_KEYS = {"bvec_file", "bval_file", "gradients_file", "b0_file"}


def load(path, **kwargs) -> BaseDataset:
    """Open a series lazily.

    NFDH5 files become the dataset type their ``Type`` attribute names.  NIfTI
    (and ``.npy``) files become a :class:`~nidask.BaseDataset`, or a
    :class:`~nidask.DWI` when gradient files are given (``bvec_file``,
    ``bval_file``, ``gradients_file``, ``b0_file``), or a :class:`~nidask.PET`
    with a ``temporal_file``.  ``brainmask_file`` is accepted for all.

    Parameters
    ----------
    path : path-like
        The file to open.
    **kwargs
        Companion files, as above.
    """
    path = check_readable(path)
    if h5py.is_hdf5(path):
        if kwargs:
            raise InputError(f"unexpected arguments for an NFDH5 file: {sorted(kwargs)}", path)
        return read_nfdh5(path)
    if GRADIENT_KEYS & kwargs.keys():
        return dmri.from_nii(path, **kwargs)
    if "temporal_file" in kwargs:
        return pet.from_nii(path, **kwargs)
    unknown = set(kwargs) - {"brainmask_file"}
    if unknown:
        raise InputError(f"unexpected arguments: {sorted(unknown)}", path)
    cache = Cache()
    source = open_source(path, cache=cache)
    mask = None
    inputs = [path]
    if kwargs.get("brainmask_file") is not None:
        mask = dmri.load_mask(kwargs["brainmask_file"], source.shape[:3])
        inputs.append(os.path.abspath(kwargs["brainmask_file"]))
    return BaseDataset(
        dataobj=source.to_dask(),
        affine=getattr(source, "affine", np.eye(4)),
        brainmask=mask,
        datahdr=getattr(source, "header", None),
        cache=cache,
        inputs=tuple(inputs),
    )
