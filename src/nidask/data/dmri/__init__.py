"""Diffusion MRI: gradient tables, the :class:`DWI` dataset and its readers."""

from nidask.data.dmri.dataset import DWI, lazy_median, median_volume, split_b0
from nidask.data.dmri.gradients import (
    GP_MIN_DIRECTIONS,
    GRADIENT_ATOL,
    MIN_DIFFUSION_VOLUMES,
    check_diffusion_volumes,
    find_shells,
    normalize_gradients,
    read_gradients,
)
from nidask.data.dmri.readers import from_nii

__all__ = [
    "DWI",
    "GP_MIN_DIRECTIONS",
    "GRADIENT_ATOL",
    "MIN_DIFFUSION_VOLUMES",
    "check_diffusion_volumes",
    "find_shells",
    "from_nii",
    "lazy_median",
    "median_volume",
    "normalize_gradients",
    "read_gradients",
    "split_b0",
]
