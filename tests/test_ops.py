"""Day-one operator details, in-process: the idle "alive" line, logging where INGInious
operators look (local mode), running the webapp's local mode on fastbackend without
editing INGInious, and the socket options that let thousands of agents connect."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
import zmq
from peers.broker import REPO_ROOT
from test_allowlist import running

from fastbackend import Backend, server


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(0)


def test_an_idle_broker_says_it_is_alive(ctx, caplog):
    with caplog.at_level(logging.INFO, logger="fastbackend"):
        with running(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", summary_period=0.2):
            deadline = time.monotonic() + 5
            while not any("alive, idle" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
                time.sleep(0.05)
    line = next(r.getMessage() for r in caplog.records if "alive, idle" in r.getMessage())
    assert "0 agents, 0 clients" in line


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_embedded_backend_logs_under_inginious_backend(ctx):
    """As the webapp's init_logging does: a handler on ``inginious`` only.  fastbackend's lines
    reach it, named ``inginious.backend`` as stock's, once each, at INGInious's level."""
    inginious = logging.getLogger("inginious")
    ours = logging.getLogger("fastbackend")
    saved = (inginious.level, list(inginious.handlers), ours.level, list(ours.handlers), ours.propagate)
    collect = _Collect()
    inginious.handlers = [collect]
    inginious.setLevel(logging.INFO)
    ours.handlers = []
    try:
        with running(ctx, "inproc://backend_agent", "inproc://backend_client"):
            pass
        started = [line for line in collect.lines if "fastbackend started" in line]
        assert len(started) == 1 and " - inginious.backend - INFO - " in started[0], collect.lines
        assert any("fastbackend stopped" in line for line in collect.lines)
    finally:
        inginious.setLevel(saved[0])
        inginious.handlers = saved[1]
        ours.setLevel(saved[2])
        ours.handlers = saved[3]
        ours.propagate = saved[4]


def test_no_inginious_logging_leaves_fastbackend_logging_alone(ctx):
    ours = logging.getLogger("fastbackend")
    assert not logging.getLogger("inginious").handlers
    Backend(ctx, "inproc://a", "inproc://b")
    assert ours.propagate and not ours.handlers


def test_sockets_listen_deep_and_leave_silent_agent_connections_to_the_kernel(ctx, monkeypatch):
    """Both sockets get a listen queue of LISTEN_BACKLOG (libzmq's 100 overflowed when 10,000
    agents reconnected at once), and the agent socket has no ZMTP heartbeat: libzmq cancels a
    heartbeat's timeout timer by a linear scan of every connection's timers, O(N²) per second
    with N agents, which stopped the broker accepting near 8,000 of them.  The kernel closes
    silent agent connections instead (TCP_MAXRT, keepalives)."""
    options = (zmq.BACKLOG, zmq.HEARTBEAT_IVL, zmq.TCP_MAXRT, zmq.TCP_KEEPALIVE)
    seen: dict[str, dict[int, int]] = {}
    make_router = server.make_router

    def recording(*args, **kwargs) -> zmq.Socket:
        # Read here, in the serving thread, right after the socket is made.
        socket = make_router(*args, **kwargs)
        seen[args[2]] = {option: socket.getsockopt(option) for option in options}
        return socket

    monkeypatch.setattr(server, "make_router", recording)
    with running(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*"):
        pass
    assert seen["agent"] == {zmq.BACKLOG: server.LISTEN_BACKLOG, zmq.HEARTBEAT_IVL: 0,
                             zmq.TCP_MAXRT: server.AGENT_TCP_TIMEOUT_MS, zmq.TCP_KEEPALIVE: 1}
    assert seen["client"] == {zmq.BACKLOG: server.LISTEN_BACKLOG, zmq.HEARTBEAT_IVL: 0,
                              zmq.TCP_MAXRT: 0, zmq.TCP_KEEPALIVE: -1}
    assert server.LISTEN_BACKLOG > 1000


def test_local_mode_hook_replaces_the_stock_backend_class(tmp_path):
    """``python -m fastbackend.inginious_local -m MODULE``: MODULE sees fastbackend's Backend where
    arch_helper imports the stock one; nothing on disk changes."""
    (tmp_path / "fake_webapp.py").write_text(
        "import sys\n"
        "from inginious.backend.backend import Backend\n"
        "print(Backend.__module__, sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(tmp_path)])}
    hook = [sys.executable, "-m", "fastbackend.inginious_local"]
    done = subprocess.run([*hook, "-m", "fake_webapp", "--x", "1"],
                          capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fastbackend.server", "['--x',", "'1']"]
    done = subprocess.run([*hook, str(tmp_path / "fake_webapp.py")],
                          capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and done.stdout.startswith("fastbackend.server"), done.stderr
