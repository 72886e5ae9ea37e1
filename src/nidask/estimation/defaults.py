"""The estimator's choices for each kind of series: its default model, what it refuses.

Kept here, beside the models, so that the datasets hold data only.  A kind of series
without an entry takes its parent class's (the base dataset's: the series average).

- DWI: the shell average, then the Gaussian process where every shell has at least
  :data:`~nidask.data.dmri.GP_MIN_DIRECTIONS` directions.  The first pass sees the
  data as acquired: a prediction that weights a few neighbouring directions heavily
  (the process) would sit in their mean position, different for every volume; the
  shell average sits in the shell's mean position.  Later passes see corrected data.
- PET: the series average; the temporal model predicts the phantoms' frames worse
  than their average, so it stays an explicit choice.
- BOLD: the series average.  On real anatomy moved by a real trajectory it predicts
  better than the temporal neighbours (fewer volumes, more noise; see
  docs/benchmarks.md); ``"neighbours"`` remains the choice for series whose signal
  drifts, given after a first average pass (``model=["average", "neighbours"]``):
  from uncorrected data neighbours would cancel slow drift.
"""

from __future__ import annotations

from collections.abc import Callable

from nidask.config import b0_threshold
from nidask.data.base import BaseDataset, by_modality
from nidask.data.dmri import DWI, GP_MIN_DIRECTIONS, check_diffusion_volumes


def _dwi_models(dataset: DWI) -> list[str]:
    shells = [len(idx) for b, idx in dataset.get_shells() if b > b0_threshold()]
    if shells and min(shells) >= GP_MIN_DIRECTIONS:
        return ["average", "gp"]
    return ["average"]


def _check_dwi(dataset: DWI, models) -> None:
    names = ", ".join(sorted({type(m).__name__ for m in models}))
    check_diffusion_volumes(dataset, what=f"motion estimation with {names}")


#: Dataset class -> its default model names, one per pass (the last one repeats).
DEFAULT_MODELS: dict[type, Callable[[BaseDataset], list[str]]] = {
    BaseDataset: lambda dataset: ["average"],
    DWI: _dwi_models,
}
#: Dataset class -> a check that raises :class:`~nidask.errors.InputError` for a series
#: the given models cannot estimate.
ESTIMABLE: dict[type, Callable[[BaseDataset, list], None]] = {
    BaseDataset: lambda dataset, models: None,
    DWI: _check_dwi,
}


def default_model(dataset) -> list[str]:
    """The model names the estimator's ``model="auto"`` gives ``dataset``, per pass.

    >>> import numpy as np, dask.array as da
    >>> default_model(BaseDataset(da.zeros((2, 2, 2, 3)), np.eye(4)))
    ['average']
    """
    return by_modality(DEFAULT_MODELS, dataset)(dataset)


def check_estimable(dataset, models) -> None:
    """Refuse (:class:`~nidask.errors.InputError`) a series ``models`` cannot estimate."""
    by_modality(ESTIMABLE, dataset)(dataset, models)
