"""The scheduler the broker uses: the compiled one, or its pure-Python twin.

``FASTBACKEND_NO_EXTENSIONS=1`` forces the pure-Python twin.  Otherwise the compiled
module is used, and if it cannot be imported a warning is logged (the tests then fail:
a broken build must be loud, not merely slow).  ``IMPL`` says which one was chosen.
"""

from __future__ import annotations

from ._select import twin

_impl, IMPL = twin("sched")

JOB_FREE = _impl.JOB_FREE
JOB_RUNNING = _impl.JOB_RUNNING
JOB_WAITING = _impl.JOB_WAITING
PRIORITY_MIN = _impl.PRIORITY_MIN  # job priorities are signed 64-bit ints, lower first
PRIORITY_MAX = _impl.PRIORITY_MAX
Scheduler = _impl.Scheduler

__all__ = ["IMPL", "JOB_FREE", "JOB_RUNNING", "JOB_WAITING", "PRIORITY_MAX", "PRIORITY_MIN", "Scheduler"]
