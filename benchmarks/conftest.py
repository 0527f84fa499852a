"""Shared fixtures of the benchmarks: size knobs, broker kinds, and the summary table.

Knobs (environment variables):

* ``FASTBACKEND_BENCH_SMOKE=1``   tiny sizes, for CI (< 60 s): checks that nothing rotted;
* ``FASTBACKEND_BENCH_SCALE=F``   multiply job counts and durations by F (default 1);
  ``F >= 5`` also queues 1M jobs in the blocked-queue scenario;
* ``FASTBACKEND_STOCK_PYTHON=...`` the stock 0.5 venv's python (``stock/setup.sh``): every
  end-to-end scenario of dialect 0.5 then runs the stock backend too;
* ``FASTBACKEND_STOCK09_PYTHON=...`` likewise for stock 0.9.2 and dialect 0.9
  (``stock/setup-0.9.sh``);
* ``FASTBACKEND_BENCH_DIALECTS=0.5,0.9`` the dialects to run (default both);
* ``FASTBACKEND_BENCH_ALLOW_DEBUG=1`` measure a debug build of fastbackend (refused otherwise,
  except in a smoke run);
* ``FASTBACKEND_BENCH_SUMMARY=PATH`` also write the summary tables (markdown) to PATH;
* ``FASTBACKEND_BENCH_PURE=0``    leave out the pure-Python build of fastbackend;
* ``FASTBACKEND_BENCH_KINDS=a,b`` run only these brokers (stock, fastbackend,
  fastbackend-py, ceiling, slot-ceiling).

Every end-to-end test records its figures in a session registry; the tables printed at
the end of the run (one per dialect, and one of fastbackend's 0.9 against its 0.5 figures)
list each figure for every broker, and how fastbackend compares with the stock backend.
Each column is headed with what ran: core (c/py), build (release/debug), event loop.
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

from bench_config import CEILINGS, DIALECTS, KIND_ORDER, SCALE, SMOKE, broker_kinds  # noqa: E402
from brokers import BrokerFactory  # noqa: E402


@dataclass
class Figure:
    """One row of a summary table: a scenario's figure in one dialect, per broker kind."""

    dialect: str
    scenario: str
    name: str
    unit: str
    higher_is_better: bool
    comparable: bool = True
    values: dict[str, float | str | None] = field(default_factory=dict)


class Registry:
    """Figures of the whole session, in the order they were first recorded, and what ran."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], Figure] = {}
        #: (dialect, kind) -> the broker descriptions (brokers.BrokerFactory.describe) that ran.
        self.ran: dict[tuple[str, str], dict[str, dict]] = {}
        self.started = time.time()

    def record(self, scenario: str, name: str, unit: str, kind: str, value: float | str | None,
               higher_is_better: bool, comparable: bool = True, dialect: str = "0.5") -> None:
        row = self.rows.setdefault((dialect, scenario, name),
                                   Figure(dialect, scenario, name, unit, higher_is_better, comparable))
        row.values[kind] = value

    def note_broker(self, dialect: str, kind: str, info: dict) -> None:
        self.ran.setdefault((dialect, kind), {})[info["label"]] = info

    def get(self, dialect: str, scenario: str, name: str) -> Figure | None:
        return self.rows.get((dialect, scenario, name))

    def dialects(self) -> list[str]:
        return sorted({d for d, _, _ in self.rows})

    def column(self, dialect: str, kind: str) -> str:
        """A column's heading: the broker as it ran (core, build, loop, version)."""
        labels = sorted(self.ran.get((dialect, kind), {}))
        if not labels:
            return kind
        return labels[0] if len(labels) == 1 else f"{kind} [MIXED: {'; '.join(labels)}]"

    def table(self, dialect: str = "0.5") -> list[str]:
        rows = [r for r in self.rows.values() if r.dialect == dialect]
        kinds = [k for k in KIND_ORDER if any(k in r.values for r in rows)]
        header = ["scenario", "figure"] + [self.column(dialect, k) for k in kinds] + ["fastbackend vs stock"]
        floor = "slot-ceiling" in kinds and "fastbackend" in kinds
        if floor:
            header.append("fastbackend / slot ceiling")
        body = []
        for row in rows:
            cells = [row.scenario, f"{row.name} ({row.unit})" if row.unit else row.name]
            cells += [fmt(row.values.get(k)) for k in kinds]
            cells.append(ratio(row))
            if floor:
                cells.append(quotient(row.values.get("fastbackend"), row.values.get("slot-ceiling")))
            body.append(cells)
        return markdown(header, body)

    def dialect_table(self, kinds: tuple[str, ...] = ("fastbackend", "fastbackend-py", "stock")) -> list[str]:
        """Each figure measured in both dialects, side by side per broker, and 0.9 against 0.5."""
        header = ["scenario", "figure"]
        present = []
        for kind in kinds:
            if any(kind in r.values for r in self.rows.values() if r.dialect == "0.9") and \
                    any(kind in r.values for r in self.rows.values() if r.dialect == "0.5"):
                present.append(kind)
                header += [f"{kind} 0.5", f"{kind} 0.9", f"{kind} 0.9 vs 0.5"]
        if not present:
            return []
        body = []
        for (dialect, scenario, name), row in self.rows.items():
            other = self.rows.get(("0.5", scenario, name))
            if dialect != "0.9" or other is None:
                continue
            cells = [scenario, f"{row.name} ({row.unit})" if row.unit else row.name]
            for kind in present:
                old, new = other.values.get(kind), row.values.get(kind)
                better = relative(new, old, row.higher_is_better) if row.comparable else "-"
                cells += [fmt(old), fmt(new), better]
            body.append(cells)
        return markdown(header, body)

    def what_ran(self) -> list[str]:
        lines = []
        for (dialect, _kind), labels in sorted(self.ran.items()):
            for label, info in labels.items():
                libs = f"libzmq {info.get('libzmq', '?')}"
                if "pyzmq" in info:
                    libs = f"pyzmq {info['pyzmq']} / {libs}"
                if "msgpack" in info:
                    c_ext = "C extension" if info.get("msgpack_c") else "PURE PYTHON"
                    libs += f" / msgpack {info['msgpack']} ({c_ext})"
                where = f", from {info['path']}" if "path" in info else ""
                lines.append(f"* dialect {dialect}, {label}: {libs}{where}")
        return lines


def markdown(header: list[str], body: list[list[str]]) -> list[str]:
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


def relative(new, old, higher_is_better: bool) -> str:
    """How many times better ``new`` does than ``old`` (> 1: better)."""
    if not isinstance(new, (int, float)) or not isinstance(old, (int, float)) or new <= 0 or old <= 0:
        return "-"
    return f"{new / old:.2f}x" if higher_is_better else f"{old / new:.2f}x"


def quotient(value, floor) -> str:
    """``value / floor`` (fastbackend's figure over the slot-aware C ceiling's), or "-"."""
    if not isinstance(value, (int, float)) or not isinstance(floor, (int, float)) or floor <= 0:
        return "-"
    return f"{value / floor:.2f}x"


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
    # Tests asking for ``dialect`` and ``broker_kind`` run once per dialect and broker (the
    # stock broker of a dialect only when its venv is named); a scenario that makes no sense
    # for the ceilings (no environments, no priorities) says so with ``@pytest.mark.queueing``, one that
    # exists in some dialects only with ``@pytest.mark.dialects("0.9")``.
    names = metafunc.fixturenames
    if "broker_kind" not in names:
        return
    queueing = metafunc.definition.get_closest_marker("queueing") is not None
    only = metafunc.definition.get_closest_marker("dialects")
    dialects = [d for d in DIALECTS if only is None or d in only.args] if "dialect" in names else ["0.5"]
    cases = []
    for dialect in dialects:
        for kind in broker_kinds(dialect):
            if queueing and kind in CEILINGS:
                continue
            cases.append((dialect, kind))
    if "dialect" in names:
        metafunc.parametrize(("dialect", "broker_kind"), cases, ids=[f"{d}-{k}" for d, k in cases])
    else:
        metafunc.parametrize("broker_kind", [k for _, k in cases])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "queueing: end-to-end scenario that needs a broker with a queue")
    config.addinivalue_line("markers", "dialects(*names): end-to-end scenario run in these dialects only")


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


def summary_lines() -> list[str]:
    lines = [machine_line(), ""]
    for dialect in REGISTRY.dialects():
        lines.append(f"### Dialect {dialect}" + (" (INGInious 0.5)" if dialect == "0.5" else
                                                 " (INGInious 0.7-0.9.2)"))
        lines.append("")
        lines += REGISTRY.table(dialect)
        lines.append("")
    both = REGISTRY.dialect_table()
    if both:
        lines.append("### The same broker in both dialects (> 1x: 0.9 does better than 0.5)")
        lines.append("")
        lines += both
        lines.append("")
    lines.append("What ran (each column's heading: core, build, event loop):")
    lines += REGISTRY.what_ran()
    lines.append("")
    lines.append(
        "CPU figures are the broker process's own CPU time (all threads, /proc schedstat) per job; "
        "rates and latencies are wall-clock and move with whatever else the machine runs."
    )
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not REGISTRY.rows:
        return
    terminalreporter.section("fastbackend end-to-end summary")
    lines = summary_lines()
    for line in lines:
        terminalreporter.write_line(line)
    out = os.environ.get("FASTBACKEND_BENCH_SUMMARY")
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
        terminalreporter.write_line(f"(summary written to {out})")
