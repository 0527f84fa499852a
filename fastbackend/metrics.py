"""Prometheus metrics: ``fastbackend serve … --metrics HOST:PORT`` serves ``/metrics``.

Nothing is added to the per-job path beyond the counter increments the cores already
make (C ints in the compiled core).  At scrape time, :class:`BrokerCollector` reads those
counters, walks the agents (bounded by the deployment) and the running jobs (bounded by
the slots), and asks the scheduler how many jobs wait per environment: nothing that
grows with the queue.  The HTTP endpoint runs on the broker's own event loop, so a
scrape sees a consistent state and never races the broker; one scrape is one short
callback, like any other event.

``prometheus_client`` is an optional dependency (``pip install fastbackend[metrics]``);
this module imports it on first use and says so clearly if it is missing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from .protocol import DIALECTS

if TYPE_CHECKING:  # pragma: no cover
    from .server import Backend

logger = logging.getLogger("fastbackend.metrics")

#: Longest request head a scraper may send (Prometheus sends a few hundred bytes).
MAX_REQUEST = 8192
#: Seconds a scraper has to send its request.
REQUEST_TIMEOUT = 5.0


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError:
        raise SystemExit("--metrics needs prometheus_client: pip install 'fastbackend[metrics]'") from None
    return prometheus_client


def environment_label(key: object) -> str:
    """An environment key as a label: ``name`` (0.5) or ``type/name`` (0.9), as ``status`` shows it."""
    return key if isinstance(key, str) else "/".join(key)


def dialect_of(key: object) -> str:
    """The dialect name of a scheduler environment key (names in 0.5, pairs in 0.9)."""
    return DIALECTS[0 if isinstance(key, str) else 1].name


class BrokerCollector:
    """A prometheus_client collector over one running ``Backend``."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def served(self) -> list[int]:
        broker = self.backend.broker
        return [d.tag for d in DIALECTS] if broker.pinned is None else [broker.pinned]

    def collect(self):  # noqa: C901  (one block per metric reads best)
        core = _prometheus().core
        broker = self.backend.broker
        if broker is None:  # not serving yet
            return
        served = self.served()
        names = {tag: DIALECTS[tag].name for tag in served}
        counters = broker.counters()

        submitted = core.CounterMetricFamily(
            "fastbackend_jobs_submitted", "Jobs submitted by clients (duplicates included).",
            labels=["dialect"])
        finished = core.CounterMetricFamily(
            "fastbackend_jobs_finished", "Jobs ended: by their agent's result (done), killed while waiting, "
            "crashed with their agent, or refused as a duplicate id.", labels=["dialect", "outcome"])
        for tag in served:
            submitted.add_metric([names[tag]], counters["submitted"][tag])
            finished.add_metric([names[tag], "done"], counters["done"][tag])
            for outcome in ("killed", "crashed", "duplicate"):
                finished.add_metric([names[tag], outcome], broker.finished_by[tag, outcome])
        yield submitted
        yield finished

        sched = broker.sched
        waiting = core.GaugeMetricFamily("fastbackend_jobs_waiting", "Jobs waiting, per environment.",
                                         labels=["dialect", "environment"])
        running = core.GaugeMetricFamily("fastbackend_jobs_running", "Jobs running, per environment.",
                                         labels=["dialect", "environment"])
        running_by: Counter[int] = Counter(sched.job_env(job) for job in sched.running_jobs())
        advertised = {key for environments in broker.environments for key in environments}
        for env in range(sched.env_count()):
            key = sched.env_name(env)
            count = sched.waiting_in_env(env)
            # Environments clients invented and no agent offers are shown while jobs wait for them.
            if count or key in advertised or running_by[env]:
                labels = [dialect_of(key), environment_label(key)]
                waiting.add_metric(labels, count)
                running.add_metric(labels, running_by[env])
        yield waiting
        yield running

        agents = core.GaugeMetricFamily("fastbackend_agents", "Registered agents.", labels=["dialect"])
        slots = core.GaugeMetricFamily("fastbackend_slots", "Job slots of the registered agents.",
                                       labels=["dialect", "state"])
        clients = core.GaugeMetricFamily("fastbackend_clients", "Registered clients.", labels=["dialect"])
        n_agents: Counter[int] = Counter()
        free: Counter[int] = Counter()
        busy: Counter[int] = Counter()
        for agent in broker.agents.values():
            tag = broker.agent_dialect[agent]
            n_agents[tag] += 1
            free[tag] += sched.agent_free_slots(agent)
            busy[tag] += sched.agent_slots(agent) - sched.agent_free_slots(agent)
        n_clients = Counter(broker.clients.values())
        for tag in served:
            agents.add_metric([names[tag]], n_agents[tag])
            slots.add_metric([names[tag], "free"], free[tag])
            slots.add_metric([names[tag], "busy"], busy[tag])
            clients.add_metric([names[tag]], n_clients[tag])
        yield agents
        yield slots
        yield clients

        dropped = core.CounterMetricFamily("fastbackend_frames_dropped", "Frames dropped, by reason.",
                                           labels=["reason"])
        for reason in ("malformed", "multipart", "unregistered", "not_running", "duplicate", "unknown_job",
                       "bad_hello", "dialect", "internal"):
            dropped.add_metric([reason], broker.dropped_by[reason])
        yield dropped
        removed = core.CounterMetricFamily("fastbackend_agents_removed", "Agents removed, by reason.",
                                           labels=["reason"])
        for reason in ("missed_pings", "hello_again", "disconnected"):
            removed.add_metric([reason], broker.removed_by[reason])
        yield removed
        refused = core.CounterMetricFamily("fastbackend_connections_refused",
                                           "Connections refused by the allowlists, per socket.",
                                           labels=["socket"])
        for side, count in sorted(self.backend.refused.items()):
            refused.add_metric([side], count)
        yield refused

        from ._broker_py import TIME_BUCKETS

        bounds = [*(repr(bound) for bound in TIME_BUCKETS), "+Inf"]
        for name, key, doc in (
            ("fastbackend_job_wait_seconds", "wait",
             "Time from a job's submission to its dispatch to an agent."),
            ("fastbackend_job_run_seconds", "run", "Time from a job's dispatch to its agent's result."),
        ):
            histogram = core.HistogramMetricFamily(name, doc, labels=["dialect"])
            for tag in served:
                counts, total = counters[key][tag]
                cumulative, buckets = 0, []
                for bound, count in zip(bounds, counts, strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                histogram.add_metric([names[tag]], buckets, total)
            yield histogram

        lag = core.GaugeMetricFamily("fastbackend_heartbeat_lag_seconds",
                                     "How late the last heartbeat tick ran after its due time.")
        lag.add_metric([], self.backend.heartbeat_lag)
        yield lag


class MetricsServer:
    """``GET /metrics`` over HTTP/1.0 on the broker's loop (one short callback per scrape)."""

    def __init__(self, backend: Backend, host: str, port: int) -> None:
        prometheus = _prometheus()
        self.registry = prometheus.CollectorRegistry(auto_describe=False)
        self.registry.register(BrokerCollector(backend))
        self.host, self.port = host, port
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        """Listen; returns the address actually bound (``HOST:PORT``, the port resolved)."""
        self.server = await asyncio.start_server(self._serve, self.host, self.port)
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def render(self) -> bytes:
        return _prometheus().generate_latest(self.registry)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method != b"GET":
                status, body, kind = b"405 Method Not Allowed", b"GET only\n", b"text/plain"
            elif path != b"/metrics":
                status, body, kind = b"404 Not Found", b"see /metrics\n", b"text/plain"
            else:
                status, body = b"200 OK", self.render()
                kind = _prometheus().CONTENT_TYPE_LATEST.encode()
            writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: " + kind + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # a scraper that went away or sent nonsense: nothing to answer
        finally:
            writer.close()


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) into (host, port); ValueError with the expected form."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--metrics takes HOST:PORT (e.g. 127.0.0.1:9100), not {text!r}")
    return host.strip("[]"), int(port)
