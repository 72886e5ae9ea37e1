"""The b=0 anchor: every volume of a DWI registered to its b=0 template first.

The b=0 image is the sharpest and least noisy image of a diffusion series and shares
its anatomy, so registering each volume to it (mutual information across contrasts,
as users do with ANTs) is the baseline a leave-one-out estimator must never fall
below.  The estimator therefore starts there:

1. **Template.**  The b=0 volumes are registered (NCC, same contrast) to the first
   of them, resampled with their estimates and averaged; the average becomes the
   fixed image of the next round (``TEMPLATE_ROUNDS`` in all), and each round's
   estimates are recentred on their mean position.  With one b=0 volume the template
   is that volume and its motion the identity; so a single b=0 is in the frame of
   the rest by construction.
2. **Every other volume** is registered to the template with Mattes mutual
   information (:data:`MI_REGISTRATION`).

Leave-one-out passes then refine these estimates on data already in the template's
frame, so no frame tie is needed between shells (see :mod:`nidask.estimation.frames`
for what a tie costs when each shell sits in its own frame).
"""

from __future__ import annotations

import json
import os

import dask
import numpy as np

from nidask.estimation.frames import recentre
from nidask.estimation.registration import RigidRegistration
from nidask.io.cache import atomic_output, discard, save_array
from nidask.io.npy import NpyFile
from nidask.ops.resample import resample_volume
from nidask.progress import compute

#: Registration of a volume to the b=0 template across contrasts: Mattes mutual
#: information (as ANTs computes it), no smoothing at the finest level; jittered sample
#: points (on a b=5000 shell the worst error fell from 0.37 to 0.06 mm).
MI_REGISTRATION = RigidRegistration(metric="mi", smoothing=(2.0, 1.0, 0.0))
#: Registration of a b=0 volume to the template (same contrast).
B0_REGISTRATION = RigidRegistration()
#: Rounds of register-and-average that build the template.
TEMPLATE_ROUNDS = 3


def register_to_image(
    volumes: str,
    fixed: str,
    mask: str,
    fold: int,
    affine: np.ndarray,
    registration,
    record: str,
    init: np.ndarray | None = None,
) -> np.ndarray:
    """Task: register volume ``fold`` of ``volumes`` to the image at ``fixed``; record it.

    Every input is read by path (``.npy`` files); the matrix goes to ``record`` and
    the registration's quality beside it (``.json``), as for the leave-one-out folds.
    """
    moving = NpyFile.open(volumes).read_volume(fold)
    matrix, quality = registration.register(
        np.load(fixed), moving, affine, mask=np.load(mask), init=init
    )
    with atomic_output(record[: -len(".npy")] + ".json") as temp, open(temp, "w") as f:
        json.dump(quality, f)
    save_array(record, np.asarray(matrix, dtype=float))
    return matrix


def _registered_mean(volumes: str, members, matrices, affine) -> np.ndarray:
    """Task: the mean of the ``members`` volumes resampled with their matrices."""
    source = NpyFile.open(volumes)
    total = None
    for i, matrix in zip(members, matrices, strict=True):
        voxel = np.linalg.inv(affine) @ matrix @ affine
        moved = resample_volume(source.read_volume(int(i)), voxel, order=3)
        total = moved if total is None else total + moved
    return (total / len(members)).astype(np.float32)


def _register_all(
    volumes, fixed, mask, folds, affine, registration, folder, init, label, progress
) -> np.ndarray:
    """Register ``folds`` to ``fixed`` (one task each, skipping recorded ones)."""
    records = [os.path.join(folder, f"fold-{i:05d}.npy") for i in folds]
    tasks = [
        dask.delayed(register_to_image, pure=False)(
            volumes, fixed, mask, int(i), affine, registration, record, init.get(int(i))
        )
        for i, record in zip(folds, records, strict=True)
        if not os.path.exists(record)
    ]
    compute(*tasks, label=label, progress=progress)
    return np.stack([np.load(r) for r in records])


def b0_template(
    volumes: str, b0_index, affine, shape3d, mask: str, folder: str, progress=None
) -> tuple[str, np.ndarray]:
    """The b=0 template (path of a float32 ``.npy``) and each b=0 volume's matrix.

    Built in ``folder`` (one sub-folder per round, so an interrupted run resumes).
    """
    b0_index = [int(i) for i in b0_index]
    os.makedirs(folder, exist_ok=True)
    template = os.path.join(folder, "template-0.npy")
    if not os.path.exists(template):
        save_array(template, NpyFile.open(volumes).read_volume(b0_index[0]))
    matrices = np.tile(np.eye(4), (len(b0_index), 1, 1))
    if len(b0_index) == 1:
        return template, matrices
    for r in range(1, TEMPLATE_ROUNDS + 1):
        round_folder = os.path.join(folder, f"round-{r}")
        os.makedirs(round_folder, exist_ok=True)
        init = {i: m for i, m in zip(b0_index, matrices, strict=True)}
        raw = _register_all(
            volumes,
            template,
            mask,
            b0_index,
            affine,
            B0_REGISTRATION,
            round_folder,
            init,
            f"b=0 template, round {r}: registering {len(b0_index)} b=0 volumes",
            progress,
        )
        matrices = recentre(raw, slice(None), affine, shape3d)
        template = os.path.join(folder, f"template-{r}.npy")
        if not os.path.exists(template):
            mean = dask.delayed(_registered_mean)(volumes, b0_index, matrices, affine)
            save_array(template, compute(mean, label="b=0 template", progress=progress)[0])
    return template, matrices


def anchor_estimates(
    volumes: str,
    b0_index,
    n_volumes: int,
    affine,
    shape3d,
    mask: str,
    folder: str,
    progress=None,
    registration=None,
) -> tuple[np.ndarray, str]:
    """Every volume's matrix in the frame of the b=0 template, and the template's path.

    ``registration`` registers the other volumes to the template (default
    :data:`MI_REGISTRATION`; with eddy currents, its joint twin).
    """
    template, b0_matrices = b0_template(
        volumes, b0_index, affine, shape3d, mask, os.path.join(folder, "template"), progress
    )
    estimates = np.tile(np.eye(4), (n_volumes, 1, 1))
    estimates[list(b0_index)] = b0_matrices
    others = [i for i in range(n_volumes) if i not in set(int(b) for b in b0_index)]
    if others:
        estimates[others] = _register_all(
            volumes,
            template,
            mask,
            others,
            affine,
            MI_REGISTRATION if registration is None else registration,
            folder,
            {},
            f"b=0 anchor: registering {len(others)} volumes to the template",
            progress,
        )
    return estimates, template


def remove_earlier_templates(folder: str) -> None:
    """Remove the template's earlier rounds from an anchor ``folder`` (the last round,
    the b=0 template, stays)."""
    template = os.path.join(folder, "template")
    if os.path.isdir(template):
        rounds = sorted(n for n in os.listdir(template) if n.startswith("template-"))
        discard(os.path.join(template, n) for n in rounds[:-1])
