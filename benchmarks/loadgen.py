"""Load generator processes: INGInious 0.5 clients and agents on raw pyzmq DEALER sockets.

Run as ``python loadgen.py {agents,clients,heartbeat} CONFIG_JSON``.  Each process talks to
the benchmark through its standard streams, one JSON object per line:

* it prints ``{"ready": ...}`` once its peers have said hello;
* it then reads commands on stdin and answers each with one line on stdout;
* end of stdin ends it (every loop here is also bounded in time).

The generator must cost far less than any broker it drives, so nothing is encoded per
message: every frame is msgpack-encoded once at start-up, and the per-job parts are
spliced in as bytes.

* A client's ``client_new_job`` frame has ``job_id`` as its first key; the 36-character
  job id ``"CCCC-SSSS...S"`` (client socket, sequence number) is spliced between the
  pre-encoded head and tail.  The sequence number indexes the send-time table, so a
  result's latency needs no dictionary.
* An agent finds the raw bytes of the ``job_id`` value in ``backend_new_job`` (the
  ``[client_identity, job_id]`` array a real broker sends) and splices them unchanged into
  pre-encoded ``agent_job_started`` and ``agent_job_done`` frames -- the echo the protocol
  asks for, without decoding or re-encoding anything.
* In ``--envelope`` mode (for the ceiling forwarder, see ceiling/forwarder.c) an agent
  receives ``[client identity, frame]`` and echoes the identity frame in front of its
  answers; the job id it echoes is then the client's plain string.

Protocol as the real peers speak it: clients say ``client_hello`` first and wait for an
answer; agents say ``agent_hello`` (slots and environments), answer every ``ping`` with
``pong``, and answer each job with ``agent_job_started`` then ``agent_job_done``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from array import array

import msgpack
import zmq

JOB_ID_KEY = msgpack.packb("job_id")
JOB_ID_LEN = 36
#: A job id in a result frame: the key, then a str8 header for 36 bytes.
JOB_ID_MARK = JOB_ID_KEY + b"\xd9\x24"
BLOCKED_ENVIRONMENT = "bench-env-nobody-offers"


def encode(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


PING = encode({"type": "ping"})
PONG = encode({"type": "pong"})
UNKNOWN = encode({"type": "unknown"})


def split_template(message: dict, key: str = "job_id") -> tuple[bytes, bytes]:
    """Encode ``message`` (whose first key is ``key``) around a placeholder value.

    Returns ``(head, tail)`` so that ``head + raw_value + tail`` is the message with
    ``raw_value`` (already msgpack-encoded) as the value of ``key``.
    """
    assert next(iter(message)) == key
    marker = b"\xc0"  # nil: one byte, and the first value after the first key
    frame = encode({**message, key: None})
    cut = 1 + len(msgpack.packb(key)) if len(message) < 16 else 3 + len(msgpack.packb(key))
    assert frame[cut:cut + 1] == marker
    return frame[:cut], frame[cut + 1:]


def msgpack_span(buf: bytes, pos: int) -> int:
    """Length in bytes of the msgpack object starting at ``buf[pos]``.

    Covers what a job id can be (a str, or the array of bin and str a broker makes);
    anything else is measured by a real unpacker.
    """
    b = buf[pos]
    if 0xA0 <= b <= 0xBF:  # fixstr
        return 1 + (b & 0x1F)
    if b in (0xD9, 0xC4):  # str8, bin8
        return 2 + buf[pos + 1]
    if 0x90 <= b <= 0x9F:  # fixarray
        end = pos + 1
        for _ in range(b & 0x0F):
            end += msgpack_span(buf, end)
        return end - pos
    unpacker = msgpack.Unpacker(raw=True)
    unpacker.feed(buf[pos:pos + 4096])
    unpacker.skip()
    return unpacker.tell()


def percentiles(values: list[float] | array) -> dict:
    """p50/p99/max (seconds -> milliseconds) of ``values``; empty gives ``None``s."""
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] * 1000.0

    return {"n": n, "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": ordered[-1] * 1000.0}


class Control:
    """Line-oriented commands on stdin, answers on stdout, pollable with zmq.Poller."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        self.buffer = b""
        self.closed = False

    def read_lines(self) -> list[str]:
        data = os.read(self.fd, 65536)
        if not data:
            self.closed = True
            return []
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode() for line in lines if line.strip()]

    @staticmethod
    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def dealer(ctx: zmq.Context, addr: str, sndhwm: int | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if sndhwm is not None:
        sock.sndhwm = sndhwm
    sock.connect(addr)
    return sock


# --------------------------------------------------------------------------------------
# Agents
# --------------------------------------------------------------------------------------

def run_agents(cfg: dict) -> None:
    """Agents that run every job in zero time.

    cfg: addr, agents, slots, environments (list), envelope (bool), archive_size,
    stdout_size, max_seconds.
    """
    ctx = zmq.Context()
    envelope = bool(cfg.get("envelope"))
    environments = cfg["environments"]
    archive = os.urandom(cfg["archive_size"]) if cfg.get("archive_size") else None
    stdout_text = "o" * cfg.get("stdout_size", 0)

    started_head, started_tail = split_template({"job_id": None, "type": "agent_job_started"})
    done_head, done_tail = split_template({
        "job_id": None, "type": "agent_job_done", "result": ("success", "zero-time job"),
        "grade": 100.0, "problems": {}, "tests": {}, "custom": {}, "archive": archive,
        "stdout": stdout_text, "stderr": "",
    })
    sockets = []
    for k in range(cfg["agents"]):
        sock = dealer(ctx, cfg["addr"])
        sock.send(encode({
            "friendly_name": f"bench-agent-{k}",
            "available_job_slots": cfg["slots"],
            "available_containers": {env: {"id": f"sha256:{env}", "created": 1} for env in environments},
            "type": "agent_hello",
        }))
        sockets.append(sock)

    now = time.monotonic()
    last_ping = [now] * len(sockets)
    max_gap = [0.0] * len(sockets)
    pings = 0
    jobs = 0
    other = 0
    control = Control()
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    poller.register(control.fd, zmq.POLLIN)
    index = {sock: k for k, sock in enumerate(sockets)}
    control.reply({"ready": len(sockets)})
    deadline = time.monotonic() + cfg.get("max_seconds", 900)
    noblock = zmq.NOBLOCK
    again = zmq.Again

    while not control.closed and time.monotonic() < deadline:
        for sock, _ in poller.poll(1000):
            if sock == control.fd:
                for line in control.read_lines():
                    if line == "stats":
                        now = time.monotonic()
                        gaps = [max(g, now - t) for g, t in zip(max_gap, last_ping, strict=True)]
                        control.reply({"jobs": jobs, "pings": pings, "other": other,
                                       "max_ping_gap_s": max(gaps) if gaps else 0.0,
                                       "agents_silent_6s": sum(g > 6.0 for g in gaps)})
                        jobs = pings = other = 0
                        max_gap = [0.0] * len(sockets)
                continue
            k = index[sock]
            for _ in range(1024):  # bounded drain keeps every socket served
                try:
                    if envelope:
                        route = sock.recv(noblock)
                        frame = sock.recv()
                    else:
                        frame = sock.recv(noblock)
                except again:
                    break
                if frame == PING:
                    now = time.monotonic()
                    gap = now - last_ping[k]
                    if gap > max_gap[k]:
                        max_gap[k] = gap
                    last_ping[k] = now
                    pings += 1
                    sock.send(PONG)
                    continue
                pos = frame.find(JOB_ID_KEY)
                if pos < 0 or frame.find(b"new_job") < 0:
                    other += 1
                    continue
                pos += len(JOB_ID_KEY)
                raw_id = frame[pos:pos + msgpack_span(frame, pos)]
                jobs += 1
                if envelope:
                    sock.send(route, zmq.SNDMORE)
                    sock.send(started_head + raw_id + started_tail)
                    sock.send(route, zmq.SNDMORE)
                    sock.send(done_head + raw_id + done_tail)
                else:
                    sock.send(started_head + raw_id + started_tail)
                    sock.send(done_head + raw_id + done_tail)
    for sock in sockets:
        sock.close(0)
    ctx.term()


# --------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------

class Clients:
    """Client sockets of one process, and the operations the benchmarks ask of them."""

    def __init__(self, cfg: dict) -> None:
        self.ctx = zmq.Context()
        self.cfg = cfg
        # Unlimited send queue: a flood of queued jobs must wait in this process, not fail.
        # The receive side keeps libzmq's default (1000), like the real client.
        self.sockets = [dealer(self.ctx, cfg["addr"], sndhwm=0) for _ in range(cfg["clients"])]
        self.poller = zmq.Poller()
        for sock in self.sockets:
            self.poller.register(sock, zmq.POLLIN)
        self.templates: dict[tuple[str, int], tuple[bytes, bytes]] = {}

    def hello(self, timeout: float = 15.0) -> None:
        for k, sock in enumerate(self.sockets):
            sock.send(encode({"name": f"bench-client-{k}", "type": "client_hello"}))
        waiting = set(self.sockets)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for sock, _ in self.poller.poll(100):
                sock.recv()  # backend_update_containers (the ceiling echoes the hello)
                waiting.discard(sock)
        if waiting:
            raise SystemExit(f"{len(waiting)} client sockets got no answer to client_hello")

    def template(self, environment: str, input_size: int) -> tuple[bytes, bytes]:
        key = (environment, input_size)
        if key not in self.templates:
            self.templates[key] = split_template({
                "job_id": None, "type": "client_new_job", "course_id": "bench", "task_id": "zero",
                "inputdata": {"answer": "i" * input_size}, "environment": environment,
                "enable_network": False, "time_limit": 30, "hard_time_limit": 90, "mem_limit": 256,
                "debug": False, "launcher": "bench",
            })
        return self.templates[key]

    @staticmethod
    def job_id(k: int, seq: int) -> bytes:
        return b"\xd9\x24%04x-%031d" % (k, seq)

    # -- one operation --------------------------------------------------------------

    def run_jobs(self, op: dict) -> dict:
        """Submit jobs and collect their results.

        op: jobs, environments, input_size, timeout, and either ``window`` (closed loop:
        at most this many unfinished jobs per socket) or ``rate`` (open loop, jobs/s:
        latency counts from the scheduled send time, so a generator that falls behind
        cannot hide the broker's queueing), or ``pause`` (slow consumer: send all,
        read nothing for this many seconds, then read).
        """
        n = op["jobs"]
        envs = op["environments"]
        heads = [self.template(env, op.get("input_size", 0)) for env in envs]
        socks = self.sockets
        nsocks = len(socks)
        window = op.get("window")
        rate = op.get("rate")
        pause = op.get("pause")
        timeout = op.get("timeout", 60.0)
        sent_at = array("d", bytes(8 * n))
        latencies = array("d")
        outstanding = [0] * nsocks
        done = started = crashed = restarted = unknown = pongs = received_bytes = 0
        sent = 0
        noblock = zmq.NOBLOCK
        perf = time.perf_counter
        mark = JOB_ID_MARK
        mark_len = len(mark)

        def send_one(seq: int, when: float) -> None:
            k = seq % nsocks
            head, tail = heads[seq % len(heads)]
            socks[k].send(head + b"\xd9\x24%04x-%031d" % (k, seq) + tail)
            sent_at[seq] = when
            outstanding[k] += 1

        t0 = perf()
        if pause is not None:
            for seq in range(n):
                send_one(seq, perf())
            sent = n
            time.sleep(pause)
        deadline = t0 + timeout
        send_until = t0 + op.get("duration", timeout)
        last_progress = t_last = perf()
        idle_limit = op.get("idle_timeout", timeout)
        while True:
            now = perf()
            sending = sent < n and now < send_until
            if not sending and done + crashed >= sent:
                break
            if now > deadline or now - last_progress > idle_limit:
                break
            if not sending:
                wait_ms = 50
            elif rate is not None:
                due = min(n, int((now - t0) * rate) + 1)
                while sent < due:
                    send_one(sent, t0 + sent / rate)
                    sent += 1
                wait_ms = 0 if sent < n and (t0 + sent / rate) <= perf() else 1
            elif window is not None:
                # Job ``seq`` belongs to socket ``seq % nsocks``; each keeps ``window`` unfinished.
                while sent < n and outstanding[sent % nsocks] < window:
                    send_one(sent, perf())
                    sent += 1
                wait_ms = 50
            else:
                wait_ms = 50
            for sock, _ in self.poller.poll(wait_ms):
                for _ in range(2048):
                    try:
                        frame = sock.recv(noblock)
                    except zmq.Again:
                        break
                    pos = frame.find(mark)
                    if pos >= 0 and frame.find(b"job_done") >= 0:
                        pos += mark_len
                        k = int(frame[pos:pos + 4], 16)
                        seq = int(frame[pos + 5:pos + JOB_ID_LEN])
                        if len(frame) < 2048 and b"\xa5crash" in frame:
                            crashed += 1
                            if b"Agent restarted" in frame:
                                restarted += 1
                        else:
                            done += 1
                            latencies.append(perf() - sent_at[seq])
                        received_bytes += len(frame)
                        outstanding[k] -= 1
                        last_progress = t_last = perf()
                    elif pos >= 0:
                        started += 1
                    elif frame == PONG:
                        pongs += 1
                    elif frame == UNKNOWN:
                        unknown += 1
        # Rates count to the last result, not to the end of the wait for stragglers.
        elapsed = (t_last if done else perf()) - t0
        lat = percentiles(latencies)
        return {
            "sent": sent, "done": done, "started": started, "crashed": crashed,
            "agent_restarted": restarted, "unknown": unknown, "unfinished": sent - done - crashed,
            "elapsed_s": elapsed, "jobs_per_s": done / elapsed if elapsed > 0 else 0.0,
            "received_bytes": received_bytes, "latency": lat,
        }

    def flood(self, op: dict) -> dict:
        """Queue ``jobs`` jobs for an environment no agent offers, then wait until the broker
        has read them all (a ping sent after them is answered after them)."""
        n = op["jobs"]
        head, tail = self.template(op.get("environment", BLOCKED_ENVIRONMENT), op.get("input_size", 0))
        sock = self.sockets[0]
        t0 = time.perf_counter()
        for seq in range(n):
            sock.send(head + b"\xd9\x24%04x-%031d" % (0xFFFF, seq) + tail)
        sent_s = time.perf_counter() - t0
        sock.send(PING)
        deadline = time.monotonic() + op.get("timeout", 600)
        ponged = False
        while not ponged and time.monotonic() < deadline:
            if sock.poll(200):
                for _ in range(1024):
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if frame == PONG:
                        ponged = True
        return {"queued": n, "send_s": sent_s, "ingest_s": time.perf_counter() - t0, "ponged": ponged}


def run_clients(cfg: dict) -> None:
    clients = Clients(cfg)
    clients.hello()
    control = Control()
    control.reply({"ready": len(clients.sockets)})
    deadline = time.monotonic() + cfg.get("max_seconds", 900)
    # A Poller, not zmq.select: a closed pipe reports POLLHUP, which select's read list omits.
    poller = zmq.Poller()
    poller.register(control.fd, zmq.POLLIN)
    while not control.closed and time.monotonic() < deadline:
        if not poller.poll(1000):
            continue
        for line in control.read_lines():
            op = json.loads(line)
            if op["op"] == "jobs":
                control.reply(clients.run_jobs(op))
            elif op["op"] == "flood":
                control.reply(clients.flood(op))
            else:
                control.reply({"error": f"unknown op {op['op']}"})
    for sock in clients.sockets:
        sock.close(0)
    clients.ctx.term()


# --------------------------------------------------------------------------------------
# Heartbeat
# --------------------------------------------------------------------------------------

def run_heartbeat(cfg: dict) -> None:
    """One client that pings every ``interval`` seconds and times each pong.

    One ping is in flight at a time (pongs carry no id); a ping still unanswered when the
    statistics are asked for counts with its age so far, so a stalled broker shows.
    """
    ctx = zmq.Context()
    sock = dealer(ctx, cfg["addr"])
    sock.send(encode({"name": "bench-heartbeat", "type": "client_hello"}))
    if not sock.poll(15000):
        raise SystemExit("heartbeat client got no answer to client_hello")
    sock.recv()
    control = Control()
    control.reply({"ready": 1})
    interval = cfg.get("interval", 0.1)
    rtts: list[float] = []
    in_flight: float | None = None
    next_ping = time.perf_counter()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(control.fd, zmq.POLLIN)
    deadline = time.monotonic() + cfg.get("max_seconds", 900)
    while not control.closed and time.monotonic() < deadline:
        now = time.perf_counter()
        if in_flight is None and now >= next_ping:
            sock.send(PING)
            in_flight = now
            next_ping = now + interval
        timeout_ms = max(0.0, (next_ping - time.perf_counter()) * 1000) if in_flight is None else 200
        for item, _ in poller.poll(timeout_ms):
            if item == control.fd:
                for line in control.read_lines():
                    if line == "stats":
                        pending = [time.perf_counter() - in_flight] if in_flight is not None else []
                        stats = percentiles(rtts + pending)
                        stats["unanswered"] = len(pending)
                        control.reply(stats)
                        rtts = []
                continue
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if frame == PONG and in_flight is not None:
                    rtts.append(time.perf_counter() - in_flight)
                    in_flight = None
    sock.close(0)
    ctx.term()


def main() -> None:
    role, cfg = sys.argv[1], json.loads(sys.argv[2])
    {"agents": run_agents, "clients": run_clients, "heartbeat": run_heartbeat}[role](cfg)


if __name__ == "__main__":
    main()
