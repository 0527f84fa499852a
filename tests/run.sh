#!/usr/bin/env bash
# The project's test command (the README's; .ci/run calls exactly this).
# From a clean checkout it makes a virtualenv, builds the extensions with the debug
# invariants compiled in (FB_DEBUG), installs the real INGInious peers of both dialects,
# then runs ruff, the test suite (compiled and pure-Python implementations, uvloop and
# asyncio) and a smoke run of the benchmarks so that they cannot rot.
#
# INGInious 0.5 and 0.9.2 both install as the package `inginious`, so the suite runs twice:
# once with the venv's 0.5 (every module but the 0.9 ones), once with 0.9.2 (installed into
# .peers/0.9) first on PYTHONPATH (tests/test_conformance_09.py, tests/test_mixed_dialects.py);
# tests/conftest.py collects each run's modules only.  Extra arguments go to both runs
# (options such as -x or -k; to run one module, call pytest as the run that owns it does).
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
# The real 0.9.2 peers (and the stock 0.9.2 backend), in their own folder; msgpack 1.x and
# pyzmq, their only runtime needs here, are already in the venv.
PEERS09="$PWD/.peers/0.9"
"$PY" -m pip install -q --disable-pip-version-check --no-deps --upgrade --target "$PEERS09" 'inginious==0.9.2'

"$PY" -m ruff check --extend-exclude .peers .

# pytest exit status 5 means "no test collected": acceptable for one run (say, -k matching
# only the other run's tests), not for both.
status05=0
"$PY" -m pytest -q tests "$@" || status05=$?
status09=0
PYTHONPATH="$PEERS09${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q tests -p no:cacheprovider "$@" || status09=$?
for status in "$status05" "$status09"; do
    if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then
        echo "tests/run.sh: a pytest run failed (0.5 run: $status05, 0.9 run: $status09)" >&2
        exit 1
    fi
done
if [ "$status05" -eq 5 ] && [ "$status09" -eq 5 ]; then
    echo "tests/run.sh: no test collected in either run" >&2
    exit 5
fi
# Bounded fuzzing (tests/fuzz/run.py: ~30 s per harness, FASTBACKEND_FUZZ_SECONDS to change it);
# a finding fails the run.  atheris installs from a wheel.
"$PY" -c "import atheris" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check atheris
"$PY" tests/fuzz/run.py
FASTBACKEND_BENCH_SMOKE=1 "$PY" -m pytest -q benchmarks/ --benchmark-only -p no:cacheprovider
