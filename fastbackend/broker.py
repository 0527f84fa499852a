"""The broker: INGInious 0.5 backend semantics over one of the two ``BrokerCore`` twins.

``BrokerCore`` (compiled ``_broker_c`` or pure ``_broker_py``) drains the sockets and
handles every per-job message.  This module adds what happens rarely and is the
same for both: client and agent hellos, queue snapshots, the agents' heartbeat,
removing agents, the environment list pushed to clients, and logging.

Differences from the stock 0.5 backend, on purpose:

* environments of departed agents are withdrawn from the list sent to clients;
* nothing is sent for a job after its result (stock forwards a late
  ``agent_job_started``/ssh message, which kills the real client's receive loop);
* a bad frame is logged and dropped (stock lets the exception end its receive loop);
* a duplicate job id from the same client is dropped (stock overwrites the first job);
* per-job log lines are DEBUG, with a periodic INFO summary instead.
"""

from __future__ import annotations

import logging
import time

import zmq

from . import protocol, sched, wire
from ._select import twin
from .protocol import WireError

logger = logging.getLogger("fastbackend.broker")

_core, IMPL = twin("broker")
BrokerCore = _core.BrokerCore


#: An agent that has not answered this many pings in a row is removed.
MAX_MISSED_PINGS = 6


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
            self.log.warning(msg, *args)
        else:
            self.suppressed += 1


class QueueSnapshot:
    """A ``backend_get_queue`` answer, built a slice at a time.

    With a million jobs waiting, listing them takes seconds; built in one go, that
    would hold back the heartbeat (agents restart after 10 s without a ping).  The
    running jobs (bounded by the agents' slots) are listed at once; the waiting jobs
    are taken at the moment of the request and read a slice per loop turn, skipping
    any that ended meanwhile (their key object is no longer the job's).
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.waiters: list[bytes] = []
        self.running = []
        for job in broker.sched.running_jobs():
            job_id, course_id, task_id, launcher, time_limit = wire.queue_fields(broker.job_frame[job])
            started = int(broker.job_started[job])
            self.running.append((job_id, wire.key_client(broker.job_key[job]),
                                 broker.agent_name[broker.sched.job_agent(job)],
                                 f"{course_id}/{task_id}", launcher, started, started + time_limit))
        self.jobs = broker.sched.waiting_jobs()
        self.keys = [broker.job_key[job] for job in self.jobs]
        self.waiting: list[tuple] = []
        self.position = 0

    def step(self, budget: int) -> bool:
        """Read up to ``budget`` more waiting jobs; True when all are read."""
        job_key, job_frame = self.broker.job_key, self.broker.job_frame
        end = min(self.position + budget, len(self.jobs))
        for job, key in zip(self.jobs[self.position:end], self.keys[self.position:end], strict=True):
            if job_key[job] is key:
                job_id, course_id, task_id, launcher, time_limit = wire.queue_fields(job_frame[job])
                self.waiting.append(
                    (job_id, wire.key_client(key), f"{course_id}/{task_id}", launcher, time_limit))
        self.position = end
        return end == len(self.jobs)

    def frame_for(self, client: bytes) -> bytes:
        # Entries hold the client identity where the answer has is_current_client; plain
        # tuple unpacking keeps this one pass over a million jobs at about 0.2 s.
        running = [(job, owner == client, agent, info, launcher, started, end)
                   for job, owner, agent, info, launcher, started, end in self.running]
        waiting = [(job, owner == client, info, launcher, limit)
                   for job, owner, info, launcher, limit in self.waiting]
        return protocol.get_queue_frame(running, waiting)


class BrokerLogic:
    """The rare half of the INGInious 0.5 backend, shared by both cores.

    Mixed in before a ``BrokerCore`` (``Broker`` below uses the selected one; tests
    build one on each), whose hooks it implements and whose state it uses.
    """

    def __init__(self, agent_socket: zmq.Socket, client_socket: zmq.Socket) -> None:
        super().__init__(agent_socket, client_socket)
        self.agent_name: list[str] = []
        self.agent_envs: list[tuple[str, ...]] = []
        # name -> (id, created, number of live agents offering it); insertion order is
        # the order clients see, as in stock.
        self.environments: dict[str, list] = {}
        self.bad_input = RateLimitedLog(logger)
        self.snapshot: QueueSnapshot | None = None
        self.log_jobs = logger.isEnabledFor(logging.DEBUG)
        self._summary_at = time.monotonic()
        self._summary_done = 0

    # -- logging hooks ------------------------------------------------------------

    def dropped(self, side: str, ident: bytes, reason: str) -> None:
        self.frames_dropped += 1
        self.bad_input.warning("dropped a frame from %s %s: %s", side, ident.hex(), reason)

    def job_event(self, event: str, job: int, agent: int) -> None:
        client, job_id = wire.split_key(self.job_key[job])
        client = client.hex()
        if event == "queued":
            logger.debug("job %s %s queued for environment %s", client, job_id,
                         self.sched.env_name(self.sched.job_env(job)))
        else:
            logger.debug("job %s %s %s agent %s (%s)", client, job_id,
                         "sent to" if event == "sent" else "done on",
                         self.agent_ident[agent].hex(), self.agent_name[agent])

    def internal_error(self, side: str, ident: bytes) -> None:
        self.frames_dropped += 1
        logger.exception("internal error on a frame from %s %s; frame dropped", side, ident.hex())

    def unreachable(self, side: str, ident: bytes) -> None:
        logger.debug("%s %s is gone; a frame for it was dropped", side, ident.hex())
        if side == "client":
            # Its identity will never come back (a reconnecting peer gets a new one).
            self.clients.discard(ident)

    # -- clients ------------------------------------------------------------------

    def client_hello(self, ident: bytes, frame: bytes) -> None:
        logger.info("new client %s", ident.hex())
        self.clients.add(ident)
        self.send_client(ident, protocol.update_containers_frame(tuple(self.environments)))

    def client_get_queue(self, ident: bytes) -> None:
        # Answered once the snapshot is complete; clients asking meanwhile share it.
        if self.snapshot is None:
            self.snapshot = QueueSnapshot(self)
        self.snapshot.waiters.append(ident)

    def background(self, budget: int) -> bool:
        """Advance slow work (the queue snapshot) by ``budget`` jobs; True if some remains."""
        if self.snapshot is None:
            return False
        if not self.snapshot.step(budget):
            return True
        snapshot, self.snapshot = self.snapshot, None
        for client in snapshot.waiters:
            self.send_client(client, snapshot.frame_for(client))
        return False

    def kill_job(self, ident: bytes, job_id: str) -> None:
        """A waiting job ends at once (killed); a running one is killed by its agent,
        whose own ``agent_job_done`` then ends it."""
        job = self.jobs.get(wire.job_key(ident, job_id), -1)
        if job < 0:
            self.dropped("client", ident, f"kill of unknown job {job_id!r}")
            return
        if self.sched.job_state(job) == sched.JOB_WAITING:
            self.sched.cancel(job)
            self.forget_job(job)
            # Stock answers with empty outputs here (and None for a crash).
            self.send_client(ident, protocol.job_done_frame(job_id, "killed", "You killed the job", ""))
        else:
            agent = self.sched.job_agent(job)
            self.send_agent(self.agent_ident[agent], protocol.kill_job_frame(ident, job_id))

    def push_environments(self) -> None:
        frame = protocol.update_containers_frame(tuple(self.environments))
        for client in list(self.clients):
            self.send_client(client, frame)

    # -- agents -------------------------------------------------------------------

    def agent_hello(self, ident: bytes, frame: bytes) -> None:
        try:
            hello = protocol.decode(frame)
            name, slots, containers = self._check_hello(hello)
        except (WireError, ValueError, TypeError) as exc:
            self.dropped("agent", ident, f"bad agent_hello: {exc}")
            return
        logger.info("agent %s (%s) said hello: %d slots, environments %s",
                    ident.hex(), name, slots, ", ".join(containers) or "none")
        if ident in self.agents:
            # Same socket, new hello: the agent restarted and lost its jobs.
            self.remove_agent(self.agents[ident], "said hello again")
        agent = self.sched.add_agent(slots, [self.sched.env_id(env) for env in containers])
        if agent >= len(self.agent_ident):
            grow = agent + 1 - len(self.agent_ident)
            self.agent_ident.extend([None] * grow)
            self.agent_missed.extend([0] * grow)
            self.agent_name.extend([""] * grow)
            self.agent_envs.extend([()] * grow)
        self.agents[ident] = agent
        self.agent_ident[agent] = ident
        self.agent_missed[agent] = 0
        self.agent_name[agent] = name
        self.agent_envs[agent] = tuple(containers)
        for env, info in containers.items():
            self._register_environment(env, info["id"], info["created"], name)
        while (job := self.sched.next_job(agent)) >= 0:
            self.dispatch(job, agent)
        self.push_environments()

    @staticmethod
    def _check_hello(hello: object) -> tuple[str, int, dict]:
        # wire.scan_agent has checked the key set and the top-level field types.
        name = hello["friendly_name"]
        slots = hello["available_job_slots"]
        containers = hello["available_containers"]
        for env, info in containers.items():
            if (not isinstance(env, str) or not isinstance(info, dict) or set(info) != {"id", "created"}
                    or not isinstance(info["id"], str) or not isinstance(info["created"], int)):
                raise ValueError(f"environment {env!r} is not described by {{id: str, created: int}}")
        return name, slots, containers

    def _register_environment(self, env: str, image_id: str, created: int, agent_name: str) -> None:
        known = self.environments.get(env)
        if known is None:
            self.environments[env] = [image_id, created, 1]
            return
        known[2] += 1
        if known[0] != image_id:
            # Same name, another image: the jobs may grade differently depending on
            # the agent that runs them.  Stock keeps the newest as the reference.
            logger.warning("environment %s has several versions: %s (created %d) registered, "
                           "agent %s offers %s (created %d)",
                           env, known[0], known[1], agent_name, image_id, created)
            if created > known[1]:
                known[0], known[1] = image_id, created

    def remove_agent(self, agent: int, why: str) -> None:
        """Forget an agent; each job it was running ends with a crash result."""
        ident = self.agent_ident[agent]
        logger.warning("agent %s (%s) %s: removing it", ident.hex(), self.agent_name[agent], why)
        for job in self.sched.remove_agent(agent):
            client, job_id = wire.split_key(self.job_key[job])
            self.forget_job(job)
            self.send_client(client, protocol.job_done_frame(job_id, "crash", "Agent restarted"))
        del self.agents[ident]
        self.agent_ident[agent] = None
        changed = False
        for env in self.agent_envs[agent]:
            known = self.environments[env]
            known[2] -= 1
            if known[2] == 0:
                del self.environments[env]
                changed = True
        self.agent_envs[agent] = ()
        if changed:
            self.push_environments()

    def heartbeat(self) -> None:
        """Called every second: ping every agent, remove those that stopped answering."""
        for ident, agent in list(self.agents.items()):
            if self.agent_missed[agent] >= MAX_MISSED_PINGS:
                self.remove_agent(agent, f"did not answer {MAX_MISSED_PINGS} pings")
            else:
                self.agent_missed[agent] += 1
                self.send_agent(ident, protocol.PING_FRAME)

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


class Broker(BrokerLogic, BrokerCore):
    """The INGInious 0.5 backend state machine on the selected core, driven by ``server.Backend``."""
