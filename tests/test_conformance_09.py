"""Conformance, dialect 0.9: the REAL INGInious 0.9.2 client and agent, through the broker, over real sockets.

The peers are 0.9.2's ``inginious.client.client.Client`` and a scripted subclass of its
``inginious.agent.Agent`` (``tests/peers/real09.py``), plus raw 0.9 peers
(``tests/peers/raw09.py``) for what the real ones cannot send or show.  This module runs
in the 0.9 test run only (``.peers/0.9`` first on ``PYTHONPATH``; see ``tests/run.sh``).
With ``FASTBACKEND_TEST_STOCK=1`` the same tests run against the stock 0.9.2 backend;
those marked ``stock_bug`` show where stock is wrong and fastbackend must not be.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import pytest
from peers.broker import ALL_CONFIGS, IMPL_CONFIGS
from peers.raw09 import RawAgent09, RawClient09, assert_serving_09, pack
from peers.real09 import (
    DEFAULT_ENV,
    FakeTask,
    Peers,
    crash,
    echo,
    environments_of,
    finish,
    finish_then_stray,
    hold,
    run,
    ssh_then_hold,
    wait_environments,
    wait_until,
)

#: Exactly what stock 0.9.2 sends for a job whose agent was lost (note the three None).
AGENT_LOST = (("crash", "Agent restarted"), 0.0, {}, {}, {}, "", None, None, None)
#: The client's own result for its pending jobs when the backend answers Unknown.
BACKEND_UNAVAILABLE = (("crash", "Backend unavailable, retry later"), 0.0, {}, {}, {}, "", None, "", "")


async def off_loop(func, *args, **kwargs):
    """Run a blocking raw-peer call in a thread, so the real peers on this loop keep running."""
    return await asyncio.to_thread(func, *args, **kwargs)


def done_frame(job_id: str, result: tuple[str, str], state: str = "", stdout: str | None = "",
               stderr: str | None = "") -> dict:
    """A BackendJobDone as stock 0.9.2 builds it for results of its own (duplicate, kill)."""
    return {"@type": "BackendJobDone", "job_id": job_id, "result": result, "grade": 0.0, "problems": {},
            "tests": {}, "custom": {}, "state": state, "archive": None, "stdout": stdout, "stderr": stderr}


# -- results travel intact --------------------------------------------------------------------
@pytest.mark.brokers(*ALL_CONFIGS, "c-uvloop-pin0.9", "py-asyncio-pin0.9")
def test_end_to_end_result_intact(broker):
    """A multi-MiB archive, unicode text, state and nested fields arrive exactly as sent;
    the agent gets every field of the client's job but priority and launcher."""
    archive = random.Random(1).randbytes(3 * 1024 * 1024 + 17)
    upload = random.Random(2).randbytes(200_000)
    inputdata = {"q1": "print('héllo wörld 🐍')", "file": {"filename": "é.zip", "value": upload},
                 "choices": (1, 2, 3), "empty": "", "@state": "état précédent"}
    problems = {"q1": ("success", "Bien joué 👍"), "q2": ("failed", "Ça ne compile pas: ∑ ≠ ∏")}
    tests = {"t1": 1, "ü": (1, 2.5, None, True)}
    custom = {"nested": {"a": (1, "b", None), "é": True, "bytes": b"\x00\xff"}, "big": "x" * 70_000}
    stdout = "Résultat ✓ 🎉\n" * 1000
    stderr = "エラー: 失敗しました 💥\n"
    task_problems = {"q1": {"type": "code", "name": "Qüestion", "limits": (1, 2)}, "q2": {"type": "match"}}
    parameters = {"limits": {"time": 12, "hard_time": 34, "memory": 256}, "network_grading": True,
                  "run_cmd": "ünïcode", "ssh_allowed": None}
    task = FakeTask(environment=("docker-é", "env-ü"), course_id="cours-é", task_id="tâche-1",
                    problems=task_problems, parameters=parameters)

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("agent-ü", 1, [("docker-é", "env-ü")], finish(
                "failed", "Presque 😅", fields={
                    "grade": 87.5, "problems": problems, "tests": tests, "custom": custom,
                    "state": "nouvel état ✓", "archive": archive, "stdout": stdout, "stderr": stderr}))
            client = await peers.ready_client(("docker-é", "env-ü"))
            got = await peers.run_job(client, task, inputdata=inputdata, launcher="lançeur ✈", debug=True,
                                      priority=3)

            assert got.result == ("failed", "Presque 😅")
            assert got.grade == 87.5
            assert got.problems == problems
            assert got.tests == tests
            assert got.custom == custom
            assert got.state == "nouvel état ✓"
            assert type(got.archive) is bytes and got.archive == archive
            assert got.stdout == stdout and got.stderr == stderr

            (job,) = agent.jobs
            assert job.job_id == peers.jobs[0].job_id and type(job.job_id) is str
            assert (job.course_id, job.task_id) == ("cours-é", "tâche-1")
            assert job.task_problems == task_problems
            assert job.inputdata == inputdata
            assert (job.environment_type, job.environment) == ("docker-é", "env-ü")
            assert job.environment_parameters == parameters
            assert job.debug is True

    run(scenario(), 60)


def test_agent_crash_result_forwarded(broker):
    """An agent failing inside new_job sends its own crash result (with the job's previous
    state); the client gets it."""

    async def scenario():
        async with Peers(broker) as peers:
            peers.agent("crasher", 1, [DEFAULT_ENV], crash())
            client = await peers.ready_client(DEFAULT_ENV)
            got = await peers.run_job(client, inputdata={"@state": "before the crash"})
            assert got.result[0] == "crash" and "unknown error" in got.result[1]
            assert got.state == "before the crash"

    run(scenario(), 30)


# -- many jobs, order, priorities --------------------------------------------------------------
@pytest.mark.brokers(*ALL_CONFIGS)
def test_many_jobs_each_once_within_slots_and_environments(broker):
    """2000 jobs of mixed priorities over 3 agents x slots x (type, name) environments and 2
    clients: each job exactly one result, the right one, never beyond an agent's slots, never
    on an agent lacking its (type, name)."""
    n_jobs = 2000
    environments = [("docker", "e0"), ("docker", "e1"), ("mcq", "e0"), ("docker", "e2")]
    layout = {"a1": (1, environments[:2]), "a2": (2, environments[1:3]),
              "a3": (4, [environments[0], environments[2], environments[3]])}
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
                handles.append(peers.submit(clients[i % 2], task, inputdata={"n": i, "client": i % 2},
                                            priority=rng.choice((0, 1, 1, 2))))
            await asyncio.wait_for(asyncio.gather(*(h.done for h in handles)), 120)

            for i, handle in enumerate(handles):
                got = handle.done.result()
                assert got.result == ("success", "echo"), (i, got.result)
                assert got.custom["inputdata"] == {"n": i, "client": i % 2}
                assert got.custom["environment"] == environments[i % len(environments)]
            for agent in agents:
                assert agent.max_running <= agent.slots, (agent.name, agent.max_running)
                offered = all(agent.offers(job.environment_type, job.environment) for job in agent.jobs)
                assert offered, agent.name
                gaps = agent.ping_gaps()
                assert not gaps or max(gaps) < 3.0, (agent.name, max(gaps))
            assert max(agent.max_running for agent in agents) > 1
            dispatched = [job.job_id for agent in agents for job in agent.jobs]
            assert len(dispatched) == n_jobs and len(set(dispatched)) == n_jobs
            await peers.run_job(clients[0], environments[0], inputdata={"n": -1, "client": 0})
            assert all(len(h.calls) == 1 for h in handles)

    run(scenario(), 150)


def test_jobs_of_one_environment_and_priority_start_in_arrival_order(broker):
    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("one-slot", 1, [DEFAULT_ENV], echo())
            client = await peers.ready_client(DEFAULT_ENV)
            handles = [peers.submit(client, inputdata={"n": i}) for i in range(50)]
            await asyncio.wait_for(asyncio.gather(*(h.done for h in handles)), 30)
            assert [job.inputdata["n"] for job in agent.jobs] == list(range(50))

    run(scenario(), 40)


async def _wait_queued(observer, job_ids, timeout: float = 20.0) -> None:
    """Wait until the observer's queue snapshot lists all ``job_ids`` as waiting (they reached
    the broker, in the order the client sent them)."""
    wanted = set(job_ids)

    def queued():
        _, waiting = observer.get_job_queue_snapshot()
        return waiting is not None and wanted <= {w[0] for w in waiting}

    await wait_until(queued, timeout, f"{len(wanted)} jobs in the queue snapshot", interval=0.05)


@pytest.mark.brokers(*ALL_CONFIGS)
def test_priority_zero_overtakes_a_thousand_waiting_jobs(broker):
    """With the only slot busy, 1,000 priority-1 jobs then one priority-0 job: the priority-0
    job runs next, then the 1,000 in arrival order."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("one-slot", 1, [DEFAULT_ENV], hold())
            client = await peers.ready_client(DEFAULT_ENV, queue_update=1)
            first = peers.submit(client, inputdata={"n": "first"})
            await wait_until(lambda: agent.running, 5, "the first job to run")
            low = [peers.submit(client, inputdata={"n": i}, priority=1) for i in range(1000)]
            urgent = peers.submit(client, inputdata={"n": "urgent"}, priority=0)
            await _wait_queued(client, [h.job_id for h in (*low, urgent)])
            agent.behaviour = echo()
            client.kill_job(first.job_id)
            await asyncio.wait_for(asyncio.gather(*(h.done for h in (first, urgent, *low))), 60)
            order = [job.inputdata["n"] for job in agent.jobs]
            assert order == ["first", "urgent", *range(1000)], order[:5]

    run(scenario(), 90)


@pytest.mark.brokers(*IMPL_CONFIGS)
def test_agent_with_several_environments_takes_the_best_waiting_job(broker):
    """A free slot of an agent offering several environments goes to the waiting job with the
    lowest (priority, arrival) among them, whichever environment it is in."""
    env_a, env_b = ("docker", "a"), ("docker", "b")

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("two-envs", 1, [env_a, env_b], hold())
            client = await peers.ready_client(env_a, env_b, queue_update=1)
            first = peers.submit(client, env_a, inputdata={"n": "first"})
            await wait_until(lambda: agent.running, 5, "the first job to run")
            waiting = [peers.submit(client, env, inputdata={"n": name}, priority=priority)
                       for env, name, priority in ((env_a, "a1", 1), (env_b, "b1", 1), (env_b, "b0", 0),
                                                   (env_a, "a0", 0), (env_b, "b2", 2))]
            await _wait_queued(client, [h.job_id for h in waiting])
            agent.behaviour = echo()
            client.kill_job(first.job_id)
            await asyncio.wait_for(asyncio.gather(*(h.done for h in waiting)), 20)
            assert [job.inputdata["n"] for job in agent.jobs] == ["first", "b0", "a0", "a1", "b1", "b2"]

    run(scenario(), 40)


@pytest.mark.brokers(*IMPL_CONFIGS)
def test_environment_types_are_distinct_environments(broker):
    """("mcq", "default") and ("docker", "default") are two environments: each job goes only
    to an agent offering its (type, name); a type nobody offers is not available."""
    mcq, docker = ("mcq", "default"), ("docker", "default")

    async def scenario():
        async with Peers(broker) as peers:
            mcq_agent = peers.agent("mcq-agent", 2, [mcq], echo(delay=0.002))
            docker_agent = peers.agent("docker-agent", 2, [docker], echo(delay=0.002))
            client = await peers.ready_client(mcq, docker)
            assert {k: sorted(v) for k, v in client.get_available_environments().items()} == {
                "mcq": ["default"], "docker": ["default"]}
            handles = [peers.submit(client, (mcq, docker)[i % 2], inputdata={"n": i}) for i in range(40)]
            await asyncio.wait_for(asyncio.gather(*(h.done for h in handles)), 30)
            assert sorted(job.inputdata["n"] for job in mcq_agent.jobs) == list(range(0, 40, 2))
            assert sorted(job.inputdata["n"] for job in docker_agent.jobs) == list(range(1, 40, 2))
            assert all(job.environment_type == "mcq" for job in mcq_agent.jobs)
            assert all(job.environment_type == "docker" for job in docker_agent.jobs)
            kata = await peers.run_job(client, ("kata", "default"), timeout=2)
            assert kata.result == ("crash", "Environment not available.")

    run(scenario(), 40)


# -- kills -----------------------------------------------------------------------------------
@pytest.mark.brokers(*ALL_CONFIGS)
def test_kill_waiting_job(broker):
    """Killing a waiting job answers ("killed", "You killed the job") at once, with the state
    of its inputdata["@state"] and stock's other values; it never runs."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("busy", 1, [DEFAULT_ENV], hold())
            client = await peers.ready_client(DEFAULT_ENV)
            running = peers.submit(client)
            await wait_until(lambda: agent.running, 5, "the first job to run")
            waiting = peers.submit(client, inputdata={"@state": "saved état", "q": 1})
            no_state = peers.submit(client, inputdata={"q": 2})
            await asyncio.sleep(0)  # let the client send the jobs before the kills
            client.kill_job(waiting.job_id)
            client.kill_job(no_state.job_id)
            got = await waiting.result(5)
            assert tuple(got) == (
                ("killed", "You killed the job"), 0.0, {}, {}, {}, "saved état", None, "", "")
            assert tuple(await no_state.result(5)) == (
                ("killed", "You killed the job"), 0.0, {}, {}, {}, "", None, "", "")
            assert [job.job_id for job in agent.jobs] == [running.job_id]
            client.kill_job(running.job_id)
            await running.result(5)
            agent.behaviour = finish()
            await peers.run_job(client)
            dispatched = [job.job_id for job in agent.jobs]
            assert waiting.job_id not in dispatched and no_state.job_id not in dispatched

    run(scenario(), 30)


@pytest.mark.brokers(*IMPL_CONFIGS)
@pytest.mark.stock_bug("a killed waiting job stays in its heap: a resubmitted id runs with the OLD inputdata")
def test_killed_waiting_job_leaves_nothing_behind(broker):
    """A job id killed while waiting and submitted again runs once, with the NEW inputdata."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("busy", 1, [DEFAULT_ENV], hold())
            client = await peers.ready_client(DEFAULT_ENV)
            running = peers.submit(client)
            await wait_until(lambda: agent.running, 5, "the first job to run")
            job_id = str(uuid.uuid4())
            old = peers.submit(client, inputdata={"version": "old"}, job_id=job_id)
            await asyncio.sleep(0.05)
            client.kill_job(job_id)
            assert (await old.result(5)).result == ("killed", "You killed the job")
            new = peers.submit(client, inputdata={"version": "new"}, job_id=job_id)
            agent.behaviour = echo()
            client.kill_job(running.job_id)
            got = await new.result(5)
            assert got.custom["inputdata"] == {"version": "new"}
            assert [job.inputdata for job in agent.jobs if job.job_id == job_id] == [{"version": "new"}]

    run(scenario(), 30)


@pytest.mark.brokers(*ALL_CONFIGS)
def test_kill_running_job(broker):
    """Killing a running job sends BackendKillJob(job_id, state) to its agent; the agent's own
    result (state included) is what the client gets."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("killable", 2, [DEFAULT_ENV],
                                hold("killed", "stopped by the agent", custom={"why": "kill"}, stdout="bye"))
            client = await peers.ready_client(DEFAULT_ENV)
            job = peers.submit(client, inputdata={"@state": "état 1"})
            await wait_until(lambda: agent.running, 5, "the job to run")
            client.kill_job(job.job_id)
            got = await job.result(5)
            (kill,) = agent.kill_requests
            assert (kill.job_id, kill.state) == (job.job_id, "état 1")
            assert got.result == ("killed", "stopped by the agent")
            assert got.custom == {"why": "kill"} and got.stdout == "bye" and got.state == "état 1"

    run(scenario(), 30)


def test_kill_unknown_job_is_logged_and_harmless(broker):
    async def scenario():
        async with Peers(broker) as peers:
            peers.agent("a", 1, [DEFAULT_ENV], finish())
            client = await peers.ready_client(DEFAULT_ENV)
            bogus = str(uuid.uuid4())
            client.kill_job(bogus)
            await wait_until(lambda: broker.log_lines("WARNING", bogus), 5, "a warning about the kill")
            assert (await peers.run_job(client)).result == ("success", "ok")

    run(scenario(), 30)


@pytest.mark.brokers(*IMPL_CONFIGS)
@pytest.mark.parametrize("where", ["waiting", "running"])
def test_kill_from_another_client(broker, zctx, where):
    """Client B kills client A's job: A gets the result, B gets nothing."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("busy", 1, [DEFAULT_ENV], hold())
            owner = await peers.ready_client(DEFAULT_ENV)
            other = RawClient09(zctx, broker.client_addr)
            try:
                other.hello("killer")
                await off_loop(other.recv_type, "BackendUpdateEnvironments")
                blocker = peers.submit(owner) if where == "waiting" else None
                if blocker is not None:
                    await wait_until(lambda: agent.running, 5, "the blocking job to run")
                job = peers.submit(owner, inputdata={"@state": "s"})
                if where == "running":
                    await wait_until(lambda: agent.running, 5, "the job to run")
                else:
                    await asyncio.sleep(0.05)
                other.kill(job.job_id)
                got = await job.result(5)
                if where == "waiting":
                    assert got.result == ("killed", "You killed the job") and got.state == "s"
                    assert job.job_id not in [j.job_id for j in agent.jobs]
                    owner.kill_job(blocker.job_id)
                    await blocker.result(5)
                else:
                    assert [k.job_id for k in agent.kill_requests] == [job.job_id]
                    assert got.result == ("killed", "killed by the agent") and got.state == "s"
                await off_loop(other.expect_silence, 0.5)
            finally:
                other.close()

    run(scenario(), 30)


# -- duplicate job ids ----------------------------------------------------------------------
@pytest.mark.brokers(*IMPL_CONFIGS)
@pytest.mark.parametrize("sender", ["same-client", "other-client"])
@pytest.mark.parametrize("where", ["waiting", "running"])
def test_duplicate_job_id_is_answered_crash(broker, zctx, where, sender):
    """A job id already waiting or running, submitted again by the same or another client, is
    answered ("crash", "Duplicate job id") with stock's exact values, to the sender only; the
    first job runs unaffected, with its own inputdata."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("agent", 1, [DEFAULT_ENV], hold(keep_state=False))
            owner = RawClient09(zctx, broker.client_addr)
            dup = owner if sender == "same-client" else RawClient09(zctx, broker.client_addr)
            try:
                for raw in {id(owner): owner, id(dup): dup}.values():
                    raw.hello()
                    await off_loop(raw.wait_environments, DEFAULT_ENV)
                job_id = str(uuid.uuid4())
                if where == "waiting":
                    owner.new_job("blocker")
                    await wait_until(lambda: agent.running, 5, "the blocking job to run")
                owner.new_job(job_id, inputdata={"who": "first"})
                if where == "running":
                    await wait_until(lambda: job_id in agent.running, 5, "the first job to run")
                else:
                    await asyncio.sleep(0.1)
                dup.new_job(job_id, inputdata={"who": "duplicate"})
                got = await off_loop(dup.recv_type, "BackendJobDone", 5)
                assert got == done_frame(job_id, ("crash", "Duplicate job id"))
                if dup is not owner:  # (the owner's own job may announce its start meanwhile)
                    await off_loop(owner.expect_silence, 0.3, ("Ping", "Pong", "BackendJobStarted"))
                agent.behaviour = finish("success", "after")
                if where == "waiting":
                    owner.kill("blocker")
                    assert (await off_loop(owner.recv_type, "BackendJobDone", 5))["job_id"] == "blocker"
                    await wait_until(lambda: job_id in [j.job_id for j in agent.jobs], 5, "the first job")
                else:
                    owner.kill(job_id)
                first = await off_loop(owner.recv_type, "BackendJobDone", 5)
                assert first["job_id"] == job_id and first["result"] in (
                    ("killed", "killed by the agent"), ("success", "after"))
                assert [j.inputdata for j in agent.jobs if j.job_id == job_id] == [{"who": "first"}]
                await off_loop(dup.expect_silence, 0.3)
            finally:
                owner.close()
                if dup is not owner:
                    dup.close()

    run(scenario(), 30)


def test_duplicate_job_id_from_another_real_client(broker):
    """The real client of the second sender gets the crash through its callback."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("agent", 1, [DEFAULT_ENV], hold())
            first_client = await peers.ready_client(DEFAULT_ENV)
            second_client = await peers.ready_client(DEFAULT_ENV)
            first = peers.submit(first_client, inputdata={"who": "first"})
            await wait_until(lambda: agent.running, 5, "the first job to run")
            second = peers.submit(second_client, inputdata={"who": "second"}, job_id=first.job_id)
            got = await second.result(5)
            assert tuple(got) == (("crash", "Duplicate job id"), 0.0, {}, {}, {}, "", None, "", "")
            first_client.kill_job(first.job_id)
            assert (await first.result(5)).result == ("killed", "killed by the agent")
            assert [job.inputdata for job in agent.jobs] == [{"who": "first"}]

    run(scenario(), 30)


# -- queue snapshot --------------------------------------------------------------------------
@pytest.mark.brokers(*ALL_CONFIGS)
def test_queue_snapshot_shapes(broker):
    """client.get_job_queue_snapshot() after the periodic ClientGetQueue has the exact tuple
    shapes; the time estimate is environment_parameters["limits"]["time"], or -1 without it."""
    task = FakeTask(course_id="c1", task_id="t1", parameters={"limits": {"time": 17, "memory": 50}})
    no_limit = FakeTask(course_id="c2", task_id="t2", parameters={"network_grading": False})

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("snap-agent", 1, [DEFAULT_ENV], hold())
            observer = await peers.ready_client(DEFAULT_ENV, queue_update=1)
            other = await peers.ready_client(DEFAULT_ENV)
            before = int(time.time())
            running = peers.submit(observer, task, launcher="me")
            await wait_until(lambda: agent.running, 5, "the first job to run")
            waiting_mine = peers.submit(observer, task, launcher="me-too", priority=2)
            await asyncio.sleep(0.05)
            waiting_other = peers.submit(other, no_limit, launcher="them", priority=0)
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
            job_id, mine, agent_name, info, launcher, started_at, estimate = r
            assert (job_id, mine, agent_name, info, launcher, estimate) == (
                running.job_id, True, "snap-agent", "c1/t1", "me", 17)
            assert type(started_at) is int and before <= started_at <= after
            # Waiting jobs in arrival order (not priority order), as stock lists them.
            assert jobs_waiting == (
                (waiting_mine.job_id, True, "c1/t1", "me-too", 17),
                (waiting_other.job_id, False, "c2/t2", "them", -1),
            )
            assert observer.get_job_queue_info(waiting_mine.job_id) == (0, 17)
            for handle in (running, waiting_mine):
                observer.kill_job(handle.job_id)
            other.kill_job(waiting_other.job_id)
            await asyncio.wait_for(asyncio.gather(running.done, waiting_mine.done, waiting_other.done), 5)

    run(scenario(), 30)


# -- agent failures ------------------------------------------------------------------------
def test_silent_agent_jobs_crash_after_missed_pongs(broker):
    """An agent that stops answering is dropped after ~6-7 s; its running jobs end with
    stock's exact "Agent restarted" result; another agent keeps serving."""

    async def scenario():
        async with Peers(broker) as peers:
            frozen = peers.agent("frozen", 2, [DEFAULT_ENV], hold())
            client = await peers.ready_client(DEFAULT_ENV)
            jobs = [peers.submit(client, inputdata={"@state": "lost"}) for _ in range(2)]
            await wait_until(lambda: len(frozen.running) == 2, 5, "both jobs to run")
            await wait_until(lambda: frozen.ping_times, 3, "a first ping")
            frozen.stop_answering()
            stopped = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*(j.done for j in jobs)), 15)
            elapsed = time.monotonic() - stopped
            assert all(tuple(r) == AGENT_LOST for r in results), results
            assert 4.5 <= elapsed <= 9.5, elapsed
            peers.agent("healthy", 1, [DEFAULT_ENV], finish())
            await wait_environments(client, DEFAULT_ENV)
            assert (await peers.run_job(client)).result == ("success", "ok")

    run(scenario(), 40)


def test_agent_hello_again_crashes_its_running_jobs(broker):
    """An agent that says hello again from the same socket restarted: its jobs end with
    "Agent restarted", and it is registered afresh with all its slots."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("restarting", 2, [DEFAULT_ENV], hold())
            client = await peers.ready_client(DEFAULT_ENV)
            jobs = [peers.submit(client) for _ in range(2)]
            await wait_until(lambda: len(agent.running) == 2, 5, "both jobs to run")
            agent.behaviour = finish("success", "after restart")
            await agent.say_hello_again()
            results = await asyncio.wait_for(asyncio.gather(*(j.done for j in jobs)), 5)
            assert all(tuple(r) == AGENT_LOST for r in results), results
            again = await asyncio.wait_for(asyncio.gather(*(peers.run_job(client) for _ in range(2))), 10)
            assert all(r.result == ("success", "after restart") for r in again)

    run(scenario(), 30)


@pytest.mark.stock_bug("environments of departed agents are never withdrawn")
def test_departed_agent_environments_are_withdrawn(broker):
    """When an agent is dropped, the (type, name) pairs no remaining agent offers leave the list
    pushed to clients, and a type left without names leaves the map."""

    async def scenario():
        async with Peers(broker) as peers:
            shared, only_here, own_type = ("docker", "shared"), ("docker", "only-here"), ("mcq", "quiz")
            leaving = peers.agent("leaving", 1, [shared, only_here, own_type], finish())
            peers.agent("staying", 1, [shared], finish())
            client = await peers.ready_client(shared, only_here, own_type)
            await wait_until(lambda: leaving.ping_times, 3, "a first ping")
            leaving.stop_answering()
            await wait_until(lambda: environments_of(client) == {shared}, 12, "only `shared` to remain")
            assert client.get_available_environments() == {"docker": ("shared",)}
            got = await peers.run_job(client, only_here)
            assert got.result == ("crash", "Environment not available.")
            assert (await peers.run_job(client, shared)).result == ("success", "ok")

    run(scenario(), 40)


@pytest.mark.brokers(*IMPL_CONFIGS)
@pytest.mark.stock_bug("messages about a job from an agent not running it are accepted")
def test_messages_about_a_job_from_another_agent_are_dropped(broker, zctx):
    """Only the agent running a job may speak of it: a result or ssh info from another
    (registered) agent reaches no client, and the real agent's result still does."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("owner", 1, [DEFAULT_ENV], hold())
            intruder = RawAgent09(zctx, broker.agent_addr)
            try:
                intruder.hello("intruder", 1, (("docker", "elsewhere"),))
                client = await peers.ready_client(DEFAULT_ENV, ("docker", "elsewhere"))
                job = peers.submit(client, debug="ssh", ssh=True)
                await wait_until(lambda: agent.running, 5, "the job to run")
                intruder.send("AgentJobSSHDebug", job_id=job.job_id, host="evil.example", port=1,
                              user="x", password="forged")
                intruder.done(job.job_id, ("success", "forged"))
                await asyncio.sleep(0.5)
                assert not job.done.done() and not job.ssh.done(), (job.calls, job.ssh_calls)
                client.kill_job(job.job_id)
                got = await job.result(5)
                assert got.result == ("killed", "killed by the agent")
            finally:
                intruder.close()

    run(scenario(), 30)


# -- ssh debug, environments, registration -------------------------------------------------
@pytest.mark.brokers(*IMPL_CONFIGS)
def test_ssh_debug_info_relayed_with_user(broker):
    async def scenario():
        async with Peers(broker) as peers:
            ssh = ssh_then_hold("grader-ü.example", 2222, "wörker", "pässwörd 🔑")
            agent = peers.agent("ssh-agent", 1, [DEFAULT_ENV], ssh)
            client = await peers.ready_client(DEFAULT_ENV)
            job = peers.submit(client, debug="ssh", ssh=True)
            assert await asyncio.wait_for(job.ssh, 5) == ("grader-ü.example", 2222, "wörker", "pässwörd 🔑")
            (sent,) = agent.jobs
            assert sent.debug == "ssh"
            client.kill_job(job.job_id)
            assert (await job.result(5)).result == ("killed", "ssh session ended")
            assert job.ssh_calls == [("grader-ü.example", 2222, "wörker", "pässwörd 🔑")]

    run(scenario(), 30)


@pytest.mark.brokers(*IMPL_CONFIGS)
def test_unregistered_client_is_answered_unknown(broker, zctx):
    """Anything but ClientHello from an unknown identity gets Unknown; after hello it is served."""
    raw = RawClient09(zctx, broker.client_addr)
    try:
        raw.new_job(str(uuid.uuid4()))
        assert raw.recv(5) == {"@type": "Unknown"}
        raw.kill(str(uuid.uuid4()))
        assert raw.recv(5) == {"@type": "Unknown"}
        raw.send("Ping")
        assert raw.recv(5) == {"@type": "Unknown"}
        raw.hello()
        assert raw.recv(5)["@type"] == "BackendUpdateEnvironments"
        raw.send("Ping")
        assert raw.recv(5) == {"@type": "Pong"}
    finally:
        raw.close()


def test_real_client_recovers_after_broker_restart(broker):
    """A restarted broker answers the old client Unknown: the client aborts its pending jobs
    ("Backend unavailable"), says hello again, and its next jobs work."""

    async def scenario():
        async with Peers(broker) as peers:
            old_agent = peers.agent("before", 1, [DEFAULT_ENV], hold())
            client = await peers.ready_client(DEFAULT_ENV)
            pending = peers.submit(client)
            await wait_until(lambda: old_agent.running, 5, "the job to run")
            await asyncio.get_running_loop().run_in_executor(None, broker.restart)
            old_agent.close()
            got = await pending.result(15)
            assert tuple(got) == BACKEND_UNAVAILABLE
            peers.agent("after", 1, [DEFAULT_ENV], finish("success", "new broker"))
            await wait_environments(client, DEFAULT_ENV, timeout=10)
            assert (await peers.run_job(client)).result == ("success", "new broker")

    run(scenario(), 60)


@pytest.mark.brokers(*IMPL_CONFIGS)
def test_environment_that_appears_later(broker):
    """A job for an environment nobody offers fails at the client; once an agent offering it
    says hello, every client receives the new map and the job runs."""
    base, late = ("docker", "base"), ("kata", "late-env")

    async def scenario():
        async with Peers(broker) as peers:
            peers.agent("base", 1, [base], finish())
            client = await peers.ready_client(base)
            early = await peers.run_job(client, late, timeout=1)
            assert early.result == ("crash", "Environment not available.")
            peers.agent("late", 1, [late], finish("success", "late"))
            await wait_environments(client, late, base, timeout=5)
            assert client.get_available_environments() == {"docker": ("base",), "kata": ("late-env",)}
            assert (await peers.run_job(client, late)).result == ("success", "late")

    run(scenario(), 30)


@pytest.mark.brokers(*IMPL_CONFIGS)
@pytest.mark.stock_bug("a late AgentJobStarted / AgentJobSSHDebug raises KeyError (logged traceback)")
def test_no_message_after_a_jobs_result(broker, zctx):
    """AgentJobStarted / AgentJobSSHDebug sent after AgentJobDone reach no client and break
    nothing (no error logged); the next job works."""

    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("stray", 1, [DEFAULT_ENV], finish_then_stray())
            raw = RawClient09(zctx, broker.client_addr)
            try:
                raw.hello()
                await off_loop(raw.wait_environments, DEFAULT_ENV)
                raw.new_job("first", debug="ssh")
                assert (await off_loop(raw.recv_type, "BackendJobStarted"))["job_id"] == "first"
                done = await off_loop(raw.recv_type, "BackendJobDone")
                assert done["job_id"] == "first" and done["result"] == ("success", "done before the strays")
                await off_loop(raw.expect_silence, 1.0)
                agent.behaviour = finish("success", "second")
                raw.new_job("second")
                assert (await off_loop(raw.recv_type, "BackendJobDone"))["result"] == ("success", "second")
            finally:
                raw.close()
            log = broker.log()
            assert "Traceback" not in log and not broker.log_lines("ERROR"), log[-3000:]

    run(scenario(), 30)


def test_agents_are_pinged_every_second(broker):
    async def scenario():
        async with Peers(broker) as peers:
            agent = peers.agent("pinged", 1, [DEFAULT_ENV], finish())
            client = await peers.ready_client(DEFAULT_ENV)
            await wait_until(lambda: len(agent.ping_times) >= 4, 8, "4 pings")
            gaps = agent.ping_gaps()
            assert 0.8 <= sum(gaps) / len(gaps) <= 1.3, gaps
            assert max(gaps) < 2.0, gaps
            # The client's own pings are answered too (it reconnects after 10 missed pongs).
            assert client._ping_count <= 1

    run(scenario(), 20)


# -- malformed 0.9 frames --------------------------------------------------------------------
_CLIENT_GARBAGE = {
    "not-msgpack": b"\xc1\x00",
    "not-a-map": pack(["ClientHello", "x"]),
    "no-type": pack({"name": "x"}),
    "unknown-type": pack({"@type": "ClientHelloo", "name": "x"}),
    "missing-field": pack({"@type": "ClientKillJob"}),
    "extra-field": pack({"@type": "ClientKillJob", "job_id": "j", "extra": 1}),
    "agent-message": pack({"@type": "AgentJobStarted", "job_id": "j"}),
}
_AGENT_GARBAGE = {
    "not-msgpack": b"\xc1\x00",
    "no-type": pack({"job_id": "j"}),
    "unknown-type": pack({"@type": "AgentJobDon", "job_id": "j"}),
    "missing-field": pack({"@type": "AgentHello", "friendly_name": "x"}),
    "client-message": pack({"@type": "ClientHello", "name": "x"}),
}


@pytest.mark.brokers(*IMPL_CONFIGS)
@pytest.mark.stock_bug("a malformed frame raises out of the backend's receive loop")
@pytest.mark.parametrize("side,case", [("client", c) for c in _CLIENT_GARBAGE]
                         + [("agent", c) for c in _AGENT_GARBAGE])
def test_malformed_frame_is_dropped_and_service_goes_on(broker, zctx, side, case):
    """A malformed 0.9 frame from a registered client or an agent is dropped with a WARNING;
    the broker keeps serving."""
    raw = (RawClient09 if side == "client" else RawAgent09)(zctx, getattr(broker, f"{side}_addr"))
    try:
        if side == "client":
            raw.hello()
            raw.recv_type("BackendUpdateEnvironments")
        else:
            raw.hello("garbage-agent", 1, (("docker", "garbage"),))
            time.sleep(0.1)
        raw.socket.send((_CLIENT_GARBAGE if side == "client" else _AGENT_GARBAGE)[case])
        broker.wait_log("WARNING", "dropped", timeout=5)
        assert_serving_09(zctx, broker.agent_addr, broker.client_addr)
        assert broker.running()
    finally:
        raw.close()
