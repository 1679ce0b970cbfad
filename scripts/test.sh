#!/usr/bin/env bash
# Set everything up, then run the whole test suite (unit + integration). Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The kernels as plain Python, with coverage: Numba hides its compiled code from coverage.
NUMBA_DISABLE_JIT=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
  --cov=collector.kernels --cov=collector.store --cov=collector.aggregate \
  --cov=collector.detectors --cov=collector.rules --cov=collector.reward_stats --cov-report=term \
  tests/unit/test_kernels.py tests/unit/test_store.py tests/unit/test_aggregate.py \
  tests/unit/test_detectors.py tests/unit/test_detector_blocks.py tests/unit/test_reward_stats.py
# Everything, compiled, with the real components.
exec .venv/bin/python -m pytest -q "$@"
