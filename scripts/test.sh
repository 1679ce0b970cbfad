#!/usr/bin/env bash
# Set everything up, then run the whole test suite (unit + integration). Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
