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
"""

from __future__ import annotations

import asyncio
import logging

import zmq

from .broker import Broker
from .protocol import BY_NAME, MAX_FRAME_SIZE

logger = logging.getLogger("fastbackend.server")

#: Messages handled per socket before the loop gets control back.
BATCH = 256
#: Jobs of a queue snapshot listed per loop turn.
SNAPSHOT_SLICE = 5000
HEARTBEAT_PERIOD = 1.0
SUMMARY_PERIOD = 30.0


def make_router(context: zmq.Context, address: str) -> zmq.Socket:
    """A ROUTER socket set up so that it never drops a frame silently.

    ROUTER drops frames for a peer whose pipe is full (send high-water mark, 1000 by
    default) or unknown.  With no high-water mark, frames for a slow client queue in
    libzmq until it reads them; with ROUTER_MANDATORY, a frame for a peer that is gone
    fails with EHOSTUNREACH, which the broker logs.  A frame over ``MAX_FRAME_SIZE``
    is refused by libzmq itself, before it is buffered.
    """
    socket = context.socket(zmq.ROUTER)
    socket.ipv6 = True
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.LINGER, 1000)
    # libzmq disconnects a peer that announces a larger frame before buffering it.
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_SIZE)
    try:
        socket.bind(address)
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
    """

    def __init__(self, context: zmq.Context, agent_addr: str, client_addr: str,
                 dialect: str | None = None) -> None:
        if dialect is not None and dialect not in BY_NAME:
            raise ValueError(f"dialect must be one of {', '.join(BY_NAME)} or None, not {dialect!r}")
        self._dialect = dialect
        self._context = zmq.Context.shadow(context.underlying)
        self._agent_addr = agent_addr
        self._client_addr = client_addr
        self.broker: Broker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_handle: asyncio.Handle | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._next_beat = 0.0

    async def run(self) -> None:
        """Serve until cancelled; sockets are closed on the way out."""
        self._loop = asyncio.get_running_loop()
        agent_socket = make_router(self._context, self._agent_addr)
        try:
            client_socket = make_router(self._context, self._client_addr)
        except BaseException:
            agent_socket.close(0)
            raise
        self.broker = Broker(agent_socket, client_socket,
                             None if self._dialect is None else BY_NAME[self._dialect].tag)
        logger.info("fastbackend started (%s core, dialect %s): agents on %s, clients on %s",
                    self.broker.IMPL, self._dialect or " and ".join(BY_NAME), self._agent_addr,
                    self._client_addr)
        fds = [agent_socket.getsockopt(zmq.FD), client_socket.getsockopt(zmq.FD)]
        for fd in fds:
            self._loop.add_reader(fd, self._pump)
        self._next_beat = self._loop.time() + HEARTBEAT_PERIOD
        self._timers = [self._loop.call_at(self._next_beat, self._heartbeat),
                        self._loop.call_later(SUMMARY_PERIOD, self._summary)]
        self._pump()  # messages may have arrived before the readers were added
        try:
            await self._loop.create_future()
        except asyncio.CancelledError:
            pass
        finally:
            for fd in fds:
                self._loop.remove_reader(fd)
            for timer in self._timers:
                timer.cancel()
            if self._pump_handle is not None:
                self._pump_handle.cancel()
            agent_socket.close()
            client_socket.close()
            logger.info("fastbackend stopped")

    def _pump(self) -> None:
        self._pump_handle = None
        more = self.broker.drain(BATCH)
        # Slow work advances a slice per turn, between batches of messages.
        more = self.broker.background(SNAPSHOT_SLICE) or more
        if more and self._pump_handle is None:
            self._pump_handle = self._loop.call_soon(self._pump)

    def _heartbeat(self) -> None:
        # Scheduled on a fixed grid so that a slow tick does not push the next ones back.
        self._next_beat += HEARTBEAT_PERIOD
        now = self._loop.time()
        if self._next_beat < now:
            self._next_beat = now + HEARTBEAT_PERIOD
        self._timers[0] = self._loop.call_at(self._next_beat, self._heartbeat)
        try:
            self.broker.heartbeat()
        except Exception:
            logger.exception("heartbeat failed")
        self._pump()

    def _summary(self) -> None:
        self._timers[1] = self._loop.call_later(SUMMARY_PERIOD, self._summary)
        self.broker.summary()
