"""The INGInious webapp's local mode (``backend: local``) on fastbackend, without editing INGInious.

In local mode the webapp builds ``inginious.backend.backend.Backend(context,
"inproc://backend_agent", "inproc://backend_client")`` itself (``frontend/arch_helper.py``
imports it when the arch is created, in 0.5 and 0.9.2 alike).  :func:`install` replaces
that class, in memory, by ``fastbackend.Backend``, which takes the same arguments; nothing
on disk changes, so an INGInious upgrade undoes nothing.  Start the webapp through it::

    python -m fastbackend.inginious_local inginious-webapp [webapp options]
    python -m fastbackend.inginious_local -m inginious.scripts.webapp [webapp options]
    python -m fastbackend.inginious_local /path/to/script [options]

(a console script name, ``-m`` and a module, or a script path).  A WSGI deployment calls
:func:`install` before importing its application.  fastbackend then logs under
``inginious.backend``, through the handlers and at the level INGInious configured.

For production the separate backend process (``backend: tcp://HOST:PORT`` in the
webapp's ``configuration.yaml``, and ``fastbackend serve``) remains the recommended setup.
"""

from __future__ import annotations

import importlib
import runpy
import shutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

USAGE = ("usage: python -m fastbackend.inginious_local (CONSOLE_SCRIPT | -m MODULE | SCRIPT_PATH) [ARGS...]\n"
         "  e.g. python -m fastbackend.inginious_local inginious-webapp --port 8080")


def install() -> None:
    """Make ``inginious.backend.backend.Backend`` be ``fastbackend.Backend`` in this process."""
    from . import Backend

    stock = importlib.import_module("inginious.backend.backend")
    stock.Backend = Backend


def main(argv: list[str] | None = None) -> int:
    """Install the replacement, then run the webapp command given in ``argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 2 if not argv else 0
    install()
    if argv[0] == "-m":
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            return 2
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return 0
    sys.argv = argv
    scripts = entry_points(group="console_scripts", name=argv[0])
    if scripts:
        result = next(iter(scripts)).load()()
        return result if isinstance(result, int) else 0
    # INGInious 0.5 installs its commands as plain scripts, not entry points.
    path = argv[0] if Path(argv[0]).is_file() else shutil.which(argv[0])
    if path:
        runpy.run_path(path, run_name="__main__")
        return 0
    print(f"fastbackend.inginious_local: {argv[0]!r} is neither a console script nor a file\n{USAGE}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
