"""Micro-benchmarks of the wire hot path, compiled and pure twins against plain msgpack.

Per job the broker turns a ``client_new_job`` into a ``backend_new_job`` (scan it, splice
the job id and type) and an ``agent_job_done`` into a ``backend_job_done``; in dialect
0.9 a ``ClientNewJob`` into a ``BackendNewJob`` (priority and launcher dropped) and an
``AgentJobDone`` into a ``BackendJobDone`` (only ``@type`` changes).  The
``msgpack`` rows do what a straightforward broker would: ``unpackb`` the whole message,
edit the dict, ``packb`` it again.  Frames are built outside the timed call; each call
is one message, with a 1 KiB or a 1 MiB payload (the input data of the job, the archive
of the result).
"""

from __future__ import annotations

import importlib

import msgpack
import pytest

from fastbackend.protocol import V09

IDENTITY = b"\x00\x6b\x8b\x45\x67"  # what a ROUTER assigns: 5 bytes
JOB_ID = "0f8e5c1a-4a52-4b7e-9a1d-2c3b4d5e6f70"
SIZES = {"1KiB": 1024, "1MiB": 1024 * 1024}
IMPLS = ["c", "py", "msgpack"]


def wire_module(impl: str):
    """The wire implementation under test; a missing compiled module fails, never skips."""
    return importlib.import_module(f"fastbackend._wire_{impl}")


def new_job_frame(size: int) -> bytes:
    return msgpack.packb({
        "type": "client_new_job", "job_id": JOB_ID, "course_id": "course", "task_id": "task",
        "inputdata": {"answer": "x" * size, "@lang": "python3"}, "environment": "default",
        "enable_network": False, "time_limit": 30, "hard_time_limit": 90, "mem_limit": 256,
        "debug": False, "launcher": "frontend",
    }, use_bin_type=True)


def job_done_frame(size: int) -> bytes:
    return msgpack.packb({
        "type": "agent_job_done", "job_id": (IDENTITY, JOB_ID), "result": ("success", "ok"),
        "grade": 100.0, "problems": {"q1": ("success", "well done")}, "tests": {}, "custom": {},
        "archive": b"a" * size, "stdout": "ran 12 tests", "stderr": "",
    }, use_bin_type=True)


def new_job_frame_09(size: int) -> bytes:
    # As the real 0.9 client writes it: the dataclass fields in order, "@type" last.
    return msgpack.packb({
        "job_id": JOB_ID, "priority": 10, "course_id": "course", "task_id": "task",
        "task_problems": {"q1": {"type": "code"}}, "inputdata": {"answer": "x" * size, "@lang": "python3"},
        "environment_type": "docker", "environment": "default",
        "environment_parameters": {"limits": {"time": 30, "memory": 256}},
        "debug": False, "launcher": "frontend", "@type": "ClientNewJob",
    }, use_bin_type=True)


def job_done_frame_09(size: int) -> bytes:
    return msgpack.packb({
        "job_id": JOB_ID, "result": ("success", "ok"), "grade": 100.0,
        "problems": {"q1": ("success", "well done")}, "tests": {}, "custom": {}, "state": "",
        "archive": b"a" * size, "stdout": "ran 12 tests", "stderr": "", "@type": "AgentJobDone",
    }, use_bin_type=True)


def msgpack_new_job_09(frame: bytes) -> bytes:
    message = msgpack.unpackb(frame, raw=False, use_list=False)
    del message["priority"], message["launcher"]
    message["@type"] = "BackendNewJob"
    return msgpack.packb(message, use_bin_type=True)


def msgpack_job_done_09(frame: bytes) -> bytes:
    message = msgpack.unpackb(frame, raw=False, use_list=False)
    message["@type"] = "BackendJobDone"
    return msgpack.packb(message, use_bin_type=True)


def msgpack_new_job(frame: bytes, identity: bytes) -> bytes:
    message = msgpack.unpackb(frame, raw=False, use_list=False)
    del message["launcher"]
    message["type"] = "backend_new_job"
    message["job_id"] = (identity, message["job_id"])
    return msgpack.packb(message, use_bin_type=True)


def msgpack_job_done(frame: bytes) -> bytes:
    message = msgpack.unpackb(frame, raw=False, use_list=False)
    message["type"] = "backend_job_done"
    message["job_id"] = message["job_id"][1]
    return msgpack.packb(message, use_bin_type=True)


@pytest.mark.parametrize("size", list(SIZES), ids=[f"payload_{s}" for s in SIZES])
@pytest.mark.parametrize("impl", IMPLS)
def test_wire_client_new_job_to_backend_new_job(benchmark, impl, size):
    frame = new_job_frame(SIZES[size])
    benchmark.group = f"wire client_new_job -> backend_new_job, {size}"
    if impl == "msgpack":
        out = benchmark(msgpack_new_job, frame, IDENTITY)
    else:
        wire = wire_module(impl)
        scan_client, splice_new_job = wire.scan_client, wire.splice_new_job

        def broker_step() -> bytes:
            scan_client(frame)
            return splice_new_job(frame, IDENTITY)

        out = benchmark(broker_step)
    # Every implementation must produce the same message, or the comparison means nothing.
    assert msgpack.unpackb(out, raw=False, use_list=False) == msgpack.unpackb(
        msgpack_new_job(frame, IDENTITY), raw=False, use_list=False)


@pytest.mark.parametrize("size", list(SIZES), ids=[f"payload_{s}" for s in SIZES])
@pytest.mark.parametrize("impl", IMPLS)
def test_wire_agent_job_done_to_backend_job_done(benchmark, impl, size):
    frame = job_done_frame(SIZES[size])
    benchmark.group = f"wire agent_job_done -> backend_job_done, {size}"
    if impl == "msgpack":
        out = benchmark(msgpack_job_done, frame)
    else:
        wire = wire_module(impl)
        scan_agent, splice_job_done = wire.scan_agent, wire.splice_job_done

        def broker_step() -> bytes:
            scan_agent(frame)
            return splice_job_done(frame)

        out = benchmark(broker_step)
    assert msgpack.unpackb(out, raw=False, use_list=False) == msgpack.unpackb(
        msgpack_job_done(frame), raw=False, use_list=False)


@pytest.mark.parametrize("size", list(SIZES), ids=[f"payload_{s}" for s in SIZES])
@pytest.mark.parametrize("impl", IMPLS)
def test_wire_09_client_new_job_to_backend_new_job(benchmark, impl, size):
    frame = new_job_frame_09(SIZES[size])
    benchmark.group = f"wire 0.9 ClientNewJob -> BackendNewJob, {size}"
    if impl == "msgpack":
        out = benchmark(msgpack_new_job_09, frame)
    else:
        wire = wire_module(impl)
        scan_client, splice_new_job = wire.scan_client, wire.splice_new_job

        def broker_step() -> bytes:
            scan_client(frame, V09)
            return splice_new_job(frame, IDENTITY, V09)

        out = benchmark(broker_step)
    assert msgpack.unpackb(out, raw=False, use_list=False) == msgpack.unpackb(
        msgpack_new_job_09(frame), raw=False, use_list=False)


@pytest.mark.parametrize("size", list(SIZES), ids=[f"payload_{s}" for s in SIZES])
@pytest.mark.parametrize("impl", IMPLS)
def test_wire_09_agent_job_done_to_backend_job_done(benchmark, impl, size):
    frame = job_done_frame_09(SIZES[size])
    benchmark.group = f"wire 0.9 AgentJobDone -> BackendJobDone, {size}"
    if impl == "msgpack":
        out = benchmark(msgpack_job_done_09, frame)
    else:
        wire = wire_module(impl)
        scan_agent, splice_job_done = wire.scan_agent, wire.splice_job_done

        def broker_step() -> bytes:
            scan_agent(frame, V09)
            return splice_job_done(frame, V09)

        out = benchmark(broker_step)
    assert msgpack.unpackb(out, raw=False, use_list=False) == msgpack.unpackb(
        msgpack_job_done_09(frame), raw=False, use_list=False)
