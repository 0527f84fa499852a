"""Shared fixtures of the benchmarks: size knobs, broker kinds, and the summary table.

Knobs (environment variables):

* ``FASTBACKEND_BENCH_SMOKE=1``   tiny sizes, for CI (< 60 s): checks that nothing rotted;
* ``FASTBACKEND_BENCH_SCALE=F``   multiply job counts and durations by F (default 1);
  ``F >= 5`` also queues 1M jobs in the blocked-queue scenario;
* ``FASTBACKEND_STOCK_PYTHON=...`` the stock venv's python (``stock/setup.sh``): every
  end-to-end scenario then runs the stock backend too;
* ``FASTBACKEND_BENCH_PURE=0``    leave out the pure-Python build of fastbackend;
* ``FASTBACKEND_BENCH_KINDS=a,b`` run only these brokers (stock, fastbackend,
  fastbackend-py, ceiling).

Every end-to-end test records its figures in a session registry; the table printed at
the end of the run lists each figure for every broker, and how fastbackend compares
with the stock backend.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_config import KIND_ORDER, SCALE, SMOKE, broker_kinds  # noqa: E402
from brokers import BrokerFactory  # noqa: E402


@dataclass
class Figure:
    """One row of the summary: a scenario's figure, per broker kind."""

    scenario: str
    name: str
    unit: str
    higher_is_better: bool
    comparable: bool = True
    values: dict[str, float | str | None] = field(default_factory=dict)


class Registry:
    """Figures of the whole session, in the order they were first recorded."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Figure] = {}
        self.started = time.time()

    def record(self, scenario: str, name: str, unit: str, kind: str, value: float | str | None,
               higher_is_better: bool, comparable: bool = True) -> None:
        row = self.rows.setdefault((scenario, name),
                                   Figure(scenario, name, unit, higher_is_better, comparable))
        row.values[kind] = value

    def table(self) -> list[str]:
        kinds = [k for k in KIND_ORDER if any(k in r.values for r in self.rows.values())]
        header = ["scenario", "figure"] + kinds + ["fastbackend vs stock"]
        body = []
        for row in self.rows.values():
            cells = [row.scenario, f"{row.name} ({row.unit})" if row.unit else row.name]
            cells += [fmt(row.values.get(k)) for k in kinds]
            cells.append(ratio(row))
            body.append(cells)
        widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return [line(header), sep] + [line(c) for c in body]


def fmt(value: float | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def ratio(row: Figure) -> str:
    """How many times better fastbackend is than stock on this figure."""
    fast, stock = row.values.get("fastbackend"), row.values.get("stock")
    if not row.comparable:
        return "-"
    if not isinstance(fast, (int, float)) or not isinstance(stock, (int, float)):
        return "-"
    if row.higher_is_better:
        return f"{fast / stock:.1f}x" if stock > 0 else ("inf" if fast > 0 else "-")
    return f"{stock / fast:.1f}x" if fast > 0 else "-"


REGISTRY = Registry()


@pytest.fixture(scope="session")
def registry() -> Registry:
    return REGISTRY


@pytest.fixture(scope="session")
def broker_factory(tmp_path_factory: pytest.TempPathFactory) -> BrokerFactory:
    return BrokerFactory(tmp_path_factory.mktemp("brokers"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests asking for ``broker_kind`` run once per broker; a scenario that makes no sense
    # for the ceiling (it keeps no queue) says so with ``@pytest.mark.queueing``.
    if "broker_kind" in metafunc.fixturenames:
        kinds = broker_kinds()
        if metafunc.definition.get_closest_marker("queueing"):
            kinds = [k for k in kinds if k != "ceiling"]
        metafunc.parametrize("broker_kind", kinds)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "queueing: end-to-end scenario that needs a broker with a queue")


def machine_line() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{time.strftime('%Y-%m-%d')}, nproc={os.cpu_count()}, {model}, "
            f"Python {platform.python_version()}, scale={'smoke' if SMOKE else SCALE}")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not REGISTRY.rows:
        return
    terminalreporter.section("fastbackend end-to-end summary")
    terminalreporter.write_line(machine_line())
    for line in REGISTRY.table():
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        "CPU figures are the broker process's own CPU time (all threads, /proc schedstat) per job; "
        "rates and latencies are wall-clock and move with whatever else the machine runs."
    )
