#!/usr/bin/env bash
# The project's test command (the README's; .ci/run calls exactly this).
# From a clean checkout it makes a virtualenv, builds the extensions with the debug
# invariants compiled in (FB_DEBUG), installs the real INGInious 0.5 peers, then runs
# ruff, the test suite (compiled and pure-Python implementations, uvloop and asyncio)
# and a smoke run of the benchmarks so that they cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${FASTBACKEND_TEST_VENV:-.venv-test}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel 'Cython>=3'
FASTBACKEND_DEBUG=1 "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e '.[test]'
# The real peers, without the webapp's dependencies (see tests/peers/msgpack_compat.py).
"$PY" -m pip install -q --disable-pip-version-check --no-deps 'INGInious==0.5'

"$PY" -m ruff check .
"$PY" -m pytest -q tests "$@"
FASTBACKEND_BENCH_SMOKE=1 "$PY" -m pytest -q benchmarks/ --benchmark-only -p no:cacheprovider
