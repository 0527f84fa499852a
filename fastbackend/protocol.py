"""The INGInious 0.5 backend protocol: message names, their exact fields, and the rare encoders.

Every message is one ZeroMQ frame holding a msgpack map: the message's fields plus
``"type": <name>``.  The real peers accept a message only when its key set is
*exactly* the declared fields plus ``type`` (no key missing, none extra), so this
module is the single place that says which keys each message has.  The wire
scanners and splicers (``wire.py``) and the broker build on these tables.

Strings travel as msgpack ``str``, ``bytes`` as ``bin``, tuples as arrays.  The job id
the backend gives an agent is the 2-array ``[client_identity: bin, client_job_id: str]``;
agents echo it back unchanged.

Only messages that are rare (hello, queue snapshots, environment lists, crash
results) are encoded here with msgpack; the per-job messages are spliced from the
raw bytes of the incoming frame by ``wire``.
"""

from __future__ import annotations

from typing import Any

import msgpack

# Message type codes, shared by the wire scanners of both implementations.
# 0 is never a valid code so that a zeroed scan result reads as "nothing".
CLIENT_HELLO = 1
CLIENT_NEW_JOB = 2
CLIENT_KILL_JOB = 3
CLIENT_GET_QUEUE = 4
PING = 5
PONG = 6
AGENT_HELLO = 7
AGENT_JOB_STARTED = 8
AGENT_JOB_DONE = 9
AGENT_JOB_SSH_DEBUG = 10

#: Messages a client may send, with their fields in declaration order.
CLIENT_MESSAGES: dict[str, tuple[int, tuple[str, ...]]] = {
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

#: Messages an agent may send, with their fields in declaration order.
AGENT_MESSAGES: dict[str, tuple[int, tuple[str, ...]]] = {
    "agent_hello": (AGENT_HELLO, ("friendly_name", "available_job_slots", "available_containers")),
    "agent_job_started": (AGENT_JOB_STARTED, ("job_id",)),
    "agent_job_done": (
        AGENT_JOB_DONE,
        ("job_id", "result", "grade", "problems", "tests", "custom", "archive", "stdout", "stderr"),
    ),
    "agent_job_ssh_debug": (AGENT_JOB_SSH_DEBUG, ("job_id", "host", "port", "password")),
    "pong": (PONG, ()),
}

#: Messages the backend sends, with their fields in declaration order.
BACKEND_MESSAGES: dict[str, tuple[str, ...]] = {
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

class WireError(ValueError):
    """A frame that is not a well-formed message of this protocol (both wire implementations raise it)."""


#: Longest frame the broker accepts (archives of a few MiB are normal; a frame
#: this large is a broken or hostile peer).
MAX_FRAME_SIZE = 256 * 1024 * 1024


def encode(msgtype: str, **fields: Any) -> bytes:
    """Encode a backend message, checking that exactly the declared fields are given."""
    declared = BACKEND_MESSAGES[msgtype]
    if set(fields) != set(declared):
        raise TypeError(f"{msgtype} takes exactly {declared}, got {tuple(fields)}")
    fields["type"] = msgtype
    return msgpack.packb(fields, use_bin_type=True)


def decode(frame: bytes) -> Any:
    """Decode a whole frame the way the real peers do (for rare messages and tests)."""
    return msgpack.unpackb(frame, raw=False, use_list=False, strict_map_key=False)


# Frames that never change, encoded once.
PING_FRAME = encode("ping")
PONG_FRAME = encode("pong")
UNKNOWN_FRAME = encode("unknown")


def job_done_frame(job_id: str, result: str, text: str, output: str | None = None) -> bytes:
    """A ``backend_job_done`` the backend makes itself (killed while waiting, agent lost).

    ``output`` fills stdout and stderr: the stock backend sends ``""`` for a killed job
    and ``None`` for a crashed one, and the clients pass either on to their callbacks.
    """
    return encode(
        "backend_job_done", job_id=job_id, result=(result, text), grade=0.0, problems={},
        tests={}, custom={}, archive=None, stdout=output, stderr=output,
    )


def update_containers_frame(names: list[str] | tuple[str, ...]) -> bytes:
    return encode("backend_update_containers", available_containers=tuple(names))


def get_queue_frame(jobs_running: list[tuple], jobs_waiting: list[tuple]) -> bytes:
    return encode("backend_get_queue", jobs_running=jobs_running, jobs_waiting=jobs_waiting)


def kill_job_frame(client_identity: bytes, job_id: str) -> bytes:
    return encode("backend_kill_job", job_id=(client_identity, job_id))
