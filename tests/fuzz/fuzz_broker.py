"""Coverage-guided fuzzing of the broker cores, fed whole conversations in-process (atheris).

The fuzzer's bytes are decoded (``atheris.FuzzedDataProvider``) into a sequence of peer
actions, like tests/test_broker_core.py's hypothesis conversation test but steered by
coverage: hellos, jobs, kills, queue requests, pings, agent hellos (any slot count),
started / done / ssh debug for jobs the agent holds, held by others or never seen,
heartbeats, raw garbage, and real frames with fuzzer-chosen byte edits.  Each
conversation runs on both cores (``tests/test_broker_core.Harness``, over inproc), then
ends the same way: heartbeats until every agent is removed, then every client kills each
of its jobs.  Checked:

* no internal error (the Harness records them) on either core;
* every frame the broker sends loads with its receiver's loader and has exactly the key
  set of its message (``receivers.check_backend_frame``);
* every job a client submitted gets exactly one result, and nothing after it;
* the two cores send the same frames (snapshot times aside).

Run: ``python tests/fuzz/fuzz_broker.py [libFuzzer flags]`` (``run.py`` does).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["fastbackend"]):
    from fastbackend import _broker_py, _wire_py, protocol  # noqa: E402, F401
    from fastbackend.broker import BrokerLogic  # noqa: E402, F401

import test_broker_core as core  # noqa: E402

from fastbackend.protocol import V09  # noqa: E402
from fuzz.receivers import check_backend_frame  # noqa: E402

CLIENTS, AGENTS, DIALECT_OF = core.CLIENTS, core.AGENTS, core.DIALECT_OF
ENVS = core.ENVS
RESULT_TYPES = ("backend_job_done", "BackendJobDone")
AFTER_TYPES = RESULT_TYPES + ("backend_job_started", "BackendJobStarted", "backend_job_ssh_debug",
                              "BackendJobSSHDebug")
SLOTS = (0, 1, 2, 3, 2**31 - 1, 2**31, 2**63, 2**64 - 1)


def script_of(data: bytes) -> list[tuple]:
    """The fuzzer's bytes as peer actions (each a tuple, as test_broker_core's steps)."""
    fdp = atheris.FuzzedDataProvider(data)
    steps: list[tuple] = []
    while fdp.remaining_bytes() and len(steps) < 60:
        kind = fdp.ConsumeIntInRange(0, 15)
        client = CLIENTS[fdp.ConsumeIntInRange(0, len(CLIENTS) - 1)]
        agent = AGENTS[fdp.ConsumeIntInRange(0, len(AGENTS) - 1)]
        n = fdp.ConsumeIntInRange(0, 12)
        if kind <= 2:
            steps.append(("job", client, n, ENVS[n % 3], fdp.ConsumeIntInRange(-3, 5)))
        elif kind == 3:
            steps.append(("kill", client, n, fdp.ConsumeBool()))
        elif kind in (4, 5, 6):
            steps.append((("started", "done", "ssh")[kind - 4], agent, n))
        elif kind == 7:
            steps.append(("agent", agent, SLOTS[n % len(SLOTS)], [ENVS[n % 2]] + ENVS[:n % 3 // 2]))
        elif kind == 8:
            steps.append(("hello", client))
        elif kind == 9:
            steps.append(("queue", client))
        elif kind == 10:
            steps.append(("pong", agent))
        elif kind == 11:
            steps.append(("heartbeat",))
        elif kind == 12:
            steps.append(("garbage", (client, agent)[n % 2], fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))))
        elif kind == 13:
            steps.append(("reuse", client, n))
        else:
            # A real frame with byte edits: (position, byte) pairs.
            edits = [(fdp.ConsumeIntInRange(0, 400), fdp.ConsumeIntInRange(0, 255))
                     for _ in range(fdp.ConsumeIntInRange(1, 3))]
            steps.append(("mutate", (client, agent)[kind - 14], n, tuple(edits)))
    return steps


def _edit(frame: bytes, edits: tuple) -> bytes:
    out = bytearray(frame)
    for where, byte in edits:
        if out:
            out[where % len(out)] = byte
    return bytes(out)


def replay(core_class: type, script: list[tuple]) -> dict[str, list[bytes]]:
    h = core.Harness(core_class)
    inbox: dict[str, list[bytes]] = {name: [] for name in CLIENTS + AGENTS}
    jobs_seen: dict[str, list] = {name: [] for name in AGENTS}
    submitted: dict[str, list[str]] = {name: [] for name in CLIENTS}
    # How often each client sent each job id in a new-job frame, mutated ones included: an id
    # sent twice (a mutation that kept it, then another) gets a duplicate answer beside its
    # result, or, sent again after its result, a second result; `check` holds only the ids
    # sent once to "nothing after the result".
    sent_ids: dict[str, collections.Counter] = {name: collections.Counter() for name in CLIENTS}
    latest: dict[tuple[str, int], str] = {}
    numbers = itertools.count()

    def collect() -> None:
        for name in inbox:
            frames = h.received(name)
            inbox[name].extend(frames)
            if name in jobs_seen:
                for frame in frames:
                    message = protocol.decode(frame)
                    if message.get("type", message.get("@type")) in ("backend_new_job", "BackendNewJob"):
                        jobs_seen[name].append(message["job_id"])

    def kill(who: str, job_id: str) -> None:
        h.send(who, core.pack9("ClientKillJob", job_id=job_id) if DIALECT_OF[who] == V09
               else core.pack(type="client_kill_job", job_id=job_id))

    def agent_frame(kind: str, who: str, job_id) -> bytes:
        if DIALECT_OF[who] == V09:
            return {"started": lambda j: core.pack9("AgentJobStarted", job_id=j), "done": core.job_done9,
                    "ssh": lambda j: core.pack9("AgentJobSSHDebug", job_id=j, host="h", port=22, user="u",
                                                password="pw")}[kind](job_id)
        return {"started": lambda j: core.pack(type="agent_job_started", job_id=j), "done": core.job_done,
                "ssh": lambda j: core.pack(type="agent_job_ssh_debug", job_id=j, host="h", port=22,
                                           password="pw")}[kind](job_id)

    def some_job(who: str, n: int):
        seen = jobs_seen[who]
        if seen:
            return seen[n % len(seen)]
        return "nothing" if DIALECT_OF[who] == V09 else (b"c1", "nothing")

    try:
        for step in core.OPENING + script:
            kind, who = step[0], step[1] if len(step) > 1 else None
            v09 = who is not None and DIALECT_OF[who] == V09
            if kind == "job":
                latest[(who, step[2])] = job_id = f"{who}-{step[2]}-{next(numbers)}"
                submitted[who].append(job_id)
                sent_ids[who][job_id] += 1
                h.send(who, core.new_job9(job_id, step[3], priority=step[4]) if v09
                       else core.new_job(job_id, step[3]))
            elif kind == "reuse":
                job_id = latest.get((core._other(who), step[2]), "never")
                h.send(who, core.new_job9(job_id) if v09 else core.new_job(job_id))
            elif kind == "kill":
                owner = core._other(who) if step[3] else who
                kill(who, latest.get((owner, step[2]), "never"))
            elif kind == "hello":
                h.send(who, core.pack9("ClientHello", name=who) if v09
                       else core.pack(type="client_hello", name=who))
            elif kind == "queue":
                h.send(who, core.pack9("ClientGetQueue") if v09 else core.pack(type="client_get_queue"))
            elif kind == "agent":
                h.send(who, core.agent_hello9(who, step[2], [("docker", e) for e in step[3]]) if v09
                       else core.agent_hello(who, step[2], step[3]))
            elif kind in ("started", "done", "ssh"):
                h.send(who, agent_frame(kind, who, some_job(who, step[2])))
            elif kind == "pong":
                h.send(who, core.pack9("Pong") if v09 else core.pack(type="pong"))
            elif kind == "heartbeat":
                h.broker.heartbeat()
                h.settle()
            elif kind == "garbage":
                h.send(who, step[2])
            elif kind == "mutate":
                if who in DIALECT_OF and who in CLIENTS:
                    job_id = f"{who}-m{step[2]}-{next(numbers)}"
                    frame = _edit(core.new_job9(job_id) if v09 else core.new_job(job_id), step[3])
                    sent = _job_id_in(frame)
                    if sent is not None:
                        sent_ids[who][sent] += 1
                else:
                    frame = _edit(agent_frame(("started", "done", "ssh")[step[2] % 3], who,
                                              some_job(who, step[2])), step[3])
                h.send(who, frame)
            collect()
        # The end: every agent removed (seven silent heartbeats), then every client kills
        # each of its jobs; every job must then have had exactly one result.
        for _ in range(7):
            h.broker.heartbeat()
            h.settle()
        collect()
        for who, job_ids in submitted.items():
            for job_id in job_ids:
                kill(who, job_id)
        collect()
    finally:
        h.close()
    check(inbox, submitted, sent_ids)
    return inbox


def _job_id_in(frame: bytes) -> object:
    """The job id a (mutated) new-job frame carries as msgpack reads it, or None."""
    try:
        message = protocol.decode(frame)
    except Exception:
        return None
    return message.get("job_id") if isinstance(message, dict) else None


def check(inbox: dict[str, list[bytes]], submitted: dict[str, list[str]],
          sent_ids: dict[str, collections.Counter]) -> None:
    for name, frames in inbox.items():
        for frame in frames:
            check_backend_frame(frame, DIALECT_OF[name])
    for name in CLIENTS:
        d = protocol.DIALECTS[DIALECT_OF[name]]
        results: dict[str, int] = {}
        for frame in inbox[name]:
            message = protocol.decode(frame)
            msgtype, job_id = message[d.type_key], message.get("job_id")
            if msgtype not in AFTER_TYPES or not str(job_id).startswith(f"{name}-"):
                continue  # not a job of this client's own (a "reuse" step's duplicate answer)
            if sent_ids[name][job_id] > 1:
                continue  # sent more than once: more than one answer is the protocol
            assert job_id not in results, f"{name}: {msgtype} for {job_id} after its result"
            if msgtype in RESULT_TYPES:
                results[job_id] = 1
        missing = [j for j in submitted[name] if j not in results]
        assert not missing, f"{name}: no result for {missing}"


def test_one_input(data: bytes) -> None:
    script = script_of(data)
    pure = replay(core.CORES["py"], script)
    for impl, core_class in core.CORES.items():
        if impl != "py":
            other = replay(core_class, script)
            for name in pure:
                expected = [core.comparable(f) for f in pure[name]]
                assert [core.comparable(f) for f in other[name]] == expected, (impl, name)


def main() -> None:
    # The broker's log lines are still made (their rate limits are code under test), not shown.
    logging.basicConfig(handlers=[logging.NullHandler()], level=logging.DEBUG, force=True)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
