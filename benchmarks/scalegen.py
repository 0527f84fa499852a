"""Generator processes of the scale and soak benchmarks (test_bench_scale.py).

Run as ``python scalegen.py {agents,soak-clients} CONFIG_JSON``; like ``loadgen.py``, each
process prints ``{"ready": ...}``, then answers one JSON line per command read on stdin,
and ends when stdin closes (every loop is also bounded in time).  Frames are encoded once
and the per-job part spliced in as bytes (``loadgen.split_template``).

* ``agents`` -- many agents (DEALER sockets) in one process.  They connect and say hello
  on the ``connect`` command, answer pings and record every agent's ping intervals, count
  the jobs each agent ran, and answer each job at once, except the jobs a soak client
  will kill (``kill_every``): those are held until the kill arrives (then answered
  "killed", as the real agent does) or ``hold_s`` passes.  With ``churn_every_s`` the
  process closes ``churn_count`` agents that often (their running jobs must come back as
  crashes) and connects as many new ones (new identities) which say hello.
* ``soak-clients`` -- client sockets that run segments of a long soak: a closed loop of
  ``window`` unfinished jobs per socket, every ``kill_every``-th job killed right after it
  was sent, and every result of every job counted, so that a lost or duplicated result
  shows.

Raises RLIMIT_NOFILE to its hard limit first: each DEALER socket costs two descriptors
(its TCP connection and its mailbox), and libzmq's ``max_sockets`` is raised likewise.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from array import array

import zmq
from loadgen import (
    JOB_ID_KEY,
    JOB_ID_LEN,
    JOB_ID_MARK,
    Control,
    Dialect,
    encode,
    msgpack_span,
    split_template,
)


def raise_nofile() -> int:
    """Raise this process's descriptor limit to its hard limit; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def spread(values: list[float]) -> dict:
    """p50/p99/max (seconds -> ms) of intervals."""
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)
    n = len(ordered)
    return {"n": n, "p50_ms": ordered[n // 2] * 1e3, "p99_ms": ordered[min(n - 1, int(0.99 * n))] * 1e3,
            "max_ms": ordered[-1] * 1e3}


def kill_frame(dialect: Dialect, job_id: bytes) -> bytes:
    if dialect.name == "0.9":
        return encode({"job_id": job_id.decode(), "@type": "ClientKillJob"})
    return encode({"type": "client_kill_job", "job_id": job_id.decode()})


# --------------------------------------------------------------------------------------
# Agents
# --------------------------------------------------------------------------------------

class Agents:
    """Many agents of one process; see the module docstring."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.nofile = raise_nofile()
        self.ctx = zmq.Context()
        self.ctx.max_sockets = cfg["agents"] + cfg.get("churn_count", 0) + 64
        self.dialect = Dialect(cfg.get("dialect", "0.9"))
        self.started = split_template(self.dialect.job_started())
        self.done = split_template(self.dialect.job_done(None, ""))
        killed = self.dialect.job_done(None, "")
        killed["result"] = ("killed", "killed by the soak client")
        self.killed = split_template(killed)
        self.kill_marker = b"KillJob" if self.dialect.name == "0.9" else b"kill_job"
        self.kill_every = cfg.get("kill_every", 0)
        self.hold = cfg.get("hold_s", 5.0)
        self.poller = zmq.Poller()
        self.sockets: list[zmq.Socket | None] = []
        self.index: dict[zmq.Socket, int] = {}
        self.jobs_of: list[int] = []       # jobs run, per agent (index)
        self.last_ping: list[float] = []   # per agent; 0: none yet
        self.gaps = array("d")              # every ping interval of every agent
        self.first_ping: list[float] = []  # when each agent was first pinged (registration)
        self.held: dict[bytes, tuple[float, int]] = {}  # raw job id -> (due, agent)
        self.counts = {"jobs": 0, "pings": 0, "kills": 0, "killed": 0, "kill_unknown": 0,
                       "held_expired": 0, "churned": 0, "lost_held": 0}
        self.connected_at = 0.0
        self.named = 0

    def add_agent(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.cfg["addr"])
        name = f"scale-agent-{self.cfg.get('base', 0)}-{self.named}"
        self.named += 1
        sock.send(self.dialect.agent_hello(name, self.cfg.get("slots", 1), self.cfg["environments"]))
        k = len(self.sockets)
        self.sockets.append(sock)
        self.index[sock] = k
        self.jobs_of.append(0)
        self.last_ping.append(0.0)
        self.first_ping.append(0.0)
        self.poller.register(sock, zmq.POLLIN)

    def drop_agent(self, k: int) -> None:
        """Close agent ``k`` at once (linger 0): the broker sees its connection close."""
        sock = self.sockets[k]
        self.poller.unregister(sock)
        del self.index[sock]
        sock.close(0)
        self.sockets[k] = None
        for raw_id in [r for r, (_, a) in self.held.items() if a == k]:
            del self.held[raw_id]
            self.counts["lost_held"] += 1
        self.counts["churned"] += 1

    def connect(self) -> dict:
        t0 = time.monotonic()
        self.connected_at = t0
        for _ in range(self.cfg["agents"]):
            self.add_agent()
        return {"connected": self.cfg["agents"], "send_s": time.monotonic() - t0, "nofile": self.nofile}

    def stats(self, reset: bool) -> dict:
        live = [k for k, s in enumerate(self.sockets) if s is not None]
        now = time.monotonic()
        out = dict(self.counts)
        out["ping_gaps"] = spread(self.gaps)
        # An agent's open interval counts too: a broker that stopped pinging shows.
        out["max_open_gap_ms"] = max(((now - self.last_ping[k]) * 1e3 for k in live if self.last_ping[k]),
                                     default=None)
        out["never_pinged"] = sum(1 for k in live if not self.last_ping[k])
        pinged = [self.first_ping[k] - self.connected_at for k in live if self.first_ping[k]]
        out["all_pinged_s"] = max(pinged) if pinged and not out["never_pinged"] else None
        out["jobs_per_agent"] = [self.jobs_of[k] for k in live]
        out["held"] = len(self.held)
        out["live"] = len(live)
        if reset:
            self.gaps = array("d")
            for k in live:
                self.jobs_of[k] = 0
            for key in self.counts:
                self.counts[key] = 0
        return out

    def churn(self, count: int) -> None:
        live = [k for k, s in enumerate(self.sockets) if s is not None]
        for k in random.Random(len(self.sockets)).sample(live, min(count, len(live))):
            self.drop_agent(k)
        for _ in range(count):
            self.add_agent()

    def on_frame(self, k: int, sock: zmq.Socket, frame: bytes, now: float) -> None:
        if frame == self.dialect.ping:
            if self.last_ping[k]:
                self.gaps.append(now - self.last_ping[k])
            else:
                self.first_ping[k] = now
            self.last_ping[k] = now
            self.counts["pings"] += 1
            sock.send(self.dialect.pong)
            return
        pos = frame.find(JOB_ID_KEY)
        if pos < 0:
            return
        pos += len(JOB_ID_KEY)
        raw_id = frame[pos:pos + msgpack_span(frame, pos)]
        if frame.find(self.dialect.new_job_marker) >= 0:
            self.counts["jobs"] += 1
            self.jobs_of[k] += 1
            sock.send(self.started[0] + raw_id + self.started[1])
            # The job id's last 31 characters are its sequence number (both dialects).
            if self.kill_every and int(raw_id[-31:]) % self.kill_every == 0:
                self.held[raw_id] = (now + self.hold, k)
            else:
                sock.send(self.done[0] + raw_id + self.done[1])
        elif frame.find(self.kill_marker) >= 0:
            self.counts["kills"] += 1
            if self.held.pop(raw_id, None) is not None:
                self.counts["killed"] += 1
                sock.send(self.killed[0] + raw_id + self.killed[1])
            else:
                self.counts["kill_unknown"] += 1

    def expire(self, now: float) -> None:
        due = [r for r, (t, _) in self.held.items() if t <= now]
        for raw_id in due:
            _, k = self.held.pop(raw_id)
            self.counts["held_expired"] += 1
            self.sockets[k].send(self.done[0] + raw_id + self.done[1])

    def run(self) -> None:
        control = Control()
        self.poller.register(control.fd, zmq.POLLIN)
        control.reply({"ready": 0, "nofile": self.nofile})
        deadline = time.monotonic() + self.cfg.get("max_seconds", 3600)
        churn_every = self.cfg.get("churn_every_s", 0)
        churning = False
        next_churn = next_expire = 0.0
        noblock = zmq.NOBLOCK
        while not control.closed and time.monotonic() < deadline:
            for sock, _ in self.poller.poll(100):
                if sock == control.fd:
                    for line in control.read_lines():
                        op = json.loads(line)
                        if op["op"] == "connect":
                            control.reply(self.connect())
                        elif op["op"] == "stats":
                            control.reply(self.stats(op.get("reset", True)))
                        elif op["op"] == "churn":
                            churning = op["on"]
                            next_churn = time.monotonic() + churn_every
                            control.reply({"churning": churning})
                        else:
                            control.reply({"error": f"unknown op {op['op']}"})
                    continue
                k = self.index.get(sock)
                if k is None:
                    continue
                for _ in range(256):  # bounded drain keeps every agent served
                    try:
                        frame = sock.recv(noblock)
                    except zmq.Again:
                        break
                    self.on_frame(k, sock, frame, time.monotonic())
            now = time.monotonic()
            if self.held and now >= next_expire:
                self.expire(now)
                next_expire = now + 0.05
            if churning and churn_every and now >= next_churn:
                self.churn(self.cfg.get("churn_count", 1))
                next_churn = now + churn_every
        for sock in self.sockets:
            if sock is not None:
                sock.close(0)
        self.ctx.term()


# --------------------------------------------------------------------------------------
# Soak clients
# --------------------------------------------------------------------------------------

def run_soak_clients(cfg: dict) -> None:
    """Client sockets running soak segments on command (``{"op": "segment", ...}``)."""
    raise_nofile()
    ctx = zmq.Context()
    dialect = Dialect(cfg.get("dialect", "0.9"))
    base = cfg.get("client_base", 0)
    socks = []
    poller = zmq.Poller()
    for k in range(cfg["clients"]):
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = 0
        sock.connect(cfg["addr"])
        sock.send(dialect.client_hello(f"soak-client-{base + k}"))
        socks.append(sock)
        poller.register(sock, zmq.POLLIN)
    waiting = set(socks)
    hello_deadline = time.monotonic() + 15
    while waiting and time.monotonic() < hello_deadline:
        for sock, _ in poller.poll(100):
            sock.recv()
            waiting.discard(sock)
    if waiting:
        raise SystemExit(f"{len(waiting)} soak client sockets got no answer to their hello")
    head, tail = split_template(dialect.new_job(cfg["environment"], cfg.get("input_size", 64), 0))
    control = Control()
    control.reply({"ready": len(socks)})
    deadline = time.monotonic() + cfg.get("max_seconds", 3600)
    cpoll = zmq.Poller()
    cpoll.register(control.fd, zmq.POLLIN)
    while not control.closed and time.monotonic() < deadline:
        if not cpoll.poll(1000):
            continue
        for line in control.read_lines():
            op = json.loads(line)
            control.reply(segment(op, socks, poller, dialect, head, tail, base))
    for sock in socks:
        sock.close(0)
    ctx.term()


def segment(op: dict, socks: list, poller: zmq.Poller, dialect: Dialect, head: bytes, tail: bytes,
            base: int) -> dict:
    """``jobs`` jobs numbered from ``first``; ``window`` unfinished per socket; every
    ``kill_every``-th job killed right after it is sent.  Every result is counted against
    its job: ``results[seq]`` must end at exactly 1."""
    n, first, window = op["jobs"], op["first"], op["window"]
    kill_every = op.get("kill_every", 0)
    nsocks = len(socks)
    results = bytearray(n)
    outstanding = [0] * nsocks
    counts = {"done": 0, "killed": 0, "crashed": 0, "duplicates": 0, "strays": 0, "kills_sent": 0}
    sent = finished = 0
    mark, mark_len = JOB_ID_MARK, len(JOB_ID_MARK)
    done_marker = dialect.done_marker
    t0 = time.perf_counter()
    deadline = t0 + op.get("timeout", 600)
    last_progress = t0
    idle = op.get("idle_timeout", 30)
    noblock = zmq.NOBLOCK
    while finished < n:
        now = time.perf_counter()
        if now > deadline or now - last_progress > idle:
            break
        while sent < n and outstanding[sent % nsocks] < window:
            k = sent % nsocks
            seq = first + sent
            job_id = b"%04x-%031d" % (base + k, seq)
            socks[k].send(head + b"\xd9\x24" + job_id + tail)
            if kill_every and seq % kill_every == 0:
                socks[k].send(kill_frame(dialect, job_id))
                counts["kills_sent"] += 1
            outstanding[k] += 1
            sent += 1
        for sock, _ in poller.poll(50):
            for _ in range(2048):
                try:
                    frame = sock.recv(noblock)
                except zmq.Again:
                    break
                pos = frame.find(mark)
                if pos < 0 or frame.find(done_marker) < 0:
                    continue  # job started, environments update
                pos += mark_len
                k = int(frame[pos:pos + 4], 16) - base
                i = int(frame[pos + 5:pos + JOB_ID_LEN]) - first
                if not 0 <= i < n or not 0 <= k < nsocks:
                    counts["strays"] += 1
                    continue
                if results[i]:
                    counts["duplicates"] += 1
                    continue
                results[i] = 1
                finished += 1
                outstanding[k] -= 1
                last_progress = time.perf_counter()
                if b"\xa6killed" in frame:
                    counts["killed"] += 1
                elif b"\xa5crash" in frame:
                    counts["crashed"] += 1
                else:
                    counts["done"] += 1
    elapsed = time.perf_counter() - t0
    counts.update({"jobs": n, "sent": sent, "finished": finished, "lost": sent - finished,
                   "elapsed_s": elapsed, "jobs_per_s": finished / elapsed if elapsed > 0 else 0.0})
    return counts


def main() -> None:
    role, cfg = sys.argv[1], json.loads(sys.argv[2])
    if role == "agents":
        Agents(cfg).run()
    elif role == "soak-clients":
        run_soak_clients(cfg)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
