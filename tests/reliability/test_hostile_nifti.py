"""Hostile NIfTI files: every header either loads correctly or raises nidask's InputError.

Headers are written byte for byte (nibabel's header struct, no consistency fixes),
so dims, datatype codes, scaling and ``vox_offset`` can hold anything a damaged or
malicious file could.  The oracle is independent of nibabel: when ``nidask.load``
accepts a file, its shape must be the one the header declares and volume 0 must be
the bytes at ``vox_offset`` decoded with the declared dtype and scaling.
"""

from __future__ import annotations

import gzip
import math
import os
import tracemalloc
import warnings

import nibabel as nb
import numpy as np
import pytest
from guards import bounded_memory
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import nidask
from nidask import NidaskError

#: NIfTI datatype code -> numpy dtype (None: nidask must refuse it).
CODES = {
    2: np.uint8,
    4: np.int16,
    8: np.int32,
    16: np.float32,
    64: np.float64,
    256: np.int8,
    512: np.uint16,
    768: np.uint32,
    1024: np.int64,
    1280: np.uint64,
    0: None,  # unknown
    1: None,  # binary
    3: None,  # not a code
    32: None,  # complex64
    128: None,  # RGB24
    1536: None,  # float128
    1792: None,  # complex128
    2048: None,  # complex256
    2304: None,  # RGBA32
    9999: None,
}
HEADER_SIZE = {1: 352, 2: 544}
#: Largest volume whose values are checked (bigger ones are only opened).
CHECKED_VOLUME_BYTES = 2**20
#: Opening a file reads headers only: far less than any declared data.
OPEN_BUDGET = 32 * 2**20

#: Examples per property; raise it for a deeper local search (CI keeps it modest).
EXAMPLES = int(os.environ.get("NIDASK_HOSTILE_EXAMPLES", "100"))
HOSTILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def headers(draw):
    """Keyword arguments of :func:`write_raw_nifti`: a valid file with 0-3 hostile fields."""
    version = draw(st.sampled_from([1, 1, 2]))
    header_size = HEADER_SIZE[version]
    ndim = draw(st.sampled_from([3, 4, 4]))
    dims = [draw(st.integers(1, 5)) for _ in range(ndim)]
    dims += [draw(st.sampled_from([1, 1, 0, 3])) for _ in range(7 - ndim)]  # ignored
    spec = dict(
        version=version,
        dim=[ndim, *dims],
        code=draw(st.sampled_from([c for c, t in CODES.items() if t is not None])),
        offset=header_size,
        slope=draw(st.sampled_from([1.0, 1.0, 2.5, -1.0])),
        inter=draw(st.sampled_from([0.0, 0.0, 1.5])),
        fraction=1.0,
        zoom=2.0,
        sform=1,
        compressed=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )
    big = [32767, -32768] if version == 1 else [2**31, 2**40, 2**62]
    faults = {
        "ndim": st.sampled_from([-1, 0, 1, 2, 5, 6, 7, 8, 100]),
        "dim": st.tuples(st.integers(1, 7), st.sampled_from([0, -1, -3, *big])),
        "code": st.sampled_from([c for c, t in CODES.items() if t is None]),
        "offset": st.sampled_from(
            [0, -16, header_size + 1, header_size + 8, header_size + 100, 2**20, 2**32]
            + ([float("nan")] if version == 1 else [2**62])  # NIfTI-2 offsets are int64
        ),
        "slope": st.sampled_from([0.0, 1e38, -1e-30, float("nan"), float("inf")]),
        "inter": st.sampled_from([-1e38, float("nan"), float("inf")]),
        "fraction": st.sampled_from([0.0, 0.1, 0.5, 0.99, 1.5]),
        "zoom": st.sampled_from([0.0, -2.0, 1e-30, float("nan"), float("inf")]),
        "sform": st.just(0),
    }
    for name in draw(st.lists(st.sampled_from(sorted(faults)), max_size=3, unique=True)):
        value = draw(faults[name])
        if name == "ndim":
            spec["dim"][0] = value
        elif name == "dim":
            spec["dim"][value[0]] = value[1]
        else:
            spec[name] = value
    return spec


def declared(dim) -> tuple[int, ...]:
    """The shape a header declares (``dim[1:dim[0]+1]``), ``()`` if ``dim[0]`` is invalid."""
    ndim = dim[0]
    return tuple(int(d) for d in dim[1 : ndim + 1]) if 1 <= ndim <= 7 else ()


def declared_bytes(dim, code) -> int | None:
    """Bytes of data the header declares, or None when that is not defined."""
    shape = declared(dim)
    dtype = CODES.get(code)
    if not shape or dtype is None or min(shape) < 0:
        return None
    return math.prod(shape) * np.dtype(dtype).itemsize


def write_raw_nifti(
    path, *, version, dim, code, offset, slope, inter, fraction, zoom, sform, compressed, seed
) -> str:
    """Write a header exactly as given, then (capped) random data bytes."""
    header = (nb.Nifti1Header if version == 1 else nb.Nifti2Header)()
    header["dim"] = dim
    header["datatype"] = code
    header["bitpix"] = 8 * np.dtype(CODES.get(code) or np.uint8).itemsize
    header["pixdim"] = [1.0, zoom, zoom, zoom, 1.0, 1.0, 1.0, 1.0]
    header["vox_offset"] = offset
    header["scl_slope"], header["scl_inter"] = slope, inter
    header["qform_code"], header["sform_code"] = 0, sform
    with np.errstate(invalid="ignore"):
        header["srow_x"], header["srow_y"], header["srow_z"] = np.eye(4)[:3] * zoom
    block = header.binaryblock + b"\0" * 4  # + the "no extensions" flag
    start = int(offset) if np.isfinite(offset) and offset >= len(block) else len(block)
    size = declared_bytes(dim, code) or 64
    length = min(int(size * fraction), 2**22)
    data = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
    if compressed:
        path = f"{path}.gz"
        padding = b"\0" * (start - len(block)) if start <= 2**22 else b""
        with gzip.open(path, "wb", compresslevel=1) as f:
            f.write(block + padding + data)
    else:
        with open(path, "wb") as f:
            f.write(block)
            if start <= 2**31:  # beyond that the file simply ends before its data
                f.seek(start)  # a hole up to vox_offset: sparse, no disk used
                f.write(data)
    return os.fspath(path)


def expected_volume(path, spec) -> np.ndarray:
    """Volume 0 decoded from the raw bytes, without nibabel."""
    shape = declared(spec["dim"]) + (1,) * 3
    size3d = math.prod(shape[:3])
    dtype = np.dtype(CODES[spec["code"]]).newbyteorder("<")
    opener = gzip.open if spec["compressed"] else open
    with opener(path, "rb") as f:
        f.seek(int(spec["offset"]))
        raw = f.read(size3d * dtype.itemsize)
    volume = np.frombuffer(raw, dtype=dtype).reshape(shape[:3], order="F")
    slope, inter = spec["slope"], spec["inter"]
    if not np.isfinite(slope) or slope == 0 or (slope, inter) == (1, 0):
        return volume  # no (valid) scaling: the raw values, as nibabel and niftilib read them
    with np.errstate(over="ignore", invalid="ignore"):
        return (volume.astype(np.float64) * slope + inter).astype(np.float32)


def open_and_check(path, spec) -> None:
    """Load ``path``; on success assert shape, dtype and volume 0 against the bytes."""
    try:
        tracemalloc.start()
        try:
            dataset = nidask.load(path)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    except NidaskError as exc:
        event(f"refused: {exc.problem.split('(')[0][:40]}")
        assert peak < OPEN_BUDGET, f"refusing the file allocated {peak} bytes"
        return
    event("opened")
    with dataset:
        assert peak < OPEN_BUDGET, f"opening allocated {peak} bytes"
        shape = declared(spec["dim"])
        assert len(shape) in (3, 4), f"accepted a {len(shape)}D header as {dataset.shape}"
        assert dataset.shape == (shape + (1,) if len(shape) == 3 else shape)
        assert spec["offset"] >= HEADER_SIZE[spec["version"]], "data offset inside the header"
        assert CODES[spec["code"]] is not None, f"accepted datatype code {spec['code']}"
        volume_bytes = math.prod(dataset.shape3d) * dataset.dtype.itemsize
        if volume_bytes > CHECKED_VOLUME_BYTES:
            return  # opened lazily; reading it is the user's call
        try:
            volume = dataset[0][0].compute()
        except NidaskError:
            return  # e.g. truncated gzip data: found on read, reported as InputError
        expected = expected_volume(path, spec)
        assert volume.shape == dataset.shape3d
        if expected.dtype.kind == "f" or volume.dtype.kind == "f":
            assert volume.dtype in (np.float32, np.float64)
            np.testing.assert_allclose(volume, expected, rtol=1e-6, equal_nan=True)
        else:
            assert volume.dtype == expected.dtype.newbyteorder("=")
            np.testing.assert_array_equal(volume, expected)


def _spec(**changes) -> dict:
    """A valid 2x3x4x5 int16 NIfTI-1 description with ``changes``."""
    spec = dict(
        version=1,
        dim=[4, 2, 3, 4, 5, 1, 1, 1],
        code=4,
        offset=352,
        slope=1.0,
        inter=0.0,
        fraction=1.0,
        zoom=2.0,
        sform=1,
        compressed=False,
        seed=0,
    )
    spec.update(changes)
    return spec


@pytest.mark.timeout(240)
@HOSTILE
@given(spec=headers())
# each of these once escaped as a foreign exception, a wrong read or an out-of-memory:
@example(spec=_spec(code=0))  # nibabel's HeaderDataError
@example(spec=_spec(code=32, inter=-1e38))  # complex read as its real part (scaled)
@example(spec=_spec(offset=0))  # nibabel reads the header as data
@example(spec=_spec(fraction=0.5))  # size checked against vox_offset 0, not the proxy's
@example(spec=_spec(slope=2.0, inter=float("nan")))  # HeaderDataError
@example(spec=_spec(version=2, offset=544, dim=[4, 1, 1, 1, 2**31, 1, 1, 1], compressed=True))
@example(spec=_spec(version=2, offset=544, dim=[4, 1, 1, 1, 2**62, 1, 1, 1]))  # O(N) at open
def test_hostile_nifti_headers(tmp_path_factory, spec):
    path = write_raw_nifti(tmp_path_factory.mktemp("hostile") / "image.nii", **spec)
    with warnings.catch_warnings(), bounded_memory():
        warnings.simplefilter("ignore")
        open_and_check(path, spec)


@pytest.mark.timeout(120)
@HOSTILE
@given(content=st.binary(max_size=1200), suffix=st.sampled_from([".nii", ".nii.gz", ".h5"]))
def test_random_bytes_never_crash(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"junk{suffix}"
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dataset = nidask.load(path)
        except NidaskError:
            return
    with dataset:
        dataset.dataobj[..., :1].compute()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "dims", [(2**31, 1, 1, 2), (2**31, 2**31, 2**31, 2), (1, 1, 1, 2**31), (1, 1, 1, 2**62)]
)
def test_huge_declared_shape_opens_lazily_or_refuses(tmp_path, dims):
    """A 2**31-voxel volume opens lazily when the file is as long; a short file or 2**31
    volumes (per-volume bookkeeping would need gigabytes) are refused."""
    spec = _spec(version=2, dim=[4, *dims, 1, 1, 1], code=2, offset=544, fraction=0.0)
    path = write_raw_nifti(tmp_path / "huge.nii", **spec)
    full = 544 + math.prod(dims)
    if full < 2**40:  # a sparse file as long as the header says: nothing is stored
        os.truncate(path, full)
    tracemalloc.start()
    try:
        if dims[3] > 2**20:
            with pytest.raises(nidask.InputError, match="volumes declared"):
                nidask.load(path)
        elif full < 2**40:
            dataset = nidask.load(path)
            assert dataset.shape == dims
            assert dataset.dataobj.chunks[3] == (1,) * dims[3]  # one volume per task
            dataset.close()
        else:
            with pytest.raises(nidask.InputError, match="shorter than its header"):
                nidask.load(path)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < OPEN_BUDGET
