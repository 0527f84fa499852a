"""The wire module: scanning and splicing, held to msgpack-python and to each other.

Every behavioural test runs on both implementations (ids ``c`` and ``py``; only ``py``
when ``FASTBACKEND_NO_EXTENSIONS=1``).  msgpack-python is the reference: valid frames
are made with ``msgpack.packb`` (or by hand with wider headers than needed), and every
spliced frame must decode to exactly the decoded input, edited.  The two
implementations must agree on everything else too, including the WireError reason for
any bytes at all.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import struct
import sys
import uuid
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastbackend import _wire_py, protocol, wire
from fastbackend.protocol import (
    AGENT_MESSAGES,
    CLIENT_MESSAGES,
    CLIENT_NEW_JOB,
    MAX_FRAME_SIZE,
    WireError,
)

NO_EXTENSIONS = os.environ.get("FASTBACKEND_NO_EXTENSIONS", "") not in ("", "0")


class _NotBuilt:
    """Stands in for a compiled module that failed to import: every use fails the test."""

    def __init__(self, error: ImportError) -> None:
        self.error = error

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"fastbackend._wire_c failed to import: {self.error}")


def _compiled() -> Any:
    try:
        return importlib.import_module("fastbackend._wire_c")
    except ImportError as exc:
        return _NotBuilt(exc)


IMPLS = {"py": _wire_py} if NO_EXTENSIONS else {"c": _compiled(), "py": _wire_py}
each_impl = pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))

SETTINGS = settings(
    max_examples=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    """A call's result or its WireError reason; any other exception fails the test."""
    try:
        return "ok", fn(*args)
    except WireError as exc:
        return "error", str(exc)


# -- hand-built msgpack, for headers wider than msgpack-python writes ----------------

def str_bytes(raw: bytes, width: int | None = None) -> bytes:
    """A msgpack str holding ``raw`` (not necessarily UTF-8); a str8/16/32 header if ``width`` says so."""
    if width is None:
        return _wire_py._str_header(len(raw)) + raw
    return {1: b"\xd9", 2: b"\xda", 4: b"\xdb"}[width] + len(raw).to_bytes(width, "big") + raw


def wide_pack(obj: Any, rnd: Any) -> bytes:
    """Encode like msgpack, but with a header size class chosen at random among those that fit."""

    def sized(small: list[bytes], tags: dict[int, bytes], length: int) -> bytes:
        options = list(small)
        for width, tag in tags.items():
            if length < 1 << (8 * width):
                options.append(tag + length.to_bytes(width, "big"))
        return rnd.choice(options)

    if obj is None:
        return b"\xc0"
    if obj is True or obj is False:
        return b"\xc3" if obj else b"\xc2"
    if isinstance(obj, int):
        options = []
        if 0 <= obj < 128:
            options.append(bytes((obj,)))
        if -32 <= obj < 0:
            options.append(struct.pack("b", obj))
        for tag, width in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
            if 0 <= obj < 1 << (8 * width):
                options.append(bytes((tag,)) + obj.to_bytes(width, "big"))
        for tag, width in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
            if -(1 << (8 * width - 1)) <= obj < 1 << (8 * width - 1):
                options.append(bytes((tag,)) + obj.to_bytes(width, "big", signed=True))
        return rnd.choice(options)
    if isinstance(obj, float):
        options = [b"\xcb" + struct.pack(">d", obj)]
        try:
            if struct.unpack(">f", struct.pack(">f", obj))[0] == obj:
                options.append(b"\xca" + struct.pack(">f", obj))
        except OverflowError:  # beyond float32's range
            pass
        return rnd.choice(options)
    if isinstance(obj, str):
        raw = obj.encode("utf-8")
        small = [bytes((0xA0 | len(raw),))] if len(raw) < 32 else []
        return sized(small, {1: b"\xd9", 2: b"\xda", 4: b"\xdb"}, len(raw)) + raw
    if isinstance(obj, bytes):
        return sized([], {1: b"\xc4", 2: b"\xc5", 4: b"\xc6"}, len(obj)) + obj
    if isinstance(obj, msgpack.ExtType):
        fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
        small = [bytes((fixed[len(obj.data)],))] if len(obj.data) in fixed else []
        head = rnd.choice(small + [sized([], {1: b"\xc7", 2: b"\xc8", 4: b"\xc9"}, len(obj.data))])
        return head + struct.pack("b", obj.code) + obj.data
    if isinstance(obj, (list, tuple)):
        small = [bytes((0x90 | len(obj),))] if len(obj) < 16 else []
        return sized(small, {2: b"\xdc", 4: b"\xdd"}, len(obj)) + b"".join(wide_pack(x, rnd) for x in obj)
    if isinstance(obj, dict):
        small = [bytes((0x80 | len(obj),))] if len(obj) < 16 else []
        return sized(small, {2: b"\xde", 4: b"\xdf"}, len(obj)) + b"".join(
            wide_pack(k, rnd) + wide_pack(v, rnd) for k, v in obj.items()
        )
    raise TypeError(type(obj))


# -- strategies -----------------------------------------------------------------------

# Lengths on each side of every msgpack size-class boundary.
BOUNDARIES = [0, 1, 15, 16, 31, 32, 255, 256, 65535, 65536]

texts = st.text(max_size=24) | st.sampled_from(BOUNDARIES).map(lambda n: "é" * (n // 2) + "x" * (n % 2))
binaries = st.binary(max_size=24) | st.sampled_from(BOUNDARIES + [70_000]).map(bytes)
ints = st.integers(-(2**63), 2**64 - 1)  # every msgpack integer
scalars = (
    st.none() | st.booleans() | ints | st.floats(allow_nan=False)
    | texts | binaries
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20) | binaries)
)
# Containers reach array16/map16 (16 items and more); the 32-bit size classes are
# covered by wide_pack and by test_big_containers (skipping 65536 items in pure
# Python is too slow to do for every example).
values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.lists(ints, min_size=16, max_size=20)
    | st.dictionaries(st.text(max_size=6) | ints, kids, max_size=4)
    | st.dictionaries(ints, st.none(), min_size=16, max_size=18),
    max_leaves=10,
)
job_ids = st.uuids().map(str) | st.text(max_size=40)
identities = st.binary(min_size=1, max_size=255)

CLIENT_TYPED = {
    "job_id": job_ids, "course_id": texts, "task_id": texts, "environment": texts, "launcher": texts,
    "time_limit": ints, "hard_time_limit": ints, "mem_limit": ints, "name": texts,
}
AGENT_TYPED = {
    "job_id": st.tuples(identities, job_ids),
    "friendly_name": texts,
    "available_job_slots": st.integers(0, 2**64 - 1),
    "available_containers": st.dictionaries(
        texts, st.fixed_dictionaries({"id": texts, "created": ints}) | values, max_size=3
    ),
}


@st.composite
def messages(draw: Any, table: dict, typed: dict, names: list[str] | None = None) -> dict:
    """A valid message of one side as a dict, keys in random order."""
    name = draw(st.sampled_from(names or sorted(table)))
    fields = {field: draw(typed.get(field, values)) for field in table[name][1]}
    fields["type"] = name
    order = draw(st.permutations(list(fields)))
    return {key: fields[key] for key in order}


client_messages = messages(CLIENT_MESSAGES, CLIENT_TYPED)
agent_messages = messages(AGENT_MESSAGES, AGENT_TYPED)


# -- the right implementation is loaded ------------------------------------------------

def test_compiled_module_is_loaded() -> None:
    """Unless FASTBACKEND_NO_EXTENSIONS is set, wire uses the compiled module: a broken build fails."""
    if NO_EXTENSIONS:
        assert wire.IMPL == "py"
        assert wire.scan_client is _wire_py.scan_client
    else:
        assert wire.IMPL == "c"
        compiled = importlib.import_module("fastbackend._wire_c")
        for name in ("scan_client", "queue_fields", "splice_new_job", "scan_agent", "splice_job_done",
                     "splice_ssh_debug", "job_started", "job_key"):
            assert getattr(wire, name) is getattr(compiled, name)


def test_selector_falls_back_loudly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A compiled module that does not import: warning logged, IMPL says "py"."""
    monkeypatch.delenv("FASTBACKEND_NO_EXTENSIONS", raising=False)
    monkeypatch.setitem(sys.modules, "fastbackend._wire_c", None)  # makes the import fail
    try:
        with caplog.at_level(logging.WARNING, logger="fastbackend.wire"):
            importlib.reload(wire)
        assert wire.IMPL == "py"
        assert wire.scan_client is _wire_py.scan_client
        assert any("_wire_c failed to import" in r.getMessage() for r in caplog.records)
    finally:
        monkeypatch.undo()
        importlib.reload(wire)


def test_no_extensions_forces_py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTBACKEND_NO_EXTENSIONS", "1")
    try:
        importlib.reload(wire)
        assert wire.IMPL == "py"
        assert wire.splice_new_job is _wire_py.splice_new_job
    finally:
        monkeypatch.undo()
        importlib.reload(wire)


@each_impl
def test_field_kinds_cover_protocol(impl: Any) -> None:
    """Both twins give every declared field the same kind (their tables cannot drift apart)."""
    assert impl.CLIENT_FIELD_KINDS == _wire_py.CLIENT_FIELD_KINDS
    assert impl.AGENT_FIELD_KINDS == _wire_py.AGENT_FIELD_KINDS
    for table, kinds in (
        (CLIENT_MESSAGES, impl.CLIENT_FIELD_KINDS), (AGENT_MESSAGES, impl.AGENT_FIELD_KINDS)
    ):
        declared = {field for _code, fields in table.values() for field in fields}
        assert set(kinds) == declared
    assert impl.CLIENT_FIELD_KINDS["job_id"] == "str"
    assert impl.CLIENT_FIELD_KINDS["inputdata"] == "any"
    assert impl.AGENT_FIELD_KINDS["job_id"] == "job_pair"
    assert impl.AGENT_FIELD_KINDS["available_job_slots"] == "uint"


# -- differential tests against msgpack-python ----------------------------------------

def check_client(impl: Any, msg: dict, frame: bytes, ident: bytes, minimal: bool) -> None:
    code, job_id, environment = impl.scan_client(frame)
    assert code == CLIENT_MESSAGES[msg["type"]][0]
    assert job_id == msg.get("job_id")
    assert environment == msg.get("environment")
    if msg["type"] != "client_new_job":
        assert outcome(impl.splice_new_job, frame, ident) == ("error", "not a client_new_job")
        assert outcome(impl.queue_fields, frame) == ("error", "not a client_new_job")
        return
    assert impl.queue_fields(frame) == (
        msg["job_id"], msg["course_id"], msg["task_id"], msg["launcher"], msg["time_limit"]
    )
    out = impl.splice_new_job(frame, ident)
    # Splicing == decode, edit, re-encode.
    expected = protocol.decode(frame)
    expected["type"] = "backend_new_job"
    expected["job_id"] = (ident, expected["job_id"])
    del expected["launcher"]
    decoded = protocol.decode(out)
    assert decoded == expected
    assert list(decoded) == list(expected)  # entries keep their order
    if minimal:
        assert out == pack(expected)


def check_agent(impl: Any, msg: dict, frame: bytes, minimal: bool) -> None:
    code, ident, job_id = impl.scan_agent(frame)
    assert code == AGENT_MESSAGES[msg["type"]][0]
    if "job_id" in msg:
        assert (ident, job_id) == msg["job_id"]
    else:
        assert (ident, job_id) == (None, None)
    for fn, msgtype, backend in (
        (impl.splice_job_done, "agent_job_done", "backend_job_done"),
        (impl.splice_ssh_debug, "agent_job_ssh_debug", "backend_job_ssh_debug"),
    ):
        if msg["type"] != msgtype:
            assert outcome(fn, frame) == ("error", f"not an {msgtype}")
            continue
        out = fn(frame)
        expected = protocol.decode(frame)
        expected["type"] = backend
        expected["job_id"] = expected["job_id"][1]
        decoded = protocol.decode(out)
        assert decoded == expected
        assert list(decoded) == list(expected)
        assert set(decoded) == set(protocol.BACKEND_MESSAGES[backend]) | {"type"}
        if minimal:
            assert out == pack(expected)


@each_impl
@SETTINGS
@given(msg=client_messages, ident=identities)
def test_client_messages_match_msgpack(impl: Any, msg: dict, ident: bytes) -> None:
    check_client(impl, msg, pack(msg), ident, minimal=True)


@each_impl
@SETTINGS
@given(msg=agent_messages)
def test_agent_messages_match_msgpack(impl: Any, msg: dict) -> None:
    check_agent(impl, msg, pack(msg), minimal=True)


@each_impl
@SETTINGS
@given(msg=client_messages, ident=identities, rnd=st.randoms(use_true_random=False))
def test_client_messages_wide_headers(impl: Any, msg: dict, ident: bytes, rnd: Any) -> None:
    """The scanner does not assume minimal encodings (map16, str32, int64 for 1, ...)."""
    frame = wide_pack(msg, rnd)
    assert protocol.decode(frame) == protocol.decode(pack(msg))
    check_client(impl, msg, frame, ident, minimal=False)


@each_impl
@SETTINGS
@given(msg=agent_messages, rnd=st.randoms(use_true_random=False))
def test_agent_messages_wide_headers(impl: Any, msg: dict, rnd: Any) -> None:
    frame = wide_pack(msg, rnd)
    assert protocol.decode(frame) == protocol.decode(pack(msg))
    check_agent(impl, msg, frame, minimal=False)


def new_job(**changes: Any) -> dict:
    msg = {
        "type": "client_new_job", "job_id": str(uuid.uuid4()), "course_id": "LINGI1101",
        "task_id": "hello", "inputdata": {"q1": "print('hi')\n" * 70, "@lang": "python"},
        "environment": "default", "enable_network": False, "time_limit": 30,
        "hard_time_limit": 90, "mem_limit": 256, "debug": False, "launcher": "frontend",
    }
    msg.update(changes)
    return msg


def job_done(ident: bytes = b"\x00k\x8bEg", **changes: Any) -> dict:
    msg = {
        "type": "agent_job_done", "job_id": (ident, str(uuid.uuid4())), "result": ("success", "Well done"),
        "grade": 100.0, "problems": {"q1": ("success", "ok")}, "tests": {}, "custom": {"x": [1, 2]},
        "archive": b"\x1f\x8b" + bytes(3000), "stdout": "out", "stderr": "",
    }
    msg.update(changes)
    return msg


@each_impl
def test_big_containers(impl: Any) -> None:
    """array32 and map32 (65536 entries) inside pass-through values."""
    msg = new_job(inputdata={"a": list(range(65536)), "m": {str(i): i for i in range(65536)}})
    check_client(impl, msg, pack(msg), b"\x01", minimal=True)
    agent = job_done(custom=[None] * 65536, tests={i: None for i in range(65536)})
    check_agent(impl, agent, pack(agent), minimal=True)


@each_impl
def test_job_started_and_job_key(impl: Any) -> None:
    for job_id in ("", str(uuid.uuid4()), "é" * 40, "x" * 300, "y" * 70_000):
        frame = impl.job_started(job_id)
        assert protocol.decode(frame) == {"type": "backend_job_started", "job_id": job_id}
        reference = protocol.encode("backend_job_started", job_id=job_id)
        assert protocol.decode(frame) == protocol.decode(reference)
        for ident in (b"\x00", b"\x00k\x8bEg", bytes(range(255))):
            key = impl.job_key(ident, job_id)
            assert key == bytes((len(ident),)) + ident + job_id.encode("utf-8")
            assert wire.split_key(key) == (ident, job_id) and wire.key_client(key) == ident
    for ident in (b"", bytes(256)):
        assert outcome(impl.job_key, ident, "j") == ("error", "client identity must be 1..255 bytes")
        assert outcome(impl.splice_new_job, pack(new_job()), ident) == (
            "error", "client identity must be 1..255 bytes"
        )


@each_impl
def test_identity_sizes_in_splice(impl: Any) -> None:
    """The identity's bin header in backend_new_job, at both ends of the allowed range."""
    msg = new_job()
    for ident in (b"\x00", bytes(range(256))[1:]):
        check_client(impl, msg, pack(msg), ident, minimal=True)


# -- bad frames ---------------------------------------------------------------------------

def with_entry(msg: dict, key: bytes, value: bytes) -> bytes:
    """``msg`` packed with one more raw entry (possibly a duplicate key)."""
    body = pack(msg)
    assert 0x80 <= body[0] <= 0x8E
    return bytes((body[0] + 1,)) + body[1:] + key + value


def replace_value(msg: dict, key: str, raw_value: bytes) -> bytes:
    """``msg`` packed with the value of ``key`` replaced by raw msgpack bytes."""
    rest = {k: v for k, v in msg.items() if k != key}
    return with_entry(rest, pack(key), raw_value)


def nested(depth: int) -> bytes:
    """``depth`` arrays, one inside the other, around a nil."""
    return b"\x91" * depth + b"\xc0"


def hello(**changes: Any) -> dict:
    msg = {"type": "agent_hello", "friendly_name": "a", "available_job_slots": 1, "available_containers": {}}
    msg.update(changes)
    return msg


KILL = {"type": "client_kill_job", "job_id": "j1"}
DONE = job_done()

CLIENT_BAD = [
    ("empty", b"", "truncated frame"),
    ("not a map", pack([1, 2]), "not a map"),
    ("garbage", b"\xc1\x00\x17", "not a map"),
    ("nil", b"\xc0", "not a map"),
    ("trailing bytes", pack(KILL) + b"\x00", "trailing bytes after message"),
    ("two messages", pack(KILL) + pack(KILL), "trailing bytes after message"),
    ("truncated", pack(new_job())[:-1], "truncated frame"),
    ("extra known key", pack({**KILL, "course_id": "c"}), "unexpected key 'course_id' for client_kill_job"),
    ("extra unknown key", pack({**KILL, "jobid": "c"}), "unexpected key 'jobid'"),
    ("missing key", pack({k: v for k, v in new_job().items() if k != "launcher"}),
     "missing key 'launcher' for client_new_job"),
    ("missing type", pack({"job_id": "j"}), "missing key 'type'"),
    ("only type, kill", pack({"type": "client_kill_job"}), "missing key 'job_id' for client_kill_job"),
    ("duplicate key", with_entry(KILL, pack("job_id"), pack("j2")), "duplicate key 'job_id'"),
    ("duplicate type", with_entry(KILL, pack("type"), pack("client_kill_job")), "duplicate key 'type'"),
    ("duplicate key, wide", with_entry(KILL, str_bytes(b"job_id", 4), pack("j2")), "duplicate key 'job_id'"),
    ("int key", pack({1: 2, "type": "ping"}), "non-str key"),
    ("bin key", pack({b"type": "ping"}), "non-str key"),
    ("job_id int", pack({**KILL, "job_id": 7}), "job_id must be a str"),
    ("job_id bin", pack({**KILL, "job_id": b"j"}), "job_id must be a str"),
    ("job_id array", pack({**KILL, "job_id": (b"i", "j")}), "job_id must be a str"),
    ("job_id bad utf-8", replace_value(KILL, "job_id", str_bytes(b"a\xffb", 1)), "job_id is not valid UTF-8"),
    ("job_id surrogate", replace_value(KILL, "job_id", str_bytes(b"\xed\xa0\x80", 1)),
     "job_id is not valid UTF-8"),
    ("environment nil", pack(new_job(environment=None)), "environment must be a str"),
    ("course_id bin", pack(new_job(course_id=b"c")), "course_id must be a str"),
    ("launcher overlong", replace_value(new_job(), "launcher", str_bytes(b"\xc0\xaf")),
     "launcher is not valid UTF-8"),
    ("time_limit float", pack(new_job(time_limit=30.0)), "time_limit must be an int"),
    ("mem_limit bool", pack(new_job(mem_limit=True)), "mem_limit must be an int"),
    ("name int", pack({"type": "client_hello", "name": 3}), "name must be a str"),
    ("type int", pack({"type": 2}), "type must be a str"),
    ("type bin", pack({"type": b"ping"}), "type must be a str"),
    ("unknown type", pack({"type": "client_foo"}), "unknown message type 'client_foo'"),
    ("agent type", pack({"type": "pong"}), "unknown message type 'pong'"),
    ("backend type", pack({"type": "backend_job_started", "job_id": "j"}),
     "unknown message type 'backend_job_started'"),
    ("type bad utf-8", replace_value({"type": ""}, "type", str_bytes(b"\xff\xfe")),
     "unknown message type '\\\\xff\\\\xfe'"),
    ("too many keys", b"\xde\x00\x11" + b"\xa1a\xc0" * 17, "too many keys"),
    ("map32 claims 4 Gi keys", b"\xdf\xff\xff\xff\xff", "too many keys"),
    ("str32 claims 4 GiB", replace_value(new_job(), "inputdata", b"\xdb\xff\xff\xff\xff" + bytes(8)),
     "truncated frame"),
    ("bin32 claims 4 GiB", replace_value(new_job(), "debug", b"\xc6\xff\xff\xff\xff" + bytes(8)),
     "truncated frame"),
    ("ext32 claims 4 GiB", replace_value(new_job(), "debug", b"\xc9\xff\xff\xff\xff\x01" + bytes(8)),
     "truncated frame"),
    ("array32 claims 4 Gi items", replace_value(new_job(), "inputdata", b"\xdd\xff\xff\xff\xff" + bytes(8)),
     "truncated frame"),
    ("map32 claims 4 Gi pairs", replace_value(new_job(), "inputdata", b"\xdf\xff\xff\xff\xff" + bytes(8)),
     "truncated frame"),
    ("key str32 claims 4 GiB", b"\x81\xdb\xff\xff\xff\xfftype", "truncated frame"),
    ("c1 in inputdata", replace_value(new_job(), "inputdata", b"\x92\x01\xc1"), "invalid msgpack byte 0xc1"),
    ("too deep", replace_value(new_job(), "inputdata", nested(512)), "nesting too deep"),
    ("very deep", replace_value(new_job(), "inputdata", b"\x91" * 100_000 + b"\xc0"), "nesting too deep"),
    ("deep maps", replace_value(new_job(), "inputdata", b"\x81\xc0" * 1000 + b"\xc0"), "nesting too deep"),
]


@each_impl
@pytest.mark.parametrize(("frame", "reason"), [c[1:] for c in CLIENT_BAD], ids=[c[0] for c in CLIENT_BAD])
def test_bad_client_frames(impl: Any, frame: bytes, reason: str) -> None:
    assert outcome(impl.scan_client, frame) == ("error", reason)
    assert outcome(impl.queue_fields, frame) == ("error", reason)
    assert outcome(impl.splice_new_job, frame, b"\x00abc") == ("error", reason)


AGENT_BAD = [
    ("not a map", pack("agent_hello"), "not a map"),
    ("client type", pack(KILL), "job_id must be [bin, str]"),
    ("client get_queue", pack({"type": "client_get_queue"}), "unknown message type 'client_get_queue'"),
    ("ping", pack({"type": "ping"}), "unknown message type 'ping'"),
    ("extra key", pack({**DONE, "launcher": "x"}), "unexpected key 'launcher'"),
    ("extra known key", pack({**DONE, "host": "h"}), "unexpected key 'host' for agent_job_done"),
    ("missing key", pack({k: v for k, v in DONE.items() if k != "archive"}),
     "missing key 'archive' for agent_job_done"),
    ("duplicate key", with_entry({"type": "pong"}, pack("type"), pack("pong")), "duplicate key 'type'"),
    ("job_id str", pack({**DONE, "job_id": "j"}), "job_id must be [bin, str]"),
    ("job_id 1-array", pack({**DONE, "job_id": (b"i",)}), "job_id must be [bin, str]"),
    ("job_id 3-array", pack({**DONE, "job_id": (b"i", "j", "k")}), "job_id must be [bin, str]"),
    ("job_id array16 of 3",
     replace_value(DONE, "job_id", b"\xdc\x00\x03" + pack(b"i") + pack("j") + pack("k")),
     "job_id must be [bin, str]"),
    ("job_id map", pack({**DONE, "job_id": {b"i": "j"}}), "job_id must be [bin, str]"),
    ("identity str", pack({**DONE, "job_id": ("i", "j")}), "job_id must be [bin, str]"),
    ("job id bin", pack({**DONE, "job_id": (b"i", b"j")}), "job_id must be [bin, str]"),
    ("identity 0 bytes", pack({**DONE, "job_id": (b"", "j")}), "client identity must be 1..255 bytes"),
    ("identity 256 bytes", pack({**DONE, "job_id": (bytes(256), "j")}),
     "client identity must be 1..255 bytes"),
    ("identity bin32 claims 4 GiB", replace_value(DONE, "job_id", b"\x92\xc6\xff\xff\xff\xff" + bytes(20)),
     "truncated frame"),
    ("job id bad utf-8", replace_value(DONE, "job_id", b"\x92" + pack(b"i") + str_bytes(b"\xe0\x80\x80", 1)),
     "job_id is not valid UTF-8"),
    ("slots negative", pack(hello(available_job_slots=-1)), "available_job_slots must be >= 0"),
    ("slots negative int64",
     replace_value(hello(), "available_job_slots", b"\xd3" + (-5).to_bytes(8, "big", signed=True)),
     "available_job_slots must be >= 0"),
    ("slots float", pack(hello(available_job_slots=1.0)), "available_job_slots must be an int"),
    ("containers list", pack(hello(available_containers=["default"])), "available_containers must be a map"),
    ("friendly_name bin", pack(hello(friendly_name=b"a")), "friendly_name must be a str"),
    ("too deep", replace_value(DONE, "custom", nested(512)), "nesting too deep"),
    # available_containers comes last and is {} (0x80): its map is rewritten with one entry
    ("too deep in containers", pack(hello())[:-1] + b"\x81\xc0" + nested(511), "nesting too deep"),
]


@each_impl
@pytest.mark.parametrize(("frame", "reason"), [c[1:] for c in AGENT_BAD], ids=[c[0] for c in AGENT_BAD])
def test_bad_agent_frames(impl: Any, frame: bytes, reason: str) -> None:
    assert outcome(impl.scan_agent, frame) == ("error", reason)
    assert outcome(impl.splice_job_done, frame) == ("error", reason)
    assert outcome(impl.splice_ssh_debug, frame) == ("error", reason)


@each_impl
def test_nesting_limit_is_exact(impl: Any) -> None:
    """511 arrays inside a field value (512 containers with the message map) pass, 512 do not."""
    ok = replace_value(new_job(), "inputdata", nested(511))
    assert impl.scan_client(ok)[0] == CLIENT_NEW_JOB
    assert outcome(impl.scan_client, replace_value(new_job(), "inputdata", nested(512))) == (
        "error", "nesting too deep"
    )
    # An empty container opens a level too.
    empty = replace_value(new_job(), "inputdata", b"\x91" * 511 + b"\x90")
    assert outcome(impl.scan_client, empty) == ("error", "nesting too deep")
    fits = replace_value(new_job(), "inputdata", b"\x91" * 510 + b"\x90")
    assert impl.scan_client(fits)[0] == CLIENT_NEW_JOB
    # The same limit inside the agent's available_containers map.
    assert impl.scan_agent(pack(hello())[:-1] + b"\x81\xc0" + nested(510))[0] == protocol.AGENT_HELLO


INT_BOUNDARIES = sorted(
    {0, 1, 0x3F, 0x40, 0x7F, 0x80, 0xFF, 0x4000, 0x7FFF, 0xFFFF, 0x4000_0000, 2**31 - 1, 2**32 - 1,
     2**62, 2**63 - 1, 2**63, 2**64 - 1}
    | {-v for v in (1, 31, 32, 33, 0x40, 0x80, 0x81, 0x8000, 0x8001, 2**31, 2**31 + 1, 2**63)}
)


def int_encodings(value: int) -> list[bytes]:
    """Every msgpack encoding of an integer."""
    out = []
    if 0 <= value < 128:
        out.append(bytes((value,)))
    if -32 <= value < 0:
        out.append(struct.pack("b", value))
    for lead in range(0xCC, 0xD4):
        width = 1 << ((lead - 0xCC) & 3)
        signed = lead >= 0xD0
        try:
            out.append(bytes((lead,)) + value.to_bytes(width, "big", signed=signed))
        except OverflowError:
            pass
    return out


@each_impl
def test_integers_in_every_encoding(impl: Any) -> None:
    """time_limit's value and available_job_slots' sign, whatever width and signedness carry them."""
    for value in INT_BOUNDARIES:
        for raw in int_encodings(value):
            frame = replace_value(new_job(), "time_limit", raw)
            assert impl.queue_fields(frame)[4] == value, raw
            expected = ("ok", (protocol.AGENT_HELLO, None, None)) if value >= 0 else (
                "error", "available_job_slots must be >= 0")
            agent = replace_value(hello(), "available_job_slots", raw)
            assert outcome(impl.scan_agent, agent) == expected, raw


@each_impl
def test_near_miss_keys_and_types(impl: Any) -> None:
    """A key or type name one byte away from a real one (at any position) is unknown."""
    for table, scan, example in (
        (CLIENT_MESSAGES, impl.scan_client, KILL), (AGENT_MESSAGES, impl.scan_agent, DONE)
    ):
        names = {f for _code, fields in table.values() for f in fields} | {"type"}
        for name in sorted(names):
            for i in range(len(name)):
                for other in ("_", "X", "\x80"):
                    key = name[:i] + other + name[i + 1:]
                    if key in names:
                        continue
                    frame = with_entry(example, str_bytes(key.encode("utf-8")), b"\xc0")
                    assert outcome(scan, frame)[0] == "error"
                    assert outcome(scan, frame)[1].startswith("unexpected key "), key
        for msgtype in sorted(table):
            for i in range(len(msgtype)):
                wrong = msgtype[:i] + "X" + msgtype[i + 1:]
                assert outcome(scan, pack({"type": wrong})) == ("error", f"unknown message type {wrong!r}")


@each_impl
def test_frame_too_large(impl: Any) -> None:
    frame = bytes(MAX_FRAME_SIZE + 1)  # zero pages: never touched, the length is checked first
    assert outcome(impl.scan_client, frame) == ("error", "frame too large")
    assert outcome(impl.scan_agent, frame) == ("error", "frame too large")


@each_impl
def test_wrong_message_for_splicer(impl: Any) -> None:
    ssh = pack(
        {"type": "agent_job_ssh_debug", "job_id": (b"i", "j"), "host": "h", "port": 22, "password": "p"}
    )
    assert outcome(impl.splice_job_done, ssh) == ("error", "not an agent_job_done")
    assert outcome(impl.splice_ssh_debug, pack(DONE)) == ("error", "not an agent_job_ssh_debug")
    assert outcome(impl.splice_ssh_debug, pack({"type": "pong"})) == ("error", "not an agent_job_ssh_debug")
    assert outcome(impl.splice_new_job, pack(KILL), b"i") == ("error", "not a client_new_job")
    assert outcome(impl.queue_fields, pack({"type": "ping"})) == ("error", "not a client_new_job")


@each_impl
def test_every_truncation_is_refused(impl: Any) -> None:
    """Every proper prefix of a valid frame is a truncated frame, never anything else."""
    for frame, scan in (
        (wide_pack(new_job(), random.Random(7)), impl.scan_client),
        (pack(new_job(inputdata={"a": [1, 2.5, None, {"b": b"x" * 40}], "e": msgpack.ExtType(3, b"abcd")})),
         impl.scan_client),
        (pack(job_done()), impl.scan_agent),
        (pack(hello(available_containers={"default": {"id": "sha256:1", "created": 17}})), impl.scan_agent),
    ):
        scan(frame)
        for cut in range(len(frame)):
            assert outcome(scan, frame[:cut]) == ("error", "truncated frame"), cut


# -- the twins agree on anything --------------------------------------------------------

if not NO_EXTENSIONS:
    C, PY = IMPLS["c"], IMPLS["py"]
    IDENT = b"\x00k\x8bEg"

    def agree(frame: bytes) -> None:
        """Both implementations give the same result or the same WireError reason, for every function."""
        for name, args in (
            ("scan_client", (frame,)),
            ("queue_fields", (frame,)),
            ("splice_new_job", (frame, IDENT)),
            ("scan_agent", (frame,)),
            ("splice_job_done", (frame,)),
            ("splice_ssh_debug", (frame,)),
        ):
            assert outcome(getattr(C, name), *args) == outcome(getattr(PY, name), *args), name

    @SETTINGS
    @given(st.binary(max_size=300))
    def test_twins_agree_on_arbitrary_bytes(frame: bytes) -> None:
        agree(frame)

    @SETTINGS
    @given(st.binary(max_size=200))
    def test_twins_agree_on_map_like_bytes(tail: bytes) -> None:
        """Random bytes behind a map header, so the entry loop is reached."""
        agree(b"\x8b" + tail)
        agree(b"\x82\xa4type" + tail)

    ALL_KEYS = sorted(
        {f for t in (CLIENT_MESSAGES, AGENT_MESSAGES) for _c, fields in t.values() for f in fields} | {"type"}
    )
    ALL_TYPES = sorted(set(CLIENT_MESSAGES) | set(AGENT_MESSAGES) | set(protocol.BACKEND_MESSAGES))
    any_typed = st.one_of(*CLIENT_TYPED.values(), *AGENT_TYPED.values())

    @SETTINGS
    @given(
        st.dictionaries(st.sampled_from(ALL_KEYS) | st.text(max_size=5), values | any_typed, max_size=13),
        st.sampled_from(ALL_TYPES) | st.text(max_size=5) | ints,
        st.randoms(use_true_random=False),
    )
    def test_twins_agree_on_near_messages(fields: dict, msgtype: Any, rnd: Any) -> None:
        """Maps of known keys with values of any kind: the key-set and typed-field checks."""
        fields = {**fields, "type": msgtype} if rnd.random() < 0.9 else fields
        agree(pack(fields))
        agree(wide_pack(fields, rnd))

    @SETTINGS
    @given(
        client_messages | agent_messages,
        st.randoms(use_true_random=False),
        st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255), st.sampled_from("set insert delete")),
                 min_size=1, max_size=4),
    )
    def test_twins_agree_on_mutated_frames(msg: dict, rnd: Any, edits: list) -> None:
        frame = bytearray(wide_pack(msg, rnd) if rnd.random() < 0.5 else pack(msg))
        for where, byte, how in edits:
            where %= len(frame) + 1
            if how == "set" and where < len(frame):
                frame[where] = byte
            elif how == "insert":
                frame.insert(where, byte)
            elif where < len(frame):
                del frame[where]
        agree(bytes(frame))

    @SETTINGS
    @given(st.binary(max_size=12) | st.lists(
        st.sampled_from([0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xED,
                         0xEF, 0xF0, 0xF4, 0xF5, 0xFF]), max_size=12).map(bytes),
           st.integers(0, 9))
    def test_utf8_check_matches_python(raw: bytes, pad: int) -> None:
        """job_id's UTF-8 check accepts exactly what Python's strict decoder does."""
        raw = b"a" * pad + raw  # shifts the bytes across the 8-byte ASCII fast path
        try:
            expected = raw.decode("utf-8")
        except UnicodeDecodeError:
            expected = None
        frame = replace_value(KILL, "job_id", str_bytes(raw, 1))
        for impl in (C, PY):
            if expected is None:
                assert outcome(impl.scan_client, frame) == ("error", "job_id is not valid UTF-8")
            else:
                assert impl.scan_client(frame)[1] == expected
        agent = replace_value(DONE, "job_id", b"\x92" + pack(b"i") + str_bytes(raw, 2))
        agree(agent)

    def test_twins_agree_on_every_truncation_and_byte_flip() -> None:
        frame = pack(new_job(inputdata={"a": [1, -2, 2.5], "b": msgpack.ExtType(1, b"xy")}))
        for cut in range(len(frame) + 1):
            agree(frame[:cut])
        for i in range(len(frame)):
            for byte in (0x00, 0x7F, 0x80, 0xC1, 0xDD, 0xFF, frame[i] ^ 0x01):
                agree(frame[:i] + bytes((byte,)) + frame[i + 1:])
