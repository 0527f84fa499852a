"""Test hosts in network namespaces, and real INGInious 0.9.2 peers as separate processes.

Agents usually run on other machines than the backend; :class:`Topology` gives each test
peer a host of its own: one network namespace per host (``fbt-NAME``), joined to the
broker's namespace (``fbt-broker``) by a veth pair made directly inside the two namespaces,
on a private subnet ``10.213.N.0/24`` (the broker ``.1``, the host ``.2``).  Nothing is
created in, or changed on, the machine's own namespace: its interfaces, routes and addresses
are never touched, and the test traffic stays between namespaces the test made.  A link is
cut with ``ip link set DEV down`` or a qdisc dropping every packet (both ends: ``netem loss 100%``,
or ``pfifo limit 0`` where the kernel lacks sch_netem) and healed again.
Every namespace is deleted at the end (deleting a namespace deletes its veth ends), and at
the start too if a crashed earlier run left one behind (by the ``fbt-`` prefix).

The peers are real INGInious 0.9.2 code, one process each (``python -m peers.netns agent|client
…``), so a SIGKILL or a cut really closes or freezes their TCP connections:

* ``agent ADDR NAME SLOTS SECONDS [LATER]``: :class:`peers.real09.ScriptedAgent` finishing its
  first SLOTS jobs after SECONDS each (``inf``: never), the next ones after LATER (default
  SECONDS), restarted on a new socket whenever its ``run()`` ends, as
  ``inginious-agent-*`` does (the real agent gives up after 10 s without a ping);
* ``client ADDR``: the real ``inginious.client.client.Client``; each stdin line
  ``submit N`` submits N jobs.

Each writes one JSON object per line on stdout (``start``, ``job``, ``ping``, ``ready``,
``result``), read by :class:`PeerProcess` in a thread.  Importing this module needs no
INGInious; running the peers needs 0.9.2 first on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .broker import TESTS_DIR, BrokerConfig, BrokerFailed, BrokerProcess, pythonpath

PREFIX = "fbt-"
BROKER_NS = PREFIX + "broker"
SUBNET = "10.213"
AGENT_PORT = 2001
CLIENT_PORT = 2000


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None if they can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command (iproute2) is missing"
    probe = PREFIX + "probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


_LOSS_QDISC: list[list[str]] = []


def loss_qdisc() -> list[str]:
    """The qdisc that drops every packet a link sends: ``netem loss 100%`` where the kernel has
    sch_netem, else ``pfifo limit 0`` (a queue that holds nothing: same effect, in every kernel).
    Probed in a namespace of our own, never on the machine's interfaces."""
    if not _LOSS_QDISC:
        probe = PREFIX + "qdisc"
        _ip("netns", "add", probe, check=False)
        netem = ["netem", "loss", "100%"]
        ok = _ip("netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", *netem, check=False)
        _ip("netns", "del", probe, check=False)
        _LOSS_QDISC.append(netem if ok.returncode == 0 else ["pfifo", "limit", "0"])
    return _LOSS_QDISC[0]


def leftover_namespaces() -> list[str]:
    names = _ip("netns", "list").stdout.split("\n")
    return [line.split()[0] for line in names if line.startswith(PREFIX)]


def remove_leftovers() -> None:
    for name in leftover_namespaces():
        _ip("netns", "del", name, check=False)


class Topology:
    """The broker's namespace and one namespace per host, each on its own veth link."""

    def __init__(self) -> None:
        self.hosts: dict[str, int] = {}

    def __enter__(self) -> Topology:
        remove_leftovers()
        _ip("netns", "add", BROKER_NS)
        _ip("-n", BROKER_NS, "link", "set", "lo", "up")
        return self

    def __exit__(self, *_: Any) -> None:
        for name in [BROKER_NS, *(self.ns(host) for host in self.hosts)]:
            _ip("netns", "del", name, check=False)
        self.hosts.clear()

    @staticmethod
    def ns(host: str) -> str:
        return PREFIX + host

    def add_host(self, host: str) -> str:
        """Make host ``host`` (its namespace and link); return the broker's address seen from it."""
        index = len(self.hosts) + 1
        self.hosts[host] = index
        ns = self.ns(host)
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        # Both ends are created inside their namespaces: nothing appears in the machine's own.
        _ip("link", "add", f"fbb{index}", "netns", BROKER_NS, "type", "veth",
            "peer", "name", f"fbh{index}", "netns", ns)
        _ip("-n", BROKER_NS, "addr", "add", f"{SUBNET}.{index}.1/24", "dev", f"fbb{index}")
        _ip("-n", ns, "addr", "add", f"{SUBNET}.{index}.2/24", "dev", f"fbh{index}")
        _ip("-n", BROKER_NS, "link", "set", f"fbb{index}", "up")
        _ip("-n", ns, "link", "set", f"fbh{index}", "up")
        return f"{SUBNET}.{index}.1"

    def _ends(self, host: str) -> tuple[tuple[str, str], tuple[str, str]]:
        index = self.hosts[host]
        return (BROKER_NS, f"fbb{index}"), (self.ns(host), f"fbh{index}")

    def cut(self, host: str, how: str) -> None:
        """Cut the host's link: ``down`` (its end of the veth) or ``loss`` (every packet dropped, both
        ways: :func:`loss_qdisc`)."""
        ends = self._ends(host)
        if how == "down":
            ns, dev = ends[1]
            _ip("-n", ns, "link", "set", dev, "down")
        else:
            for ns, dev in ends:
                _ip("netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *loss_qdisc())

    def heal(self, host: str, how: str) -> None:
        ends = self._ends(host)
        if how == "down":
            ns, dev = ends[1]
            _ip("-n", ns, "link", "set", dev, "up")
        else:
            for ns, dev in ends:
                _ip("netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root")


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath(TESTS_DIR)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class PeerProcess:
    """One peer subprocess (optionally in a namespace), its stdout read as JSON lines in a thread.

    Started and ended by its own PID (``ip netns exec`` execs the command, so the PID is the
    peer's own): SIGTERM, a bounded wait, SIGKILL.
    """

    def __init__(self, argv: list[str], ns: str | None = None, log_path: Path | None = None) -> None:
        prefix = ["ip", "netns", "exec", ns] if ns else []
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "peers.netns", *argv], env=peer_env(),
                                     cwd=TESTS_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                     text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["at"] = time.monotonic()
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._cond:
            return [event for event in self.events if event["ev"] == kind]

    def wait(self, kind: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [event for event in self.events if event["ev"] == kind]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"{self.proc.args[-4:]}: {len(found)} of {count} {kind!r} events "
                                         f"within {timeout}s (exit status {self.proc.poll()})")
                self._cond.wait(min(left, 0.1))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> float:
        """SIGKILL the peer by its PID; return when (monotonic)."""
        at = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        return at

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self._reader.join(5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()


class NetnsBroker(BrokerProcess):
    """A broker process inside a namespace, bound to all of that namespace's addresses."""

    def __init__(self, config: BrokerConfig, log_path: Path, ns: str = BROKER_NS, **kwargs: Any) -> None:
        super().__init__(config, log_path, agent_addr=f"tcp://0.0.0.0:{AGENT_PORT}",
                         client_addr=f"tcp://0.0.0.0:{CLIENT_PORT}", **kwargs)
        self.ns = ns

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        argv, env, cwd = super().command()
        return ["ip", "netns", "exec", self.ns, *argv], env, cwd

    def wait_serving(self, timeout: float = 10.0) -> float:
        # The test's own namespace has no route to the broker's: wait for its start line.
        start = time.monotonic()
        marker = "fastbackend started" if not self.config.is_stock else ""
        while marker not in self.log() or not self.log():
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerFailed(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() - start > timeout:
                raise BrokerFailed(f"broker not serving after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return time.monotonic() - start


# -- the peer processes ---------------------------------------------------------------------
def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _agent_main(addr: str, name: str, slots: int, seconds: float, later: float) -> None:
    import asyncio

    import zmq.asyncio

    from .real09 import DEFAULT_ENV, ScriptedAgent

    class PingLogged(ScriptedAgent):
        async def _Agent__handle_ping(self, message: Any) -> None:  # noqa: N802 - the real Agent's handler
            _emit(ev="ping", name=name)
            await ScriptedAgent._Agent__handle_ping(self, message)

    jobs = [0]  # over the restarts

    async def behaviour(agent: ScriptedAgent, message: Any) -> None:
        _emit(ev="job", name=name, seq=message.inputdata.get("seq"))
        jobs[0] += 1
        hold = seconds if jobs[0] <= slots else later
        if hold == float("inf"):
            await asyncio.Event().wait()
        await asyncio.sleep(hold)
        await agent.finish(message.job_id, "success", "ok", custom={"agent": name})

    async def main() -> None:
        while True:
            ctx = zmq.asyncio.Context()
            agent = PingLogged(ctx, addr, name, slots, [DEFAULT_ENV], behaviour)
            _emit(ev="start", name=name)
            try:
                await agent.run()
            except asyncio.CancelledError:
                # "Last ping too old": the real agent restarts itself on a new socket.
                pass
            agent.close()
            ctx.destroy(linger=0)

    asyncio.run(main())


def _client_main(addr: str) -> None:
    import asyncio

    import zmq.asyncio
    from inginious.client.client import Client
    from inginious.common.messages import BackendJobDone, ZMQUtils

    from .real09 import DEFAULT_ENV, FakeTask, wait_environments

    real_recv = ZMQUtils.recv.__func__

    async def recv(cls: Any, socket: Any, skip_first: bool = False) -> Any:
        # Every result on the wire, so that a duplicate the Client would swallow is seen.
        message = await real_recv(cls, socket, skip_first)
        if isinstance(message, BackendJobDone):
            _emit(ev="wire", job_id=message.job_id, result=list(message.result))
        return message

    ZMQUtils.recv = classmethod(recv)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ctx = zmq.asyncio.Context()
        client = Client(ctx, addr, 10)
        client.start()
        await wait_environments(client, DEFAULT_ENV, timeout=60)
        _emit(ev="ready")
        task = FakeTask()
        seq = 0

        async def submit(count: int) -> None:
            nonlocal seq
            await wait_environments(client, DEFAULT_ENV, timeout=60)
            for _ in range(count):
                seq += 1

                def callback(*args: Any, seq: int = seq) -> None:
                    _emit(ev="result", seq=seq, result=list(args[0]), agent=(args[4] or {}).get("agent"))

                job_id = client.new_job(1, task, {"seq": seq}, callback, "netns")
                _emit(ev="submitted", seq=seq, job_id=job_id)

        commands: asyncio.Queue[str] = asyncio.Queue()

        def read_stdin() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(commands.put_nowait, line)
            loop.call_soon_threadsafe(commands.put_nowait, "")

        threading.Thread(target=read_stdin, daemon=True).start()
        while (line := await commands.get()):
            word, _, arg = line.strip().partition(" ")
            if word == "submit":
                await submit(int(arg or 1))

    asyncio.run(main())


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    role, *rest = sys.argv[1:]
    if role == "agent":
        _agent_main(rest[0], rest[1], int(rest[2]), float(rest[3]), float(rest[-1]))
    elif role == "client":
        _client_main(rest[0])
    else:
        raise SystemExit(f"unknown role {role!r}")
