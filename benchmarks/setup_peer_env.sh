#!/usr/bin/env bash
# Create (or refresh) an isolated virtual environment holding the peer library
# nifreeze 0.1.0, used by benchmarks/peer_nifreeze.py and by interoperability tests.
#
# nifreeze 0.1.0 requires numpy<2.4, so it cannot share an environment with nidask's
# own stack; it lives in its own venv, outside the repository.
#
#   NIDASK_PEER_VENV   where the venv lives (default: ~/.cache/nidask/nifreeze-venv)
#   NIDASK_PEER_PYTHON interpreter used to create it (default: python3.11, else python3)
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

echo "$PY"
