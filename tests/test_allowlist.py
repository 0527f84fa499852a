"""``--allow-agents`` / ``--allow-clients``: ZAP allowlists on both sockets, both dialects.

Peers connect from chosen loopback source addresses with libzmq's ``tcp://SRC:0;DST:PORT``
syntax: 127.0.0.2 is allowed, 127.0.0.3 is refused, and ``::1`` is allowed or refused
depending on the list.  An allowed peer is served normally; a refused one gets nothing
(its handshake never completes).  The broker runs in-process (``Backend`` on its own
loop in a thread) so its ``refused`` counters can be read, and once as the real command.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import msgpack
import pytest
import zmq
import zmq.auth.thread
from peers.broker import CONFIGS, BrokerProcess

from fastbackend import Backend
from fastbackend.allowlist import ZapEndpointBusy, allowed, parse_allowlist

ALLOWED, REFUSED = "127.0.0.2", "127.0.0.3"
#: How long a refused peer is watched for any answer.
SILENCE = 1.5


@contextmanager
def running(context: zmq.Context, agent_addr: str, client_addr: str, **options) -> Iterator[Backend]:
    """A Backend served on its own event loop in a thread; stopped (bounded) on exit."""
    backend = Backend(context, agent_addr, client_addr, **options)
    loop = asyncio.new_event_loop()
    failure: list[BaseException] = []
    task_ready = threading.Event()
    tasks: list[asyncio.Task] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        task = loop.create_task(backend.run())
        tasks.append(task)
        task_ready.set()
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            failure.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    task_ready.wait(5)
    deadline = time.monotonic() + 5
    while backend.client_endpoint is None and not failure and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        if failure:
            raise failure[0]
        assert backend.client_endpoint is not None, "backend did not start"
        yield backend
    finally:
        if tasks and not loop.is_closed():
            loop.call_soon_threadsafe(tasks[0].cancel)
        thread.join(10)
        assert not thread.is_alive(), "backend thread did not stop"


def _port(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[1]


def _dealer(ctx: zmq.Context, src: str, endpoint: str) -> zmq.Socket:
    """A DEALER connected from source address ``src`` to the port of ``endpoint``.

    Sends time out: once the broker has refused the handshake, libzmq drops the socket's
    only pipe, and a send made after that (a loaded machine can delay it past the refusal)
    would otherwise wait for ever.
    """
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndtimeo = int(SILENCE * 1000)
    sock.ipv6 = True
    dst = "[::1]" if ":" in src else "127.0.0.1"
    host = f"[{src}]" if ":" in src else src
    sock.connect(f"tcp://{host}:0;{dst}:{_port(endpoint)}")
    return sock


def _send(sock: zmq.Socket, message: dict) -> bool:
    """Send; False if the socket has no way to the broker any more (it was refused)."""
    try:
        sock.send(msgpack.packb(message, use_bin_type=True))
    except zmq.Again:
        return False
    return True


def _recv(sock: zmq.Socket, timeout: float) -> dict | None:
    if not sock.poll(int(timeout * 1000)):
        return None
    return msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)


CLIENT_HELLO = {"0.5": {"type": "client_hello", "name": "c"}, "0.9": {"@type": "ClientHello", "name": "c"}}
ENVIRONMENTS = {"0.5": "backend_update_containers", "0.9": "BackendUpdateEnvironments"}


def _agent_hello(dialect: str, name: str) -> dict:
    if dialect == "0.5":
        return {"type": "agent_hello", "friendly_name": name, "available_job_slots": 1,
                "available_containers": {name: {"id": "sha256:x", "created": 1}}}
    return {"@type": "AgentHello", "friendly_name": name, "available_job_slots": 1,
            "available_environments": {"docker": {name: {"id": "sha256:x", "created": 1}}}}


def _client_served(ctx: zmq.Context, src: str, endpoint: str, dialect: str) -> bool:
    """Does a client from ``src`` get the environment list in answer to its hello?"""
    sock = _dealer(ctx, src, endpoint)
    try:
        if not _send(sock, CLIENT_HELLO[dialect]):
            return False
        answer = _recv(sock, SILENCE)
        if answer is not None:
            assert answer.get("type", answer.get("@type")) == ENVIRONMENTS[dialect], answer
        return answer is not None
    finally:
        sock.close(0)


def _agent_served(ctx: zmq.Context, src: str, backend: Backend, dialect: str) -> bool:
    """Is an agent from ``src`` registered (pinged, and its environment shown to a client)?"""
    name = f"env-{src.replace(':', '_').replace('.', '_')}-{dialect}"
    agent = _dealer(ctx, src, backend.agent_endpoint)
    watcher = _dealer(ctx, "127.0.0.1" if ":" not in src else "::1", backend.client_endpoint)
    try:
        # The broker pings every second; an agent whose hello could not even be sent is not.
        pinged = _send(agent, _agent_hello(dialect, name)) and _recv(agent, SILENCE + 1.0) is not None
        assert _send(watcher, CLIENT_HELLO[dialect]), "the watching client (always allowed) cannot send"
        envs = _recv(watcher, 5)
        assert envs is not None, "the watching client (always allowed) got no answer"
        listed = name in str(envs)
        assert pinged == listed, (pinged, envs)
        return listed
    finally:
        agent.close(0)
        watcher.close(0)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(0)


@pytest.mark.parametrize("dialect", ["0.5", "0.9"])
def test_client_allowlist(ctx, dialect):
    with running(ctx, "tcp://127.0.0.1:*", "tcp://*:*", allow_clients="127.0.0.1,127.0.0.2,::1") as backend:
        assert _client_served(ctx, ALLOWED, backend.client_endpoint, dialect)
        assert not _client_served(ctx, REFUSED, backend.client_endpoint, dialect)
        assert _client_served(ctx, "::1", backend.client_endpoint, dialect)
        assert backend.refused["client"] >= 1 and backend.refused["agent"] == 0


@pytest.mark.parametrize("dialect", ["0.5", "0.9"])
def test_agent_allowlist(ctx, dialect):
    with running(ctx, "tcp://*:*", "tcp://*:*", allow_agents=["127.0.0.2/32", "::1/128"]) as backend:
        assert _agent_served(ctx, ALLOWED, backend, dialect)
        assert not _agent_served(ctx, REFUSED, backend, dialect)
        assert _agent_served(ctx, "::1", backend, dialect)
        assert backend.refused["agent"] >= 1 and backend.refused["client"] == 0


def test_ipv6_refused_when_only_ipv4_is_listed(ctx):
    with running(ctx, "tcp://*:*", "tcp://*:*", allow_agents="127.0.0.0/8",
                 allow_clients="127.0.0.0/8") as backend:
        assert not _client_served(ctx, "::1", backend.client_endpoint, "0.9")
        assert _client_served(ctx, REFUSED, backend.client_endpoint, "0.9")  # in 127/8
        assert backend.refused["client"] >= 1


def test_no_allowlist_serves_everyone_and_uses_no_zap(ctx):
    with running(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*") as backend:
        assert _client_served(ctx, REFUSED, backend.client_endpoint, "0.5")
        # The ZAP endpoint is free: nothing was bound.
        probe = ctx.socket(zmq.REP)
        probe.bind("inproc://zeromq.zap.01")
        probe.close(0)


def test_refusals_are_logged_once_per_address_per_minute(ctx, caplog):
    with caplog.at_level(logging.WARNING, logger="fastbackend.allowlist"):
        with running(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", allow_clients=ALLOWED) as backend:
            # Three peers from one address: three refusals, one line.
            socks = [_dealer(ctx, REFUSED, backend.client_endpoint) for _ in range(3)]
            deadline = time.monotonic() + 5
            while backend.refused["client"] < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            for sock in socks:
                sock.close(0)
            assert backend.refused["client"] >= 3
    lines = [r.getMessage() for r in caplog.records if "refused client connection" in r.getMessage()]
    assert len(lines) == 1 and REFUSED in lines[0], lines


def test_two_backends_on_one_context_share_the_zap_handler(ctx):
    with running(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", allow_clients=ALLOWED) as first:
        with running(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", allow_clients=REFUSED) as second:
            assert _client_served(ctx, ALLOWED, first.client_endpoint, "0.5")
            assert not _client_served(ctx, REFUSED, first.client_endpoint, "0.5")
            assert _client_served(ctx, REFUSED, second.client_endpoint, "0.5")
            assert not _client_served(ctx, ALLOWED, second.client_endpoint, "0.5")
        # The first still filters after the second left.
        assert not _client_served(ctx, REFUSED, first.client_endpoint, "0.5")
    # Both gone: the endpoint is free again.
    probe = ctx.socket(zmq.REP)
    probe.bind("inproc://zeromq.zap.01")
    probe.close(0)


def test_an_existing_zap_handler_is_a_clear_error(ctx):
    auth = zmq.auth.thread.ThreadAuthenticator(ctx)
    auth.start()
    try:
        with pytest.raises(ZapEndpointBusy, match="already bound"):
            with running(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", allow_agents=ALLOWED):
                pass
    finally:
        auth.stop()


def test_bad_lists_and_non_tcp_addresses_are_refused_at_once(ctx):
    with pytest.raises(ValueError, match="not an IPv4 or IPv6 network"):
        Backend(ctx, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", allow_agents="10.0.0.0/33")
    with pytest.raises(ValueError, match="--allow-agents.*tcp://"):
        Backend(ctx, "ipc:///tmp/x", "tcp://127.0.0.1:2", allow_agents="10.0.0.0/8")
    assert len(parse_allowlist("10.0.0.0/8, ::1 ,2001:db8::/32")) == 3
    assert allowed(parse_allowlist("10.0.0.0/8"), "::ffff:10.1.2.3")
    assert not allowed(parse_allowlist("10.0.0.0/8"), "")


def test_serve_command_with_allowlists(tmp_path):
    """The command line: options, the start-up line, a refused peer, a clean exit."""
    broker = BrokerProcess(CONFIGS["py-asyncio"], tmp_path / "broker.log",
                           extra_args=("--allow-agents", "127.0.0.2",
                                       "--allow-clients", "127.0.0.1,127.0.0.2"))
    broker.start_on_free_ports()
    ctx = zmq.Context()
    try:
        assert "agents allowed from 127.0.0.2/32" in broker.log_lines("INFO", "fastbackend started")[0]
        assert _client_served(ctx, ALLOWED, broker.client_addr, "0.9")
        assert not _client_served(ctx, REFUSED, broker.client_addr, "0.9")
        broker.wait_log("WARNING", f"refused client connection from {REFUSED}")
    finally:
        ctx.destroy(0)
        code = broker.stop()
    broker.check_clean_exit(code)
    env = {**os.environ, "PYTHONPATH": str(broker.command()[2])}
    argv = [sys.executable, "-m", "fastbackend", "serve", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0",
            "--allow-clients", "nonsense"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "'nonsense' is not an IPv4 or IPv6 network" in done.stderr
    assert "Traceback" not in done.stderr


#: The full matrix: for each list, which loopback sources it allows (True) or refuses (False).
#: The first names the sources one by one; the second is an IPv4 network, which must not
#: let an IPv6 peer in (``::1`` is not in 127.0.0.0/8, and no IPv4-mapped form is forged).
MATRIX_LISTS = {
    "127.0.0.2,::1": {ALLOWED: True, REFUSED: False, "::1": True},
    "127.0.0.0/8": {ALLOWED: True, REFUSED: True, "::1": False},
}


def _matrix_cases() -> list:
    return [pytest.param(side, dialect, allowlist, source, "allowed" if ok else "refused",
                         id=f"{side}-{dialect}-{allowlist}-from-{source}-{'allowed' if ok else 'refused'}")
            for side in ("agent", "client") for dialect in ("0.5", "0.9")
            for allowlist, answers in MATRIX_LISTS.items() for source, ok in answers.items()]


@pytest.fixture(scope="module")
def matrix_backends() -> Iterator[dict[tuple[str, str], Backend]]:
    """One Backend per (socket, list), listening dual-stack on both sockets with the list on
    that socket only (so a refusal on the other socket would show as a wrong answer)."""
    with ExitStack() as stack:
        backends = {}
        for allowlist in MATRIX_LISTS:
            for side in ("agent", "client"):
                # A context per Backend: the ZAP handler is one per context.
                context = zmq.Context()
                stack.callback(context.destroy, 0)
                backends[side, allowlist] = stack.enter_context(
                    running(context, "tcp://*:*", "tcp://*:*", **{f"allow_{side}s": allowlist}))
        yield backends


@pytest.mark.parametrize(("side", "dialect", "allowlist", "source", "expected"), _matrix_cases())
def test_allowlist_matrix(ctx, matrix_backends, side, dialect, allowlist, source, expected):
    """Source address x socket x dialect x list: served when allowed, nothing when refused,
    and a refusal counted on that socket only."""
    backend = matrix_backends[side, allowlist]
    before = dict(backend.refused)
    if side == "agent":
        served = _agent_served(ctx, source, backend, dialect)
    else:
        served = _client_served(ctx, source, backend.client_endpoint, dialect)
    assert served == (expected == "allowed")
    other = "client" if side == "agent" else "agent"
    assert backend.refused[other] == before[other] == 0
    if expected == "refused":
        assert backend.refused[side] > before[side]
