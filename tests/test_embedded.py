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


# -- INGInious 0.9.2's local mode --------------------------------------------------------------
# 0.9.2's frontend/arch_helper.py (backend: local) builds the loop and one zmq.asyncio.Context in
# the main thread, constructs the Client, the Backend and the agents there (the loop is set but
# not running), schedules each runner with ensure_future under a wrapper that re-runs it when it
# is cancelled, then runs the loop forever in a daemon thread.  The webapp's threads call
# client.new_job(), which hands the job to that loop thread-safely.  This script does the same
# with the real 0.9.2 client and agent (which need the 0.9.2 `inginious` first on the path).
EMBEDDED_09_SCRIPT = r"""
import asyncio, os, sys, threading, time
sys.path[:0] = [{peers09!r}, {tests!r}]
import zmq.asyncio
from peers import INGINIOUS_DIALECT
from peers.real09 import FakeTask, ScriptedAgent, finish

assert INGINIOUS_DIALECT == "0.9", INGINIOUS_DIALECT
if {backend!r} == "stock":
    from inginious.backend.backend import Backend
    impl = "stock"
else:
    from fastbackend import Backend, broker
    impl = broker.IMPL
from inginious.client.client import Client

if os.environ.get("FASTBACKEND_LOOP") == "uvloop":
    import uvloop
    loop = uvloop.new_event_loop()
else:
    loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)
context = zmq.asyncio.Context()
stopping = False

async def rerun_when_cancelled(runner):
    # As the webapp's local mode keeps its backend and agents alive.
    while not stopping:
        try:
            await runner.run()
        except asyncio.CancelledError:
            if stopping:
                raise

client = Client(context, "inproc://backend_client")
backend = Backend(context, "inproc://backend_agent", "inproc://backend_client")
def keep_state(message):
    return {{"state": message.inputdata.get("@state", "")}}

docker = ScriptedAgent(context, "inproc://backend_agent", "Docker - Local agent", 2, [("docker", "default")],
                       finish("success", "ok", fields=keep_state))
mcq = ScriptedAgent(context, "inproc://backend_agent", "MCQ - Local agent", 1, [("mcq", "default")],
                    finish("success", "mcq", fields=keep_state))
runners = [asyncio.ensure_future(rerun_when_cancelled(x)) for x in (docker, mcq, backend)]
thread = threading.Thread(target=loop.run_forever, daemon=True)
thread.start()

client.start()
deadline = time.monotonic() + 20
while client.get_available_environments() != {{"docker": ("default",), "mcq": ("default",)}}:
    assert time.monotonic() < deadline, client.get_available_environments()
    time.sleep(0.01)

results, lock, all_done = [], threading.Lock(), threading.Event()
N = 20

def callback(result, grade, problems, tests, custom, state, archive, stdout, stderr):
    with lock:
        results.append((tuple(result), state))
        if len(results) == N:
            all_done.set()

for i in range(N):
    task = FakeTask(environment=("mcq", "default") if i % 4 == 0 else ("docker", "default"))
    assert client.new_job(i % 2, task, {{"q": "é", "@state": f"s{{i % 4}}"}}, callback, "webapp") is not None
assert all_done.wait(20), results

async def shutdown():
    global stopping
    stopping = True
    for agent in (docker, mcq):
        agent.closing = True
    for task in client._restartable_tasks:
        task.cancel()
    for runner in runners:
        runner.cancel()
    await asyncio.gather(*runners, return_exceptions=True)
    loop.stop()

asyncio.run_coroutine_threadsafe(shutdown(), loop)
thread.join(10)
assert not thread.is_alive()
print(impl, sorted(set(results)))
"""

EMBEDDED_09_EXPECTED = ("[(('success', 'mcq'), 's0'), (('success', 'ok'), 's1'), (('success', 'ok'), 's2'),"
                        " (('success', 'ok'), 's3')]")


def _embedded_09_params() -> list:
    params = [pytest.param(impl, loop, id=f"{impl}-{loop}")
              for impl in ("c", "py") for loop in ("uvloop", "asyncio")]
    if os.environ.get("FASTBACKEND_TEST_STOCK", "") not in ("", "0"):
        # The same script with the stock 0.9.2 Backend: proof the script is the webapp's use.
        params.append(pytest.param("stock", "asyncio", id="stock-asyncio"))
    return params


@pytest.mark.parametrize("impl,loop", _embedded_09_params())
def test_embedded_inproc_like_inginious_09_local_mode(impl: str, loop: str, tmp_path) -> None:
    """fastbackend.Backend in 0.9.2's local mode: built before its loop runs, served on the
    webapp's loop thread and context over inproc, with the real 0.9.2 client and agents."""
    from peers import PEERS09_DIR

    assert (PEERS09_DIR / "inginious" / "__init__.py").exists(), (
        f"INGInious 0.9.2 is not installed in {PEERS09_DIR}: run tests/run.sh (see README)")
    script = tmp_path / "embedded09.py"
    script.write_text(EMBEDDED_09_SCRIPT.format(peers09=str(PEERS09_DIR), tests=HERE,
                                                backend="stock" if impl == "stock" else "fastbackend"))
    root = os.path.dirname(HERE)
    env = {**os.environ, "FASTBACKEND_LOOP": loop,
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.pop("FASTBACKEND_NO_EXTENSIONS", None)
    if impl == "py":
        env["FASTBACKEND_NO_EXTENSIONS"] = "1"
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == f"{impl} {EMBEDDED_09_EXPECTED}", (proc.stdout, proc.stderr[-4000:])
