"""nidask: lazy, out-of-core, cluster-ready 4D neuroimaging series.

Open a series with :func:`load` (NFDH5, NIfTI, ``.npy``) or a modality reader
(:func:`nidask.dmri.from_nii`, :func:`nidask.pet.from_nii`,
:func:`nidask.bold.from_nii`); its ``dataobj`` is a
dask array and every operation stays a deferred graph until a sink or an
estimator asks for data.
"""

from __future__ import annotations

from nidask import bold, cluster, config, dmri, pet
from nidask.bold import BOLD
from nidask.dataset import BaseDataset
from nidask.dmri import DWI
from nidask.errors import InputError, NidaskError, OutputError
from nidask.estimation.estimator import Estimator
from nidask.io.cache import Cache
from nidask.loading import load
from nidask.pet import PET

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
