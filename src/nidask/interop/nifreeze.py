"""nifreeze 0.1.0's own dataset objects over nidask's volume-contiguous memmaps.

:func:`to_nifreeze` materializes a nidask series (chunk by chunk, within the chunk
budget) and builds nifreeze's ``DWI``, ``PET`` or ``BaseDataset`` whose ``dataobj`` is
that read-only memmap: nifreeze's ``Estimator`` then runs on it unchanged, reading
volumes from the page cache instead of a copy of the series in RAM.  nifreeze is
imported only here (it needs numpy < 2.4, so it usually lives in its own environment).

Conventions handed over:

- DWI: nifreeze holds the diffusion-weighted volumes only, with the b=0 reference in
  ``bzero`` (given b=0 volumes, its constructor would select the others, a copy), and
  ``gradients`` as an (N, 4) table of FSL's numbers (the voxel frame, x negated when the
  affine's determinant is positive) and b-values: the table its ``from_nii`` builds.
- Motion matrices are the same in both (reference RAS mm -> acquired RAS mm), so
  ``motion_affines`` pass through as they are.
"""

from __future__ import annotations

import numpy as np

from nidask.data.base import BaseDataset, by_modality
from nidask.data.dmri import DWI
from nidask.data.pet import PET
from nidask.errors import NidaskError
from nidask.geometry import ras_to_fsl


class NifreezeMissingError(NidaskError, ImportError):
    """nifreeze is not importable in this environment."""


def _nifreeze_data():
    try:
        from nifreeze.data import base, dmri, pet
    except ImportError as exc:
        raise NifreezeMissingError(
            f"nidask.interop.to_nifreeze needs nifreeze 0.1.0 ({exc}); "
            "install it beside nidask (it needs numpy<2.4)"
        ) from exc
    return base, dmri, pet


def _base(dataset, fields, modules):
    return modules[0].BaseDataset(**fields)


def _dwi(dataset: DWI, fields, modules):
    gradients = np.column_stack([ras_to_fsl(dataset.bvecs, dataset.affine), dataset.bvals])
    bzero = None if dataset.bzero is None else np.asarray(dataset.bzero, dtype=np.float32)
    return modules[1].DWI(**fields, gradients=gradients, bzero=bzero)


def _pet(dataset: PET, fields, modules):
    return modules[2].PET(
        **fields,
        midframe=np.asarray(dataset.midframe, dtype=float),
        total_duration=float(dataset.total_duration),
    )


#: Dataset class -> the builder of nifreeze's object (``base``, ``dmri``, ``pet`` modules).
BUILDERS = {BaseDataset: _base, DWI: _dwi, PET: _pet}


def to_nifreeze(dataset: BaseDataset, path=None, *, progress=None):
    """nifreeze's dataset object over ``dataset``'s volumes, without a copy in memory.

    Parameters
    ----------
    dataset : BaseDataset
        A nidask series (a :class:`~nidask.DWI` gives nifreeze's ``DWI``, a
        :class:`~nidask.PET` its ``PET``, any other its ``BaseDataset``).  An already
        materialized dataset is used as it is.
    path : path-like, optional
        Where to materialize (default: the dataset's owned cache, removed with it; keep
        ``dataset`` open while nifreeze works on the result).
    progress : bool, optional
        Show a progress bar while materializing.

    Returns
    -------
    nifreeze.data.base.BaseDataset
        With ``dataobj`` the read-only (X, Y, Z, N) memmap of the volumes nidask wrote,
        ``affine``, ``brainmask``, ``motion_affines`` and the modality's fields.

    Raises
    ------
    NifreezeMissingError
        When nifreeze cannot be imported.
    """
    base, dmri, pet = _nifreeze_data()
    if dataset.memmap_path is None:
        dataset = dataset.materialize(path, progress=progress)
    fields = {
        "dataobj": dataset.memmap,
        "affine": np.asarray(dataset.affine, dtype=float),
        "brainmask": dataset.brainmask,
        "motion_affines": dataset.motion_affines,
        "datahdr": dataset.datahdr,
    }
    return by_modality(BUILDERS, dataset)(dataset, fields, (base, dmri, pet))
