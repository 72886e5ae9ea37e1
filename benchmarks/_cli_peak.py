"""Run the nidask command line in this process and report its memory (JSON).

    NIDASK_PEAK_JSON=peak.json python benchmarks/_cli_peak.py estimate IN --out DIR ...

After importing nidask (and ``distributed``) and compiling its kernels, the process's
``VmHWM`` is the baseline; the command then runs as ``nidask ...`` would.  At the end
one JSON object goes to the file ``NIDASK_PEAK_JSON`` names: ``baseline_mb``,
``peak_mb`` (``VmHWM``), and, sampled every 0.2 s, the largest ``RssAnon`` (memory
the process allocated) and ``RssFile`` (pages of mapped files, which the kernel may
drop at any time) with the seconds since the start at which each was seen.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from _peak import maxrss_mb, status_mb


def main() -> int:
    import distributed  # noqa: F401  (imported by dask's first compute: baseline)

    import nidask.cli
    from nidask.ops import kernels

    kernels.warm_up()
    baseline = maxrss_mb()
    start = time.perf_counter()
    peaks = {"RssAnon": (0.0, 0.0), "RssFile": (0.0, 0.0)}
    done = threading.Event()

    def sample():
        while not done.wait(0.2):
            for field, (value, _) in peaks.items():
                now = status_mb(field)
                if now > value:
                    peaks[field] = (now, time.perf_counter() - start)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code = nidask.cli.main(sys.argv[1:])
    finally:
        done.set()
        sampler.join()
        record = {"baseline_mb": baseline, "peak_mb": maxrss_mb()}
        for field, (value, seen) in peaks.items():
            record[f"{field}_mb"], record[f"{field}_at_s"] = value, seen
        with open(os.environ["NIDASK_PEAK_JSON"], "w") as out:
            json.dump(record, out)
    return code


if __name__ == "__main__":
    sys.exit(main())
