"""Export a dataset to NIfTI with its sidecars, all-or-nothing.

The whole series is written in file order (:meth:`BaseDataset.whole_series`: a
DWI's b=0 volumes included, each corrected with its own matrix).  A dataset with
motion matrices is resampled block by block on its way to disk.  A DWI also gets
``.bval``/``.bvec`` beside the image (b-vectors rotated into the reference frame
when resampled).  ``b0_volumes=False`` writes the diffusion-weighted volumes only,
and ``insert_b0=True`` nifreeze's layout: its ``bzero`` first, with a null
gradient, then the diffusion-weighted volumes.  ``write_hmxfms=True`` writes every
written volume's transform into one X5 file.  All files appear together or none does.
"""

from __future__ import annotations

import inspect
import os

import numpy as np

from nidask.errors import InputError
from nidask.io.cache import atomic_outputs
from nidask.io.nifti import is_gzip_name, make_header, write_nifti_file


def sidecar_path(filename, suffix: str) -> str:
    """``sub-01_dwi.nii.gz`` + ``.bvec`` -> ``sub-01_dwi.bvec`` (same directory)."""
    filename = os.fspath(filename)
    for ext in (".nii.gz", ".nii"):
        if filename.lower().endswith(ext):
            return filename[: -len(ext)] + suffix
    return os.path.splitext(filename)[0] + suffix


def write_transforms(path: str, motion_affines: np.ndarray, shape3d, affine) -> None:
    """Write all per-volume matrices into one X5 file with nitransforms."""
    import nibabel as nb
    from nitransforms.base import ImageGrid
    from nitransforms.linear import LinearTransformsMapping

    # a zero-stride array gives the grid its shape without allocating a volume
    grid = nb.Nifti1Image(np.broadcast_to(np.uint8(0), tuple(shape3d)), affine)
    mapping = LinearTransformsMapping(motion_affines, reference=ImageGrid(grid))
    mapping.to_filename(path, fmt="X5")


def export_nifti(
    dataset,
    filename,
    *,
    order: int = 3,
    write_hmxfms: bool = False,
    dtype=None,
    mode: str = "constant",
    cval: float = 0.0,
    progress=None,
    **options,
) -> None:
    """Write ``dataset`` (resampled when it has motion matrices) as NIfTI.

    See :meth:`nidask.BaseDataset.to_nifti` for the parameters; ``options`` are the
    modality's own (:meth:`~nidask.BaseDataset.export_plan`, e.g. a DWI's
    ``insert_b0``, ``b0_volumes``, ``bvals_dec_places`` and ``bvecs_dec_places``).
    """
    known = inspect.signature(dataset.export_plan).parameters
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InputError(
            f"a {type(dataset).__name__} export has no option {', '.join(unknown)} "
            f"(options: {', '.join(known)})"
        )
    series, data, sidecars = dataset.export_plan(order=order, mode=mode, cval=cval, **options)
    if write_hmxfms and series.motion_affines is None:
        raise InputError("write_hmxfms=True but the dataset has no motion matrices")
    dtype = np.dtype(dtype or data.dtype)
    header = make_header(data.shape, dtype, dataset.affine, dataset.datahdr)
    paths = [os.fspath(filename), *(sidecar_path(filename, s) for s in sidecars)]
    if write_hmxfms:
        paths.append(sidecar_path(filename, ".x5"))
    with atomic_outputs(paths, dataset.inputs) as temps:
        for temp, write in zip(temps[1:], sidecars.values(), strict=False):
            write(temp)
        if write_hmxfms:
            write_transforms(temps[-1], series.motion_affines, series.shape3d, series.affine)
        write_nifti_file(
            data.astype(dtype),
            temps[0],
            header,
            compressed=is_gzip_name(filename),
            progress=progress,
        )
