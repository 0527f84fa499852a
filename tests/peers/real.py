"""The REAL INGInious 0.5 client and agent, driven by tests on the test's asyncio loop.

* :class:`ScriptedAgent` subclasses the real ``inginious.agent.Agent`` and implements only
  what a concrete agent must (``environments``, ``new_job``, ``kill_job``); how it answers
  each job is a *behaviour* chosen by the test (finish at once, wait until killed, send ssh
  info, crash, ...).  It records what it saw: jobs, concurrency, kill requests, pings.
* The client is ``inginious.client.client.Client`` itself, unmodified.  Its ``new_job``
  needs a task object: :class:`FakeTask` provides the five methods it calls.
* :class:`Peers` owns one ``zmq.asyncio.Context`` and every peer a test starts, and stops
  them all at the end.

Every wait is bounded; the real classes run exactly as in an INGInious 0.5 deployment
(through :mod:`peers.msgpack_compat`, which is installed when this package is imported).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import zmq
import zmq.asyncio
from inginious.agent import Agent
from inginious.client.client import Client
from inginious.common.message_meta import ZMQUtils
from inginious.common.messages import AgentHello, AgentJobSSHDebug, AgentJobStarted, BackendNewJob

from .real_common import FakeTaskFolder, wait_until
from .real_common import run as run  # re-exported: the tests import it from here

Behaviour = Callable[["ScriptedAgent", BackendNewJob], Awaitable[None]]


# -- the task the real client needs ----------------------------------------------------------
@dataclass
class FakeTask:
    """What ``Client.new_job`` reads from an INGInious task, and nothing more."""

    environment: str = "default"
    course_id: str = "course"
    task_id: str = "task"
    network: bool = False
    limits: dict[str, int] = field(default_factory=lambda: {"time": 30, "hard_time": 90, "memory": 100})

    def get_environment(self) -> str:
        return self.environment

    def get_course_id(self) -> str:
        return self.course_id

    def get_id(self) -> str:
        return self.task_id

    def allow_network_access_grading(self) -> bool:
        return self.network

    def get_limits(self) -> dict[str, int]:
        return self.limits


# -- the agent -------------------------------------------------------------------------------
class ScriptedAgent(Agent):
    """A real INGInious 0.5 agent whose answer to each job is a test-chosen behaviour."""

    def __init__(self, context: zmq.asyncio.Context, backend_addr: str, name: str, slots: int,
                 environments: Iterable[str], behaviour: Behaviour) -> None:
        super().__init__(context, backend_addr, name, slots, FakeTaskFolder())
        self.name = name
        self.slots = slots
        self.behaviour = behaviour
        self._environments = {env: {"id": f"sha256:{env}", "created": 1} for env in environments}
        self.jobs: list[BackendNewJob] = []
        self.running: set[tuple[bytes, str]] = set()
        self.max_running = 0
        self.kill_requests: list[tuple[bytes, str]] = []
        self.ping_times: list[float] = []
        self.task: asyncio.Task | None = None
        self.closing = False
        self._kill_events: dict[tuple[bytes, str], asyncio.Event] = {}

    @property
    def environments(self) -> dict[str, dict[str, Any]]:
        return self._environments

    @property
    def socket(self) -> zmq.asyncio.Socket:
        """The real agent's (private) backend socket, for messages a misbehaving agent sends."""
        return self._Agent__backend_socket

    async def new_job(self, message: BackendNewJob) -> None:
        self.jobs.append(message)
        self.running.add(message.job_id)
        self.max_running = max(self.max_running, len(self.running))
        try:
            await self.behaviour(self, message)
        except BaseException:
            # The real Agent answers an exception with a crash result of its own.
            self.running.discard(message.job_id)
            raise

    async def kill_job(self, message: Any) -> None:
        self.kill_requests.append(message.job_id)
        self._kill_events.setdefault(message.job_id, asyncio.Event()).set()

    async def _Agent__handle_ping(self, message: Any) -> None:  # noqa: N802 - overrides Agent.__handle_ping
        # The real Agent dispatches pings to its private handler; record when each came.
        self.ping_times.append(time.monotonic())
        await Agent._Agent__handle_ping(self, message)

    # helpers for behaviours and tests
    def ping_gaps(self) -> list[float]:
        """Seconds between consecutive pings received."""
        times = self.ping_times
        return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]

    async def finish(self, job_id: tuple[bytes, str], result: str = "success", text: str = "",
                     **fields: Any) -> None:
        """Send this job's result through the real ``Agent.send_job_result``."""
        self.running.discard(job_id)
        await self.send_job_result(job_id, result, text, **fields)

    async def wait_killed(self, job_id: tuple[bytes, str]) -> None:
        await self._kill_events.setdefault(job_id, asyncio.Event()).wait()

    async def say_hello_again(self) -> None:
        """Send agent_hello again from the same socket, as an agent that restarted would."""
        await ZMQUtils.send(self.socket, AgentHello(self.name, self.slots, self.environments))

    def start(self) -> ScriptedAgent:
        self.task = asyncio.ensure_future(self.run())
        return self

    def stop_answering(self) -> None:
        """Freeze the agent: it stops reading its socket (so answers no ping) but stays connected."""
        assert self.task is not None
        self.task.cancel()

    async def send_job_result(self, job_id: Any, *args: Any, **kwargs: Any) -> None:
        if self.closing:
            # The real Agent answers the cancellation of a running job with a crash result;
            # at the end of a test that would be a stray message for a job the broker
            # already finished (stock logs a traceback for it).  Say nothing instead.
            return
        await super().send_job_result(job_id, *args, **kwargs)

    def cancel(self) -> None:
        """Cancel the agent's listening task and its per-message tasks (jobs still running),
        silently: jobs cancelled this way send no result."""
        self.closing = True
        if self.task is not None:
            self.task.cancel()
        self._Agent__cancel_remaining_safe_tasks()

    def close(self) -> None:
        self.cancel()
        self.socket.close(linger=0)


# -- behaviours -------------------------------------------------------------------------------
def finish(result: str = "success", text: str = "ok", delay: float | Callable[[], float] = 0.0,
           fields: Callable[[BackendNewJob], dict[str, Any]] | dict[str, Any] | None = None) -> Behaviour:
    """Finish each job (after ``delay`` seconds) with the given result and extra result fields."""

    async def behaviour(agent: ScriptedAgent, message: BackendNewJob) -> None:
        wait = delay() if callable(delay) else delay
        if wait:
            await asyncio.sleep(wait)
        extra = fields(message) if callable(fields) else dict(fields or {})
        await agent.finish(message.job_id, result, text, **extra)

    return behaviour


def echo(delay: float | Callable[[], float] = 0.0) -> Behaviour:
    """Finish each job with its own input echoed in ``custom``, so a client can tell results apart."""
    return finish("success", "echo", delay, lambda m: {
        "custom": {"inputdata": m.inputdata, "environment": m.environment,
                   "course_task": f"{m.course_id}/{m.task_id}"},
    })


def hold(result: str = "killed", text: str = "killed by the agent", **fields: Any) -> Behaviour:
    """Keep each job running until the backend asks to kill it, then finish it with this result."""

    async def behaviour(agent: ScriptedAgent, message: BackendNewJob) -> None:
        await agent.wait_killed(message.job_id)
        await agent.finish(message.job_id, result, text, **fields)

    return behaviour


def ssh_then_hold(host: str, port: int, password: str) -> Behaviour:
    """Announce an ssh debug session, then run until killed."""

    async def behaviour(agent: ScriptedAgent, message: BackendNewJob) -> None:
        await agent.send_ssh_job_info(message.job_id, host, port, password)
        await agent.wait_killed(message.job_id)
        await agent.finish(message.job_id, "killed", "ssh session ended")

    return behaviour


def crash() -> Behaviour:
    """Fail inside ``new_job``: the real Agent then sends its own crash result."""

    async def behaviour(agent: ScriptedAgent, message: BackendNewJob) -> None:
        raise RuntimeError("scripted agent failure (expected by the test)")

    return behaviour


def finish_then_stray() -> Behaviour:
    """Finish the job, then (wrongly) send agent_job_started and agent_job_ssh_debug for it."""

    async def behaviour(agent: ScriptedAgent, message: BackendNewJob) -> None:
        await agent.finish(message.job_id, "success", "done before the strays")
        await ZMQUtils.send(agent.socket, AgentJobStarted(message.job_id))
        await ZMQUtils.send(agent.socket, AgentJobSSHDebug(message.job_id, "stray.example", 2222, "late"))

    return behaviour


# -- the client side ------------------------------------------------------------------------
class JobResult(NamedTuple):
    """The arguments the real client passes to a job's callback."""

    result: tuple[str, str]
    grade: float
    problems: dict
    tests: dict
    custom: dict
    archive: bytes | None
    stdout: str | None
    stderr: str | None


class JobHandle:
    """One job submitted through the real client: its callback calls and ssh callback calls."""

    def __init__(self, loop: asyncio.AbstractEventLoop, inputdata: Any) -> None:
        self.loop = loop
        self.inputdata = inputdata
        self.job_id: str | None = None
        self.calls: list[JobResult] = []
        self.ssh_calls: list[tuple[Any, Any, Any]] = []
        self.done: asyncio.Future[JobResult] = loop.create_future()
        self.ssh: asyncio.Future[tuple[Any, Any, Any]] = loop.create_future()

    def callback(self, *args: Any) -> None:
        # The client calls this on its loop (or synchronously inside new_job).
        self.calls.append(JobResult(*args))
        if not self.done.done():
            self.done.set_result(self.calls[0])

    def ssh_callback(self, host: Any, port: Any, password: Any) -> None:
        # The client calls this in a thread of the loop's default executor.
        self.ssh_calls.append((host, port, password))
        self.loop.call_soon_threadsafe(self._set_ssh, (host, port, password))

    def _set_ssh(self, value: tuple[Any, Any, Any]) -> None:
        if not self.ssh.done():
            self.ssh.set_result(value)

    async def result(self, timeout: float = 10.0) -> JobResult:
        return await asyncio.wait_for(asyncio.shield(self.done), timeout)


class Peers:
    """Owns a ``zmq.asyncio.Context`` and the real peers a test starts; closes them all at exit."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.ctx = zmq.asyncio.Context()
        self.clients: list[Client] = []
        self.agents: list[ScriptedAgent] = []
        self.jobs: list[JobHandle] = []

    async def __aenter__(self) -> Peers:
        return self

    async def __aexit__(self, exc_type: Any, *_: Any) -> None:
        for agent in self.agents:
            agent.cancel()
        for client in self.clients:
            stop_client(client)
        # Let the cancelled tasks unwind before their sockets go away.
        for _ in range(3):
            await asyncio.sleep(0)
        for agent in self.agents:
            agent.socket.close(linger=0)
        self.ctx.destroy(linger=0)
        if exc_type is None:
            for job in self.jobs:
                assert len(job.calls) <= 1, f"job {job.job_id} got {len(job.calls)} results: {job.calls}"

    def agent(self, name: str = "agent", slots: int = 1, environments: Iterable[str] = ("default",),
              behaviour: Behaviour | None = None) -> ScriptedAgent:
        """Start a real agent (its ``run()`` as a task on this loop)."""
        agent = ScriptedAgent(self.ctx, self.broker.agent_addr, name, slots, environments,
                              behaviour or finish())
        self.agents.append(agent)
        return agent.start()

    def client(self, queue_update: int = 10) -> Client:
        """Start a real client; it says hello and pings on its own."""
        client = Client(self.ctx, self.broker.client_addr, queue_update)
        self.clients.append(client)
        client.start()
        return client

    async def ready_client(self, *environments: str, queue_update: int = 10, timeout: float = 10.0) -> Client:
        """A started client that has received a container list with all ``environments``."""
        client = self.client(queue_update)
        await wait_containers(client, *environments, timeout=timeout)
        return client

    def submit(self, client: Client, task: FakeTask | str = "default", inputdata: Any = None,
               launcher: str = "test", debug: bool | str = False, ssh: bool = False) -> JobHandle:
        """``client.new_job(...)`` with a recording callback; returns the job's handle."""
        if isinstance(task, str):
            task = FakeTask(environment=task)
        handle = JobHandle(asyncio.get_running_loop(), inputdata if inputdata is not None else {})
        handle.job_id = client.new_job(task, handle.inputdata, handle.callback, launcher, debug,
                                       handle.ssh_callback if ssh else None)
        self.jobs.append(handle)
        return handle

    async def run_job(self, client: Client, task: FakeTask | str = "default", timeout: float = 10.0,
                      **kwargs: Any) -> JobResult:
        """Submit one job and wait for its result."""
        return await self.submit(client, task, **kwargs).result(timeout)


async def wait_containers(client: Client, *environments: str, timeout: float = 10.0) -> tuple[str, ...]:
    """Wait until the client's container list (pushed by the backend) holds all ``environments``."""
    await wait_until(lambda: set(environments) <= set(client.get_available_containers()),
                     timeout, f"client containers {environments}")
    return tuple(client.get_available_containers())


def stop_client(client: Client) -> None:
    """Stop a real client: the class has no working close(), so cancel its tasks (the socket
    goes with the context)."""
    for task in client._restartable_tasks:
        task.cancel()
