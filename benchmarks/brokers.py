"""Start the brokers under test as subprocesses and read what they cost from /proc.

Three kinds of broker sit behind the same two addresses:

* ``fastbackend`` -- ``python -m fastbackend serve AGENT CLIENT`` (compiled modules, no
  ``--dialect``: each peer is served in the dialect it speaks, as operators run it), and
  ``fastbackend-py`` the same with ``FASTBACKEND_NO_EXTENSIONS=1`` (the pure-Python twins);
* ``stock``       -- the stock INGInious ``Backend`` of the dialect under test through
  ``stock/launch_stock.py``: 0.5 run by ``FASTBACKEND_STOCK_PYTHON`` (``stock/setup.sh``),
  0.9.2 by ``FASTBACKEND_STOCK09_PYTHON`` (``stock/setup-0.9.sh``);
* ``ceiling``     -- ``ceiling/forwarder.c``, compiled here against pyzmq's own libzmq: it
  forwards frames without decoding them, the best any broker could do on this machine;
* ``slot-ceiling`` -- ``ceiling/slotbroker.c``, built the same way: a C broker that reads
  each message's type, keeps agents' slots, a FIFO of waiting jobs and a job table, and
  pings agents -- the floor for a broker that respects slots (see the file for what it
  skips).

Which fastbackend runs: the one this interpreter imports (an installed package, or the
checkout when it is first on ``sys.path``), else the checkout holding these benchmarks.
:func:`describe` asks the broker's own interpreter what it will run (core, build, loop,
library versions); a "fastbackend" that would run the pure-Python core, or a debug build
outside a smoke run, is refused with a message saying so, and every summary table
names what ran.

The figure that survives a shared 2-core machine is the broker's CPU time, read from
``/proc/PID/task/*/schedstat`` (nanoseconds, every thread including libzmq's I/O thread).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_config import ALLOW_DEBUG, SMOKE, STOCK_PYTHON_VARS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STOCK_LAUNCHER = HERE / "stock" / "launch_stock.py"
FORWARDER_SOURCE = HERE / "ceiling" / "forwarder.c"
SLOTBROKER_SOURCE = HERE / "ceiling" / "slotbroker.c"
#: Each C ceiling's kind -> its source.
CEILING_SOURCES = {"ceiling": FORWARDER_SOURCE, "slot-ceiling": SLOTBROKER_SOURCE}

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: Run by the broker's interpreter, with the broker's environment: what will it run?
PROBE = r"""
import json, sys
kind = sys.argv[1]
info = {}
import zmq
info["pyzmq"], info["libzmq"] = zmq.__version__, zmq.zmq_version()
import msgpack
info["msgpack"] = ".".join(map(str, msgpack.version))
try:
    from msgpack import _cmsgpack
    info["msgpack_c"] = msgpack.Packer is _cmsgpack.Packer
except ImportError:
    info["msgpack_c"] = False
if kind == "stock":
    from importlib.metadata import version
    info["inginious"] = version("inginious")
    info["loop"] = "asyncio"
else:
    import logging
    logging.disable(logging.CRITICAL)  # the selector's loud fallback warning: reported below instead
    import fastbackend
    from fastbackend import broker, sched, wire
    from fastbackend.cli import new_event_loop
    info["path"] = fastbackend.__path__[0]
    info["core"] = {"broker": broker.IMPL, "wire": wire.IMPL, "sched": sched.IMPL}
    debug = {}
    for name in ("_broker_c", "_wire_c", "_sched_c"):
        mod = sys.modules.get("fastbackend." + name)
        if mod is not None and hasattr(mod, "DEBUG"):
            debug[name] = bool(mod.DEBUG)
    info["debug"] = debug
    loop = new_event_loop()
    info["loop"] = type(loop).__module__.split(".")[0]
    loop.close()
print(json.dumps(info))
"""


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


def raise_nofile_limit() -> None:
    """In the broker's child process before exec: the descriptor limit up to its hard limit.

    Every connected agent or client is one TCP descriptor in the broker; the scale
    benchmark connects 10,000 agents, more than a default soft limit of 1,024 allows.
    The broker's own code is not changed for it: this is what an operator's service
    manager does (``LimitNOFILE=``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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


def build_forwarder(out_dir: Path, source: Path = FORWARDER_SOURCE) -> Path:
    """Compile a C ceiling (ceiling/forwarder.c by default) against pyzmq's libzmq; returns
    the executable (named after the source)."""
    lib = libzmq_path()
    exe = out_dir / source.stem
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"the ceiling brokers need a C compiler ({cc})")
    subprocess.run(
        [cc, "-O2", "-std=c11", "-Wall", "-o", str(exe), str(source), str(lib),
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


def fastbackend_source() -> Path | None:
    """The folder to put first on the broker's ``PYTHONPATH``, or None when not needed.

    The fastbackend this interpreter would import (found without importing it): an
    installed one needs nothing; one found elsewhere (a checkout first on ``sys.path``)
    is passed on.  When none is importable, the checkout holding these benchmarks.
    """
    spec = importlib.util.find_spec("fastbackend")
    if spec is None or not spec.submodule_search_locations:
        return ROOT
    parent = Path(list(spec.submodule_search_locations)[0]).resolve().parent
    paths = sysconfig.get_paths()
    installed = {Path(paths[name]).resolve() for name in ("purelib", "platlib")}
    return None if parent in installed else parent


def describe_label(kind: str, info: dict) -> str:
    """A table column's name for the broker ``kind`` as :func:`BrokerFactory.describe` found it."""
    if kind == "ceiling":
        return f"ceiling [C, libzmq {info.get('libzmq', '?')}]"
    if kind == "slot-ceiling":
        return f"C slot ceiling [libzmq {info.get('libzmq', '?')}]"
    if kind == "stock":
        return f"stock {info.get('inginious', '?')} [asyncio]"
    cores = set(info.get("core", {}).values())
    if len(cores) == 1:
        core = cores.pop()
    else:
        core = "mixed " + ",".join(f"{k}={v}" for k, v in info["core"].items())
    if core == "py":
        build = ""
    elif not info.get("debug"):
        build = " build?"
    else:
        build = " debug" if any(info["debug"].values()) else " release"
    return f"{kind} [{core}{build}, {info.get('loop', '?')}]"


class BrokerFactory:
    """Knows how to start each kind of broker; builds each C ceiling once per session."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self._ceilings: dict[str, Path] = {}
        self.stock_python = {d: os.environ.get(var) or None for d, var in STOCK_PYTHON_VARS.items()}
        self.source = fastbackend_source()
        self._described: dict[tuple[str, str], dict] = {}

    def command(self, kind: str, agent_addr: str, client_addr: str,
                dialect: str = "0.5") -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if kind in CEILING_SOURCES:
            if kind not in self._ceilings:
                self._ceilings[kind] = build_forwarder(self.work_dir, CEILING_SOURCES[kind])
            return [str(self._ceilings[kind]), agent_addr, client_addr], env
        if kind in ("fastbackend", "fastbackend-py"):
            if self.source is not None:
                env["PYTHONPATH"] = os.pathsep.join([str(self.source), env.get("PYTHONPATH", "")]).rstrip(
                    os.pathsep)
            if kind == "fastbackend-py":
                env["FASTBACKEND_NO_EXTENSIONS"] = "1"
            else:
                env.pop("FASTBACKEND_NO_EXTENSIONS", None)
            return [sys.executable, "-m", "fastbackend", "serve", agent_addr, client_addr], env
        if kind == "stock":
            python = self.stock_python.get(dialect)
            if not python:
                raise RuntimeError(f"{STOCK_PYTHON_VARS[dialect]} is not set")
            # The stock venv must not see this checkout or our site-packages.
            env.pop("PYTHONPATH", None)
            return [python, str(STOCK_LAUNCHER), agent_addr, client_addr], env
        raise ValueError(kind)

    def describe(self, kind: str, dialect: str = "0.5") -> dict:
        """What a broker of ``kind`` runs: asked of its own interpreter, once per session.

        Refuses (RuntimeError) a "fastbackend" whose compiled modules are missing, and a
        debug build of them unless this is a smoke run or FASTBACKEND_BENCH_ALLOW_DEBUG=1.
        """
        key = (kind, dialect if kind == "stock" else "")
        if key in self._described:
            return self._described[key]
        if kind in CEILING_SOURCES:
            import zmq

            info = {"libzmq": zmq.zmq_version(), "library": str(libzmq_path())}
        else:
            cmd, env = self.command(kind, "", "", dialect)
            probe = [cmd[0], "-c", PROBE, kind]
            done = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=60,
                                  cwd=str(self.work_dir))
            if done.returncode != 0:
                raise RuntimeError(f"cannot start {kind}: its interpreter fails to import it:\n"
                                   f"{done.stderr[-2000:]}")
            info = json.loads(done.stdout.strip().splitlines()[-1])
        if kind == "fastbackend":
            slow = sorted(name for name, impl in info["core"].items() if impl != "c")
            if slow:
                raise RuntimeError(
                    f"fastbackend at {info['path']} has no compiled {', '.join(slow)} module(s): it would "
                    "run the pure-Python core and measure that. Build the extensions (pip install ., or "
                    "python setup.py build_ext --inplace in the checkout), or run from where they are built.")
            if any(info["debug"].values()) and not (SMOKE or ALLOW_DEBUG):
                raise RuntimeError(
                    f"fastbackend at {info['path']} is a debug build (FASTBACKEND_DEBUG=1, invariant checks "
                    "compiled in): rebuild it without FASTBACKEND_DEBUG to measure it, or set "
                    "FASTBACKEND_BENCH_ALLOW_DEBUG=1 to measure the debug build on purpose.")
        info["label"] = describe_label(kind, info)
        self._described[key] = info
        return info

    def start(self, kind: str, dialect: str = "0.5", extra_args: tuple[str, ...] = ()) -> Broker:
        """Start a broker of ``kind``; ``extra_args`` are appended to fastbackend's command
        line (e.g. ``--metrics HOST:PORT``), and refused for the other kinds."""
        self.describe(kind, dialect)
        agent_addr = f"tcp://127.0.0.1:{free_port()}"
        client_addr = f"tcp://127.0.0.1:{free_port()}"
        cmd, env = self.command(kind, agent_addr, client_addr, dialect)
        if extra_args:
            if not kind.startswith("fastbackend"):
                raise ValueError(f"{kind} takes no extra arguments ({extra_args})")
            cmd = cmd + list(extra_args)
        fd, log_name = tempfile.mkstemp(prefix=f"{kind}-", suffix=".log", dir=self.work_dir)
        # The broker's log goes to a file, never to a pipe nobody reads (that would stall it).
        with os.fdopen(fd, "wb") as log:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    cwd=str(self.work_dir), preexec_fn=raise_nofile_limit)
        broker = Broker(kind, proc, agent_addr, client_addr, Path(log_name))
        time.sleep(0.05)
        if not broker.alive():
            raise RuntimeError(f"{kind} broker exited at once:\n{broker.log_tail()}")
        if kind.startswith("fastbackend"):
            self._check_started(broker, self.describe(kind, dialect))
        return broker

    @staticmethod
    def _check_started(broker: Broker, info: dict, timeout: float = 15.0) -> None:
        """Wait for fastbackend's start-up line; its core must be the one the probe found."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and broker.alive():
            text = broker.log_tail(100_000)
            at = text.find("fastbackend started (")
            if at >= 0:
                core = text[at + len("fastbackend started ("):].split(" ", 1)[0].rstrip(",)")
                if core != info["core"]["broker"]:
                    broker.stop()
                    raise RuntimeError(f"{broker.kind} started the {core} core, not {info['core']['broker']}")
                return
            time.sleep(0.02)
        log = broker.log_tail()
        broker.stop()
        raise RuntimeError(f"{broker.kind} never logged its start-up line:\n{log}")
