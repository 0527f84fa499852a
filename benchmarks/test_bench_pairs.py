"""fastbackend against the slot-aware C ceiling (issue 8): broker CPU per zero-time job, by the
median of side-by-side pairs.

One throughput run (``test_bench_load.py``'s scenario: 4 agents x 8 slots, 4 client sockets
x 64 unfinished zero-time jobs, 1 KiB input, a heartbeat client) of either broker swings by
~20% on a shared 2-core machine, both ways, so one run's fastbackend / slot-ceiling ratio
decides nothing (the same build has measured 1.00x to 1.39x).  Here each dialect runs
``THROUGHPUT_PAIRS`` pairs, fastbackend and the slot ceiling one right after the other,
alternating which goes first (so that the machine's drift falls on both alike), and reports
the median of the pairs' ratios (the figure issue 8's acceptance is read from), their min
and max, and each broker's median CPU per job.

Runs when both ``fastbackend`` and ``slot-ceiling`` are among the selected brokers
(``FASTBACKEND_BENCH_KINDS``) and the slot ceiling builds and starts here; otherwise it is
skipped, saying which.
"""

from __future__ import annotations

import os
import statistics
import subprocess

import pytest
from bench_config import DIALECTS, THROUGHPUT_PAIRS, broker_kinds
from brokers import BrokerFactory
from test_bench_load import Scenario, run_throughput

FLOOR = "slot-ceiling"
PAIR = ("fastbackend", FLOOR)


def unavailable(factory: BrokerFactory, dialect: str) -> str | None:
    """Why the pairs cannot run in ``dialect``, or None.

    The slot ceiling is started once and stopped (which builds it, once a session): a machine
    without a C compiler, or where the executable does not start, skips this test instead of
    failing half-way through the pairs.
    """
    missing = [kind for kind in PAIR if kind not in broker_kinds(dialect)]
    if missing:
        return (f"{' and '.join(missing)} not among the selected brokers "
                f"(FASTBACKEND_BENCH_KINDS={os.environ.get('FASTBACKEND_BENCH_KINDS', '')!r}): "
                "this test runs fastbackend and slot-ceiling side by side")
    try:
        factory.start(FLOOR, dialect).stop()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        return f"the C slot ceiling cannot be built or started here: {e}"
    return None


@pytest.mark.parametrize("dialect", DIALECTS)
def test_load_throughput_pairs(benchmark, broker_factory, registry, dialect):
    """Broker CPU per zero-time job, fastbackend / slot ceiling, median of alternating pairs."""
    why = unavailable(broker_factory, dialect)
    if why:
        pytest.skip(why)
    name = f"throughput, {THROUGHPUT_PAIRS} pair{'s' if THROUGHPUT_PAIRS != 1 else ''} vs slot ceiling"
    sc = Scenario(benchmark, registry, name, "fastbackend", dialect, broker_factory)
    registry.note_broker(dialect, FLOOR, broker_factory.describe(FLOOR, dialect))
    pairs = []
    for i in range(THROUGHPUT_PAIRS):
        order = PAIR if i % 2 == 0 else PAIR[::-1]
        runs = {}
        for kind in order:
            # The first pair's fastbackend run (its first) is the benchmark's timed round
            # (pytest-benchmark wants one).
            bench = benchmark if i == 0 and kind == "fastbackend" else None
            runs[kind] = run_throughput(broker_factory, kind, dialect, bench)
        for kind, run in runs.items():
            answer = run["answer"]
            assert answer["done"] > 0 and answer["unfinished"] == 0 and answer["crashed"] == 0, (kind, answer)
        us = {kind: run["us"] for kind, run in runs.items()}
        pairs.append({"order": f"{order[0]} first", "us": us, "ratio": us["fastbackend"] / us[FLOOR],
                      "jobs": {kind: run["answer"]["done"] for kind, run in runs.items()},
                      "jobs_per_s": {kind: run["answer"]["jobs_per_s"] for kind, run in runs.items()}})
    ratios = [p["ratio"] for p in pairs]
    for kind in PAIR:
        median_us = statistics.median(p["us"][kind] for p in pairs)
        sc.figure("broker CPU per job (median of runs)", "us", median_us, kind=kind)
    sc.figure("fastbackend / slot ceiling, median of pairs", "", f"{statistics.median(ratios):.3f}x",
              comparable=False)
    sc.figure("fastbackend / slot ceiling, min - max of pairs", "",
              f"{min(ratios):.3f}x - {max(ratios):.3f}x", comparable=False)
    for n, p in enumerate(pairs, 1):
        sc.figure(f"pair {n} ({p['order']}): fastbackend / slot ceiling", "us",
                  f"{p['us']['fastbackend']:.2f} / {p['us'][FLOOR]:.2f} = {p['ratio']:.3f}x",
                  comparable=False)
    sc.extra("pairs", pairs)
