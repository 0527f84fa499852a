"""Helpers shared by the real-peer drivers of both INGInious versions (no INGInious import)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str = "condition",
                     interval: float = 0.01) -> Any:
    """Poll ``predicate`` on the loop until it is truthy; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class FakeTaskFolder:
    """The real agents check that a task's folder exists before running a job: it always does."""

    def from_subfolder(self, _name: str) -> FakeTaskFolder:
        return self

    def exists(self) -> bool:
        return True


def run(coro: Awaitable[Any], timeout: float = 60.0) -> Any:
    """Run a test scenario on a fresh asyncio loop, bounded by ``timeout`` seconds."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def once(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` callable once; later calls do nothing (as the real clients wrap their callbacks)."""
    called = False

    def wrapper(*args: Any) -> Any:
        nonlocal called
        if not called:
            called = True
            return func(*args)
        return None

    return wrapper
