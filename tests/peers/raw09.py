"""Raw peers speaking the INGInious 0.9 dialect, on plain (blocking) pyzmq sockets.

What the real 0.9.2 peers cannot send (a duplicate job id from one client, a result forged
by the wrong agent, malformed frames) or cannot show (every message the broker sends, in
order).  A 0.9 message is a msgpack map of the dataclass's fields plus ``"@type":
ClassName``, one frame per message, packed as the 0.9.2 peers pack it
(``use_bin_type=True``) and read as they read it (``use_list=False``: arrays as tuples).
Every receive is bounded by a timeout.  No INGInious import: usable from either test run.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import zmq

from .raw import RawPeer, pack, unpack

__all__ = ["RawAgent09", "RawClient09", "RawPeer09", "assert_serving_09", "job_done", "new_job",
           "pack", "unpack"]


def new_job(job_id: str, environment: str = "default", environment_type: str = "docker",
            **overrides: Any) -> dict[str, Any]:
    """A complete, valid ``ClientNewJob`` message; ``overrides`` replace fields."""
    message = {
        "@type": "ClientNewJob",
        "job_id": job_id,
        "priority": 1,
        "course_id": "course",
        "task_id": "task",
        "task_problems": {"q1": {"type": "code"}},
        "inputdata": {"q1": "print('hello')"},
        "environment_type": environment_type,
        "environment": environment,
        "environment_parameters": {"limits": {"time": 30, "hard_time": 90, "memory": 100}},
        "debug": False,
        "launcher": "raw",
    }
    message.update(overrides)
    return message


def job_done(job_id: str, result: tuple[str, str] = ("success", "ok"), **overrides: Any) -> dict[str, Any]:
    """A complete, valid ``AgentJobDone`` message."""
    message = {
        "@type": "AgentJobDone",
        "job_id": job_id,
        "result": result,
        "grade": 100.0,
        "problems": {},
        "tests": {},
        "custom": {},
        "state": "",
        "archive": None,
        "stdout": "",
        "stderr": "",
    }
    message.update(overrides)
    return message


class RawPeer09(RawPeer):
    """A DEALER socket with bounded, decoding receive helpers (0.9 frames)."""

    TYPE_KEY = "@type"
    HEARTBEATS = ("Pong", "Ping")


class RawClient09(RawPeer09):
    """A 0.9 client made of a raw DEALER socket."""

    def hello(self, name: str = "raw-client-0.9") -> None:
        self.send("ClientHello", name=name)

    def wait_environments(self, *environments: tuple[str, str], timeout: float = 5.0) -> dict[str, Any]:
        """Wait for a ``BackendUpdateEnvironments`` listing all ``(type, name)`` pairs."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv_type("BackendUpdateEnvironments", max(deadline - time.monotonic(), 0.001))
            envs = message["available_environments"]
            if all(name in envs.get(etype, ()) for etype, name in environments):
                return envs

    def new_job(self, job_id: str, environment: str = "default", environment_type: str = "docker",
                **overrides: Any) -> None:
        self.send_message(new_job(job_id, environment, environment_type, **overrides))

    def kill(self, job_id: str) -> None:
        self.send("ClientKillJob", job_id=job_id)


class RawAgent09(RawPeer09):
    """A 0.9 agent made of a raw DEALER socket; it answers pings while it waits."""

    def hello(self, name: str = "raw-agent-0.9", slots: int = 1,
              environments: tuple[tuple[str, str], ...] = (("docker", "default"),)) -> None:
        available: dict[str, dict[str, Any]] = {}
        for etype, name_ in environments:
            available.setdefault(etype, {})[name_] = {"id": f"sha256:{etype}-{name_}", "created": 1}
        self.send("AgentHello", friendly_name=name, available_job_slots=slots,
                  available_environments=available)

    def on_other(self, message: dict[str, Any]) -> None:
        if message.get("@type") == "Ping":
            self.send("Pong")
        self.received.append(message)

    def recv_job(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.recv_type("BackendNewJob", timeout)

    def started(self, job_id: str) -> None:
        self.send("AgentJobStarted", job_id=job_id)

    def done(self, job_id: str, result: tuple[str, str] = ("success", "ok"), **overrides: Any) -> None:
        self.send_message(job_done(job_id, result, **overrides))


def assert_serving_09(ctx: zmq.Context, agent_addr: str, client_addr: str, timeout: float = 10.0) -> None:
    """A fresh raw 0.9 agent and raw 0.9 client run one job end to end through the broker."""
    environment = f"check-{uuid.uuid4().hex[:8]}"
    agent = RawAgent09(ctx, agent_addr)
    client = RawClient09(ctx, client_addr)
    try:
        agent.hello("checker", 1, (("docker", environment),))
        client.hello("checker")
        client.wait_environments(("docker", environment), timeout=timeout)
        job_id = str(uuid.uuid4())
        client.new_job(job_id, environment, inputdata={"check": job_id})
        job = agent.recv_job(timeout)
        assert job["job_id"] == job_id and job["inputdata"] == {"check": job_id}
        agent.started(job_id)
        agent.done(job_id, ("success", "checked"), custom={"check": job_id})
        done = client.recv_type("BackendJobDone", timeout)
        assert done["job_id"] == job_id
        assert done["result"] == ("success", "checked") and done["custom"] == {"check": job_id}
    finally:
        agent.close()
        client.close()
