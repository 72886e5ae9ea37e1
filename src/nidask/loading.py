"""One entry point for every supported file: :func:`load`."""

from __future__ import annotations

from nidask import bold, dmri, pet  # noqa: F401  (the modalities register themselves)
from nidask.dataset import MODALITIES, BaseDataset, open_nfdh5, open_series
from nidask.errors import InputError
from nidask.io.sources import check_readable, is_hdf5


def load(path, **kwargs) -> BaseDataset:
    """Open a series lazily.

    NFDH5 files become the dataset type their ``Type`` attribute names.  NIfTI
    (and ``.npy``) files become a :class:`~nidask.BaseDataset`, or the modality
    whose companion files are given (:attr:`~nidask.BaseDataset.load_keys`): a
    :class:`~nidask.DWI` with ``bvec_file``, ``bval_file``, ``gradients_file`` or
    ``b0_file``, a :class:`~nidask.PET` with a ``temporal_file``, a
    :class:`~nidask.BOLD` with a ``json_file``.  ``brainmask_file`` is accepted
    for all.

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
    for cls in MODALITIES.values():
        if set(cls.load_keys) & kwargs.keys():
            return cls.from_files(path, **kwargs)
    unknown = set(kwargs) - {"brainmask_file"}
    if unknown:
        raise InputError(f"unexpected arguments: {sorted(unknown)}", path)
    return BaseDataset(**open_series(path, kwargs.get("brainmask_file"))[1])
