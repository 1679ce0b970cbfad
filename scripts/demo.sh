#!/usr/bin/env bash
# Set everything up, then run the demo: a small GRPO training on CPU with torchrun, 2 ranks,
# monitored by rlmon (a KL blow-up is injected late in the run, so you see a coordinated stop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rlmon demo "$@"
