"""A dataset run on one scheduler: series one after another vs together, 1 and 2 workers.

    python benchmarks/dataset_suite.py [--series 4] [--shape 48 48 32] [--directions 24]

Writes a BIDS dataset of ``--series`` DWI phantoms (one per participant), then times
``nidask estimate BIDS OUT participant --scheduler local --workers W`` for W = 1 and 2,
each with ``--series-at-once 1`` (one series after another) and the default (series
together, bounded by workers and memory).  Prints a markdown table (wall, speed-up over
one-after-another on one worker) and writes ``benchmarks/results/dataset.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(root: Path, scratch: Path, series: int, shape, directions: int) -> None:
    from nidask.validation.phantom import make_dwi

    root.mkdir()
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "bench", "BIDSVersion": "1.10.0"})
    )
    for number in range(1, series + 1):
        label = f"{number:02d}"
        (scratch / label).mkdir(parents=True)
        truth = make_dwi(
            scratch / label, shape3d=tuple(shape), n_b0=2, n_directions=directions, seed=number
        )
        folder = root / f"sub-{label}" / "dwi"
        folder.mkdir(parents=True)
        shutil.copy(truth.image, folder / f"sub-{label}_dwi.nii")
        shutil.copy(truth.companions["bval_file"], folder / f"sub-{label}_dwi.bval")
        shutil.copy(truth.companions["bvec_file"], folder / f"sub-{label}_dwi.bvec")


def run(raw: Path, out: Path, workers: int, at_once: int | None) -> float:
    command = [sys.executable, "-m", "nidask", "estimate", str(raw), str(out), "participant"]
    command += ["--scheduler", "local", "--workers", str(workers), "--quiet"]
    if at_once is not None:
        command += ["--series-at-once", str(at_once)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 48, 32))
    parser.add_argument("--directions", type=int, default=24)
    parser.add_argument("--out", default=str(HERE / "results" / "dataset.json"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dataset_") as tmp:
        raw = Path(tmp) / "raw"
        build(raw, Path(tmp) / "scratch", args.series, args.shape, args.directions)
        for workers in (1, 2):
            for at_once in (1, None):
                out = Path(tmp) / f"out-{workers}-{at_once}"
                wall = run(raw, out, workers, at_once)
                rows.append({"workers": workers, "series_at_once": at_once, "wall_s": wall})
    base = rows[0]["wall_s"]
    result = {"series": args.series, "shape": list(args.shape), "runs": rows}
    result["volumes"] = args.directions + 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.series} DWI series {tuple(args.shape)} x {args.directions + 2}")
    print("| workers | series | wall (s) | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        how = "one after another" if r["series_at_once"] == 1 else "together (default)"
        print(f"| {r['workers']} | {how} | {r['wall_s']:.1f} | {base / r['wall_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
