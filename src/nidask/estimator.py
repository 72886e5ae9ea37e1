"""Leave-one-volume-out head-motion estimation on any dask scheduler, resumable.

For each pass the estimator

1. materializes the training series once (pass 1: the data as they are; later
   passes: the data resampled with the previous estimates) as a volume-contiguous
   ``.npy``,
2. writes its masked voxels once as a voxel-major matrix,
3. predicts **every** left-out volume with the model, block of voxels by block,
4. registers each observed volume to its prediction — one dask task per fold,
   reading both by path — and records the matrix as soon as it is known.

All of it lives in a run directory.  A run interrupted at any point (killed
process, lost worker) and started again with the same directory skips every step
and fold already recorded and ends with the same matrices.

Reference frame
---------------
Matrices follow DESIGN.md (reference RAS -> moving RAS).  The reference is
``reference="model"``: the frame of the model's predictions (the average position
of the series), or an integer ``k``: the frame of volume ``k`` (whose matrix
becomes the identity).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import attrs
import dask
import numpy as np
from dask.base import tokenize
from scipy import ndimage

from .cache import atomic_output, remove_stale_temporaries
from .config import volumes_per_chunk
from .dmri import DWI
from .errors import InputError
from .lofo import (
    fold_order,
    read_column,
    scatter,
    sweep_predictions,
    write_vector,
    write_voxel_major,
)
from .models import get_model
from .pet import PET
from .progress import compute
from .registration import get_registration
from .sources import NpySource, read_npy_header

RUN_FILE = "run.json"


def read_volume(path: str, index: int) -> np.ndarray:
    """Volume ``index`` of a volume-contiguous ``.npy`` as float32 (one read)."""
    shape, fortran, dtype, offset = read_npy_header(path)
    if not fortran:
        raise InputError("expected a Fortran-ordered (volume-contiguous) array", path)
    size3d = int(np.prod(shape[:3]))
    with open(path, "rb") as f:
        raw = os.pread(
            f.fileno(), size3d * dtype.itemsize, offset + index * size3d * dtype.itemsize
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape[:3], order="F").astype(np.float32)


def _save_atomic(path: str, array: np.ndarray) -> None:
    with atomic_output(path) as temp:
        with open(temp, "wb") as f:
            np.save(f, array)


def register_fold(
    volumes: str,
    predictions: str,
    mask_path: str,
    fold: int,
    affine: np.ndarray,
    registration,
    record: str,
    init: np.ndarray | None = None,
) -> np.ndarray:
    """Register observed volume ``fold`` to its prediction and record the matrix.

    Runs inside a task: every input is read by path.
    """
    mask = np.load(mask_path)
    fixed = scatter(read_column(predictions, fold), grow_mask(mask))
    moving = read_volume(volumes, fold)
    matrix = np.asarray(registration(fixed, moving, affine, mask=mask, init=init), dtype=float)
    _save_atomic(record, matrix)
    return matrix


def grow_mask(mask: np.ndarray, voxels: int = 4) -> np.ndarray:
    """The mask dilated by ``voxels``: where models predict.

    Registration smooths and interpolates the prediction near the brain's edge;
    predicting a margin around the mask keeps zeros out of those samples.
    """
    return ndimage.binary_dilation(mask, iterations=voxels)


def _volume_meta(dataset) -> dict:
    if isinstance(dataset, DWI):
        return {"gradients": dataset.gradients}
    if isinstance(dataset, PET):
        return {"midframe": dataset.midframe}
    return {}


def _add_volume_sum(total: np.ndarray | None, source, start: int, stop: int) -> np.ndarray:
    """Task: ``total`` plus the voxel-wise sum of volumes ``start:stop`` (read here)."""
    part = source[..., start:stop].sum(axis=-1, dtype=np.float64)
    return part if total is None else np.add(part, total, out=part)


def default_mask(volumes: str, shape3d, fraction: float = 0.05) -> np.ndarray:
    """Voxels whose mean signal exceeds ``fraction`` of its 99th percentile.

    The sum runs as a chain of tasks that each read one block and add it to the
    running total, so memory stays at one block whatever the number of volumes
    (a tree reduction holds one partial volume per block at once).
    """
    source = NpySource(volumes)
    n = source.shape[3]
    step = volumes_per_chunk(source.shape[:3], source.dtype)
    total = None
    for start in range(0, n, step):
        total = dask.delayed(_add_volume_sum)(total, source, start, min(start + step, n))
    mean = total.compute() / n
    return mean > fraction * np.percentile(mean, 99)


@attrs.frozen
class _Run:
    """Files of one run directory shared by every pass."""

    workdir: str
    raw: str
    mask: np.ndarray
    mask_path: str
    voxel_meta: dict


@contextlib.contextmanager
def _scheduler(client):
    """Compute on ``client`` inside the block.

    Not ``dask.config.set(scheduler=client)``: distributed hands the global config to
    every process it starts, and with a Client in it a nanny cannot restart a lost
    worker (the Client does not pickle), so a cluster in this process shrinks for good.
    """
    if client is None:
        yield
        return
    with client.as_current(), dask.config.set(scheduler=None):
        yield


@attrs.define
class Estimator:
    """Leave-one-volume-out motion estimation.

    Parameters
    ----------
    model : str, Model or callable
        ``"average"`` (per-shell mean), ``"median"``, ``"b0"``, ``"dti"``, ``"pet"``
        (temporal interpolation), a :class:`nidask.models.Model` or a function
        ``f(train_data, train_meta, test_meta)``; see :mod:`nidask.models`.
    registration : str or callable
        ``"rigid"`` or any :class:`nidask.registration.Registration`.
    order : str
        Fold scheduling order: ``"sequential"``, ``"reverse"``, ``"random"``,
        ``"bvalue"``.
    seed : int
        Seed of ``order="random"``.
    passes : int
        Estimation passes; later ones fit the model on data corrected by the
        previous estimates (sharper predictions).
    reference : "model" or int
        Frame of the returned matrices (see the module docstring).
    resample_order : int
        Interpolation order used to correct training data between passes.
    progress : bool, optional
        Progress display (default: ``nidask.progress`` config).
    """

    model: object = "average"
    registration: object = "rigid"
    order: str = "sequential"
    seed: int = 0
    passes: int = 2
    reference: object = "model"
    resample_order: int = 1
    progress: bool | None = None

    def _models(self) -> list:
        """One model per pass (the last one repeats)."""
        specs = self.model if isinstance(self.model, list | tuple) else [self.model]
        if not specs:
            raise InputError("no model given")
        return [get_model(spec) for spec in specs]

    def _identity(self, dataset) -> str:
        config = [repr(m) for m in self._models()] + [repr(get_registration(self.registration))]
        config += [self.passes, self.resample_order]
        return tokenize(
            dataset.dataobj.name, dataset.affine, _volume_meta(dataset), dataset.brainmask, config
        )

    def _prepare(self, dataset, workdir):
        if workdir is None:
            workdir = dataset.cache.new_path("", stem="estimate")
        workdir = os.path.abspath(os.fspath(workdir))
        os.makedirs(workdir, exist_ok=True)
        run_file = os.path.join(workdir, RUN_FILE)
        identity = self._identity(dataset)
        if os.path.exists(run_file):
            with open(run_file) as f:
                recorded = json.load(f).get("identity")
            if recorded != identity:
                raise InputError(
                    "run directory holds a run of another dataset or configuration; "
                    "use a new directory",
                    workdir,
                )
        else:
            with atomic_output(run_file) as temp, open(temp, "w") as f:
                json.dump({"identity": identity, "n_volumes": len(dataset)}, f)
        return workdir

    def run(self, dataset, client=None, workdir=None):
        """Estimate every volume's motion.

        Parameters
        ----------
        dataset : BaseDataset
            Any lazy dataset (DWI, PET, ...).
        client : distributed.Client, optional
            Run the tasks on this cluster (default: dask's current scheduler).
        workdir : path-like, optional
            Run directory (kept; pass the same one to resume).  Default: a
            directory in the dataset's owned cache.

        Returns
        -------
        Dataset of the same type with ``motion_affines`` filled.
        """
        models = self._models()
        registration = get_registration(self.registration)
        if self.passes < 1:
            raise InputError(f"passes must be at least 1, got {self.passes}")
        order = self._check(dataset)
        with _scheduler(client):
            run = self._setup(dataset, workdir)
            matrices = None
            for p in range(1, self.passes + 1):
                model = models[min(p, len(models)) - 1]
                predictions = self._predict(dataset, run, p, model, matrices)
                matrices = self._register(dataset, run, p, predictions, registration, order)
            matrices = self._to_reference(dataset, matrices)
        return attrs.evolve(dataset, motion_affines=matrices)

    def sweep(self, dataset, client=None, workdir=None) -> np.memmap:
        """Every fold's prediction by the (first) model, without registration.

        A full leave-one-out sweep: the series is materialized and laid out
        voxel-major once, then the model predicts each left-out volume.

        Returns
        -------
        np.memmap (n_voxels, N)
            Column ``i`` is the prediction of volume ``i`` over the voxels of the
            (grown) mask saved as ``mask.npy`` in the run directory.
        """
        self._check(dataset)
        with _scheduler(client):
            run = self._setup(dataset, workdir)
            return np.load(self._predict(dataset, run, 1, self._models()[0], None), mmap_mode="r")

    def _check(self, dataset) -> np.ndarray:
        if len(dataset) < 3:
            raise InputError(f"leave-one-out needs at least 3 volumes, got {len(dataset)}")
        order = fold_order(len(dataset), self.order, self.seed, getattr(dataset, "bvals", None))
        self._to_reference(dataset, np.tile(np.eye(4), (len(dataset), 1, 1)))
        return order

    def _setup(self, dataset, workdir) -> _Run:
        workdir = self._prepare(dataset, workdir)
        remove_stale_temporaries(workdir)  # of an earlier, killed attempt
        raw = self._step(
            os.path.join(workdir, "data.npy"),
            lambda p: dataset.materialize(p, progress=self.progress),
        )
        mask_path = os.path.join(workdir, "mask.npy")
        if not os.path.exists(mask_path):
            mask = dataset.brainmask
            if mask is None:
                mask = default_mask(raw, dataset.shape3d)
            _save_atomic(mask_path, np.asarray(mask, dtype=bool))
        mask = np.load(mask_path)
        voxel_meta = {}
        if isinstance(dataset, DWI) and dataset.bzero is not None:

            def write_bzero(path):  # computed only when the run has not recorded it yet
                bzero = np.asarray(dask.compute(dataset.bzero)[0])[grow_mask(mask)]
                write_vector(path, bzero)

            voxel_meta["bzero"] = self._step(os.path.join(workdir, "bzero.npy"), write_bzero)
        return _Run(workdir, raw, mask, mask_path, voxel_meta)

    def _step(self, path: str, produce) -> str:
        """Run ``produce(temp)`` unless ``path`` exists; rename on success."""
        if not os.path.exists(path):
            with atomic_output(path) as temp:
                produce(temp)
        return path

    def _predict(self, dataset, run: _Run, p: int, model, previous) -> str:
        """Pass ``p``'s fold predictions (training data corrected by ``previous``)."""
        folder = os.path.join(run.workdir, f"pass-{p}")
        os.makedirs(folder, exist_ok=True)
        training = run.raw
        if previous is not None:
            corrected = attrs.evolve(dataset, motion_affines=previous).resampled(
                order=self.resample_order
            )
            training = self._step(
                os.path.join(folder, "corrected.npy"),
                lambda t: corrected.materialize(t, progress=self.progress),
            )
        voxels = self._step(
            os.path.join(folder, "voxels.npy"),
            lambda t: write_voxel_major(training, grow_mask(run.mask), t, progress=self.progress),
        )
        meta = _volume_meta(dataset)
        return self._step(
            os.path.join(folder, "predictions.npy"),
            lambda t: sweep_predictions(
                voxels, model, meta, t, voxel_meta=run.voxel_meta, progress=self.progress
            ),
        )

    def _register(self, dataset, run: _Run, p: int, predictions: str, registration, order):
        """Register every fold not yet recorded in pass ``p``; return all matrices."""
        folder = os.path.join(run.workdir, f"pass-{p}")
        records = [os.path.join(folder, f"fold-{i:05d}.npy") for i in range(len(dataset))]
        todo = [int(i) for i in order if not os.path.exists(records[i])]
        tasks = [
            dask.delayed(register_fold, pure=False)(
                run.raw, predictions, run.mask_path, i, dataset.affine, registration, records[i]
            )
            for i in todo
        ]
        compute(*tasks, label=f"pass {p}: registering {len(todo)} folds", progress=self.progress)
        # a worker lost mid-write (or a killed earlier attempt) leaves its temporary record
        remove_stale_temporaries(folder)
        return np.stack([np.load(r) for r in records])

    def _to_reference(self, dataset, matrices):
        reference = self.reference
        if isinstance(reference, str) and reference == "model":
            return matrices
        if isinstance(reference, int | np.integer) and not isinstance(reference, bool):
            if not -len(dataset) <= reference < len(dataset):
                raise InputError(f"reference volume {reference} out of range")
            return matrices @ np.linalg.inv(matrices[reference])
        raise InputError(f"unknown reference {reference!r} (use 'model' or a volume index)")


def clear_run(workdir) -> None:
    """Remove a run directory (user-named run directories are otherwise kept)."""
    shutil.rmtree(workdir, ignore_errors=True)
