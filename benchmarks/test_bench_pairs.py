"""fastbackend against the C ceilings (issue 8): broker CPU per job, by the median of
side-by-side pairs.

One run of a ``test_bench_load.py`` scenario by either broker swings by ~20% on a shared
2-core machine, both ways, so one run's fastbackend / ceiling ratio decides nothing (the same
build has measured 1.00x to 1.39x against the slot ceiling in the throughput scenario, 0.78x
to 1.33x against the forwarder in the payload scenario).  Here each dialect runs a scenario's
pairs, fastbackend and the ceiling one right after the other, alternating which goes first
(so that the machine's drift falls on both alike), and reports the median of the pairs'
ratios (the figure issue 8's acceptance is read from), their min and max, and each broker's
median CPU per job.  Two pairings, those issue 8 asks about:

* ``test_load_throughput_pairs``: the throughput scenario (4 agents x 8 slots, 4 client
  sockets x 64 unfinished zero-time jobs, 1 KiB input, a heartbeat client) against the slot
  ceiling, ``THROUGHPUT_PAIRS`` pairs;
* ``test_load_payload_pairs``: the payload scenario (results carrying a 1 MiB archive and
  64 KiB of stdout) against the forwarder (broker kind ``ceiling``), ``PAYLOAD_PAIRS`` pairs.

Each runs when both ``fastbackend`` and its ceiling are among the selected brokers
(``FASTBACKEND_BENCH_KINDS``) and that ceiling builds and starts here; otherwise it is
skipped, saying which.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from bench_config import DIALECTS, PAYLOAD_PAIRS, THROUGHPUT_PAIRS, broker_kinds
from brokers import BrokerFactory
from test_bench_load import Scenario, run_payload, run_throughput


@dataclass(frozen=True)
class Pairing:
    """A scenario measured in alternating pairs, fastbackend against one C ceiling."""

    #: The scenario's name in the summary tables (before ", N pairs vs ...").
    scenario: str
    #: One run of it on a fresh broker, as test_bench_load.run_throughput: (factory, kind,
    #: dialect, the benchmark whose timed round it is or None) -> its answer, CPU, us per job.
    run: Callable[[BrokerFactory, str, str, Any], dict]
    #: The ceiling's broker kind, and how figures and skip reasons name it.
    floor: str
    floor_name: str
    pairs: int

    @property
    def kinds(self) -> tuple[str, str]:
        return ("fastbackend", self.floor)


THROUGHPUT = Pairing("throughput", run_throughput, "slot-ceiling", "slot ceiling", THROUGHPUT_PAIRS)
PAYLOAD = Pairing("payload 1 MiB + 64 KiB", run_payload, "ceiling", "forwarder", PAYLOAD_PAIRS)


def unavailable(pairing: Pairing, factory: BrokerFactory, dialect: str) -> str | None:
    """Why ``pairing`` cannot run in ``dialect``, or None.

    The ceiling is started once and stopped (which builds it, once a session): a machine
    without a C compiler, or where the executable does not start, skips this test instead of
    failing half-way through the pairs.
    """
    missing = [kind for kind in pairing.kinds if kind not in broker_kinds(dialect)]
    if missing:
        return (f"{' and '.join(missing)} not among the selected brokers "
                f"(FASTBACKEND_BENCH_KINDS={os.environ.get('FASTBACKEND_BENCH_KINDS', '')!r}): "
                f"this test runs fastbackend and {pairing.floor} side by side")
    try:
        factory.start(pairing.floor, dialect).stop()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        return f"the C {pairing.floor_name} cannot be built or started here: {e}"
    return None


def run_pairs(pairing: Pairing, benchmark, factory: BrokerFactory, registry, dialect: str) -> None:
    """Run ``pairing.pairs`` pairs in ``dialect`` and record their figures (or skip, saying why)."""
    why = unavailable(pairing, factory, dialect)
    if why:
        pytest.skip(why)
    floor, floor_name = pairing.floor, pairing.floor_name
    name = f"{pairing.scenario}, {pairing.pairs} pair{'s' if pairing.pairs != 1 else ''} vs {floor_name}"
    sc = Scenario(benchmark, registry, name, "fastbackend", dialect, factory)
    registry.note_broker(dialect, floor, factory.describe(floor, dialect))
    pairs = []
    for i in range(pairing.pairs):
        order = pairing.kinds if i % 2 == 0 else pairing.kinds[::-1]
        runs = {}
        for kind in order:
            # The first pair's fastbackend run (its first) is the benchmark's timed round
            # (pytest-benchmark wants one).
            bench = benchmark if i == 0 and kind == "fastbackend" else None
            runs[kind] = pairing.run(factory, kind, dialect, bench)
        for kind, run in runs.items():
            answer = run["answer"]
            assert answer["done"] > 0 and answer["unfinished"] == 0 and answer["crashed"] == 0, (kind, answer)
        us = {kind: run["us"] for kind, run in runs.items()}
        pairs.append({"order": f"{order[0]} first", "us": us, "ratio": us["fastbackend"] / us[floor],
                      "jobs": {kind: run["answer"]["done"] for kind, run in runs.items()},
                      "jobs_per_s": {kind: run["answer"]["jobs_per_s"] for kind, run in runs.items()}})
    ratios = [p["ratio"] for p in pairs]
    for kind in pairing.kinds:
        median_us = statistics.median(p["us"][kind] for p in pairs)
        sc.figure("broker CPU per job (median of runs)", "us", median_us, kind=kind)
    sc.figure(f"fastbackend / {floor_name}, median of pairs", "", f"{statistics.median(ratios):.3f}x",
              comparable=False)
    sc.figure(f"fastbackend / {floor_name}, min - max of pairs", "",
              f"{min(ratios):.3f}x - {max(ratios):.3f}x", comparable=False)
    for n, p in enumerate(pairs, 1):
        sc.figure(f"pair {n} ({p['order']}): fastbackend / {floor_name}", "us",
                  f"{p['us']['fastbackend']:.2f} / {p['us'][floor]:.2f} = {p['ratio']:.3f}x",
                  comparable=False)
    sc.extra("pairs", pairs)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_load_throughput_pairs(benchmark, broker_factory, registry, dialect):
    """Broker CPU per zero-time job, fastbackend / slot ceiling, median of alternating pairs."""
    run_pairs(THROUGHPUT, benchmark, broker_factory, registry, dialect)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_load_payload_pairs(benchmark, broker_factory, registry, dialect):
    """Broker CPU per job with 1 MiB + 64 KiB results, fastbackend / forwarder, median of pairs."""
    run_pairs(PAYLOAD, benchmark, broker_factory, registry, dialect)
