"""Load generator processes: INGInious clients and agents on raw pyzmq DEALER sockets.

Two dialects (``"dialect"`` in each process's configuration): ``0.5`` (INGInious 0.5:
``{"type": "client_new_job", ...}``) and ``0.9`` (INGInious 0.7 to 0.9.2: the dataclass
fields of ``inginious.common.messages`` in declaration order, then ``"@type": ClassName``,
which is what ``msgpack.dumps(asdict(msg) + "@type")`` writes).  See :class:`Dialect`.

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

Protocol as the real peers speak it: clients say hello first and wait for an answer;
agents say hello (slots and environments), answer every ping with a pong, and answer each
job with "job started" then "job done" -- at once (zero-time jobs), or ``hold_ms`` later
(the priority scenario, where every slot must stay busy).

In 0.9 job ids are global across clients: a client process's ids are ``CCCC-SSSS...S``
with the socket number ``CCCC`` offset by ``client_base``, and ``ffff`` for floods.
"""

from __future__ import annotations

import heapq
import json
import os
import random
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
#: 0.9 environments are (type, name) pairs; every benchmark environment is of this type.
ENVIRONMENT_TYPE = "docker"
FLOOD_CLIENT = 0xFFFF


def encode(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


class Dialect:
    """The frames of one INGInious dialect, built once; markers that tell frames apart.

    ``new_job_marker`` is found in a broker's job for an agent, ``done_marker`` in a
    result for a client (and in no "job started" frame): the generator classifies frames
    by a ``bytes.find`` instead of a decode.
    """

    def __init__(self, name: str) -> None:
        if name not in ("0.5", "0.9"):
            raise SystemExit(f"unknown dialect {name!r}")
        self.name = name
        v09 = name == "0.9"
        self.ping = encode({"@type": "Ping"} if v09 else {"type": "ping"})
        self.pong = encode({"@type": "Pong"} if v09 else {"type": "pong"})
        self.unknown = encode({"@type": "Unknown"} if v09 else {"type": "unknown"})
        # Short enough to match what the ceiling forwards unchanged (the client's job, the
        # agent's result) as well as what a broker sends (BackendNewJob, BackendJobDone).
        self.new_job_marker = b"NewJob" if v09 else b"new_job"
        self.done_marker = b"JobDone" if v09 else b"job_done"

    def client_hello(self, name: str) -> bytes:
        if self.name == "0.9":
            return encode({"name": name, "@type": "ClientHello"})
        return encode({"name": name, "type": "client_hello"})

    def agent_hello(self, name: str, slots: int, environments: list[str]) -> bytes:
        described = {env: {"id": f"sha256:{env}", "created": 1} for env in environments}
        if self.name == "0.9":
            return encode({"friendly_name": name, "available_job_slots": slots,
                           "available_environments": {ENVIRONMENT_TYPE: described},
                           "@type": "AgentHello"})
        return encode({"friendly_name": name, "available_job_slots": slots,
                       "available_containers": described, "type": "agent_hello"})

    def new_job(self, environment: str, input_size: int, priority: int) -> dict:
        """A client's job with ``job_id`` first (None: the per-job part spliced in).

        The two dialects carry the same information in frames of about the same size:
        0.5's time/memory limits and network flag are 0.9's ``environment_parameters``.
        """
        inputdata = {"answer": "i" * input_size}
        if self.name == "0.9":
            return {"job_id": None, "priority": priority, "course_id": "bench", "task_id": "zero",
                    "task_problems": {}, "inputdata": inputdata,
                    "environment_type": ENVIRONMENT_TYPE, "environment": environment,
                    "environment_parameters": {"limits": {"time": 30, "hard_time": 90, "memory": 256},
                                               "network_grading": False},
                    "debug": False, "launcher": "bench", "@type": "ClientNewJob"}
        return {"job_id": None, "type": "client_new_job", "course_id": "bench", "task_id": "zero",
                "inputdata": inputdata, "environment": environment,
                "enable_network": False, "time_limit": 30, "hard_time_limit": 90, "mem_limit": 256,
                "debug": False, "launcher": "bench"}

    def job_started(self) -> dict:
        if self.name == "0.9":
            return {"job_id": None, "@type": "AgentJobStarted"}
        return {"job_id": None, "type": "agent_job_started"}

    def job_done(self, archive: bytes | None, stdout_text: str) -> dict:
        if self.name == "0.9":
            return {"job_id": None, "result": ("success", "zero-time job"), "grade": 100.0,
                    "problems": {}, "tests": {}, "custom": {}, "state": "", "archive": archive,
                    "stdout": stdout_text, "stderr": "", "@type": "AgentJobDone"}
        return {"job_id": None, "type": "agent_job_done", "result": ("success", "zero-time job"),
                "grade": 100.0, "problems": {}, "tests": {}, "custom": {}, "archive": archive,
                "stdout": stdout_text, "stderr": ""}


def frame_sizes(input_size: int = 1024) -> dict:
    """Sizes of each dialect's per-job frames (the README compares them)."""
    out = {}
    for name in ("0.5", "0.9"):
        d = Dialect(name)
        head, tail = split_template(d.new_job("bench-env-a", input_size, 0))
        done_head, done_tail = split_template(d.job_done(None, ""))
        out[name] = {"client_new_job": len(head) + 38 + len(tail),
                     "agent_job_done": len(done_head) + 38 + len(done_tail)}
    return out


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
    """Agents that run every job in zero time, or in ``hold_ms`` milliseconds on average.

    cfg: addr, dialect, agents, slots, environments (list), envelope (bool), archive_size,
    stdout_size, hold_ms, max_seconds.  With ``hold_ms`` a job's "started" goes out at
    once and its "done" after a time drawn uniformly from 0 to twice ``hold_ms`` (seeded,
    so every run draws the same sequence).  A fixed hold would keep the slots in lockstep
    -- all filled at once when the backlog arrives, all freed together ``hold_ms`` later --
    and a job waiting for a slot would wait for the next burst, whatever the broker does;
    drawn times spread the slots' ends within a few rounds.
    """
    ctx = zmq.Context()
    dialect = Dialect(cfg.get("dialect", "0.5"))
    envelope = bool(cfg.get("envelope"))
    environments = cfg["environments"]
    archive = os.urandom(cfg["archive_size"]) if cfg.get("archive_size") else None
    stdout_text = "o" * cfg.get("stdout_size", 0)
    hold = cfg.get("hold_ms", 0) / 1000.0
    draw = random.Random(1234).uniform
    held: list = []  # heap of (due, sequence, socket, route or None, raw job id)

    started_head, started_tail = split_template(dialect.job_started())
    done_head, done_tail = split_template(dialect.job_done(archive, stdout_text))
    sockets = []
    for k in range(cfg["agents"]):
        sock = dealer(ctx, cfg["addr"])
        sock.send(dialect.agent_hello(f"bench-agent-{k}", cfg["slots"], environments))
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
    ping, pong, new_job_marker = dialect.ping, dialect.pong, dialect.new_job_marker

    def send_done(sock: zmq.Socket, route: bytes | None, raw_id: bytes) -> None:
        if route is not None:
            sock.send(route, zmq.SNDMORE)
        sock.send(done_head + raw_id + done_tail)

    while not control.closed and time.monotonic() < deadline:
        timeout = 1000
        if held:
            timeout = max(0, min(1000, int((held[0][0] - time.monotonic()) * 1000) + 1))
        for sock, _ in poller.poll(timeout):
            if sock == control.fd:
                for line in control.read_lines():
                    if line == "stats":
                        now = time.monotonic()
                        gaps = [max(g, now - t) for g, t in zip(max_gap, last_ping, strict=True)]
                        control.reply({"jobs": jobs, "pings": pings, "other": other,
                                       "held": len(held),
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
                        route = None
                        frame = sock.recv(noblock)
                except again:
                    break
                if frame == ping:
                    now = time.monotonic()
                    gap = now - last_ping[k]
                    if gap > max_gap[k]:
                        max_gap[k] = gap
                    last_ping[k] = now
                    pings += 1
                    sock.send(pong)
                    continue
                pos = frame.find(JOB_ID_KEY)
                if pos < 0 or frame.find(new_job_marker) < 0:
                    other += 1
                    continue
                pos += len(JOB_ID_KEY)
                raw_id = frame[pos:pos + msgpack_span(frame, pos)]
                jobs += 1
                if route is not None:
                    sock.send(route, zmq.SNDMORE)
                sock.send(started_head + raw_id + started_tail)
                if hold:
                    due = time.monotonic() + draw(0.0, 2.0 * hold)
                    heapq.heappush(held, (due, jobs, sock, route, raw_id))
                else:
                    send_done(sock, route, raw_id)
        if held:
            now = time.monotonic()
            for _ in range(len(held)):  # bounded: at most what is held now
                if held[0][0] > now:
                    break
                _, _, sock, route, raw_id = heapq.heappop(held)
                send_done(sock, route, raw_id)
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
        self.dialect = Dialect(cfg.get("dialect", "0.5"))
        # Socket numbers in job ids start here: 0.9's ids are global across clients.
        self.base = cfg.get("client_base", 0)
        # Unlimited send queue: a flood of queued jobs must wait in this process, not fail.
        # The receive side keeps libzmq's default (1000), like the real client.
        self.sockets = [dealer(self.ctx, cfg["addr"], sndhwm=0) for _ in range(cfg["clients"])]
        self.poller = zmq.Poller()
        for sock in self.sockets:
            self.poller.register(sock, zmq.POLLIN)
        self.templates: dict[tuple[str, int, int], tuple[bytes, bytes]] = {}

    def hello(self, timeout: float = 15.0) -> None:
        for k, sock in enumerate(self.sockets):
            sock.send(self.dialect.client_hello(f"bench-client-{self.base + k}"))
        waiting = set(self.sockets)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for sock, _ in self.poller.poll(100):
                sock.recv()  # the environments update (the ceiling echoes the hello)
                waiting.discard(sock)
        if waiting:
            raise SystemExit(f"{len(waiting)} client sockets got no answer to their hello")

    def template(self, environment: str, input_size: int, priority: int = 0) -> tuple[bytes, bytes]:
        key = (environment, input_size, priority)
        if key not in self.templates:
            self.templates[key] = split_template(self.dialect.new_job(environment, input_size, priority))
        return self.templates[key]

    # -- one operation --------------------------------------------------------------

    def run_jobs(self, op: dict) -> dict:
        """Submit jobs and collect their results.

        op: jobs, environments, input_size, priority, timeout, and either ``window`` (closed
        loop: at most this many unfinished jobs per socket) or ``rate`` (open loop, jobs/s:
        latency counts from the scheduled send time, so a generator that falls behind
        cannot hide the broker's queueing), or ``pause`` (slow consumer: send all,
        read nothing for this many seconds, then read).  ``start_times``: also time each
        job from when it was due to its "job started" (the broker dispatched it and the
        agent said so: the priority scenario's figure).
        """
        n = op["jobs"]
        envs = op["environments"]
        heads = [self.template(env, op.get("input_size", 0), op.get("priority", 0)) for env in envs]
        socks = self.sockets
        nsocks = len(socks)
        base = self.base
        window = op.get("window")
        rate = op.get("rate")
        pause = op.get("pause")
        timeout = op.get("timeout", 60.0)
        sent_at = array("d", bytes(8 * n))
        latencies = array("d")
        start_times = array("d") if op.get("start_times") else None
        outstanding = [0] * nsocks
        done = started = crashed = restarted = unknown = pongs = received_bytes = 0
        sent = 0
        noblock = zmq.NOBLOCK
        perf = time.perf_counter
        mark = JOB_ID_MARK
        mark_len = len(mark)
        done_marker, pong, unknown_frame = self.dialect.done_marker, self.dialect.pong, self.dialect.unknown

        def send_one(seq: int, when: float) -> None:
            k = seq % nsocks
            head, tail = heads[seq % len(heads)]
            socks[k].send(head + b"\xd9\x24%04x-%031d" % (base + k, seq) + tail)
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
                    if pos >= 0 and frame.find(done_marker) >= 0:
                        pos += mark_len
                        k = int(frame[pos:pos + 4], 16) - base
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
                        if start_times is not None:
                            pos += mark_len
                            start_times.append(perf() - sent_at[int(frame[pos + 5:pos + JOB_ID_LEN])])
                    elif frame == pong:
                        pongs += 1
                    elif frame == unknown_frame:
                        unknown += 1
        # Rates count to the last result, not to the end of the wait for stragglers.
        elapsed = (t_last if done else perf()) - t0
        out = {
            "sent": sent, "done": done, "started": started, "crashed": crashed,
            "agent_restarted": restarted, "unknown": unknown, "unfinished": sent - done - crashed,
            "elapsed_s": elapsed, "jobs_per_s": done / elapsed if elapsed > 0 else 0.0,
            "received_bytes": received_bytes, "latency": percentiles(latencies),
        }
        if start_times is not None:
            out["start_time"] = percentiles(start_times)
        return out

    def flood(self, op: dict) -> dict:
        """Queue ``jobs`` jobs (round robin over ``environments``; by default one no agent
        offers) with ``priority``, then wait until the broker has read them all (a ping
        sent after them is answered after them).

        Results that come back meanwhile (the priority scenario floods runnable jobs) are
        counted and thrown away.
        """
        n = op["jobs"]
        envs = op.get("environments") or [op.get("environment", BLOCKED_ENVIRONMENT)]
        heads = [self.template(env, op.get("input_size", 0), op.get("priority", 0)) for env in envs]
        sock = self.sockets[0]
        job_id = b"\xd9\x24%04x-%031d"  # a 36-character str, as encoded
        # What each job's frame weighs, for the memory scenario's "above the frame" figure.
        frame_bytes = sum(len(head) + len(job_id % (0, 0)) + len(tail) for head, tail in heads) / len(heads)
        t0 = time.perf_counter()
        for seq in range(n):
            head, tail = heads[seq % len(heads)]
            sock.send(head + job_id % (FLOOD_CLIENT, seq) + tail)
        sent_s = time.perf_counter() - t0
        sock.send(self.dialect.ping)
        deadline = time.monotonic() + op.get("timeout", 600)
        ponged = False
        results = 0
        pong, done_marker = self.dialect.pong, self.dialect.done_marker
        while not ponged and time.monotonic() < deadline:
            if sock.poll(200):
                for _ in range(1024):
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if frame == pong:
                        ponged = True
                    elif frame.find(done_marker) >= 0:
                        results += 1
        return {"queued": n, "send_s": sent_s, "ingest_s": time.perf_counter() - t0, "ponged": ponged,
                "results": results, "frame_bytes": frame_bytes}

    def drain(self, op: dict) -> dict:
        """Read (and count) results on every socket for ``seconds`` seconds, then answer."""
        done_marker = self.dialect.done_marker
        results = 0
        deadline = time.perf_counter() + op["seconds"]
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            for sock, _ in self.poller.poll(min(100, max(1, int(left * 1000)))):
                for _ in range(2048):
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if frame.find(done_marker) >= 0:
                        results += 1
        return {"results": results}


def run_clients(cfg: dict) -> None:
    clients = Clients(cfg)
    clients.hello()
    control = Control()
    control.reply({"ready": len(clients.sockets)})
    deadline = time.monotonic() + cfg.get("max_seconds", 900)
    # A Poller, not zmq.select: a closed pipe reports POLLHUP, which select's read list omits.
    poller = zmq.Poller()
    poller.register(control.fd, zmq.POLLIN)
    operations = {"jobs": clients.run_jobs, "flood": clients.flood, "drain": clients.drain}
    while not control.closed and time.monotonic() < deadline:
        if not poller.poll(1000):
            continue
        for line in control.read_lines():
            op = json.loads(line)
            if op["op"] in operations:
                control.reply(operations[op["op"]](op))
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
    dialect = Dialect(cfg.get("dialect", "0.5"))
    ping, pong = dialect.ping, dialect.pong
    sock = dealer(ctx, cfg["addr"])
    sock.send(dialect.client_hello("bench-heartbeat"))
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
            sock.send(ping)
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
                if frame == pong and in_flight is not None:
                    rtts.append(time.perf_counter() - in_flight)
                    in_flight = None
    sock.close(0)
    ctx.term()


def main() -> None:
    role, cfg = sys.argv[1], json.loads(sys.argv[2])
    {"agents": run_agents, "clients": run_clients, "heartbeat": run_heartbeat}[role](cfg)


if __name__ == "__main__":
    main()
