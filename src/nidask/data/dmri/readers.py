"""Opening a diffusion series from NIfTI (or ``.npy``) files and gradient tables."""

from __future__ import annotations

import numpy as np

from nidask.data.dmri.dataset import DWI, b0_set_aside
from nidask.data.dmri.gradients import read_gradients
from nidask.errors import InputError
from nidask.geometry import check_phase_encoding
from nidask.io.cache import Cache
from nidask.io.series import open_series
from nidask.io.sources import open_source


def from_nii(
    filename,
    bvec_file=None,
    bval_file=None,
    gradients_file=None,
    brainmask_file=None,
    b0_file=None,
    *,
    phase_encoding: str | None = None,
    cache: Cache | None = None,
) -> DWI:
    """Open a diffusion series (NIfTI, ``.npy`` or HDF5 array) lazily as a :class:`DWI`.

    Parameters
    ----------
    filename : path-like
        The 4D series.
    bvec_file, bval_file : path-like, optional
        FSL-style b-vectors (3xN or Nx3) and b-values.
    gradients_file : path-like, optional
        An (N, 4) or (4, N) table of RAS direction + b-value; supersedes bvec/bval.
    brainmask_file : path-like, optional
        A 3D mask of the same grid.
    b0_file : path-like, optional
        A 3D b=0 reference; otherwise the median of the b=0 volumes (if any).
    phase_encoding : str, optional
        Phase-encoding direction (BIDS ``PhaseEncodingDirection``: ``"j"``, ``"j-"``,
        ``"i"``, ...), which eddy-current estimation needs.

    Returns
    -------
    DWI
        With the b=0 volumes removed from ``dataobj`` (deferred) and
        ``original_index`` mapping each remaining volume to the file.
    """
    # the gradient files too: a .bval/.bvec written beside an output must not replace them
    gradient_files = (gradients_file,) if gradients_file is not None else (bvec_file, bval_file)
    source, fields = open_series(filename, brainmask_file, gradient_files, cache=cache)
    data = fields.pop("dataobj")
    table = read_gradients(
        bvec_file, bval_file, gradients_file, n_volumes=source.shape[3], affine=fields["affine"]
    )
    try:
        aside = b0_set_aside(data, table)
    except InputError as exc:
        raise InputError(exc.problem, source.path) from None
    if b0_file is not None:
        b0_source = open_source(b0_file, cache=fields["cache"])
        if b0_source.shape[:3] != source.shape[:3] or b0_source.shape[3] != 1:
            raise InputError(
                f"b=0 file shape {b0_source.shape[:3]} differs from the series {source.shape[:3]}",
                b0_source.path,
            )
        aside["bzero"] = b0_source.to_dask()[..., 0].astype(np.float32)
        fields["inputs"] += (b0_source.path,)
    phase_encoding = check_phase_encoding(phase_encoding, source.path)
    return DWI(**aside, **fields, phase_encoding=phase_encoding)
