"""``fastbackend serve``'s malloc tuning (fastbackend/tuning.py), seen from where a buffer lands.

With glibc's defaults a 4 MiB allocation is an mmap of its own (and its free a munmap, so
the next one faults its pages in again); once tuned it comes from the heap.  Each case runs
in a fresh interpreter: the thresholds are process-wide.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
if sys.argv[1] == "tune":
    from fastbackend.tuning import tune_malloc
    print(tune_malloc())
else:
    print("untuned")
address = libc.malloc(4 << 20)
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        low, high = (int(x, 16) for x in line.split()[0].split("-"))
        if low <= address < high:
            print("heap")
            break
else:
    print("own mapping")
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


def where(mode: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env}, check=True)
    return out.stdout.splitlines()


def test_large_buffers_come_from_the_heap_once_tuned() -> None:
    assert where("untuned") == ["untuned", "own mapping"]  # glibc's default, as the test assumes
    said, landed = where("tune")
    assert said.startswith("malloc: buffers up to 32 MiB from the heap") and landed == "heap"


def test_the_operators_glibc_tunables_win() -> None:
    assert where("tune", GLIBC_TUNABLES="glibc.malloc.check=0") == [
        "malloc as set by GLIBC_TUNABLES", "own mapping"]
