"""Run a STOCK INGInious backend (0.5 or 0.9.2), as a reference for the conformance suites (test-only).

Usage: ``python -m peers.stock_backend AGENT_ADDR CLIENT_ADDR [-v]`` with ``tests/`` on
``sys.path`` (the ``broker`` fixture does this when ``FASTBACKEND_TEST_STOCK=1``).  Which
version runs is whichever ``inginious`` is importable: the venv's 0.5, or 0.9.2 when
``.peers/0.9`` comes first on ``PYTHONPATH`` (the ``stock-0.9`` broker configuration).

The stock ``inginious-backend`` scripts of both versions build their loop with
``zmq.asyncio.ZMQEventLoop``, which pyzmq 27 no longer has.  The stock ``Backend`` classes
themselves run unchanged on a plain asyncio loop with a ``zmq.asyncio.Context``; this
launcher does that, logs in the stock format at the stock levels, and exits with status 0
on SIGINT/SIGTERM like fastbackend, so the same fixture can start and stop either broker.
With 0.5, its messages go through :mod:`peers.msgpack_compat` like the real client's and
agent's (0.9.2 uses msgpack 1.x natively).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import zmq.asyncio

from . import INGINIOUS_DIALECT


async def _serve(agent_addr: str, client_addr: str) -> bool:
    """Run the stock backend until a signal; True if it ended because of the signal."""
    from inginious.backend.backend import Backend

    context = zmq.asyncio.Context()
    backend = Backend(context, agent_addr, client_addr)
    task = asyncio.ensure_future(backend.run())
    loop = asyncio.get_running_loop()
    stopped = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: (stopped.append(True), task.cancel()))
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        # The stock backend re-arms its ping timer with call_later; cancel what is pending
        # so that closing the loop does not warn about coroutines never awaited.
        for other in asyncio.all_tasks():
            if other is not asyncio.current_task():
                other.cancel()
        context.destroy(linger=100)
    return bool(stopped)


def main(argv: list[str] | None = None) -> int:
    """Parse the stock command line and serve; the exit status is 0 after a signal."""
    description = f"stock INGInious {INGINIOUS_DIALECT} backend (test reference)"
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("agent")
    parser.add_argument("client")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    level = logging.DEBUG if args.verbose else logging.INFO
    logger = logging.getLogger("inginious")
    logger.setLevel(level)
    handler = logging.StreamHandler()
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    logger.addHandler(handler)

    # (Importing the ``peers`` package installed the msgpack adapter if this is INGInious 0.5.)
    logger.info("Stock INGInious %s backend (test reference)", INGINIOUS_DIALECT)
    # Backend.__init__ calls asyncio.get_event_loop(): give it the loop that will run it.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        stopped = loop.run_until_complete(_serve(args.agent, args.client))
    except Exception:
        logger.exception("Stock backend failed")
        return 1
    finally:
        loop.close()
    if not stopped:
        # Backend.run() only returns by itself when it crashed on bad input.
        logger.error("Stock backend stopped without a signal")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
