"""Both dialects on one fastbackend broker: real 0.5 peers and real 0.9.2 peers at once.

Run in the 0.9 test run: the 0.9.2 client and agent live in this process; the 0.5 ones
(which cannot share an interpreter with 0.9.2, both being the package ``inginious``) run
in a child process, :mod:`peers.side05`, started with the venv's INGInious 0.5 on its
path, reporting in JSON lines and ended by its PID.

With no ``--dialect``, each peer is served in the dialect of its frames: jobs never cross
dialects, and each dialect's clients see only that dialect's environments, though both
name one "default".  With ``--dialect`` pinned, a peer of the other dialect gets nothing
and the log says so once.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
from peers import PEERS09_DIR
from peers.broker import IMPL_CONFIGS, TESTS_DIR, pythonpath
from peers.raw import RawAgent, RawClient, assert_serving
from peers.raw09 import RawAgent09, RawClient09
from peers.real09 import Peers, echo, environments_of, run, wait_until

N_JOBS = 60


class Side05:
    """The child process running the real 0.5 peers (see :mod:`peers.side05`)."""

    def __init__(self, broker, tmp_path, n_jobs: int) -> None:
        self.stderr_path = tmp_path / "side05.stderr"
        env = {**os.environ,
               "PYTHONPATH": pythonpath(TESTS_DIR, drop=(PEERS09_DIR,))}
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "peers.side05", broker.agent_addr, broker.client_addr, str(n_jobs)],
                cwd=TESTS_DIR, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                text=True)

    async def event(self, timeout: float) -> dict:
        """The child's next JSON line (bounded: the child is killed if none comes in time)."""
        try:
            line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        except asyncio.TimeoutError:
            self.kill()
            raise AssertionError(f"no word from the 0.5 side in {timeout}s; stderr:\n{self.stderr()}") \
                from None
        assert line, f"the 0.5 side exited ({self.proc.poll()}); stderr:\n{self.stderr()}"
        event = json.loads(line)
        assert event["event"] != "error", event["error"]
        return event

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)

    def finish(self, timeout: float = 10.0) -> int:
        """Wait (bounded) for the child to exit; kill it by its PID if it does not."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()


@pytest.mark.brokers(*IMPL_CONFIGS)
def test_both_dialects_on_one_broker(broker, tmp_path):
    """A 0.5 agent and client and a 0.9 agent and client, one environment name "default":
    every job runs on an agent of its own dialect, both clients get every result, and each
    client sees only its own dialect's environments."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("agent-0.9", 2, [("docker", "default"), ("docker", "only09")],
                                echo(delay=0.005))
            client = await peers.ready_client(("docker", "default"), ("docker", "only09"))
            side = Side05(broker, tmp_path, N_JOBS)
            try:
                ready = await side.event(30)
                assert ready["containers"] == ["default", "only05"]
                side.send("go")
                handles = [peers.submit(client, ("docker", "default"), inputdata={"n": i, "dialect": "0.9"})
                           for i in range(N_JOBS)]
                await asyncio.wait_for(asyncio.gather(*(h.done for h in handles)), 60)
                done = await side.event(90)
                assert side.finish() == 0, side.stderr()
            finally:
                side.kill()

            # The 0.9 side: every result, its own; its agent ran only 0.9 jobs.
            for i, handle in enumerate(handles):
                got = handle.done.result()
                assert got.result == ("success", "echo")
                assert got.custom["inputdata"] == {"n": i, "dialect": "0.9"}
                assert len(handle.calls) == 1
            assert sorted(job.inputdata["n"] for job in agent.jobs) == list(range(N_JOBS))
            assert all(job.inputdata["dialect"] == "0.9" for job in agent.jobs)
            # The 0.5 side likewise.
            assert [r[0] for r in done["results"]] == [["success", "echo"]] * N_JOBS
            assert [r[1] for r in done["results"]] == [{"n": i, "dialect": "0.5"} for i in range(N_JOBS)]
            assert all(r[2] == 1 for r in done["results"])
            assert sorted(job["n"] for job in done["agent_jobs"]) == list(range(N_JOBS))
            assert all(job["dialect"] == "0.5" for job in done["agent_jobs"])
            # Each client saw only its own dialect's environments, with the other side registered.
            assert done["containers"] == ["default", "only05"]
            assert environments_of(client) == {("docker", "default"), ("docker", "only09")}

    run(scenario(), 150)


def _dialect_warnings(broker) -> list[str]:
    return broker.log_lines("WARNING", "dialect")


@pytest.mark.brokers("c-uvloop-pin0.9", "py-asyncio-pin0.9")
@pytest.mark.parametrize("side", ["client", "agent"])
def test_pinned_09_gives_a_05_peer_nothing(broker, zctx, side):
    """With --dialect 0.9, a 0.5 peer gets no reply at all and one "dialect" WARNING is
    logged, while the real 0.9 peers are served."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("agent-0.9", 1, [("docker", "default")], echo())
            client = await peers.ready_client(("docker", "default"))
            if side == "client":
                stranger = RawClient(zctx, broker.client_addr)
                stranger.hello("0.5-client")
                for _ in range(5):
                    stranger.send("ping")
            else:
                stranger = RawAgent(zctx, broker.agent_addr)
                stranger.hello("0.5-agent", 1, ("default", "only05"))
                stranger.send("pong")
            try:
                await wait_until(lambda: _dialect_warnings(broker), 5, "a dialect warning")
                got = await peers.run_job(client, ("docker", "default"), inputdata={"n": 1})
                assert got.result == ("success", "echo") and len(agent.jobs) == 1
                # Nothing at all for the 0.5 peer: no containers, no pong, no ping.
                await asyncio.to_thread(stranger.expect_silence, 1.5, ())
                assert environments_of(client) == {("docker", "default")}
                assert len(_dialect_warnings(broker)) == 1, _dialect_warnings(broker)
            finally:
                stranger.close()

    run(scenario(), 30)


@pytest.mark.brokers("c-uvloop-pin0.5")
@pytest.mark.parametrize("side", ["client", "agent"])
def test_pinned_05_gives_a_09_peer_nothing(broker, zctx, side):
    """With --dialect 0.5, a 0.9 peer gets no reply at all and one "dialect" WARNING is
    logged, while 0.5 peers are served."""
    if side == "client":
        stranger = RawClient09(zctx, broker.client_addr)
        stranger.hello("0.9-client")
        for _ in range(5):
            stranger.send("Ping")
    else:
        stranger = RawAgent09(zctx, broker.agent_addr)
        stranger.hello("0.9-agent", 1, (("docker", "default"),))
        stranger.send("Pong")
    try:
        deadline = time.monotonic() + 5
        while not _dialect_warnings(broker):
            assert time.monotonic() < deadline, broker.log()[-3000:]
            time.sleep(0.02)
        assert_serving(zctx, broker.agent_addr, broker.client_addr)
        stranger.expect_silence(1.5, ())
        assert len(_dialect_warnings(broker)) == 1, _dialect_warnings(broker)
    finally:
        stranger.close()


@pytest.mark.brokers(*IMPL_CONFIGS)
def test_a_frame_of_the_other_dialect_is_answered_in_that_dialect(broker, zctx):
    """A client registered in one dialect that sends a frame of the other gets ``Unknown`` in
    the frame's dialect (the answer a client speaking that dialect understands: it says hello
    again), and is still served in its own.  The process-level fuzzer's oracle once expected
    every reply in the registered dialect (tests/fuzz/fuzz_process.py, ``received``)."""
    c05, c09 = RawClient(zctx, broker.client_addr), RawClient09(zctx, broker.client_addr)
    try:
        c05.hello("0.5-client")
        c09.hello("0.9-client")
        c05.recv_type("backend_update_containers")
        c09.recv_type("BackendUpdateEnvironments")
        c05.send_message({"@type": "Ping"})
        assert c05.recv() == {"@type": "Unknown"}
        c09.send_message({"type": "ping"})
        assert c09.recv() == {"type": "unknown"}
        c05.send("ping")
        assert c05.recv() == {"type": "pong"}
        c09.send("Ping")
        assert c09.recv() == {"@type": "Pong"}
        assert_serving(zctx, broker.agent_addr, broker.client_addr)
    finally:
        c05.close()
        c09.close()
