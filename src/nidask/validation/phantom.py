"""Synthetic DWI- and PET-like series with known head motion.

Used by the demo, the tests and the benchmarks: no downloads, reproducible from a
seed.  The anatomy is a smoothed set of ellipsoids; each region has its own
diffusion tensor (DWI) or time-activity curve (PET), so volumes differ in
contrast the way real series do.  Volume ``i`` is observed after rigid motion
``A_i`` (the convention of docs/concepts.md, "Motion matrices"): resampling the
observed volume with ``A_i`` gives the motion-free volume back.
"""

from __future__ import annotations

import gzip
import json
import os

import attrs
import nibabel as nb
import numpy as np
from scipy import ndimage

from nidask.errors import InputError
from nidask.geometry import fov_center, ras_to_fsl, rigid_matrix
from nidask.ops.resample import block_mean, resample_volume
from nidask.validation.evaluation import motion_errors  # noqa: F401  (nidask.validation.phantom.motion_errors)


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


def _move(
    volume: np.ndarray, affine: np.ndarray, motion: np.ndarray, order: int = 3
) -> np.ndarray:
    # observed = truth resampled with inv(A): resampling it with A gives truth back
    voxel = np.linalg.inv(affine) @ np.linalg.inv(motion) @ affine
    return resample_volume(volume, voxel, order=order)


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
    volumes, n: int, affine, path: str, dtype, mask: np.ndarray, scale: float
) -> None:
    """Write ``n`` volumes (any iterable, consumed one at a time) and the mask beside them.

    Integer types store ``volume * scale``, rounded.  Volumes are appended as they
    come, so a series of any length never sits in memory (``.gz`` names are gzipped).
    """
    from nidask.io.nifti import header_bytes, make_header

    header = make_header((*mask.shape, n), dtype, affine)
    opener = gzip.open if path.endswith(".gz") else open
    written = 0
    with opener(path, "wb") as f:
        f.write(header_bytes(header))
        for volume in volumes:
            if np.dtype(dtype).kind in "iu":
                volume = np.clip(np.rint(volume * scale), 0, np.iinfo(dtype).max)
            f.write(np.asarray(volume, dtype=dtype).tobytes(order="F"))
            written += 1
    if written != n:  # pragma: no cover - a generator bug
        raise RuntimeError(f"wrote {written} volumes to {path}, expected {n}")
    nb.Nifti1Image(mask.astype(np.uint8), affine).to_filename(path.replace(".nii", "_mask.nii", 1))


def smooth_field(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth Gaussian random field of unit standard deviation (float32)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (field - field.mean()) / max(float(field.std()), 1e-12)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=0, keepdims=True), 1e-12)


@attrs.define
class BrainModel:
    """Tissue maps of a synthetic brain on a (fine) grid, in the head's own frame.

    ``fractions`` holds the scalp, CSF, grey- and white-matter fractions (4, X, Y, Z);
    white matter has a main fibre direction ``fibre1`` and, where ``crossing`` > 0,
    a second one ``fibre2`` (both (3, X, Y, Z)).  ``s0`` is the b=0 signal.
    """

    s0: np.ndarray
    fractions: np.ndarray
    fibre1: np.ndarray
    fibre2: np.ndarray
    crossing: np.ndarray

    #: Isotropic compartments of scalp, CSF and grey matter: (fraction, diffusivity
    #: mm²/s) pairs.  Grey matter decays bi-exponentially, as tissue does at high b
    #: (apparent diffusivity 0.7 µm²/ms at b=1000, a fifth of S0 left at b=3000).
    compartments = (((1.0, 1.2e-3),), ((1.0, 3.0e-3),), ((0.65, 1.1e-3), (0.35, 0.25e-3)))
    #: Relative b=0 signal (T2 weighting) of scalp, CSF, grey and white matter.
    t2_signal = (0.5, 2.0, 1.0, 0.8)

    def signal(self, direction, bvalue: float, anisotropy: float) -> np.ndarray:
        """Noise-free signal for one gradient (direction in the head's frame)."""
        g = np.asarray(direction, dtype=np.float32)
        b = float(bvalue)
        total = np.zeros(self.s0.shape, dtype=np.float32)
        for k, parts in enumerate(self.compartments):
            total += self.fractions[k] * np.float32(sum(f * np.exp(-b * d) for f, d in parts))
        if b > 0:
            fibres = np.zeros_like(total)
            for weight, fibre in ((1 - self.crossing, self.fibre1), (self.crossing, self.fibre2)):
                cosine2 = np.einsum("i,i...->...", g, fibre) ** 2
                fibres += weight * fibre_signal(cosine2, b, anisotropy)
            total += self.fractions[3] * fibres
        else:
            total += self.fractions[3]
        return self.s0 * total


#: Axial diffusivity (mm²/s) of white-matter fibres, inside and outside the axons.
AXIAL_DIFFUSIVITY = 1.7e-3


def fibre_signal(cosine2, bvalue: float, anisotropy: float) -> np.ndarray:
    """Signal of a white-matter fibre bundle, as NODDI models one (without dispersion).

    Intra-axonal sticks (volume fraction ``anisotropy``) and an extra-axonal
    tensor whose radial diffusivity follows the tortuosity model,
    ``AXIAL_DIFFUSIVITY * (1 - anisotropy)``; ``cosine2`` is the squared cosine between
    gradient and fibre.  At 0.5: FA 0.7 and MD 0.7 µm²/ms at b=1000; at b=3000, 54 %
    of S0 across the fibre, under 1 % along it.
    """
    axial = AXIAL_DIFFUSIVITY
    radial = axial * (1.0 - anisotropy)
    inside = np.exp(-bvalue * axial * cosine2)
    outside = np.exp(-bvalue * (radial + (axial - radial) * cosine2))
    return anisotropy * inside + (1.0 - anisotropy) * outside


def brain_model(shape3d, rng: np.random.Generator) -> BrainModel:
    """A brain-like head: scalp, skull gap, folded cortex, ventricles, deep grey matter.

    Boundaries are perturbed by smooth random fields (gyri), fibre directions vary
    smoothly and cross in about a third of the white matter, and the b=0 signal has
    a few percent of smooth texture, so no two places look alike.
    """
    shape3d = tuple(int(s) for s in shape3d)
    # the head spans 85 % of the field of view: a margin of air all around, as scans have
    grid = np.stack(
        np.meshgrid(
            *[np.linspace(-1, 1, s, dtype=np.float32) / 0.85 for s in shape3d], indexing="ij"
        )
    )
    scale = max(shape3d) / 24.0  # field smoothness in grid voxels, relative to the grid
    radius = np.sqrt((grid[0] / 0.9) ** 2 + (grid[1] / 0.84) ** 2 + (grid[2] / 0.86) ** 2)
    radius += 0.02 * smooth_field(shape3d, 3 * scale, rng)
    folded = radius + 0.07 * smooth_field(shape3d, 1.2 * scale, rng)

    def ellipsoid(centre, radii):
        rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        local = np.einsum("ij,i...->j...", rotation, grid - np.reshape(centre, (3, 1, 1, 1)))
        return ((local / np.reshape(radii, (3, 1, 1, 1))) ** 2).sum(0) <= 1

    scalp = (radius > 0.94) & (radius <= 1.0)
    brain = radius <= 0.88
    csf = brain & (radius > 0.84)
    white = brain & ~csf & (folded < 0.64)
    grey = brain & ~csf & ~white
    for side in (-1, 1):
        centre = np.array([0.13 * side, 0.04, 0.1]) + rng.uniform(-0.03, 0.03, 3)
        ventricle = ellipsoid(centre, np.array([0.06, 0.26, 0.11]))
        nucleus = ellipsoid(
            np.array([0.27 * side, -0.04, -0.06]) + rng.uniform(-0.03, 0.03, 3),
            np.array([0.09, 0.14, 0.11]),
        )
        grey |= nucleus & white
        white &= ~nucleus
        csf |= ventricle & brain
        white &= ~ventricle
        grey &= ~ventricle
    fractions = np.stack([scalp, csf, grey, white]).astype(np.float32)
    s0 = np.einsum("k,k...->...", np.asarray(BrainModel.t2_signal, np.float32), fractions)
    s0 *= 1 + 0.04 * smooth_field(shape3d, 0.7 * scale, rng)
    return BrainModel(
        s0=s0.astype(np.float32), fractions=fractions, **_fibres(shape3d, scale, rng)
    )


def _fibres(shape3d, scale: float, rng: np.random.Generator) -> dict:
    """Fibre fields of a :class:`BrainModel`: ``fibre1``, ``fibre2`` and ``crossing``.

    Directions vary smoothly (over ``scale`` voxels), with a voxel-scale dispersion
    (about 15 degrees) that the acquisition grid averages over; fibres cross in
    about a third of the volume.
    """
    fibre1 = _unit(
        np.stack([smooth_field(shape3d, 2.5 * scale, rng) for _ in range(3)])
        + np.reshape(rng.normal(size=3), (3, 1, 1, 1)).astype(np.float32)
    )
    fibre1 = _unit(fibre1 + 0.27 * rng.standard_normal(fibre1.shape).astype(np.float32))
    other = np.stack([smooth_field(shape3d, 2.5 * scale, rng) for _ in range(3)])
    other += 0.27 * rng.standard_normal(other.shape).astype(np.float32)
    fibre2 = _unit(other - np.einsum("i...,i...->...", other, fibre1) * fibre1)
    crossing = np.clip(smooth_field(shape3d, 2 * scale, rng) - 0.4, 0, 0.5).astype(np.float32)
    return {
        "fibre1": fibre1.astype(np.float32),
        "fibre2": fibre2.astype(np.float32),
        "crossing": crossing,
    }


@attrs.define
class RealAnatomy:
    """A :class:`BrainModel` built on a real scan, with its grid and brain mask."""

    brain: BrainModel
    affine: np.ndarray
    mask: np.ndarray

    @property
    def shape3d(self) -> tuple:
        return self.mask.shape


def real_anatomy(
    b0: np.ndarray,
    weighted: np.ndarray,
    bvalue: float,
    affine: np.ndarray,
    zooms: float = 2.0,
    seed: int = 0,
    shape3d: tuple | None = None,
) -> RealAnatomy:
    """Tissue classes of a real scan, regridded to ``zooms`` mm, as a brain model.

    ``b0`` and ``weighted`` (one diffusion-weighted volume at ``bvalue``) are the
    scan's images on the grid of ``affine`` (heudiconv's Siemens DWI, as dcm2niix
    writes it, is what the benchmarks use).  The new grid keeps the scan's
    orientation (an oblique LAS image stays one), covers the head with a margin (or,
    with ``shape3d``, has that shape, centred on the head), and is sampled from the
    scan smoothed to the new voxel size.  CSF is where the
    apparent diffusivity is high; white matter is the darker tissue of the
    T2-weighted b=0 (its 25th to 65th percentile ramp); the rest of the brain is grey
    matter, and signal outside the brain is scalp.  The b=0 signal ``s0`` is the
    scan's own b=0, so every edge and texture of the anatomy is real; fibre
    directions are smooth random fields (:func:`_fibres`).
    """
    rng = np.random.default_rng(seed)
    b0 = np.asarray(b0, dtype=np.float64)
    weighted = np.asarray(weighted, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    old_zooms = np.linalg.norm(affine[:3, :3], axis=0)
    level = float(np.percentile(b0, 99))
    head = ndimage.binary_dilation(b0 > 0.05 * level, iterations=2)
    corners = np.array(np.nonzero(head)).T
    low, high = corners.min(axis=0), corners.max(axis=0)
    extent = (high - low) * old_zooms + 8.0  # mm, 4 mm of margin each side
    margin = np.full(3, 4.0 / zooms)  # new voxels between the grid's corner and the head's
    if shape3d is None:
        shape3d = tuple(int(np.ceil(e / zooms)) for e in extent)
    else:
        shape3d = tuple(int(v) for v in shape3d)
        margin = (np.array(shape3d) - 1 - (high - low) * old_zooms / zooms) / 2
    new = affine[:3, :3] / old_zooms * zooms
    start = affine[:3, :3] @ low + affine[:3, 3] - new @ margin
    new_affine = np.eye(4)
    new_affine[:3, :3], new_affine[:3, 3] = new, start
    voxel = np.linalg.inv(affine) @ new_affine
    # a Gaussian of the new voxel's width (FWHM) less the old one's
    sigma = np.sqrt(np.maximum(zooms**2 - old_zooms**2, 0)) / 2.355 / old_zooms

    def regrid(image):
        smooth = ndimage.gaussian_filter(image, sigma)
        out = ndimage.affine_transform(
            smooth, voxel[:3, :3], voxel[:3, 3], output_shape=shape3d, order=3, mode="nearest"
        )
        return np.maximum(out, 0.0)

    s0, dw = regrid(b0), regrid(weighted)
    level = float(np.percentile(s0, 99))
    brain = ndimage.binary_fill_holes(ndimage.binary_opening(s0 > 0.12 * level, iterations=2))
    labels, count = ndimage.label(brain)
    if count > 1:
        brain = labels == 1 + int(np.argmax(ndimage.sum(brain, labels, range(1, count + 1))))
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = -np.log(np.clip(dw / np.maximum(s0, 1e-6), 1e-4, 1.0)) / float(bvalue)
    adc = ndimage.median_filter(np.nan_to_num(adc), 3)
    csf = np.clip((adc - 1.4e-3) / 1.2e-3, 0.0, 1.0) * brain
    tissue = brain & (csf < 0.5)
    wm_level, gm_level = np.percentile(s0[tissue], [25, 65])
    inner = ndimage.binary_erosion(brain, iterations=2)  # the dark rim is partial volume
    white = np.clip((gm_level - s0) / (gm_level - wm_level), 0.0, 1.0) * (1 - csf) * inner
    grey = (1 - csf - white) * brain
    scalp = (~brain).astype(np.float64)
    fractions = np.stack([scalp, csf, grey, white]).astype(np.float32)
    model = BrainModel(
        s0=s0.astype(np.float32),
        fractions=fractions,
        **_fibres(shape3d, max(shape3d) / 24.0, rng),
    )
    return RealAnatomy(brain=model, affine=new_affine, mask=brain)


def make_real_dwi(
    directory,
    anatomy: RealAnatomy,
    bvals,
    bvecs,
    motion,
    *,
    snr: float = 25.0,
    anisotropy: float = 0.5,
    seed: int = 0,
    name: str = "dwi",
    dtype="float32",
    eddy=None,
) -> Phantom:
    """Write a diffusion series of real anatomy (:func:`real_anatomy`) with known motion.

    Volume ``i`` is the signal for the gradient as the moved head sees it
    (``R_i^T g_i``), moved by ``motion[i]`` (cubic B-spline), with Rician noise of
    standard deviation ``mean(b=0 in the brain) / snr`` (``snr=0``: noise-free, the
    twin of the same series for the Cramér-Rao bound).  ``bvecs`` are RAS+; the
    ``.bvec`` is written in FSL's frame of the (oblique LAS) grid.

    ``eddy`` (N, 4, 4), optional: each volume's eddy-current part ``E``
    (:func:`nidask.geometry.eddy_matrix`), applied in the scanner after the motion,
    its Jacobian modulating the intensity; ``Phantom.motion`` then holds the whole
    matrices ``E @ M``.
    """
    rng = np.random.default_rng(seed)
    bvals = np.asarray(bvals, dtype=float)
    bvecs = np.asarray(bvecs, dtype=float)
    motion = np.asarray(motion, dtype=float)
    brain, affine = anatomy.brain, anatomy.affine
    sigma = float(brain.s0[anatomy.mask].mean()) / snr if snr > 0 else 0.0
    level = float(np.percentile(brain.s0, 99))

    def volumes():
        for i in range(len(bvals)):
            head = motion[i][:3, :3].T @ bvecs[i]
            whole = motion[i] if eddy is None else eddy[i] @ motion[i]
            moved = _move(brain.signal(head, bvals[i], anisotropy), affine, whole)
            if eddy is not None:  # a stretched image spreads its signal thinner
                moved = moved / np.linalg.det(eddy[i][:3, :3])
            yield _add_noise(np.maximum(moved, 0.0) / level, sigma / level, True, rng)

    path = os.path.join(os.fspath(directory), f"{name}.nii")
    _write_series(volumes(), len(bvals), affine, path, dtype, anatomy.mask, scale=1000.0)
    whole = motion if eddy is None else np.asarray(eddy, dtype=float) @ motion
    return _dwi_phantom(path, name, bvals, bvecs, whole, affine)


def shell_directions(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` directions spread over the sphere (golden spiral, randomly rotated)."""
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    return _direction_set(n, rng) @ rotation.T


def acquisition_scheme(
    n_b0: int,
    n_directions: int,
    bvalues,
    rng: np.random.Generator,
    b0_every: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """b-values (N,) and unit b-vectors (N, 3) in acquisition order.

    Shells take turns (as HCP interleaves them), each with its own direction set;
    b=0 volumes come first, or one every ``b0_every`` volumes from the first on.
    """
    bvalues = [float(b) for b in bvalues]
    per_shell = [
        n_directions // len(bvalues) + (k < n_directions % len(bvalues))
        for k in range(len(bvalues))
    ]
    shells = [shell_directions(n, rng) for n in per_shell]
    dw_bvals, dw_dirs, taken = [], [], [0] * len(bvalues)
    for i in range(n_directions):
        k = i % len(bvalues)
        while taken[k] >= per_shell[k]:
            k = (k + 1) % len(bvalues)
        dw_bvals.append(bvalues[k])
        dw_dirs.append(shells[k][taken[k]])
        taken[k] += 1
    n = n_b0 + n_directions
    if b0_every is None:
        is_b0 = np.arange(n) < n_b0
    else:
        slots = [min(j * b0_every, n - 1) for j in range(n_b0)]
        is_b0 = np.zeros(n, dtype=bool)
        for s in slots:
            while is_b0[s]:
                s -= 1
            is_b0[s] = True
    bvals, bvecs = np.zeros(n), np.zeros((n, 3))
    bvals[~is_b0] = dw_bvals
    bvecs[~is_b0] = dw_dirs
    return bvals, bvecs


def realistic_motion(
    n: int, rng: np.random.Generator, max_mm: float, max_deg: float, centre
) -> np.ndarray:
    """(n, 4, 4) rigid matrices: a slow drift, a few sudden jumps and a small jitter.

    Each of the six parameters drifts as a smoothed random walk; at about one
    volume in twelve the head jumps to a new position and stays there.  Every
    parameter is then scaled so that its largest excursion is ``max_mm`` (mm) or
    ``max_deg`` (degrees) times a random factor in [0.5, 1].
    """
    steps = rng.normal(size=(n, 6))
    drift = ndimage.gaussian_filter1d(np.cumsum(steps, axis=0), max(n / 30, 1.0), axis=0)
    jumps = np.cumsum((rng.random((n, 1)) < 1 / 12) * rng.normal(0, 2.0, (n, 6)), axis=0)
    params = drift + jumps * np.std(drift, axis=0) + 0.05 * rng.normal(size=(n, 6))
    params -= params.mean(axis=0)
    params /= np.maximum(np.abs(params).max(axis=0), 1e-12)
    bounds = np.r_[[max_mm] * 3, np.radians([max_deg] * 3)] * rng.uniform(0.5, 1.0, 6)
    return motion_from_parameters(params * bounds, centre)


def motion_from_parameters(params, centre=None) -> np.ndarray:
    """(n, 4, 4) rigid matrices from rows ``tx, ty, tz`` (mm), ``rx, ry, rz`` (radians)."""
    return np.stack([rigid_matrix(p, center=centre) for p in np.asarray(params, dtype=float)])


def mcflirt_trajectory(path, n: int | None = None, scale: float = 1.0, centre=None) -> np.ndarray:
    """A real head-motion trajectory from an FSL MCFLIRT ``.par`` file as (n, 4, 4).

    MCFLIRT writes ``rx ry rz`` (radians) then ``tx ty tz`` (mm) per volume.  The
    first ``n`` rows are used (every row by default), multiplied by ``scale``, and
    applied about ``centre`` in nidask's convention.
    """
    rows = np.loadtxt(os.fspath(path), ndmin=2)
    if rows.shape[1] != 6:
        raise InputError(f"a motion parameter file needs 6 columns, got {rows.shape[1]}", path)
    if n is not None:
        if n > len(rows):
            raise InputError(f"asked for {n} volumes, the trajectory has {len(rows)}", path)
        rows = rows[:n]
    return motion_from_parameters(np.hstack([rows[:, 3:], rows[:, :3]]) * scale, centre)


def _fine_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of a grid ``factor`` times finer whose blocks average to ``affine``'s voxels."""
    fine = np.diag([1.0 / factor] * 3 + [1.0])
    fine[:3, 3] = -(factor - 1) / (2.0 * factor)
    return affine @ fine


def _motion_for(motion, n: int, rng, max_mm, max_deg, centre) -> np.ndarray:
    if isinstance(motion, str):
        if motion == "random":
            return random_motion(n, rng, max_mm, max_deg, centre)
        if motion == "realistic":
            return realistic_motion(n, rng, max_mm, max_deg, centre)
        raise InputError(f"unknown motion {motion!r} (use 'random', 'realistic' or matrices)")
    matrices = np.asarray(motion, dtype=float)
    if matrices.shape != (n, 4, 4):
        raise InputError(f"motion must be ({n}, 4, 4) matrices, got {matrices.shape}")
    return matrices


def _dwi_phantom(path: str, name: str, bvals, bvecs, motion, affine) -> Phantom:
    """Write the gradient tables (FSL's frame) beside a DWI phantom's series at ``path``."""
    stem = os.path.join(os.path.dirname(path), name)
    np.savetxt(f"{stem}.bval", np.asarray(bvals)[np.newaxis], fmt="%g")
    np.savetxt(f"{stem}.bvec", ras_to_fsl(bvecs, affine).T, fmt="%.6f")
    companions = {
        "bvec_file": f"{stem}.bvec",
        "bval_file": f"{stem}.bval",
        "brainmask_file": path.replace(".nii", "_mask.nii", 1),
    }
    return Phantom(image=path, motion=motion, companions=companions, affine=affine)


def make_dwi(
    directory,
    shape3d=(40, 40, 30),
    n_b0: int = 2,
    n_directions: int = 30,
    bvalues=(1000.0,),
    max_mm: float = 3.0,
    max_deg: float = 3.0,
    noise: float = 0.04,
    seed: int = 0,
    dtype="int16",
    compressed: bool = False,
    anisotropy: float = 0.5,
    name: str = "dwi",
    *,
    motion="random",
    move_b0: bool = True,
    b0_every: int | None = None,
    rician: bool = True,
    supersample: int = 2,
    bias: float = 0.1,
    zooms=(2.5, 2.5, 2.5),
    head_frame_gradients: bool = True,
) -> Phantom:
    """Write a diffusion series of a synthetic brain with known head motion.

    The brain (:func:`brain_model`: scalp, folded cortex, ventricles, deep grey
    matter, white matter with smoothly varying and crossing fibres) is built on a
    grid ``supersample`` times finer than the acquisition.  For each volume the
    signal is computed for the gradient as the moved head sees it (its direction
    rotated into the head's frame), moved with the volume's motion on the fine
    grid, averaged down to the acquisition grid (partial volumes), multiplied by a
    receive-coil bias field that stays put in the scanner while the head moves, and
    given Rician noise.  The estimator therefore never sees data made with its own
    interpolator.

    Parameters
    ----------
    directory : path-like
        Where to write ``{name}.nii[.gz]``, ``.bvec``, ``.bval`` and ``{name}_mask.nii``.
    shape3d : tuple of int
        Acquisition grid.
    n_b0, n_directions : int
        Number of b=0 and diffusion-weighted volumes (shells take turns).
    bvalues : sequence of float
        Shells (s/mm²), e.g. ``(1000, 2000, 3000)`` for an HCP-like scheme.
    max_mm, max_deg : float
        Size of the motion (see ``motion``).
    noise : float
        Noise standard deviation relative to grey matter's b=0 signal (0.04: SNR 25
        in grey matter, 20 in white matter at b=0).
    anisotropy : float
        Intra-axonal volume fraction of white-matter fibres (:func:`fibre_signal`;
        0.5: FA 0.7 in a single-fibre voxel; dispersion and crossings lower it).
    motion : {"random", "realistic"} or ndarray (N, 4, 4)
        ``"random"``: independent uniform parameters up to the bounds (hard);
        ``"realistic"``: drift plus sudden jumps (:func:`realistic_motion`); or the
        matrices themselves (e.g. :func:`mcflirt_trajectory`).
    move_b0 : bool
        Move the b=0 volumes too (they move like the rest in real scans).
    b0_every : int, optional
        Interleave the b=0 volumes, one every ``b0_every`` volumes (default: first).
    rician : bool
        Rician (magnitude) noise instead of Gaussian.
    supersample : int
        Fineness of the simulation grid relative to the acquisition grid.
    bias : float
        Amplitude of the static coil bias field (0 for none).
    zooms : tuple of float
        Voxel size (mm).
    head_frame_gradients : bool
        Compute each volume's signal for its gradient as the moved head sees it
        (rotated into the head's frame), as physics has it.  ``False`` uses the
        nominal gradient: a corrected volume then equals its motion-free twin up to
        interpolation, which isolates resampling in tests.

    Returns
    -------
    Phantom
        ``motion[i]`` is the true matrix of file volume ``i``; the brain mask is the
        head's brain in its reference position.
    """
    rng = np.random.default_rng(seed)
    affine = phantom_affine(shape3d, zooms)
    factor = int(supersample)
    fine_shape = tuple(int(s) * factor for s in shape3d)
    fine_affine = _fine_affine(affine, factor)
    brain = brain_model(fine_shape, rng)
    # the acquisition's point-spread function: about half a voxel of blur, so edges
    # are not sharper than an MRI's k-space truncation leaves them
    brain.fractions = ndimage.gaussian_filter(brain.fractions, (0, *[0.5 * factor] * 3))
    brain.s0 = ndimage.gaussian_filter(brain.s0, 0.5 * factor)
    bvals, bvecs = acquisition_scheme(n_b0, n_directions, bvalues, rng, b0_every)
    n = len(bvals)
    centre = fov_center(affine, shape3d)
    motion = _motion_for(motion, n, rng, max_mm, max_deg, centre)
    if not move_b0:
        motion[bvals == 0] = np.eye(4)
    coil = 1 + bias * smooth_field(tuple(shape3d), max(shape3d) / 3, rng)

    def volumes():
        for i in range(n):
            # the head turned by R sees the scanner's gradient g as R^T g
            head = motion[i][:3, :3].T @ bvecs[i] if head_frame_gradients else bvecs[i]
            truth = brain.signal(head, bvals[i], anisotropy)
            # on a finer grid linear interpolation suffices: the block mean smooths it
            moved = _move(truth, fine_affine, motion[i], order=1 if factor > 1 else 3)
            yield _add_noise(block_mean(moved, factor) * coil, noise, rician, rng)

    path = os.path.join(os.fspath(directory), f"{name}.nii" + (".gz" if compressed else ""))
    mask = block_mean(brain.fractions[1:].sum(0), factor) > 0.5
    _write_series(volumes(), n, affine, path, dtype, mask, scale=1000.0)
    return _dwi_phantom(path, name, bvals, bvecs, motion, affine)


def _add_noise(volume, sigma: float, rician: bool, rng) -> np.ndarray:
    real = volume + rng.normal(0, sigma, volume.shape)
    if not rician:
        return np.maximum(real, 0)
    return np.hypot(real, rng.normal(0, sigma, volume.shape))


def make_hcp_like(
    directory,
    shape3d=(145, 174, 145),
    zooms=(1.25, 1.25, 1.25),
    n_per_shell: int = 90,
    n_b0: int = 18,
    bvalues=(1000.0, 2000.0, 3000.0),
    **options,
) -> Phantom:
    """An HCP-like multi-shell series: b = 1000, 2000, 3000 s/mm², interleaved b=0.

    The Human Connectome Project's scheme is 90 directions per shell and 18 b=0
    volumes (288 in all) on a 145 x 174 x 145 grid of 1.25 mm voxels; smaller grids
    and schemes keep the same proportions.  Motion is ``"realistic"`` and the b=0
    volumes move; other options go to :func:`make_dwi`.
    """
    n_directions = len(bvalues) * n_per_shell
    options.setdefault("motion", "realistic")
    options.setdefault("b0_every", max((n_directions + n_b0) // max(n_b0, 1), 1))
    return make_dwi(
        directory,
        shape3d=shape3d,
        zooms=zooms,
        n_b0=n_b0,
        n_directions=n_directions,
        bvalues=bvalues,
        **options,
    )


def make_moved_series(
    directory,
    volume: np.ndarray,
    affine: np.ndarray,
    motion: np.ndarray,
    *,
    noise: float = 0.02,
    seed: int = 0,
    dtype="int16",
    name: str = "series",
    mask: np.ndarray | None = None,
) -> Phantom:
    """Write a same-contrast series: one (real) volume moved by known motion, plus noise.

    For measuring motion on real anatomy (e.g. a scanner's b=0 or EPI volume moved
    by a real trajectory, :func:`mcflirt_trajectory`): volume ``i`` is ``volume``
    observed after ``motion[i]`` (cubic interpolation), with Rician noise of
    ``noise`` times the volume's 99th percentile.  The mask (default: voxels above
    a tenth of that percentile) is written beside it.
    """
    rng = np.random.default_rng(seed)
    volume = np.asarray(volume, dtype=np.float64)
    level = float(np.percentile(volume, 99))
    motion = np.asarray(motion, dtype=float)
    volumes = [_add_noise(_move(volume, affine, m) / level, noise, True, rng) for m in motion]
    if mask is None:
        mask = ndimage.binary_fill_holes(volume > 0.1 * level)
    path = os.path.join(os.fspath(directory), f"{name}.nii")
    _write_series(volumes, len(volumes), affine, path, dtype, mask, scale=1000.0)
    companions = {"brainmask_file": path.replace(".nii", "_mask.nii", 1)}
    return Phantom(image=path, motion=motion, companions=companions, affine=np.asarray(affine))


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
    _write_series(volumes, len(volumes), affine, path, dtype, labels > 0, scale=1000.0)
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
    from nidask.io.nifti import HEADER_BYTES, header_bytes, make_header

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


def drop_slices(phantom: Phantom, dropped, factor: float = 0.4, axis: int = 2) -> Phantom:
    """The phantom's series with signal lost in some slices, as motion during the
    diffusion encoding loses it: a copy named ``{stem}_dropped.nii`` beside it.

    ``dropped`` holds ``(volume, slice)`` pairs (file volume, index along ``axis``);
    each such slice of the acquired volume is multiplied by ``factor`` (or by the
    matching entry of a sequence ``factor``).  The companions stay the original ones.
    """
    image = nb.load(phantom.image)
    data = np.asarray(image.dataobj)
    factors = np.broadcast_to(np.asarray(factor, dtype=float), (len(dropped),))
    out = data.astype(np.float64)
    for (volume, k), f in zip(dropped, factors, strict=True):
        index = [slice(None)] * 4
        index[axis], index[3] = int(k), int(volume)
        out[tuple(index)] *= f
    if np.issubdtype(data.dtype, np.integer):
        out = np.rint(out)
    path = phantom.image.replace(".nii", "_dropped.nii", 1)
    nb.Nifti1Image(out.astype(data.dtype), image.affine, image.header).to_filename(path)
    return attrs.evolve(phantom, image=path)
