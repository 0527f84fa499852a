"""Micro-benchmarks of the scheduler, compiled and pure twins.

* ``submit+dispatch+complete``: one agent slot is busy and K jobs wait (round robin over
  1 or 50 environments, all offered by the agent).  Each call submits a job (it queues
  behind the K) and finishes the running one, which starts the oldest waiting job: the
  queue keeps K jobs, and the call is the scheduler's whole share of one job.
* ``priority jumps the queue``: as above with one environment, but the K waiting jobs
  have priority 1 and each call submits a priority-0 job, which the finish starts at
  once: the 0.9 pattern of an urgent job overtaking a backlog.
* ``mixed priorities``: the K waiting jobs and each call's job have priorities drawn
  from a small set, so most of them sit in the environment's heap: the O(log K) case.
* ``agent hello+removal``: with 1,000 agents registered (4 slots, 5 of 50 environments
  each), one more says hello (``add_agent`` + ``next_job`` until nothing starts) and is
  removed again.

Set-up (queueing the K jobs) happens outside the timed calls.
"""

from __future__ import annotations

import importlib
import random

import pytest
from bench_config import SMOKE

BACKLOGS = [0, 1_000] if SMOKE else [0, 100_000, 1_000_000]
ENV_COUNTS = [1, 50]
IMPLS = ["c", "py"]


def scheduler_class(impl: str):
    """The implementation under test; a missing compiled module fails, never skips."""
    return importlib.import_module(f"fastbackend._sched_{impl}").Scheduler


@pytest.mark.parametrize("envs", ENV_COUNTS, ids=[f"{n}_envs" for n in ENV_COUNTS])
@pytest.mark.parametrize("backlog", BACKLOGS, ids=[f"{k}_waiting" for k in BACKLOGS])
@pytest.mark.parametrize("impl", IMPLS)
def test_sched_submit_dispatch_complete(benchmark, impl, backlog, envs):
    sched = scheduler_class(impl)()
    env_ids = [sched.env_id(f"env-{i}") for i in range(envs)]
    agent = sched.add_agent(1, env_ids)
    assert sched.next_job(agent) == -1
    running, where = sched.submit(env_ids[0])
    assert where == agent
    for i in range(backlog):
        sched.submit(env_ids[i % envs])
    assert sched.waiting_count() == backlog
    submit, finish = sched.submit, sched.finish
    state = {"running": running, "n": backlog}

    def one_job() -> None:
        n = state["n"]
        submit(env_ids[n % envs])
        state["running"] = finish(state["running"])
        state["n"] = n + 1

    benchmark.group = f"sched submit+dispatch+complete, {envs} env(s)"
    benchmark(one_job)
    assert sched.waiting_count() == backlog
    assert sched.running_count() == 1


def busy_scheduler(impl: str, priorities: list[int]):
    """One environment, one agent slot busy, a job waiting for each of ``priorities``."""
    sched = scheduler_class(impl)()
    env = sched.env_id(("0.9", "docker", "env"))
    agent = sched.add_agent(1, [env])
    assert sched.next_job(agent) == -1
    running, where = sched.submit(env)
    assert where == agent
    for priority in priorities:
        sched.submit(env, priority)
    assert sched.waiting_count() == len(priorities)
    return sched, env, running


@pytest.mark.parametrize("backlog", BACKLOGS, ids=[f"{k}_waiting" for k in BACKLOGS])
@pytest.mark.parametrize("impl", IMPLS)
def test_sched_priority_jumps_the_queue(benchmark, impl, backlog):
    sched, env, running = busy_scheduler(impl, [1] * backlog)
    submit, finish = sched.submit, sched.finish
    state = {"running": running}

    def one_urgent_job() -> None:
        submit(env, 0)
        state["running"] = finish(state["running"])  # starts the priority-0 job

    benchmark.group = "sched priority-0 job jumps K priority-1 jobs"
    benchmark(one_urgent_job)
    assert sched.waiting_count() == backlog
    assert sched.job_priority(state["running"]) == 0


@pytest.mark.parametrize("backlog", BACKLOGS, ids=[f"{k}_waiting" for k in BACKLOGS])
@pytest.mark.parametrize("impl", IMPLS)
def test_sched_mixed_priorities(benchmark, impl, backlog):
    rng = random.Random(9)
    choices = [-1, 0, 1, 5]
    sched, env, running = busy_scheduler(impl, [rng.choice(choices) for _ in range(backlog)])
    # Drawn outside the timed call; cycled through.
    draws = [rng.choice(choices) for _ in range(4096)]
    submit, finish = sched.submit, sched.finish
    state = {"running": running, "n": 0}

    def one_job() -> None:
        n = state["n"]
        submit(env, draws[n & 4095])
        state["running"] = finish(state["running"])
        state["n"] = n + 1

    benchmark.group = "sched mixed priorities, K waiting"
    benchmark(one_job)
    assert sched.waiting_count() == backlog


@pytest.mark.parametrize("impl", IMPLS)
def test_sched_agent_hello_and_removal_1k_agents(benchmark, impl):
    sched = scheduler_class(impl)()
    env_ids = [sched.env_id(f"env-{i}") for i in range(50)]
    for a in range(1000):
        agent = sched.add_agent(4, [env_ids[(a + k) % 50] for k in range(5)])
        assert sched.next_job(agent) == -1
    offered = env_ids[10:15]
    add_agent, next_job, remove_agent = sched.add_agent, sched.next_job, sched.remove_agent

    def hello_and_removal() -> None:
        agent = add_agent(4, offered)
        while next_job(agent) != -1:
            pass
        remove_agent(agent)

    benchmark.group = "sched agent hello+removal, 1k agents"
    benchmark(hello_and_removal)
    assert sum(sched.agent_alive(a) for a in range(1000)) == 1000
