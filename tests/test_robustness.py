"""Robustness: inputs the real peers never send, from raw pyzmq sockets.

For each bad input: the broker logs a WARNING line saying the frame was dropped, the peer
that sent it is still served, and a normal job still runs end to end with fresh peers.
Then the semantic cases (messages from agents that never said hello, results for jobs that
are not running there, duplicate job ids and results, a client killing another's job), a
flood of bad frames (bounded logging, prompt pongs), a client that stops reading while
20,000 results pile up, and a ZMTP frame header claiming 1 GiB.

Under ``FASTBACKEND_TEST_STOCK=1`` the stock backend fails all but the kill test (bad
input ends its receive loop, it logs nothing as dropped, its ROUTER drops results at the
high-water mark, it has no frame size limit): those tests carry ``stock_bug`` marks.
"""

from __future__ import annotations

import time
import uuid

import msgpack
import pytest
from peers.broker import IMPL_CONFIGS
from peers.raw import (
    EchoAgentThread,
    RawAgent,
    RawClient,
    ZmtpPeer,
    assert_serving,
    job_done_message,
    new_job_message,
    pack,
    unpack,
)

pytestmark = pytest.mark.brokers(*IMPL_CONFIGS)
stock_drops_nothing_visibly = pytest.mark.stock_bug(
    "bad input ends the stock receive loop, and nothing is logged as dropped")

BAD_ENV = "bad-input-env"
FORGED_ID = (b"\x00\x6b\x8b\x45\x67", "no-such-job")


def _without(message: dict, key: str) -> dict:
    return {k: v for k, v in message.items() if k != key}


def _new_job(**overrides) -> bytes:
    message = new_job_message("3f0c6a4e-bad0-4bad-8bad-000000000001", BAD_ENV)
    message.update(overrides)
    return pack(message)


def _done(**overrides) -> bytes:
    message = job_done_message(FORGED_ID)
    message.update(overrides)
    return pack(message)


def _nested_arrays(depth: int) -> bytes:
    """A client_new_job whose inputdata is ``depth`` nested one-element arrays (a stack bomb)."""
    head = pack(new_job_message("deep", BAD_ENV, inputdata=None))
    nil = msgpack.packb(None)
    # Replace the encoded nil of inputdata (the only nil in the frame) by the nest.
    assert head.count(nil) == 1
    return head.replace(nil, b"\x91" * depth + nil)


def _truncated_bin32() -> bytes:
    """A client_new_job whose inputdata claims to be a 4 GiB bin but the frame ends right after."""
    head = pack(new_job_message("huge", BAD_ENV, inputdata=None))
    return head.replace(msgpack.packb(None), b"\xc6\xff\xff\xff\xf0" + b"x" * 16)


# (id, frames of ONE multipart message) sent by a registered raw client.
CLIENT_CASES = [
    ("garbage", [b"\xc1\xc1 definitely not msgpack \x00\xff"]),
    ("empty-frame", [b""]),
    ("not-a-map", [pack(["client_hello", "me"])]),
    ("bare-string", [pack("ping")]),
    ("unknown-type", [pack({"type": "client_launch_missiles", "target": "moon"})]),
    ("no-type", [pack({"name": "me"})]),
    ("agent-type-on-client-socket", [pack({"type": "agent_job_started", "job_id": (b"x", "y")})]),
    ("missing-key", [pack(_without(new_job_message("j-missing", BAD_ENV), "launcher"))]),
    ("extra-key", [_new_job(priority=1)]),
    ("job-id-int", [_new_job(job_id=12345)]),
    ("environment-list", [_new_job(environment=(BAD_ENV,))]),
    ("time-limit-str", [_new_job(time_limit="30")]),
    ("hello-name-int", [pack({"type": "client_hello", "name": 7})]),
    ("trailing-bytes", [pack({"type": "ping"}) + b"\x00"]),
    ("two-frames", [pack({"type": "ping"}), pack({"type": "ping"})]),
    ("map32-claims-4G-entries", [b"\xdf\xff\xff\xff\xff" + pack("type") + pack("ping")]),
    ("bin32-claims-4GiB", [_truncated_bin32()]),
    ("str32-key-claims-4GiB", [b"\x81\xdb\xff\xff\xff\xff" + b"type"]),
    ("nesting-100k-deep", [_nested_arrays(100_000)]),
]

# (id, frames) sent by a registered raw agent.
AGENT_CASES = [
    ("garbage", [b"\xc1\x00\xff garbage"]),
    ("not-a-map", [pack((1, 2, 3))]),
    ("unknown-type", [pack({"type": "agent_self_destruct"})]),
    ("client-type-on-agent-socket", [pack({"type": "client_hello", "name": "agent?"})]),
    ("missing-key", [pack(_without(job_done_message(FORGED_ID), "stderr"))]),
    ("extra-key", [_done(state="done")]),
    ("job-id-str", [_done(job_id="just-a-string")]),
    ("job-id-int-parts", [_done(job_id=(1, 2))]),
    ("job-id-three-parts", [_done(job_id=(b"id", "job", "extra"))]),
    ("hello-negative-slots", [pack({"type": "agent_hello", "friendly_name": "neg", "available_job_slots": -1,
                                    "available_containers": {}})]),
    ("hello-containers-list", [pack({"type": "agent_hello", "friendly_name": "lst", "available_job_slots": 1,
                                     "available_containers": ("env",)})]),
    ("two-frames", [pack({"type": "pong"}), pack({"type": "pong"})]),
    ("map32-claims-4G-entries", [b"\xdf\xff\xff\xff\xff"]),
    ("result-for-unknown-job", [_done()]),
]


def _registered_client(zctx, broker, *environments: str) -> RawClient:
    """A raw client that said hello and got a container list with ``environments``."""
    client = RawClient(zctx, broker.client_addr)
    client.hello("robust")
    client.wait_containers(*environments)
    return client


def _expect_dropped_line(broker, before: int) -> str:
    lines = broker.wait_log("WARNING", "dropped", count=before + 1, timeout=5)
    return lines[before]


@stock_drops_nothing_visibly
@pytest.mark.parametrize("frames", [c[1] for c in CLIENT_CASES], ids=[c[0] for c in CLIENT_CASES])
def test_bad_client_frame_is_dropped(broker, zctx, frames):
    client = _registered_client(zctx, broker)
    before = len(broker.log_lines("WARNING", "dropped"))
    client.send_frames(*frames)
    _expect_dropped_line(broker, before)
    # The sender is still a registered client, and the broker still runs jobs.
    client.send("ping")
    assert client.recv_type("pong")["type"] == "pong"
    assert_serving(zctx, broker.agent_addr, broker.client_addr)


@stock_drops_nothing_visibly
@pytest.mark.parametrize("frames", [c[1] for c in AGENT_CASES], ids=[c[0] for c in AGENT_CASES])
def test_bad_agent_frame_is_dropped(broker, zctx, frames):
    agent = RawAgent(zctx, broker.agent_addr)
    agent.hello("robust-agent", 1, (BAD_ENV,))
    client = _registered_client(zctx, broker, BAD_ENV)
    before = len(broker.log_lines("WARNING", "dropped"))
    agent.send_frames(*frames)
    _expect_dropped_line(broker, before)
    # The agent that sent it still gets jobs and its results still reach the client.
    job_id = str(uuid.uuid4())
    client.new_job(job_id, BAD_ENV)
    job = agent.recv_job()
    agent.done(job["job_id"], ("success", "still here"))
    done = client.recv_type("backend_job_done")
    assert (done["job_id"], done["result"]) == (job_id, ("success", "still here"))
    assert_serving(zctx, broker.agent_addr, broker.client_addr)


# -- semantic cases --------------------------------------------------------------------------
def _ping_barrier(client: RawClient) -> None:
    """Ping and wait for the pong: no job message may arrive before it (the broker answers in
    order, so anything it sent about a job before handling the ping would show up here)."""
    client.send("ping")
    while True:
        message = client.recv(5)
        if message["type"] == "pong":
            return
        assert "job_id" not in message, f"unexpected {message!r}"


@stock_drops_nothing_visibly
def test_messages_from_an_agent_that_never_said_hello_are_dropped(broker, zctx):
    """A rogue socket on the agent port cannot finish, start or ssh-debug someone else's job."""
    agent = RawAgent(zctx, broker.agent_addr)
    agent.hello("honest", 1, (BAD_ENV,))
    client = _registered_client(zctx, broker, BAD_ENV)
    job_id = str(uuid.uuid4())
    client.new_job(job_id, BAD_ENV)
    backend_job_id = agent.recv_job()["job_id"]

    rogue = RawAgent(zctx, broker.agent_addr)
    before = len(broker.log_lines("WARNING", "dropped"))
    rogue.started(backend_job_id)
    rogue.send("agent_job_ssh_debug", job_id=backend_job_id, host="evil", port=1, password="x")
    rogue.done(backend_job_id, ("success", "forged"))
    broker.wait_log("WARNING", "dropped", count=before + 3)

    agent.done(backend_job_id, ("success", "genuine"))
    done = client.recv_type("backend_job_done")
    assert (done["job_id"], done["result"]) == (job_id, ("success", "genuine"))
    assert not [m for m in client.received if m["type"] != "backend_update_containers"]
    _ping_barrier(client)


@stock_drops_nothing_visibly
def test_results_for_jobs_not_running_on_that_agent_are_dropped(broker, zctx):
    """Results for unknown jobs, for another agent's job, and a second result are all dropped."""
    owner = RawAgent(zctx, broker.agent_addr)
    owner.hello("owner", 1, (BAD_ENV,))
    other = RawAgent(zctx, broker.agent_addr)
    other.hello("other", 1, ("elsewhere",))
    client = _registered_client(zctx, broker, BAD_ENV, "elsewhere")
    job_id = str(uuid.uuid4())
    client.new_job(job_id, BAD_ENV)
    backend_job_id = owner.recv_job()["job_id"]
    identity = backend_job_id[0]

    before = len(broker.log_lines("WARNING", "dropped"))
    owner.done((identity, "never-submitted"), ("success", "unknown job"))
    owner.done(FORGED_ID, ("success", "unknown client"))
    other.done(backend_job_id, ("success", "not mine"))
    broker.wait_log("WARNING", "dropped", count=before + 3)

    owner.done(backend_job_id, ("success", "first"))
    owner.done(backend_job_id, ("success", "second"))
    broker.wait_log("WARNING", "dropped", count=before + 4)
    done = client.recv_type("backend_job_done")
    assert (done["job_id"], done["result"]) == (job_id, ("success", "first"))
    _ping_barrier(client)
    # The owner's slot was freed exactly once: it takes exactly one more job at a time.
    second = str(uuid.uuid4())
    client.new_job(second, BAD_ENV)
    assert owner.recv_job()["job_id"][1] == second


@stock_drops_nothing_visibly
def test_duplicate_job_id_from_one_client_runs_once(broker, zctx):
    agent = RawAgent(zctx, broker.agent_addr)
    agent.hello("two-slots", 2, (BAD_ENV,))
    client = _registered_client(zctx, broker, BAD_ENV)
    job_id = str(uuid.uuid4())
    before = len(broker.log_lines("WARNING", "dropped"))
    client.new_job(job_id, BAD_ENV, inputdata={"copy": 1})
    client.new_job(job_id, BAD_ENV, inputdata={"copy": 2})
    line = broker.wait_log("WARNING", "dropped", count=before + 1)[before]
    assert job_id in line
    job = agent.recv_job()
    assert job["inputdata"] == {"copy": 1}
    agent.done(job["job_id"])
    done = client.recv_type("backend_job_done")
    assert done["job_id"] == job_id
    _ping_barrier(client)
    agent.expect_silence(0.2)  # the duplicate was not dispatched to the free slot

    # Another client may use the same job id: it is a different job.
    other = _registered_client(zctx, broker)
    other.new_job(job_id, BAD_ENV)
    again = agent.recv_job()
    assert again["job_id"][1] == job_id and again["job_id"][0] != job["job_id"][0]
    agent.done(again["job_id"])
    assert other.recv_type("backend_job_done")["job_id"] == job_id


def test_a_client_cannot_kill_another_clients_job(broker, zctx):
    agent = RawAgent(zctx, broker.agent_addr)
    agent.hello("victim-host", 1, (BAD_ENV,))
    owner = _registered_client(zctx, broker, BAD_ENV)
    job_id = str(uuid.uuid4())
    owner.new_job(job_id, BAD_ENV)
    backend_job_id = agent.recv_job()["job_id"]
    attacker = _registered_client(zctx, broker)
    attacker.kill(job_id)
    broker.wait_log("WARNING", job_id)
    agent.expect_silence(0.2)  # no backend_kill_job may reach the agent
    agent.done(backend_job_id, ("success", "survived"))
    assert owner.recv_type("backend_job_done")["result"] == ("success", "survived")


# -- floods and slow readers -----------------------------------------------------------------
@stock_drops_nothing_visibly
def test_flood_of_bad_frames_logs_boundedly_and_stays_responsive(broker, zctx):
    observer = _registered_client(zctx, broker)
    flooder = _registered_client(zctx, broker)
    flood_agent = RawAgent(zctx, broker.agent_addr)
    garbage = b"\xc1 flood \xff"
    bad_done = _done()
    worst_rtt = 0.0
    for burst in range(10):
        for _ in range(1000):
            flooder.socket.send(garbage if burst % 2 else pack({"type": "nope", "n": burst}))
        flood_agent.socket.send(bad_done)
        worst_rtt = max(worst_rtt, observer.ping_roundtrip(timeout=5))
    # The broker has read everything once the flooder's own ping is answered.
    flooder.send("ping")
    flooder.recv_type("pong", timeout=20)
    assert worst_rtt < 2.0, worst_rtt
    dropped = broker.log_lines("WARNING", "dropped")
    assert 1 <= len(dropped) <= 100, f"{len(dropped)} 'dropped' lines for 10,010 bad frames"
    assert len(broker.log().splitlines()) <= 150
    assert_serving(zctx, broker.agent_addr, broker.client_addr)


@pytest.mark.stock_bug("its ROUTER drops results for a client at the send high-water mark")
def test_slow_consumer_gets_every_result_exactly_once(broker, zctx):
    """20,000 results wait for a client that does not read for seconds: none may be lost
    (a ROUTER drops frames for a peer at its send high-water mark unless told otherwise).

    Each result carries 4 KiB of stdout, so that the ~80 MiB waiting for the client are far
    more than the loopback socket buffers can hold: the broker must queue them itself."""
    n_jobs = 20_000
    env = "slow-consumer"
    stdout = "o" * 4096
    agent = EchoAgentThread(zctx, broker.agent_addr, 64, (env,), stdout=stdout).start()
    try:
        client = RawClient(zctx, broker.client_addr)  # default high-water marks, like the real client
        client.hello("slow")
        client.wait_containers(env)
        frames = [pack(new_job_message(f"job-{i}", env, inputdata={"n": i})) for i in range(n_jobs)]
        for frame in frames:
            client.socket.send(frame)
        agent.wait_answered(n_jobs, timeout=90)
        time.sleep(1.0)  # the client keeps not reading while the last results are queued

        results: dict[str, int] = {}
        started = 0
        deadline = time.monotonic() + 60
        while len(results) < n_jobs:
            assert time.monotonic() < deadline, f"{len(results)}/{n_jobs} results"
            message = unpack(client.socket.recv()) if client.socket.poll(5000) else None
            assert message is not None, f"results stopped at {len(results)}/{n_jobs}"
            if message["type"] == "backend_job_done":
                n = int(message["job_id"].removeprefix("job-"))
                assert message["result"] == ("success", str(n)) and message["stdout"] == stdout
                results[message["job_id"]] = results.get(message["job_id"], 0) + 1
            elif message["type"] == "backend_job_started":
                started += 1
        assert len(results) == n_jobs and set(results.values()) == {1}
        _ping_barrier(client)
        assert started == n_jobs
    finally:
        agent.stop()


@pytest.mark.stock_bug("no frame size limit: a peer can make it wait for (and buffer) any amount")
@pytest.mark.parametrize("side", ["client", "agent"])
def test_frame_claiming_a_huge_length_is_refused_before_buffering(broker, zctx, side):
    """A ZMTP frame header announcing 1 GiB (over the broker's 256 MiB limit) gets the
    connection closed at once, before anything is buffered; one announcing 1 MiB is waited for."""
    addr = broker.client_addr if side == "client" else broker.agent_addr
    if side == "client":
        # The hand-made ZMTP peer is a real peer: the broker answers it.
        peer = ZmtpPeer(addr)
        peer.send_frame(pack({"type": "ping"}))
        assert unpack(peer.read_frame()[1]) == {"type": "unknown"}
        peer.close()
    honest = ZmtpPeer(addr)
    honest.send_header_claiming(1 << 20)
    assert not honest.closed_by_peer(within=0.5), "a frame under the limit must be waited for"
    honest.close()
    liar = ZmtpPeer(addr)
    liar.send_header_claiming(1 << 30)
    assert liar.closed_by_peer(within=5), "a frame over the limit must be refused"
    liar.close()
    assert_serving(zctx, broker.agent_addr, broker.client_addr)
