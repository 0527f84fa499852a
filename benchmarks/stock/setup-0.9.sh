#!/usr/bin/env bash
# Build the virtualenv that runs the stock INGInious 0.9.2 backend for the side-by-side
# benchmarks of dialect 0.9.
#
#   bash benchmarks/stock/setup-0.9.sh [VENV_DIR]       (default: benchmarks/stock/venv/0.9.2)
#   export FASTBACKEND_STOCK09_PYTHON=VENV_DIR/bin/python
#
# What goes in, all from PyPI:
#   * INGInious==0.9.2 with --no-deps: the backend only needs msgpack and pyzmq, not the
#     webapp's dependencies (0.9.2 ships an sdist only, so pip builds it: pure Python);
#   * msgpack==1.1.0, the version 0.9.2 pins; its manylinux wheel carries the C extension,
#     and the script refuses to finish unless msgpack._cmsgpack is what msgpack uses
#     (a pure-Python fallback would make the stock backend look slower than it is);
#   * pyzmq (current, as for the 0.5 venv; 0.9.2 pins 26.2.1, whose API the backend uses
#     the same way: asyncio Context and Poller).
# The launcher is the one of the 0.5 venv (launch_stock.py, next to this script): 0.9.2's
# inginious-backend script builds the same zmq.asyncio.ZMQEventLoop pyzmq no longer has,
# and constructs and runs Backend(context, agent, client) exactly as 0.5's does.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-$HERE/venv/0.9.2}"  # inside the 0.5 venv folder: ignored by git and ruff alike
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q setuptools wheel pyzmq "msgpack==1.1.0"
"$VPY" -m pip install -q --no-deps "inginious==0.9.2"

# The checks this script exists for: the right versions, msgpack's C extension.
"$VPY" - <<'PY'
from importlib.metadata import version

import msgpack
from msgpack import _cmsgpack  # ImportError here = pure-Python fallback = an unfair baseline

assert msgpack.version[:3] == (1, 1, 0), msgpack.version
assert msgpack.Packer is _cmsgpack.Packer, "msgpack is using its pure-Python fallback"
assert version("inginious") == "0.9.2", version("inginious")
import zmq
import zmq.asyncio

from inginious.backend.backend import Backend
from inginious.backend.topic_priority_queue import TopicPriorityQueue  # 0.9's backend, not 0.5's

print(f"stock 0.9.2 venv ready: msgpack {msgpack.version} (C extension), pyzmq {zmq.__version__}, "
      f"libzmq {zmq.zmq_version()}")
PY
echo "export FASTBACKEND_STOCK09_PYTHON=$VPY"
