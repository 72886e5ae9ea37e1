"""One entry point for every supported file: :func:`load`."""

from __future__ import annotations

from nidask.data import bold, dmri, pet
from nidask.data.base import BaseDataset, open_nfdh5
from nidask.errors import InputError
from nidask.io.series import open_series
from nidask.io.sources import check_readable, is_hdf5

#: Companion-file keywords of :func:`load` that mark each modality, and its reader.
READERS = {
    dmri.DWI: (
        ("bvec_file", "bval_file", "gradients_file", "b0_file", "phase_encoding"),
        dmri.from_nii,
    ),
    pet.PET: (("temporal_file",), pet.from_nii),
    bold.BOLD: (("json_file", "repetition_time"), bold.from_nii),
}


def modalities_for(keywords) -> list[type[BaseDataset]]:
    """The dataset classes whose companion keywords are among ``keywords``.

    >>> [cls.__name__ for cls in modalities_for({"bval_file", "brainmask_file"})]
    ['DWI']
    """
    return [cls for cls, (keys, _) in READERS.items() if set(keys) & set(keywords)]


def load(path, **kwargs) -> BaseDataset:
    """Open a series lazily.

    NFDH5 files become the dataset type their ``Type`` attribute names.  NIfTI
    (and ``.npy``) files become a :class:`~nidask.BaseDataset`, or the modality
    whose companion files are given (:data:`READERS`): a :class:`~nidask.DWI` with
    ``bvec_file``, ``bval_file``, ``gradients_file`` or ``b0_file`` (and its
    ``phase_encoding``, ``"j-"`` ...), a
    :class:`~nidask.PET` with a ``temporal_file``, a :class:`~nidask.BOLD` with a
    ``json_file`` or ``repetition_time``.  ``brainmask_file`` is accepted for all.

    Parameters
    ----------
    path : path-like
        The file to open.
    **kwargs
        Companion files, as above.
    """
    path = check_readable(path)
    if is_hdf5(path):
        if kwargs:
            raise InputError(f"unexpected arguments for an NFDH5 file: {sorted(kwargs)}", path)
        return open_nfdh5(path)
    if kinds := modalities_for(kwargs):
        return READERS[kinds[0]][1](path, **kwargs)
    unknown = set(kwargs) - {"brainmask_file"}
    if unknown:
        raise InputError(f"unexpected arguments: {sorted(unknown)}", path)
    return BaseDataset(**open_series(path, kwargs.get("brainmask_file"))[1])
