#!/usr/bin/env bash
# Install the tools the test suite runs beside nidask (idempotent; a fresh Debian
# machine needs nothing else):
#   - the nifreeze 0.1.0 peer venv (benchmarks/setup_peer_env.sh) with antspyx's
#     antsRegistration and this nidask, for the interoperability tests (nifreeze's
#     Estimator runs on a series nidask hands over);
#   - Debian's Chromium and chromedriver, for the real-browser test of report.html;
#   - Node.js and the reference BIDS validator (npm's bids-validator), installed in
#     $NIDASK_BIDS_VALIDATOR_DIR (default ~/.cache/nidask/bids-validator), for the
#     tests that validate the test datasets and the derivatives nidask writes.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO=sudo
apt_install() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

export NIDASK_PEER_VENV="${NIDASK_PEER_VENV:-$HOME/.cache/nidask/nifreeze-venv}"
if ! NIDASK_PEER_ANTS=1 NIDASK_PEER_NIDASK=1 bash benchmarks/setup_peer_env.sh >/tmp/nidask-peer-env.log 2>&1; then
    echo "error: the nifreeze peer environment could not be set up:" >&2
    tail -20 /tmp/nidask-peer-env.log >&2 || true
    exit 1
fi

if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    apt_install chromium chromium-driver
fi

VALIDATOR_VERSION=1.15.0
VALIDATOR_DIR=${NIDASK_BIDS_VALIDATOR_DIR:-$HOME/.cache/nidask/bids-validator}
VALIDATOR="$VALIDATOR_DIR/node_modules/.bin/bids-validator"
if ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi
if [[ "$("$VALIDATOR" --version 2>/dev/null | tail -1)" != "$VALIDATOR_VERSION" ]]; then
    mkdir -p "$VALIDATOR_DIR"
    npm install --silent --no-audit --no-fund --prefix "$VALIDATOR_DIR" \
        "bids-validator@$VALIDATOR_VERSION" >/dev/null
fi
"$VALIDATOR" --version >/dev/null
