"""fastbackend.Backend embedded the way the INGInious webapp's local mode embeds the stock one.

The webapp builds ``Backend(context, "inproc://backend_agent", "inproc://backend_client")``
on a ``zmq.asyncio.Context`` shared with its client and agents, and awaits ``run()`` on
its own loop.  Here the real INGInious 0.5 client and agent share one context and one
loop with the broker, on both event loops and both implementations.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import zmq.asyncio

from fastbackend import Backend, broker

HERE = os.path.dirname(__file__)


def test_compiled_core_is_loaded() -> None:
    """A broken build must fail loudly, not run slowly."""
    expected = "py" if os.environ.get("FASTBACKEND_NO_EXTENSIONS", "") not in ("", "0") else "c"
    assert broker.IMPL == expected


def test_pure_core_is_selected_by_the_environment() -> None:
    code = "from fastbackend import broker, sched, wire; print(broker.IMPL, sched.IMPL, wire.IMPL)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTBACKEND_NO_EXTENSIONS": "1"},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["py", "py", "py"]


EMBEDDED_SCRIPT = r"""
import asyncio, os, sys, types
sys.path.insert(0, {tests!r})
from peers.real import Peers, finish
from fastbackend import Backend, broker

async def main():
    addresses = types.SimpleNamespace(agent_addr="inproc://backend_agent", client_addr="inproc://backend_client")
    async with Peers(addresses) as peers:
        # One context for all, as the webapp's local mode does.
        backend = Backend(peers.ctx, addresses.agent_addr, addresses.client_addr)
        serving = asyncio.ensure_future(backend.run())
        peers.agent("local", slots=2, behaviour=finish("success", "ok"))
        client = await peers.ready_client("default")
        jobs = [peers.submit(client, inputdata={{"q": "é"}}) for _ in range(20)]
        results = [await job.result(20) for job in jobs]
        print(broker.IMPL, sorted(set(r.result for r in results)))
        serving.cancel()
        await asyncio.wait_for(serving, 5)

if os.environ.get("FASTBACKEND_LOOP") == "uvloop":
    import uvloop
    uvloop.install()
asyncio.run(main())
"""


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_embedded_inproc_with_real_peers(impl: str, loop: str, tmp_path) -> None:
    script = tmp_path / "embedded.py"
    script.write_text(EMBEDDED_SCRIPT.format(tests=HERE))
    root = os.path.dirname(HERE)
    env = {**os.environ, "FASTBACKEND_LOOP": loop,
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.pop("FASTBACKEND_NO_EXTENSIONS", None)
    if impl == "py":
        env["FASTBACKEND_NO_EXTENSIONS"] = "1"
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{impl} [('success', 'ok')]", (proc.stdout, proc.stderr)


def test_backend_runs_on_the_callers_loop() -> None:
    """run() serves on the running loop and returns when cancelled, like stock."""

    async def scenario() -> None:
        context = zmq.asyncio.Context()
        backend = Backend(context, "inproc://a", "inproc://c")
        task = asyncio.ensure_future(backend.run())
        client = context.socket(zmq.DEALER)
        client.connect("inproc://c")
        await asyncio.sleep(0.05)
        await client.send(b"\x81\xa4type\xa4ping")  # an unregistered ping is answered `unknown`
        reply = await asyncio.wait_for(client.recv(), 5)
        assert reply == b"\x81\xa4type\xa7unknown"
        task.cancel()
        await asyncio.wait_for(task, 5)
        client.close(0)
        context.destroy(0)

    asyncio.run(scenario())
