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
INGInious 0.5 backend instead (:mod:`peers.stock_backend`); that proves the tests test
the protocol rather than our reading of it.  Tests marked
``@pytest.mark.stock_bug("why")`` are then expected to fail (strict xfail: a pass would
mean the test no longer detects the stock defect), and their broker is not required to
exit cleanly, since crashing on bad input is one of the defects.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import zmq
from peers.broker import CONFIGS, DEFAULT_CONFIGS, BrokerProcess

STOCK = os.environ.get("FASTBACKEND_TEST_STOCK", "") not in ("", "0")


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
        names: tuple[str, ...] = ("stock",)
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
