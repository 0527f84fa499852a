"""Dialect 0.9 (INGInious 0.7 to 0.9.2): ``"@type": <ClassName>``.

A message is the map of its dataclass fields plus ``"@type"``.  Differences from 0.5 that
shape the broker:

* job ids are the client's strings everywhere, and global: two clients cannot have a
  job of the same id at once (the second is answered with a crash result);
* ``ClientNewJob`` carries a ``priority`` (lower runs first, then arrival order) and the
  environment is the pair (``environment_type``, ``environment``): ``("mcq", "default")``
  and ``("docker", "default")`` are different environments;
* limits live in ``environment_parameters`` (the queue snapshot reads
  ``["limits"]["time"]``); results and kills carry a ``state``; ssh messages a ``user``;
* agents describe environments as ``{type: {name: {"id", "created", ...}}}`` and
  clients get ``{type: [names]}``.
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
    V09,
    Dialect,
    Splice,
    make_encoder,
)

TYPE_KEY = "@type"

_RESULT_FIELDS = ("job_id", "result", "grade", "problems", "tests", "custom", "state", "archive",
                  "stdout", "stderr")
_SSH_FIELDS = ("job_id", "host", "port", "user", "password")

#: Messages a client may send: wire name -> (role code, fields in declaration order).
CLIENT_MESSAGES = {
    "ClientHello": (CLIENT_HELLO, ("name",)),
    "ClientNewJob": (
        CLIENT_NEW_JOB,
        (
            "job_id", "priority", "course_id", "task_id", "task_problems", "inputdata",
            "environment_type", "environment", "environment_parameters", "debug", "launcher",
        ),
    ),
    "ClientKillJob": (CLIENT_KILL_JOB, ("job_id",)),
    "ClientGetQueue": (CLIENT_GET_QUEUE, ()),
    "Ping": (PING, ()),
}

#: Messages an agent may send.
AGENT_MESSAGES = {
    "AgentHello": (AGENT_HELLO, ("friendly_name", "available_job_slots", "available_environments")),
    "AgentJobStarted": (AGENT_JOB_STARTED, ("job_id",)),
    "AgentJobDone": (AGENT_JOB_DONE, _RESULT_FIELDS),
    "AgentJobSSHDebug": (AGENT_JOB_SSH_DEBUG, _SSH_FIELDS),
    "Pong": (PONG, ()),
}

#: Messages the backend sends: wire name -> fields in declaration order.
BACKEND_MESSAGES = {
    # to clients
    "BackendUpdateEnvironments": ("available_environments",),
    "BackendJobStarted": ("job_id",),
    "BackendJobDone": _RESULT_FIELDS,
    "BackendJobSSHDebug": _SSH_FIELDS,
    "BackendGetQueue": ("jobs_running", "jobs_waiting"),
    "Pong": (),
    "Unknown": (),
    # to agents
    "BackendNewJob": (
        "job_id", "course_id", "task_id", "task_problems", "inputdata", "environment_type",
        "environment", "environment_parameters", "debug",
    ),
    "BackendKillJob": ("job_id", "state"),
    "Ping": (),
}

#: Kinds of the fields the scanner checks (see ``wire``); the others are pass-through.
CLIENT_KINDS = {
    "job_id": "str", "priority": "int", "course_id": "str", "task_id": "str",
    "environment_type": "str", "environment": "str", "launcher": "str", "name": "str",
}
AGENT_KINDS = {
    "job_id": "str", "friendly_name": "str", "available_job_slots": "uint",
    "available_environments": "map",
}

_encode = make_encoder(TYPE_KEY, BACKEND_MESSAGES)


def _job_done(job_id: str, result: str, text: str, state: Any, stdout: str | None) -> bytes:
    # Field values exactly as stock 0.9.2 writes them for results it makes itself: the
    # real client passes them on to the webapp.
    return _encode("BackendJobDone", job_id=job_id, result=(result, text), grade=0.0, problems={},
                   tests={}, custom={}, state=state, archive=None, stdout=stdout, stderr=stdout)


def killed_frame(job_id: str, state: Any) -> bytes:
    """A waiting job killed by a client: the state is the one its input carried."""
    return _job_done(job_id, "killed", "You killed the job", state, "")


def agent_lost_frame(job_id: str) -> bytes:
    """A running job whose agent was removed (stock 0.9.2 sends None outputs here)."""
    return _job_done(job_id, "crash", "Agent restarted", "", None)


def duplicate_frame(job_id: str) -> bytes:
    """The answer to a ClientNewJob whose id is already waiting or running."""
    return _job_done(job_id, "crash", "Duplicate job id", "", "")


def environments_frame(environments: dict) -> bytes:
    """``BackendUpdateEnvironments``: {type: [names]}, both in registration order.

    ``environments`` is keyed by (type, name) pairs.
    """
    by_type: dict[str, list[str]] = {}
    for env_type, name in environments:
        by_type.setdefault(env_type, []).append(name)
    return _encode("BackendUpdateEnvironments", available_environments=by_type)


def get_queue_frame(jobs_running: list, jobs_waiting: list) -> bytes:
    return _encode("BackendGetQueue", jobs_running=jobs_running, jobs_waiting=jobs_waiting)


def kill_job_frame(_client_identity: bytes, job_id: str, state: Any) -> bytes:
    return _encode("BackendKillJob", job_id=job_id, state=state)


def input_state(inputdata: Any) -> Any:
    """The submission state a job's input carries (``inputdata["@state"]``), ``""`` if none."""
    if isinstance(inputdata, dict):
        return inputdata.get("@state", "")
    return ""


def time_estimate(environment_parameters: Any) -> int:
    """``int(environment_parameters["limits"]["time"])``, or -1 where that fails, as stock.

    Stock's answer then fails to encode when the value is beyond msgpack's integers (and
    no client gets a queue listing); here such a value is -1 too.
    """
    try:
        value = int(environment_parameters["limits"]["time"])
    except Exception:  # stock's rule: whatever is there, if int() takes it
        return -1
    return value if INT_MIN <= value < INT_END else -1


def running_end(_started: int, estimate: int) -> int:
    """0.9 reports the time estimate itself as a running job's last member."""
    return estimate


DIALECT = Dialect(
    tag=V09,
    name="0.9",
    type_key=TYPE_KEY,
    client_messages=CLIENT_MESSAGES,
    agent_messages=AGENT_MESSAGES,
    backend_messages=BACKEND_MESSAGES,
    client_kinds=CLIENT_KINDS,
    agent_kinds=AGENT_KINDS,
    new_job=Splice("BackendNewJob", drop=("priority", "launcher")),
    job_done=Splice("BackendJobDone"),
    ssh_debug=Splice("BackendJobSSHDebug"),
    job_started_type="BackendJobStarted",
    encode=_encode,
    ping_frame=_encode("Ping"),
    pong_frame=_encode("Pong"),
    unknown_frame=_encode("Unknown"),
    killed_frame=killed_frame,
    agent_lost_frame=agent_lost_frame,
    duplicate_frame=duplicate_frame,
    environments_frame=environments_frame,
    get_queue_frame=get_queue_frame,
    kill_job_frame=kill_job_frame,
    running_end=running_end,
)
