"""``fastbackend status CLIENT_ADDR``: what a backend is doing, asked as an ordinary client.

It connects one DEALER socket to the backend's client address, says one hello and sends
queue requests (``client_get_queue`` / ``ClientGetQueue``), nothing else, so it works
against fastbackend and against the stock backends of INGInious 0.5 and 0.7-0.9.2.

What the protocol can and cannot tell (and so what is shown):

* environments: the list the backend pushes to every client on hello;
* running jobs: agent, course/task, launcher and start time (age = now - start, read on
  this machine's clock);
* waiting jobs: job id, course/task, launcher and time limit only.  The queue answer
  says neither a waiting job's environment nor when it was submitted.  Waiting jobs are
  therefore grouped by course/task; the oldest of a group is its first in the answer
  (fastbackend and stock 0.5 list waiting jobs in arrival order).  An age is only known
  as "seen waiting for at least" across the refreshes of ``--watch``.  With ``--metrics``
  pointing at fastbackend's Prometheus endpoint, the per-environment counts
  (``fastbackend_jobs_waiting{environment}``), agents and slots are added.

Dialect: ``--dialect 0.5`` or ``0.9`` speaks that one.  Without it, the hello is sent in
0.9 and, if nothing answers, in 0.5: fastbackend serves either (or drops the other with a
log line when pinned with ``--dialect``).  A stock backend is different: its receive
loop ends on a frame of the other dialect (stock 0.5 on a 0.9 hello, stock 0.9.2 on a
0.5 one), so against a stock backend always give ``--dialect``.  fastbackend shows each
dialect's clients that dialect's environments and jobs only; ``--dialect both`` asks in
both, over two connections (fastbackend only).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
import zmq.utils.monitor

#: Per dialect: type key, hello, queue request, and the answers' type names.
_DIALECTS: dict[str, dict[str, str]] = {
    "0.9": {"key": "@type", "hello": "ClientHello", "get_queue": "ClientGetQueue",
            "environments": "BackendUpdateEnvironments", "queue": "BackendGetQueue", "unknown": "Unknown"},
    "0.5": {"key": "type", "hello": "client_hello", "get_queue": "client_get_queue",
            "environments": "backend_update_containers", "queue": "backend_get_queue", "unknown": "unknown"},
}
#: The order in which an unpinned status tries the dialects.
AUTO_ORDER = ("0.9", "0.5")
#: How long the first dialect tried waits for its hello's answer before the next one is tried.
PROBE_SECONDS = 2.0
#: Rows printed per table before "... N more".
MAX_ROWS = 25

CLIENT_NAME = "fastbackend-status"


class StatusError(RuntimeError):
    """No usable answer from the backend (the message says what was tried)."""


@dataclass
class RunningJob:
    job_id: str
    agent: str
    task: str
    launcher: str
    started_at: int
    #: 0.5: the end of its time limit (epoch s); 0.9: the time estimate in s (-1 unknown).
    limit: int


@dataclass
class TaskQueue:
    """The waiting jobs of one course/task, oldest (first listed) first."""

    task: str
    count: int
    oldest_job_id: str
    #: How long the oldest has been seen waiting by this status run (None: first look).
    oldest_seen_seconds: float | None = None


@dataclass
class Snapshot:
    """One answer of the backend, reduced to what an operator looks at."""

    address: str
    dialect: str
    at: float
    query_seconds: float
    environments: list[tuple[str | None, str]]
    running: list[RunningJob]
    waiting_total: int
    waiting_by_task: list[TaskQueue]
    waiting_ids: list[str] = field(default_factory=list, repr=False)
    metrics: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.address,
            "dialect": self.dialect,
            "at": self.at,
            "query_seconds": round(self.query_seconds, 4),
            "environments": [{"type": env_type, "name": name} for env_type, name in self.environments],
            "running": [
                {"job_id": job.job_id, "agent": job.agent, "task": job.task, "launcher": job.launcher,
                 "started_at": job.started_at, "age_seconds": _age(self.at, job.started_at),
                 ("time_limit_end" if self.dialect == "0.5" else "time_estimate"): job.limit}
                for job in self.running
            ],
            "waiting": {
                "total": self.waiting_total,
                # The queue answer names no environment: grouped by course/task.
                "by_task": [
                    {"task": q.task, "count": q.count, "oldest_job_id": q.oldest_job_id,
                     "oldest_seen_seconds": None if q.oldest_seen_seconds is None
                     else round(q.oldest_seen_seconds, 1)}
                    for q in self.waiting_by_task
                ],
                "by_environment": (self.metrics or {}).get("jobs_waiting"),
            },
            "metrics": self.metrics,
        }


def _age(now: float, started_at: int) -> int:
    return max(0, int(now - started_at))


class StatusClient:
    """One client connection to a backend: a hello, then queue requests on demand."""

    def __init__(self, address: str, dialect: str | None = None, timeout: float = 10.0,
                 context: zmq.Context | None = None) -> None:
        if dialect is not None and dialect not in _DIALECTS:
            raise ValueError(f"dialect must be 0.5 or 0.9, not {dialect!r}")
        self.address = address
        self.timeout = timeout
        self.dialect = dialect
        self.environments: list[tuple[str | None, str]] = []
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.linger = 0
        self._socket.ipv6 = True
        self._monitor = self._socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._connected = False
        self._auth_failed = False
        self._said_hello = False
        self._first_seen: dict[str, float] = {}
        try:
            self._socket.connect(address)
        except zmq.ZMQError as exc:
            self.close()
            raise StatusError(f"cannot connect to {address!r}: {exc}; expected tcp://HOST:PORT, "
                              "ipc://PATH or inproc://NAME") from None

    def close(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close(0)
        self._socket.close(0)

    def __enter__(self) -> StatusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- wire -----------------------------------------------------------------------------
    def _send(self, dialect: str, name: str) -> None:
        names = _DIALECTS[dialect]
        message: dict[str, Any] = {names["key"]: names[name]}
        if name == "hello":
            message["name"] = CLIENT_NAME
        self._socket.send(msgpack.packb(message, use_bin_type=True))

    def _watch_monitor(self) -> None:
        while self._monitor.poll(0):
            event = zmq.utils.monitor.recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._auth_failed = True

    def _receive(self, deadline: float) -> tuple[str, dict[str, Any]] | None:
        """The next message as (dialect, fields), or None at the deadline."""
        while True:
            self._watch_monitor()
            remaining = deadline - time.monotonic()
            if not self._socket.poll(max(0.0, min(remaining, 0.1)) * 1000):
                if remaining <= 0:
                    return None
                continue
            frame = self._socket.recv()
            try:
                message = msgpack.unpackb(frame, raw=False, strict_map_key=False)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            for dialect, names in _DIALECTS.items():
                if names["key"] in message:
                    return dialect, message

    def _wait_for(self, dialect: str, wanted: str, deadline: float) -> dict[str, Any] | None:
        """Wait for message ``wanted`` in ``dialect``, keeping pushed environment lists."""
        names = {**_DIALECTS[dialect], "nothing": None}
        while (received := self._receive(deadline)) is not None:
            got_dialect, message = received
            if got_dialect != dialect:
                continue
            kind = message[names["key"]]
            if kind == names["environments"]:
                self.environments = _environments(dialect, message)
                if wanted == "environments":
                    return message
            elif kind == names[wanted]:
                return message
            elif kind == names["unknown"]:
                # The backend does not know us (it restarted): say hello again.
                self._said_hello = False
                return message
        return None

    def _no_answer(self, what: str, seconds: float) -> StatusError:
        self._watch_monitor()
        if self._auth_failed:
            why = "the backend refused the connection (its allowlist does not include this address)"
        elif not self._connected:
            why = "no connection could be made (nothing listening there, or unreachable)"
        else:
            why = "connected, but it did not answer"
        return StatusError(f"no backend answered {what} at {self.address} within {seconds:.1f} s: {why}")

    # -- protocol ---------------------------------------------------------------------------
    def hello(self) -> str:
        """Say hello (auto: 0.9, then 0.5) and wait for the environment list; return the dialect."""
        start = time.monotonic()
        order = [self.dialect] if self.dialect else list(AUTO_ORDER)
        tried = []
        for position, dialect in enumerate(order):
            tried.append(dialect)
            last = position == len(order) - 1
            wait = self.timeout if last else min(PROBE_SECONDS, self.timeout)
            self._send(dialect, "hello")
            if self._wait_for(dialect, "environments", time.monotonic() + wait) is not None:
                self.dialect = dialect
                self._said_hello = True
                return dialect
            self._watch_monitor()
            if not self._connected:
                break  # nobody there: another dialect would not change that
        raise self._no_answer(f"a hello in dialect {' or '.join(tried)}", time.monotonic() - start)

    def snapshot(self, metrics_url: str | None = None) -> Snapshot:
        """Ask for the queue (saying hello first if needed) and reduce the answer."""
        if not self._said_hello:
            self.hello()
        assert self.dialect is not None
        # An answer that came too late for the previous refresh must not pass for this one
        # (pushed environment lists are kept).
        self._wait_for(self.dialect, "nothing", time.monotonic())
        start = time.monotonic()
        for _attempt in range(2):
            self._send(self.dialect, "get_queue")
            answer = self._wait_for(self.dialect, "queue", start + self.timeout)
            if answer is None:
                raise self._no_answer("a queue request", self.timeout)
            if answer[_DIALECTS[self.dialect]["key"]] != _DIALECTS[self.dialect]["unknown"]:
                break
            self.hello()
        else:
            raise StatusError(f"the backend at {self.address} keeps answering 'unknown'")
        now = time.time()
        elapsed = time.monotonic() - start
        snapshot = _reduce(self.address, self.dialect, now, elapsed, self.environments, answer)
        self._age_waiting(snapshot, time.monotonic())
        if metrics_url:
            snapshot.metrics = fetch_metrics(metrics_url, min(self.timeout, 5.0))
        return snapshot

    def _age_waiting(self, snapshot: Snapshot, now: float) -> None:
        """Track when each waiting job was first seen; the oldest's age is "seen for at least"."""
        first_seen = {}
        previous = self._first_seen
        for job_id in snapshot.waiting_ids:
            first_seen[job_id] = previous.get(job_id, now)
        self._first_seen = first_seen
        if previous:
            for queue in snapshot.waiting_by_task:
                queue.oldest_seen_seconds = now - first_seen[queue.oldest_job_id]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _environments(dialect: str, message: dict[str, Any]) -> list[tuple[str | None, str]]:
    if dialect == "0.5":
        return [(None, _text(name)) for name in message.get("available_containers") or ()]
    return [(_text(env_type), _text(name))
            for env_type, names in (message.get("available_environments") or {}).items()
            for name in names]


def _reduce(address: str, dialect: str, now: float, elapsed: float,
            environments: list[tuple[str | None, str]], answer: dict[str, Any]) -> Snapshot:
    running = []
    for entry in answer.get("jobs_running") or ():
        job_id, _mine, agent, task, launcher, started, limit = entry
        running.append(RunningJob(_text(job_id), _text(agent), _text(task), _text(launcher),
                                  int(started), int(limit)))
    running.sort(key=lambda job: job.started_at)
    by_task: dict[str, TaskQueue] = {}
    ids = []
    for entry in answer.get("jobs_waiting") or ():
        job_id, task = _text(entry[0]), _text(entry[2])
        ids.append(job_id)
        queue = by_task.get(task)
        if queue is None:
            by_task[task] = TaskQueue(task, 1, job_id)
        else:
            queue.count += 1
    queues = sorted(by_task.values(), key=lambda queue: -queue.count)
    return Snapshot(address, dialect, now, elapsed, list(environments), running, len(ids), queues, ids)


# -- metrics --------------------------------------------------------------------------------

def metrics_url(text: str) -> str:
    """``HOST:PORT``, ``http://HOST:PORT`` or a full URL; the path defaults to ``/metrics``."""
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--metrics wants HOST:PORT or an http(s) URL, not {text!r}")
    return urllib.parse.urlunsplit(parts._replace(path=parts.path or "/metrics"))


def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a Prometheus text exposition: (name, labels, value)."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        labels: dict[str, str] = {}
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            position = brace + 1
            while True:
                while position < len(line) and line[position] in " ,":
                    position += 1
                if position >= len(line) or line[position] == "}":
                    position += 1
                    break
                equals = line.index("=", position)
                label = line[position:equals].strip()
                position = line.index('"', equals) + 1
                value_chars = []
                while line[position] != '"':
                    if line[position] == "\\":
                        position += 1
                        value_chars.append({"n": "\n"}.get(line[position], line[position]))
                    else:
                        value_chars.append(line[position])
                    position += 1
                labels[label] = "".join(value_chars)
                position += 1
            rest = line[position:].split()
        else:
            name, *rest = line.split()
        if not rest:
            continue
        try:
            value = float(rest[0])
        except ValueError:
            continue
        samples.append((name, labels, value))
    return samples


def summarise_metrics(samples: Iterable[tuple[str, dict[str, str], float]]) -> dict[str, Any]:
    """Agents, slots by state, and waiting/running jobs by environment (summed over dialects)."""
    agents = None
    slots: dict[str, float] = {}
    waiting: dict[str, float] = {}
    running: dict[str, float] = {}
    for name, labels, value in samples:
        if name == "fastbackend_agents":
            agents = (agents or 0) + value
        elif name == "fastbackend_slots":
            state = labels.get("state", "")
            slots[state] = slots.get(state, 0) + value
        elif name in ("fastbackend_jobs_waiting", "fastbackend_jobs_running"):
            target = waiting if name == "fastbackend_jobs_waiting" else running
            env = labels.get("environment", "")
            target[env] = target.get(env, 0) + value
    def ints(values: dict[str, float]) -> dict[str, int]:
        return {key: int(value) for key, value in values.items() if not math.isnan(value)}
    return {"agents": None if agents is None else int(agents), "slots": ints(slots),
            "jobs_waiting": ints(waiting) or None, "jobs_running": ints(running) or None}


def fetch_metrics(url: str, timeout: float) -> dict[str, Any]:
    """Scrape ``url`` (bounded) and summarise it; on failure ``{"error": reason}``."""
    try:
        with urllib.request.urlopen(metrics_url(url), timeout=timeout) as answer:
            text = answer.read(64 << 20).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return {"error": f"{url}: {exc}"}
    return summarise_metrics(parse_exposition(text))


# -- rendering --------------------------------------------------------------------------------

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _table(headers: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> list[str]:
    right = set(right)
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                                for i, (cell, w) in enumerate(zip(cells, widths, strict=True))).rstrip()
    return [line(headers)] + [line(row) for row in rows]


def render(snapshot: Snapshot, max_rows: int = MAX_ROWS) -> str:
    """The snapshot as a terminal report."""
    out = [f"backend {snapshot.address} (dialect {snapshot.dialect}) at "
           f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(snapshot.at))}, "
           f"answered in {snapshot.query_seconds * 1000:.0f} ms"]
    metrics = snapshot.metrics
    if metrics is not None:
        if "error" in metrics:
            out.append(f"metrics: unavailable ({metrics['error']})")
        else:
            slots = metrics["slots"]
            out.append(f"agents: {metrics['agents'] if metrics['agents'] is not None else '?'}; "
                       f"slots: {slots.get('busy', '?')} busy, {slots.get('free', '?')} free")
    envs = [name if env_type is None else f"{env_type}/{name}" for env_type, name in snapshot.environments]
    out.append(f"environments ({len(envs)}): {', '.join(envs) or 'none'}")

    out.append("")
    out.append(f"running: {len(snapshot.running)}")
    if snapshot.running:
        rows = [[job.agent, job.task, job.launcher, _duration(_age(snapshot.at, job.started_at)), job.job_id]
                for job in snapshot.running[:max_rows]]
        out += _table(["AGENT", "TASK", "LAUNCHER", "AGE", "JOB"], rows, right=[3])
        if len(snapshot.running) > max_rows:
            out.append(f"  ... {len(snapshot.running) - max_rows} more")

    out.append("")
    out.append(f"waiting: {snapshot.waiting_total}")
    by_env = (metrics or {}).get("jobs_waiting")
    if by_env:
        rows = [[env, str(count)] for env, count in sorted(by_env.items(), key=lambda item: -item[1])]
        out.append("  per environment (from the metrics):")
        out += _table(["ENVIRONMENT", "WAITING"], rows[:max_rows], right=[1])
    if snapshot.waiting_by_task:
        seen = snapshot.waiting_by_task[0].oldest_seen_seconds is not None
        out.append("  per course/task (the queue answer names no environment and no submission time;"
                   + (" age = how long this status has seen the oldest waiting)" if seen
                      else " --watch shows how long the oldest has been seen waiting)"))
        rows = [[queue.task, str(queue.count), _duration(queue.oldest_seen_seconds) if seen else "-",
                 queue.oldest_job_id] for queue in snapshot.waiting_by_task[:max_rows]]
        out += _table(["TASK", "WAITING", "OLDEST SEEN", "OLDEST JOB"], rows, right=[1, 2])
        if len(snapshot.waiting_by_task) > max_rows:
            rest = snapshot.waiting_by_task[max_rows:]
            out.append(f"  ... {len(rest)} more tasks, {sum(queue.count for queue in rest)} jobs")
    return "\n".join(out)


def run(address: str, dialect: str | None = None, watch: float | None = None, as_json: bool = False,
        metrics: str | None = None, timeout: float = 10.0, out: Any = None) -> int:
    """The ``status`` command: 0 when the backend answered, 1 when it did not.

    ``dialect`` is "0.5", "0.9", None (auto) or "both" (one connection per dialect).
    """
    out = out or sys.stdout
    if metrics:
        try:
            metrics_url(metrics)
        except ValueError as exc:
            print(f"fastbackend status: {exc}", file=sys.stderr)
            return 2
    clients: list[StatusClient] = []
    try:
        for one in (("0.9", "0.5") if dialect == "both" else (dialect,)):
            clients.append(StatusClient(address, one, timeout))
    except StatusError as exc:
        print(f"fastbackend status: {exc}", file=sys.stderr)
        for client in clients:
            client.close()
        return 1
    clear = watch is not None and not as_json and out.isatty() and os.environ.get("TERM") != "dumb"
    try:
        while True:
            try:
                # The metrics are the whole broker's: scraped once, shown with the first view.
                snapshots = [client.snapshot(metrics if position == 0 else None)
                             for position, client in enumerate(clients)]
            except StatusError as exc:
                print(f"fastbackend status: {exc}", file=sys.stderr)
                if watch is None:
                    return 1
            else:
                if as_json:
                    document = (snapshots[0].to_json() if len(snapshots) == 1 else
                                {"backend": address, "dialects": [snap.to_json() for snap in snapshots]})
                    out.write(json.dumps(document, separators=(",", ":") if watch else None,
                                         indent=None if watch else 2) + "\n")
                else:
                    text = "\n\n".join(render(snap) for snap in snapshots)
                    out.write(("\x1b[H\x1b[2J" if clear else "") + text + "\n")
                    if watch is not None and not clear:
                        out.write("\n")
                out.flush()
            if watch is None:
                return 0
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0
    finally:
        for client in clients:
            client.close()
