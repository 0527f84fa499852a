"""Scan incoming frames and splice outgoing ones: the readable (pure-Python) twin of ``_wire_c``.

The wire schema (every msgpack format accepted, every message's fields) is written out
in ``fastbackend/wire.py``, the module the rest of the package imports.  This file and
``_wire_c.pyx`` implement the same algorithm step for step, so that for any input both
return the same result or raise ``WireError`` with the same reason; the tests hold them
to it.

How a frame is read: one pass over the top-level map.  Each key is looked up among the
fields of *any* message of that side (client or agent); each field has one *kind* that
says how its value is checked (a typed field the broker reads, or a pass-through value
that is only skipped).  Only after the pass, once the ``type`` value is known, is the
key set compared with the declared fields of that type.  Pass-through values are skipped
without building objects, iteratively, with an explicit stack bounded by ``MAX_DEPTH``.
"""

from __future__ import annotations

from typing import NamedTuple

from fastbackend import protocol
from fastbackend.protocol import (
    AGENT_JOB_DONE,
    AGENT_JOB_SSH_DEBUG,
    CLIENT_NEW_JOB,
    MAX_FRAME_SIZE,
    WireError,
)

#: Most containers open at once, counting the message's own map as the first.
MAX_DEPTH = 512
#: Most top-level entries a frame may have (no message has more than 12).
MAX_FIELDS = 16

# Field kinds: how the scanner checks a field's value.
#   "any"     pass-through: any well-formed value, skipped;
#   "str"     a str holding valid UTF-8 (the broker turns it into a Python str);
#   "int"     any msgpack integer;
#   "uint"    a msgpack integer >= 0;
#   "map"     a map with well-formed (pass-through) contents;
#   "job_pair" the agent-side job id: a 2-array [bin client_identity (1..255 bytes), str job id].
_CLIENT_TYPED = {
    "job_id": "str", "course_id": "str", "task_id": "str", "environment": "str", "launcher": "str",
    "time_limit": "int", "hard_time_limit": "int", "mem_limit": "int", "name": "str",
}
_AGENT_TYPED = {
    "job_id": "job_pair", "friendly_name": "str", "available_job_slots": "uint",
    "available_containers": "map",
}


def _field_kinds(messages: dict[str, tuple[int, tuple[str, ...]]], typed: dict[str, str]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for _code, fields in messages.values():
        for name in fields:
            kinds.setdefault(name, typed.get(name, "any"))
    return kinds


#: The kind of every field a client may send, in first-declaration order (``_wire_c`` has the same).
CLIENT_FIELD_KINDS: dict[str, str] = _field_kinds(protocol.CLIENT_MESSAGES, _CLIENT_TYPED)
#: The kind of every field an agent may send.
AGENT_FIELD_KINDS: dict[str, str] = _field_kinds(protocol.AGENT_MESSAGES, _AGENT_TYPED)

# Names of the frames the backend builds by splicing.
_BACKEND_NEW_JOB = b"backend_new_job"
_BACKEND_JOB_DONE = b"backend_job_done"
_BACKEND_JOB_SSH_DEBUG = b"backend_job_ssh_debug"
_BACKEND_JOB_STARTED = b"backend_job_started"

_TYPE_GID = -1  # the "type" entry, in field ids and in Entry.field

_NEW_JOB_FIELDS = protocol.CLIENT_MESSAGES["client_new_job"][1]
_NJ_JOB_ID = _NEW_JOB_FIELDS.index("job_id")
_NJ_COURSE_ID = _NEW_JOB_FIELDS.index("course_id")
_NJ_TASK_ID = _NEW_JOB_FIELDS.index("task_id")
_NJ_TIME_LIMIT = _NEW_JOB_FIELDS.index("time_limit")
_NJ_LAUNCHER = _NEW_JOB_FIELDS.index("launcher")
_AG_JOB_ID = 0  # job_id is the first field of agent_job_done and agent_job_ssh_debug
assert protocol.AGENT_MESSAGES["agent_job_done"][1][_AG_JOB_ID] == "job_id"
assert protocol.AGENT_MESSAGES["agent_job_ssh_debug"][1][_AG_JOB_ID] == "job_id"


class _MessageType(NamedTuple):
    code: int
    name: str
    mask: int  # bit gid+1 for each declared field, bit 0 for "type"
    index: dict[int, int]  # field id -> index in this message's declaration order


class _Side:
    """The messages one kind of peer may send, as tables keyed by raw key bytes."""

    def __init__(self, messages: dict[str, tuple[int, tuple[str, ...]]], kinds: dict[str, str]) -> None:
        self.names = list(kinds)  # field id -> name
        self.kinds = [kinds[name] for name in self.names]
        self.ids = {name.encode(): gid for gid, name in enumerate(self.names)}
        self.types = {}
        for msgname, (code, fields) in messages.items():
            mask = 1
            for name in fields:
                mask |= 1 << (self.ids[name.encode()] + 1)
            index = {self.ids[name.encode()]: i for i, name in enumerate(fields)}
            self.types[msgname.encode()] = _MessageType(code, msgname, mask, index)


_CLIENT = _Side(protocol.CLIENT_MESSAGES, CLIENT_FIELD_KINDS)
_AGENT = _Side(protocol.AGENT_MESSAGES, AGENT_FIELD_KINDS)


class _Scan(NamedTuple):
    """What a scan found; offsets index the frame."""

    code: int
    entries: list[tuple[int, int, int, int]]  # (key_start, val_start, val_end, field), frame order
    job_id: tuple[int, int] | None  # (start, length) of the job id's UTF-8 bytes
    ident: tuple[int, int] | None  # (start, length) of the client identity (agent side)
    env: tuple[int, int] | None  # (start, length) of the environment's UTF-8 bytes


def _show(raw: bytes) -> str:
    """A key or type name as it appears in a reason: quoted, undecodable bytes escaped, bounded."""
    text = raw[:40].decode("utf-8", "backslashreplace")
    return repr(text + "..." if len(raw) > 40 else text)


def _truncated() -> WireError:
    return WireError("truncated frame")


# -- reading msgpack headers ----------------------------------------------------------
#
# Each reader takes the frame, a position and the frame length; it returns the
# position after what it read.  "Truncated" is reported as soon as a header or a
# payload would run past the end, before any other check on it.

def _uint(buf: bytes, pos: int, size: int, n: int) -> int:
    """A big-endian unsigned integer of ``size`` bytes at ``pos``."""
    if size > n - pos:
        raise _truncated()
    return int.from_bytes(buf[pos:pos + size], "big")


# Lead bytes 0xc0..0xdf: (what, size).  what: "fixed" (size payload bytes follow),
# "raw" (a size-byte length, then that many bytes: str and bin), "ext" (a size-byte
# length, a type byte, then the data), "fixext" (a type byte and size data bytes),
# "array"/"map" (a size-byte count), "bad" (0xc1, never used).
_LEAD = {
    0xC0: ("fixed", 0), 0xC1: ("bad", 0), 0xC2: ("fixed", 0), 0xC3: ("fixed", 0),
    0xC4: ("raw", 1), 0xC5: ("raw", 2), 0xC6: ("raw", 4),
    0xC7: ("ext", 1), 0xC8: ("ext", 2), 0xC9: ("ext", 4),
    0xCA: ("fixed", 4), 0xCB: ("fixed", 8),
    0xCC: ("fixed", 1), 0xCD: ("fixed", 2), 0xCE: ("fixed", 4), 0xCF: ("fixed", 8),
    0xD0: ("fixed", 1), 0xD1: ("fixed", 2), 0xD2: ("fixed", 4), 0xD3: ("fixed", 8),
    0xD4: ("fixext", 1), 0xD5: ("fixext", 2), 0xD6: ("fixext", 4), 0xD7: ("fixext", 8),
    0xD8: ("fixext", 16),
    0xD9: ("raw", 1), 0xDA: ("raw", 2), 0xDB: ("raw", 4),
    0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4),
}


def _skip(buf: bytes, pos: int, n: int, depth: int) -> int:
    """Skip one well-formed value at ``pos``; ``depth`` containers are already open around it.

    Iterative: ``left`` counts the values still to skip in the innermost open
    container, ``stack`` the counts of the enclosing ones.
    """
    stack: list[int] = []
    left = 1
    while True:
        if pos >= n:
            raise _truncated()
        lead = buf[pos]
        pos += 1
        items = -1  # >= 0 when the value is a container
        if lead <= 0x7F or lead >= 0xE0:
            pass
        elif lead <= 0x8F:
            items = 2 * (lead & 0x0F)
        elif lead <= 0x9F:
            items = lead & 0x0F
        elif lead <= 0xBF:
            size = lead & 0x1F
            if size > n - pos:
                raise _truncated()
            pos += size
        else:
            what, size = _LEAD[lead]
            if what == "fixed":
                if size > n - pos:
                    raise _truncated()
                pos += size
            elif what == "raw":
                length = _uint(buf, pos, size, n)
                pos += size
                if length > n - pos:
                    raise _truncated()
                pos += length
            elif what == "ext":
                length = _uint(buf, pos, size, n) + 1  # + the ext type byte
                pos += size
                if length > n - pos:
                    raise _truncated()
                pos += length
            elif what == "fixext":
                if size + 1 > n - pos:
                    raise _truncated()
                pos += size + 1
            elif what == "array":
                items = _uint(buf, pos, size, n)
                pos += size
            elif what == "map":
                items = 2 * _uint(buf, pos, size, n)
                pos += size
            else:
                raise WireError(f"invalid msgpack byte 0x{lead:02x}")
        if items >= 0:
            if depth + len(stack) + 1 > MAX_DEPTH:
                raise WireError("nesting too deep")
            # Every item takes at least one byte: a count beyond the bytes left is a
            # truncated (or hostile) frame, refused before anything is skipped.
            if items > n - pos:
                raise _truncated()
            if items:
                stack.append(left - 1)
                left = items
                continue
        left -= 1
        while left == 0:
            if not stack:
                return pos
            left = stack.pop()


def _str(buf: bytes, pos: int, n: int) -> tuple[int, int] | None:
    """The (start, length) of the str payload at ``pos``, or None if the value is not a str."""
    if pos >= n:
        raise _truncated()
    lead = buf[pos]
    if 0xA0 <= lead <= 0xBF:
        start, length = pos + 1, lead & 0x1F
    elif 0xD9 <= lead <= 0xDB:
        size = 1 << (lead - 0xD9)
        length = _uint(buf, pos + 1, size, n)
        start = pos + 1 + size
    else:
        return None
    if length > n - start:
        raise _truncated()
    return start, length


def _int(buf: bytes, pos: int, n: int) -> tuple[int, int] | None:
    """(value, end) of the integer at ``pos``, or None if the value is not an integer."""
    if pos >= n:
        raise _truncated()
    lead = buf[pos]
    if lead <= 0x7F:
        return lead, pos + 1
    if lead >= 0xE0:
        return lead - 0x100, pos + 1
    if 0xCC <= lead <= 0xD3:
        size = 1 << ((lead - 0xCC) & 3)
        if size > n - pos - 1:
            raise _truncated()
        value = int.from_bytes(buf[pos + 1:pos + 1 + size], "big", signed=lead >= 0xD0)
        return value, pos + 1 + size
    return None


def _utf8(buf: bytes, start: int, length: int, name: str) -> None:
    try:
        buf[start:start + length].decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"{name} is not valid UTF-8") from None


def _job_pair(buf: bytes, pos: int, n: int) -> tuple[int, int, int, int, int]:
    """Check the agent-side job id at ``pos``: (ident start, ident length, id start, id length, end)."""
    bad = "job_id must be [bin, str]"
    if pos >= n:
        raise _truncated()
    lead = buf[pos]
    if 0x90 <= lead <= 0x9F:
        count, pos = lead & 0x0F, pos + 1
    elif lead in (0xDC, 0xDD):
        size = 2 if lead == 0xDC else 4
        count, pos = _uint(buf, pos + 1, size, n), pos + 1 + size
    else:
        raise WireError(bad)
    if count != 2:
        raise WireError(bad)
    if pos >= n:
        raise _truncated()
    lead = buf[pos]
    if not 0xC4 <= lead <= 0xC6:
        raise WireError(bad)
    size = 1 << (lead - 0xC4)
    ident_len = _uint(buf, pos + 1, size, n)
    ident_start = pos + 1 + size
    if ident_len > n - ident_start:
        raise _truncated()
    if not 1 <= ident_len <= 255:
        raise WireError("client identity must be 1..255 bytes")
    found = _str(buf, ident_start + ident_len, n)
    if found is None:
        raise WireError(bad)
    start, length = found
    _utf8(buf, start, length, "job_id")
    return ident_start, ident_len, start, length, start + length


def _scan(buf: bytes, side: _Side) -> _Scan:
    """Check a whole frame against one side's messages and find the spans the broker needs."""
    n = len(buf)
    if n > MAX_FRAME_SIZE:
        raise WireError("frame too large")
    if n < 1:
        raise _truncated()
    lead = buf[0]
    if 0x80 <= lead <= 0x8F:
        count, pos = lead & 0x0F, 1
    elif lead in (0xDE, 0xDF):
        size = 2 if lead == 0xDE else 4
        count, pos = _uint(buf, 1, size, n), 1 + size
    else:
        raise WireError("not a map")
    if count > MAX_FIELDS:
        raise WireError("too many keys")

    seen = 0
    entries = []
    type_span = job_id = ident = env = None
    for _ in range(count):
        key_start = pos
        found = _str(buf, pos, n)
        if found is None:
            raise WireError("non-str key")
        start, length = found
        key = buf[start:start + length]
        pos = start + length
        gid = side.ids.get(key)
        if gid is None:
            if key != b"type":
                raise WireError(f"unexpected key {_show(key)}")
            gid = _TYPE_GID
        bit = 1 << (gid + 1)
        if seen & bit:
            raise WireError(f"duplicate key {_show(key)}")
        seen |= bit
        val_start = pos
        if gid == _TYPE_GID:
            type_span = _str(buf, pos, n)
            if type_span is None:
                raise WireError("type must be a str")
            pos = type_span[0] + type_span[1]
        else:
            name = side.names[gid]
            kind = side.kinds[gid]
            if kind == "any":
                pos = _skip(buf, pos, n, 1)
            elif kind == "str":
                found = _str(buf, pos, n)
                if found is None:
                    raise WireError(f"{name} must be a str")
                _utf8(buf, found[0], found[1], name)
                pos = found[0] + found[1]
                if name == "job_id":
                    job_id = found
                elif name == "environment":
                    env = found
            elif kind in ("int", "uint"):
                found = _int(buf, pos, n)
                if found is None:
                    raise WireError(f"{name} must be an int")
                if kind == "uint" and found[0] < 0:
                    raise WireError(f"{name} must be >= 0")
                pos = found[1]
            elif kind == "map":
                if pos >= n:
                    raise _truncated()
                lead = buf[pos]
                if not (0x80 <= lead <= 0x8F or lead in (0xDE, 0xDF)):
                    raise WireError(f"{name} must be a map")
                pos = _skip(buf, pos, n, 1)
            else:  # "job_pair"
                ident_start, ident_len, start, length, pos = _job_pair(buf, pos, n)
                ident = (ident_start, ident_len)
                job_id = (start, length)
        entries.append((key_start, val_start, pos, gid))
    if pos != n:
        raise WireError("trailing bytes after message")

    if type_span is None:
        raise WireError("missing key 'type'")
    msgtype = side.types.get(buf[type_span[0]:type_span[0] + type_span[1]])
    if msgtype is None:
        raise WireError(f"unknown message type {_show(buf[type_span[0]:type_span[0] + type_span[1]])}")
    extra = seen & ~msgtype.mask
    if extra:
        gid = (extra & -extra).bit_length() - 2
        raise WireError(f"unexpected key {side.names[gid]!r} for {msgtype.name}")
    missing = msgtype.mask & ~seen
    if missing:
        gid = (missing & -missing).bit_length() - 2
        raise WireError(f"missing key {side.names[gid]!r} for {msgtype.name}")
    entries = [
        (k, v, e, -1 if gid == _TYPE_GID else msgtype.index[gid]) for (k, v, e, gid) in entries
    ]
    return _Scan(msgtype.code, entries, job_id, ident, env)


def _text(buf: bytes, span: tuple[int, int] | None) -> str | None:
    if span is None:
        return None
    return buf[span[0]:span[0] + span[1]].decode("utf-8")


# -- writing msgpack headers (always the shortest form) ------------------------------

def _map_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x80 | count,))
    if count < 0x10000:
        return b"\xde" + count.to_bytes(2, "big")
    return b"\xdf" + count.to_bytes(4, "big")


def _str_header(length: int) -> bytes:
    if length < 32:
        return bytes((0xA0 | length,))
    if length < 0x100:
        return b"\xd9" + bytes((length,))
    if length < 0x10000:
        return b"\xda" + length.to_bytes(2, "big")
    return b"\xdb" + length.to_bytes(4, "big")


def _bin_header(length: int) -> bytes:
    if length < 0x100:
        return b"\xc4" + bytes((length,))
    if length < 0x10000:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def _splice(buf: bytes, scan: _Scan, count: int, type_name: bytes, job_id_value: bytes, drop: int) -> bytes:
    """Rebuild a frame: ``type`` and ``job_id`` values replaced, entry ``drop`` removed.

    Entries are contiguous in the frame, so the untouched ones between two changed
    entries are copied as one span.
    """
    out = [_map_header(count)]
    run = scan.entries[0][0] if scan.entries else len(buf)
    for key_start, val_start, val_end, field in scan.entries:
        if field == -1:
            out += (buf[run:key_start], buf[key_start:val_start], _str_header(len(type_name)), type_name)
        elif field == 0:  # job_id: the first field of every spliced message
            out += (buf[run:key_start], buf[key_start:val_start], job_id_value)
        elif field == drop:
            out.append(buf[run:key_start])
        else:
            continue
        run = val_end
    out.append(buf[run:scan.entries[-1][2]] if scan.entries else b"")
    return b"".join(out)


# -- the API --------------------------------------------------------------------------

def scan_client(frame: bytes) -> tuple[int, str | None, str | None]:
    """Check a client frame: (type code, job_id, environment).

    job_id is set for client_new_job and client_kill_job, environment for
    client_new_job; both are None otherwise.  Raises WireError.
    """
    scan = _scan(frame, _CLIENT)
    return scan.code, _text(frame, scan.job_id), _text(frame, scan.env)


def queue_fields(frame: bytes) -> tuple[str, str, str, str, int]:
    """For a client_new_job frame: (job_id, course_id, task_id, launcher, time_limit)."""
    scan = _scan(frame, _CLIENT)
    if scan.code != CLIENT_NEW_JOB:
        raise WireError("not a client_new_job")
    values: dict[int, int] = {field: val_start for (_k, val_start, _e, field) in scan.entries}
    course_id = _text(frame, _str(frame, values[_NJ_COURSE_ID], len(frame)))
    task_id = _text(frame, _str(frame, values[_NJ_TASK_ID], len(frame)))
    launcher = _text(frame, _str(frame, values[_NJ_LAUNCHER], len(frame)))
    time_limit = _int(frame, values[_NJ_TIME_LIMIT], len(frame))[0]
    return _text(frame, scan.job_id), course_id, task_id, launcher, time_limit


def splice_new_job(frame: bytes, client_identity: bytes) -> bytes:
    """client_new_job frame -> backend_new_job frame.

    ``type`` is replaced, ``job_id`` becomes ``[bin client_identity, str job_id]``,
    ``launcher`` is removed; every other entry is copied byte for byte.
    """
    if not 1 <= len(client_identity) <= 255:
        raise WireError("client identity must be 1..255 bytes")
    scan = _scan(frame, _CLIENT)
    if scan.code != CLIENT_NEW_JOB:
        raise WireError("not a client_new_job")
    job_id_value = None
    for _key_start, val_start, val_end, field in scan.entries:
        if field == _NJ_JOB_ID:
            # The client's job id keeps its own encoding, header included.
            job_id_value = b"".join(
                (b"\x92", _bin_header(len(client_identity)), client_identity, frame[val_start:val_end])
            )
    return _splice(frame, scan, len(scan.entries) - 1, _BACKEND_NEW_JOB, job_id_value, _NJ_LAUNCHER)


def scan_agent(frame: bytes) -> tuple[int, bytes | None, str | None]:
    """Check an agent frame: (type code, client_identity, client_job_id).

    The last two are the parts of the job id 2-array of agent_job_started,
    agent_job_done and agent_job_ssh_debug; None for agent_hello and pong.
    Raises WireError.
    """
    scan = _scan(frame, _AGENT)
    ident = None if scan.ident is None else frame[scan.ident[0]:scan.ident[0] + scan.ident[1]]
    return scan.code, ident, _text(frame, scan.job_id)


def _agent_to_client(frame: bytes, code: int, type_name: bytes, what: str) -> bytes:
    scan = _scan(frame, _AGENT)
    if scan.code != code:
        raise WireError(f"not an {what}")
    start, length = scan.job_id
    job_id_value = _str_header(length) + frame[start:start + length]
    return _splice(frame, scan, len(scan.entries), type_name, job_id_value, -2)


def splice_job_done(frame: bytes) -> bytes:
    """agent_job_done -> backend_job_done: type replaced, job_id replaced by the client's str job id."""
    return _agent_to_client(frame, AGENT_JOB_DONE, _BACKEND_JOB_DONE, "agent_job_done")


def splice_ssh_debug(frame: bytes) -> bytes:
    """agent_job_ssh_debug -> backend_job_ssh_debug: type replaced, job_id replaced by the client's."""
    return _agent_to_client(frame, AGENT_JOB_SSH_DEBUG, _BACKEND_JOB_SSH_DEBUG, "agent_job_ssh_debug")


def job_started(job_id: str) -> bytes:
    """Encode backend_job_started(job_id)."""
    raw = job_id.encode("utf-8")
    return (
        b"\x82\xa4type" + _str_header(len(_BACKEND_JOB_STARTED)) + _BACKEND_JOB_STARTED
        + b"\xa6job_id" + _str_header(len(raw)) + raw
    )


def job_key(client_identity: bytes, job_id: str) -> bytes:
    """The broker's dictionary key for a job: identity length byte, identity, UTF-8 job id.

    ZeroMQ identities are 1..255 bytes, so the length fits one byte and the key is
    unambiguous.  Raises WireError for any other identity length.
    """
    if not 1 <= len(client_identity) <= 255:
        raise WireError("client identity must be 1..255 bytes")
    return bytes((len(client_identity),)) + client_identity + job_id.encode("utf-8")
