"""The scheduler the broker uses: the compiled one, or its pure-Python twin.

``FASTBACKEND_NO_EXTENSIONS=1`` forces the pure-Python twin.  Otherwise the compiled
module is used, and if it cannot be imported a warning is logged (the tests then fail:
a broken build must be loud, not merely slow).  ``IMPL`` says which one was chosen.
"""

from __future__ import annotations

import logging
import os

if os.environ.get("FASTBACKEND_NO_EXTENSIONS", "") not in ("", "0"):
    from ._sched_py import JOB_FREE, JOB_RUNNING, JOB_WAITING, Scheduler

    IMPL = "py"
else:
    try:
        from ._sched_c import JOB_FREE, JOB_RUNNING, JOB_WAITING, Scheduler

        IMPL = "c"
    except ImportError as error:
        logging.getLogger(__name__).warning(
            "compiled scheduler unavailable (%s); using the pure-Python one", error
        )
        from ._sched_py import JOB_FREE, JOB_RUNNING, JOB_WAITING, Scheduler

        IMPL = "py"

__all__ = ["IMPL", "JOB_FREE", "JOB_RUNNING", "JOB_WAITING", "Scheduler"]
