"""PET: frame timing and the :class:`PET` dataset.

Frame timing comes from a BIDS JSON sidecar: ``FrameTimesStart`` (required) and
``FrameDuration`` (optional; without it each frame lasts until the next starts and
the last as long as the one before, as in nifreeze 0.1.0).  Times are shifted so
the first frame starts at 0.
"""

from __future__ import annotations

import attrs
import numpy as np

from nidask.data.base import BaseDataset
from nidask.errors import InputError
from nidask.io.cache import Cache
from nidask.io.files import read_json_object
from nidask.io.series import open_series


def temporal_markers(
    frame_start, frame_duration=None, path: str | None = None
) -> tuple[np.ndarray, float]:
    """Mid-frame times and total duration from frame starts (and durations).

    Examples
    --------
    >>> mid, total = temporal_markers([10, 20, 40])
    >>> mid.tolist(), total
    ([5.0, 20.0, 40.0], 50.0)
    """
    start = np.asarray(frame_start, dtype=float).ravel()
    if start.size == 0 or not np.all(np.isfinite(start)):
        raise InputError("FrameTimesStart must be a non-empty list of finite numbers", path)
    if np.any(np.diff(start) <= 0):
        raise InputError("FrameTimesStart must be strictly increasing", path)
    start = start - start[0]
    if frame_duration is None:
        if start.size < 2:
            raise InputError("FrameDuration is needed for a single frame", path)
        duration = np.append(np.diff(start), np.diff(start)[-1])
    else:
        duration = np.asarray(frame_duration, dtype=float).ravel()
        if duration.shape != start.shape:
            raise InputError(
                f"FrameDuration has {duration.size} entries, FrameTimesStart {start.size}", path
            )
        if not np.all(np.isfinite(duration)) or np.any(duration <= 0):
            raise InputError("FrameDuration must hold positive finite numbers", path)
        if np.any(start[:-1] + duration[:-1] > start[1:] + 1e-6):
            raise InputError("frames overlap: a frame ends after the next one starts", path)
    return start + duration / 2, float(start[-1] + duration[-1])


def read_timing(path) -> tuple[np.ndarray, float]:
    """Read a BIDS PET sidecar and return ``(midframe, total_duration)``."""
    sidecar = read_json_object(path)
    if "FrameTimesStart" not in sidecar:
        raise InputError("sidecar has no FrameTimesStart", path)
    try:
        return temporal_markers(sidecar["FrameTimesStart"], sidecar.get("FrameDuration"), path)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"malformed frame timing ({exc})", path) from exc


@attrs.define(eq=False, repr=False, slots=False)
class PET(BaseDataset):
    """A dynamic PET series.

    Parameters
    ----------
    midframe : ndarray (N,)
        Mid-frame time of each frame (seconds from the first frame's start).
    total_duration : float
        End of the last frame; must exceed the last ``midframe``.
    """

    midframe: np.ndarray = attrs.field(default=None, kw_only=True)
    total_duration: float = attrs.field(default=None, kw_only=True)

    volume_fields = (*BaseDataset.volume_fields, "midframe")
    nfdh5_type = "pet"
    nfdh5_format = "EMC/PET"

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.midframe is None or self.total_duration is None:
            raise InputError("a PET dataset needs midframe and total_duration")
        self.midframe = np.asarray(self.midframe, dtype=float).ravel()
        duration = np.asarray(self.total_duration, dtype=float)
        if duration.size != 1 or not np.isfinite(duration).all():
            raise InputError(f"total_duration must be a finite number, got {duration.tolist()}")
        self.total_duration = float(duration.reshape(()))
        if self.midframe.shape != (len(self),):
            raise InputError(
                f"midframe has {self.midframe.size} entries but the series has {len(self)} frames"
            )
        if not np.all(np.isfinite(self.midframe)):
            raise InputError("midframe must hold finite numbers")
        if self.total_duration <= self.midframe.max():
            raise InputError(
                f"total_duration {self.total_duration} must exceed the last midframe "
                f"{self.midframe.max()}"
            )

    def volume_meta(self) -> dict:
        return {"midframe": self.midframe}

    def _extras(self, positions, single):
        return (self.midframe[positions[0]] if single else self.midframe[positions],)

    def _describe(self) -> list[str]:
        return [f"frames={len(self)}", f"total_duration={self.total_duration:g}s"]


def from_nii(filename, temporal_file=None, brainmask_file=None, *, cache: Cache | None = None):
    """Open a PET series lazily with its frame timing.

    Parameters
    ----------
    filename : path-like
        The 4D series (NIfTI, ``.npy`` or HDF5 array).
    temporal_file : path-like
        BIDS JSON sidecar with ``FrameTimesStart`` (and ``FrameDuration``).
    brainmask_file : path-like, optional
        A 3D mask of the same grid.
    """
    if temporal_file is None:
        raise InputError("a PET series needs a temporal_file (BIDS JSON sidecar)", filename)
    midframe, total = read_timing(temporal_file)
    source, fields = open_series(filename, brainmask_file, (temporal_file,), cache=cache)
    if midframe.size != source.shape[3]:
        raise InputError(
            f"sidecar describes {midframe.size} frames but the series has {source.shape[3]}",
            temporal_file,
        )
    return PET(**fields, midframe=midframe, total_duration=total)
