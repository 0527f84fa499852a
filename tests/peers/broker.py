"""Start, watch and stop a broker subprocess (fastbackend, or the stock backend as reference).

A :class:`BrokerProcess` owns one subprocess, started by its own PID and ended by it:
SIGTERM (or SIGINT), a bounded wait, then SIGKILL.  Its stderr goes to a file so the
tests can read the log while it runs without any pipe filling up.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from . import PEERS09_DIR
from .raw import pack

TESTS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = TESTS_DIR.parent

#: One log line in the stock format: asctime - name - level - message.
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - (?P<name>[\w.]+) - "
    r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) - (?P<message>.*)$"
)


@dataclass(frozen=True)
class BrokerConfig:
    """Which broker to run: ``impl`` is "c", "py", or None for a stock backend.

    ``args`` are extra command-line arguments (e.g. ``("--dialect", "0.9")``); ``inginious``
    is the INGInious version a stock backend runs ("0.5" from the venv, "0.9" from
    :data:`peers.PEERS09_DIR`).
    """

    name: str
    impl: str | None
    loop: str | None
    args: tuple[str, ...] = ()
    inginious: str | None = None

    @property
    def is_stock(self) -> bool:
        return self.impl is None


CONFIGS: dict[str, BrokerConfig] = {
    cfg.name: cfg
    for cfg in (
        BrokerConfig("c-uvloop", "c", "uvloop"),
        BrokerConfig("c-asyncio", "c", "asyncio"),
        BrokerConfig("py-uvloop", "py", "uvloop"),
        BrokerConfig("py-asyncio", "py", "asyncio"),
        # The dialect pinned on the command line (no flag: each peer in the dialect of its frames).
        BrokerConfig("c-uvloop-pin0.9", "c", "uvloop", ("--dialect", "0.9")),
        BrokerConfig("py-asyncio-pin0.9", "py", "asyncio", ("--dialect", "0.9")),
        BrokerConfig("c-uvloop-pin0.5", "c", "uvloop", ("--dialect", "0.5")),
        BrokerConfig("stock", None, None, inginious="0.5"),
        BrokerConfig("stock-0.9", None, None, inginious="0.9"),
    )
}

#: The full matrix: both implementations on both event loops.
ALL_CONFIGS = ("c-uvloop", "c-asyncio", "py-uvloop", "py-asyncio")
#: What a test without a ``brokers`` marker runs against: the compiled broker on uvloop, as deployed.
DEFAULT_CONFIGS = ("c-uvloop",)
#: Each implementation once, on different loops: for tests of per-message code paths.
IMPL_CONFIGS = ("c-uvloop", "py-asyncio")
#: The stock backend a ``FASTBACKEND_TEST_STOCK=1`` run uses, by the importable INGInious dialect.
STOCK_CONFIGS = {"0.5": "stock", "0.9": "stock-0.9"}


def pythonpath(*first: str | Path, base: str | None = None, drop: tuple[str | Path, ...] = ()) -> str:
    """A PYTHONPATH value: ``first``, then ``base`` (default: this process's PYTHONPATH), minus ``drop``."""
    dropped = {os.path.realpath(d) for d in drop}
    rest = (os.environ.get("PYTHONPATH", "") if base is None else base).split(os.pathsep)
    entries: list[str] = []
    for entry in [*map(str, first), *rest]:
        if entry and entry not in entries and os.path.realpath(entry) not in dropped:
            entries.append(entry)
    return os.pathsep.join(entries)


def free_tcp_address() -> str:
    """A ``tcp://127.0.0.1:PORT`` address whose port was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


class BrokerFailed(RuntimeError):
    """The broker did not start, or ended badly."""


class BrokerProcess:
    """One broker subprocess on known addresses, with its log captured to a file."""

    def __init__(
        self,
        config: BrokerConfig,
        log_path: Path,
        agent_addr: str | None = None,
        client_addr: str | None = None,
        verbose: bool = False,
        extra_args: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.log_path = log_path
        self.agent_addr = agent_addr or free_tcp_address()
        self.client_addr = client_addr or free_tcp_address()
        self.verbose = verbose
        self.extra_args = extra_args
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # log bytes written by earlier runs of this object

    # -- process control -------------------------------------------------------------------
    def command(self) -> tuple[list[str], dict[str, str], Path]:
        """The argv, environment and working directory used to start the broker."""
        env = dict(os.environ)
        env.pop("FASTBACKEND_NO_EXTENSIONS", None)
        env.pop("FASTBACKEND_LOOP", None)
        env.update(self.extra_env)
        args = [self.agent_addr, self.client_addr, *self.config.args, *self.extra_args]
        args += ["-v"] if self.verbose else []
        if self.config.is_stock:
            # The stock backend of the config's INGInious version; the other one must not be
            # importable first (both install as the package ``inginious``).
            if self.config.inginious == "0.9":
                path = pythonpath(PEERS09_DIR, TESTS_DIR, base=env.get("PYTHONPATH", ""))
            else:
                path = pythonpath(TESTS_DIR, base=env.get("PYTHONPATH", ""), drop=(PEERS09_DIR,))
            env["PYTHONPATH"] = path
            return [sys.executable, "-m", "peers.stock_backend", *args], env, TESTS_DIR
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["FASTBACKEND_LOOP"] = self.config.loop or "asyncio"
        if self.config.impl == "py":
            env["FASTBACKEND_NO_EXTENSIONS"] = "1"
        return [sys.executable, "-m", "fastbackend", "serve", *args], env, REPO_ROOT

    def start(self, timeout: float = 15.0) -> None:
        """Start the broker and wait (bounded) until it answers on its client socket."""
        argv, env, cwd = self.command()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        try:
            self.wait_serving(timeout)
            if not self.config.is_stock:
                self.check_implementation()
        except BaseException:
            # A broker that does not serve (or runs the wrong core) is ended here, by its
            # PID: the caller never gets to stop what it was not handed.
            self.stop()
            raise

    def check_implementation(self) -> None:
        """Fail unless the broker runs the implementation asked for (a broken build must not
        pass for the compiled one): its start line names its core, and no compiled module
        was replaced by its pure-Python twin."""
        # "fastbackend [version] started (<impl> core, ...)": the first line it logs.
        (started,) = self.wait_log("INFO", " started (", timeout=5)[-1:]
        assert "fastbackend" in started and f"({self.config.impl} core" in started, started
        if self.config.impl == "c":
            assert "pure-python" not in self.log().lower(), self.log()

    def wait_serving(self, timeout: float = 10.0) -> float:
        """Wait until the client socket answers a ping (pong or unknown); return the delay."""
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        start = time.monotonic()
        deadline = start + timeout
        try:
            sock.connect(self.client_addr)
            # Probe in the dialect the broker serves (stock 0.9.2's receive loop dies on a 0.5 frame,
            # a broker pinned to 0.9 does not answer one).
            frame = pack({"@type": "Ping"} if self.dialect == "0.9" else {"type": "ping"})
            next_send = 0.0
            while True:
                now = time.monotonic()
                if self.proc is not None and self.proc.poll() is not None:
                    raise BrokerFailed(f"broker exited with {self.proc.returncode}:\n{self.log()}")
                if now > deadline:
                    raise BrokerFailed(f"broker not serving after {timeout}s:\n{self.log()}")
                if now >= next_send:
                    sock.send(frame)
                    next_send = now + 0.5
                if sock.poll(50):
                    sock.recv()
                    return time.monotonic() - start
        finally:
            sock.close()

    @property
    def dialect(self) -> str | None:
        """The dialect this broker is pinned to ("0.5", "0.9"), or None when it serves both."""
        if self.config.is_stock:
            return self.config.inginious
        args = [*self.config.args, *self.extra_args]
        for i, arg in enumerate(args):
            if arg == "--dialect" and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith("--dialect="):
                return arg.partition("=")[2]
        return None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the broker (by its PID), wait up to ``timeout``, SIGKILL if needed; return code.

        A broker that had to be killed returns ``-SIGKILL`` so callers see it did not exit cleanly.
        """
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                return -signal.SIGKILL
        return self.proc.returncode

    def start_on_free_ports(self, timeout: float = 15.0, attempts: int = 3) -> None:
        """Start on fresh free TCP ports, trying new ones if another process took them meanwhile."""
        for attempt in range(attempts):
            try:
                self.start(timeout)
                return
            except BrokerFailed:
                if attempt == attempts - 1 or "in use" not in self.log()[self._log_offset:]:
                    raise
                self.agent_addr, self.client_addr = free_tcp_address(), free_tcp_address()

    def restart(self, timeout: float = 15.0) -> None:
        """Stop the broker cleanly and start a new one on the same addresses."""
        code = self.stop()
        if code != 0:
            raise BrokerFailed(f"broker exited with {code} on restart:\n{self.log()}")
        self.start(timeout)

    # -- log -------------------------------------------------------------------------------
    def log(self) -> str:
        """Everything the broker wrote to stderr/stdout so far (all runs)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, level: str | None = None, contains: str | None = None) -> list[str]:
        """Log lines, optionally only those of ``level`` and/or containing ``contains`` (any case)."""
        lines = []
        for line in self.log().splitlines():
            match = LOG_LINE.match(line)
            if level is not None and (match is None or match["level"] != level):
                continue
            if contains is not None and contains.lower() not in line.lower():
                continue
            lines.append(line)
        return lines

    def wait_log(self, level: str | None = None, contains: str | None = None, count: int = 1,
                 timeout: float = 5.0) -> list[str]:
        """Wait (bounded) until at least ``count`` matching lines were logged; return them."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines(level, contains)
            if len(lines) >= count:
                return lines
            if time.monotonic() > deadline or not self.running():
                raise AssertionError(
                    f"expected {count} log line(s) level={level} containing {contains!r} "
                    f"within {timeout}s (broker running: {self.running()}); log:\n{self.log()[-4000:]}"
                )
            time.sleep(0.02)

    def check_clean_exit(self, code: int) -> None:
        """Assert an exit status of 0 and no traceback in the log."""
        log = self.log()
        assert code == 0, f"broker {self.config.name} exited with {code}:\n{log[-4000:]}"
        assert "Traceback" not in log, f"broker {self.config.name} logged a traceback:\n{log[-4000:]}"
