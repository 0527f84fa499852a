"""Run the stock INGInious backend (0.5 or 0.9.2) the way its ``inginious-backend`` script does.

Usage (with a stock venv's python, see setup.sh and setup-0.9.sh)::

    python launch_stock.py AGENT_ADDR CLIENT_ADDR [-v]

Both versions' scripts build a ``zmq.asyncio.ZMQEventLoop``, which pyzmq removed, then
construct ``Backend(context, agent, client)`` and run it; the stock ``Backend`` itself runs
unchanged here on asyncio's own loop with a ``zmq.asyncio.Context``.
Logging is set up as the stock script does it: the ``inginious`` logger at INFO, one
formatted line per record on stderr.  That is the level operators run, and logging is a
real part of the stock backend's cost, so the benchmarks compare at that level.
SIGTERM ends the loop and the process cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import zmq.asyncio
from inginious.backend.backend import Backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("agent", help="agent address, e.g. tcp://127.0.0.1:2001")
    parser.add_argument("client", help="client address, e.g. tcp://127.0.0.1:2000")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    args = parser.parse_args()

    level = logging.DEBUG if args.verbose else logging.INFO
    logger = logging.getLogger("inginious")
    logger.setLevel(level)
    handler = logging.StreamHandler()
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    logger.addHandler(handler)

    # Backend.__init__ calls asyncio.get_event_loop(): the loop must be current before it.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    context = zmq.asyncio.Context()
    backend = Backend(context, args.agent, args.client)
    task = loop.create_task(backend.run())
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    try:
        loop.run_until_complete(task)
    finally:
        loop.close()
        context.destroy(linger=0)


if __name__ == "__main__":
    main()
