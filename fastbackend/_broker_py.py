"""The broker's hot path in pure Python: the readable truth of ``_broker_c``.

``BrokerCore`` owns the per-job state and handles the messages that arrive once or
more per job: ``client_new_job``, ``ping`` (client), and
``agent_job_started``, ``agent_job_done``, ``agent_job_ssh_debug``, ``pong`` (agent).
It also drains the two ROUTER sockets.  The rare messages (hellos, queue snapshots,
kills) and the heartbeat are handled by ``broker.BrokerLogic``, mixed into
either core, through the hooks ``client_hello``, ``client_get_queue``, ``kill_job``,
``agent_hello``, ``dropped``, ``internal_error`` and ``unreachable``.

State, by index:

* jobs are indexed by the scheduler's job index; ``job_key[j]`` is the job's key
  (see ``wire.job_key``: the client identity and the client's job id, which is also
  what an agent echoes back), ``job_frame[j]`` the client's ``client_new_job`` frame,
  kept whole so that ``backend_new_job`` is spliced from it at dispatch time and the
  queue snapshot can read its fields; ``job_started[j]`` the dispatch time;
* agents are indexed by the scheduler's agent index; ``agent_ident[a]`` is the
  agent's ROUTER identity and ``agent_missed[a]`` the pings it has not answered.

A job is forgotten (key and frame dropped) the moment its result is sent, so any
later message about it is dropped: the real 0.5 client dies on a message for a job
it already has the result of.
"""

from __future__ import annotations

import time

import zmq

from . import protocol, sched, wire
from .protocol import (
    AGENT_HELLO,
    AGENT_JOB_DONE,
    AGENT_JOB_SSH_DEBUG,
    AGENT_JOB_STARTED,
    CLIENT_GET_QUEUE,
    CLIENT_HELLO,
    CLIENT_KILL_JOB,
    CLIENT_NEW_JOB,
    PING,
    PONG,
    WireError,
)

JOB_RUNNING = sched.JOB_RUNNING


#: Bytes of payload that count as one more message against a drain's budget: a batch
#: of big results (1 MiB archives are spliced, so copied) must not hold the loop for
#: as long as 256 of them would take.
BYTES_PER_MESSAGE = 64 * 1024


class BrokerCore:
    """Per-job routing between clients and agents; see the module docstring."""

    IMPL = "py"

    def __init__(self, agent_socket: zmq.Socket, client_socket: zmq.Socket) -> None:
        self.agent_socket = agent_socket
        self.client_socket = client_socket
        self.sched = sched.Scheduler()
        self.clients: set[bytes] = set()
        self.agents: dict[bytes, int] = {}
        self.agent_ident: list[bytes | None] = []
        self.agent_missed: list[int] = []
        self.jobs: dict[bytes, int] = {}
        self.job_key: list[bytes | None] = []
        self.job_frame: list[bytes | None] = []
        self.job_started: list[float] = []
        # Counters for the periodic summary.
        # Per-job DEBUG lines cost a Python call each: decided once, by the logic
        # layer, from the log level (``fastbackend serve -v``).
        self.log_jobs = False
        self.jobs_submitted = 0
        self.jobs_done = 0
        self.frames_dropped = 0

    # -- hooks for the subclass (rare messages, logging) -------------------------

    def client_hello(self, ident: bytes, frame: bytes) -> None:
        raise NotImplementedError

    def client_get_queue(self, ident: bytes) -> None:
        raise NotImplementedError

    def kill_job(self, ident: bytes, job_id: str) -> None:
        raise NotImplementedError

    def agent_hello(self, ident: bytes, frame: bytes) -> None:
        raise NotImplementedError

    def dropped(self, side: str, ident: bytes, reason: str) -> None:
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
                self.dropped(side, parts[0], f"{len(parts) - 1} frames in one message, expected 1")
                continue
            try:
                handler(parts[0], parts[1])
            except Exception:  # a bug must cost one message, never the broker
                self.internal_error(side, parts[0])

    # -- clients ------------------------------------------------------------------

    def on_client_frame(self, ident: bytes, frame: bytes) -> None:
        try:
            msgtype, job_id, environment = wire.scan_client(frame)
        except WireError as exc:
            self.dropped("client", ident, str(exc))
            return
        if msgtype == CLIENT_HELLO:
            self.client_hello(ident, frame)
            return
        if ident not in self.clients:
            # The real client answers `unknown` by aborting its jobs and saying hello again.
            self.send_client(ident, protocol.UNKNOWN_FRAME)
            return
        if msgtype == CLIENT_NEW_JOB:
            self.new_job(ident, job_id, environment, frame)
        elif msgtype == PING:
            self.send_client(ident, protocol.PONG_FRAME)
        elif msgtype == CLIENT_KILL_JOB:
            self.kill_job(ident, job_id)
        elif msgtype == CLIENT_GET_QUEUE:
            self.client_get_queue(ident)

    def new_job(self, ident: bytes, job_id: str, environment: str, frame: bytes) -> None:
        key = wire.job_key(ident, job_id)
        if key in self.jobs:
            self.dropped("client", ident, f"duplicate job id {job_id!r}")
            return
        job, agent = self.sched.submit(self.sched.env_id(environment))
        if job >= len(self.job_key):
            # Doubling: the scheduler hands out indices one above the highest in use.
            grow = max(job + 1 - len(self.job_key), len(self.job_key))
            self.job_key.extend([None] * grow)
            self.job_frame.extend([None] * grow)
            self.job_started.extend([0.0] * grow)
        self.jobs[key] = job
        self.job_key[job] = key
        self.job_frame[job] = frame
        self.jobs_submitted += 1
        if self.log_jobs:
            self.job_event("queued", job, -1)
        if agent >= 0:
            self.dispatch(job, agent)

    def dispatch(self, job: int, agent: int) -> None:
        """Send a job the scheduler has just started on ``agent``."""
        key = self.job_key[job]
        client = wire.key_client(key)
        self.job_started[job] = time.time()
        if self.log_jobs:
            self.job_event("sent", job, agent)
        self.send_agent(self.agent_ident[agent], wire.splice_new_job(self.job_frame[job], client))

    def forget_job(self, job: int) -> None:
        del self.jobs[self.job_key[job]]
        self.job_key[job] = None
        self.job_frame[job] = None

    # -- agents -------------------------------------------------------------------

    def on_agent_frame(self, ident: bytes, frame: bytes) -> None:
        try:
            msgtype, client, job_id = wire.scan_agent(frame)
        except WireError as exc:
            self.dropped("agent", ident, str(exc))
            return
        if msgtype == AGENT_HELLO:
            self.agent_hello(ident, frame)
            return
        agent = self.agents.get(ident, -1)
        if agent < 0:
            self.dropped("agent", ident, "message from an agent that did not say hello")
            return
        if msgtype == PONG:
            self.agent_missed[agent] = 0
            return
        job = self.jobs.get(wire.job_key(client, job_id), -1)
        if job < 0 or self.sched.job_state(job) != JOB_RUNNING or self.sched.job_agent(job) != agent:
            self.dropped("agent", ident, f"message about job {job_id!r}, which is not running there")
            return
        if msgtype == AGENT_JOB_DONE:
            if self.log_jobs:
                self.job_event("done", job, agent)
            self.send_client(client, wire.splice_job_done(frame))
            self.forget_job(job)
            self.jobs_done += 1
            following = self.sched.finish(job)
            if following >= 0:
                self.dispatch(following, agent)
        elif msgtype == AGENT_JOB_STARTED:
            self.send_client(client, wire.job_started(job_id))
        elif msgtype == AGENT_JOB_SSH_DEBUG:
            self.send_client(client, wire.splice_ssh_debug(frame))
