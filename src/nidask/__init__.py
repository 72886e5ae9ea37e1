"""nidask: lazy, out-of-core, cluster-ready 4D neuroimaging series.

Open a series with :func:`load` (NFDH5, NIfTI, ``.npy``) or a modality reader
(:func:`nidask.data.dmri.from_nii`, :func:`nidask.data.pet.from_nii`,
:func:`nidask.data.bold.from_nii`); its ``dataobj`` is a
dask array and every operation stays a deferred graph until a sink or an
estimator asks for data.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from nidask import cluster, config
from nidask.data import bold, dmri, pet
from nidask.data.base import BaseDataset
from nidask.data.bold import BOLD
from nidask.data.dmri import DWI
from nidask.data.loading import load
from nidask.data.pet import PET
from nidask.errors import InputError, NidaskError, OutputError
from nidask.estimation.estimator import Estimator
from nidask.io.cache import Cache

#: Short import paths that stay valid (``import nidask.dmri``) -> where the module lives.
SHORT_NAMES = {
    "nidask.dmri": "nidask.data.dmri",
    "nidask.pet": "nidask.data.pet",
    "nidask.bold": "nidask.data.bold",
    "nidask.dataset": "nidask.data.base",
    "nidask.loading": "nidask.data.loading",
    "nidask.export": "nidask.data.export",
    "nidask.participants": "nidask.bids.participants",
    "nidask.plots": "nidask.reporting.plots",
    "nidask.reports": "nidask.reporting.tables",
    "nidask.phantom": "nidask.validation.phantom",
    "nidask.evaluation": "nidask.validation.evaluation",
}


class _ShortNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of a :data:`SHORT_NAMES` path give the module where it lives (same object)."""

    def find_spec(self, name, path=None, target=None):
        if name in SHORT_NAMES:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(SHORT_NAMES[spec.name])

    def exec_module(self, module) -> None:
        pass


if not any(isinstance(finder, _ShortNames) for finder in sys.meta_path):
    sys.meta_path.append(_ShortNames())

__version__ = "0.1.0"

__all__ = [
    "BOLD",
    "BaseDataset",
    "Cache",
    "DWI",
    "Estimator",
    "InputError",
    "NidaskError",
    "OutputError",
    "PET",
    "bold",
    "cluster",
    "config",
    "dmri",
    "load",
    "pet",
]
