"""Tuning that ``fastbackend serve`` applies to its own process, and only there: a process
that embeds the ``Backend`` (the webapp's local mode) keeps its limits and its allocator as
its owner set them.

Descriptors: see ``raise_descriptor_limit``.  Malloc: see below and ``tune_malloc``.

glibc serves an allocation of 128 KiB or more with an mmap of its own and gives it back with
munmap when it is freed (the threshold adapts upward, but trimming the heap top still hands
memory back at 2x that).  A broker relays results of a megabyte or more: libzmq allocates
each one's receive buffer, the broker its spliced copy, and both are freed once sent, so
every result faults its pages in anew (28 page faults per 1 MiB result measured here).
Buffers up to 32 MiB (glibc's largest threshold on 64-bit) taken from the heap, and up to
64 MiB of free heap kept before trimming, let one result's memory serve the next.  The price
is that much freed memory held in reserve after a burst of large results.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_malloc() -> str:
    """Set glibc's mmap and trim thresholds for a broker; returns what was done, for the log.

    Nothing is changed where malloc is not glibc's, or where the operator has tuned it with
    ``GLIBC_TUNABLES`` (their setting wins).
    """
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "malloc as set by GLIBC_TUNABLES"
    if platform.libc_ver()[0] != "glibc":
        return "malloc left as it is (not glibc)"
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return "malloc left as it is (no mallopt)"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # mallopt returns 1 on success, 0 for a value it refuses.
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "malloc left as it is (mallopt refused the thresholds)"
    return (f"malloc: buffers up to {MMAP_THRESHOLD >> 20} MiB from the heap, "
            f"{TRIM_THRESHOLD >> 20} MiB of free heap kept before trimming")


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns (before, after).

    Every agent and client costs the broker one descriptor (its TCP connection).  A soft
    limit of 1,024, the default of a login shell and of a systemd service without
    ``LimitNOFILE=``, would stop it accepting agents near a thousand; the hard limit is the
    ceiling the operator set, and raising the soft one up to it needs no privilege.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft  # unlimited hard limits are refused as a soft value on some systems
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard
