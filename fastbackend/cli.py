"""``fastbackend serve AGENT_ADDR CLIENT_ADDR [-v] [--debugmode] [--dialect 0.5|0.9]``: the drop-in for
``inginious-backend`` of INGInious 0.5 and 0.7-0.9.2."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import zmq

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"  # the stock backend's


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, asyncio's loop otherwise; ``FASTBACKEND_LOOP`` forces one."""
    wanted = os.environ.get("FASTBACKEND_LOOP", "")
    if wanted not in ("", "uvloop", "asyncio"):
        raise SystemExit(f"FASTBACKEND_LOOP must be 'uvloop' or 'asyncio', not {wanted!r}")
    if wanted != "asyncio":
        try:
            import uvloop
        except ImportError:
            if wanted == "uvloop":
                raise SystemExit("FASTBACKEND_LOOP=uvloop but uvloop is not installed") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastbackend", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the backend (same arguments as inginious-backend)")
    serve.add_argument("agent", help="address the agents connect to, e.g. tcp://127.0.0.1:2001")
    serve.add_argument("client", help="address the clients connect to, e.g. tcp://127.0.0.1:2000")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every job (DEBUG)")
    serve.add_argument("--debugmode", action="store_true", help="asyncio debug mode (for developers)")
    serve.add_argument("--dialect", choices=("0.5", "0.9"), default=None,
                       help="serve only this INGInious dialect (0.5, or 0.9 for INGInious 0.7-0.9.2); "
                            "by default each peer is served in the dialect it speaks")
    return parser.parse_args(argv)


def serve(args: argparse.Namespace) -> int:
    level = logging.DEBUG if args.verbose else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger("fastbackend")
    root.setLevel(level)
    root.addHandler(handler)
    # Imported once logging is set up: a compiled module that fails to import says so
    # in the operator's log format.
    from .server import Backend

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    if args.debugmode:
        loop.set_debug(True)
    context = zmq.Context()
    backend = Backend(context, args.agent, args.client, args.dialect)
    task = loop.create_task(backend.run())
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    status = 0
    try:
        loop.run_until_complete(task)
    except zmq.ZMQError as exc:
        root.error("cannot serve: %s", exc)
        status = 1
    finally:
        loop.close()
        context.destroy(1000)  # give queued frames a second to leave, as stock does
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2  # pragma: no cover - argparse rejects other commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
