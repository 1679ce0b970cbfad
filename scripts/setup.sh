#!/usr/bin/env bash
# Create .venv with everything rlmon, its demo and its tests need (CPU-only torch, from the local
# wheel where the machine has one). Installs Debian's prometheus (promtool) when run as root.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"

if ! command -v promtool >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's prometheus and openssl (for the end-to-end tests)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus openssl >/dev/null
  else
    echo "setup: promtool not found and cannot apt-get install prometheus (not root);" \
         "the Prometheus tests will fail in CI and skip elsewhere" >&2
  fi
fi
