"""A newcomer's first run: the README's main command in a fresh virtual environment.

    python benchmarks/fresh_demo.py [--size default|small] [--out JSON]

Creates a new virtual environment (``python -m venv``, nothing inherited from this
one), installs this checkout with ``pip install ".[plot]"`` as the README says, checks
that numba came with it, and times ``nidask demo`` in an empty directory.  Prints one
markdown table row: install wall, demo wall, whether the compiled kernels served, the
machine's cores.  Everything lives in a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd, cwd=None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="default", choices=("default", "small"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fresh_demo.json"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="nidask-fresh-"))
    try:
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        install = timed([python, "-m", "pip", "install", "-q", f"{ROOT}[plot]"], cwd=work)
        probe = "import importlib.util as u; print(u.find_spec('numba') is not None)"
        numba = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
        demo = [str(venv / "bin" / "nidask"), "demo"]
        demo += [] if args.size == "default" else ["--size", args.size]
        run_dir = work / "run"
        run_dir.mkdir()
        wall = timed(demo, cwd=run_dir)
        record = {
            "size": args.size,
            "install_s": round(install, 1),
            "demo_s": round(wall, 1),
            "numba": numba.stdout.strip() == "True",
            "cores": os.cpu_count(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print("| demo size | pip install (s) | nidask demo (s) | numba installed | cores |")
    print("|---|---|---|---|---|")
    print(
        f"| {record['size']} | {record['install_s']} | {record['demo_s']} "
        f"| {'yes' if record['numba'] else 'no'} | {record['cores']} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
