"""Process-level stateful fuzzing: a real broker subprocess, real sockets, adversarial peers.

One broker (``tests/peers/broker.py`` BrokerProcess; ``FASTBACKEND_FUZZ_BROKER``, default
``c-uvloop``) serves, in both dialects at once:

* a well-behaved client and agent per dialect: the client keeps jobs flowing, the agent
  answers each with started + done (a result naming the job) and pongs every ping;
* adversaries on both sockets, of both dialects, registered and not: random bytes,
  real frames with byte edits (real job ids seen on the wire inside), results and
  started / ssh frames forged for the good agent's jobs, re-hellos, absurd slot counts,
  floods of bad frames.  Adversary agents offer other environments only, and adversary
  clients never kill a good job, so every good job has one correct ending.

Checked: every good job ends with exactly one result, the one its agent sent, nothing
after it; every frame any peer receives loads with its receiver's loader and has the
exact key set (an adversary that sent a frame of the other dialect, a mutated copy of one
it saw, may be answered in that dialect: the broker answers a frame in the frame's own);
the broker stays alive; its RSS after warm-up stays flat (within ``max(50 %, 64 MiB)`` of
the warm-up figure).  Bounded by ``FASTBACKEND_FUZZ_SECONDS``
(30) and ``FASTBACKEND_FUZZ_FRAMES`` (adversarial frames; unbounded by default);
``FASTBACKEND_FUZZ_SEED`` makes a run repeatable.  Exit status 1 on a finding.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import msgpack  # noqa: E402
import zmq  # noqa: E402
from peers.broker import CONFIGS, BrokerProcess  # noqa: E402

from fastbackend import protocol  # noqa: E402
from fastbackend.protocol import V05, V09  # noqa: E402
from fuzz.receivers import check_backend_frame  # noqa: E402

GOOD_CLIENT = {V05: b"good-client-05", V09: b"good-client-09"}
GOOD_AGENT = {V05: b"good-agent-05", V09: b"good-agent-09"}
OUTSTANDING = 20  # good jobs in flight per dialect


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def msg(dialect: int, msgtype: str, **fields) -> bytes:
    """A message of ``dialect`` by its 0.5 name (the 0.9 name is looked up)."""
    if dialect == V05:
        return pack({"type": msgtype, **fields})
    return pack({**fields, "@type": NAMES_09[msgtype]})


NAMES_09 = {"client_hello": "ClientHello", "client_new_job": "ClientNewJob",
            "client_kill_job": "ClientKillJob",
            "client_get_queue": "ClientGetQueue", "ping": "Ping", "pong": "Pong", "agent_hello": "AgentHello",
            "agent_job_started": "AgentJobStarted", "agent_job_done": "AgentJobDone",
            "agent_job_ssh_debug": "AgentJobSSHDebug"}


def new_job(dialect: int, job_id: str, env: str = "default", rnd: random.Random | None = None) -> bytes:
    data = {"answer": "é" * (rnd.randrange(50) if rnd else 3)}
    if dialect == V05:
        return msg(V05, "client_new_job", job_id=job_id, course_id="c", task_id="t", inputdata=data,
                   environment=env, enable_network=False, time_limit=30, hard_time_limit=90, mem_limit=100,
                   debug=False, launcher="fuzz")
    return msg(V09, "client_new_job", job_id=job_id, priority=rnd.randrange(-5, 5) if rnd else 0,
               course_id="c", task_id="t", task_problems={}, inputdata=data, environment_type="docker",
               environment=env, environment_parameters={"limits": {"time": 30}}, debug=False, launcher="fuzz")


def job_done(dialect: int, job_id, text: str) -> bytes:
    fields = dict(job_id=job_id, result=("success", text), grade=100.0, problems={}, tests={}, custom={},
                  archive=None, stdout="", stderr="")
    if dialect == V09:
        fields["state"] = ""
    return msg(dialect, "agent_job_done", **fields)


def agent_hello(dialect: int, name: str, slots: int, env: str) -> bytes:
    if dialect == V05:
        return msg(V05, "agent_hello", friendly_name=name, available_job_slots=slots,
                   available_containers={env: {"id": "x", "created": 1}})
    return msg(V09, "agent_hello", friendly_name=name, available_job_slots=slots,
               available_environments={"docker": {env: {"id": "x", "created": 1, "ports": []}}})


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Finding(AssertionError):
    pass


def run(seconds: float, max_frames: int | None, seed: int, config: str) -> dict:
    rnd = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="fastbackend-fuzz-"))
    broker = BrokerProcess(CONFIGS[config], workdir / "broker.log")
    broker.start_on_free_ports()
    ctx = zmq.Context()
    sockets: dict[bytes, tuple[zmq.Socket, int, str]] = {}  # identity -> (socket, dialect, side)

    def dealer(identity: bytes, dialect: int, side: str) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, identity)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(broker.client_addr if side == "client" else broker.agent_addr)
        sockets[identity] = (s, dialect, side)
        return s

    stats = {"adversarial frames": 0, "good jobs": 0, "good results": 0, "frames received": 0,
             "replies in an adversary's other dialect": 0}
    pending: dict[tuple[int, str], bool] = {}  # good jobs without a result yet
    done: set[tuple[int, str]] = set()
    running: dict[int, list] = {V05: [], V09: []}  # job ids (as the agent saw them) on the good agents
    seen_frames: list[tuple[bytes, int]] = []  # real frames and their dialect, for mutation
    # The dialects each adversary has sent frames of: a mutated frame of the other dialect
    # may still scan, and the broker answers a frame in its own dialect (an `Unknown` to a
    # 0.5-registered client that sent a 0.9 frame), so that adversary may get either dialect.
    spoken: dict[bytes, set[int]] = {}
    numbers = iter(range(10**9))
    try:
        for d in (V05, V09):
            dealer(GOOD_AGENT[d], d, "agent").send(agent_hello(d, f"good-{d}", 4, "default"))
            dealer(GOOD_CLIENT[d], d, "client").send(msg(d, "client_hello", name=f"good-{d}"))
        adversaries = []
        for i in range(12):
            d, side = (V05, V09)[i % 2], ("client", "agent")[i // 2 % 2]
            identity = f"evil-{side}-{d}-{i}".encode()
            dealer(identity, d, side)
            adversaries.append(identity)
            if i % 3:  # registered (until it misbehaves); the others never say hello
                slots = rnd.choice([0, 1, 2**31, 2**64 - 1])
                sockets[identity][0].send(msg(d, "client_hello", name="evil") if side == "client"
                                          else agent_hello(d, "evil", slots, "evil"))
        time.sleep(0.5)
        poller = zmq.Poller()
        for s, _d, _side in sockets.values():
            poller.register(s, zmq.POLLIN)
        start = time.monotonic()
        deadline = start + seconds
        warm_rss = None
        while time.monotonic() < deadline:
            if max_frames is not None and stats["adversarial frames"] >= max_frames:
                break
            # The RSS baseline: a quarter into the run, by time or, when bounded, by frames
            # (a run bounded by frames would otherwise end before a quarter of its seconds and
            # skip the RSS check).
            if warm_rss is None and (time.monotonic() > start + seconds / 4 or (
                    max_frames is not None and stats["adversarial frames"] >= max_frames // 4)):
                warm_rss = rss_kib(broker.pid)
            # Good clients keep OUTSTANDING jobs in flight.
            for d in (V05, V09):
                while sum(1 for (dd, _j) in pending if dd == d) < OUTSTANDING:
                    job_id = f"good-{d}-{next(numbers)}"
                    pending[(d, job_id)] = True
                    stats["good jobs"] += 1
                    sockets[GOOD_CLIENT[d]][0].send(new_job(d, job_id, rnd=rnd))
            # A burst of adversarial frames.
            for _ in range(rnd.randrange(1, 30)):
                identity = rnd.choice(adversaries)
                s, d, side = sockets[identity]
                frame, dialect = adversarial(rnd, d, side, seen_frames, running)
                s.send(frame)
                spoken.setdefault(identity, {d}).add(dialect)
                stats["adversarial frames"] += 1
            for s, _event in poller.poll(10):
                identity = s.getsockopt(zmq.ROUTING_ID)
                _s, d, side = sockets[identity]
                while True:
                    try:
                        frame = s.recv(zmq.DONTWAIT)
                    except zmq.Again:
                        break
                    stats["frames received"] += 1
                    message, dialect = received(identity, d, frame, spoken.get(identity, {d}))
                    if dialect != d:
                        stats["replies in an adversary's other dialect"] += 1
                    if len(seen_frames) < 200:
                        seen_frames.append((frame, dialect))
                    elif rnd.random() < 0.05:
                        seen_frames[rnd.randrange(200)] = (frame, dialect)
                    handle(identity, dialect, message, sockets, pending, done, running, stats)
            if broker.proc.poll() is not None:
                raise Finding(f"the broker exited with status {broker.proc.returncode}")
        # Drain: no more adversaries; every good job must end.
        end = time.monotonic() + 20
        while pending and time.monotonic() < end:
            for s, _event in poller.poll(50):
                identity = s.getsockopt(zmq.ROUTING_ID)
                _s, d, _side = sockets[identity]
                while True:
                    try:
                        frame = s.recv(zmq.DONTWAIT)
                    except zmq.Again:
                        break
                    message, dialect = received(identity, d, frame, spoken.get(identity, {d}))
                    handle(identity, dialect, message, sockets, pending, done, running, stats)
        if pending:
            raise Finding(f"{len(pending)} good jobs got no result, e.g. {sorted(pending)[:3]}")
        if broker.proc.poll() is not None:
            raise Finding(f"the broker exited with status {broker.proc.returncode}")
        end_rss = rss_kib(broker.pid)
        stats["rss KiB warm/end"] = (warm_rss, end_rss)
        if warm_rss and end_rss > max(warm_rss * 1.5, warm_rss + 64 * 1024):
            raise Finding(f"broker RSS grew from {warm_rss} KiB to {end_rss} KiB")
    finally:
        ctx.destroy(linger=0)
        code = broker.stop()
        stats["broker log lines"] = len(broker.log().splitlines())
    if code != 0 or "Traceback" in broker.log():
        raise Finding(f"broker exit status {code}; log in {workdir}")
    return stats


def received(identity: bytes, d: int, frame: bytes, dialects: set[int]) -> tuple[dict, int]:
    """A frame a peer of dialect ``d`` got: it must load with that peer's loader and have the
    exact key set; an adversary's may be of another dialect it has itself sent frames of."""
    errors = []
    for dialect in sorted(dialects, key=lambda x: x != d):  # its own dialect first
        try:
            return check_backend_frame(frame, dialect), dialect
        except Exception as exc:
            errors.append(exc)
    raise Finding(f"{identity!r} (dialect {d}, has sent frames of {sorted(dialects)}) got a frame "
                  f"its loader refuses: {errors[0]!r} {frame[:200]!r}") from errors[0]


def adversarial(rnd: random.Random, d: int, side: str, seen: list[tuple[bytes, int]],
                running: dict[int, list]) -> tuple[bytes, int]:
    """A frame for an adversary of dialect ``d`` to send, and the dialect it is written in."""
    roll = rnd.random()
    if roll < 0.15:
        return rnd.randbytes(rnd.randrange(0, 64)), d
    if roll < 0.45 and seen:
        source, dialect = rnd.choice(seen)
        frame = bytearray(source)
        for _ in range(rnd.randrange(1, 4)):
            frame[rnd.randrange(len(frame))] = rnd.randrange(256)
        return bytes(frame), dialect
    return forged(rnd, d, side, running), d


def forged(rnd: random.Random, d: int, side: str, running: dict[int, list]) -> bytes:
    if side == "agent":
        jobs = running[d] + running[1 - d]
        job_id = rnd.choice(jobs) if jobs else ("x" if d == V09 else (b"x", "x"))
        if d == V09 and not isinstance(job_id, str):
            job_id = job_id[1]
        if d == V05 and isinstance(job_id, str):
            job_id = (GOOD_CLIENT[V05], job_id)
        kind = rnd.randrange(5)
        if kind == 0:
            return job_done(d, job_id, "forged")
        if kind == 1:
            return msg(d, "agent_job_started", job_id=job_id)
        if kind == 2:
            fields = dict(job_id=job_id, host="h", port=22, password="p")
            if d == V09:
                fields["user"] = "u"
            return msg(d, "agent_job_ssh_debug", **fields)
        if kind == 3:
            return agent_hello(d, "evil", rnd.choice([0, 1, 3, 2**31, 2**63, 2**64 - 1]), "evil")
        return msg(d, "pong")
    kind = rnd.randrange(5)
    if kind == 0:
        return msg(d, "client_hello", name="evil")
    if kind == 1:
        return new_job(d, f"evil-{rnd.randrange(50)}", env=rnd.choice(["default", "evil", "none"]), rnd=rnd)
    if kind == 2:
        return msg(d, "client_get_queue")
    if kind == 3:
        return msg(d, "client_kill_job", job_id=f"evil-{rnd.randrange(50)}")
    return msg(d, "ping")


def handle(identity: bytes, d: int, message: dict, sockets, pending, done, running, stats) -> None:
    """The good peers' part of the conversation; adversaries ignore what they get."""
    key = protocol.DIALECTS[d].type_key
    msgtype = message[key]
    if identity == GOOD_AGENT[d]:
        s = sockets[identity][0]
        if msgtype in ("ping", "Ping"):
            s.send(msg(d, "pong"))
        elif msgtype in ("backend_new_job", "BackendNewJob"):
            job_id = message["job_id"]
            running[d].append(job_id)
            if len(running[d]) > 100:
                del running[d][:50]
            text = f"ok {job_id[1] if d == V05 else job_id}"
            s.send(msg(d, "agent_job_started", job_id=job_id))
            s.send(job_done(d, job_id, text))
    elif identity == GOOD_CLIENT[d]:
        if msgtype in ("backend_job_done", "BackendJobDone", "backend_job_started", "BackendJobStarted"):
            job = (d, message["job_id"])
            if job in done:
                raise Finding(f"{msgtype} after the result of {job}: {message}")
            if msgtype in ("backend_job_done", "BackendJobDone"):
                if job not in pending:
                    raise Finding(f"a result for a job the good client never sent: {message}")
                if tuple(message["result"]) != ("success", f"ok {job[1]}"):
                    raise Finding(f"wrong result for {job}: {message['result']}")
                del pending[job]
                done.add(job)
                stats["good results"] += 1
        elif msgtype in ("unknown", "Unknown"):
            raise Finding(f"the good client was told {msgtype!r}")


def main() -> int:
    seconds = float(os.environ.get("FASTBACKEND_FUZZ_SECONDS", "30"))
    frames = os.environ.get("FASTBACKEND_FUZZ_FRAMES")
    seed = int(os.environ.get("FASTBACKEND_FUZZ_SEED", str(random.randrange(2**32))))
    config = os.environ.get("FASTBACKEND_FUZZ_BROKER", "c-uvloop")
    print(f"fuzz_process: broker {config}, {seconds:g} s, seed {seed} "
          f"(FASTBACKEND_FUZZ_SEED={seed} repeats it)")
    try:
        stats = run(seconds, int(frames) if frames else None, seed, config)
    except Finding as exc:
        print(f"fuzz_process: FINDING (seed {seed}): {exc}")
        return 1
    print("fuzz_process: ok: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
