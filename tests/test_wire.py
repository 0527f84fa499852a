"""The wire module: scanning and splicing, held to msgpack-python and to each other.

Every behavioural test runs on both implementations (ids ``c`` and ``py``; only ``py``
when ``FASTBACKEND_NO_EXTENSIONS=1``), and the differential ones in both dialects (ids
``0.5`` and ``0.9``).  msgpack-python is the reference: valid frames are made with
``msgpack.packb`` (or by hand with wider headers than needed), and every spliced frame
must decode to exactly the decoded input, edited (for 0.9 as the real peers decode it:
``msgpack.loads(b, use_list=False, strict_map_key=False)``, then ``cls(**fields)``, so
the key set must be exactly the dataclass's).  The two implementations must agree on
everything else too, including the WireError reason (and WrongDialect's ``dialect``)
for any bytes at all, read as either dialect.
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
from fuzz.receivers import receiver_loads
from fuzz.wire_common import outcome  # a call's result, or its WireError reason (and dialect)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastbackend import _wire_py, protocol, wire
from fastbackend.protocol import (
    AGENT_HELLO,
    CLIENT_NEW_JOB,
    DIALECTS,
    INT_END,
    INT_MIN,
    MAX_FRAME_SIZE,
    V05,
    V09,
    v05,
    v09,
)

# The 0.5 tables, which most of the hand-written cases below use.
CLIENT_MESSAGES = v05.CLIENT_MESSAGES
AGENT_MESSAGES = v05.AGENT_MESSAGES
PRIORITY_MAX = (1 << 63) - 1

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
each_dialect = pytest.mark.parametrize("dialect", [d.tag for d in DIALECTS], ids=[d.name for d in DIALECTS])

SETTINGS = settings(
    max_examples=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)



def wrong(dialect: int) -> tuple[Any, ...]:
    """The outcome of a scan that met ``dialect``'s type key."""
    return "wrong dialect", dialect, f"frame is in dialect {DIALECTS[dialect].name}"


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
# 0.9: time estimates as the real client writes them, and anything else int() may or may not take.
time_values = ints | st.floats(allow_nan=False) | st.integers(-100, 10**30).map(str) | values
CLIENT_TYPED_09 = {
    "job_id": job_ids, "priority": ints, "course_id": texts, "task_id": texts,
    "environment_type": texts, "environment": texts, "launcher": texts, "name": texts,
    "inputdata": st.fixed_dictionaries({"@state": values}) | values,
    "environment_parameters": st.fixed_dictionaries(
        {"limits": st.fixed_dictionaries({"time": time_values, "memory": ints})}) | values,
}
AGENT_TYPED_09 = {
    "job_id": job_ids,
    "friendly_name": texts,
    "available_job_slots": st.integers(0, 2**64 - 1),
    "available_environments": st.dictionaries(
        texts, st.dictionaries(texts, st.fixed_dictionaries({"id": texts, "created": ints}) | values,
                               max_size=2), max_size=3
    ),
}
TYPED = {V05: (CLIENT_TYPED, AGENT_TYPED), V09: (CLIENT_TYPED_09, AGENT_TYPED_09)}


@st.composite
def messages(
    draw: Any, table: dict, typed: dict, type_key: str = "type", names: list[str] | None = None
) -> dict:
    """A valid message of one side as a dict, keys in random order."""
    name = draw(st.sampled_from(names or sorted(table)))
    fields = {field: draw(typed.get(field, values)) for field in table[name][1]}
    fields[type_key] = name
    order = draw(st.permutations(list(fields)))
    return {key: fields[key] for key in order}


client_messages = messages(CLIENT_MESSAGES, CLIENT_TYPED)
agent_messages = messages(AGENT_MESSAGES, AGENT_TYPED)
CLIENT_STRATEGIES = {
    d.tag: messages(d.client_messages, TYPED[d.tag][0], d.type_key) for d in DIALECTS
}
AGENT_STRATEGIES = {
    d.tag: messages(d.agent_messages, TYPED[d.tag][1], d.type_key) for d in DIALECTS
}


# -- the right implementation is loaded ------------------------------------------------

def test_compiled_module_is_loaded() -> None:
    """Unless FASTBACKEND_NO_EXTENSIONS is set, wire uses the compiled module: a broken build fails."""
    if NO_EXTENSIONS:
        assert wire.IMPL == "py"
        assert wire.scan_client is _wire_py.scan_client
    else:
        assert wire.IMPL == "c"
        compiled = importlib.import_module("fastbackend._wire_c")
        for name in ("scan_client", "queue_fields", "submission_state", "splice_new_job", "scan_agent",
                     "splice_job_done", "splice_ssh_debug", "job_started", "job_key"):
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
    assert len(impl.CLIENT_FIELD_KINDS) == len(impl.AGENT_FIELD_KINDS) == len(DIALECTS)
    for d in DIALECTS:
        for table, kinds, typed in (
            (d.client_messages, impl.CLIENT_FIELD_KINDS[d.tag], d.client_kinds),
            (d.agent_messages, impl.AGENT_FIELD_KINDS[d.tag], d.agent_kinds),
        ):
            declared = [field for _code, fields in table.values() for field in fields]
            assert list(kinds) == list(dict.fromkeys(declared))  # first-declaration order
            assert kinds == {field: typed.get(field, "any") for field in kinds}
    assert impl.CLIENT_FIELD_KINDS[V05]["job_id"] == "str"
    assert impl.CLIENT_FIELD_KINDS[V05]["inputdata"] == "any"
    assert impl.AGENT_FIELD_KINDS[V05]["job_id"] == "job_pair"
    assert impl.AGENT_FIELD_KINDS[V05]["available_job_slots"] == "uint"
    assert impl.CLIENT_FIELD_KINDS[V09]["priority"] == "int"
    assert impl.CLIENT_FIELD_KINDS[V09]["environment_type"] == "str"
    assert impl.AGENT_FIELD_KINDS[V09]["job_id"] == "str"
    assert impl.AGENT_FIELD_KINDS[V09]["available_environments"] == "map"


# -- differential tests against msgpack-python ----------------------------------------

def peer_decode(frame: bytes) -> dict:
    """A frame as the real 0.9 peers read it (they then build ``cls(**fields)``)."""
    return msgpack.loads(frame, use_list=False, strict_map_key=False)


def check_client(impl: Any, msg: dict, frame: bytes, ident: bytes, minimal: bool, dialect: int = V05) -> None:
    d = DIALECTS[dialect]
    msgtype = msg[d.type_key]
    code, job_id, environment, priority = impl.scan_client(frame, dialect)
    assert code == d.client_messages[msgtype][0]
    assert job_id == msg.get("job_id")
    if dialect == V09 and "environment" in msg:
        assert environment == (msg["environment_type"], msg["environment"])
    else:
        assert environment == msg.get("environment")
    assert priority == min(msg.get("priority", 0), PRIORITY_MAX)
    if code != CLIENT_NEW_JOB:
        assert outcome(impl.splice_new_job, frame, ident, dialect) == ("error", "not a client_new_job")
        assert outcome(impl.queue_fields, frame, dialect) == ("error", "not a client_new_job")
        if dialect == V09:
            assert outcome(impl.submission_state, frame, dialect) == ("error", "not a client_new_job")
        return
    decoded_in = protocol.decode(frame)
    if dialect == V09:
        time_value = v09.time_estimate(decoded_in["environment_parameters"])
        assert impl.submission_state(frame, dialect) == v09.input_state(decoded_in["inputdata"])
    else:
        time_value = msg["time_limit"]
        assert outcome(impl.submission_state, frame, dialect) == (
            "error", "only dialect 0.9 jobs carry a state")
    assert impl.queue_fields(frame, dialect) == (
        msg["job_id"], msg["course_id"], msg["task_id"], msg["launcher"], time_value
    )
    out = impl.splice_new_job(frame, ident, dialect)
    if impl is not _wire_py:  # a job that waited is spliced by its plan: the same bytes
        assert impl.splice_new_job_planned(frame, ident, dialect) == out
    # Splicing == decode, edit, re-encode.
    expected = dict(decoded_in)
    if dialect == V09:
        expected["@type"] = "BackendNewJob"
        del expected["priority"], expected["launcher"]
        backend = "BackendNewJob"
    else:
        expected["type"] = "backend_new_job"
        expected["job_id"] = (ident, expected["job_id"])
        del expected["launcher"]
        backend = "backend_new_job"
    decoded = protocol.decode(out)
    assert decoded == expected
    assert list(decoded) == list(expected)  # entries keep their order
    assert set(decoded) == set(d.backend_messages[backend]) | {d.type_key}
    if dialect == V09:
        assert peer_decode(out) == expected
    if minimal:
        assert out == pack(expected)


def check_agent(impl: Any, msg: dict, frame: bytes, minimal: bool, dialect: int = V05) -> None:
    d = DIALECTS[dialect]
    code, ident, job_id = impl.scan_agent(frame, dialect)
    assert code == d.agent_messages[msg[d.type_key]][0]
    if dialect == V09:
        assert (ident, job_id) == (None, msg.get("job_id"))
    elif "job_id" in msg:
        assert (ident, job_id) == msg["job_id"]
    else:
        assert (ident, job_id) == (None, None)
    splices = {
        V05: ((impl.splice_job_done, "agent_job_done", "backend_job_done"),
              (impl.splice_ssh_debug, "agent_job_ssh_debug", "backend_job_ssh_debug")),
        V09: ((impl.splice_job_done, "AgentJobDone", "BackendJobDone"),
              (impl.splice_ssh_debug, "AgentJobSSHDebug", "BackendJobSSHDebug")),
    }[dialect]
    for fn, msgtype, backend in splices:
        if msg[d.type_key] != msgtype:
            assert outcome(fn, frame, dialect) == ("error", f"not an {msgtype}")
            continue
        out = fn(frame, dialect)
        expected = protocol.decode(frame)
        expected[d.type_key] = backend
        if dialect == V05:
            expected["job_id"] = expected["job_id"][1]
        decoded = protocol.decode(out)
        assert decoded == expected
        assert list(decoded) == list(expected)
        assert set(decoded) == set(d.backend_messages[backend]) | {d.type_key}
        if dialect == V09:
            assert peer_decode(out) == expected
        if minimal:
            assert out == pack(expected)


@each_impl
@each_dialect
@SETTINGS
@given(data=st.data(), ident=identities)
def test_client_messages_match_msgpack(impl: Any, dialect: int, data: Any, ident: bytes) -> None:
    msg = data.draw(CLIENT_STRATEGIES[dialect])
    check_client(impl, msg, pack(msg), ident, minimal=True, dialect=dialect)


@each_impl
@each_dialect
@SETTINGS
@given(data=st.data())
def test_agent_messages_match_msgpack(impl: Any, dialect: int, data: Any) -> None:
    msg = data.draw(AGENT_STRATEGIES[dialect])
    check_agent(impl, msg, pack(msg), minimal=True, dialect=dialect)


@each_impl
@each_dialect
@SETTINGS
@given(data=st.data(), ident=identities, rnd=st.randoms(use_true_random=False))
def test_client_messages_wide_headers(impl: Any, dialect: int, data: Any, ident: bytes, rnd: Any) -> None:
    """The scanner does not assume minimal encodings (map16, str32, int64 for 1, ...)."""
    msg = data.draw(CLIENT_STRATEGIES[dialect])
    frame = wide_pack(msg, rnd)
    assert protocol.decode(frame) == protocol.decode(pack(msg))
    check_client(impl, msg, frame, ident, minimal=False, dialect=dialect)


@each_impl
@each_dialect
@SETTINGS
@given(data=st.data(), rnd=st.randoms(use_true_random=False))
def test_agent_messages_wide_headers(impl: Any, dialect: int, data: Any, rnd: Any) -> None:
    msg = data.draw(AGENT_STRATEGIES[dialect])
    frame = wide_pack(msg, rnd)
    assert protocol.decode(frame) == protocol.decode(pack(msg))
    check_agent(impl, msg, frame, minimal=False, dialect=dialect)


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


def new_job_09(**changes: Any) -> dict:
    """A ClientNewJob as the real 0.9 client writes it: dataclass fields in order, ``@type`` last."""
    msg = {
        "job_id": str(uuid.uuid4()), "priority": 10, "course_id": "LINGI1101", "task_id": "hello",
        "task_problems": {"q1": {"type": "code"}},
        "inputdata": {"q1": "print('hi')\n" * 70, "@lang": "python", "@state": "s1"},
        "environment_type": "docker", "environment": "default",
        "environment_parameters": {"limits": {"time": 30, "memory": 256}, "run_cmd": ""},
        "debug": False, "launcher": "frontend", "@type": "ClientNewJob",
    }
    msg.update(changes)
    return msg


def job_done_09(**changes: Any) -> dict:
    msg = {
        "job_id": str(uuid.uuid4()), "result": ("success", "Well done"), "grade": 100.0,
        "problems": {"q1": ("success", "ok")}, "tests": {}, "custom": {"x": [1, 2]}, "state": "st",
        "archive": b"\x1f\x8b" + bytes(3000), "stdout": "out", "stderr": "", "@type": "AgentJobDone",
    }
    msg.update(changes)
    return msg


def hello_09(**changes: Any) -> dict:
    msg = {"friendly_name": "a", "available_job_slots": 1,
           "available_environments": {"docker": {"default": {"id": "sha256:1", "created": 17}}},
           "@type": "AgentHello"}
    msg.update(changes)
    return msg


def ssh_09(**changes: Any) -> dict:
    msg = {"job_id": "j", "host": "h", "port": 22, "user": "worker", "password": "p",
           "@type": "AgentJobSSHDebug"}
    msg.update(changes)
    return msg


@each_impl
def test_big_containers(impl: Any) -> None:
    """array32 and map32 (65536 entries) inside pass-through values."""
    msg = new_job(inputdata={"a": list(range(65536)), "m": {str(i): i for i in range(65536)}})
    check_client(impl, msg, pack(msg), b"\x01", minimal=True)
    agent = job_done(custom=[None] * 65536, tests={i: None for i in range(65536)})
    check_agent(impl, agent, pack(agent), minimal=True)
    msg = new_job_09(task_problems={"a": list(range(65536)), "m": {str(i): i for i in range(65536)}})
    check_client(impl, msg, pack(msg), b"\x01", minimal=True, dialect=V09)
    agent = job_done_09(custom=[None] * 65536, tests={i: None for i in range(65536)})
    check_agent(impl, agent, pack(agent), minimal=True, dialect=V09)


@each_impl
def test_job_started_and_job_key(impl: Any) -> None:
    for job_id in ("", str(uuid.uuid4()), "é" * 40, "x" * 300, "y" * 70_000):
        for d in DIALECTS:
            frame = impl.job_started(job_id, d.tag)
            assert protocol.decode(frame) == {d.type_key: d.job_started_type, "job_id": job_id}
            assert protocol.decode(frame) == protocol.decode(d.encode(d.job_started_type, job_id=job_id))
            assert len(frame) == len(d.encode(d.job_started_type, job_id=job_id))  # shortest headers
        assert impl.job_started(job_id) == impl.job_started(job_id, V05)
        for ident in (b"\x00", b"\x00k\x8bEg", bytes(range(255))):
            key = impl.job_key(ident, job_id)
            assert key == impl.job_key(ident, job_id, V05)
            assert key == bytes((len(ident),)) + ident + job_id.encode("utf-8")
            assert wire.key_client(key) == ident and wire.key_job_id(key) == job_id
            assert wire.key_dialect(key) == V05
            # 0.9 job ids are global: the identity is not part of the key.
            key = impl.job_key(ident, job_id, V09)
            assert key == b"\x00" + job_id.encode("utf-8")
            assert wire.key_job_id(key) == job_id and wire.key_dialect(key) == V09
        assert impl.job_key(None, job_id, V09) == b"\x00" + job_id.encode("utf-8")
    for ident in (b"", bytes(256), None):
        assert outcome(impl.job_key, ident, "j") == ("error", "client identity must be 1..255 bytes")
    for ident in (b"", bytes(256)):
        for dialect, frame in ((V05, pack(new_job())), (V09, pack(new_job_09()))):
            assert outcome(impl.splice_new_job, frame, ident, dialect) == (
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
KILL_09 = {"job_id": "j1", "@type": "ClientKillJob"}

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
            agent = replace_value(hello_09(), "available_job_slots", raw)
            assert outcome(impl.scan_agent, agent, V09) == expected, raw
            # 0.9 priorities: any integer; beyond int64 served as the largest one.
            frame = replace_value(new_job_09(), "priority", raw)
            assert impl.scan_client(frame, V09)[3] == min(value, PRIORITY_MAX), raw


@each_impl
def test_near_miss_keys_and_types(impl: Any) -> None:
    """A key or type name one byte away from a real one (at any position) is unknown."""
    for table, scan, example, d in (
        (CLIENT_MESSAGES, impl.scan_client, KILL, DIALECTS[V05]),
        (AGENT_MESSAGES, impl.scan_agent, DONE, DIALECTS[V05]),
        (v09.CLIENT_MESSAGES, impl.scan_client, KILL_09, DIALECTS[V09]),
        (v09.AGENT_MESSAGES, impl.scan_agent, job_done_09(), DIALECTS[V09]),
    ):
        names = {f for _code, fields in table.values() for f in fields} | {d.type_key}
        for name in sorted(names):
            for i in range(len(name)):
                for other in ("_", "X", "\x80"):
                    key = name[:i] + other + name[i + 1:]
                    if key in names:
                        continue
                    frame = with_entry(example, str_bytes(key.encode("utf-8")), b"\xc0")
                    assert outcome(scan, frame, d.tag)[0] == "error"
                    assert outcome(scan, frame, d.tag)[1].startswith("unexpected key "), key
        for msgtype in sorted(table):
            for i in range(len(msgtype)):
                near = msgtype[:i] + "X" + msgtype[i + 1:]
                assert outcome(scan, pack({d.type_key: near}), d.tag) == (
                    "error", f"unknown message type {near!r}")


@each_impl
def test_frame_too_large(impl: Any) -> None:
    frame = bytes(MAX_FRAME_SIZE + 1)  # zero pages: never touched, the length is checked first
    for dialect in (V05, V09):
        assert outcome(impl.scan_client, frame, dialect) == ("error", "frame too large")
        assert outcome(impl.scan_agent, frame, dialect) == ("error", "frame too large")


@each_impl
def test_wrong_message_for_splicer(impl: Any) -> None:
    ssh = pack(
        {"type": "agent_job_ssh_debug", "job_id": (b"i", "j"), "host": "h", "port": 22, "password": "p"}
    )
    assert outcome(impl.splice_job_done, ssh) == ("error", "not an agent_job_done")
    assert outcome(impl.splice_ssh_debug, pack(DONE)) == ("error", "not an agent_job_ssh_debug")
    assert outcome(impl.splice_ssh_debug, pack({"type": "pong"})) == ("error", "not an agent_job_ssh_debug")
    assert outcome(impl.splice_new_job, pack(KILL), b"i") == ("error", "not a client_new_job")
    assert outcome(impl.splice_job_done, pack(ssh_09()), V09) == ("error", "not an AgentJobDone")
    assert outcome(impl.splice_ssh_debug, pack(job_done_09()), V09) == ("error", "not an AgentJobSSHDebug")
    assert outcome(impl.splice_ssh_debug, pack({"@type": "Pong"}), V09) == (
        "error", "not an AgentJobSSHDebug")
    assert outcome(impl.splice_new_job, pack(KILL_09), b"i", V09) == ("error", "not a client_new_job")
    assert outcome(impl.queue_fields, pack({"@type": "Ping"}), V09) == ("error", "not a client_new_job")
    assert outcome(impl.submission_state, pack({"@type": "Ping"}), V09) == ("error", "not a client_new_job")
    assert outcome(impl.queue_fields, pack({"type": "ping"})) == ("error", "not a client_new_job")


@each_impl
def test_every_truncation_is_refused(impl: Any) -> None:
    """Every proper prefix of a valid frame is a truncated frame, never anything else."""
    for frame, scan, dialect in (
        (wide_pack(new_job(), random.Random(7)), impl.scan_client, V05),
        (pack(new_job(inputdata={"a": [1, 2.5, None, {"b": b"x" * 40}], "e": msgpack.ExtType(3, b"abcd")})),
         impl.scan_client, V05),
        (pack(job_done()), impl.scan_agent, V05),
        (pack(hello(available_containers={"default": {"id": "sha256:1", "created": 17}})),
         impl.scan_agent, V05),
        (wide_pack(new_job_09(priority=-(2**63)), random.Random(7)), impl.scan_client, V09),
        (pack(job_done_09()), impl.scan_agent, V09),
        (pack(hello_09()), impl.scan_agent, V09),
    ):
        scan(frame, dialect)
        for cut in range(len(frame)):
            assert outcome(scan, frame[:cut], dialect) == ("error", "truncated frame"), cut


# -- dialect 0.9 specifics ----------------------------------------------------------------

CLIENT_BAD_09 = [
    ("not a map", pack(["ClientHello"]), "not a map"),
    ("@type int", pack({"@type": 2}), "@type must be a str"),
    ("@type bin", pack({"@type": b"Ping"}), "@type must be a str"),
    ("missing @type", pack({"job_id": "j"}), "missing key '@type'"),
    ("0.5 type name", pack({"@type": "client_new_job"}), "unknown message type 'client_new_job'"),
    ("agent type", pack({"@type": "Pong"}), "unknown message type 'Pong'"),
    ("backend type", pack({"@type": "BackendJobStarted", "job_id": "j"}),
     "unknown message type 'BackendJobStarted'"),
    ("extra known key", pack({**KILL_09, "priority": 1}), "unexpected key 'priority' for ClientKillJob"),
    ("0.5 field", pack(new_job_09(time_limit=30)), "unexpected key 'time_limit'"),
    ("missing key", pack({k: v for k, v in new_job_09().items() if k != "environment_type"}),
     "missing key 'environment_type' for ClientNewJob"),
    ("missing priority", pack({k: v for k, v in new_job_09().items() if k != "priority"}),
     "missing key 'priority' for ClientNewJob"),
    ("duplicate @type", with_entry(KILL_09, pack("@type"), pack("ClientKillJob")), "duplicate key '@type'"),
    ("priority float", pack(new_job_09(priority=1.0)), "priority must be an int"),
    ("priority str", pack(new_job_09(priority="1")), "priority must be an int"),
    ("priority nil", pack(new_job_09(priority=None)), "priority must be an int"),
    ("environment_type nil", pack(new_job_09(environment_type=None)), "environment_type must be a str"),
    ("environment_type bad utf-8", replace_value(new_job_09(), "environment_type", str_bytes(b"\xff")),
     "environment_type is not valid UTF-8"),
    ("job_id pair", pack({**KILL_09, "job_id": (b"i", "j")}), "job_id must be a str"),
    ("truncated", pack(new_job_09())[:-1], "truncated frame"),
    ("trailing bytes", pack(KILL_09) + b"\x00", "trailing bytes after message"),
    ("too deep", replace_value(new_job_09(), "environment_parameters", nested(512)), "nesting too deep"),
]


@each_impl
@pytest.mark.parametrize(
    ("frame", "reason"), [c[1:] for c in CLIENT_BAD_09], ids=[c[0] for c in CLIENT_BAD_09])
def test_bad_client_frames_09(impl: Any, frame: bytes, reason: str) -> None:
    assert outcome(impl.scan_client, frame, V09) == ("error", reason)
    assert outcome(impl.queue_fields, frame, V09) == ("error", reason)
    assert outcome(impl.submission_state, frame, V09) == ("error", reason)
    assert outcome(impl.splice_new_job, frame, b"\x00abc", V09) == ("error", reason)


AGENT_BAD_09 = [
    ("job_id pair", pack(job_done_09(job_id=(b"i", "j"))), "job_id must be a str"),
    ("job_id bin", pack(job_done_09(job_id=b"j")), "job_id must be a str"),
    ("job_id bad utf-8", replace_value(job_done_09(), "job_id", str_bytes(b"\xc0\x80")),
     "job_id is not valid UTF-8"),
    ("missing state", pack({k: v for k, v in job_done_09().items() if k != "state"}),
     "missing key 'state' for AgentJobDone"),
    ("ssh without user", pack({k: v for k, v in ssh_09().items() if k != "user"}),
     "missing key 'user' for AgentJobSSHDebug"),
    ("extra known key", pack(job_done_09(host="h")), "unexpected key 'host' for AgentJobDone"),
    ("0.5 field", pack(hello_09(available_containers={})), "unexpected key 'available_containers'"),
    ("slots negative", pack(hello_09(available_job_slots=-1)), "available_job_slots must be >= 0"),
    ("environments list", pack(hello_09(available_environments=["docker"])),
     "available_environments must be a map"),
    ("client type", pack({"@type": "Ping"}), "unknown message type 'Ping'"),
    ("0.5 type name", pack({"@type": "pong"}), "unknown message type 'pong'"),
]


@each_impl
@pytest.mark.parametrize(
    ("frame", "reason"), [c[1:] for c in AGENT_BAD_09], ids=[c[0] for c in AGENT_BAD_09])
def test_bad_agent_frames_09(impl: Any, frame: bytes, reason: str) -> None:
    assert outcome(impl.scan_agent, frame, V09) == ("error", reason)
    assert outcome(impl.splice_job_done, frame, V09) == ("error", reason)
    assert outcome(impl.splice_ssh_debug, frame, V09) == ("error", reason)


def type_first(msg: dict, type_key: str) -> dict:
    return {type_key: msg[type_key], **{k: v for k, v in msg.items() if k != type_key}}


def type_last(msg: dict, type_key: str) -> dict:
    return {**{k: v for k, v in msg.items() if k != type_key}, type_key: msg[type_key]}


CLIENT_09 = [new_job_09(), KILL_09, {"name": "webapp", "@type": "ClientHello"}, {"@type": "ClientGetQueue"},
             {"@type": "Ping"}]
AGENT_09 = [job_done_09(), hello_09(), {"@type": "Pong"}]
CLIENT_05 = [new_job(), KILL, {"type": "client_hello", "name": "webapp"}, {"type": "client_get_queue"},
             {"type": "ping"}]
AGENT_05 = [DONE, hello(), {"type": "pong"}]


@each_impl
@pytest.mark.parametrize("order", [type_last, type_first], ids=["type key last", "type key first"])
def test_wrong_dialect(impl: Any, order: Any) -> None:
    """A frame holding the other dialect's type key says which dialect it is in.

    The real 0.9 peers write ``@type`` last, so a 0.9 frame read as 0.5 meets a field 0.5
    does not declare first; the search for a foreign type key then finds it further on.
    """
    for msgs, scan, dialect, other in (
        (CLIENT_09, impl.scan_client, V05, V09), (AGENT_09, impl.scan_agent, V05, V09),
        (CLIENT_05, impl.scan_client, V09, V05), (AGENT_05, impl.scan_agent, V09, V05),
    ):
        for msg in msgs:
            frame = pack(order(msg, DIALECTS[other].type_key))
            if scan is impl.scan_agent and "job_id" in msg:
                continue  # below: the job id's kind differs, and is checked first
            assert outcome(scan, frame, dialect) == wrong(other), msg
            assert scan(frame, other)[0] > 0  # and it is a good frame of its own dialect
    for fn, args in (
        (impl.queue_fields, (pack(new_job_09()), V05)),
        (impl.splice_new_job, (pack(new_job_09()), b"i", V05)),
        (impl.submission_state, (pack(type_first(new_job(), "type")), V09)),
        (impl.splice_job_done, (pack(type_first(job_done_09(), "@type")), V05)),
        (impl.splice_ssh_debug, (pack(type_first(ssh_09(), "@type")), V05)),
        (impl.splice_job_done, (pack(type_first(DONE, "type")), V09)),
    ):
        assert outcome(fn, *args)[0] == "wrong dialect"


@each_impl
def test_job_id_kind_is_checked_before_the_type_key(impl: Any) -> None:
    """An agent's job id is a pair in 0.5, a str in 0.9: read as the other dialect, a result
    fails on it before the type key is reached (the broker then tries the other dialect)."""
    for msg in (job_done_09(), ssh_09(), {"job_id": "j", "@type": "AgentJobStarted"}):
        assert outcome(impl.scan_agent, pack(msg), V05) == ("error", "job_id must be [bin, str]")
        assert outcome(impl.scan_agent, pack(type_first(msg, "@type")), V05) == wrong(V09)
    for msg in (DONE, {"type": "agent_job_started", "job_id": (b"i", "j")}):
        assert outcome(impl.scan_agent, pack(type_last(msg, "type")), V09) == (
            "error", "job_id must be a str")
        assert outcome(impl.scan_agent, pack(type_first(msg, "type")), V09) == wrong(V05)


@each_impl
def test_both_type_keys(impl: Any) -> None:
    """A frame with both type keys is in the other dialect whichever it is read as."""
    for frame in (
        pack({"type": "ping", "@type": "Ping"}), pack({"@type": "Ping", "type": "ping"}),
        pack({**KILL, "@type": "ClientKillJob"}), pack({**KILL_09, "type": "client_kill_job"}),
    ):
        assert outcome(impl.scan_client, frame, V05) == wrong(V09)
        assert outcome(impl.scan_client, frame, V09) == wrong(V05)
    frame = pack({"type": "pong", "@type": "Pong"})
    assert outcome(impl.scan_agent, frame, V05) == wrong(V09)
    assert outcome(impl.scan_agent, frame, V09) == wrong(V05)


@each_impl
def test_foreign_key_search_stops_at_bad_bytes(impl: Any) -> None:
    """After an unknown key, a frame that does not read further is reported by that key."""
    head = b"\x83" + pack("priority") + b"\x01"
    for tail, reason in (
        (b"", "unexpected key 'priority'"),  # truncated before the type key
        (pack(1) + pack("x") + pack("@type") + pack("Ping"), "unexpected key 'priority'"),  # non-str key
        (pack("x") + b"\xc1" + pack("@type") + pack("Ping"), "unexpected key 'priority'"),  # bad value
    ):
        assert outcome(impl.scan_client, head + tail, V05) == ("error", reason)
    found = head + pack("x") + b"\xc0" + pack("@type") + pack("Ping")
    assert outcome(impl.scan_client, found, V05) == wrong(V09)


@each_impl
def test_priority_and_environment_09(impl: Any) -> None:
    for priority in (0, 1, -1, -(2**63), 2**63 - 1, 2**63, 2**64 - 1):
        msg = new_job_09(priority=priority, environment_type="mcq", environment="default")
        code, job_id, environment, got = impl.scan_client(pack(msg), V09)
        assert (code, job_id, environment, got) == (
            CLIENT_NEW_JOB, msg["job_id"], ("mcq", "default"), min(priority, PRIORITY_MAX))
        check_client(impl, msg, pack(msg), b"i", minimal=True, dialect=V09)
    assert impl.scan_client(pack(KILL_09), V09) == (protocol.CLIENT_KILL_JOB, "j1", None, 0)
    assert impl.scan_client(pack(new_job()), V05)[2:] == ("default", 0)  # 0.5: a name, no priority


TIME_CASES = [
    ("int", {"limits": {"time": 30}}, 30),
    ("float", {"limits": {"time": 2.9}}, 2),
    ("str", {"limits": {"time": "30"}}, 30),
    ("str float", {"limits": {"time": "3.5"}}, -1),
    ("bool", {"limits": {"time": True}}, 1),
    ("nil", {"limits": {"time": None}}, -1),
    ("no time", {"limits": {"memory": 100}}, -1),
    ("no limits", {}, -1),
    ("limits list", {"limits": [30]}, -1),
    ("not a dict", "limits", -1),
    ("nil parameters", None, -1),
    ("largest", {"limits": {"time": 2**64 - 1}}, 2**64 - 1),
    ("smallest", {"limits": {"time": -(2**63)}}, -(2**63)),
    ("huge float", {"limits": {"time": 1e30}}, -1),
    ("huge str", {"limits": {"time": "9" * 30}}, -1),
    ("below int64 str", {"limits": {"time": str(INT_MIN - 1)}}, -1),
    ("beyond uint64 str", {"limits": {"time": str(INT_END)}}, -1),
]


@each_impl
@pytest.mark.parametrize(
    ("parameters", "expected"), [c[1:] for c in TIME_CASES], ids=[c[0] for c in TIME_CASES])
def test_queue_fields_time_estimate(impl: Any, parameters: Any, expected: int) -> None:
    msg = new_job_09(environment_parameters=parameters)
    assert impl.queue_fields(pack(msg), V09) == (
        msg["job_id"], msg["course_id"], msg["task_id"], msg["launcher"], expected)
    assert expected == v09.time_estimate(parameters)


# -- pass-through values the receiver's loader refuses -----------------------------------
#
# A pass-through value is forwarded byte for byte to a peer that decodes it with its own
# msgpack (0.5: msgpack 0.6, ``encoding="utf8", use_list=False``, i.e. ``raw=False`` and
# any map key; 0.9: msgpack 1.x, ``use_list=False, strict_map_key=False``).  What that
# loader raises on would stop the peer's receive loop, so the scanner refuses it
# (``fuzz.receivers.receiver_loads`` is that loader; tests/fuzz/fuzz_wire.py checks it on
# every splice the fuzzer finds).

TS = b"\xd6\xff\x00\x00\x00\x01"  # timestamp32: 1 s
REFUSED_VALUES = [
    # (id, raw value, reason, or None if the dialect's loader accepts it), reason per dialect
    ("bad utf-8 str", b"\xa3a\xffb", "invalid UTF-8 in a str", "invalid UTF-8 in a str"),
    ("bad utf-8 str8", b"\xd9\x03\xed\xa0\x80", "invalid UTF-8 in a str", "invalid UTF-8 in a str"),
    ("bad utf-8 deep in a map", b"\x81\xa1k\x91\x92\xc0\xa2\xc3\x28", "invalid UTF-8 in a str",
     "invalid UTF-8 in a str"),
    ("bad utf-8 map key", b"\x81\xa1\x80\xc0", "invalid UTF-8 in a str", "invalid UTF-8 in a str"),
    ("bad utf-8 after ascii", b"\xd9\x28" + b"x" * 39 + b"\xff", "invalid UTF-8 in a str",
     "invalid UTF-8 in a str"),
    ("truncated utf-8 at end", b"\xd9\x22" + b"x" * 33 + b"\xe2", "invalid UTF-8 in a str",
     "invalid UTF-8 in a str"),
    ("map as key", b"\x81\x80\xc0", "map as a map key", "map as a map key"),
    ("map in an array key", b"\x81\x92\x01\x81\xa1a\xc0\xc0", "map as a map key", "map as a map key"),
    ("map16 as key", b"\x81\xde\x00\x00\xc0", "map as a map key", "map as a map key"),
    ("map as 2nd key", b"\x82\x01\x02\x81\xa1a\x01\x03", "map as a map key", "map as a map key"),
    ("ext -2", b"\xd4\xfe\x00", "reserved ext type -2", "reserved ext type -2"),
    ("ext8 -128", b"\xc7\x00\x80", "reserved ext type -128", "reserved ext type -128"),
    ("timestamp32", TS, "reserved ext type -1", None),
    ("timestamp64", b"\xd7\xff" + ((999_999_999 << 34) | 5).to_bytes(8, "big"), "reserved ext type -1", None),
    ("timestamp96", b"\xc7\x0c\xff" + (999_999_999).to_bytes(4, "big") + bytes(8), "reserved ext type -1",
     None),
    ("timestamp as key", b"\x81" + TS + b"\xc0", "reserved ext type -1", None),
    ("timestamp of 3 bytes", b"\xc7\x03\xff\x00\x00\x00", "reserved ext type -1", "invalid timestamp"),
    ("timestamp of 16 bytes", b"\xd8\xff" + bytes(16), "reserved ext type -1", "invalid timestamp"),
    ("timestamp64 ns too big", b"\xd7\xff" + (10**9 << 34).to_bytes(8, "big"), "reserved ext type -1",
     "invalid timestamp"),
    ("timestamp96 ns too big", b"\xc7\x0c\xff" + (10**9).to_bytes(4, "big") + bytes(8),
     "reserved ext type -1", "invalid timestamp"),
    # Accepted by both loaders (hashable keys, application ext types, bin of any bytes).
    ("array key", b"\x81\x92\x01\xa1a\xc0", None, None),
    ("nested array key", b"\x81\x91\x91\x90\xc0", None, None),
    ("int, nil, float keys", b"\x83\x01\xc0\xc0\xc0\xca\x00\x00\x00\x00\xc0", None, None),
    ("map as value after array key", b"\x81\x91\x01\x81\xa1a\x80", None, None),
    ("ext 127", b"\xd4\x7f\x00", None, None),
    ("bin of any bytes", b"\xc4\x02\xff\xfe", None, None),
    ("utf-8 of every length", b"\xaa" + "aé€𝄞".encode(), None, None),
]


def _refused_frames(raw: bytes, dialect: int) -> list[tuple[str, Any, tuple]]:
    """Every pass-through field of both sides of ``dialect`` holding ``raw``: (what, call, args)."""
    if dialect == V05:
        client = [replace_value(new_job(), field, raw) for field in ("inputdata", "debug", "enable_network")]
        agent = [replace_value(DONE, field, raw) for field in ("custom", "problems", "result", "stdout")]
        agent.append(replace_value(hello(), "available_containers", b"\x81\xa1e" + raw))
    else:
        client = [replace_value(new_job_09(), field, raw)
                  for field in ("inputdata", "task_problems", "environment_parameters", "debug")]
        agent = [replace_value(job_done_09(), field, raw) for field in ("custom", "state", "tests")]
    return ([("splice_new_job", frame, (frame, b"\x00k\x8bEg", dialect)) for frame in client]
            + [("scan_agent", frame, (frame, dialect)) for frame in agent])


@each_impl
@pytest.mark.parametrize("dialect", [V05, V09], ids=["0.5", "0.9"])
@pytest.mark.parametrize(("raw", "reason05", "reason09"), [c[1:] for c in REFUSED_VALUES],
                         ids=[c[0] for c in REFUSED_VALUES])
def test_values_the_receivers_loader_refuses_are_refused(impl: Any, dialect: int, raw: bytes,
                                                         reason05: str | None, reason09: str | None) -> None:
    """Whatever the receiving peer's loader raises on is a WireError at scan time, with the
    same reason in both twins; whatever it reads passes, and the spliced frame loads."""
    reason = reason05 if dialect == V05 else reason09
    for name, frame, args in _refused_frames(raw, dialect):
        got = outcome(getattr(impl, name), *args)
        if reason is not None:
            assert got == ("error", reason), (name, frame)
            continue
        assert got[0] == "ok", (name, got)
        out = impl.splice_new_job(*args) if name == "splice_new_job" else frame
        receiver_loads(out, dialect)
        if name == "scan_agent" and impl.scan_agent(frame, dialect)[0] == protocol.AGENT_JOB_DONE:
            receiver_loads(impl.splice_job_done(frame, dialect), dialect)


# (id, raw value, dialect) for each dialect whose receiver refuses the value.
_REFUSED_BY = [(f"{c[0]}-{name}", c[1], dialect) for c in REFUSED_VALUES
               for dialect, name, reason in ((V05, "0.5", c[2]), (V09, "0.9", c[3])) if reason is not None]


@each_impl
@pytest.mark.parametrize(("raw", "dialect"), [c[1:] for c in _REFUSED_BY], ids=[c[0] for c in _REFUSED_BY])
def test_the_refused_values_really_break_the_receiver(impl: Any, dialect: int, raw: bytes) -> None:
    """The cases above are real: a frame holding one, as msgpack writes it, makes the
    receiver's loader raise (in each dialect that refuses it)."""
    frame = replace_value(new_job(), "inputdata", raw)
    with pytest.raises((ValueError, TypeError)):  # UnicodeDecodeError is a ValueError
        receiver_loads(frame, dialect)


STATE_CASES = [
    ("str", {"@state": "abc", "q1": "x"}, "abc"),
    ("dict", {"@state": {"step": [1, 2]}}, {"step": (1, 2)}),
    ("nil", {"@state": None}, None),
    ("no state", {"q1": "x"}, ""),
    ("empty", {}, ""),
    ("str input", "@state", ""),
    ("list input", ["@state"], ""),
    ("nil input", None, ""),
]


@each_impl
@pytest.mark.parametrize(
    ("inputdata", "expected"), [c[1:] for c in STATE_CASES], ids=[c[0] for c in STATE_CASES])
def test_submission_state(impl: Any, inputdata: Any, expected: Any) -> None:
    assert impl.submission_state(pack(new_job_09(inputdata=inputdata)), V09) == expected
    assert impl.submission_state(pack(new_job_09(inputdata=inputdata))) == expected  # 0.9 is the default


@each_impl
def test_submission_state_is_09_only(impl: Any) -> None:
    for frame in (pack(new_job()), b"garbage"):
        assert outcome(impl.submission_state, frame, V05) == ("error", "only dialect 0.9 jobs carry a state")


@each_impl
def test_splices_09_as_the_real_peers_read_them(impl: Any) -> None:
    """0.9 peers build ``cls(**fields)`` from the decoded map: exactly the dataclass's fields."""
    msg = new_job_09()
    out = peer_decode(impl.splice_new_job(pack(msg), b"ident", V09))
    assert out.pop("@type") == "BackendNewJob"
    assert tuple(out) == v09.BACKEND_MESSAGES["BackendNewJob"]
    assert out == {k: protocol.decode(pack(v)) for k, v in msg.items() if k in out}
    for agent, backend in ((job_done_09(), "BackendJobDone"), (ssh_09(), "BackendJobSSHDebug")):
        fn = impl.splice_job_done if backend == "BackendJobDone" else impl.splice_ssh_debug
        out = peer_decode(fn(pack(agent), V09))
        assert out.pop("@type") == backend
        assert tuple(out) == v09.BACKEND_MESSAGES[backend]


@each_impl
def test_nesting_limit_09(impl: Any) -> None:
    ok = replace_value(new_job_09(), "environment_parameters", nested(511))
    assert impl.scan_client(ok, V09)[0] == CLIENT_NEW_JOB
    assert impl.queue_fields(ok, V09)[4] == -1
    frame = pack(type_first(hello_09(available_environments={}), "@type"))  # the map last, {} = 0x80
    assert impl.scan_agent(frame[:-1] + b"\x81\xc0" + nested(510), V09)[0] == AGENT_HELLO
    assert outcome(impl.scan_agent, frame[:-1] + b"\x81\xc0" + nested(511), V09) == (
        "error", "nesting too deep")


@each_impl
def test_bad_dialect_tag(impl: Any) -> None:
    """A tag that names no dialect is a caller's bug: IndexError, never a scan with other tables."""
    for fn, args in ((impl.scan_client, (pack(KILL),)), (impl.scan_agent, (pack(DONE),)),
                     (impl.job_started, ("j",))):
        with pytest.raises(IndexError):
            fn(*args, len(DIALECTS))


# -- the twins agree on anything --------------------------------------------------------

if not NO_EXTENSIONS:
    C, PY = IMPLS["c"], IMPLS["py"]
    IDENT = b"\x00k\x8bEg"

    def agree(frame: bytes) -> None:
        """Both implementations give the same result, or the same WireError reason (and
        WrongDialect dialect), for every function, reading the frame as either dialect."""
        for dialect in (V05, V09):
            for name, args in (
                ("scan_client", (frame, dialect)),
                ("queue_fields", (frame, dialect)),
                ("submission_state", (frame, dialect)),
                ("splice_new_job", (frame, IDENT, dialect)),
                ("scan_agent", (frame, dialect)),
                ("splice_job_done", (frame, dialect)),
                ("splice_ssh_debug", (frame, dialect)),
            ):
                assert outcome(getattr(C, name), *args) == outcome(getattr(PY, name), *args), (name, dialect)
            # The splice of a job that waited (from its plan) is the splice of its scan.
            assert (outcome(C.splice_new_job_planned, frame, IDENT, dialect)
                    == outcome(C.splice_new_job, frame, IDENT, dialect)), dialect

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
        agree(b"\x82\xa5@type" + tail)
        agree(b"\x8c\xa8priority\x01" + tail)  # an unknown key to 0.5: the foreign-key search

    ALL_KEYS = sorted(
        {f for d in DIALECTS for t in (d.client_messages, d.agent_messages) for _c, fields in t.values()
         for f in fields} | {d.type_key for d in DIALECTS}
    )
    ALL_TYPES = sorted(
        {name for d in DIALECTS for t in (d.client_messages, d.agent_messages, d.backend_messages)
         for name in t}
    )
    any_typed = st.one_of(*(s for typed in (CLIENT_TYPED, AGENT_TYPED, CLIENT_TYPED_09, AGENT_TYPED_09)
                            for s in typed.values()))

    @SETTINGS
    @given(
        st.dictionaries(st.sampled_from(ALL_KEYS) | st.text(max_size=5), values | any_typed, max_size=13),
        st.sampled_from(ALL_TYPES) | st.text(max_size=5) | ints,
        st.randoms(use_true_random=False),
    )
    def test_twins_agree_on_near_messages(fields: dict, msgtype: Any, rnd: Any) -> None:
        """Maps of known keys with values of any kind: the key-set and typed-field checks."""
        if rnd.random() < 0.9:
            fields = {**fields, rnd.choice([d.type_key for d in DIALECTS]): msgtype}
        agree(pack(fields))
        agree(wide_pack(fields, rnd))

    @SETTINGS
    @given(
        st.one_of(*CLIENT_STRATEGIES.values(), *AGENT_STRATEGIES.values()),
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

    @pytest.mark.parametrize("frame", [
        pack(new_job(inputdata={"a": [1, -2, 2.5], "b": msgpack.ExtType(1, b"xy")})),
        pack(new_job_09(inputdata={"@state": "s", "b": msgpack.ExtType(1, b"xy")}, task_problems={},
                        environment_parameters={"limits": {"time": "30"}})),
        pack(job_done_09(archive=b"zz")),
    ], ids=["client_new_job", "ClientNewJob", "AgentJobDone"])
    def test_twins_agree_on_every_truncation_and_byte_flip(frame: bytes) -> None:
        for cut in range(len(frame) + 1):
            agree(frame[:cut])
        for i in range(len(frame)):
            for byte in (0x00, 0x7F, 0x80, 0xC1, 0xDD, 0xFF, frame[i] ^ 0x01):
                agree(frame[:i] + bytes((byte,)) + frame[i + 1:])


@SETTINGS
@given(st.integers(0, 100), st.binary(max_size=4), st.integers(0, 100))
def test_utf8_is_checked_wherever_a_long_ascii_run_breaks(before: int, middle: bytes, after: int) -> None:
    """The scanner reads ASCII 32 and 8 bytes at a time: non-ASCII bytes at any offset of a
    long str are checked exactly as Python's strict decoder checks them, in a top-level field
    (_utf8_valid) and nested in a pass-through value (_skip's _str_valid)."""
    raw = b"a" * before + middle + b"b" * after
    try:
        raw.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    top_level = replace_value(KILL, "job_id", str_bytes(raw))
    nested = replace_value(new_job(), "inputdata", b"\x81" + pack("answer") + str_bytes(raw))
    for impl in IMPLS.values():
        for frame in (top_level, nested):
            result = outcome(impl.scan_client, frame, V05)
            assert (result[0] == "ok") == valid, (impl, raw, result)


@pytest.mark.skipif(NO_EXTENSIONS, reason="same_bytes is the compiled scanner's")
@SETTINGS
@given(st.binary(max_size=80), st.integers(0, 79), st.integers(1, 255))
def test_same_bytes_is_equality_at_every_length_and_offset(data: bytes, at: int, flip: int) -> None:
    """The compiled modules compare keys, job ids and identities with same_bytes (fixed-size
    loads, overlapping words, a word loop past 32 bytes) instead of memcmp: equal bytes are
    equal, and one flipped byte anywhere is seen, at every length."""
    same = IMPLS["c"]._same_bytes
    assert same(data, bytes(data))
    if data:
        i = at % len(data)
        other = data[:i] + bytes((data[i] ^ flip,)) + data[i + 1:]
        assert not same(data, other) and not same(other, data)
