"""What both wire harnesses share (``fuzz_wire.py``, ``fuzz_wire_native.py``): the API calls
made on every input, how an outcome is recorded, the receivers' check of what a call
returned, and the seed frames.

No atheris here: ``fuzz_wire_native.py`` imports this in processes where only the C code
is instrumented, and ``fuzz_wire.py`` imports it after its own instrumented imports.
"""

from __future__ import annotations

from typing import Any

from fastbackend.protocol import V05, V09, WireError, WrongDialect
from fuzz.receivers import check_backend_frame

IDENT = b"\x00k\x8bEg"
DIALECTS = (V05, V09)


def outcome(fn: Any, *args: Any) -> tuple:
    try:
        return "ok", fn(*args)
    except WrongDialect as exc:
        return "wrong dialect", exc.dialect, str(exc)
    except WireError as exc:
        return "error", str(exc)


CALLS = (
    ("scan_client", lambda m, f, d: m.scan_client(f, d)),
    ("queue_fields", lambda m, f, d: m.queue_fields(f, d)),
    ("submission_state", lambda m, f, d: m.submission_state(f, d)),
    ("splice_new_job", lambda m, f, d: m.splice_new_job(f, IDENT, d)),
    ("scan_agent", lambda m, f, d: m.scan_agent(f, d)),
    ("splice_job_done", lambda m, f, d: m.splice_job_done(f, d)),
    ("splice_ssh_debug", lambda m, f, d: m.splice_ssh_debug(f, d)),
)
SPLICES = {"splice_new_job", "splice_job_done", "splice_ssh_debug"}



def check_planned(wire: Any, frame: bytes, spliced: bytes, dialect: int) -> None:
    """The compiled broker splices a job that waited from the arrival scan's plan (span
    starts only; each end read from the frame again): for every frame the compiled
    ``splice_new_job`` accepts (``spliced``), the planned splice must give the same bytes."""
    planned = wire.splice_new_job_planned(frame, IDENT, dialect)
    if planned != spliced:
        raise AssertionError(f"planned new-job splice differs (dialect {dialect}): "
                             f"{planned!r} != {spliced!r}")


def check_receivers(wire: Any, name: str, value: Any, dialect: int) -> None:
    """What a peer receives from a call that succeeded must load with its own loader and
    have its exact key set: the spliced frame, and backend_job_started for the job id a
    scan returned (``wire``: the module that made ``value``)."""
    if name in SPLICES:
        check_backend_frame(value, dialect)
    elif name in ("scan_client", "scan_agent"):
        job_id = value[2] if name == "scan_agent" else value[1]
        if job_id is not None:
            check_backend_frame(wire.job_started(job_id, dialect), dialect)

def seeds() -> list[bytes]:
    """Valid frames of every message of both dialects, for the corpus."""
    import msgpack

    def pack(d):
        return msgpack.packb(d, use_bin_type=True)

    new05 = dict(type="client_new_job", job_id="j1", course_id="c", task_id="t",
                 inputdata={"a": "é", "b": [1, 2.5, None, b"\xff"], 3: msgpack.ExtType(1, b"x")},
                 environment="default", enable_network=False, time_limit=30, hard_time_limit=90,
                 mem_limit=100, debug=False, launcher="l")
    done05 = dict(type="agent_job_done", job_id=(IDENT, "j1"), result=("success", "ok"), grade=1.5,
                  problems={"p": ("success", "ok")}, tests={}, custom={"k": (1,)}, archive=b"\x00",
                  stdout="o", stderr="")
    new09 = {"job_id": "j1", "priority": -3, "course_id": "c", "task_id": "t", "task_problems": {},
             "inputdata": {"@state": "s", "a": "é"}, "environment_type": "docker", "environment": "default",
             "environment_parameters": {"limits": {"time": 30}}, "debug": False, "launcher": "l",
             "@type": "ClientNewJob"}
    done09 = {"job_id": "j1", "result": ("success", "ok"), "grade": 1.0, "problems": {}, "tests": {},
              "custom": {}, "state": "", "archive": None, "stdout": "", "stderr": "", "@type": "AgentJobDone"}
    return [pack(m) for m in (
        new05, done05, new09, done09,
        {"type": "client_hello", "name": "n"}, {"type": "client_kill_job", "job_id": "j"},
        {"type": "agent_hello", "friendly_name": "a", "available_job_slots": 2,
         "available_containers": {"default": {"id": "x", "created": 1}}},
        {"type": "agent_job_ssh_debug", "job_id": (IDENT, "j"), "host": "h", "port": 22, "password": "p"},
        {"type": "agent_job_started", "job_id": (IDENT, "j")},
        {"name": "n", "@type": "ClientHello"}, {"job_id": "j", "@type": "ClientKillJob"},
        {"friendly_name": "a", "available_job_slots": 1, "available_environments": {"docker": {}},
         "@type": "AgentHello"},
        {"job_id": "j", "host": "h", "port": 22, "user": "u", "password": "p", "@type": "AgentJobSSHDebug"},
    )]
