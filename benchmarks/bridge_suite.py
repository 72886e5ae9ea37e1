"""nifreeze 0.1.0's peak memory on a series from ``nidask.interop.to_nifreeze`` vs its own
``from_nii``: one command, a table.

    NIDASK_PEER_ANTS=1 NIDASK_PEER_NIDASK=1 bash benchmarks/setup_peer_env.sh
    python benchmarks/bridge_suite.py [--shape 112 112 70] [--directions 46] [--estimate]

Each route runs in its own process of the peer venv (``benchmarks/peer_bridge.py``):
open the series, then (``--estimate``) nifreeze's Estimator with its average model
registers every volume (ANTs).  Peak RSS is the process's ``VmHWM``, above the
baseline after the imports.  Results go to ``benchmarks/results/bridge.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER = Path(os.environ.get("NIDASK_PEER_VENV", "~/.cache/nidask/nifreeze-venv")).expanduser()


def run(series, out: Path, via: str, estimate: bool) -> dict:
    python = PEER / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{python.parent}{os.pathsep}{env['PATH']}"
    command = [str(python), str(HERE / "peer_bridge.py"), "--via", via, "--out", str(out)]
    command += ["--nii", series.image, "--mask", series.companions["brainmask_file"]]
    command += ["--bvec", series.companions["bvec_file"]]
    command += ["--bval", series.companions["bval_file"]]
    done = subprocess.run(
        command + (["--estimate"] if estimate else []), capture_output=True, text=True, env=env
    )
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(112, 112, 70))
    parser.add_argument("--directions", type=int, default=46)
    parser.add_argument("--estimate", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "bridge.json"))
    args = parser.parse_args(argv)
    from nidask.validation.phantom import make_dwi

    rows = []
    with tempfile.TemporaryDirectory(prefix="bridge_") as tmp:
        series = make_dwi(tmp, shape3d=tuple(args.shape), n_b0=2, n_directions=args.directions)
        size_mb = os.path.getsize(series.image) / 2**20
        for via in ("nifreeze", "nidask"):
            record = run(series, Path(tmp) / via, via, args.estimate)
            record["above_baseline_mb"] = round(record["maxrss_mb"] - record["baseline_mb"], 1)
            record.pop("gradients")
            rows.append(record)
    result = {"shape": list(args.shape), "volumes": args.directions + 2, "file_mb": size_mb}
    result["runs"] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"series {tuple(args.shape)} x {args.directions + 2} (int16, {size_mb:.0f} MB)")
    print("| route | dataobj | peak RSS above imports (MB) | open (s) | estimate (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        kind = "memmap (read-only)" if r["memmap"] else "in RAM"
        print(
            f"| {'to_nifreeze' if r['via'] == 'nidask' else 'nifreeze from_nii'} | {kind} "
            f"| {r['above_baseline_mb']} | {r['open_s']} | {r.get('estimate_s', '-')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
