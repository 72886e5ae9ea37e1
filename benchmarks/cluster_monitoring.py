"""What ``distributed``'s monitoring costs beside nidask's CPU-bound tasks.

    python benchmarks/cluster_monitoring.py [--tasks 16] [--out results/cluster_monitoring.json]

Runs the same ``--tasks`` registration tasks (rigid, two volumes of an HCP-grid
phantom: the core of one fold task) on :func:`nidask.cluster.local_cluster` of 1 and
2 workers, with ``distributed``'s default monitoring and with
:data:`nidask.cluster.LEAN_MONITORING`, and prints per run: the wall time, the
speed-up of 2 workers over 1, the CPU the tasks' threads used, and the cores taken
beside them by the workers' other threads (event loop, profiler, heartbeats) and by
this (the client's) process, where the scheduler and the nannies run.  Workers
compile the kernels and run one task before the timed run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def register_pair(paths: tuple[str, str, str], repeats: int = 1) -> float:
    """Register volume 2 to volume 1 ``repeats`` times; CPU seconds of this thread.

    The clock starts before the volumes are read: all of the task's work is task CPU.
    """
    import nibabel as nb
    import numpy as np

    from nidask.estimation.registration import get_registration

    start = time.thread_time()
    image, mask = nb.load(paths[0]), nb.load(paths[1])
    fixed = np.asarray(image.dataobj[..., 1], dtype=np.float32)
    moving = np.asarray(image.dataobj[..., 2], dtype=np.float32)
    inside = np.asarray(mask.dataobj) > 0
    registration = get_registration("rigid")
    for _ in range(repeats):
        registration(fixed, moving, image.affine, mask=inside)
    return time.thread_time() - start


def measure(paths, workers: int, lean: bool, tasks: int) -> dict:
    """One timed run of ``tasks`` registrations on a fresh cluster."""
    import psutil
    from distributed import Client

    from nidask.cluster import local_cluster
    from nidask.ops.kernels import warm_up

    me = psutil.Process()
    with local_cluster(workers, lean_monitoring=lean, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            client.run(warm_up)
            client.gather(
                [client.submit(register_pair, paths, pure=False) for _ in range(workers)]
            )
            procs = [psutil.Process(pid) for pid in client.run(os.getpid).values()]

            def cpu(process):
                times = process.cpu_times()
                return times.user + times.system

            before = [cpu(p) for p in procs], cpu(me)
            start = time.perf_counter()
            futures = [client.submit(register_pair, paths, pure=False) for _ in range(tasks)]
            task_cpu = sum(client.gather(futures))
            wall = time.perf_counter() - start
            after = [cpu(p) for p in procs], cpu(me)
    worker_cpu = sum(after[0]) - sum(before[0])
    return {
        "monitoring": "lean" if lean else "default",
        "workers": workers,
        "tasks": tasks,
        "wall_s": round(wall, 2),
        "task_cpu_s": round(task_cpu, 2),
        "worker_other_cores": round((worker_cpu - task_cpu) / wall, 3),
        "client_process_cores": round((after[1] - before[1]) / wall, 3),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| monitoring | workers | wall (s) | speed-up | task CPU (s) "
        "| workers' other threads (cores) | client process (cores) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        one = next(
            r["wall_s"] for r in rows if r["monitoring"] == row["monitoring"] and r["workers"] == 1
        )
        lines.append(
            f"| {row['monitoring']} | {row['workers']} | {row['wall_s']:.1f} "
            f"| {one / row['wall_s']:.2f} x | {row['task_cpu_s']:.1f} "
            f"| {row['worker_other_cores']:.3f} | {row['client_process_cores']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=16, help="registrations per run")
    parser.add_argument("--out", default=str(HERE / "results" / "cluster_monitoring.json"))
    args = parser.parse_args(argv)

    from nidask.validation import phantom

    with tempfile.TemporaryDirectory(prefix="nidask-monitoring-") as directory:
        pair = phantom.make_hcp_like(
            directory, n_per_shell=1, n_b0=1, b0_every=2, seed=0, supersample=1
        )
        paths = (pair.image, pair.companions["brainmask_file"])
        rows = [
            measure(paths, workers, lean, args.tasks)
            for lean in (False, True)
            for workers in (1, 2)
        ]
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
