"""The INGInious backend protocol, in its two dialects: what is common, and what a dialect is.

Every message is one ZeroMQ frame holding a msgpack map: the message's fields plus a
*type key* naming the message.  The real peers accept a message only when its key set
is *exactly* the declared fields plus the type key (no key missing, none extra), so the
dialect modules are the single place that says which keys each message has:

* :mod:`.v05` -- INGInious 0.5: ``"type": "client_new_job"``; job ids toward agents are
  ``[client_identity, client_job_id]`` pairs.
* :mod:`.v09` -- INGInious 0.7 to 0.9.2: ``"@type": "ClientNewJob"``; priorities,
  environment types, job ids global across clients.

Both dialects have the same messages *roles* (a client says hello, submits, kills, asks
for the queue, pings; an agent says hello, reports start, result, ssh info, pongs), so
the type codes below are shared: the broker routes by role, and a :class:`Dialect`
supplies the names, the fields, the field kinds the wire scanner checks, the splice
rules for the per-job messages, and encoders for the rare messages the broker writes
itself.  The wire scanners (``wire``) build their tables from these objects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

# Message role codes, shared by both dialects and by the wire scanners of both
# implementations.  0 is never a valid code so that a zeroed scan result reads as "nothing".
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

#: Dialect tags: small ints, used as indices by the compiled code.
V05 = 0
V09 = 1

#: The dialect a frame from a peer not yet known is scanned as first, when the broker
#: serves both: today's INGInious.  A 0.5 peer costs one more scan, on its hello.
FIRST_GUESS = V09

#: The integers msgpack can carry: [INT_MIN, INT_END).
INT_MIN, INT_END = -(1 << 63), 1 << 64

#: Longest frame the broker accepts (archives of a few MiB are normal; a frame
#: this large is a broken or hostile peer).
MAX_FRAME_SIZE = 256 * 1024 * 1024


class WireError(ValueError):
    """A frame that is not a well-formed message of this protocol (both wire implementations raise it)."""


class WrongDialect(WireError):
    """A frame carries the type key of another dialect than the one it was scanned as.

    ``dialect`` is the tag of the dialect whose type key was found.
    """

    def __init__(self, dialect: int) -> None:
        super().__init__(f"frame is in dialect {DIALECTS[dialect].name}")
        self.dialect = dialect


@dataclass(frozen=True)
class Splice:
    """How the broker builds an outgoing per-job frame from an incoming one.

    Every entry of the incoming frame is copied byte for byte, except: the type key's
    value becomes ``out_type``; the fields in ``drop`` are left out; the ``job_id``
    value is rewritten when ``job_id`` says so: ``"pair"`` (the 0.5 client job id
    becomes ``[bin client_identity, job id]``, as 0.5 agents expect), ``"str"`` (the
    0.5 agent's pair becomes the client's job id string again), ``None`` (kept).
    """

    out_type: str
    drop: tuple[str, ...] = ()
    job_id: str | None = None


Fields = tuple[str, ...]


@dataclass(frozen=True)
class Dialect:
    """Everything the broker and the wire scanner need to know about one dialect.

    Message tables map the wire name of each message a peer may send to
    ``(role code, fields in declaration order)``; ``backend_messages`` maps the wire
    name of each message the backend sends to its fields.  ``client_kinds`` /
    ``agent_kinds`` give the kind of the fields the scanner checks (see ``wire``);
    every other field is pass-through.  The encoders write the rare messages.
    """

    tag: int
    name: str
    type_key: str
    client_messages: dict[str, tuple[int, Fields]]
    agent_messages: dict[str, tuple[int, Fields]]
    backend_messages: dict[str, Fields]
    client_kinds: dict[str, str]
    agent_kinds: dict[str, str]
    new_job: Splice
    job_done: Splice
    ssh_debug: Splice
    job_started_type: str
    # Encoders of the frames the broker writes itself.
    encode: Callable[..., bytes]                    # (wire name, **fields), see make_encoder
    ping_frame: bytes
    pong_frame: bytes
    unknown_frame: bytes
    killed_frame: Callable[[str, Any], bytes]       # (job_id, state): a waiting job was killed
    agent_lost_frame: Callable[[str], bytes]        # (job_id): its agent was removed
    duplicate_frame: Callable[[str], bytes] | None  # (job_id): answer to a duplicate id, or None
    environments_frame: Callable[[dict], bytes]     # ({env key: ...} in registration order)
    get_queue_frame: Callable[[list, list], bytes]
    kill_job_frame: Callable[[bytes, str, Any], bytes]  # (client identity, job_id, state)
    # Queue snapshots: the last member of a running job's tuple, from its start time and
    # the job's time value (see wire.queue_fields).
    running_end: Callable[[int, int], int]

    def client_type(self, code: int) -> str:
        """The wire name of the client message with role ``code``."""
        return next(name for name, (c, _f) in self.client_messages.items() if c == code)

    def agent_type(self, code: int) -> str:
        """The wire name of the agent message with role ``code``."""
        return next(name for name, (c, _f) in self.agent_messages.items() if c == code)


def make_encoder(type_key: str, backend_messages: dict[str, Fields]) -> Callable[..., bytes]:
    """``encode(msgtype, **fields)`` for one dialect: checks that exactly the declared fields are given."""

    def encode(msgtype: str, **fields: Any) -> bytes:
        declared = backend_messages[msgtype]
        if set(fields) != set(declared):
            raise TypeError(f"{msgtype} takes exactly {declared}, got {tuple(fields)}")
        fields[type_key] = msgtype
        return msgpack.packb(fields, use_bin_type=True)

    return encode


def decode(frame: bytes) -> Any:
    """Decode a whole frame the way the real peers of both dialects do (rare messages, tests)."""
    return msgpack.unpackb(frame, raw=False, use_list=False, strict_map_key=False)


from . import v05, v09  # noqa: E402  (the dialect modules build Dialect objects)

#: Dialects by tag.
DIALECTS: tuple[Dialect, ...] = (v05.DIALECT, v09.DIALECT)
#: Dialects by name ("0.5", "0.9"), as given to ``fastbackend serve --dialect``.
BY_NAME: dict[str, Dialect] = {d.name: d for d in DIALECTS}
assert all(d.tag == i for i, d in enumerate(DIALECTS))
