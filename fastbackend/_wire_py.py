"""Scan incoming frames and splice outgoing ones: the readable (pure-Python) twin of ``_wire_c``.

The wire schema (every msgpack format accepted, every message's fields) is written out
in ``fastbackend/wire.py``, the module the rest of the package imports.  This file and
``_wire_c.pyx`` implement the same algorithm step for step, so that for any input both
return the same result or raise ``WireError`` with the same reason; the tests hold them
to it.

How a frame is read: one pass over the top-level map, with the tables of one side
(client or agent) of one dialect.  Each key is looked up among the fields of *any*
message of that side; each field has one *kind* that says how its value is checked (a
typed field the broker reads, or a pass-through value that is only skipped).  Only after
the pass, once the type key's value is known, is the key set compared with the declared
fields of that type.  A key that is no field of the side but another dialect's type key
(``type`` / ``@type``) means the frame is in that dialect: ``WrongDialect`` says which,
and the caller may scan it again with those tables.  Pass-through values are skipped
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
    V05,
    V09,
    Dialect,
    WireError,
    WrongDialect,
)

#: Most containers open at once, counting the message's own map as the first.
MAX_DEPTH = 512
#: Most top-level entries a frame may have (no message has more than 12).
MAX_FIELDS = 16
#: A priority beyond int64 is served as the largest one (the scheduler keeps int64).
PRIORITY_MAX = (1 << 63) - 1

# Field kinds: how the scanner checks a field's value (a dialect's ``*_kinds`` tables
# name the typed fields; every other field is "any").
#   "any"     pass-through: any well-formed value, skipped;
#   "str"     a str holding valid UTF-8 (the broker turns it into a Python str);
#   "int"     any msgpack integer;
#   "uint"    a msgpack integer >= 0;
#   "map"     a map with well-formed (pass-through) contents;
#   "job_pair" the 0.5 agent-side job id: a 2-array [bin client_identity (1..255 bytes), str job id].
#
# Captures: the values routing needs, found while scanning (a str field named "job_id",
# "environment" or "environment_type"; the int "priority"; the job_pair's two parts).

_TYPE_GID = -1  # the type key's entry, in field ids and in Entry.field


def field_kinds(messages: dict[str, tuple[int, tuple[str, ...]]], typed: dict[str, str]) -> dict[str, str]:
    """The kind of every field of one side, in first-declaration order (``_wire_c`` builds the same)."""
    kinds: dict[str, str] = {}
    for _code, fields in messages.values():
        for name in fields:
            kinds.setdefault(name, typed.get(name, "any"))
    return kinds


class _MessageType(NamedTuple):
    code: int
    name: str
    mask: int  # bit gid+1 for each declared field, bit 0 for the type key
    index: dict[int, int]  # field id -> index in this message's declaration order
    fields: tuple[str, ...]


class _SpliceRule(NamedTuple):
    """A protocol.Splice resolved against one incoming message's declaration order."""

    out_type: bytes
    drop: frozenset[int]
    job_id: str | None


class _Side:
    """The messages one kind of peer may send in one dialect, as tables keyed by raw key bytes."""

    def __init__(self, dialect: Dialect, messages: dict[str, tuple[int, tuple[str, ...]]],
                 typed: dict[str, str]) -> None:
        kinds = field_kinds(messages, typed)
        self.dialect = dialect.tag
        self.type_key = dialect.type_key.encode()
        # The peers of 0.9 run msgpack 1.x, which reads ext -1 as a timestamp; those of
        # 0.5 run msgpack 0.6, which refuses every negative ext type.
        self.timestamps = dialect.tag == V09
        # The type keys of the other dialects: meeting one means the frame is theirs.
        self.foreign = {d.type_key.encode(): d.tag for d in protocol.DIALECTS if d.tag != dialect.tag}
        self.names = list(kinds)  # field id -> name
        self.kinds = [kinds[name] for name in self.names]
        self.ids = {name.encode(): gid for gid, name in enumerate(self.names)}
        self.types = {}
        self.by_code = {}
        for msgname, (code, fields) in messages.items():
            mask = 1
            for name in fields:
                mask |= 1 << (self.ids[name.encode()] + 1)
            index = {self.ids[name.encode()]: i for i, name in enumerate(fields)}
            msgtype = _MessageType(code, msgname, mask, index, fields)
            self.types[msgname.encode()] = self.by_code[code] = msgtype

    def rule(self, code: int, splice: protocol.Splice) -> _SpliceRule:
        fields = self.by_code[code].fields
        # Field 0 is the job id in every message that is spliced (the splicers rely on it).
        assert fields[0] == "job_id"
        return _SpliceRule(splice.out_type.encode(), frozenset(fields.index(f) for f in splice.drop),
                           splice.job_id)


_CLIENT = [_Side(d, d.client_messages, d.client_kinds) for d in protocol.DIALECTS]
_AGENT = [_Side(d, d.agent_messages, d.agent_kinds) for d in protocol.DIALECTS]
_NEW_JOB = [_CLIENT[d.tag].rule(CLIENT_NEW_JOB, d.new_job) for d in protocol.DIALECTS]
_JOB_DONE = [_AGENT[d.tag].rule(AGENT_JOB_DONE, d.job_done) for d in protocol.DIALECTS]
_SSH_DEBUG = [_AGENT[d.tag].rule(AGENT_JOB_SSH_DEBUG, d.ssh_debug) for d in protocol.DIALECTS]
_JOB_STARTED = [d.job_started_type.encode() for d in protocol.DIALECTS]
_TYPE_KEYS = [d.type_key.encode() for d in protocol.DIALECTS]

#: The kind of every field a client / an agent may send, per dialect tag (``_wire_c`` has the same).
CLIENT_FIELD_KINDS = [dict(zip(side.names, side.kinds, strict=True)) for side in _CLIENT]
AGENT_FIELD_KINDS = [dict(zip(side.names, side.kinds, strict=True)) for side in _AGENT]


class _Scan(NamedTuple):
    """What a scan found; offsets index the frame."""

    code: int
    entries: list[tuple[int, int, int, int]]  # (key_start, val_start, val_end, field), frame order
    job_id: tuple[int, int] | None  # (start, length) of the job id's UTF-8 bytes
    ident: tuple[int, int] | None  # (start, length) of the client identity (0.5 agent side)
    env: tuple[int, int] | None  # (start, length) of the environment's UTF-8 bytes
    env_type: tuple[int, int] | None  # (start, length) of the environment type's (0.9)
    priority: int  # the job's priority (0.9 client_new_job), clamped to int64; 0 otherwise
    side: _Side


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


def _skip(buf: bytes, pos: int, n: int, depth: int, timestamps: bool) -> int:
    """Skip one well-formed value at ``pos``; ``depth`` containers are already open around it.

    Iterative: ``left`` counts the values still to skip in the innermost open
    container, ``stack`` the (count, is-map) of the enclosing ones.

    Well-formed means: what the receiving peer's own loader accepts (msgpack-python with
    ``raw=False, use_list=False, strict_map_key=False``), since the value is forwarded to
    it byte for byte and a value it refuses raises in its receive loop.  So besides the
    framing, every str must hold valid UTF-8, no map may sit inside a map key (the key
    would be an unhashable dict), and no ext type may be one msgpack reserves (negative):
    except, when ``timestamps`` (msgpack 1.x peers: dialect 0.9), a well-formed timestamp
    (ext -1 of 4, 8 or 12 bytes, nanoseconds below 10**9).
    """
    stack: list[tuple[int, bool]] = []
    left = 1
    is_map = False  # whether the innermost open container is a map
    key_top = -1  # len(stack) where the map key being skipped began, or -1 outside keys
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
            _utf8_any(buf, pos, size)
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
                if lead >= 0xD9:  # str8/16/32 (0xc4..0xc6 are bin)
                    _utf8_any(buf, pos, length)
                pos += length
            elif what == "ext":
                length = _uint(buf, pos, size, n)
                pos += size
                if length + 1 > n - pos:  # + the ext type byte
                    raise _truncated()
                _ext_type(buf, pos, length, timestamps)
                pos += length + 1
            elif what == "fixext":
                if size + 1 > n - pos:
                    raise _truncated()
                _ext_type(buf, pos, size, timestamps)
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
            # A map key is every first value of a pair: an even count left in a map.
            in_key = key_top >= 0 or (is_map and left % 2 == 0)
            opens_map = lead <= 0x8F or lead >= 0xDE
            if in_key and opens_map:
                raise WireError("map as a map key")
            if depth + len(stack) + 1 > MAX_DEPTH:
                raise WireError("nesting too deep")
            # Every item takes at least one byte: a count beyond the bytes left is a
            # truncated (or hostile) frame, refused before anything is skipped.
            if items > n - pos:
                raise _truncated()
            if items:
                if in_key and key_top < 0:
                    key_top = len(stack)
                stack.append((left - 1, is_map))
                left = items
                is_map = opens_map
                continue
        left -= 1
        while left == 0:
            if not stack:
                return pos
            left, is_map = stack.pop()
            if len(stack) == key_top:
                key_top = -1


def _utf8_any(buf: bytes, start: int, length: int) -> None:
    """A str inside a pass-through value: the receiver decodes it (``raw=False``)."""
    try:
        buf[start:start + length].decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("invalid UTF-8 in a str") from None


def _ext_type(buf: bytes, pos: int, length: int, timestamps: bool) -> None:
    """Refuse an ext the receiver's msgpack refuses; ``pos`` is the type byte, ``length`` the data's."""
    code = buf[pos]
    if code < 0x80:
        return  # 0..127: application types, read as ExtType
    if code != 0xFF or not timestamps:
        raise WireError(f"reserved ext type {code - 0x100}")
    if length == 4:
        return
    if length == 8:
        nanoseconds = int.from_bytes(buf[pos + 1:pos + 5], "big") >> 2
    elif length == 12:
        nanoseconds = int.from_bytes(buf[pos + 1:pos + 5], "big")
    else:
        raise WireError("invalid timestamp")
    if nanoseconds >= 10**9:
        raise WireError("invalid timestamp")


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


def _foreign_dialect(buf: bytes, pos: int, left: int, side: _Side) -> int:
    """Whether one of the ``left`` entries from ``pos`` has another dialect's type key.

    Only asked once a key has turned out unknown: the real 0.9 peers write ``@type``
    last, so a 0.9 frame read as 0.5 meets a 0.9-only field first.  -1 when none is
    found (or the rest does not read), and the unknown key is reported as such.
    """
    n = len(buf)
    try:
        for _ in range(left):
            found = _str(buf, pos, n)
            if found is None:
                return -1
            key = buf[found[0]:found[0] + found[1]]
            if key in side.foreign:
                return side.foreign[key]
            pos = _skip(buf, found[0] + found[1], n, 1, side.timestamps)
    except WireError:
        return -1
    return -1


def _scan(buf: bytes, side: _Side) -> _Scan:
    """Check a whole frame against one side's messages and find the spans the broker needs.

    Raises WrongDialect when the frame carries another dialect's type key.
    """
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
    type_span = job_id = ident = env = env_type = None
    priority = 0
    for i in range(count):
        key_start = pos
        found = _str(buf, pos, n)
        if found is None:
            raise WireError("non-str key")
        start, length = found
        key = buf[start:start + length]
        pos = start + length
        gid = side.ids.get(key)
        if gid is None:
            if key != side.type_key:
                other = _foreign_dialect(buf, key_start, count - i, side)
                if other >= 0:
                    raise WrongDialect(other)
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
                raise WireError(f"{side.type_key.decode()} must be a str")
            pos = type_span[0] + type_span[1]
        else:
            name = side.names[gid]
            kind = side.kinds[gid]
            if kind == "any":
                pos = _skip(buf, pos, n, 1, side.timestamps)
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
                elif name == "environment_type":
                    env_type = found
            elif kind in ("int", "uint"):
                found = _int(buf, pos, n)
                if found is None:
                    raise WireError(f"{name} must be an int")
                if kind == "uint" and found[0] < 0:
                    raise WireError(f"{name} must be >= 0")
                pos = found[1]
                if name == "priority":
                    priority = min(found[0], PRIORITY_MAX)
            elif kind == "map":
                if pos >= n:
                    raise _truncated()
                lead = buf[pos]
                if not (0x80 <= lead <= 0x8F or lead in (0xDE, 0xDF)):
                    raise WireError(f"{name} must be a map")
                pos = _skip(buf, pos, n, 1, side.timestamps)
            else:  # "job_pair"
                ident_start, ident_len, start, length, pos = _job_pair(buf, pos, n)
                ident = (ident_start, ident_len)
                job_id = (start, length)
        entries.append((key_start, val_start, pos, gid))
    if pos != n:
        raise WireError("trailing bytes after message")

    if type_span is None:
        raise WireError(f"missing key {side.type_key.decode()!r}")
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
    return _Scan(msgtype.code, entries, job_id, ident, env, env_type, priority, side)


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


def _splice(buf: bytes, scan: _Scan, rule: _SpliceRule, job_id_value: bytes | None) -> bytes:
    """Rebuild a frame: the type key's value becomes ``rule.out_type``, the job id's value
    ``job_id_value`` (None: kept), the entries ``rule.drop`` are removed.

    Entries are contiguous in the frame, so the untouched ones between two changed
    entries are copied as one span.
    """
    out = [_map_header(len(scan.entries) - len(rule.drop))]
    run = scan.entries[0][0] if scan.entries else len(buf)
    for key_start, val_start, val_end, field in scan.entries:
        if field == -1:
            out += (buf[run:key_start], buf[key_start:val_start], _str_header(len(rule.out_type)),
                    rule.out_type)
        elif field == 0 and job_id_value is not None:  # job_id: field 0 of every spliced message
            out += (buf[run:key_start], buf[key_start:val_start], job_id_value)
        elif field in rule.drop:
            out.append(buf[run:key_start])
        else:
            continue
        run = val_end
    out.append(buf[run:scan.entries[-1][2]] if scan.entries else b"")
    return b"".join(out)


def _value(frame: bytes, scan: _Scan, name: str) -> tuple[int, int]:
    """The (start, end) of the value of the declared field ``name`` of a scanned message."""
    index = scan.side.by_code[scan.code].fields.index(name)
    for _k, val_start, val_end, field in scan.entries:
        if field == index:
            return val_start, val_end
    raise AssertionError(f"{name} not in a scanned message that declares it")  # key set was checked


def _decoded(raw: bytes) -> object:
    """A pass-through value as the real peers decode it, or None where msgpack-python refuses
    what the scanner lets through (an ext -1 that is no timestamp, a map as a map key).

    The 0.9 rules read from such a value then fall back (time estimate -1, state "")
    instead of raising out of a queue snapshot or a kill.
    """
    try:
        return protocol.decode(raw)
    except (ValueError, TypeError):
        return None


def _new_job(frame: bytes, dialect: int) -> _Scan:
    scan = _scan(frame, _CLIENT[dialect])
    if scan.code != CLIENT_NEW_JOB:
        raise WireError("not a client_new_job")
    return scan


# -- the API --------------------------------------------------------------------------

def scan_client(frame: bytes, dialect: int = V05) -> tuple[int, str | None, object, int]:
    """Check a client frame of ``dialect``: (type code, job_id, environment, priority).

    job_id is set for client_new_job and client_kill_job, environment for
    client_new_job (0.5: its name; 0.9: the pair (environment_type, environment)), None
    otherwise; priority is the 0.9 job's (clamped to int64), 0 otherwise.  Raises
    WireError, or WrongDialect when the frame is in another dialect.
    """
    scan = _scan(frame, _CLIENT[dialect])
    env = _text(frame, scan.env)
    if scan.env_type is not None:
        env = (_text(frame, scan.env_type), env)
    return scan.code, _text(frame, scan.job_id), env, scan.priority


def queue_fields(frame: bytes, dialect: int = V05) -> tuple[str, str, str, str, int]:
    """For a client_new_job frame: (job_id, course_id, task_id, launcher, time value).

    The time value is 0.5's ``time_limit``, or 0.9's estimate from
    ``environment_parameters`` (``protocol.v09.time_estimate``).
    """
    scan = _new_job(frame, dialect)
    n = len(frame)
    course_id = _text(frame, _str(frame, _value(frame, scan, "course_id")[0], n))
    task_id = _text(frame, _str(frame, _value(frame, scan, "task_id")[0], n))
    launcher = _text(frame, _str(frame, _value(frame, scan, "launcher")[0], n))
    if dialect == V09:
        start, end = _value(frame, scan, "environment_parameters")
        time_value = protocol.v09.time_estimate(_decoded(frame[start:end]))
    else:
        time_value = _int(frame, _value(frame, scan, "time_limit")[0], n)[0]
    return _text(frame, scan.job_id), course_id, task_id, launcher, time_value


def submission_state(frame: bytes, dialect: int = V09) -> object:
    """For a 0.9 ClientNewJob frame: the state its input carries (``inputdata["@state"]``, or "")."""
    if dialect != V09:
        raise WireError("only dialect 0.9 jobs carry a state")
    scan = _new_job(frame, dialect)
    start, end = _value(frame, scan, "inputdata")
    return protocol.v09.input_state(_decoded(frame[start:end]))


def splice_new_job(frame: bytes, client_identity: bytes, dialect: int = V05) -> bytes:
    """client_new_job frame -> backend_new_job frame, by the dialect's rule.

    ``type`` is replaced; 0.5: ``job_id`` becomes ``[bin client_identity, str job_id]``,
    ``launcher`` is removed; 0.9: ``priority`` and ``launcher`` are removed.  Every other
    entry is copied byte for byte.
    """
    if not 1 <= len(client_identity) <= 255:
        raise WireError("client identity must be 1..255 bytes")
    scan = _new_job(frame, dialect)
    rule = _NEW_JOB[dialect]
    job_id_value = None
    if rule.job_id == "pair":
        # The client's job id keeps its own encoding, header included.
        start, end = _value(frame, scan, "job_id")
        job_id_value = b"".join(
            (b"\x92", _bin_header(len(client_identity)), client_identity, frame[start:end]))
    return _splice(frame, scan, rule, job_id_value)


def scan_agent(frame: bytes, dialect: int = V05) -> tuple[int, bytes | None, str | None]:
    """Check an agent frame of ``dialect``: (type code, client_identity, job_id).

    job_id is set for the job started / done / ssh debug messages; client_identity too
    in 0.5, where it is part of the job id pair (None in 0.9 and for hello and pong).
    Raises WireError, or WrongDialect when the frame is in another dialect.
    """
    scan = _scan(frame, _AGENT[dialect])
    ident = None if scan.ident is None else frame[scan.ident[0]:scan.ident[0] + scan.ident[1]]
    return scan.code, ident, _text(frame, scan.job_id)


def _agent_to_client(frame: bytes, dialect: int, code: int, rules: list[_SpliceRule]) -> bytes:
    scan = _scan(frame, _AGENT[dialect])
    if scan.code != code:
        raise WireError(f"not an {protocol.DIALECTS[dialect].agent_type(code)}")
    rule = rules[dialect]
    job_id_value = None
    if rule.job_id == "str":
        start, length = scan.job_id
        job_id_value = _str_header(length) + frame[start:start + length]
    return _splice(frame, scan, rule, job_id_value)


def splice_job_done(frame: bytes, dialect: int = V05) -> bytes:
    """agent_job_done -> backend_job_done: type replaced (0.5: and job_id by the client's str)."""
    return _agent_to_client(frame, dialect, AGENT_JOB_DONE, _JOB_DONE)


def splice_ssh_debug(frame: bytes, dialect: int = V05) -> bytes:
    """agent_job_ssh_debug -> backend_job_ssh_debug, by the same rule."""
    return _agent_to_client(frame, dialect, AGENT_JOB_SSH_DEBUG, _SSH_DEBUG)


def job_started(job_id: str, dialect: int = V05) -> bytes:
    """Encode backend_job_started(job_id) in ``dialect``."""
    raw = job_id.encode("utf-8")
    type_key, name = _TYPE_KEYS[dialect], _JOB_STARTED[dialect]
    return (
        b"\x82" + _str_header(len(type_key)) + type_key + _str_header(len(name)) + name
        + b"\xa6job_id" + _str_header(len(raw)) + raw
    )


def job_key(client_identity: bytes | None, job_id: str, dialect: int = V05) -> bytes:
    """The broker's dictionary key for a job.

    0.5: identity length byte, identity, UTF-8 job id (ZeroMQ identities are 1..255
    bytes, so the key is unambiguous; another length raises WireError).  0.9, where job
    ids are global: a zero byte, then the UTF-8 job id.  The first byte tells the two
    apart, so the keys of both dialects share one table and never collide.
    """
    if dialect == V09:
        return b"\x00" + job_id.encode("utf-8")
    if client_identity is None or not 1 <= len(client_identity) <= 255:
        raise WireError("client identity must be 1..255 bytes")
    return bytes((len(client_identity),)) + client_identity + job_id.encode("utf-8")
