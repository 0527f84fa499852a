"""Shared fixtures: the broker under test as a subprocess, over implementations and event loops.

``broker`` starts ``python -m fastbackend serve AGENT CLIENT`` on free 127.0.0.1 ports,
waits until it answers, yields a :class:`peers.broker.BrokerProcess` (addresses, PID,
captured log), then stops it by its PID and checks that it exited with status 0 and
logged no traceback.

Which broker configurations a test runs against is chosen by marker:

* no marker: ``c-uvloop`` (the compiled implementation on uvloop, as deployed);
* ``@pytest.mark.brokers("c-uvloop", "py-asyncio", ...)``: the listed configurations;
* ``@pytest.mark.brokers(*ALL_CONFIGS)``: the full matrix (c|py x uvloop|asyncio).

``FASTBACKEND_TEST_STOCK=1`` runs every test that uses ``broker`` against the STOCK
INGInious backend of the run's version instead (:mod:`peers.stock_backend`); that proves
the tests test the protocol rather than our reading of it.  Tests marked
``@pytest.mark.stock_bug("why")`` are then expected to fail (strict xfail: a pass would
mean the test no longer detects the stock defect), and their broker is not required to
exit cleanly, since crashing on bad input is one of the defects.

Two runs, one per INGInious version (both install as the package ``inginious``, so their
real peers cannot share an interpreter; ``tests/run.sh`` does both):

* the venv's INGInious 0.5 importable: every module but the 0.9 ones (:data:`MODULES_09`);
* ``.peers/0.9`` first on ``PYTHONPATH`` (INGInious 0.9.2): only :data:`MODULES_09`
  (with ``FASTBACKEND_TEST_STOCK=1``, only the 0.9 conformance suite: stock has no
  mixed-dialect mode to compare with).

The other run's modules are not collected at all (rather than skipped).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from peers import INGINIOUS_DIALECT
from peers.broker import CONFIGS, DEFAULT_CONFIGS, STOCK_CONFIGS, BrokerProcess

STOCK = os.environ.get("FASTBACKEND_TEST_STOCK", "") not in ("", "0")

#: The modules of the INGInious 0.9.2 run (every other test module is the 0.5 run's).
MODULES_09 = frozenset({"test_conformance_09.py", "test_mixed_dialects.py", "test_crash_delay.py",
                        "test_partitions.py"})
#: Of those, the ones that make sense against the stock 0.9.2 backend.
STOCK_MODULES_09 = frozenset({"test_conformance_09.py"})

if INGINIOUS_DIALECT is None:
    raise pytest.UsageError("no `inginious` importable: run the tests with tests/run.sh (see README)")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Collect only this run's modules (see the module docstring)."""
    if collection_path.parent != Path(__file__).parent or not collection_path.name.startswith("test_"):
        return None
    if INGINIOUS_DIALECT == "0.9":
        wanted = STOCK_MODULES_09 if STOCK else MODULES_09
        return collection_path.name not in wanted
    return collection_path.name in MODULES_09 or None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "brokers(*names): broker configurations to run the test against")
    config.addinivalue_line(
        "markers", "stock_bug(reason): the stock backend fails this test (xfail if FASTBACKEND_TEST_STOCK=1)"
    )
    # The real Agent re-arms its ping check with loop.call_later(1, ..., coroutine); the one
    # pending when a test's loop closes is never awaited.  That is the peer's design, not a bug here.
    config.addinivalue_line(
        "filterwarnings", "ignore:coroutine 'Agent.__check_last_ping' was never awaited:RuntimeWarning"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "broker" not in metafunc.fixturenames:
        return
    if STOCK:
        names: tuple[str, ...] = (STOCK_CONFIGS[INGINIOUS_DIALECT],)
    else:
        marker = metafunc.definition.get_closest_marker("brokers")
        names = tuple(marker.args) if marker else DEFAULT_CONFIGS
    unknown = set(names) - set(CONFIGS)
    if unknown:
        raise ValueError(f"unknown broker configurations {unknown}")
    metafunc.parametrize("broker", names, indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not STOCK:
        return
    for item in items:
        marker = item.get_closest_marker("stock_bug")
        if marker is not None:
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "stock bug")
            item.add_marker(pytest.mark.xfail(reason=f"stock bug: {reason}", strict=True))


@pytest.fixture
def broker(request: pytest.FixtureRequest, tmp_path) -> Iterator[BrokerProcess]:
    """A running broker (see the module docstring); stopped and checked at teardown."""
    process = BrokerProcess(CONFIGS[request.param], tmp_path / "broker.log")
    process.start_on_free_ports()
    try:
        yield process
    finally:
        code = process.stop()
        expected_to_fail = STOCK and request.node.get_closest_marker("stock_bug") is not None
        if not expected_to_fail:
            process.check_clean_exit(code)


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:
    """A blocking pyzmq context for raw peers, destroyed (linger 0) after the test."""
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)
