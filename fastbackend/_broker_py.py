"""The broker's hot path in pure Python: the readable truth of ``_broker_c``.

``BrokerCore`` owns the per-job state and handles the messages that arrive once or
more per job: new jobs and pings from clients, job started / done / ssh debug and
pongs from agents, in either dialect.  It also drains the two ROUTER sockets.  The
rare messages (hellos, queue snapshots, kills) and the heartbeat are handled by
``broker.BrokerLogic``, mixed into either core, through the hooks ``client_hello``,
``client_get_queue``, ``kill_job``, ``duplicate_job``, ``agent_hello``, ``dropped``,
``wrong_dialect``, ``job_event``, ``internal_error`` and ``unreachable``.

Dialects: each frame is scanned with the tables of its peer's dialect (the one it said
hello in; for a peer not yet known, the broker's default).  A frame that turns out to
carry the other dialect's type key is scanned again with those tables, unless the
broker is pinned to one dialect, in which case it is dropped with a log line.  A peer
is registered in one dialect at a time: a frame in another dialect is treated as coming
from an unregistered peer.

State, by index:

* jobs are indexed by the scheduler's job index; ``job_key[j]`` is the job's key (see
  ``wire.job_key``: for 0.5 the client identity and its job id, which is also what an
  agent echoes back; for 0.9 the global job id; the first byte tells them apart),
  ``job_client[j]`` the identity of the client that submitted it, ``job_frame[j]`` the
  client's new-job frame, kept whole so that the agent's frame is spliced from it at
  dispatch time and the queue snapshot can read its fields; ``job_started[j]`` the
  dispatch time;
* agents are indexed by the scheduler's agent index; ``agent_ident[a]`` is the agent's
  ROUTER identity, ``agent_dialect[a]`` its dialect and ``agent_missed[a]`` the pings it
  has not answered.

Jobs never cross dialects: the scheduler's environment keys are names in 0.5 and
(type, name) pairs in 0.9, so a job can only match an agent of its own dialect.

A job is forgotten (key and frame dropped) the moment its result is sent, so any
later message about it is dropped: the real clients die on a message for a job they
already have the result of.
"""

from __future__ import annotations

import bisect
import time

import zmq

from . import sched, wire
from .protocol import (
    AGENT_HELLO,
    AGENT_JOB_DONE,
    AGENT_JOB_SSH_DEBUG,
    AGENT_JOB_STARTED,
    CLIENT_GET_QUEUE,
    CLIENT_HELLO,
    CLIENT_KILL_JOB,
    CLIENT_NEW_JOB,
    DIALECTS,
    FIRST_GUESS,
    PING,
    PONG,
    WireError,
    WrongDialect,
)

JOB_RUNNING = sched.JOB_RUNNING


#: Upper bounds (seconds) of the buckets of the wait and run time histograms (the
#: metrics' ``fastbackend_job_wait_seconds`` / ``fastbackend_job_run_seconds``); one more
#: bucket counts everything above the last bound.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class TimeHistogram:
    """Counts of durations per bucket of ``TIME_BUCKETS`` (not cumulative) and their sum."""

    def __init__(self) -> None:
        self.counts = [0] * (len(TIME_BUCKETS) + 1)
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(TIME_BUCKETS, seconds)] += 1
        self.total += seconds


#: Bytes of payload that count as one more message against a drain's budget: a batch
#: of big results (1 MiB archives are spliced, so copied) must not hold the loop for
#: as long as 256 of them would take.
BYTES_PER_MESSAGE = 64 * 1024

class BrokerCore:
    """Per-job routing between clients and agents; see the module docstring.

    ``dialect`` pins one dialect (a ``protocol`` tag); None serves each peer in its own.
    """

    IMPL = "py"

    def __init__(self, agent_socket: zmq.Socket, client_socket: zmq.Socket,
                 dialect: int | None = None) -> None:
        self.agent_socket = agent_socket
        self.client_socket = client_socket
        self.pinned = dialect
        self.first_guess = FIRST_GUESS if dialect is None else dialect
        self.sched = sched.Scheduler()
        self.clients: dict[bytes, int] = {}  # identity -> the dialect it said hello in
        self.agents: dict[bytes, int] = {}
        self.agent_ident: list[bytes | None] = []
        self.agent_dialect: list[int] = []
        self.agent_missed: list[int] = []
        self.jobs: dict[bytes, int] = {}
        self.job_key: list[bytes | None] = []
        self.job_client: list[bytes | None] = []
        self.job_frame: list[bytes | None] = []
        self.job_started: list[float] = []
        # Monotonic times of submission and dispatch, for the wait / run time histograms.
        self.job_submitted_at: list[float] = []
        self.job_sent_at: list[float] = []
        # Per-job DEBUG lines cost a Python call each: decided once, by the logic
        # layer, from the log level (``fastbackend serve -v``).
        self.log_jobs = False
        # Counters for the periodic summary.
        self.jobs_submitted = 0
        self.jobs_done = 0
        self.frames_dropped = 0
        # The same per dialect, and the time histograms, for the metrics.
        self.submitted_by = [0] * len(DIALECTS)
        self.done_by = [0] * len(DIALECTS)
        self.wait_times = [TimeHistogram() for _ in DIALECTS]
        self.run_times = [TimeHistogram() for _ in DIALECTS]
        # What pump() looks at after a drain: the logic layer's pending work (agents a
        # send found gone, a queue snapshot under way), kept here so that the compiled twin
        # reads it without a Python lookup; after_pump(more) is the shell's hook for it.
        self.agents_gone: set[bytes] = set()
        self.snapshot: object = None
        self.after_pump = None
        self.batch = 256

    def counters(self) -> dict:
        """The per-dialect counters and histograms, as plain lists (read at scrape time)."""
        return {
            "submitted": list(self.submitted_by), "done": list(self.done_by),
            "wait": [(list(h.counts), h.total) for h in self.wait_times],
            "run": [(list(h.counts), h.total) for h in self.run_times],
        }

    # -- hooks for the subclass (rare messages, logging) -------------------------

    def client_hello(self, ident: bytes, frame: bytes, dialect: int) -> None:
        raise NotImplementedError

    def client_get_queue(self, ident: bytes, dialect: int) -> None:
        raise NotImplementedError

    def kill_job(self, ident: bytes, job_id: str, dialect: int) -> None:
        raise NotImplementedError

    def duplicate_job(self, ident: bytes, job_id: str, dialect: int) -> None:
        raise NotImplementedError

    def agent_hello(self, ident: bytes, frame: bytes, dialect: int) -> None:
        raise NotImplementedError

    def dropped(self, side: str, ident: bytes, reason: str, kind: str = "malformed") -> None:
        raise NotImplementedError

    def wrong_dialect(self, side: str, ident: bytes, dialect: int) -> None:
        raise NotImplementedError

    def job_event(self, event: str, job: int, agent: int) -> None:
        raise NotImplementedError

    def internal_error(self, side: str, ident: bytes) -> None:
        raise NotImplementedError

    def unreachable(self, side: str, ident: bytes) -> None:
        raise NotImplementedError

    # -- socket I/O ---------------------------------------------------------------

    def send_client(self, ident: bytes, frame: bytes) -> None:
        """Send one frame to a client.  The socket is ROUTER_MANDATORY with no send
        high-water mark, so a frame is either queued or its peer is gone."""
        try:
            self.client_socket.send_multipart((ident, frame), zmq.DONTWAIT)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.unreachable("client", ident)

    def send_agent(self, ident: bytes, frame: bytes) -> None:
        """Send one frame to an agent (same rules as ``send_client``)."""
        try:
            self.agent_socket.send_multipart((ident, frame), zmq.DONTWAIT)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.unreachable("agent", ident)

    def pump(self) -> None:
        """One wake-up: drain both sockets (``batch`` messages each at most), then call
        ``after_pump(more)`` only if something is left to do (a full batch, an agent found
        gone, a snapshot under way).  The compiled twin's is the whole wake-up in C."""
        more = self.drain(self.batch)
        if more or self.agents_gone or self.snapshot is not None:
            self.after_pump(more)

    def drain(self, budget: int) -> bool:
        """Handle up to ``budget`` messages from each socket; True if more may wait.

        Agents go first: their results free slots for the jobs clients send.  The
        final ``EVENTS`` reads matter: ZeroMQ's descriptor is edge-triggered and our
        own sends may have consumed the edge that announced pending input.
        """
        self._drain(self.agent_socket, budget, self.on_agent_frame, "agent")
        self._drain(self.client_socket, budget, self.on_client_frame, "client")
        return bool(
            (self.agent_socket.getsockopt(zmq.EVENTS) | self.client_socket.getsockopt(zmq.EVENTS))
            & zmq.POLLIN
        )

    def _drain(self, socket: zmq.Socket, budget: int, handler, side: str) -> None:
        while budget > 0:
            try:
                parts = socket.recv_multipart(zmq.DONTWAIT, copy=True)
            except zmq.Again:
                return
            budget -= 1 + (len(parts[1]) // BYTES_PER_MESSAGE if len(parts) > 1 else 0)
            if len(parts) != 2:
                self.dropped(side, parts[0], f"{len(parts) - 1} frames in one message, expected 1",
                             "multipart")
                continue
            try:
                handler(parts[0], parts[1])
            except Exception:  # a bug must cost one message, never the broker
                self.internal_error(side, parts[0])

    def _scan(self, scanner, side: str, ident: bytes, frame: bytes, dialect: int, known: bool):
        """Scan a frame as ``dialect``, or as the dialect it turns out to be in.

        A frame that holds the other dialect's type key is scanned as that dialect.  So
        is a bad frame from a peer not known yet (``known`` false): its first guess was
        only a guess, and a valid frame of the other dialect may fail a field check of
        the first (a 0.5 agent's job id is a pair, a 0.9 one's a str) before its type
        key is reached.  Returns (dialect, scan result), or None when the frame was dropped.
        """
        first_error = None
        try:
            return dialect, scanner(frame, dialect)
        except WrongDialect as exc:
            if self.pinned is not None:
                self.wrong_dialect(side, ident, exc.dialect)
                return None
            dialect = exc.dialect
        except WireError as exc:
            if known or self.pinned is not None:
                self.dropped(side, ident, str(exc))
                return None
            dialect, first_error = 1 - dialect, exc  # the other of the two dialects
        try:
            return dialect, scanner(frame, dialect)
        except WireError as exc:
            if first_error is not None:
                reason = str(first_error)  # the first guess's: the frame is no better in the other
            elif isinstance(exc, WrongDialect):
                reason = "holds the type keys of two dialects"
            else:
                reason = str(exc)
            self.dropped(side, ident, reason)
        return None

    # -- clients ------------------------------------------------------------------

    def on_client_frame(self, ident: bytes, frame: bytes) -> None:
        registered = self.clients.get(ident, -1)
        scanned = self._scan(wire.scan_client, "client", ident, frame,
                             self.first_guess if registered < 0 else registered, registered >= 0)
        if scanned is None:
            return
        dialect, (msgtype, job_id, environment, priority) = scanned
        if msgtype == CLIENT_HELLO:
            self.client_hello(ident, frame, dialect)
            return
        if registered != dialect:
            # The real client answers `unknown` by aborting its jobs and saying hello again.
            self.send_client(ident, DIALECTS[dialect].unknown_frame)
            return
        if msgtype == CLIENT_NEW_JOB:
            self.new_job(ident, dialect, job_id, environment, priority, frame)
        elif msgtype == PING:
            self.send_client(ident, DIALECTS[dialect].pong_frame)
        elif msgtype == CLIENT_KILL_JOB:
            self.kill_job(ident, job_id, dialect)
        elif msgtype == CLIENT_GET_QUEUE:
            self.client_get_queue(ident, dialect)

    def new_job(self, ident: bytes, dialect: int, job_id: str, environment: object, priority: int,
                frame: bytes) -> None:
        key = wire.job_key(ident, job_id, dialect)
        self.jobs_submitted += 1
        self.submitted_by[dialect] += 1
        if key in self.jobs:
            self.duplicate_job(ident, job_id, dialect)
            return
        job, agent = self.sched.submit(self.sched.env_id(environment), priority)
        if job >= len(self.job_key):
            # Doubling: the scheduler hands out indices one above the highest in use.
            grow = max(job + 1 - len(self.job_key), len(self.job_key))
            self.job_key.extend([None] * grow)
            self.job_client.extend([None] * grow)
            self.job_frame.extend([None] * grow)
            self.job_started.extend([0.0] * grow)
            self.job_submitted_at.extend([0.0] * grow)
            self.job_sent_at.extend([0.0] * grow)
        self.jobs[key] = job
        self.job_key[job] = key
        self.job_client[job] = ident
        self.job_frame[job] = frame
        self.job_submitted_at[job] = time.monotonic()
        if self.log_jobs:
            self.job_event("queued", job, -1)
        if agent >= 0:
            self.dispatch(job, agent)

    def dispatch(self, job: int, agent: int) -> None:
        """Send a job the scheduler has just started on ``agent``."""
        self.job_started[job] = time.time()
        self.job_sent_at[job] = now = time.monotonic()
        self.wait_times[wire.key_dialect(self.job_key[job])].add(now - self.job_submitted_at[job])
        if self.log_jobs:
            self.job_event("sent", job, agent)
        frame = wire.splice_new_job(self.job_frame[job], self.job_client[job],
                                    wire.key_dialect(self.job_key[job]))
        self.send_agent(self.agent_ident[agent], frame)

    def forget_job(self, job: int) -> None:
        del self.jobs[self.job_key[job]]
        self.job_key[job] = None
        self.job_client[job] = None
        self.job_frame[job] = None

    # -- agents -------------------------------------------------------------------

    def on_agent_frame(self, ident: bytes, frame: bytes) -> None:
        agent = self.agents.get(ident, -1)
        scanned = self._scan(wire.scan_agent, "agent", ident, frame,
                             self.first_guess if agent < 0 else self.agent_dialect[agent], agent >= 0)
        if scanned is None:
            return
        dialect, (msgtype, client, job_id) = scanned
        if msgtype == AGENT_HELLO:
            self.agent_hello(ident, frame, dialect)
            return
        if agent < 0 or self.agent_dialect[agent] != dialect:
            self.dropped("agent", ident, "message from an agent that did not say hello", "unregistered")
            return
        if msgtype == PONG:
            self.agent_missed[agent] = 0
            return
        job = self.jobs.get(wire.job_key(client, job_id, dialect), -1)
        if job < 0 or self.sched.job_state(job) != JOB_RUNNING or self.sched.job_agent(job) != agent:
            self.dropped("agent", ident, f"message about job {job_id!r}, which is not running there",
                         "not_running")
            return
        owner = self.job_client[job]
        if msgtype == AGENT_JOB_DONE:
            if self.log_jobs:
                self.job_event("done", job, agent)
            self.send_client(owner, wire.splice_job_done(frame, dialect))
            self.run_times[dialect].add(time.monotonic() - self.job_sent_at[job])
            self.forget_job(job)
            self.jobs_done += 1
            self.done_by[dialect] += 1
            following = self.sched.finish(job)
            if following >= 0:
                self.dispatch(following, agent)
        elif msgtype == AGENT_JOB_STARTED:
            self.send_client(owner, wire.job_started(job_id, dialect))
        elif msgtype == AGENT_JOB_SSH_DEBUG:
            self.send_client(owner, wire.splice_ssh_debug(frame, dialect))
