"""Test peers for fastbackend: the real INGInious client/agent, raw sockets, broker processes.

Two INGInious versions are used, one per test run, because both install as the package
``inginious``: 0.5 (in the test venv) and 0.9.2 (in ``.peers/0.9``, put first on
``PYTHONPATH`` by the second run of ``tests/run.sh``).  :data:`INGINIOUS_DIALECT` says which
one this interpreter imports.  When it is 0.5, importing this package installs
:mod:`peers.msgpack_compat` (the msgpack 0.6 adapter the real 0.5 peers need on
msgpack >= 1.0) before any real peer is used; 0.9.2 speaks msgpack 1.x natively.

* :mod:`peers.broker` -- start/stop a broker subprocess (fastbackend or stock), read its log;
* :mod:`peers.real`   -- the real 0.5 Client and a scripted subclass of the real 0.5 Agent;
* :mod:`peers.real09` -- the same for INGInious 0.9.2;
* :mod:`peers.raw`, :mod:`peers.raw09` -- raw DEALER peers (0.5 / 0.9 frames) for inputs the
  real ones cannot produce;
* :mod:`peers.stock_backend` -- the stock backend of whichever version is importable, as a
  reference broker.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

#: Where ``tests/run.sh`` installs ``inginious==0.9.2 --no-deps`` (overridable for other layouts).
PEERS09_DIR = Path(os.environ.get("FASTBACKEND_PEERS09",
                                  Path(__file__).resolve().parents[2] / ".peers" / "0.9"))


def importable_dialect() -> str | None:
    """"0.5" or "0.9" for the ``inginious`` this interpreter imports; None if there is none.

    ``inginious.common.message_meta`` (the 0.5 message metaclass) is gone since 0.7, whose
    messages are dataclasses: that module is the telling difference.
    """
    if importlib.util.find_spec("inginious") is None:
        return None
    return "0.5" if importlib.util.find_spec("inginious.common.message_meta") is not None else "0.9"


INGINIOUS_DIALECT = importable_dialect()

if INGINIOUS_DIALECT == "0.5":
    from .msgpack_compat import install as _install_msgpack_compat

    _install_msgpack_compat()
