"""The INGInious 0.5 side of a mixed-dialect test, run as a subprocess (test-only).

Usage: ``python -m peers.side05 AGENT_ADDR CLIENT_ADDR N_JOBS`` with ``tests/`` on
``sys.path`` and the venv's INGInious 0.5 importable (NOT ``.peers/0.9``): the 0.5 and
0.9.2 peers cannot share an interpreter, so ``tests/test_mixed_dialects.py`` runs the 0.9
peers itself and these in a child process.

It starts a real 0.5 agent (environments "default" and "only05", 2 slots, echoing each
job) and a real 0.5 client, and talks to the parent in JSON lines on stdout:

1. ``{"event": "ready", "containers": [...]}`` once the client lists both environments;
2. it then waits for a line ``go`` on stdin, submits ``N_JOBS`` jobs to "default" and
   waits for their results;
3. ``{"event": "done", "results": [...], "agent_jobs": [...], "containers": [...]}``, and exits 0.

Every wait is bounded; on any failure it prints ``{"event": "error", "error": "..."}`` and
exits 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
import warnings

from .real import Peers, echo, wait_containers


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


async def main(agent_addr: str, client_addr: str, n_jobs: int) -> None:
    class Addresses:
        pass

    addresses = Addresses()
    addresses.agent_addr, addresses.client_addr = agent_addr, client_addr
    async with Peers(addresses) as peers:
        agent = peers.agent("agent-0.5", 2, ["default", "only05"], echo(delay=0.005))
        client = peers.client()
        await wait_containers(client, "default", "only05", timeout=15)
        emit(event="ready", containers=sorted(client.get_available_containers()))
        line = await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), 30)
        if line.strip() != "go":
            raise RuntimeError(f"expected 'go' from the parent, got {line!r}")
        handles = [peers.submit(client, "default", inputdata={"n": i, "dialect": "0.5"})
                   for i in range(n_jobs)]
        await asyncio.wait_for(asyncio.gather(*(h.done for h in handles)), 60)
        emit(event="done",
             results=[[list(h.done.result().result), h.done.result().custom.get("inputdata"),
                       len(h.calls)] for h in handles],
             agent_jobs=[job.inputdata for job in agent.jobs],
             containers=sorted(client.get_available_containers()))


if __name__ == "__main__":
    # The real Agent re-arms its ping check with call_later; the one pending at exit is never
    # awaited (the peer's design, as tests/conftest.py notes).
    warnings.filterwarnings("ignore", "coroutine 'Agent.__check_last_ping' was never awaited", RuntimeWarning)
    try:
        asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2], int(sys.argv[3])), 120))
    except BaseException:
        emit(event="error", error=traceback.format_exc())
        sys.exit(1)
