"""The broker: INGInious backend semantics, both dialects, over one of the two ``BrokerCore`` twins.

``BrokerCore`` (compiled ``_broker_c`` or pure ``_broker_py``) drains the sockets and
handles every per-job message.  This module adds what happens rarely and is the
same for both: client and agent hellos, kills, duplicate ids, queue snapshots, the
agents' heartbeat, removing agents, the environment lists pushed to clients, and
logging.  What differs between the dialects is data and a few encoders, taken from
the ``protocol.Dialect`` of the peer concerned; each dialect's clients see only its
own environments and jobs.

Differences from the stock backends, on purpose (the README lists them per dialect):

* environments of departed agents are withdrawn from the list sent to clients;
* nothing is sent for a job after its result (stock 0.5 forwards a late
  ``agent_job_started``/ssh message, which kills the real client's receive loop;
  stock 0.9.2 raises KeyError on them);
* a bad frame is logged and dropped (stock lets the exception end its receive loop);
* only the agent running a job may speak of it;
* 0.5: a duplicate job id from the same client is dropped (stock overwrites the first job);
* 0.9: a killed waiting job is gone (stock keeps it in its heap, and a resubmitted id
  then runs with the old input);
* per-job log lines are DEBUG, with a periodic INFO summary instead.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import zmq

from . import sched, wire
from ._select import twin
from .protocol import AGENT_HELLO, DIALECTS, V05, V09, WireError, decode

logger = logging.getLogger("fastbackend.broker")

_core, IMPL = twin("broker")
BrokerCore = _core.BrokerCore


#: An agent that has not answered this many pings in a row is removed.
MAX_MISSED_PINGS = 6
#: Peers remembered as speaking the dialect a pinned broker does not serve.
MAX_REMEMBERED_PEERS = 4096
#: Most slots an agent may announce (the scheduler's indices and counters are 31-bit).
MAX_SLOTS = 0x7FFFFFFE


class RateLimitedLog:
    """At most ``burst`` lines per ``period`` seconds; the rest are counted and reported.

    A peer flooding bad frames must not be able to fill the operator's disk.
    """

    def __init__(self, log: logging.Logger, burst: int = 20, period: float = 10.0) -> None:
        self.log = log
        self.burst = burst
        self.period = period
        self.window_start = 0.0
        self.lines = 0
        self.suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        self.emit(logging.WARNING, msg, *args)

    def emit(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self.window_start >= self.period:
            if self.suppressed:
                self.log.warning("%d similar lines suppressed in the last %.0f s",
                                 self.suppressed, self.period)
            self.window_start = now
            self.lines = 0
            self.suppressed = 0
        if self.lines < self.burst:
            self.lines += 1
            self.log.log(level, msg, *args, exc_info=exc_info)
        else:
            self.suppressed += 1


class QueueSnapshot:
    """A queue listing, built a slice at a time, answered in each asker's dialect.

    With a million jobs waiting, listing them takes seconds; built in one go, that
    would hold back the heartbeat (agents restart after 10 s without a ping).  The
    running jobs (bounded by the agents' slots) are listed at once; the waiting jobs
    are taken at the moment of the request and read a slice per loop turn, skipping
    any that ended meanwhile (the job index no longer holds their key; should a new job
    of the same key hold it, that one is waiting too, and is listed).  Each dialect's
    clients see that dialect's jobs.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.waiters: list[tuple[bytes, int]] = []
        self.running: tuple[list, ...] = tuple([] for _ in DIALECTS)
        self.waiting: tuple[list, ...] = tuple([] for _ in DIALECTS)
        for job in broker.sched.running_jobs():
            key = broker.job_key[job]
            dialect = wire.key_dialect(key)
            job_id, course_id, task_id, launcher, time_value = wire.queue_fields(broker.job_frame[job],
                                                                                 dialect)
            started = int(broker.job_started[job])
            self.running[dialect].append(
                (job_id, broker.job_client[job], broker.agent_name[broker.sched.job_agent(job)],
                 f"{course_id}/{task_id}", launcher, started,
                 DIALECTS[dialect].running_end(started, time_value)))
        self.jobs = broker.sched.waiting_jobs()
        self.keys = [broker.job_key[job] for job in self.jobs]
        self.position = 0

    def step(self, budget: int) -> bool:
        """Read up to ``budget`` more waiting jobs; True when all are read."""
        job_key, job_frame, job_client = self.broker.job_key, self.broker.job_frame, self.broker.job_client
        end = min(self.position + budget, len(self.jobs))
        for job, key in zip(self.jobs[self.position:end], self.keys[self.position:end], strict=True):
            if job_key[job] == key:
                dialect = wire.key_dialect(key)
                job_id, course_id, task_id, launcher, time_value = wire.queue_fields(job_frame[job], dialect)
                self.waiting[dialect].append(
                    (job_id, job_client[job], f"{course_id}/{task_id}", launcher, time_value))
        self.position = end
        return end == len(self.jobs)

    def frame_for(self, client: bytes, dialect: int) -> bytes:
        # Entries hold the owner's identity where the answer has is_current_client; plain
        # tuple unpacking keeps this one pass over a million jobs at about 0.2 s.
        running = [(job, owner == client, agent, info, launcher, started, end)
                   for job, owner, agent, info, launcher, started, end in self.running[dialect]]
        waiting = [(job, owner == client, info, launcher, limit)
                   for job, owner, info, launcher, limit in self.waiting[dialect]]
        return DIALECTS[dialect].get_queue_frame(running, waiting)


class BrokerLogic:
    """The rare half of the INGInious backend, shared by both cores and both dialects.

    Mixed in before a ``BrokerCore`` (``Broker`` below uses the selected one; tests
    build one on each), whose hooks it implements and whose state it uses.
    """

    def __init__(self, agent_socket: zmq.Socket, client_socket: zmq.Socket,
                 dialect: int | None = None) -> None:
        super().__init__(agent_socket, client_socket, dialect)
        self.agent_name: list[str] = []
        self.agent_envs: list[tuple] = []
        # Per dialect: environment key -> [image id, created, number of live agents
        # offering it]; insertion order is the order clients see, as in stock.  Keys
        # are names in 0.5 and (type, name) pairs in 0.9, as in the scheduler.
        self.environments: tuple[dict, ...] = tuple({} for _ in DIALECTS)
        self.bad_input = RateLimitedLog(logger)
        # Peers coming and going (hellos, removals, duplicates) are logged at INFO and
        # WARNING like stock, but a flood of new identities must not fill the disk either.
        self.peer_events = RateLimitedLog(logger, burst=100)
        self.wrong_dialect_peers: set[bytes] = set()
        # For the metrics (the per-job counters live in the core): frames dropped by kind,
        # jobs ended by the broker itself per (dialect, outcome), agents removed by reason.
        self.dropped_by: Counter[str] = Counter()
        self.finished_by: Counter[tuple[int, str]] = Counter()
        self.removed_by: Counter[str] = Counter()
        # The core holds two attributes of this layer, so that its pump() can tell from C
        # whether a wake-up left work: ``agents_gone``, the agents a send found gone (their
        # connection closed; removed by drop_disconnected_agents), and ``snapshot``, the
        # QueueSnapshot under way, or None.
        self.log_jobs = logger.isEnabledFor(logging.DEBUG)
        self._summary_at = time.monotonic()
        self._summary_done = 0

    # -- logging hooks ------------------------------------------------------------

    def dropped(self, side: str, ident: bytes, reason: str, kind: str = "malformed") -> None:
        self.frames_dropped += 1
        self.dropped_by[kind] += 1
        self.bad_input.warning("dropped a frame from %s %s: %s", side, ident.hex(), reason)

    def wrong_dialect(self, side: str, ident: bytes, dialect: int) -> None:
        # One line per peer, not per frame: such a peer pings every second.  The set is
        # bounded (a flood of new identities restarts it); the lines are rate-limited too.
        self.frames_dropped += 1
        self.dropped_by["dialect"] += 1
        if ident in self.wrong_dialect_peers:
            return
        if len(self.wrong_dialect_peers) >= MAX_REMEMBERED_PEERS:
            self.wrong_dialect_peers.clear()
        self.wrong_dialect_peers.add(ident)
        self.bad_input.warning("dropped a frame from %s %s: it speaks dialect %s, and this broker serves "
                               "dialect %s only (--dialect); its further frames are dropped silently",
                               side, ident.hex(), DIALECTS[dialect].name, DIALECTS[self.pinned].name)

    def job_event(self, event: str, job: int, agent: int) -> None:
        client, job_id = self.job_client[job].hex(), wire.key_job_id(self.job_key[job])
        if event == "queued":
            logger.debug("job %s %s queued for environment %s, priority %d", client, job_id,
                         _env_text(self.sched.env_name(self.sched.job_env(job))),
                         self.sched.job_priority(job))
        else:
            logger.debug("job %s %s %s agent %s (%s)", client, job_id,
                         "sent to" if event == "sent" else "done on",
                         self.agent_ident[agent].hex(), self.agent_name[agent])

    def internal_error(self, side: str, ident: bytes) -> None:
        self.frames_dropped += 1
        self.dropped_by["internal"] += 1
        self.bad_input.emit(logging.ERROR, "internal error on a frame from %s %s; frame dropped", side,
                            ident.hex(), exc_info=True)

    def unreachable(self, side: str, ident: bytes) -> None:
        logger.debug("%s %s is gone; a frame for it was dropped", side, ident.hex())
        if side == "client":
            # Its identity will never come back (a reconnecting peer gets a new one).
            self.clients.pop(ident, None)
        elif ident in self.agents:
            # ROUTER_MANDATORY fails a send only when the peer's pipe is gone, and libzmq ends
            # a pipe only when its connection closed: this agent left for good (a live agent's
            # send succeeds, whatever its load).  Removed later, by drop_disconnected_agents,
            # not here: this hook runs inside the core's sends (a dispatch, say).
            self.agents_gone.add(ident)

    def drop_disconnected_agents(self, probe: bool = False) -> int:
        """Remove the agents whose connection closed; each job they ran ends with a crash result.

        With ``probe``, first ping every agent (the server does it when the agent socket's
        monitor reports a closed connection: the event names a file descriptor, not an
        agent); a ping to a live agent is harmless, it answers it.  An agent is removed
        only if a ping sent here fails too, so a peer whose fixed identity has connected
        again since its first failed send stays.  Returns how many agents were removed.
        """
        suspects, self.agents_gone = self.agents_gone, set()
        for ident in list(self.agents) if probe else suspects:
            agent = self.agents.get(ident, -1)
            if agent >= 0:
                # A failed send puts ident back into self.agents_gone (see unreachable).
                self.send_agent(ident, DIALECTS[self.agent_dialect[agent]].ping_frame)
        gone, self.agents_gone = self.agents_gone, set()
        removed = 0
        for ident in gone:
            agent = self.agents.get(ident, -1)
            if agent >= 0:
                self.remove_agent(agent, "lost its connection", "disconnected")
                removed += 1
        return removed

    # -- clients ------------------------------------------------------------------

    def client_hello(self, ident: bytes, frame: bytes, dialect: int) -> None:
        self.peer_events.emit(logging.INFO, "new client %s (dialect %s)", ident.hex(), DIALECTS[dialect].name)
        self.clients[ident] = dialect
        self.send_client(ident, DIALECTS[dialect].environments_frame(self.environments[dialect]))

    def client_get_queue(self, ident: bytes, dialect: int) -> None:
        # Answered once the snapshot is complete; clients asking meanwhile share it.
        if self.snapshot is None:
            self.snapshot = QueueSnapshot(self)
        self.snapshot.waiters.append((ident, dialect))

    def background(self, budget: int) -> bool:
        """Advance slow work (the queue snapshot) by ``budget`` jobs; True if some remains."""
        if self.snapshot is None:
            return False
        if not self.snapshot.step(budget):
            return True
        snapshot, self.snapshot = self.snapshot, None
        for client, dialect in snapshot.waiters:
            self.send_client(client, snapshot.frame_for(client, dialect))
        return False

    def duplicate_job(self, ident: bytes, job_id: str, dialect: int) -> None:
        """A new job whose id is already waiting or running (0.9: from any client)."""
        answer = DIALECTS[dialect].duplicate_frame
        self.finished_by[dialect, "duplicate"] += 1
        if answer is None:
            self.dropped("client", ident, f"duplicate job id {job_id!r}", "duplicate")
            return
        self.peer_events.emit(logging.INFO, "client %s submitted job %s, whose id is already in use: "
                              "answered with a crash",
                    ident.hex(), job_id)
        self.send_client(ident, answer(job_id))

    def kill_job(self, ident: bytes, job_id: str, dialect: int) -> None:
        """A waiting job ends at once (killed); a running one is killed by its agent,
        whose own result then ends it.  In 0.9 any client may kill any job (ids are
        global); the result goes to the job's owner."""
        job = self.jobs.get(wire.job_key(ident, job_id, dialect), -1)
        if job < 0:
            self.dropped("client", ident, f"kill of unknown job {job_id!r}", "unknown_job")
            return
        state = wire.submission_state(self.job_frame[job], dialect) if dialect == V09 else None
        owner = self.job_client[job]
        if self.sched.job_state(job) == sched.JOB_WAITING:
            self.sched.cancel(job)
            self.forget_job(job)
            self.finished_by[dialect, "killed"] += 1
            self.send_client(owner, DIALECTS[dialect].killed_frame(job_id, state))
        else:
            agent = self.sched.job_agent(job)
            self.send_agent(self.agent_ident[agent], DIALECTS[dialect].kill_job_frame(owner, job_id, state))

    def push_environments(self, dialect: int) -> None:
        frame = DIALECTS[dialect].environments_frame(self.environments[dialect])
        for client, client_dialect in list(self.clients.items()):
            if client_dialect == dialect:
                self.send_client(client, frame)

    # -- agents -------------------------------------------------------------------

    def agent_hello(self, ident: bytes, frame: bytes, dialect: int) -> None:
        try:
            name, slots, environments = _check_hello(dialect, decode(frame))
        except (WireError, ValueError, TypeError) as exc:
            self.dropped("agent", ident, f"bad {DIALECTS[dialect].agent_type(AGENT_HELLO)}: {exc}",
                         "bad_hello")
            return
        self.peer_events.emit(logging.INFO,
                              "agent %s (%s) said hello in dialect %s: %d slots, environments %s",
                    ident.hex(), name, DIALECTS[dialect].name, slots,
                    ", ".join(_env_text(env) for env in environments) or "none")
        if ident in self.agents:
            # Same socket, new hello: the agent restarted and lost its jobs.
            self.remove_agent(self.agents[ident], "said hello again", "hello_again")
        agent = self.sched.add_agent(slots, [self.sched.env_id(env) for env in environments])
        if agent >= len(self.agent_ident):
            grow = agent + 1 - len(self.agent_ident)
            self.agent_ident.extend([None] * grow)
            self.agent_dialect.extend([V05] * grow)
            self.agent_missed.extend([0] * grow)
            self.agent_name.extend([""] * grow)
            self.agent_envs.extend([()] * grow)
        self.agents[ident] = agent
        self.agent_ident[agent] = ident
        self.agent_dialect[agent] = dialect
        self.agent_missed[agent] = 0
        self.agent_name[agent] = name
        self.agent_envs[agent] = tuple(environments)
        for env, (image_id, created) in environments.items():
            self._register_environment(dialect, env, image_id, created, name)
        while (job := self.sched.next_job(agent)) >= 0:
            self.dispatch(job, agent)
        self.push_environments(dialect)

    def _register_environment(self, dialect: int, env: object, image_id: str, created: int,
                              agent_name: str) -> None:
        known = self.environments[dialect].get(env)
        if known is None:
            self.environments[dialect][env] = [image_id, created, 1]
            return
        known[2] += 1
        if known[0] != image_id:
            # Same name, another image: the jobs may grade differently depending on
            # the agent that runs them.  Stock keeps the newest as the reference.
            logger.warning("environment %s has several versions: %s (created %d) registered, "
                           "agent %s offers %s (created %d)",
                           _env_text(env), known[0], known[1], agent_name, image_id, created)
            if created > known[1]:
                known[0], known[1] = image_id, created

    def remove_agent(self, agent: int, why: str, reason: str) -> None:
        """Forget an agent; each job it was running ends with a crash result.

        ``why`` is said in the log, ``reason`` counted in the metrics.
        """
        ident = self.agent_ident[agent]
        dialect = DIALECTS[self.agent_dialect[agent]]
        self.peer_events.warning("agent %s (%s) %s: removing it", ident.hex(), self.agent_name[agent], why)
        self.removed_by[reason] += 1
        for job in self.sched.remove_agent(agent):
            owner, job_id = self.job_client[job], wire.key_job_id(self.job_key[job])
            self.forget_job(job)
            self.finished_by[dialect.tag, "crashed"] += 1
            self.send_client(owner, dialect.agent_lost_frame(job_id))
        del self.agents[ident]
        self.agent_ident[agent] = None
        environments = self.environments[dialect.tag]
        changed = False
        for env in self.agent_envs[agent]:
            known = environments[env]
            known[2] -= 1
            if known[2] == 0:
                del environments[env]
                changed = True
        self.agent_envs[agent] = ()
        if changed:
            self.push_environments(dialect.tag)

    def heartbeat(self) -> None:
        """Called every second: ping every agent, remove those that stopped answering."""
        for ident, agent in list(self.agents.items()):
            if self.agent_missed[agent] >= MAX_MISSED_PINGS:
                self.remove_agent(agent, f"did not answer {MAX_MISSED_PINGS} pings", "missed_pings")
            else:
                self.agent_missed[agent] += 1
                self.send_agent(ident, DIALECTS[self.agent_dialect[agent]].ping_frame)

    def summary(self) -> None:
        """Log one INFO line about the last period, if anything happened."""
        now = time.monotonic()
        done = self.jobs_done - self._summary_done
        period = now - self._summary_at
        self._summary_at, self._summary_done = now, self.jobs_done
        if done or self.sched.waiting_count() or self.sched.running_count():
            logger.info("%.0f jobs/s over %.0f s; %d waiting, %d running; %d agents, %d clients; "
                        "%d frames dropped so far",
                        done / period if period else 0.0, period, self.sched.waiting_count(),
                        self.sched.running_count(), len(self.agents), len(self.clients), self.frames_dropped)


def _env_text(env: object) -> str:
    """An environment key as the log shows it: ``name`` (0.5) or ``type/name`` (0.9)."""
    return env if isinstance(env, str) else "/".join(env)


def _check_hello(dialect: int, hello: dict) -> tuple[str, int, dict]:
    """(name, slots, {environment key: (image id, created)}) from an agent hello.

    ``wire.scan_agent`` has checked the key set and the top-level field types.
    """
    name = hello["friendly_name"]
    slots = hello["available_job_slots"]
    if slots > MAX_SLOTS:
        raise ValueError(f"available_job_slots {slots} is more than {MAX_SLOTS}")
    environments = {}
    if dialect == V05:
        for env, info in hello["available_containers"].items():
            if not isinstance(env, str) or not isinstance(info, dict) or set(info) != {"id", "created"}:
                raise ValueError(f"environment {env!r} is not described by {{id: str, created: int}}")
            environments[env] = _image(env, info)
    else:
        for env_type, names in hello["available_environments"].items():
            if not isinstance(env_type, str) or not isinstance(names, dict):
                raise ValueError(f"environment type {env_type!r} is not a str mapping names to descriptions")
            for env, info in names.items():
                if (not isinstance(env, str) or not isinstance(info, dict)
                        or not {"id", "created"} <= set(info)):
                    raise ValueError(f"environment {env_type}/{env!r} is not described by "
                                     "{id: str, created: int, ...}")
                environments[(env_type, env)] = _image(f"{env_type}/{env}", info)
    return name, slots, environments


def _image(env: str, info: dict) -> tuple[str, int]:
    image_id, created = info["id"], info["created"]
    if not isinstance(image_id, str) or not isinstance(created, int):
        raise ValueError(f"environment {env!r} is not described by {{id: str, created: int}}")
    return image_id, created


class Broker(BrokerLogic, BrokerCore):
    """The INGInious backend state machine on the selected core, driven by ``server.Backend``."""
