"""The I/O shell: the only module that owns the ZeroMQ context, sockets, the event loop's
readers and timers.

When either socket becomes readable, ``Broker.drain`` handles a bounded batch of
messages from each socket (in C for the compiled build: no Python-level pyzmq call
per message).  If a batch was cut short, the rest is drained from ``call_soon`` so
that timers and the other socket get their turn: the agents' heartbeat keeps its one
second rhythm whatever the load.

ZeroMQ's file descriptor is edge-triggered: it signals that the socket's state *may*
have changed, and any operation on the socket (a send included) can consume that
edge while messages still wait.  Every drain therefore ends by reading
``ZMQ_EVENTS`` of both sockets, and every send made outside a drain (the heartbeat)
is followed by a drain.

An agent whose connection closes (its process killed, its host rebooted) is removed at
once, its running jobs ended with a crash result, instead of after six missed pings as
in stock: a libzmq monitor on the agent socket reports each closed connection, and the
broker then pings every agent (``Broker.drop_disconnected_agents``).  The socket is
ROUTER_MANDATORY, so a send fails with EHOSTUNREACH exactly when the peer's pipe is
gone; a live agent's pipe exists whatever its load, so it is never removed this way.
The event can come a little before libzmq ends the pipe, hence a few probe rounds
(:data:`PROBE_DELAYS`); the heartbeat's own pings catch any agent they miss within a
second.  A peer that vanishes without closing (a network partition, a frozen process)
is still removed by the missed pings, as in stock.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Callable, Iterable

import zmq

from ._version import __version__
from .allowlist import Network, ZapHandler, parse_allowlist
from .broker import IMPL, Broker
from .metrics import MetricsServer
from .metrics import parse_address as parse_metrics_address
from .protocol import BY_NAME, MAX_FRAME_SIZE

logger = logging.getLogger("fastbackend.server")

#: What a bind error message says the address should look like.
ADDRESS_FORMS = ("tcp://HOST:PORT (HOST an IPv4 address, [IPv6] address, interface name or *; "
                 "PORT a number, or * for any free port), ipc:///PATH or inproc://NAME")
#: Where the stock backend logs; in embedded mode fastbackend's lines go there too.
INGINIOUS_LOGGER = "inginious.backend"

#: Messages handled per socket before the loop gets control back.
BATCH = 256
#: Jobs of a queue snapshot listed per loop turn.
SNAPSHOT_SLICE = 5000
HEARTBEAT_PERIOD = 1.0
#: After the monitor reports a closed agent connection, probe rounds this long after it (s).
PROBE_DELAYS = (0.0, 0.01, 0.05, 0.2)
#: After a probe sequence that did not account for every closed connection (peers that were
#: no agent: never said hello, or already removed), the next one waits this long (s): a
#: flood of connections opened and closed on the agent port costs at most a few pings per
#: agent per second.  The heartbeat's pings still find a closed agent within a second.
PROBE_SPACING = 0.5
#: Listen backlog of both sockets (``ZMQ_BACKLOG``; the kernel caps it at ``net.core.somaxconn``,
#: 4096 by default since Linux 5.4).  libzmq's default, 100, overflows when every agent
#: reconnects at once (a backend restart): the kernel then drops their SYNs and each retries
#: after 1, 3, 7, 15 s..., which spread the registration of 10,000 agents over 36 s.
LISTEN_BACKLOG = 4096
#: How agent connections that went silent at the TCP level are reclaimed, by the kernel: one
#: whose sent data stays unacknowledged this long (ms) is closed (``ZMQ_TCP_MAXRT``, Linux's
#: ``TCP_USER_TIMEOUT``), and an idle one is probed by TCP keepalives (after
#: :data:`AGENT_KEEPALIVE` ``[0]`` s idle, then every ``[1]`` s) under the same timeout.  The
#: broker pings each agent every second, so a cut or vanished host closes ~10 s after its
#: first unanswered ping rather than after TCP's own ~15 minutes; the broker's own pings still
#: decide removals (six missed, 6-7 s, as stock), and a cut shorter than the timeout closes
#: nothing.  A frozen agent process (SIGSTOP) keeps its connection, its kernel still
#: acknowledging: it is removed by the missed pings, and the connection ends when the agent,
#: thawed, restarts on a new one (after 10 s without a ping), or is killed.
#:
#: Not ZMTP heartbeats (``ZMQ_HEARTBEAT_IVL``/``_TIMEOUT``), which the agent socket had: after
#: each heartbeat PING, libzmq cancels that connection's timeout timer on the next frame it
#: receives, by a linear scan of its I/O thread's list of every connection's timers
#: (``poller_base_t::cancel_timer``).  With N agents pinged every second that is O(N²) work
#: per second in the one I/O thread: at about 8,000 agents it took the whole thread, which
#: then accepted almost no new connection, and registration stalled (benchmarks/README.md,
#: "Scale and soak").  The kernel's timers cost nothing per frame.
AGENT_TCP_TIMEOUT_MS = 10_000
AGENT_KEEPALIVE = (10, 1)
SUMMARY_PERIOD = 30.0


def build_kind() -> str:
    """``"release"`` or ``"debug"`` for the compiled core (``FB_DEBUG`` at build time), ``""`` for py."""
    if IMPL != "c":
        return ""
    for module in ("fastbackend._broker_c", "fastbackend._sched_c"):
        debug = getattr(importlib.import_module(module), "DEBUG", None)
        if debug is not None:
            return "debug" if debug else "release"
    return "unknown"


def endpoint_text(endpoint: str) -> str:
    """A bound endpoint as an operator reads it: an IPv4-mapped IPv6 host as plain IPv4."""
    prefix = "tcp://[::ffff:"
    if endpoint.startswith(prefix) and "]:" in endpoint:
        host, _, port = endpoint[len(prefix):].partition("]:")
        if host.count(".") == 3:
            return f"tcp://{host}:{port}"
    return endpoint


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    module = type(loop).__module__.split(".", 1)[0]
    return "uvloop" if module == "uvloop" else "asyncio"


class _ToInginious(logging.Handler):
    """Hands fastbackend's records to ``inginious.backend``, renamed so, as the stock backend's are:
    in the webapp's local mode they reach the handlers INGInious configured, in its format."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger(INGINIOUS_LOGGER)
        if target.isEnabledFor(record.levelno):
            copy = logging.makeLogRecord(record.__dict__)
            copy.name = INGINIOUS_LOGGER
            target.handle(copy)


def log_like_inginious() -> bool:
    """In embedded mode, log where INGInious operators look; True if it was set up here.

    Done when the application configured the ``inginious`` logger (the webapp's
    ``init_logging`` does) and nobody configured ``fastbackend``'s: its records then go to
    ``inginious.backend`` (and not also to the root logger), at that logger's level.
    """
    ours = logging.getLogger("fastbackend")
    theirs = logging.getLogger("inginious")
    if ours.handlers or not theirs.handlers:
        return False
    ours.addHandler(_ToInginious())
    ours.setLevel(logging.getLogger(INGINIOUS_LOGGER).getEffectiveLevel())
    ours.propagate = False
    return True


def make_router(context: zmq.Context, address: str, role: str = "",
                zap_domain: bytes | None = None, tcp_timeout_ms: int | None = None) -> zmq.Socket:
    """A ROUTER socket set up so that it never drops a frame silently.

    ROUTER drops frames for a peer whose pipe is full (send high-water mark, 1000 by
    default) or unknown.  With no high-water mark, frames for a slow client queue in
    libzmq until it reads them; with ROUTER_MANDATORY, a frame for a peer that is gone
    fails with EHOSTUNREACH, which the broker logs.  A frame over ``MAX_FRAME_SIZE``
    is refused by libzmq itself, before it is buffered.

    ``zap_domain`` makes every connection ask the ZAP handler (the allowlist) first;
    ``role`` ("agent", "client") names the address in a bind error.  ``tcp_timeout_ms``: the
    kernel closes a TCP connection whose data (or keepalive probe) stays unacknowledged that
    long (see :data:`AGENT_TCP_TIMEOUT_MS`).  All are set before the bind: libzmq's listener
    copies the options then, for every connection it accepts (the backlog, for its listen()).
    """
    socket = context.socket(zmq.ROUTER)
    socket.ipv6 = True
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.LINGER, 1000)
    # libzmq disconnects a peer that announces a larger frame before buffering it.
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_SIZE)
    socket.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
    if tcp_timeout_ms is not None:
        socket.setsockopt(zmq.TCP_MAXRT, tcp_timeout_ms)
        socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
        socket.setsockopt(zmq.TCP_KEEPALIVE_IDLE, AGENT_KEEPALIVE[0])
        socket.setsockopt(zmq.TCP_KEEPALIVE_INTVL, AGENT_KEEPALIVE[1])
        # Where TCP_MAXRT is not supported, the probes' count bounds an idle connection alike.
        socket.setsockopt(zmq.TCP_KEEPALIVE_CNT, max(1, tcp_timeout_ms // 1000 // AGENT_KEEPALIVE[1]))
    if zap_domain is not None:
        socket.setsockopt(zmq.ZAP_DOMAIN, zap_domain)
        # Without a handler, refuse (libzmq would otherwise let NULL connections in).
        socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    try:
        socket.bind(address)
    except zmq.ZMQError as exc:
        socket.close(0)
        what = f"the {role} address" if role else "address"
        raise zmq.ZMQError(exc.errno, f"cannot bind {what} {address!r}: {exc.strerror}; "
                                      f"expected {ADDRESS_FORMS}") from None
    except BaseException:
        # An unclosed socket would block the context's termination forever.
        socket.close(0)
        raise
    return socket


class Backend:
    """Drop-in for ``inginious.backend.backend.Backend``.

    ``Backend(context, agent_addr, client_addr)`` then ``await backend.run()``, on the
    running loop.  ``context`` may be a ``zmq.Context`` or a ``zmq.asyncio.Context``
    (the INGInious webapp's local mode passes the latter, with ``inproc://``
    addresses): sockets are made from a plain shadow of the same libzmq context, so
    ``inproc://`` peers of the caller's context reach them.

    ``dialect`` is None to serve each peer in the dialect of its frames (INGInious 0.5
    and 0.7-0.9.2 side by side), or ``"0.5"`` / ``"0.9"`` to serve that one only.

    ``allow_agents`` / ``allow_clients``: CIDR networks (``"10.0.0.0/8,::1"`` or a list)
    allowed to connect to that socket (tcp addresses only); None allows everyone, as stock.
    Refused connections are counted in ``refused``.

    ``metrics``: ``"HOST:PORT"`` to serve Prometheus metrics at ``http://HOST:PORT/metrics``
    (needs ``fastbackend[metrics]``); None serves none.

    In embedded mode, if the application configured the ``inginious`` logger and not
    ``fastbackend``'s, fastbackend logs under ``inginious.backend`` as the stock backend
    does (``log_like_inginious``).
    """

    def __init__(self, context: zmq.Context, agent_addr: str, client_addr: str,
                 dialect: str | None = None, *, allow_agents: str | Iterable[str] | None = None,
                 allow_clients: str | Iterable[str] | None = None,
                 summary_period: float = SUMMARY_PERIOD, metrics: str | None = None) -> None:
        if dialect is not None and dialect not in BY_NAME:
            raise ValueError(f"dialect must be one of {', '.join(BY_NAME)} or None, not {dialect!r}")
        self._allow: dict[str, tuple[Network, ...]] = {}
        for side, address, allow in (("agent", agent_addr, allow_agents),
                                     ("client", client_addr, allow_clients)):
            if allow is None:
                continue
            self._allow[side] = parse_allowlist(allow, f"--allow-{side}s")
            if not address.startswith("tcp://"):
                raise ValueError(f"--allow-{side}s filters IP addresses: the {side} address must be "
                                 f"tcp://HOST:PORT, not {address!r}")
        #: Connections refused by the allowlists so far, per socket.
        self.refused: dict[str, int] = {"agent": 0, "client": 0}
        self._summary_period = summary_period
        self._metrics_address = None if metrics is None else parse_metrics_address(metrics)
        #: How late (seconds) the last heartbeat tick ran after its due time.
        self.heartbeat_lag = 0.0
        #: ``HOST:PORT`` of the metrics endpoint, once serving.
        self.metrics_endpoint: str | None = None
        self._dialect = dialect
        self._context = zmq.Context.shadow(context.underlying)
        self._agent_addr = agent_addr
        self._client_addr = client_addr
        self.broker: Broker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_handle: asyncio.Handle | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._next_beat = 0.0
        self._idle_done = 0
        self._monitor: zmq.Socket | None = None
        self._probe_handle: asyncio.TimerHandle | None = None
        self._probe_round = 0
        self._probe_quiet_until = float("-inf")
        self._probe_again = False
        self._probe_unmatched = 0
        #: The addresses really bound (``tcp://…:*`` resolved to its port), once running.
        self.agent_endpoint: str | None = None
        self.client_endpoint: str | None = None
        log_like_inginious()

    def _count_refused(self, side: str) -> Callable[[str], None]:
        def count(_address: str) -> None:
            self.refused[side] += 1
        return count

    async def run(self) -> None:
        """Serve until cancelled; sockets are closed on the way out."""
        self._loop = asyncio.get_running_loop()
        zap = ZapHandler.acquire(self._context) if self._allow else None
        domains = {side: zap.add_domain(networks, side, self._count_refused(side))
                   for side, networks in self._allow.items()} if zap else {}
        try:
            await self._serve(domains)
        finally:
            if zap is not None:
                for domain in domains.values():
                    zap.remove_domain(domain)
                zap.release()

    async def _serve(self, domains: dict[str, bytes]) -> None:
        agent_socket = make_router(self._context, self._agent_addr, "agent", domains.get("agent"),
                                   AGENT_TCP_TIMEOUT_MS)
        try:
            client_socket = make_router(self._context, self._client_addr, "client", domains.get("client"))
        except BaseException:
            agent_socket.close(0)
            raise
        self.broker = Broker(agent_socket, client_socket,
                             None if self._dialect is None else BY_NAME[self._dialect].tag)
        self.agent_endpoint = endpoint_text(agent_socket.getsockopt_string(zmq.LAST_ENDPOINT))
        self.client_endpoint = endpoint_text(client_socket.getsockopt_string(zmq.LAST_ENDPOINT))
        allow = "; ".join(f"{side}s allowed from {', '.join(map(str, networks))}"
                          for side, networks in self._allow.items())
        # "fastbackend started (c core)" is what the test fixtures look for: keep it first.
        logger.info("fastbackend started (%s core): version %s%s, loop %s, dialect %s, "
                    "Python %d.%d, pyzmq %s, libzmq %s; agents on %s, clients on %s%s",
                    self.broker.IMPL, __version__,
                    f", {build_kind()} build" if self.broker.IMPL == "c" else "", loop_name(self._loop),
                    self._dialect or " and ".join(BY_NAME), *sys.version_info[:2], zmq.pyzmq_version(),
                    zmq.zmq_version(), self.agent_endpoint, self.client_endpoint,
                    f"; {allow}" if allow else "")
        metrics = None
        if self._metrics_address is not None:
            metrics = MetricsServer(self, *self._metrics_address)
            try:
                self.metrics_endpoint = await metrics.start()
            except BaseException:
                agent_socket.close(0)
                client_socket.close(0)
                raise
            logger.info("metrics on http://%s/metrics", self.metrics_endpoint)
        self._monitor = agent_socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        monitor_fd = self._monitor.getsockopt(zmq.FD)
        self._loop.add_reader(monitor_fd, self._on_monitor)
        fds = [agent_socket.getsockopt(zmq.FD), client_socket.getsockopt(zmq.FD)]
        # A wake-up of either socket is one call of the core's pump (compiled: no Python
        # frame), which calls _after_pump only when work is left.
        self.broker.batch = BATCH
        self.broker.after_pump = self._after_pump
        for fd in fds:
            self._loop.add_reader(fd, self.broker.pump)
        self._next_beat = self._loop.time() + HEARTBEAT_PERIOD
        self._timers = [self._loop.call_at(self._next_beat, self._heartbeat),
                        self._loop.call_later(self._summary_period, self._summary)]
        self.broker.pump()  # messages may have arrived before the readers were added
        self._on_monitor()
        try:
            await self._loop.create_future()
        except asyncio.CancelledError:
            pass
        finally:
            for fd in fds:
                self._loop.remove_reader(fd)
            self._loop.remove_reader(monitor_fd)
            if self._probe_handle is not None:
                self._probe_handle.cancel()
            agent_socket.disable_monitor()
            self._monitor.close(0)
            self._monitor = None
            for timer in self._timers:
                timer.cancel()
            if self._pump_handle is not None:
                self._pump_handle.cancel()
            self.broker.after_pump = None  # the broker may outlive this Backend: no cycle
            if metrics is not None:
                await metrics.stop()
            agent_socket.close()
            client_socket.close()
            logger.info("fastbackend stopped")

    def _pump(self) -> None:
        """The pump scheduled when the last one left work."""
        self._pump_handle = None
        self.broker.pump()

    def _after_pump(self, more: bool) -> None:
        """What a pump left: agents gone, a snapshot slice, and another pump if needed."""
        if self.broker.agents_gone:
            # A send of this batch (a dispatch) found an agent gone.
            self.broker.drop_disconnected_agents()
        # Slow work advances a slice per turn, between batches of messages.
        more = self.broker.background(SNAPSHOT_SLICE) or more
        if more and self._pump_handle is None:
            self._pump_handle = self._loop.call_soon(self._pump)

    def _heartbeat(self) -> None:
        # Scheduled on a fixed grid so that a slow tick does not push the next ones back.
        now = self._loop.time()
        self.heartbeat_lag = max(0.0, now - self._next_beat)
        self._next_beat += HEARTBEAT_PERIOD
        if self._next_beat < now:
            self._next_beat = now + HEARTBEAT_PERIOD
        self._timers[0] = self._loop.call_at(self._next_beat, self._heartbeat)
        try:
            self.broker.heartbeat()
        except Exception:
            logger.exception("heartbeat failed")
        self.broker.pump()  # drops the agents whose ping found them gone

    def _on_monitor(self) -> None:
        # The monitor's descriptor is edge-triggered like the others: read until EVENTS says empty.
        closed = 0
        monitor = self._monitor
        while monitor is not None and monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = monitor.recv_multipart(zmq.NOBLOCK)
            # [event (uint16) + value (uint32, here the fd), endpoint], in native byte order.
            event = frames[0] if len(frames) == 2 and len(frames[0]) == 6 else b"\0\0"
            if int.from_bytes(event[:2], sys.byteorder) == zmq.EVENT_DISCONNECTED:
                closed += 1
                logger.debug("an agent connection closed (fd %d)", int.from_bytes(event[2:], sys.byteorder))
        if not closed or not self.broker.agents:
            return
        self._probe_unmatched += closed
        if self._probe_handle is not None:
            self._probe_again = True
        else:
            self._start_probe()

    def _start_probe(self) -> None:
        self._probe_again = False
        self._probe_round = 0
        start = max(self._loop.time(), self._probe_quiet_until)
        self._probe_handle = self._loop.call_at(start + PROBE_DELAYS[0], self._probe)

    def _probe(self) -> None:
        """One probe round after a closed agent connection (see the module docstring)."""
        self._probe_handle = None
        # Reading EVENTS makes libzmq process its pending commands (an ended pipe among
        # them) now, not at its next throttled chance.
        self.broker.agent_socket.getsockopt(zmq.EVENTS)
        try:
            self._probe_unmatched -= self.broker.drop_disconnected_agents(probe=True)
        except Exception:
            logger.exception("probing the agents failed")
        self.broker.pump()
        self._probe_round += 1
        if self._probe_unmatched > 0 and self._probe_round < len(PROBE_DELAYS) and self.broker.agents:
            # Connections closed that no removal accounts for yet: probe again, a bit later.
            delay = PROBE_DELAYS[self._probe_round] - PROBE_DELAYS[self._probe_round - 1]
            self._probe_handle = self._loop.call_later(delay, self._probe)
        else:
            if self._probe_unmatched > 0:
                # Closed connections of peers that were no agent (never said hello, or already
                # removed) match no removal: forget them, and hold the next sequence back.
                self._probe_quiet_until = self._loop.time() + PROBE_SPACING
            if self._probe_again and self._probe_unmatched > 0 and self.broker.agents:
                self._start_probe()
            else:
                self._probe_unmatched = 0

    def _summary(self) -> None:
        self._timers[1] = self._loop.call_later(self._summary_period, self._summary)
        broker = self.broker
        # Broker.summary() logs only a period in which something happened; an idle
        # broker still says it is alive, so that an operator can tell idle from hung.
        idle = (broker.jobs_done == self._idle_done and not broker.sched.waiting_count()
                and not broker.sched.running_count())
        self._idle_done = broker.jobs_done
        broker.summary()
        if idle:
            refused = (f"; refused {self.refused['agent']} agent and {self.refused['client']} client "
                       "connections so far" if self._allow else "")
            logger.info("alive, idle: %d agents, %d clients; %d frames dropped so far%s",
                        len(broker.agents), len(broker.clients), broker.frames_dropped, refused)
