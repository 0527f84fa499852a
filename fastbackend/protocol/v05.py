"""Dialect 0.5 (INGInious 0.5): ``"type": <snake_case name>``.

Job ids: a client's ``job_id`` is its own string; toward agents the backend uses the
2-array ``[client_identity: bin, client_job_id: str]``, which agents echo back, so a job
id is only unique per client.  Environments are plain names (``available_containers``).
Limits travel as top-level ints (``time_limit``, ...), which the queue snapshot reports.
"""

from __future__ import annotations

from typing import Any

from . import (
    AGENT_HELLO,
    AGENT_JOB_DONE,
    AGENT_JOB_SSH_DEBUG,
    AGENT_JOB_STARTED,
    CLIENT_GET_QUEUE,
    CLIENT_HELLO,
    CLIENT_KILL_JOB,
    CLIENT_NEW_JOB,
    INT_END,
    INT_MIN,
    PING,
    PONG,
    V05,
    Dialect,
    Splice,
    make_encoder,
)

TYPE_KEY = "type"

#: Messages a client may send: wire name -> (role code, fields in declaration order).
CLIENT_MESSAGES = {
    "client_hello": (CLIENT_HELLO, ("name",)),
    "client_new_job": (
        CLIENT_NEW_JOB,
        (
            "job_id", "course_id", "task_id", "inputdata", "environment", "enable_network",
            "time_limit", "hard_time_limit", "mem_limit", "debug", "launcher",
        ),
    ),
    "client_kill_job": (CLIENT_KILL_JOB, ("job_id",)),
    "client_get_queue": (CLIENT_GET_QUEUE, ()),
    "ping": (PING, ()),
}

#: Messages an agent may send.
AGENT_MESSAGES = {
    "agent_hello": (AGENT_HELLO, ("friendly_name", "available_job_slots", "available_containers")),
    "agent_job_started": (AGENT_JOB_STARTED, ("job_id",)),
    "agent_job_done": (
        AGENT_JOB_DONE,
        ("job_id", "result", "grade", "problems", "tests", "custom", "archive", "stdout", "stderr"),
    ),
    "agent_job_ssh_debug": (AGENT_JOB_SSH_DEBUG, ("job_id", "host", "port", "password")),
    "pong": (PONG, ()),
}

#: Messages the backend sends: wire name -> fields in declaration order.
BACKEND_MESSAGES = {
    # to clients
    "backend_update_containers": ("available_containers",),
    "backend_job_started": ("job_id",),
    "backend_job_done": (
        "job_id", "result", "grade", "problems", "tests", "custom", "archive", "stdout", "stderr",
    ),
    "backend_job_ssh_debug": ("job_id", "host", "port", "password"),
    "backend_get_queue": ("jobs_running", "jobs_waiting"),
    "pong": (),
    "unknown": (),
    # to agents
    "backend_new_job": (
        "job_id", "course_id", "task_id", "inputdata", "environment", "enable_network",
        "time_limit", "hard_time_limit", "mem_limit", "debug",
    ),
    "backend_kill_job": ("job_id",),
    "ping": (),
}

#: Kinds of the fields the scanner checks (see ``wire``); the others are pass-through.
CLIENT_KINDS = {
    "job_id": "str", "course_id": "str", "task_id": "str", "environment": "str", "launcher": "str",
    "time_limit": "int", "hard_time_limit": "int", "mem_limit": "int", "name": "str",
}
AGENT_KINDS = {
    "job_id": "job_pair", "friendly_name": "str", "available_job_slots": "uint",
    "available_containers": "map",
}


_encode = make_encoder(TYPE_KEY, BACKEND_MESSAGES)


def _job_done(job_id: str, result: str, text: str, output: str | None) -> bytes:
    return _encode("backend_job_done", job_id=job_id, result=(result, text), grade=0.0, problems={},
                   tests={}, custom={}, archive=None, stdout=output, stderr=output)


def killed_frame(job_id: str, _state: Any = None) -> bytes:
    """A waiting job killed by its client: stock 0.5 sends empty outputs here."""
    return _job_done(job_id, "killed", "You killed the job", "")


def agent_lost_frame(job_id: str) -> bytes:
    """A running job whose agent was removed: stock 0.5 sends None outputs here."""
    return _job_done(job_id, "crash", "Agent restarted", None)


def environments_frame(environments: dict) -> bytes:
    """``backend_update_containers``: the names, in registration order."""
    return _encode("backend_update_containers", available_containers=tuple(environments))


def get_queue_frame(jobs_running: list, jobs_waiting: list) -> bytes:
    return _encode("backend_get_queue", jobs_running=jobs_running, jobs_waiting=jobs_waiting)


def kill_job_frame(client_identity: bytes, job_id: str, _state: Any = None) -> bytes:
    return _encode("backend_kill_job", job_id=(client_identity, job_id))


def running_end(started: int, time_limit: int) -> int:
    """0.5 reports when a running job's time limit ends.

    A limit near the ends of msgpack's integers would put the sum out of their range, and
    the whole queue answer would fail to encode: such an end is reported as -1.
    """
    end = started + time_limit
    return end if INT_MIN <= end < INT_END else -1


DIALECT = Dialect(
    tag=V05,
    name="0.5",
    type_key=TYPE_KEY,
    client_messages=CLIENT_MESSAGES,
    agent_messages=AGENT_MESSAGES,
    backend_messages=BACKEND_MESSAGES,
    client_kinds=CLIENT_KINDS,
    agent_kinds=AGENT_KINDS,
    new_job=Splice("backend_new_job", drop=("launcher",), job_id="pair"),
    job_done=Splice("backend_job_done", job_id="str"),
    ssh_debug=Splice("backend_job_ssh_debug", job_id="str"),
    job_started_type="backend_job_started",
    encode=_encode,
    ping_frame=_encode("ping"),
    pong_frame=_encode("pong"),
    unknown_frame=_encode("unknown"),
    killed_frame=killed_frame,
    agent_lost_frame=agent_lost_frame,
    duplicate_frame=None,  # 0.5 drops a duplicate with a log line (stock overwrote the first job)
    environments_frame=environments_frame,
    get_queue_frame=get_queue_frame,
    kill_job_frame=kill_job_frame,
    running_end=running_end,
)
