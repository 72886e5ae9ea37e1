#!/usr/bin/env bash
# Create (or refresh) an isolated virtual environment holding the peer library
# nifreeze 0.1.0, used by benchmarks/peer_nifreeze.py and by interoperability tests.
#
# nifreeze 0.1.0 requires numpy<2.4, so it cannot share an environment with nidask's
# own stack; it lives in its own venv, outside the repository.
#
#   NIDASK_PEER_VENV   where the venv lives (default: ~/.cache/nidask/nifreeze-venv)
#   NIDASK_PEER_PYTHON interpreter used to create it (default: python3.11, else python3)
#   NIDASK_PEER_ANTS   set to 1 to add antspyx (ANTs) to the same venv, plus an
#                      executable "$VENV/bin/antsRegistration" that runs antspyx's
#                      ANTs command-line main (nifreeze's Estimator calls it through
#                      nipype; benchmarks/peer_ants.py imports antspyx). Unset: nothing
#                      ANTs-related is checked or installed.
#   NIDASK_PEER_NIDASK set to 1 to add this nidask checkout (editable, with its
#                      dependencies) to the same venv, for nidask.interop.to_nifreeze
#                      (benchmarks/peer_bridge.py).
#
# Idempotent: an existing venv is reused; pip runs only when the pinned set is not
# importable at the pinned versions. The last line printed is the venv's python path.
set -euo pipefail

VENV=${NIDASK_PEER_VENV:-$HOME/.cache/nidask/nifreeze-venv}
if [[ -n "${NIDASK_PEER_PYTHON:-}" ]]; then
    BASE_PY=$NIDASK_PEER_PYTHON
elif command -v python3.11 >/dev/null 2>&1; then
    BASE_PY=python3.11
else
    BASE_PY=python3
fi

# Pinned peer stack. h5py and tqdm are imported by nifreeze but only arrive
# transitively, so they are listed explicitly.
PACKAGES=(
    "nifreeze==0.1.0"
    "numpy>=1.26,<2.4"
    "h5py>=3.10"
    "tqdm"
)

PY="$VENV/bin/python"

if [[ ! -x "$PY" ]]; then
    echo "setup_peer_env: creating venv at $VENV with $BASE_PY" >&2
    mkdir -p "$(dirname "$VENV")"
    "$BASE_PY" -m venv "$VENV"
fi

check_env() {
    "$PY" - <<'EOF' 2>/dev/null
from importlib.metadata import version

import numpy

assert version("nifreeze") == "0.1.0", version("nifreeze")
assert tuple(int(p) for p in numpy.__version__.split(".")[:2]) < (2, 4), numpy.__version__
import h5py  # noqa: F401
import nifreeze.data.dmri  # noqa: F401
import nifreeze.data.pet  # noqa: F401
import nifreeze.estimator  # noqa: F401
import nifreeze.model  # noqa: F401
EOF
}

if check_env; then
    echo "setup_peer_env: pinned packages already present" >&2
else
    echo "setup_peer_env: installing ${PACKAGES[*]}" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}" >&2
    if ! check_env; then
        echo "setup_peer_env: nifreeze peer environment is not importable" >&2
        exit 1
    fi
fi

if [[ "${NIDASK_PEER_ANTS:-}" == "1" ]]; then
    # antspyx wheels need numpy<2.4 and scipy<1.16; nifreeze 0.1.0 accepts both, so one
    # venv holds the two (pip moves scipy down to 1.15.x next to nifreeze's stack).
    ANTS_PACKAGES=(
        "antspyx"
        "numpy>=1.26,<2.4"
        "scipy<1.16"
        "nifreeze==0.1.0"
    )
    SHIM="$VENV/bin/antsRegistration"

    check_ants() {
        "$PY" - <<'EOF' 2>/dev/null
import scipy

assert tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 16), scipy.__version__
import ants

assert callable(ants.lib.antsRegistration)
EOF
    }

    if check_ants; then
        echo "setup_peer_env: antspyx already present" >&2
    else
        echo "setup_peer_env: installing ${ANTS_PACKAGES[*]}" >&2
        "$PY" -m pip install --quiet --disable-pip-version-check "${ANTS_PACKAGES[@]}" >&2
        if ! check_ants || ! check_env; then
            echo "setup_peer_env: antspyx and nifreeze 0.1.0 do not co-install" >&2
            exit 1
        fi
    fi

    # antsRegistration on PATH for nipype: antspyx ships the ANTs main as a library
    # call, ants.lib.antsRegistration(argv without the program name) -> exit code.
    # The shim loads that extension module alone: "import ants" runs the package's
    # __init__ (2 s and 200 MB per call here), which a real ANTs binary does not cost.
    SHIM_TEXT="#!$PY
\"\"\"antsRegistration through antspyx (written by benchmarks/setup_peer_env.sh).\"\"\"

import importlib.util
import sys
from pathlib import Path


def _ants_lib():
    try:
        package = Path(importlib.util.find_spec(\"ants\").submodule_search_locations[0])
        spec = importlib.util.spec_from_file_location(
            \"ants.lib\", next(package.glob(\"lib.*.so\"))
        )
        lib = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(lib)
        return lib
    except Exception:  # another antspyx layout: the documented way
        import ants

        return ants.lib


sys.exit(int(_ants_lib().antsRegistration(sys.argv[1:]) or 0))"
    if [[ ! -x "$SHIM" ]] || [[ "$(cat "$SHIM")" != "$SHIM_TEXT" ]]; then
        printf '%s\n' "$SHIM_TEXT" >"$SHIM"
        chmod 755 "$SHIM"
        echo "setup_peer_env: wrote $SHIM" >&2
    fi
    if ! "$SHIM" --version >/dev/null 2>&1; then
        echo "setup_peer_env: $SHIM --version failed" >&2
        exit 1
    fi
fi

if [[ "${NIDASK_PEER_NIDASK:-}" == "1" ]]; then
    ROOT=$(cd "$(dirname "$0")/.." && pwd)
    if "$PY" -c "import nidask.interop, sys; sys.exit(not nidask.__file__.startswith('$ROOT/'))" \
        2>/dev/null; then
        echo "setup_peer_env: nidask already present" >&2
    else
        echo "setup_peer_env: installing nidask from $ROOT (editable)" >&2
        "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT" \
            "numpy>=1.26,<2.4" "scipy<1.16" "nifreeze==0.1.0" >&2
        if ! check_env || ! "$PY" -c "import nidask.interop" 2>/dev/null; then
            echo "setup_peer_env: nidask and nifreeze 0.1.0 do not co-install" >&2
            exit 1
        fi
    fi
fi

echo "$PY"
