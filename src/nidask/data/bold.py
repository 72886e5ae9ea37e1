"""BOLD fMRI series: a :class:`BOLD` dataset and its BIDS sidecar.

Every volume of a BOLD series has the same contrast, so a volume is predicted
from the others directly: by their average (``"average"``, the default, or
``"median"``), or by the volumes nearest in time (``"neighbours"``), which
follows slow signal drift.
Acquisition times come from ``RepetitionTime`` (and ``SliceTiming``) in the BIDS
JSON sidecar, or the NIfTI header's time step when there is no sidecar.
"""

from __future__ import annotations

import attrs
import numpy as np

from nidask.data.base import BaseDataset
from nidask.errors import InputError
from nidask.io.cache import Cache
from nidask.io.files import read_json_object
from nidask.io.series import open_series


def _optional_array(value):
    return None if value is None else np.asarray(value, dtype=float).ravel()


@attrs.define(eq=False, repr=False, slots=False)
class BOLD(BaseDataset):
    """A BOLD (or any same-contrast EPI) series.

    Parameters
    ----------
    repetition_time : float
        Seconds between the starts of consecutive volumes.
    slice_timing : ndarray (n_slices,), optional
        Acquisition time of each slice within a volume (seconds), as BIDS
        ``SliceTiming``; kept and stored, not used by the estimator.
    """

    repetition_time: float = attrs.field(default=None, kw_only=True)
    slice_timing: np.ndarray | None = attrs.field(
        default=None, kw_only=True, converter=_optional_array
    )

    nfdh5_type = "bold"

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.repetition_time is None:
            raise InputError("a BOLD series needs its repetition_time")
        tr = np.asarray(self.repetition_time, dtype=float)
        if tr.size != 1:
            raise InputError(f"repetition_time must be a number, got shape {tr.shape}")
        self.repetition_time = float(tr.reshape(()))
        if not np.isfinite(self.repetition_time) or self.repetition_time <= 0:
            raise InputError(f"repetition_time must be positive, got {self.repetition_time}")
        timing = self.slice_timing
        if timing is not None:
            if timing.size == 0 or not np.all(np.isfinite(timing)):
                raise InputError("slice_timing must hold finite numbers")
            if timing.min() < 0 or timing.max() >= self.repetition_time:
                raise InputError("slice_timing must lie within one repetition time")

    @property
    def acquisition_times(self) -> np.ndarray:
        """Start of each volume (seconds from the file's first volume)."""
        return self.original_index * self.repetition_time

    def volume_meta(self) -> dict:
        return {"time": self.acquisition_times}

    def _describe(self) -> list[str]:
        parts = [f"TR={self.repetition_time:g}s"]
        if self.slice_timing is not None:
            parts.append(f"slice timing={self.slice_timing.size} slices")
        return parts


def read_sidecar(path) -> dict:
    """``repetition_time`` and ``slice_timing`` from a BIDS BOLD JSON sidecar."""
    sidecar = read_json_object(path)
    if "RepetitionTime" not in sidecar:
        raise InputError("sidecar has no RepetitionTime", path)
    values = {"repetition_time": sidecar["RepetitionTime"]}
    if sidecar.get("SliceTiming") is not None:
        values["slice_timing"] = sidecar["SliceTiming"]
    try:
        values = {k: np.asarray(v, dtype=float) for k, v in values.items()}
    except (TypeError, ValueError) as exc:
        raise InputError(f"malformed RepetitionTime or SliceTiming ({exc})", path) from exc
    if values["repetition_time"].ndim != 0:
        raise InputError("RepetitionTime must be a number", path)
    return values


def _header_repetition_time(source) -> float | None:
    header = getattr(source, "header", None)
    if header is None or len(header.get_zooms()) < 4:
        return None
    step = float(header.get_zooms()[3])
    if step <= 0:
        return None
    return step / 1000.0 if header.get_xyzt_units()[1] == "msec" else step


def from_nii(
    filename,
    json_file=None,
    brainmask_file=None,
    *,
    repetition_time: float | None = None,
    cache: Cache | None = None,
) -> BOLD:
    """Open a BOLD series lazily.

    Parameters
    ----------
    filename : path-like
        The 4D series (NIfTI, ``.npy`` or HDF5 array).
    json_file : path-like, optional
        BIDS sidecar with ``RepetitionTime`` (seconds) and optionally ``SliceTiming``.
    brainmask_file : path-like, optional
        A 3D mask of the same grid.
    repetition_time : float, optional
        Seconds per volume; wins over the sidecar.  Without either, the NIfTI
        header's time step is used.
    """
    timing = {} if json_file is None else read_sidecar(json_file)
    source, fields = open_series(filename, brainmask_file, (json_file,), cache=cache)
    if repetition_time is not None:
        timing["repetition_time"] = repetition_time
    timing.setdefault("repetition_time", _header_repetition_time(source))
    if timing["repetition_time"] is None:
        raise InputError(
            "no repetition time: give a BIDS JSON sidecar or repetition_time", filename
        )
    try:
        return BOLD(**fields, **timing)
    except InputError as exc:
        if exc.path is None:
            raise InputError(exc.problem, json_file or filename) from exc
        raise
