#!/usr/bin/env python3
"""Instructions and syscalls per zero-time job, by thread and by component, for each broker.

    python benchmarks/profile/breakdown.py [--tools callgrind,strace] [--jobs N] [--warmup N]
        [--kinds fastbackend,ceiling,slot-ceiling] [--dialects 0.5,0.9] [--window W | --rate R]
        [--archive-size BYTES] [--stdout-size BYTES] [--out DIR]

For every broker and dialect it starts the broker on 127.0.0.1 exactly as the benchmarks do
(``brokers.BrokerFactory.command``: the same fastbackend, the same C ceilings), attaches the
benchmarks' generator (``loadgen.py``: 4 agents x 8 slots offering 4 environments, 4 client
sockets, 1 KiB of input per job) and runs ``--warmup`` jobs, then ``--jobs`` measured jobs:

* callgrind: the broker runs under ``valgrind --tool=callgrind --separate-threads=yes``; the
  counters are zeroed (``callgrind_control -z PID``) after the warm-up and dumped
  (``callgrind_control -d PID``) after the measured jobs.  Each thread's exclusive
  instruction count (Ir) is grouped by the object the code lives in (libzmq, libc, python,
  _broker_c, _wire_c, _sched_c, uvloop, pyzmq, ...) and divided by the jobs.  The kernel is
  not visible to callgrind: what a syscall costs inside the kernel is in no figure here (see
  the strace part and the benchmarks' CPU-time figures);
* strace: the broker runs natively; after the warm-up ``strace -f -ff -qq`` is attached to
  each of its threads and detached (SIGINT to strace's PID) after the measured jobs; each
  thread's syscalls are counted by name and divided by the jobs.

Under either tool the broker's minor page faults per job are counted too (``/proc/PID/stat``,
all threads; natively under strace, valgrind's own under callgrind).  ``--archive-size`` and
``--stdout-size`` give each result an archive and a stdout of that many bytes (the payload
scenario is ``--archive-size 1048576 --stdout-size 65536``): what a broker spends per
large result, instruction by instruction, beside the C forwarder that relays it unchanged.

Closed loop by default (``--window`` jobs unfinished per client socket, the throughput
scenario's shape).  A tool slows the broker down (callgrind ~50x), so more messages wait per
wake-up than in a native run, and the slow-down differs between brokers: ``--rate R`` (open
loop, R jobs/s, low enough for every broker to keep up under the tool) puts every broker at
the same wake-up pattern instead.  Every process is ended by its PID; every loop is bounded.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from brokers import CEILING_SOURCES, BrokerFactory, cpu_seconds, free_port  # noqa: E402
from harness import Peer  # noqa: E402

ENVIRONMENTS = ["bench-env-a", "bench-env-b", "bench-env-c", "bench-env-d"]
AGENTS, SLOTS, CLIENT_SOCKETS, INPUT_SIZE = 4, 8, 4, 1024

#: (substring of the object's file name, component), first match wins.
COMPONENTS = (
    ("_broker_c", "_broker_c"), ("_wire_c", "_wire_c"), ("_sched_c", "_sched_c"),
    ("libzmq", "libzmq"), ("libsodium", "libsodium"), ("uvloop", "uvloop"),
    ("_cmsgpack", "msgpack"), ("libstdc++", "libstdc++/libgcc"), ("libgcc", "libstdc++/libgcc"),
    ("libc.so", "libc"), ("libc-", "libc"), ("libm.so", "libm"), ("ld-linux", "ld.so"),
    ("libpython", "python"), ("python3", "python"), ("vgpreload", "valgrind preload"),
    ("slotbroker", "ceiling's own code"), ("forwarder", "ceiling's own code"),
)


def component(obj: str) -> str:
    name = os.path.basename(obj)
    if "/zmq/" in obj:
        return "pyzmq"
    if "/uvloop/" in obj:
        return "uvloop"
    for key, comp in COMPONENTS:
        if key in name:
            return comp
    if name.startswith("python"):
        return "python"
    if "/lib-dynload/" in obj or "site-packages" in obj:
        return "python extensions"
    return "other: " + name


# ----------------------------------------------------------------------------- callgrind

def parse_callgrind(path: str) -> collections.Counter:
    """Exclusive Ir per (object, function) of one callgrind dump (a call line's inclusive
    cost skipped)."""
    names: dict[str, str] = {}
    costs: collections.Counter = collections.Counter()
    obj = fn = "?"
    skip_next = False
    events_at = 1  # cost lines: position(s) then events; Ir is the first event

    def resolve(value: str) -> str:
        m = re.match(r"\((\d+)\)\s*(.*)", value)
        if not m:
            return value
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), value)

    with open(path, errors="replace") as f:
        for line in f:
            c = line[:1]
            if c.isdigit() or c in "+-*":
                if skip_next:
                    skip_next = False
                    continue
                parts = line.split()
                if len(parts) > events_at:
                    costs[obj, fn] += int(parts[events_at])
                continue
            if line.startswith("ob="):
                obj = resolve(line[3:].strip())
            elif line.startswith("fn="):
                fn = resolve(line[3:].strip())
            elif line.startswith("calls="):
                skip_next = True
            elif line.startswith("positions:"):
                events_at = len(line.split()) - 1
            elif line.startswith(("cob=", "cfn=", "cfi=", "cfl=")):
                resolve(line.split("=", 1)[1].strip())  # defines compressed names too
    return costs


def callgrind_dumps(out_dir: Path, pid: int) -> dict[int, str]:
    """Thread number -> the file of the explicit dump (callgrind_control -d) of ``pid``."""
    files = {}
    for path in glob.glob(str(out_dir / f"cg.{pid}*")):
        m = re.search(r"\.(\d+)-(\d+)$", path)  # cg.PID.DUMP-THREAD
        if m and m.group(1) == "1":
            files[int(m.group(2))] = path
    return files


# ----------------------------------------------------------------------------- strace

SYSCALL = re.compile(r"^(?:\[pid\s+\d+\]\s+)?([a-z_0-9]+)\(")


def parse_strace(path: str) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    with open(path, errors="replace") as f:
        for line in f:
            m = SYSCALL.match(line)
            if m:  # "<... x resumed>" lines are the second half of a call already counted
                counts[m.group(1)] += 1
    return counts


# ----------------------------------------------------------------------------- running

def wait_listening(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"broker not listening on {port} after {timeout:.0f} s")


def end(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    """End ``proc`` by its PID: ``sig``, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def thread_names(pid: int) -> dict[int, str]:
    out = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(f"{task}/comm") as f:
                out[int(os.path.basename(task))] = f.read().strip()
        except OSError:
            pass
    return out


def run_one(factory: BrokerFactory, kind: str, dialect: str, tool: str, args, out_dir: Path) -> dict:
    agent_port, client_port = free_port(), free_port()
    agent_addr, client_addr = f"tcp://127.0.0.1:{agent_port}", f"tcp://127.0.0.1:{client_port}"
    cmd, env = factory.command(kind, agent_addr, client_addr, dialect)
    if tool == "callgrind":
        cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes", "--dump-instr=no",
               f"--callgrind-out-file={out_dir}/cg.%p", "-q"] + cmd
    log = open(out_dir / f"{kind}-{dialect}-{tool}.log", "wb")
    broker = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    peers: list[Peer] = []
    strace = None
    result: dict = {"kind": kind, "dialect": dialect, "tool": tool}
    try:
        wait_listening(client_port, broker, 180)
        wait_listening(agent_port, broker, 30)
        agents = Peer("agents", {"addr": agent_addr, "dialect": dialect, "agents": AGENTS, "slots": SLOTS,
                                 "environments": ENVIRONMENTS, "envelope": kind == "ceiling",
                                 "archive_size": args.archive_size, "stdout_size": args.stdout_size,
                                 "max_seconds": 1800}, ready_timeout=120)
        clients = Peer("clients", {"addr": client_addr, "dialect": dialect, "clients": CLIENT_SOCKETS,
                                   "max_seconds": 1800}, ready_timeout=120)
        peers += [agents, clients]
        agents.wait_ready()
        clients.wait_ready()
        time.sleep(1.0)

        def jobs(n: int) -> dict:
            op = {"op": "jobs", "jobs": n, "environments": ENVIRONMENTS, "input_size": INPUT_SIZE,
                  "timeout": 900, "idle_timeout": 120}
            if args.rate:
                op["rate"] = args.rate
            else:
                op["window"] = args.window
            answer = clients.ask(op, 1000)
            if answer["unfinished"]:
                raise RuntimeError(f"{kind} {dialect}: {answer['unfinished']} jobs unfinished")
            return answer

        jobs(args.warmup)
        if tool == "callgrind":
            subprocess.run(["callgrind_control", "-z", str(broker.pid)], check=True,
                           capture_output=True, timeout=120)
        else:
            names = thread_names(broker.pid)
            result["threads"] = names
            prefix = out_dir / f"st.{kind}-{dialect}"
            targets = [a for tid in sorted(names) for a in ("-p", str(tid))]
            strace = subprocess.Popen(["strace", "-f", "-ff", "-qq", "-o", str(prefix)] + targets,
                                      stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.5)  # attached (its start-up is not counted: nothing happens meanwhile)
        cpu0, faults0 = cpu_seconds(broker.pid), minor_faults(broker.pid)
        answer = jobs(args.jobs)
        result["cpu_us_per_job"] = (cpu_seconds(broker.pid) - cpu0) / answer["done"] * 1e6
        result["faults_per_job"] = (minor_faults(broker.pid) - faults0) / answer["done"]
        result["jobs"] = done = answer["done"]
        result["jobs_per_s"] = answer["jobs_per_s"]
        if tool == "callgrind":
            subprocess.run(["callgrind_control", "-d", str(broker.pid)], check=True,
                           capture_output=True, timeout=120)
            dumps = callgrind_dumps(out_dir, broker.pid)
            parsed = {t: parse_callgrind(p) for t, p in sorted(dumps.items())}
            result["threads"] = {t: {k: v / done for k, v in _by_component(c).items()}
                                 for t, c in parsed.items()}
            result["top"] = [(component(obj), fn, ir / done) for (obj, fn), ir in
                             parsed.get(1, collections.Counter()).most_common(args.top)]
        else:
            end(strace, signal.SIGINT)
            strace = None
            per_thread = {}
            for path in glob.glob(f"{prefix}.*"):
                tid = int(path.rsplit(".", 1)[1])
                counts = parse_strace(path)
                per_thread[tid] = {k: v / done for k, v in counts.items()}
            result["syscalls"] = per_thread
    finally:
        if strace is not None:
            end(strace, signal.SIGINT)
        for peer in peers:
            peer.stop()
        end(broker, signal.SIGTERM)
        log.close()
    return result


def minor_faults(pid: int) -> int:
    """Minor page faults so far, every thread of process ``pid`` (/proc/PID/stat field 10)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def _by_component(costs: collections.Counter) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for (obj, _fn), ir in costs.items():
        out[component(obj)] += ir
    return out


# ----------------------------------------------------------------------------- report

def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def report(results: list[dict]) -> list[str]:
    lines = []
    cg = [r for r in results if r["tool"] == "callgrind"]
    if cg:
        lines += ["### Instructions per job (callgrind, exclusive Ir by object; kernel not included)", ""]
        comps = sorted({c for r in cg for t in r["threads"].values() for c, v in t.items() if v >= 1},
                       key=lambda c: -max(t.get(c, 0) for r in cg for t in r["threads"].values()))
        header = ["broker", "dialect", "main thread", "other threads (libzmq I/O, reaper)", "all threads"]
        header += [f"main: {c}" for c in comps]
        body = []
        for r in cg:
            main = sum(r["threads"].get(1, {}).values())
            other = sum(sum(t.values()) for n, t in r["threads"].items() if n != 1)
            row = [r["kind"], r["dialect"], fmt(main), fmt(other), fmt(main + other)]
            row += [fmt(r["threads"].get(1, {}).get(c, 0)) for c in comps]
            body.append(row)
        lines += md(header, body) + [""]
        lines += ["Other threads by object:", ""]
        header2 = ["broker", "dialect", "thread"] + comps
        body2 = []
        for r in cg:
            for n, t in sorted(r["threads"].items()):
                if n != 1 and sum(t.values()) > 1:
                    body2.append([r["kind"], r["dialect"], str(n)] + [fmt(t.get(c, 0)) for c in comps])
        lines += md(header2, body2) + [""]
        n_top = len(cg[0].get("top", []))
        lines += [f"Main thread's {n_top} costliest functions (exclusive Ir per job):", ""]
        body3 = []
        for r in cg:
            top = "; ".join(f"{fn} [{comp}] {fmt(ir)}" for comp, fn, ir in r.get("top", []))
            body3.append([r["kind"], r["dialect"], top])
        lines += md(["broker", "dialect", "functions"], body3) + [""]
    st = [r for r in results if r["tool"] == "strace"]
    if st:
        lines += ["### Syscalls per job (strace -f, per thread)", ""]
        header = ["broker", "dialect", "thread", "syscalls/job", "by name (per job)"]
        body = []
        for r in st:
            for tid, counts in sorted(r["syscalls"].items()):
                total = sum(counts.values())
                if total < 0.005:
                    continue
                top = ", ".join(f"{k} {fmt(v)}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:6])
                name = r["threads"].get(tid, str(tid))
                body.append([r["kind"], r["dialect"], name, fmt(total), top])
        lines += md(header, body) + [""]
    lines += ["Runs (jobs measured, jobs/s, broker CPU and minor page faults per job under the tool):", ""]
    for r in results:
        lines.append(f"* {r['kind']} {r['dialect']} under {r['tool']}: {r['jobs']} jobs, "
                     f"{r['jobs_per_s']:,.0f} jobs/s, {r['cpu_us_per_job']:.1f} us CPU/job, "
                     f"{r['faults_per_job']:.1f} minor faults/job")
    return lines


def md(header: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(row) + " |" for row in body]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tools", default="callgrind,strace")
    p.add_argument("--kinds", default="fastbackend,ceiling,slot-ceiling")
    p.add_argument("--dialects", default="0.5,0.9")
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=1_000)
    p.add_argument("--window", type=int, default=64, help="closed loop: unfinished jobs per client socket")
    p.add_argument("--rate", type=float, default=0.0, help="open loop at this many jobs/s instead")
    p.add_argument("--archive-size", type=int, default=0, help="bytes of archive in each result")
    p.add_argument("--stdout-size", type=int, default=0, help="bytes of stdout in each result")
    p.add_argument("--top", type=int, default=8, help="list the main thread's N costliest functions")
    p.add_argument("--out", default="", help="folder for dumps and logs (default: a new temporary one)")
    p.add_argument("--summary", default="", help="also write the tables (markdown) here")
    args = p.parse_args()
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="fb-breakdown-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    factory = BrokerFactory(out_dir)
    results = []
    for tool in [t for t in args.tools.split(",") if t]:
        for dialect in [d for d in args.dialects.split(",") if d]:
            for kind in [k for k in args.kinds.split(",") if k]:
                if kind.startswith("fastbackend") or kind in CEILING_SOURCES:
                    factory.describe(kind, dialect)  # refuses a pure-Python or debug fastbackend
                print(f"-- {kind} {dialect} under {tool}", file=sys.stderr, flush=True)
                results.append(run_one(factory, kind, dialect, tool, args, out_dir))
    lines = report(results)
    lines.append("")
    lines.append(f"(dumps, strace files and logs in {out_dir})")
    print("\n".join(lines))
    if args.summary:
        Path(args.summary).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
