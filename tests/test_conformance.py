"""Conformance: the REAL INGInious 0.5 client and agent, through the broker, over real sockets.

The peers are ``inginious.client.client.Client`` and a scripted subclass of
``inginious.agent.Agent`` (see ``tests/peers/real.py``).  With ``FASTBACKEND_TEST_STOCK=1``
the same tests run against the stock backend; those marked ``stock_bug`` show where stock
is wrong and fastbackend must not be.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid

import pytest
from peers.broker import ALL_CONFIGS, IMPL_CONFIGS
from peers.raw import RawClient, new_job_message, pack
from peers.real import (
    FakeTask,
    Peers,
    crash,
    echo,
    finish,
    finish_then_stray,
    hold,
    run,
    ssh_then_hold,
    wait_containers,
    wait_until,
)

CRASH_AGENT_RESTARTED = ("crash", "Agent restarted")


# -- results travel intact --------------------------------------------------------------------
@pytest.mark.brokers(*ALL_CONFIGS)
def test_end_to_end_result_intact(broker):
    """A multi-MiB archive, unicode text and nested result fields arrive exactly as sent."""
    archive = random.Random(1).randbytes(3 * 1024 * 1024 + 17)
    upload = random.Random(2).randbytes(200_000)
    inputdata = {"q1": "print('héllo wörld 🐍')", "file": {"filename": "é.zip", "value": upload},
                 "choices": (1, 2, 3), "empty": ""}
    problems = {"q1": ("success", "Bien joué 👍"), "q2": ("failed", "Ça ne compile pas: ∑ ≠ ∏")}
    tests = {"t1": 1, "ü": (1, 2.5, None, True)}
    custom = {"nested": {"a": (1, "b", None), "é": True, "bytes": b"\x00\xff"}, "big": "x" * 70_000}
    stdout = "Résultat ✓ 🎉\n" * 1000
    stderr = "エラー: 失敗しました 💥\n"
    task = FakeTask(environment="env-ü", course_id="cours-é", task_id="tâche-1", network=True,
                    limits={"time": 12, "hard_time": 34, "memory": 256})

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("agent-ü", 1, ["env-ü"], finish(
                "failed", "Presque 😅", fields={
                    "grade": 87.5, "problems": problems, "tests": tests, "custom": custom,
                    "archive": archive, "stdout": stdout, "stderr": stderr}))
            client = await peers.ready_client("env-ü")
            got = await peers.run_job(client, task, inputdata=inputdata, launcher="lançeur ✈", debug=True)

            assert got.result == ("failed", "Presque 😅")
            assert got.grade == 87.5
            assert got.problems == problems
            assert got.tests == tests
            assert got.custom == custom
            assert type(got.archive) is bytes and got.archive == archive
            assert got.stdout == stdout and got.stderr == stderr

            # What the agent was given: every field of the client's job but the launcher.
            (job,) = agent.jobs
            assert isinstance(job.job_id, tuple) and len(job.job_id) == 2
            assert type(job.job_id[0]) is bytes and job.job_id[1] == peers.jobs[0].job_id
            assert job.course_id == "cours-é" and job.task_id == "tâche-1"
            assert job.inputdata == inputdata and job.environment == "env-ü"
            assert job.enable_network is True and job.debug is True
            assert (job.time_limit, job.hard_time_limit, job.mem_limit) == (12, 34, 256)

    run(scenario(), 60)


def test_agent_crash_result_forwarded(broker):
    """An agent failing inside new_job sends its own crash result; the client gets it."""

    async def scenario():
        async with Peers(broker) as peers:
            peers.agent("crasher", 1, ["default"], crash())
            client = await peers.ready_client("default")
            got = await peers.run_job(client)
            assert got.result[0] == "crash" and "unknown error" in got.result[1]

    run(scenario(), 30)


# -- many jobs -------------------------------------------------------------------------------
@pytest.mark.brokers(*ALL_CONFIGS)
def test_many_jobs_each_once_within_slots_and_environments(broker):
    """2000 jobs over 3 agents x slots x environments and 2 clients: each job exactly one result,
    the right one, never beyond an agent's slots, never on an agent lacking its environment."""
    n_jobs = int(os.environ.get("FASTBACKEND_TEST_MANY_JOBS", "2000"))
    layout = {"a1": (1, ["e0", "e1"]), "a2": (2, ["e1", "e2"]), "a3": (4, ["e0", "e2", "e3"])}
    environments = ["e0", "e1", "e2", "e3"]
    rng = random.Random(3)

    async def scenario():
        async with Peers(broker) as peers:
            agents = [peers.agent(name, slots, envs, echo(delay=lambda: rng.choice((0, 0, 0.001, 0.003))))
                      for name, (slots, envs) in layout.items()]
            clients = [await peers.ready_client(*environments) for _ in range(2)]
            handles = []
            for i in range(n_jobs):
                env = environments[i % len(environments)]
                task = FakeTask(environment=env, course_id="course", task_id=f"task{i % 7}")
                handles.append(peers.submit(clients[i % 2], task, inputdata={"n": i, "client": i % 2}))
            await asyncio.wait_for(asyncio.gather(*(h.done for h in handles)), 120)

            for i, handle in enumerate(handles):
                got = handle.done.result()
                assert got.result == ("success", "echo"), (i, got.result)
                assert got.custom["inputdata"] == {"n": i, "client": i % 2}
                assert got.custom["environment"] == environments[i % len(environments)]
            for agent in agents:
                assert agent.max_running <= agent.slots, (agent.name, agent.max_running)
                assert all(job.environment in agent.environments for job in agent.jobs), agent.name
                # Heartbeats kept flowing under load (the agent restarts itself after 10 s without).
                gaps = agent.ping_gaps()
                assert not gaps or max(gaps) < 3.0, (agent.name, max(gaps))
            # The slot check above can see concurrency: some agent did run several jobs at once.
            assert max(agent.max_running for agent in agents) > 1
            dispatched = [job.job_id[1] for agent in agents for job in agent.jobs]
            assert len(dispatched) == n_jobs and len(set(dispatched)) == n_jobs
            # Every job got exactly one callback: a duplicate sent before this job's result
            # would already be there (or would have killed the client's receive loop).
            await peers.run_job(clients[0], "e0", inputdata={"n": -1, "client": 0})
            assert all(len(h.calls) == 1 for h in handles)

    run(scenario(), 150)


def test_jobs_of_one_environment_start_in_arrival_order(broker):
    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("one-slot", 1, ["default"], echo())
            client = await peers.ready_client("default")
            handles = [peers.submit(client, inputdata={"n": i}) for i in range(50)]
            await asyncio.wait_for(asyncio.gather(*(h.done for h in handles)), 30)
            assert [job.inputdata["n"] for job in agent.jobs] == list(range(50))

    run(scenario(), 40)


# -- kills -----------------------------------------------------------------------------------
@pytest.mark.brokers(*ALL_CONFIGS)
def test_kill_waiting_job(broker):
    """Killing a job that waits for a slot answers ("killed", ...) at once; it never runs."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("busy", 1, ["default"], hold())
            client = await peers.ready_client("default")
            running = peers.submit(client)
            await wait_until(lambda: agent.running, 5, "the first job to run")
            waiting = peers.submit(client)
            await asyncio.sleep(0)  # let the client send the job before the kill
            client.kill_job(waiting.job_id)
            got = await waiting.result(5)
            assert got.result == ("killed", "You killed the job")
            assert (got.grade, got.problems, got.tests, got.custom, got.archive) == (0.0, {}, {}, {}, None)
            assert [job.job_id[1] for job in agent.jobs] == [running.job_id]
            # Free the slot: the killed job must not be dispatched after all.
            client.kill_job(running.job_id)
            await running.result(5)
            agent.behaviour = finish()
            await peers.run_job(client)
            assert waiting.job_id not in [job.job_id[1] for job in agent.jobs]

    run(scenario(), 30)


@pytest.mark.brokers(*ALL_CONFIGS)
def test_kill_running_job(broker):
    """Killing a running job reaches the agent's kill_job; the agent's own result is what the client gets."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("killable", 2, ["default"],
                                hold("killed", "stopped by the agent", custom={"why": "kill"}, stdout="bye"))
            client = await peers.ready_client("default")
            job = peers.submit(client)
            await wait_until(lambda: agent.running, 5, "the job to run")
            client.kill_job(job.job_id)
            got = await job.result(5)
            (killed,) = agent.kill_requests
            assert type(killed[0]) is bytes and killed[1] == job.job_id
            assert got.result == ("killed", "stopped by the agent")
            assert got.custom == {"why": "kill"} and got.stdout == "bye"

    run(scenario(), 30)


def test_kill_unknown_job_is_logged_and_harmless(broker):
    async def scenario():
        async with Peers(broker) as peers:
            peers.agent("a", 1, ["default"], finish())
            client = await peers.ready_client("default")
            bogus = str(uuid.uuid4())
            client.kill_job(bogus)
            await wait_until(lambda: broker.log_lines("WARNING", bogus), 5, "a warning about the kill")
            assert (await peers.run_job(client)).result == ("success", "ok")

    run(scenario(), 30)


# -- queue snapshot --------------------------------------------------------------------------
@pytest.mark.brokers(*ALL_CONFIGS)
def test_queue_snapshot_shapes(broker):
    """client.get_job_queue_snapshot() after the periodic ClientGetQueue has the exact tuple shapes."""
    task = FakeTask(environment="default", course_id="c1", task_id="t1", limits={"time": 17, "memory": 50})

    async def scenario():
        async with Peers(broker) as peers:
            peers.agent("snap-agent", 1, ["default"], hold())
            observer = await peers.ready_client("default", queue_update=1)
            other = await peers.ready_client("default")
            before = int(time.time())
            running = peers.submit(observer, task, launcher="me")
            await wait_until(lambda: peers.agents[0].running, 5, "the first job to run")
            waiting_mine = peers.submit(observer, task, launcher="me-too")
            waiting_other = peers.submit(other, task, launcher="them")
            expected_waiting = {waiting_mine.job_id, waiting_other.job_id}

            def snapshot():
                jobs_running, jobs_waiting = observer.get_job_queue_snapshot()
                if jobs_running and {w[0] for w in jobs_waiting or ()} == expected_waiting:
                    return jobs_running, jobs_waiting
                return None

            jobs_running, jobs_waiting = await wait_until(snapshot, 6, "a complete queue snapshot")
            after = int(time.time())
            (r,) = jobs_running
            assert len(r) == 7
            job_id, mine, agent_name, info, launcher, started_at, max_end = r
            assert (job_id, mine, agent_name, info, launcher) == (
                running.job_id, True, "snap-agent", "c1/t1", "me")
            assert type(started_at) is int and type(max_end) is int
            assert before <= started_at <= after and max_end == started_at + 17
            assert [len(w) for w in jobs_waiting] == [5, 5]
            assert jobs_waiting == (
                (waiting_mine.job_id, True, "c1/t1", "me-too", 17),
                (waiting_other.job_id, False, "c1/t1", "them", 17),
            )
            # The client's derived per-job info works on these tuples too.
            assert observer.get_job_queue_info(waiting_mine.job_id) == (0, 17)
            for handle in (running, waiting_mine):
                observer.kill_job(handle.job_id)
            other.kill_job(waiting_other.job_id)
            await asyncio.wait_for(asyncio.gather(running.done, waiting_mine.done, waiting_other.done), 5)

    run(scenario(), 30)


# -- agent failures ------------------------------------------------------------------------
def test_silent_agent_jobs_crash_after_missed_pongs(broker):
    """An agent that stops answering is dropped after ~6-7 s; its running jobs end with
    ("crash", "Agent restarted"); another agent keeps serving."""

    async def scenario():
        async with Peers(broker) as peers:
            frozen = peers.agent("frozen", 2, ["default"], hold())
            client = await peers.ready_client("default")
            jobs = [peers.submit(client) for _ in range(2)]
            await wait_until(lambda: len(frozen.running) == 2, 5, "both jobs to run")
            await wait_until(lambda: frozen.ping_times, 3, "a first ping")
            frozen.stop_answering()
            stopped = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*(j.done for j in jobs)), 15)
            elapsed = time.monotonic() - stopped
            assert all(r.result == CRASH_AGENT_RESTARTED for r in results)
            assert all((r.grade, r.archive) == (0.0, None) for r in results)
            assert 4.5 <= elapsed <= 9.5, elapsed
            peers.agent("healthy", 1, ["default"], finish())
            await wait_containers(client, "default")
            assert (await peers.run_job(client)).result == ("success", "ok")

    run(scenario(), 40)


def test_agent_hello_again_crashes_its_running_jobs(broker):
    """An agent that says hello again from the same socket restarted: its jobs end with
    ("crash", "Agent restarted"), and it is registered afresh."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("restarting", 2, ["default"], hold())
            client = await peers.ready_client("default")
            jobs = [peers.submit(client) for _ in range(2)]
            await wait_until(lambda: len(agent.running) == 2, 5, "both jobs to run")
            agent.behaviour = finish("success", "after restart")
            await agent.say_hello_again()
            results = await asyncio.wait_for(asyncio.gather(*(j.done for j in jobs)), 5)
            assert all(r.result == CRASH_AGENT_RESTARTED for r in results)
            # Both slots are free again on the re-registered agent.
            again = await asyncio.wait_for(asyncio.gather(*(peers.run_job(client) for _ in range(2))), 10)
            assert all(r.result == ("success", "after restart") for r in again)

    run(scenario(), 30)


@pytest.mark.stock_bug("environments of departed agents stay advertised")
def test_departed_agent_environments_are_withdrawn(broker):
    """When an agent is dropped, environments no remaining agent offers leave the list pushed to clients."""

    async def scenario():
        async with Peers(broker) as peers:
            leaving = peers.agent("leaving", 1, ["shared", "only-here"], finish())
            peers.agent("staying", 1, ["shared"], finish())
            client = await peers.ready_client("shared", "only-here")
            await wait_until(lambda: leaving.ping_times, 3, "a first ping")
            leaving.stop_answering()
            await wait_until(lambda: "only-here" not in client.get_available_containers(), 12,
                             "only-here to be withdrawn")
            assert set(client.get_available_containers()) == {"shared"}
            got = await peers.run_job(client, "only-here")
            assert got.result == ("crash", "Environment not available.")
            assert (await peers.run_job(client, "shared")).result == ("success", "ok")

    run(scenario(), 40)


# -- ssh debug, environments, registration -------------------------------------------------
@pytest.mark.brokers(*IMPL_CONFIGS)
def test_ssh_debug_info_relayed(broker):
    async def scenario():
        async with Peers(broker) as peers:
            ssh = ssh_then_hold("grader-ü.example", 2222, "pässwörd 🔑")
            agent = peers.agent("ssh-agent", 1, ["default"], ssh)
            client = await peers.ready_client("default")
            job = peers.submit(client, debug="ssh", ssh=True)
            assert await asyncio.wait_for(job.ssh, 5) == ("grader-ü.example", 2222, "pässwörd 🔑")
            (sent,) = agent.jobs
            assert sent.debug == "ssh"
            client.kill_job(job.job_id)
            assert (await job.result(5)).result == ("killed", "ssh session ended")
            assert job.ssh_calls == [("grader-ü.example", 2222, "pässwörd 🔑")]

    run(scenario(), 30)


@pytest.mark.brokers(*IMPL_CONFIGS)
def test_unregistered_client_is_answered_unknown(broker, zctx):
    """Anything but client_hello from an unknown identity gets `unknown`; after hello it is served."""
    raw = RawClient(zctx, broker.client_addr)
    try:
        raw.socket.send(pack(new_job_message(str(uuid.uuid4()), "x")))
        assert raw.recv(5) == {"type": "unknown"}
        raw.kill(str(uuid.uuid4()))
        assert raw.recv(5) == {"type": "unknown"}
        raw.hello()
        assert raw.recv(5)["type"] == "backend_update_containers"
        raw.send("ping")
        assert raw.recv(5) == {"type": "pong"}
    finally:
        raw.close()


def test_real_client_recovers_after_broker_restart(broker):
    """A restarted broker answers the old client `unknown`: the client aborts its pending
    jobs ("Backend unavailable"), says hello again, and its next jobs work."""

    async def scenario():
        async with Peers(broker) as peers:
            old_agent = peers.agent("before", 1, ["default"], hold())
            client = await peers.ready_client("default")
            pending = peers.submit(client)
            await wait_until(lambda: old_agent.running, 5, "the job to run")
            await asyncio.get_running_loop().run_in_executor(None, broker.restart)
            old_agent.close()
            got = await pending.result(15)
            assert got.result == ("crash", "Backend unavailable, retry later")
            peers.agent("after", 1, ["default"], finish("success", "new broker"))
            await wait_containers(client, "default", timeout=10)
            assert (await peers.run_job(client)).result == ("success", "new broker")

    run(scenario(), 60)


@pytest.mark.brokers(*IMPL_CONFIGS)
def test_environment_that_appears_later(broker):
    """A job for an environment nobody offers fails at the client; once an agent offering it
    says hello, the client receives the new list and the job runs."""

    async def scenario():
        async with Peers(broker) as peers:
            peers.agent("base", 1, ["base"], finish())
            client = await peers.ready_client("base")
            early = await peers.run_job(client, "late-env", timeout=1)
            assert early.result == ("crash", "Environment not available.")
            peers.agent("late", 1, ["late-env"], finish("success", "late"))
            await wait_containers(client, "late-env", "base", timeout=5)
            assert (await peers.run_job(client, "late-env")).result == ("success", "late")

    run(scenario(), 30)


@pytest.mark.brokers(*IMPL_CONFIGS)
@pytest.mark.stock_bug("a stray message after a job's result kills the real client's receive loop")
def test_no_message_reaches_client_after_a_jobs_result(broker):
    """agent_job_started / agent_job_ssh_debug sent after agent_job_done must not reach the
    client (the real client's receive loop dies on a message for a finished job)."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("stray", 1, ["default"], finish_then_stray())
            client = await peers.ready_client("default")
            first = await peers.run_job(client, debug="ssh", ssh=True)
            assert first.result == ("success", "done before the strays")
            agent.behaviour = finish("success", "second")
            assert (await peers.run_job(client, timeout=5)).result == ("success", "second")

    run(scenario(), 30)


def test_agents_are_pinged_every_second(broker):
    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("pinged", 1, ["default"], finish())
            client = await peers.ready_client("default")
            await wait_until(lambda: len(agent.ping_times) >= 4, 8, "4 pings")
            gaps = agent.ping_gaps()
            # About one a second on average; a late tick may be followed by an on-time one
            # (a fixed grid), so single gaps are only bounded loosely.
            assert 0.8 <= sum(gaps) / len(gaps) <= 1.3, gaps
            assert max(gaps) < 2.0, gaps
            # The client's own pings are answered too (it reconnects after 10 missed pongs).
            assert client._ping_count <= 1

    run(scenario(), 20)


def test_real_peers_use_the_msgpack_adapter():
    """The real 0.5 message classes round-trip through the adapter to the bytes 0.6 produced."""
    import msgpack
    from inginious.common.message_meta import MessageMeta
    from inginious.common.messages import AgentJobDone, ClientHello

    frame = ClientHello("é").dump()
    assert frame == msgpack.packb({"name": "é", "type": "client_hello"}, use_bin_type=True)
    done = AgentJobDone((b"\x00id", "j"), ("success", "ü"), 1.0, {}, {}, {}, b"\xff", "o", None)
    loaded = MessageMeta.load(done.dump())
    assert loaded.job_id == (b"\x00id", "j") and loaded.archive == b"\xff"
    assert loaded.result == ("success", "ü")
