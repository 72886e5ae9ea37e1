"""Synthetic DWI- and PET-like series with known head motion.

Used by the demo, the tests and the benchmarks: no downloads, reproducible from a
seed.  The anatomy is a smoothed set of ellipsoids; each region has its own
diffusion tensor (DWI) or time-activity curve (PET), so volumes differ in
contrast the way real series do.  Volume ``i`` is observed after rigid motion
``A_i`` (the DESIGN.md convention): resampling the observed volume with ``A_i``
gives the motion-free volume back.
"""

from __future__ import annotations

import json
import os

import attrs
import nibabel as nb
import numpy as np
from scipy import ndimage

from .evaluation import motion_errors  # noqa: F401  (nidask.phantom.motion_errors)
from .registration import rigid_matrix
from .resample import resample_volume


@attrs.define
class Phantom:
    """Files of a generated series and the motion it was given.

    Attributes
    ----------
    image : str
        The 4D NIfTI.
    motion : ndarray (N, 4, 4)
        True motion matrix of every volume in the file (identity for references).
    companions : dict
        Keyword arguments for :func:`nidask.load` (``bvec_file``, ``bval_file`` or
        ``temporal_file``, ``brainmask_file``).
    """

    image: str
    motion: np.ndarray
    companions: dict
    affine: np.ndarray


def phantom_affine(shape3d, zooms=(2.5, 2.5, 2.5)) -> np.ndarray:
    """An RAS affine centring the grid on the origin."""
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -np.asarray(zooms) * (np.asarray(shape3d) - 1) / 2
    return affine


def anatomy(shape3d, rng: np.random.Generator) -> np.ndarray:
    """Integer labels: 0 background, 1 CSF-like, 2 grey-like, 3-4 white-like.

    Nested, randomly rotated ellipsoids plus a few off-centre blobs, so the
    anatomy has no rotational symmetry (rotations stay identifiable).
    """
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape3d], indexing="ij"), -1)

    def ellipsoid(centre, radii):
        rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        local = (grid - centre) @ rotation
        return ((local / radii) ** 2).sum(-1) <= 1

    labels = np.zeros(shape3d, dtype=np.int16)
    labels[ellipsoid(np.zeros(3), np.array([0.85, 0.75, 0.8]))] = 1
    labels[ellipsoid(rng.uniform(-0.05, 0.05, 3), np.array([0.75, 0.65, 0.7]))] = 2
    for label in (3, 4, 3, 4):
        labels[ellipsoid(rng.uniform(-0.35, 0.35, 3), rng.uniform(0.15, 0.4, 3))] = label
    for _ in range(3):
        labels[ellipsoid(rng.uniform(-0.4, 0.4, 3), rng.uniform(0.06, 0.15, 3))] = 1
    return labels


def random_motion(
    n: int, rng: np.random.Generator, max_mm: float, max_deg: float, centre
) -> np.ndarray:
    """(n, 4, 4) rigid matrices with uniform parameters up to the given bounds."""
    matrices = np.empty((n, 4, 4))
    for i in range(n):
        params = np.concatenate(
            [rng.uniform(-max_mm, max_mm, 3), np.deg2rad(rng.uniform(-max_deg, max_deg, 3))]
        )
        matrices[i] = rigid_matrix(params, center=centre)
    return matrices


def _move(volume: np.ndarray, affine: np.ndarray, motion: np.ndarray) -> np.ndarray:
    # observed = truth resampled with inv(A): resampling it with A gives truth back
    voxel = np.linalg.inv(affine) @ np.linalg.inv(motion) @ affine
    return resample_volume(volume, voxel, order=3)


def _direction_set(n: int, rng: np.random.Generator) -> np.ndarray:
    # points on a sphere by a golden-angle spiral, so tensors are well sampled
    k = np.arange(n) + 0.5
    polar = np.arccos(1 - k / n)
    azimuth = np.pi * (1 + 5**0.5) * k
    dirs = np.stack(
        [np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], 1
    )
    return dirs * rng.choice([-1, 1], size=(n, 1))


def _write_series(
    volumes: list[np.ndarray], affine, path: str, dtype, mask: np.ndarray, scale: float
) -> None:
    data = np.stack(volumes, -1)
    if np.dtype(dtype).kind in "iu":
        data = np.clip(np.rint(data * scale), 0, np.iinfo(dtype).max)
    image = nb.Nifti1Image(data.astype(dtype), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.to_filename(path)
    nb.Nifti1Image(mask.astype(np.uint8), affine).to_filename(path.replace(".nii", "_mask.nii", 1))


def make_dwi(
    directory,
    shape3d=(40, 40, 30),
    n_b0: int = 2,
    n_directions: int = 30,
    bvalues=(1000.0,),
    max_mm: float = 3.0,
    max_deg: float = 3.0,
    noise: float = 0.01,
    seed: int = 0,
    dtype="int16",
    compressed: bool = False,
    anisotropy: float = 0.6,
    name: str = "dwi",
) -> Phantom:
    """Write a DWI-like series (b=0 volumes first) with known motion.

    Parameters
    ----------
    directory : path-like
        Where to write ``{name}.nii[.gz]``, ``.bvec``, ``.bval`` and a brain mask.
    shape3d : tuple of int
        Grid size (2.5 mm isotropic voxels).
    n_b0, n_directions : int
        Number of b=0 and diffusion-weighted volumes (directions cycle over shells).
    bvalues : sequence of float
        Shells.
    max_mm, max_deg : float
        Bounds of the random rigid motion of diffusion-weighted volumes (b=0 volumes
        do not move: they are the reference).
    noise : float
        Gaussian noise as a fraction of the brightest tissue signal.
    anisotropy : float
        White-matter eigenvalues are ``0.8e-3 * (1 + a, 1 - a/2, 1 - a/2)``
        (a = 0.6 gives FA 0.4, 1.0 gives FA 0.67).
    """
    rng = np.random.default_rng(seed)
    affine = phantom_affine(shape3d)
    labels = anatomy(shape3d, rng)
    s0 = ndimage.gaussian_filter(np.array([0, 1.0, 0.8, 0.7, 0.75])[labels], 1.0)
    # background, CSF-like (free water), grey-matter-like, two white-matter-like
    # regions with their own fibre direction (FA 0.4 by default)
    evals = np.array([1.0 + anisotropy, 1.0 - anisotropy / 2, 1.0 - anisotropy / 2]) * 0.8e-3
    tensors = [np.zeros((3, 3)), np.eye(3) * 3.0e-3, np.eye(3) * 0.8e-3]
    for _ in range(2):
        axis = rng.normal(size=3)
        basis = np.linalg.qr(np.column_stack([axis, rng.normal(size=(3, 2))]))[0]
        tensors.append(basis @ np.diag(evals) @ basis.T)
    tensors = np.array(tensors)
    dirs = _direction_set(n_directions, rng)
    bvals = np.array([bvalues[i % len(bvalues)] for i in range(n_directions)])
    mask = labels > 0
    centre = affine[:3, :3] @ ((np.array(shape3d) - 1) / 2) + affine[:3, 3]
    motion = np.tile(np.eye(4), (n_b0 + n_directions, 1, 1))
    motion[n_b0:] = random_motion(n_directions, rng, max_mm, max_deg, centre)
    volumes = []
    for i in range(n_b0 + n_directions):
        if i < n_b0:
            truth = s0
        else:
            g, b = dirs[i - n_b0], bvals[i - n_b0]
            adc = np.einsum("i,rij,j->r", g, tensors, g)[labels]
            truth = s0 * np.exp(-b * ndimage.gaussian_filter(adc, 0.7))
        moved = _move(truth, affine, motion[i]) if i >= n_b0 else truth
        volumes.append(np.maximum(moved + rng.normal(0, noise, shape3d), 0))
    path = os.path.join(os.fspath(directory), f"{name}.nii" + (".gz" if compressed else ""))
    _write_series(volumes, affine, path, dtype, mask, scale=1000.0)
    all_bvals = np.concatenate([np.zeros(n_b0), bvals])
    all_dirs = np.vstack([np.zeros((n_b0, 3)), dirs])
    stem = os.path.join(os.fspath(directory), name)
    np.savetxt(f"{stem}.bval", all_bvals[np.newaxis], fmt="%g")
    np.savetxt(f"{stem}.bvec", all_dirs.T, fmt="%.6f")
    companions = {
        "bvec_file": f"{stem}.bvec",
        "bval_file": f"{stem}.bval",
        "brainmask_file": path.replace(".nii", "_mask.nii", 1),
    }
    return Phantom(image=path, motion=motion, companions=companions, affine=affine)


def make_pet(
    directory,
    shape3d=(40, 40, 30),
    n_frames: int = 16,
    max_mm: float = 3.0,
    max_deg: float = 3.0,
    noise: float = 0.01,
    seed: int = 0,
    dtype="float32",
    name: str = "pet",
) -> Phantom:
    """Write a PET-like series (regional time-activity curves) with known motion.

    The first frame is the motion-free reference; later frames move.
    """
    rng = np.random.default_rng(seed)
    affine = phantom_affine(shape3d)
    labels = anatomy(shape3d, rng)
    starts = np.cumsum(np.concatenate([[0.0], np.linspace(30, 300, n_frames - 1)]))
    durations = np.append(np.diff(starts), np.diff(starts)[-1])
    mid = starts + durations / 2
    # each region: a perfusion-like baseline (every frame has anatomy) plus a
    # tracer uptake curve of its own
    baseline = np.array([0.0, 1.0, 0.7, 0.5, 0.6])
    k_in, k_out = rng.uniform(0.2, 0.5, 5), rng.uniform(1e-3, 5e-3, 5)
    k_in[0] = 0.0
    centre = affine[:3, :3] @ ((np.array(shape3d) - 1) / 2) + affine[:3, 3]
    motion = np.tile(np.eye(4), (n_frames, 1, 1))
    motion[1:] = random_motion(n_frames - 1, rng, max_mm, max_deg, centre)
    volumes = []
    for i, t in enumerate(mid):
        activity = baseline + k_in * (1 - np.exp(-k_out * t))
        truth = ndimage.gaussian_filter(activity[labels], 1.0)
        moved = _move(truth, affine, motion[i]) if i else truth
        volumes.append(np.maximum(moved + rng.normal(0, noise, shape3d), 0))
    path = os.path.join(os.fspath(directory), f"{name}.nii")
    _write_series(volumes, affine, path, dtype, labels > 0, scale=1000.0)
    sidecar = os.path.join(os.fspath(directory), f"{name}.json")
    with open(sidecar, "w") as f:
        json.dump({"FrameTimesStart": starts.tolist(), "FrameDuration": durations.tolist()}, f)
    companions = {
        "temporal_file": sidecar,
        "brainmask_file": path.replace(".nii", "_mask.nii", 1),
    }
    return Phantom(image=path, motion=motion, companions=companions, affine=affine)


def write_series(path, shape, dtype="int16", seed: int = 0, block_volumes: int = 8) -> str:
    """Write a large random-ish NIfTI of ``shape`` without holding it in memory.

    For memory tests and benchmarks: volumes are generated and appended in blocks.
    """
    from .nifti import HEADER_BYTES, header_bytes, make_header

    path = os.fspath(path)
    header = make_header(shape, dtype, phantom_affine(shape[:3]))
    rng = np.random.default_rng(seed)
    base = (rng.random(shape[:3], dtype=np.float32) * 1000).astype(dtype)
    with open(path, "wb") as f:
        f.write(header_bytes(header))
        assert f.tell() == HEADER_BYTES
        for start in range(0, shape[3], block_volumes):
            n = min(block_volumes, shape[3] - start)
            block = np.empty((*shape[:3], n), dtype=dtype, order="F")
            for j in range(n):
                block[..., j] = base + np.asarray(start + j, dtype=dtype)
            f.write(memoryview(block.T.data).cast("B"))
    return path
