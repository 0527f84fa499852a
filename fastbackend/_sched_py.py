"""Scheduling for the broker, pure Python: environments, agents and their slots, waiting jobs, matching.

This is the readable twin of ``_sched_c``; both must behave identically, down to which
index a new job or agent receives (the broker indexes Python lists by them) and which
agent a job is sent to.  ``sched`` picks one of the two at import.

Model
-----
* An *environment* is interned to a small int, 0, 1, 2, ... for good.  Its key is a
  str (a 0.5 container name) or a tuple of str (the broker uses ``(type, name)`` for 0.9).
* An *agent* offers a set of environments and has ``slots`` job slots.
* A *job* is submitted for one environment with a *priority*, a signed 64-bit int
  (0 unless given; lower runs first).  It is ``JOB_WAITING`` in its environment's
  queue, or ``JOB_RUNNING`` on one agent, or ``JOB_FREE`` (its index unused).

The waiting jobs of an environment are ordered by their key (priority, stamp), the
stamp being the arrival clock, so arrival order decides among equal priorities.  They
are held in two parts:

* the *run*: a FIFO of jobs whose keys increase from head to tail.  A new job whose
  priority is not below the priority of the run's tail is appended to it; with all
  priorities equal (the 0.5 dialect) every job goes there, and every operation is O(1);
* the *heap*: a binary min-heap, by key, of the jobs that arrived with a priority below
  the run's tail.  Each job knows its position, so any one is removed in O(log n).

An environment's best waiting job is the smaller of the run's head and the heap's top.

Every operation costs O(log n) in the number of waiting jobs at worst (O(1) while no
job has gone into a heap), plus O(number of environments of the one agent involved);
never anything proportional to the number or the kind of waiting jobs.  ``work``
counts the agent-environment pairs the operations visit, so tests can prove it.

Matching rules (the exact tie-breaks, which the tests' reference model follows)
-------------------------------------------------------------------------------
* Each environment keeps a *ready queue*: the agents offering it that have a free slot.
  An agent that gains a free slot after having none (or is added with ``slots > 0``) is
  appended to the tail of the ready queue of each of its environments, in the order the
  environments were given to ``add_agent``.  An agent whose last free slot is taken
  leaves every ready queue.
* ``submit(env, priority)``: if jobs already wait for ``env`` the new job waits too
  (whatever its priority: no agent offering ``env`` has a free slot then); otherwise, if
  the ready queue of ``env`` is not empty, the job starts on the agent at its head;
  otherwise it waits.
* Waiting jobs of one environment start lowest priority first, and in arrival order
  among equal priorities.
* When a job starts on agent A (by any route) and A still has a free slot afterwards, A
  moves to the tail of the ready queue of that job's environment (round robin).
* ``next_job(agent)``: with a free slot, the agent starts the best waiting job among all
  the environments it offers: the one with the smallest (priority, stamp) of each
  environment's best job (so the oldest among equal priorities).
* ``finish(job)`` frees the job's slot (the agent joins the ready queues if it had no free
  slot) and then behaves like ``next_job`` on that agent.  When the agent had no free slot
  and a job is waiting, the slot passes straight to that job: joining and leaving the
  ready queues would leave them unchanged, so neither is done.
* A new agent takes no job by itself: the broker calls ``next_job(agent)`` until it
  returns -1.  Until then the agent is *pending* and ``check`` does not hold it to the
  rule "no job waits for an environment that an agent with a free slot offers".
* Freed indices are reused last-freed-first; when none is free, the next new index is
  one more than the highest ever used.  ``remove_agent`` frees the agent's running jobs
  in dispatch order, then the agent.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Iterable

# An environment key: a 0.5 container name, or a tuple of str ((type, name) for 0.9).
EnvKey = str | tuple[str, ...]

JOB_FREE = 0
JOB_WAITING = 1
JOB_RUNNING = 2

# Indices and slot counts must fit the C twin's int (and its uint32 links).
_INDEX_MAX = 0x7FFFFFFE
# Priorities are the C twin's int64_t.
PRIORITY_MIN = -(2**63)
PRIORITY_MAX = 2**63 - 1


class Scheduler:
    """Matches jobs with agent slots; see the module docstring for the exact rules."""

    def __init__(self) -> None:
        self._env_ids: dict[EnvKey, int] = {}
        self._env_names: list[EnvKey] = []
        # Per environment: the run and the heap of its waiting jobs (see the module
        # docstring), and the ready queue of agents.  OrderedDict gives O(1) append,
        # removal from the middle, peek at either end and move-to-tail, which is all
        # the run and the ready queues need.
        self._env_run: list[OrderedDict[int, None]] = []
        self._env_heap: list[list[int]] = []
        self._env_ready: list[OrderedDict[int, None]] = []

        # Jobs, as parallel lists indexed by job.
        self._job_state: list[int] = []
        self._job_env: list[int] = []
        self._job_agent: list[int] = []
        # Clock value at arrival while waiting, at dispatch while running.
        self._job_stamp: list[int] = []
        self._job_priority: list[int] = []
        self._job_heap_pos: list[int] = []  # position in its environment's heap, or -1
        self._free_jobs: list[int] = []  # a stack: last freed, first reused

        # Agents, as parallel lists indexed by agent.
        self._agent_alive: list[bool] = []
        self._agent_slots: list[int] = []
        self._agent_free: list[int] = []
        self._agent_envs: list[tuple[int, ...]] = []
        self._agent_jobs: list[dict[int, None]] = []  # running jobs, dispatch order
        self._agent_ready: list[bool] = []  # in the ready queues of its environments
        self._agent_pending: list[bool] = []  # added, next_job has not yet returned -1
        self._free_agents: list[int] = []

        self._clock = 0
        self._waiting = 0
        self._waiting_prioritised = 0  # waiting jobs whose priority is not 0
        self._running = 0
        self._work = 0

    # ----------------------------------------------------------------- environments

    def env_id(self, name: EnvKey) -> int:
        """Intern an environment key (a str or a tuple of str); ids are 0, 1, 2, ... in order of first use."""
        if not _is_env_key(name):
            raise TypeError("environment key must be a str or a tuple of str")
        env = self._env_ids.get(name)
        if env is None:
            env = len(self._env_names)
            self._env_ids[name] = env
            self._env_names.append(name)
            self._env_run.append(OrderedDict())
            self._env_heap.append([])
            self._env_ready.append(OrderedDict())
        return env

    def env_name(self, env: int) -> EnvKey:
        """The key an environment id was interned from, as given."""
        return self._env_names[self._env(env)]

    def env_count(self) -> int:
        """How many environments have been interned."""
        return len(self._env_names)

    # ----------------------------------------------------------------------- agents

    def add_agent(self, slots: int, envs: Iterable[int]) -> int:
        """Register an agent with ``slots`` slots offering ``envs``; return its index.

        The agent takes no waiting job yet: call ``next_job`` on it until it returns -1.
        """
        slots = operator.index(slots)
        if not 0 <= slots <= _INDEX_MAX:
            raise ValueError(f"bad slot count {slots}")
        offered = tuple(dict.fromkeys(self._env(env) for env in envs))

        if self._free_agents:
            agent = self._free_agents.pop()
        else:
            agent = len(self._agent_alive)
            if agent > _INDEX_MAX:
                raise MemoryError("too many agents")
            self._agent_alive.append(False)
            self._agent_slots.append(0)
            self._agent_free.append(0)
            self._agent_envs.append(())
            self._agent_jobs.append({})
            self._agent_ready.append(False)
            self._agent_pending.append(False)
        self._agent_alive[agent] = True
        self._agent_slots[agent] = slots
        self._agent_free[agent] = slots
        self._agent_envs[agent] = offered
        self._agent_jobs[agent] = {}
        self._agent_ready[agent] = False
        self._agent_pending[agent] = True
        if slots > 0:
            self._ready_join(agent)
        return agent

    def remove_agent(self, agent: int) -> list[int]:
        """Forget an agent; return the jobs that were running on it (now freed), in dispatch order.

        Waiting jobs stay queued.
        """
        agent = self._agent(agent)
        lost = list(self._agent_jobs[agent])
        for job in lost:
            self._free_job(job)
        self._running -= len(lost)
        if self._agent_ready[agent]:
            self._ready_leave(agent)
        self._agent_alive[agent] = False
        self._agent_jobs[agent] = {}
        self._agent_envs[agent] = ()
        self._agent_slots[agent] = self._agent_free[agent] = 0
        self._agent_pending[agent] = False
        self._free_agents.append(agent)
        return lost

    # ------------------------------------------------------------------------- jobs

    def submit(self, env: int, priority: int = 0) -> tuple[int, int]:
        """Add a job for ``env``; return ``(job, agent)``, agent -1 when the job waits.

        Lower ``priority`` values start first; it must fit a signed 64-bit int.
        """
        env = self._env(env)
        if type(priority) is not int:  # (the common case skips the call)
            priority = operator.index(priority)
        if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise ValueError(f"priority {priority} does not fit 64 bits")
        if self._free_jobs:
            job = self._free_jobs.pop()
        else:
            job = len(self._job_state)
            if job > _INDEX_MAX:
                raise MemoryError("too many jobs")
            self._job_state.append(JOB_FREE)
            self._job_env.append(0)
            self._job_agent.append(-1)
            self._job_stamp.append(0)
            self._job_priority.append(0)
            self._job_heap_pos.append(-1)
        self._job_env[job] = env
        self._job_priority[job] = priority
        self._job_agent[job] = -1
        self._job_stamp[job] = self._clock
        self._clock += 1

        run = self._env_run[env]
        heap = self._env_heap[env]
        ready = self._env_ready[env]
        if not run and not heap and ready:
            agent = next(iter(ready))
            self._start(job, agent)
            return job, agent
        self._job_state[job] = JOB_WAITING
        if not run or priority >= self._job_priority[next(reversed(run))]:
            run[job] = None  # keys still increase along the run
        else:
            self._heap_push(heap, job)
        self._waiting += 1
        if priority:
            self._waiting_prioritised += 1
        return job, -1

    def finish(self, job: int) -> int:
        """End a running job and free its slot; return the job now started in that slot, or -1."""
        job = self._job(job, JOB_RUNNING)
        agent = self._job_agent[job]
        del self._agent_jobs[agent][job]
        self._free_job(job)
        self._running -= 1
        self._agent_free[agent] += 1

        best = self._best_waiting(agent)
        if best < 0:
            self._agent_pending[agent] = False
            if not self._agent_ready[agent]:
                self._ready_join(agent)
            return -1
        # Had the agent no free slot, the freed one passes straight to the waiting job:
        # the agent is not in the ready queues and _start leaves it out of them.
        self._unqueue(best)
        self._start(best, agent)
        return best

    def next_job(self, agent: int) -> int:
        """If the agent has a free slot and a job waits in one of its environments, start the best one."""
        agent = self._agent(agent)
        if self._agent_free[agent] == 0:
            self._agent_pending[agent] = False
            return -1
        best = self._best_waiting(agent)
        if best < 0:
            self._agent_pending[agent] = False
            return -1
        self._unqueue(best)
        self._start(best, agent)
        return best

    def cancel(self, job: int) -> None:
        """Remove a waiting job (killed by its client) and free it."""
        job = self._job(job, JOB_WAITING)
        self._unqueue(job)
        self._free_job(job)

    # -------------------------------------------------------------------- accessors

    def job_state(self, job: int) -> int:
        """JOB_FREE, JOB_WAITING or JOB_RUNNING (JOB_FREE for an index never used)."""
        job = operator.index(job)
        if 0 <= job < len(self._job_state):
            return self._job_state[job]
        return JOB_FREE

    def job_agent(self, job: int) -> int:
        """The agent a running job runs on, -1 for any other job."""
        job = operator.index(job)
        if 0 <= job < len(self._job_state) and self._job_state[job] == JOB_RUNNING:
            return self._job_agent[job]
        return -1

    def job_env(self, job: int) -> int:
        """The environment of a waiting or running job."""
        return self._job_env[self._job(job)]

    def job_priority(self, job: int) -> int:
        """The priority of a waiting or running job."""
        return self._job_priority[self._job(job)]

    def agent_slots(self, agent: int) -> int:
        """How many slots the agent has."""
        return self._agent_slots[self._agent(agent)]

    def agent_free_slots(self, agent: int) -> int:
        """How many of the agent's slots are free."""
        return self._agent_free[self._agent(agent)]

    def agent_envs(self, agent: int) -> tuple[int, ...]:
        """The environments the agent offers, deduplicated, in the order given."""
        return self._agent_envs[self._agent(agent)]

    def agent_alive(self, agent: int) -> bool:
        """Whether the index names a registered agent."""
        agent = operator.index(agent)
        return 0 <= agent < len(self._agent_alive) and self._agent_alive[agent]

    def agent_jobs(self, agent: int) -> list[int]:
        """The jobs running on the agent, in dispatch order."""
        return list(self._agent_jobs[self._agent(agent)])

    def waiting_count(self) -> int:
        """How many jobs wait."""
        return self._waiting

    def running_count(self) -> int:
        """How many jobs run."""
        return self._running

    def waiting_in_env(self, env: int) -> int:
        """How many jobs wait for the environment."""
        env = self._env(env)
        return len(self._env_run[env]) + len(self._env_heap[env])

    def waiting_jobs(self) -> list[int]:
        """All waiting jobs in arrival order, whatever their priority (a snapshot for queue listings)."""
        jobs = [job for run in self._env_run for job in run]
        jobs += [job for heap in self._env_heap for job in heap]
        jobs.sort(key=self._job_stamp.__getitem__)
        return jobs

    def running_jobs(self) -> list[int]:
        """All running jobs in dispatch order (a snapshot for queue listings; sorts)."""
        jobs = [job for agent_jobs in self._agent_jobs for job in agent_jobs]
        jobs.sort(key=self._job_stamp.__getitem__)
        return jobs

    @property
    def work(self) -> int:
        """Agent-environment pairs visited so far by the scheduling operations.

        Operations visit the environments of the one agent they concern (to find its
        oldest waiting job, or to move it in or out of the ready queues), nothing else
        that grows; this counter lets tests check that.
        """
        return self._work

    # ------------------------------------------------------------------------ check

    def check(self) -> None:
        """Verify every invariant (slow, for tests); raise AssertionError naming the broken one."""
        n_jobs = len(self._job_state)
        free_jobs = set(self._free_jobs)
        _require(len(free_jobs) == len(self._free_jobs), "job free list holds a duplicate")
        waiting = running = 0
        for job in range(n_jobs):
            state = self._job_state[job]
            _require(state in (JOB_FREE, JOB_WAITING, JOB_RUNNING), f"job {job}: bad state {state}")
            _require((state == JOB_FREE) == (job in free_jobs), f"job {job}: free list disagrees with state")
            _require(PRIORITY_MIN <= self._job_priority[job] <= PRIORITY_MAX, f"job {job}: bad priority")
            if state == JOB_WAITING:
                waiting += 1
                env = self._job_env[job]
                pos = self._job_heap_pos[job]
                if pos < 0:
                    _require(job in self._env_run[env], f"job {job}: not in its queue")
                else:
                    heap = self._env_heap[env]
                    _require(pos < len(heap) and heap[pos] == job, f"job {job}: heap position is wrong")
            else:
                _require(self._job_heap_pos[job] == -1, f"job {job}: not waiting but has a heap position")
            if state == JOB_RUNNING:
                running += 1
                agent = self._job_agent[job]
                _require(
                    0 <= agent < len(self._agent_alive) and self._agent_alive[agent],
                    f"job {job}: runs on a dead agent",
                )
                _require(job in self._agent_jobs[agent], f"job {job}: not in its agent's list")
        _require(waiting == self._waiting, "waiting count is wrong")
        prioritised = sum(
            1 for job in range(n_jobs) if self._job_state[job] == JOB_WAITING and self._job_priority[job]
        )
        _require(prioritised == self._waiting_prioritised, "count of waiting jobs with a priority is wrong")
        _require(running == self._running, "running count is wrong")

        queued = 0
        for env, run in enumerate(self._env_run):
            heap = self._env_heap[env]
            keys = []
            for job in run:
                _require(self._job_state[job] == JOB_WAITING, f"env {env}: queues job {job}, not waiting")
                _require(self._job_env[job] == env, f"env {env}: queues job {job} of another env")
                _require(self._job_heap_pos[job] == -1, f"env {env}: job {job} is in the run and the heap")
                keys.append(self._key(job))
            in_order = all(a < b for a, b in zip(keys, keys[1:], strict=False))
            _require(in_order, f"env {env}: run out of (priority, arrival) order")
            for pos, job in enumerate(heap):
                _require(self._job_state[job] == JOB_WAITING, f"env {env}: heap holds job {job}, not waiting")
                _require(self._job_env[job] == env, f"env {env}: heap holds job {job} of another env")
                _require(self._job_heap_pos[job] == pos, f"env {env}: job {job} has a wrong heap position")
                if pos:
                    parent = heap[(pos - 1) // 2]
                    _require(self._key(parent) < self._key(job), f"env {env}: heap order broken at {pos}")
            queued += len(run) + len(heap)
            for agent in self._env_ready[env]:
                _require(self._agent_alive[agent], f"env {env}: dead agent {agent} is ready")
                _require(self._agent_ready[agent], f"env {env}: agent {agent} queued but not ready")
                _require(env in self._agent_envs[agent], f"env {env}: agent {agent} does not offer it")
        _require(queued == self._waiting, "some waiting job is in no queue")

        free_agents = set(self._free_agents)
        _require(len(free_agents) == len(self._free_agents), "agent free list holds a duplicate")
        for agent, alive in enumerate(self._agent_alive):
            _require(alive != (agent in free_agents), f"agent {agent}: free list disagrees")
            if not alive:
                _require(not self._agent_jobs[agent], f"dead agent {agent} has jobs")
                continue
            jobs = self._agent_jobs[agent]
            free = self._agent_free[agent]
            _require(0 <= free and free + len(jobs) == self._agent_slots[agent], f"agent {agent}: slots")
            _require(self._agent_ready[agent] == (free > 0), f"agent {agent}: ready flag")
            stamps = []
            for job in jobs:
                _require(self._job_state[job] == JOB_RUNNING, f"agent {agent}: job {job} not running")
                _require(self._job_agent[job] == agent, f"agent {agent}: job {job} belongs elsewhere")
                stamps.append(self._job_stamp[job])
            _require(stamps == sorted(stamps), f"agent {agent}: jobs out of dispatch order")
            for env in self._agent_envs[agent]:
                in_queue = agent in self._env_ready[env]
                _require(in_queue == (free > 0), f"agent {agent}: ready queue of env {env}")
                if free > 0 and not self._agent_pending[agent]:
                    _require(
                        not self._env_run[env] and not self._env_heap[env],
                        f"env {env}: jobs wait while agent {agent} has a free slot",
                    )

    # -------------------------------------------------------------------- internals

    def _env(self, env: int) -> int:
        env = operator.index(env)
        if not 0 <= env < len(self._env_names):
            raise ValueError(f"unknown environment {env}")
        return env

    def _agent(self, agent: int) -> int:
        agent = operator.index(agent)
        if not (0 <= agent < len(self._agent_alive) and self._agent_alive[agent]):
            raise ValueError(f"unknown agent {agent}")
        return agent

    def _job(self, job: int, state: int = -1) -> int:
        job = operator.index(job)
        if not 0 <= job < len(self._job_state) or self._job_state[job] == JOB_FREE:
            raise ValueError(f"unknown job {job}")
        if state == JOB_WAITING and self._job_state[job] != JOB_WAITING:
            raise ValueError(f"job {job} is not waiting")
        if state == JOB_RUNNING and self._job_state[job] != JOB_RUNNING:
            raise ValueError(f"job {job} is not running")
        return job

    def _free_job(self, job: int) -> None:
        self._job_state[job] = JOB_FREE
        self._job_agent[job] = -1
        self._free_jobs.append(job)

    def _key(self, job: int) -> tuple[int, int]:
        """What orders waiting jobs: lower priority first, then earlier arrival."""
        return self._job_priority[job], self._job_stamp[job]

    def _best_in_env(self, env: int) -> int:
        """The environment's best waiting job: the run's head or the heap's top; -1 if none."""
        run = self._env_run[env]
        heap = self._env_heap[env]
        if heap and (not run or self._key(heap[0]) < self._key(next(iter(run)))):
            return heap[0]
        return next(iter(run)) if run else -1

    def _best_waiting(self, agent: int) -> int:
        """The best waiting job among the agent's environments; -1 if none waits."""
        best = -1
        best_priority = best_stamp = 0
        envs = self._agent_envs[agent]
        self._work += len(envs)
        # This loop runs for every finish, so keys are compared without building tuples.
        runs, stamps = self._env_run, self._job_stamp
        if not self._waiting_prioritised:
            # Every waiting job has priority 0 (always so in the 0.5 dialect): no heap
            # holds anything, and the oldest run head wins.
            for env in envs:
                run = runs[env]
                if run:
                    job = next(iter(run))
                    if best < 0 or stamps[job] < best_stamp:
                        best, best_stamp = job, stamps[job]
            return best
        heaps, priorities = self._env_heap, self._job_priority
        for env in envs:
            run = runs[env]
            if heaps[env]:
                job = self._best_in_env(env)
            elif run:
                job = next(iter(run))
            else:
                continue
            priority = priorities[job]
            if (
                best < 0
                or priority < best_priority
                or (priority == best_priority and stamps[job] < best_stamp)
            ):
                best, best_priority, best_stamp = job, priority, stamps[job]
        return best

    def _unqueue(self, job: int) -> None:
        """Take a waiting job out of its environment's run or heap."""
        env = self._job_env[job]
        if self._job_heap_pos[job] < 0:
            del self._env_run[env][job]
        else:
            self._heap_remove(self._env_heap[env], job)
        self._waiting -= 1
        if self._job_priority[job]:
            self._waiting_prioritised -= 1

    # The heap keeps each job's position in _job_heap_pos, so that cancel can remove any
    # job in O(log n) (heapq cannot: it would leave the job behind, or scan for it).

    def _heap_push(self, heap: list[int], job: int) -> None:
        heap.append(job)
        self._heap_up(heap, len(heap) - 1)

    def _heap_remove(self, heap: list[int], job: int) -> None:
        pos = self._job_heap_pos[job]
        self._job_heap_pos[job] = -1
        last = heap.pop()
        if last != job:  # the last job fills the hole and moves up or down
            heap[pos] = last
            self._job_heap_pos[last] = pos
            self._heap_up(heap, pos)
            self._heap_down(heap, self._job_heap_pos[last])

    def _heap_up(self, heap: list[int], pos: int) -> None:
        job = heap[pos]
        key = self._key(job)
        while pos > 0:
            parent = (pos - 1) // 2
            if not key < self._key(heap[parent]):
                break
            heap[pos] = heap[parent]
            self._job_heap_pos[heap[pos]] = pos
            pos = parent
        heap[pos] = job
        self._job_heap_pos[job] = pos

    def _heap_down(self, heap: list[int], pos: int) -> None:
        job = heap[pos]
        key = self._key(job)
        size = len(heap)
        while True:
            child = 2 * pos + 1
            if child >= size:
                break
            if child + 1 < size and self._key(heap[child + 1]) < self._key(heap[child]):
                child += 1
            if not self._key(heap[child]) < key:
                break
            heap[pos] = heap[child]
            self._job_heap_pos[heap[pos]] = pos
            pos = child
        heap[pos] = job
        self._job_heap_pos[job] = pos

    def _start(self, job: int, agent: int) -> None:
        """Run ``job`` on ``agent`` (which has a free slot), and keep the ready queues right."""
        self._job_state[job] = JOB_RUNNING
        self._job_agent[job] = agent
        self._job_stamp[job] = self._clock
        self._clock += 1
        self._agent_jobs[agent][job] = None
        self._running += 1
        self._agent_free[agent] -= 1
        # An agent with a free slot is always in the ready queues, except in finish's
        # hand-over, where the slot it frees is taken at once and it never joined them.
        if self._agent_free[agent] == 0:
            if self._agent_ready[agent]:
                self._ready_leave(agent)
        else:
            self._env_ready[self._job_env[job]].move_to_end(agent)

    def _ready_join(self, agent: int) -> None:
        envs = self._agent_envs[agent]
        self._work += len(envs)
        for env in envs:
            self._env_ready[env][agent] = None
        self._agent_ready[agent] = True

    def _ready_leave(self, agent: int) -> None:
        envs = self._agent_envs[agent]
        self._work += len(envs)
        for env in envs:
            del self._env_ready[env][agent]
        self._agent_ready[agent] = False


def _is_env_key(key: object) -> bool:
    return isinstance(key, str) or (isinstance(key, tuple) and all(isinstance(part, str) for part in key))


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise AssertionError(reason)
