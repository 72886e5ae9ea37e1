"""nidask: lazy, out-of-core, cluster-ready 4D neuroimaging series.

Open a series with :func:`load` (NFDH5, NIfTI, ``.npy``) or a modality reader
(:func:`nidask.dmri.from_nii`, :func:`nidask.pet.from_nii`); its ``dataobj`` is a
dask array and every operation stays a deferred graph until a sink or an
estimator asks for data.
"""

from __future__ import annotations

from . import config, dmri, pet
from .cache import Cache
from .dataset import BaseDataset
from .dmri import DWI
from .errors import InputError, NidaskError, OutputError
from .estimator import Estimator
from .loading import load
from .pet import PET

__version__ = "0.1.0"

__all__ = [
    "BaseDataset",
    "Cache",
    "DWI",
    "Estimator",
    "InputError",
    "NidaskError",
    "OutputError",
    "PET",
    "config",
    "dmri",
    "load",
    "pet",
]
