"""Coverage-guided fuzzing of the wire scanners and splicers (atheris), both dialects.

For arbitrary bytes, read as a client frame and as an agent frame of each dialect:

* the compiled and the pure twin agree: the same result, or the same WireError reason
  (and WrongDialect's dialect), for every API function;
* nothing but WireError (WrongDialect included) escapes either twin;
* every successful splice loads with the RECEIVER's loader (``receivers.py``) and has
  exactly the key set of the message it names; so does backend_job_started for every
  job id a scan returned.

atheris instruments the pure twin (and the protocol package) for coverage; the compiled
twin, a C extension, is reached through the differential check on the same inputs.
Run: ``python tests/fuzz/fuzz_wire.py [libFuzzer flags] [CORPUS_DIR]`` (``run.py`` does).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["fastbackend"]):
    from fastbackend import _wire_py, protocol  # noqa: E402
    from fastbackend.protocol import V05, V09, WireError, WrongDialect  # noqa: E402

from fastbackend import _wire_c  # noqa: E402
from fuzz.receivers import check_backend_frame  # noqa: E402

IDENT = b"\x00k\x8bEg"
DIALECTS = (V05, V09)


def outcome(fn, *args):
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


def check(frame: bytes) -> None:
    for dialect in DIALECTS:
        for name, call in CALLS:
            py = outcome(call, _wire_py, frame, dialect)
            c = outcome(call, _wire_c, frame, dialect)
            if c != py:
                raise AssertionError(f"twins disagree on {name} (dialect {dialect}): c={c!r} py={py!r}")
            if py[0] != "ok":
                continue
            if name in SPLICES:
                check_backend_frame(py[1], dialect)
            elif name in ("scan_client", "scan_agent"):
                job_id = py[1][2] if name == "scan_agent" else py[1][1]
                if job_id is None:
                    continue
                check_backend_frame(_wire_py.job_started(job_id, dialect), dialect)
                assert _wire_c.job_started(job_id, dialect) == _wire_py.job_started(job_id, dialect)


def test_one_input(data: bytes) -> None:
    check(data)


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


def main() -> None:
    argv = list(sys.argv)
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    for directory in corpus:
        os.makedirs(directory, exist_ok=True)
        for i, seed in enumerate(seeds()):
            with open(os.path.join(directory, f"seed-{i}"), "wb") as f:
                f.write(seed)
    assert protocol.DIALECTS  # imported under instrumentation
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
