"""fastbackend: the INGInious backend (broker between the webapp's clients and the grading agents).

  fastbackend serve AGENT_ADDR CLIENT_ADDR [-v] [--dialect 0.5|0.9] [--allow-agents CIDR,...]
                    [--allow-clients CIDR,...]
      the drop-in for inginious-backend (INGInious 0.5 and 0.7-0.9.2)
  fastbackend status CLIENT_ADDR [--watch SECONDS] [--json] [--dialect 0.5|0.9|both] [--metrics URL]
      environments, running and waiting jobs of a backend, asked as an ordinary client
  fastbackend --version
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import zmq

from ._version import __version__

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


def version_text() -> str:
    """``fastbackend X.Y.Z (c core, release build; Python, pyzmq, libzmq versions)``."""
    from .server import IMPL, build_kind

    build = f", {build_kind()} build" if IMPL == "c" else ""
    return (f"fastbackend {__version__} ({IMPL} core{build}; Python {sys.version.split()[0]}, "
            f"pyzmq {zmq.pyzmq_version()}, libzmq {zmq.zmq_version()})")


class _Version(argparse.Action):
    """``--version``, computed only when asked (it imports the core)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(version_text())
        parser.exit()


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbackend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the backend (same arguments as inginious-backend)")
    serve.add_argument("agent", help="address the agents connect to, e.g. tcp://127.0.0.1:2001")
    serve.add_argument("client", help="address the clients connect to, e.g. tcp://127.0.0.1:2000")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every job (DEBUG)")
    serve.add_argument("--debugmode", action="store_true", help="asyncio debug mode (for developers)")
    serve.add_argument("--dialect", choices=("0.5", "0.9"), default=None,
                       help="serve only this INGInious dialect (0.5, or 0.9 for INGInious 0.7-0.9.2); "
                            "by default each peer is served in the dialect it speaks")
    serve.add_argument("--allow-agents", metavar="CIDR[,CIDR...]", action="append",
                       help="only these IPv4/IPv6 networks may connect to the agent address "
                            "(recommended; default: anyone, as stock)")
    serve.add_argument("--allow-clients", metavar="CIDR[,CIDR...]", action="append",
                       help="only these networks may connect to the client address (default: anyone)")
    serve.add_argument("--metrics", metavar="HOST:PORT", default=None,
                       help="serve Prometheus metrics at http://HOST:PORT/metrics "
                            "(needs: pip install 'fastbackend[metrics]')")
    status = commands.add_parser(
        "status", help="show a backend's environments, running and waiting jobs (asked as a client)",
        description="Connects to CLIENT_ADDR as an ordinary client (one hello, then queue requests) "
                    "and shows environments, running jobs and waiting jobs.  Works against fastbackend "
                    "and the stock backends; against a STOCK backend give --dialect: stock backends stop "
                    "serving on a frame of the other dialect.")
    status.add_argument("client", metavar="CLIENT_ADDR", help="the backend's client address")
    status.add_argument("--watch", metavar="SECONDS", type=_seconds,
                        help="refresh every SECONDS until interrupted")
    status.add_argument("--json", action="store_true", help="JSON (one object per line with --watch)")
    status.add_argument("--dialect", choices=("0.5", "0.9", "both"), default=None,
                        help="speak this dialect (default: try 0.9, then 0.5, which is safe with "
                             "fastbackend only); 'both': one connection per dialect (fastbackend shows "
                             "each dialect's clients only that dialect's jobs)")
    status.add_argument("--metrics", metavar="URL",
                        help="fastbackend's metrics endpoint (HOST:PORT or URL): adds agents, slots "
                             "and waiting jobs per environment")
    status.add_argument("--timeout", metavar="SECONDS", type=_seconds, default=10.0,
                        help="how long to wait for each answer (default 10)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        # No command: the full help, as a usage error.
        parser.print_help(sys.stderr)
        parser.exit(2)
    return args


def serve(args: argparse.Namespace) -> int:
    level = logging.DEBUG if args.verbose else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger("fastbackend")
    root.setLevel(level)
    root.addHandler(handler)
    # Imported once logging is set up: a compiled module that fails to import says so
    # in the operator's log format.
    from .allowlist import ZapEndpointBusy
    from .server import Backend
    from .tuning import raise_descriptor_limit, tune_malloc

    root.debug("%s", tune_malloc())

    before, after = raise_descriptor_limit()
    if after != before:
        root.info("descriptor limit (RLIMIT_NOFILE) raised from %d to the hard limit, %d", before, after)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    if args.debugmode:
        loop.set_debug(True)
    context = zmq.Context()
    try:
        backend = Backend(context, args.agent, args.client, args.dialect,
                          allow_agents=args.allow_agents, allow_clients=args.allow_clients,
                          metrics=args.metrics)
    except ValueError as exc:
        root.error("cannot serve: %s", exc)
        loop.close()
        context.destroy(0)
        return 2
    task = loop.create_task(backend.run())
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    status = 0
    try:
        loop.run_until_complete(task)
    except (zmq.ZMQError, ZapEndpointBusy) as exc:
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
    if args.command == "status":
        from .status import run

        return run(args.client, args.dialect, args.watch, args.json, args.metrics, args.timeout)
    return 2  # pragma: no cover - argparse rejects other commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
