"""Drive one broker with generator processes: the plumbing of every end-to-end scenario.

A :class:`LoadSession` owns a broker (see ``brokers.py``) and the generator processes
(``loadgen.py``) pointed at it; it hands out commands and collects their JSON answers, and
ends every process it started by its own PID, whatever happens.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from brokers import Broker, BrokerFactory

LOADGEN = Path(__file__).resolve().parent / "loadgen.py"


class Peer:
    """A generator process spoken to by JSON lines on its stdin/stdout."""

    def __init__(self, role: str, cfg: dict, ready_timeout: float = 30.0, script: Path = LOADGEN) -> None:
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, str(script), role, json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self._buffer = b""
        self._ready_timeout = ready_timeout
        # Not waited for here: the generators of a session start side by side.
        self.ready: dict | None = None

    def wait_ready(self) -> dict:
        """The process's ``ready`` line (its peers have said hello)."""
        if self.ready is None:
            self.ready = self.read(self._ready_timeout)
        return self.ready

    def read(self, timeout: float) -> dict:
        """The next JSON line from the process, waiting at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"no answer within {timeout:.0f} s")
            if self._selector.select(min(left, 1.0)):
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    # End of file: the process closed its stdout or exited.  (The pipe then
                    # stays "readable" for ever: waiting on would spin until the deadline.)
                    self._fail("its output ended before the answer")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _fail(self, what: str) -> NoReturn:
        self.stop()
        err = self.proc.stderr.read().decode(errors="replace")[-3000:]
        raise RuntimeError(f"{self.role} generator: {what} (exit status {self.proc.poll()})\n{err}")

    def tell(self, command: dict | str) -> None:
        """Send ``command`` without waiting for its answer (read it later with :meth:`read`)."""
        self.wait_ready()
        text = command if isinstance(command, str) else json.dumps(command)
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def ask(self, command: dict | str, timeout: float) -> dict:
        self.tell(command)
        return self.read(timeout)

    def stop(self) -> None:
        """Close stdin (the process's signal to finish), then end it by PID if it lingers."""
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._selector.close()


class LoadSession:
    """One broker of ``kind`` plus the generator processes attached to it, all speaking
    ``dialect`` ("0.5" or "0.9")."""

    def __init__(self, factory: BrokerFactory, kind: str, dialect: str = "0.5",
                 extra_args: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.dialect = dialect
        self.broker: Broker = factory.start(kind, dialect, extra_args)
        self.peers: list[Peer] = []

    # -- generator processes ------------------------------------------------------------

    def agents(self, agents: int, slots: int, environments: list[str], archive_size: int = 0,
               stdout_size: int = 0, hold_ms: float = 0) -> Peer:
        peer = Peer("agents", {
            "addr": self.broker.agent_addr, "dialect": self.dialect, "agents": agents, "slots": slots,
            "environments": environments, "envelope": self.kind == "ceiling",
            "archive_size": archive_size, "stdout_size": stdout_size, "hold_ms": hold_ms,
        })
        self.peers.append(peer)
        return peer

    def clients(self, clients: int = 1, client_base: int = 0) -> Peer:
        """Client sockets; 0.9's job ids are global, so two client processes of one
        session need different ``client_base`` (socket numbers in their job ids)."""
        peer = Peer("clients", {"addr": self.broker.client_addr, "dialect": self.dialect,
                                "clients": clients, "client_base": client_base})
        self.peers.append(peer)
        return peer

    def heartbeat(self, interval: float = 0.1) -> Peer:
        peer = Peer("heartbeat", {"addr": self.broker.client_addr, "dialect": self.dialect,
                                  "interval": interval})
        self.peers.append(peer)
        return peer

    def settle(self, seconds: float = 0.3) -> None:
        """Wait until every generator is ready, then give the broker time to process the hellos."""
        for peer in self.peers:
            peer.wait_ready()
        time.sleep(seconds)

    # -- measurement ----------------------------------------------------------------------

    def measured(self, peer: Peer, command: dict, timeout: float) -> tuple[dict, float]:
        """Run ``command`` on ``peer``; returns its answer and the broker's CPU seconds meanwhile."""
        cpu0 = self.broker.cpu()
        answer = peer.ask(command, timeout)
        cpu = self.broker.cpu() - cpu0
        if not self.broker.alive():
            raise RuntimeError(f"{self.kind} broker died:\n{self.broker.log_tail()}")
        return answer, cpu

    def close(self) -> None:
        for peer in self.peers:
            peer.stop()
        self.peers.clear()
        self.broker.stop()

    def __enter__(self) -> LoadSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
