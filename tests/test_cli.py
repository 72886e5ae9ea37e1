"""The ``nidask`` command line, run as users run it: ``python -m nidask ...`` in a subprocess."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time

import h5py
import nibabel as nb
import numpy as np

import nidask
from conftest import N_B0, N_DIRECTIONS, N_FRAMES, SHAPE3D
from nidask import cli
from nidask.io import sources

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def nidask_cli(*args, cwd=None, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m nidask *args``; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "nidask", *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=cwd,
        timeout=timeout,
        **kwargs,
    )


def dwi_args(phantom) -> list[str]:
    c = phantom.companions
    return ["--bvec", c["bvec_file"], "--bval", c["bval_file"], "--mask", c["brainmask_file"]]


def pet_args(phantom) -> list[str]:
    c = phantom.companions
    return ["--timing", c["temporal_file"], "--mask", c["brainmask_file"]]


def assert_one_error_line(result, *fragments):
    """stderr is exactly one ``nidask: error: ...`` line holding every fragment."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nidask: error: "), lines[0]
    for fragment in fragments:
        assert str(fragment) in lines[0]
    assert "Traceback" not in result.stderr


def no_temporaries(directory) -> bool:
    return not [n for _, _, files in os.walk(directory) for n in files if "nidask-tmp" in n]


# -- help ---------------------------------------------------------------------------------
def test_help_everywhere(capsys):
    result = nidask_cli("--help")
    assert result.returncode == 0
    for command in ("info", "convert", "estimate", "demo"):
        assert command in result.stdout
    for command in ("info", "convert", "estimate", "demo"):
        assert cli.main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: nidask {command}") and "--quiet" in out and "--debug" in out
    assert cli.main(["--version"]) == 0
    assert nidask.__version__ in capsys.readouterr().out


# -- info ---------------------------------------------------------------------------------
def test_info_dwi_nifti(dwi_phantom, capsys):
    result = nidask_cli("info", dwi_phantom.image, *dwi_args(dwi_phantom), "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["type"] == "DWI" and facts["format"] == "NIfTI-1"
    assert facts["shape"] == [*SHAPE3D, N_DIRECTIONS] and facts["volumes_in_file"] == 10
    assert facts["dwi"]["b0_volumes"] == N_B0
    assert facts["dwi"]["shells"] == [{"bvalue": 1000.0, "volumes": N_DIRECTIONS}]
    assert facts["chunks"] == {
        "volumes_per_chunk": N_DIRECTIONS,
        "n_chunks": 1,
        "bytes_per_chunk": int(np.prod(SHAPE3D)) * 2 * N_DIRECTIONS,
    }
    assert facts["bytes_on_disk"] == os.path.getsize(dwi_phantom.image)
    assert facts["bytes_in_ram"] == int(np.prod(SHAPE3D)) * N_DIRECTIONS * 2  # int16
    assert facts["dtype"] == "int16" and facts["voxel_size_mm"] == [2.5, 2.5, 2.5]
    mask = np.asanyarray(nb.load(dwi_phantom.companions["brainmask_file"]).dataobj) > 0
    assert facts["mask_voxels"] == int(mask.sum())
    # the human-readable form says the same
    assert cli.main(["info", dwi_phantom.image, *dwi_args(dwi_phantom)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"b-values\s+b=0: 2, b=1000: 8", text), text
    assert re.search(r"chunks\s+8 volume\(s\) per chunk, 1 chunk\(s\)", text), text
    assert re.search(r"shape\s+16 x 18 x 12 x 8 volumes \(10 in the file\)", text), text


def test_info_pet_text(pet_phantom):
    result = nidask_cli("info", pet_phantom.image, *pet_args(pet_phantom))
    assert result.returncode == 0, result.stderr
    assert re.search(r"type\s+PET", result.stdout)
    pet = nidask.load(pet_phantom.image, **pet_phantom.companions)
    frames = f"{N_FRAMES} frames over {pet.total_duration:g} s"
    assert frames in result.stdout and f"{pet.midframe[0]:g} .." in result.stdout


def test_info_reads_no_data(dwi_phantom, tmp_path, monkeypatch, capsys):
    h5 = tmp_path / "dwi.h5"
    dwi = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    dwi.to_filename(h5)
    dwi.close()

    def refuse(self, index):
        raise AssertionError(f"info read data from {self.path}")

    # the brain mask is read (it is small and counted); the series must not be
    monkeypatch.setattr(sources.HDF5Source, "read", refuse)
    assert cli.main(["info", str(h5), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["format"] == "NFDH5 v1" and facts["hdf5_chunks"] == [*SHAPE3D, 1]
    assert facts["type"] == "DWI" and facts["bytes_on_disk"] == os.path.getsize(h5)
    monkeypatch.setattr(sources.NiftiSource, "read", refuse)
    assert (
        cli.main(
            [
                "info",
                dwi_phantom.image,
                "--bvec",
                dwi_phantom.companions["bvec_file"],
                "--bval",
                dwi_phantom.companions["bval_file"],
            ]
        )
        == 0
    )
    assert "b=1000: 8" in capsys.readouterr().out


# -- convert ------------------------------------------------------------------------------
def test_convert_both_ways_preserves_values(dwi_phantom, tmp_path):
    h5 = tmp_path / "dwi.h5"
    result = nidask_cli("convert", dwi_phantom.image, h5, *dwi_args(dwi_phantom), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # --quiet: no progress
    original = np.asanyarray(nb.load(dwi_phantom.image).dataobj)
    with h5py.File(h5, "r") as f:
        assert f.attrs["Format"] == "NFDH5" and f["0"].attrs["Type"] == "dmri"
        np.testing.assert_array_equal(f["0/dataobj"][()], original[..., N_B0:])
    info = json.loads(nidask_cli("info", h5, "--json").stdout)
    assert info["type"] == "DWI" and info["shape"] == [*SHAPE3D, N_DIRECTIONS]

    back = tmp_path / "back.nii.gz"
    # not --quiet, stderr not a terminal: progress as plain "done" lines, no redrawn bars
    result = nidask_cli("convert", h5, back)
    assert result.returncode == 0, result.stderr
    assert "compressing back.nii.gz: done in" in result.stderr and "\r" not in result.stderr
    data = np.asanyarray(nb.load(back).dataobj)
    assert data.shape == (*SHAPE3D, 1 + N_DIRECTIONS)
    np.testing.assert_array_equal(data[..., 1:], original[..., N_B0:])
    np.testing.assert_allclose(data[..., 0], np.median(original[..., :N_B0], axis=-1))
    bvals = np.loadtxt(tmp_path / "back.bval")
    assert bvals[0] == 0 and np.all(bvals[1:] == 1000)
    np.testing.assert_allclose(
        np.loadtxt(tmp_path / "back.bvec")[:, 1:],
        np.loadtxt(dwi_phantom.companions["bvec_file"])[:, N_B0:],
        atol=1e-5,
    )
    assert no_temporaries(tmp_path)


def test_progress_bar_in_a_terminal(pet_phantom, tmp_path):
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nidask",
                "convert",
                pet_phantom.image,
                tmp_path / "p.h5",
                *pet_args(pet_phantom),
            ],
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            env=_env(),
        )
        os.close(terminal)
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=60) == 0
    finally:
        os.close(controller)
    assert b"100% Completed" in output and b"\r[" in output


# -- estimate -----------------------------------------------------------------------------
def test_a_signal_dropped_in_a_finaliser_still_stops_the_command():
    # Python only prints an exception raised in a finaliser, a weakref or an import-lock
    # callback; a Ctrl-C landing there must still stop the run, and print nothing odd
    script = """
import gc, signal, sys
from nidask.cli.common import STOP_SIGNALS, Terminated

class Finaliser:
    def __del__(self):
        signal.raise_signal(getattr(signal, sys.argv[1]))

for name in ("SIGINT", "SIGTERM"):
    sys.argv[1:] = [name]
    with STOP_SIGNALS:
        Finaliser()
        gc.collect()
        print(name, "went on")
        try:
            STOP_SIGNALS.raise_if_received()
        except (KeyboardInterrupt, Terminated) as exc:
            print(name, "raised", type(exc).__name__)
    print(name, "restored", signal.getsignal(getattr(signal, name)) is not STOP_SIGNALS._handle)
"""
    result = subprocess.run(
        [sys.executable, "-c", script, "SIGINT"],
        capture_output=True,
        text=True,
        env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no "Exception ignored in ..." traceback
    assert result.stdout.splitlines() == [
        "SIGINT went on",
        "SIGINT raised KeyboardInterrupt",
        "SIGINT restored True",
        "SIGTERM went on",
        "SIGTERM raised Terminated",
        "SIGTERM restored True",
    ]


def test_estimate_interrupted_then_resumed(dwi_phantom, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "nidask",
        "estimate",
        dwi_phantom.image,
        *dwi_args(dwi_phantom),
        "--out",
        out,
        "--model",
        "average",
        "--passes",
        "1",
        "--quiet",
    ]
    # Ctrl-C in a terminal: a child of a background job inherits SIGINT ignored (and
    # Python then installs no KeyboardInterrupt), so give it the default disposition
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not (out / "work" / "run.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # the run then takes about a second: interrupt it early
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip() == f"nidask: error: {out / 'work'}: interrupted; continue with --resume"
    assert sorted(os.listdir(out)) == ["work"]  # no partial outputs, the run is kept
    assert no_temporaries(out)

    again = nidask_cli(*command[3:])
    assert again.returncode == 2
    assert_one_error_line(again, out / "work", "--resume")

    result = nidask_cli(*command[3:], "--resume")
    assert result.returncode == 0, result.stderr
    n = N_B0 + N_DIRECTIONS  # every volume of the file, b=0 included
    corrected = nb.load(out / "corrected.nii.gz")
    assert corrected.shape == (*SHAPE3D, n)
    assert len(np.loadtxt(out / "corrected.bval")) == n
    assert np.loadtxt(out / "corrected.bvec").shape == (3, n)
    rows = (out / "motion.tsv").read_text().splitlines()
    assert rows[0].split("\t") == [
        "volume",
        "tx_mm",
        "ty_mm",
        "tz_mm",
        "rx_deg",
        "ry_deg",
        "rz_deg",
        "fd_mm",
        "similarity",
        "flags",
    ]
    fields = [r.split("\t") for r in rows[1:]]
    known = {"small_fov", "implausible", "poor_fit", "unconverged", "inconsistent"}
    assert all(set(f[9].split(",")) <= known for f in fields)
    assert all("small_fov" in f[9] for f in fields)  # a 4 cm field of view
    table = np.array([f[:9] for f in fields], dtype=float)
    assert table.shape == (n, 9)
    assert table[:, 0].tolist() == list(range(n))  # indices in the file
    assert np.all((table[:, 8] > 0.5) & (table[:, 8] <= 1))  # NCC with the prediction
    assert table[0, 7] == 0 and np.all(table[:, 7] >= 0)
    # the phantom moved up to 3 mm / 3 deg: the report shows motion of that size
    assert 0.5 < np.abs(table[:, 1:4]).max() < 6

    import nitransforms.linear as ntl

    transforms = ntl.load(out / "motion.x5", fmt="X5")
    assert len(transforms) == n
    from nidask.geometry import motion_parameters

    ref = nb.load(dwi_phantom.image)
    for i in (0, n - 1):
        params = motion_parameters(transforms[i].matrix, ref.affine, SHAPE3D)
        np.testing.assert_allclose(params[:6], table[i, 1:7], atol=1e-3)
    for name in ("motion.png", "mosaic.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "wrote corrected.nii.gz" in result.stdout
    assert no_temporaries(out)


def _bytes_under(directory) -> int:
    walk = os.walk(directory)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in walk for f in files)


def test_finished_estimate_is_small_on_disk(tmp_path):
    """A finished run leaves at most twice the uncompressed input, little of it in the
    run directory, and no cache copy; ``--keep-work`` keeps every intermediate array."""
    from nidask.validation import phantom

    data = tmp_path / "data"
    data.mkdir()
    series = phantom.make_dwi(data, shape3d=(32, 36, 24), n_b0=2, n_directions=30, compressed=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    env = dict(_env(), DASK_NIDASK__CACHE_DIR=str(cache))
    sizes = {}
    for keep in (False, True):
        out = tmp_path / f"out-{keep}"
        command = ["estimate", series.image, *dwi_args(series), "--out", out]
        command += ["--passes", "2", "--quiet"] + (["--keep-work"] if keep else [])
        result = subprocess.run(
            [sys.executable, "-m", "nidask", *map(str, command)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert os.listdir(cache) == []  # the decompressed copy went with the run
        work = out / "work"
        sizes[keep] = (_bytes_under(out), _bytes_under(work))
        assert (work / "data.npy").exists() == keep
        for p in (1, 2):
            assert (work / f"pass-{p}" / "predictions.npy").exists() == keep
    uncompressed = np.asarray(nb.load(series.image).dataobj).nbytes
    # measured: 1.86x in all (the float32 corrected series is most of it), 0.15x of work
    assert sizes[False][0] <= 2 * uncompressed, (sizes, uncompressed)
    assert sizes[False][1] <= 0.3 * uncompressed, (sizes, uncompressed)
    assert sizes[True][1] > 5 * sizes[False][1]


# -- demo ---------------------------------------------------------------------------------
def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    result = nidask_cli("demo", "--size", "small", "--quiet", "--out", out, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    text = result.stdout
    assert "DWI(shape=(36, 42, 32, 48)" in text and "nothing read yet" in text
    assert "b0 volumes=6" in text
    errors = re.findall(
        r"errors\s+translation median ([\d.]+) mm, worst ([\d.]+) mm; "
        r"rotation median ([\d.]+) deg, worst ([\d.]+) deg",
        text,
    )
    assert len(errors) == 2, text  # DWI and PET
    dwi_errors = [float(v) for v in errors[0]]
    # median mm, median deg: the demo's smooth phantom gives mutual information to the
    # b=0 little to hold rotations by (1.65 deg; real anatomy: test_protocols.py)
    assert dwi_errors[0] < 0.3 and dwi_errors[2] < 2.0
    peak = re.search(r"peak memory ([\d.]+) MiB \(ru_maxrss", text)
    assert peak and 20 < float(peak.group(1)) < 2000
    for kind in ("dwi", "pet"):
        for name in ("corrected.nii.gz", "motion.x5", "motion.tsv", "motion.png", "mosaic.png"):
            assert (out / kind / name).is_file(), (kind, name)
    assert no_temporaries(out)
    # a second run rewrites the demo directory; a foreign directory is refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    assert cli.main(["demo", "--size", "small", "--out", str(foreign)]) == 2
    refused = capsys.readouterr()
    assert refused.err.startswith(f"nidask: error: {foreign}: exists and is not a nidask demo")
    assert (foreign / "thesis.tex").read_text() == "keep me"


# -- errors -------------------------------------------------------------------------------
def test_missing_file_is_one_line_and_exit_1(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    result = nidask_cli("info", missing)
    assert result.returncode == 1
    assert_one_error_line(result, f"{missing}: file not found")


def test_bad_usage_is_exit_2(dwi_phantom, tmp_path, capsys):
    result = nidask_cli("info", dwi_phantom.image, "--frobnicate")
    assert result.returncode == 2
    assert_one_error_line(result, "unrecognized arguments: --frobnicate")
    for args, message in [
        (["convert", dwi_phantom.image, str(tmp_path / "out.txt")], "unknown output format"),
        (["info", dwi_phantom.image, "--bvec", dwi_phantom.image], "--bvec and --bval go"),
        (["estimate", dwi_phantom.image], "the following arguments are required: --out"),
        (
            ["estimate", dwi_phantom.image, "--out", str(tmp_path), "--passes", "-1"],
            "non-negative",
        ),
        ([], "the following arguments are required: COMMAND"),
    ]:
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("nidask: error: ") and message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_failures_name_the_file_and_debug_shows_the_traceback(dwi_phantom, tmp_path):
    bad_bval = tmp_path / "bad.bval"
    bad_bval.write_text("0 0 1000\n")
    args = [
        "info",
        dwi_phantom.image,
        "--bvec",
        dwi_phantom.companions["bvec_file"],
        "--bval",
        bad_bval,
    ]
    result = nidask_cli(*args)
    assert result.returncode == 1
    assert_one_error_line(result, dwi_phantom.companions["bvec_file"], "b-values")
    debug = nidask_cli(*args, "--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == result.stderr.strip()
    # an unwritable destination: exit 1, the directory named
    result = nidask_cli("convert", dwi_phantom.image, tmp_path / "no" / "dir" / "x.h5")
    assert result.returncode == 1
    assert_one_error_line(result, tmp_path / "no" / "dir", "does not exist")
