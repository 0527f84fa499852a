"""Size knobs and broker selection of the benchmarks, read once from the environment.

Kept out of conftest.py so that the test modules can import them by a name no other
directory's conftest shadows.  The variables are described in conftest.py and README.md.
"""

from __future__ import annotations

import os

SMOKE = os.environ.get("FASTBACKEND_BENCH_SMOKE", "") not in ("", "0")
SCALE = float(os.environ.get("FASTBACKEND_BENCH_SCALE", "1"))
ALLOW_DEBUG = os.environ.get("FASTBACKEND_BENCH_ALLOW_DEBUG", "") not in ("", "0")
KIND_ORDER = ("stock", "fastbackend", "fastbackend-py", "ceiling", "slot-ceiling")
#: The C ceilings (ceiling/forwarder.c, ceiling/slotbroker.c): no environments, no priorities,
#: so no blocked-queue, memory or priority scenario for them (``queueing``).
CEILINGS = ("ceiling", "slot-ceiling")
DIALECTS = [d for d in os.environ.get("FASTBACKEND_BENCH_DIALECTS", "0.5,0.9").split(",") if d]
#: The interpreter of each dialect's stock venv (stock/setup.sh, stock/setup-0.9.sh).
STOCK_PYTHON_VARS = {"0.5": "FASTBACKEND_STOCK_PYTHON", "0.9": "FASTBACKEND_STOCK09_PYTHON"}
#: test_bench_ops.py: on/off pairs of the --metrics overhead measurement (alternating, since a
#: shared machine drifts more between minutes than --metrics could cost), and how often the
#: endpoint is scraped while a metrics-on run goes (seconds; 0: only once, at the end).
METRICS_PAIRS = int(os.environ.get("FASTBACKEND_BENCH_METRICS_PAIRS", "0")) or (1 if SMOKE else 5)
SCRAPE_INTERVAL = float(os.environ.get("FASTBACKEND_BENCH_SCRAPE_INTERVAL", "1"))
#: test_bench_ops.py: jobs waiting when `fastbackend status` is timed (the issue's figure).
STATUS_WAITING = int(os.environ.get("FASTBACKEND_BENCH_STATUS_WAITING", "0")) or (2_000 if SMOKE else 100_000)
#: test_bench_pairs.py: fastbackend / slot-ceiling pairs of the throughput scenario (alternating
#: which goes first; one run of either swings by ~20% on a shared 2-core machine, so only the
#: median of several pairs' ratios says how far fastbackend is from the floor).
THROUGHPUT_PAIRS = int(os.environ.get("FASTBACKEND_BENCH_THROUGHPUT_PAIRS", "0")) or (1 if SMOKE else 5)
#: test_bench_pairs.py: fastbackend / forwarder (the plain C ceiling) pairs of the payload
#: scenario, likewise (one run's ratio has gone from 0.78x to 1.33x).
PAYLOAD_PAIRS = int(os.environ.get("FASTBACKEND_BENCH_PAYLOAD_PAIRS", "0")) or (1 if SMOKE else 5)


def scaled(default: float, smoke: float) -> float:
    """A size for this run: ``smoke`` in smoke mode, else ``default`` times the scale."""
    return smoke if SMOKE else default * SCALE


def broker_kinds(dialect: str = "0.5") -> list[str]:
    """The brokers to run for ``dialect``: stock only when that dialect's stock venv is named."""
    kinds = ["ceiling", "slot-ceiling", "fastbackend"]
    if os.environ.get("FASTBACKEND_BENCH_PURE", "1") not in ("", "0"):
        kinds.append("fastbackend-py")
    if os.environ.get(STOCK_PYTHON_VARS[dialect]):
        kinds.insert(0, "stock")
    only = [k for k in os.environ.get("FASTBACKEND_BENCH_KINDS", "").split(",") if k]
    if only:
        kinds = [k for k in kinds if k in only]
    return kinds
