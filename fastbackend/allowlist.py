"""Who may connect: CIDR allowlists on the agent and client sockets, enforced by ZAP.

libzmq asks a ZAP handler (RFC 27: a REP socket bound to ``inproc://zeromq.zap.01`` in
the socket's own context) about every incoming connection of a socket that has a
``ZMQ_ZAP_DOMAIN``, including connections with the NULL mechanism, which is what the
INGInious peers use: they keep working unmodified, and a peer the handler refuses
never completes its handshake, so it can send and receive nothing.

The ZAP endpoint is one per libzmq context, while several ``Backend`` objects may share a
context (the webapp's local mode passes its own).  So there is one :class:`ZapHandler`
per context, shared and reference-counted; each allowlisted socket gets its own domain,
and the handler answers by domain.  If something else (``zmq.auth``, say) already
serves ZAP in that context, starting fails with :class:`ZapEndpointBusy` rather than
running unprotected.  The sockets also set ``ZMQ_ZAP_ENFORCE_DOMAIN``, so a missing
handler fails closed.

The handler runs in its own thread, so the broker's event loop is never blocked by it
and it never waits for the loop: a handshake is answered while the broker is busy.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable

import zmq

logger = logging.getLogger("fastbackend.allowlist")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: A refused address is logged at most once per this many seconds.
LOG_PERIOD = 60.0
#: Most addresses remembered for the once-a-minute log (a scan must not grow memory).
LOG_MEMORY = 10_000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ZapEndpointBusy(RuntimeError):
    """Another ZAP handler already serves this libzmq context."""


def parse_allowlist(text: str | Iterable[str], option: str = "allowlist") -> tuple[Network, ...]:
    """``"10.0.0.0/8,::1"`` (or a list of such strings) as networks; ValueError names the bad one.

    A bare address is a one-address network.  Host bits set (``10.0.0.1/8``) are refused:
    they usually mean a typo.
    """
    items = [text] if isinstance(text, str) else list(text)
    networks = []
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                networks.append(ipaddress.ip_network(part.strip("[]")))
            except ValueError as exc:
                raise ValueError(f"{option}: {part!r} is not an IPv4 or IPv6 network (expected e.g. "
                                 f"10.0.0.0/8, 192.0.2.7, ::1, 2001:db8::/32): {exc}") from None
    if not networks:
        raise ValueError(f"{option}: no network given")
    return tuple(networks)


def peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer address libzmq reports, as an IP (IPv4-mapped IPv6 as IPv4); None if not an IP."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def allowed(networks: tuple[Network, ...], address: str) -> bool:
    ip = peer_ip(address)
    return ip is not None and any(ip in network for network in networks)


class _Policy:
    __slots__ = ("networks", "side", "on_refused")

    def __init__(self, networks: tuple[Network, ...], side: str, on_refused: Callable[[str], None]) -> None:
        self.networks = networks
        self.side = side
        self.on_refused = on_refused


class ZapHandler:
    """The ZAP handler of one libzmq context; get it with :meth:`acquire`, give it back with
    :meth:`release`."""

    _by_context: dict[int, ZapHandler] = {}
    _lock = threading.Lock()
    _domains = itertools.count(1)

    def __init__(self, context: zmq.Context) -> None:
        self._key = context.underlying
        self._users = 0
        self._policies: dict[bytes, _Policy] = {}
        self._last_logged: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()
        socket = context.socket(zmq.REP)
        socket.linger = 0
        try:
            socket.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            socket.close(0)
            if exc.errno == zmq.EADDRINUSE:
                raise ZapEndpointBusy(
                    f"{ZAP_ENDPOINT} is already bound in this ZeroMQ context (another ZAP handler, "
                    "such as zmq.auth, serves it): fastbackend's allowlists need to serve it; use a "
                    "context of its own for the backend, or no --allow-agents/--allow-clients") from None
            raise
        self._socket = socket
        self._thread = threading.Thread(target=self._serve, name="fastbackend-zap", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, context: zmq.Context) -> ZapHandler:
        """The handler serving ``context``, started on first use."""
        with cls._lock:
            handler = cls._by_context.get(context.underlying)
            if handler is None:
                handler = cls(context)
                cls._by_context[context.underlying] = handler
            handler._users += 1
            return handler

    def release(self) -> None:
        """Give the handler back; the last user stops it and unbinds the endpoint."""
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            del self._by_context[self._key]
        self._stop.set()
        self._thread.join(5)

    def add_domain(self, networks: tuple[Network, ...], side: str,
                   on_refused: Callable[[str], None]) -> bytes:
        """A new ZAP domain whose connections are allowed from ``networks`` only."""
        domain = f"fastbackend-{next(self._domains)}-{side}".encode()
        # Replaced, not mutated: the handler thread reads the dict without a lock.
        self._policies = {**self._policies, domain: _Policy(networks, side, on_refused)}
        return domain

    def remove_domain(self, domain: bytes) -> None:
        self._policies = {key: value for key, value in self._policies.items() if key != domain}

    # -- the handler thread ---------------------------------------------------------------------
    def _serve(self) -> None:
        socket = self._socket
        try:
            while not self._stop.is_set():
                if not socket.poll(100):
                    continue
                request = socket.recv_multipart()
                try:
                    reply = self._answer(request)
                except Exception:  # never leave libzmq waiting, never kill the thread
                    logger.exception("ZAP request could not be handled; refused")
                    reply = [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"internal error",
                             b"", b""]
                socket.send_multipart(reply)
        finally:
            socket.close(0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6 or request[0] != b"1.0":
            return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"bad ZAP request", b"", b""]
        request_id, domain, address, mechanism = request[1], request[2], request[3], request[5]
        policy = self._policies.get(domain)
        text = address.decode("ascii", "replace")
        ip = peer_ip(text)
        text = str(ip) if ip is not None else text or "(no IP address)"
        if policy is None:
            logger.warning("refused a connection from %s: unknown ZAP domain %r", text, domain)
            return [b"1.0", request_id, b"400", b"unknown domain", b"", b""]
        if mechanism == b"NULL" and allowed(policy.networks, text):
            return [b"1.0", request_id, b"200", b"OK", b"", b""]
        policy.on_refused(text)
        self._log_refusal(policy.side, text, mechanism)
        return [b"1.0", request_id, b"400", b"address not allowed", b"", b""]

    def _log_refusal(self, side: str, address: str, mechanism: bytes) -> None:
        now = time.monotonic()
        key = (side, address)
        if now - self._last_logged.get(key, -LOG_PERIOD) < LOG_PERIOD:
            return
        if len(self._last_logged) >= LOG_MEMORY:
            self._last_logged = {k: t for k, t in self._last_logged.items() if now - t < LOG_PERIOD}
        self._last_logged[key] = now
        why = f"not in --allow-{side}s" if mechanism == b"NULL" else f"mechanism {mechanism.decode()!r}"
        logger.warning("refused %s connection from %s (%s); further refusals of this address are "
                       "not logged for %.0f s", side, address, why, LOG_PERIOD)
