"""Start the brokers under test as subprocesses and read what they cost from /proc.

Three kinds of broker sit behind the same two addresses:

* ``fastbackend`` -- ``python -m fastbackend serve AGENT CLIENT`` (compiled modules), and
  ``fastbackend-py`` the same with ``FASTBACKEND_NO_EXTENSIONS=1`` (the pure-Python twins);
* ``stock``       -- INGInious 0.5's ``Backend`` through ``stock/launch_stock.py``, run by the
  interpreter ``FASTBACKEND_STOCK_PYTHON`` names (see ``stock/setup.sh``);
* ``ceiling``     -- ``ceiling/forwarder.c``, compiled here against pyzmq's own libzmq: it
  forwards frames without decoding them, the best any broker could do on this machine.

The figure that survives a shared 2-core machine is the broker's CPU time, read from
``/proc/PID/task/*/schedstat`` (nanoseconds, every thread including libzmq's I/O thread).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STOCK_LAUNCHER = HERE / "stock" / "launch_stock.py"
FORWARDER_SOURCE = HERE / "ceiling" / "forwarder.c"

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by every thread of process ``pid``.

    schedstat counts nanoseconds where /proc/PID/stat counts 10 ms ticks; both cover
    libzmq's I/O thread, which does a real part of a broker's work.
    """
    total = 0
    try:
        for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            try:
                with open(path) as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass  # a thread that ended between glob and open
        if total:
            return total / 1e9
    except OSError:
        pass
    with open(f"/proc/{pid}/stat") as f:
        # Fields after the parenthesised command name; utime and stime are 14th and 15th.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def libzmq_path() -> Path:
    """The libzmq shared library that pyzmq's wheel ships (or links)."""
    import zmq

    site = Path(zmq.__file__).resolve().parent.parent
    found = sorted(site.glob("pyzmq.libs/libzmq*.so*"))
    if found:
        return found[0]
    # Not a manylinux wheel: ask the dynamic loader what the Cython backend links.
    ext = sorted(Path(zmq.__file__).resolve().parent.glob("backend/cython/_zmq*.so"))
    if ext:
        out = subprocess.run(["ldd", str(ext[0])], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if "libzmq" in line and "=>" in line:
                return Path(line.split("=>")[1].split("(")[0].strip())
    raise RuntimeError("cannot find the libzmq that pyzmq uses")


def build_forwarder(out_dir: Path) -> Path:
    """Compile ceiling/forwarder.c against pyzmq's libzmq; returns the executable."""
    lib = libzmq_path()
    exe = out_dir / "forwarder"
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"the ceiling broker needs a C compiler ({cc})")
    subprocess.run(
        [cc, "-O2", "-std=c11", "-Wall", "-o", str(exe), str(FORWARDER_SOURCE), str(lib),
         f"-Wl,-rpath,{lib.parent}"],
        check=True,
    )
    return exe


@dataclass
class Broker:
    """A running broker process and its two addresses."""

    kind: str
    proc: subprocess.Popen
    agent_addr: str
    client_addr: str
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def stop(self) -> None:
        """End the broker by its PID: SIGTERM, then SIGKILL after a grace period."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


class BrokerFactory:
    """Knows how to start each kind of broker; builds the ceiling once per session."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self._forwarder: Path | None = None
        self.stock_python = os.environ.get("FASTBACKEND_STOCK_PYTHON") or None

    def command(self, kind: str, agent_addr: str, client_addr: str) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if kind == "ceiling":
            if self._forwarder is None:
                self._forwarder = build_forwarder(self.work_dir)
            return [str(self._forwarder), agent_addr, client_addr], env
        if kind in ("fastbackend", "fastbackend-py"):
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            if kind == "fastbackend-py":
                env["FASTBACKEND_NO_EXTENSIONS"] = "1"
            else:
                env.pop("FASTBACKEND_NO_EXTENSIONS", None)
            return [sys.executable, "-m", "fastbackend", "serve", agent_addr, client_addr], env
        if kind == "stock":
            if not self.stock_python:
                raise RuntimeError("FASTBACKEND_STOCK_PYTHON is not set")
            # The stock venv must not see this checkout or our site-packages.
            env.pop("PYTHONPATH", None)
            return [self.stock_python, str(STOCK_LAUNCHER), agent_addr, client_addr], env
        raise ValueError(kind)

    def start(self, kind: str) -> Broker:
        agent_addr = f"tcp://127.0.0.1:{free_port()}"
        client_addr = f"tcp://127.0.0.1:{free_port()}"
        cmd, env = self.command(kind, agent_addr, client_addr)
        fd, log_name = tempfile.mkstemp(prefix=f"{kind}-", suffix=".log", dir=self.work_dir)
        # The broker's log goes to a file, never to a pipe nobody reads (that would stall it).
        with os.fdopen(fd, "wb") as log:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    cwd=str(self.work_dir))
        broker = Broker(kind, proc, agent_addr, client_addr, Path(log_name))
        time.sleep(0.05)
        if not broker.alive():
            raise RuntimeError(f"{kind} broker exited at once:\n{broker.log_tail()}")
        return broker
