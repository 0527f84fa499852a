# cython: annotation_typing=False
# (Annotations on def methods document the Python API; they must not coerce arguments:
# a float job index is a TypeError here as in the Python twin.)
"""Scheduling for the broker, compiled: environments, agents and their slots, waiting jobs, matching.

The fast twin of ``_sched_py`` (read that module's docstring for the rules: ready
queues, round robin, priorities then arrival order, index reuse).  Both must agree on every result,
including which index a new job or agent receives and the ``work`` counter.

Layout (declared in ``_sched_c.pxd``): four arrays of C structs grown by doubling,
linked by uint32 index with NIL for "none".

* ``Env``: its waiting jobs, as in the twin: the run, a FIFO in (priority, stamp) order
  (through ``Job.prev/next``), and the heap of the jobs that arrived with a priority
  below the run's tail (an array of job indices; ``Job.heap_pos`` says where each one
  is, so any one is removed in O(log n)); and its ready queue of offers (through
  ``Offer.prev/next``).  With every priority equal the heap stays empty and costs one
  test per operation.
* ``Agent``: slot counters, the list of its running jobs (through ``Job.prev/next`` too:
  a job is never both waiting and running), the chain of its offers.
* ``Offer``: one per agent-environment pair; it is the node that sits in that
  environment's ready queue while the agent has a free slot, so taking an agent in or
  out of the queues costs one unlink per environment it offers.
* ``Job``: state, environment, agent, priority, and a stamp that orders the FIFOs.

Free jobs, agents and offers are chained into LIFO free lists through ``next``,
``next_free`` and ``agent_next``.  With ``FB_DEBUG`` set at build time, cheap local
invariant checks run after each mutation; otherwise the C compiler drops them.
"""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdlib cimport qsort
from cpython.long cimport PyLong_AsLongAndOverflow, PyLong_AsLongLongAndOverflow
from cpython.number cimport PyNumber_Index
from libc.stdint cimport int64_t, uint32_t, uint64_t

from collections.abc import Iterable

cdef extern from *:
    """
    #ifndef FB_DEBUG
    #define FB_DEBUG 0
    #endif
    """
    const int FB_DEBUG

#: Whether this build runs the invariant checks after every mutation.
DEBUG = bool(FB_DEBUG)
#: The range of job priorities (C int64_t).
PRIORITY_MIN = -(2**63)
PRIORITY_MAX = 2**63 - 1

cdef enum:
    # Indices travel as C int and link as uint32 with NIL = 0xFFFFFFFF: stay below both.
    INDEX_MAX = 0x7FFFFFFE
    FIRST_CAPACITY = 16


cdef int _grow(void** array, uint32_t* cap, size_t item, uint32_t index) except -1:
    """Reallocate ``array`` (doubling) so that ``index`` fits."""
    cdef uint64_t new_cap = cap[0] if cap[0] else FIRST_CAPACITY
    cdef void* grown
    if index > INDEX_MAX:
        raise MemoryError("scheduler index space exhausted")
    while new_cap <= index:
        new_cap *= 2
    grown = PyMem_Realloc(array[0], <size_t>new_cap * item)
    if grown == NULL:
        raise MemoryError()
    array[0] = grown
    cap[0] = <uint32_t>new_cap
    return 0


cdef int _arg(object value) except -2:
    """A Python index argument as C int; anything out of range becomes -1, never valid."""
    cdef int overflow = 0
    # Takes ints and __index__ objects only (a float is a TypeError, as in the twin).
    cdef long index = PyLong_AsLongAndOverflow(value, &overflow)
    if overflow or index < 0 or index > INDEX_MAX:
        return -1
    return <int>index


cdef int _fail(str reason) except -1:
    raise AssertionError(reason)


cdef inline bint _before(const Job* a, const Job* b) noexcept nogil:
    """Whether waiting job ``a`` goes before ``b``: lower priority, then earlier arrival."""
    return a.priority < b.priority or (a.priority == b.priority and a.stamp < b.stamp)


cdef inline uint32_t _env_best(const Env* e, const Job* jobs) noexcept nogil:
    """The environment's best waiting job, the run's head or the heap's top; NIL if none."""
    cdef uint32_t head = e.wait_head
    if e.heap_len and (head == NIL or _before(&jobs[e.heap[0]], &jobs[head])):
        return e.heap[0]
    return head


cdef bint _is_env_key(object key):
    if isinstance(key, str):
        return True
    if not isinstance(key, tuple):
        return False
    for part in key:
        if not isinstance(part, str):
            return False
    return True


ctypedef struct Stamped:
    uint64_t stamp
    uint32_t job


cdef int _by_stamp(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const Stamped*>a).stamp, y = (<const Stamped*>b).stamp
    return (x > y) - (x < y)


cdef class Scheduler:
    """Matches jobs with agent slots; the rules are those of ``_sched_py.Scheduler``."""

    def __cinit__(self):
        # Cython zeroes the fields; only the free lists need their "empty" marker.
        self.job_free = NIL
        self.agent_free = NIL
        self.offer_free = NIL
        self.env_ids = {}
        self.env_names = []

    def __dealloc__(self):
        cdef uint32_t e
        for e in range(self.envs_len):
            PyMem_Free(self.envs[e].heap)
        PyMem_Free(self.jobs)
        PyMem_Free(self.agents)
        PyMem_Free(self.offers)
        PyMem_Free(self.envs)

    # ----------------------------------------------------------------- environments

    def env_id(self, name: str | tuple[str, ...]) -> int:
        """Intern an environment key (a str or a tuple of str); ids are 0, 1, 2, ... in order of first use."""
        cdef Env* env
        if not _is_env_key(name):
            raise TypeError("environment key must be a str or a tuple of str")
        known = self.env_ids.get(name)
        if known is not None:
            return known
        if self.envs_len > ENV_MAX:
            raise MemoryError("scheduler environment space exhausted")
        if self.envs_len >= self.envs_cap:
            _grow(<void**>&self.envs, &self.envs_cap, sizeof(Env), self.envs_len)
        env = &self.envs[self.envs_len]
        env.wait_head = env.wait_tail = NIL
        env.heap = NULL  # allocated when a job first goes out of order
        env.heap_len = env.heap_cap = 0
        env.n_waiting = 0
        env.ready_head = env.ready_tail = NIL
        self.env_ids[name] = self.envs_len
        self.env_names.append(name)
        self.envs_len += 1
        return self.envs_len - 1

    def env_name(self, env: int) -> str | tuple[str, ...]:
        """The key an environment id was interned from, as given."""
        return self.env_names[self._env_arg(env)]

    def env_count(self) -> int:
        """How many environments have been interned."""
        return self.envs_len

    # ----------------------------------------------------------------------- agents

    def add_agent(self, slots: int, envs: Iterable[int]) -> int:
        """Register an agent with ``slots`` slots offering ``envs``; return its index.

        The agent takes no waiting job yet: call ``next_job`` on it until it returns -1.
        """
        cdef uint32_t a, o, last, env
        cdef Agent* agent
        slots = PyNumber_Index(slots)
        if not 0 <= slots <= INDEX_MAX:
            raise ValueError(f"bad slot count {slots}")
        offered = list(dict.fromkeys([self._env_arg(e) for e in envs]))

        # Reserve everything first so that a MemoryError leaves no half-built agent.
        if self.agent_free == NIL and self.agents_len >= self.agents_cap:
            _grow(<void**>&self.agents, &self.agents_cap, sizeof(Agent), self.agents_len)
        if self.offers_len + len(offered) > self.offers_cap:
            _grow(<void**>&self.offers, &self.offers_cap, sizeof(Offer), self.offers_len + len(offered))

        if self.agent_free != NIL:
            a = self.agent_free
            self.agent_free = self.agents[a].next_free
        else:
            a = self.agents_len
            self.agents_len += 1
        agent = &self.agents[a]
        agent.slots = agent.free = slots
        agent.n_jobs = 0
        agent.job_head = agent.job_tail = NIL
        agent.offer_head = NIL
        agent.n_envs = len(offered)
        agent.next_free = NIL
        agent.alive = 1
        agent.ready = 0
        agent.pending = 1

        last = NIL
        for env in offered:
            if self.offer_free != NIL:
                o = self.offer_free
                self.offer_free = self.offers[o].agent_next
            else:
                o = self.offers_len
                self.offers_len += 1
            self.offers[o].agent = a
            self.offers[o].env = env
            self.offers[o].prev = self.offers[o].next = NIL
            self.offers[o].agent_next = NIL
            if last == NIL:
                agent.offer_head = o
            else:
                self.offers[last].agent_next = o
            last = o

        if agent.free > 0:
            self._ready_join(a)
        if FB_DEBUG:
            self._debug_agent(a)
        return a

    def remove_agent(self, agent: int) -> list[int]:
        """Forget an agent; return the jobs that were running on it (now freed), in dispatch order.

        Waiting jobs stay queued.
        """
        cdef int a = _arg(agent)
        cdef uint32_t j, o, following
        cdef Agent* ag
        self._valid_agent(a)
        ag = &self.agents[a]
        lost = []
        j = ag.job_head
        while j != NIL:
            following = self.jobs[j].next
            lost.append(j)
            self._free_job(j)
            j = following
        self.n_running -= ag.n_jobs
        if ag.ready:
            self._ready_leave(a)
        o = ag.offer_head
        while o != NIL:
            following = self.offers[o].agent_next
            self.offers[o].agent_next = self.offer_free
            self.offer_free = o
            o = following
        ag.slots = ag.free = ag.n_jobs = ag.n_envs = 0
        ag.job_head = ag.job_tail = ag.offer_head = NIL
        ag.alive = ag.ready = ag.pending = 0
        ag.next_free = self.agent_free
        self.agent_free = a
        return lost

    # ------------------------------------------------------------------------- jobs

    def submit(self, env: int, priority: int = 0) -> tuple[int, int]:
        """Add a job for ``env``; return ``(job, agent)``, agent -1 when the job waits.

        Lower ``priority`` values start first; it must fit a signed 64-bit int.
        """
        cdef int agent, job
        cdef int e = _arg(env)
        cdef int overflow = 0
        cdef long long p
        # The environment is checked first, as in the twin (c_submit checks it again).
        if e < 0 or <uint32_t>e >= self.envs_len:
            raise ValueError(f"unknown environment {env}")
        # Ints and __index__ objects only: a float raises TypeError here, as in the twin.
        p = PyLong_AsLongLongAndOverflow(priority, &overflow)
        if overflow:
            raise ValueError(f"priority {priority} does not fit 64 bits")
        job = self.c_submit(e, p, &agent)
        return job, agent

    def finish(self, job: int) -> int:
        """End a running job and free its slot; return the job now started in that slot, or -1."""
        return self.c_finish(_arg(job))

    def next_job(self, agent: int) -> int:
        """If the agent has a free slot and a job waits in one of its environments, start the oldest."""
        return self.c_next_job(_arg(agent))

    def cancel(self, job: int) -> None:
        """Remove a waiting job (killed by its client) and free it."""
        self.c_cancel(_arg(job))

    cdef int c_submit(self, int env, int64_t priority, int* agent) except -1:
        cdef int j
        cdef uint32_t o
        cdef bint to_heap
        cdef Job* job
        cdef Env* e
        if env < 0 or <uint32_t>env >= self.envs_len:
            raise ValueError(f"unknown environment {env}")
        e = &self.envs[env]
        # Jobs already waiting here go first; then only pending agents can be ready.
        # A waiting job joins the run unless its priority is below the run's tail's.
        to_heap = (e.n_waiting != 0 or e.ready_head == NIL) and (
            e.wait_tail != NIL and priority < self.jobs[e.wait_tail].priority)
        if to_heap and e.heap_len >= e.heap_cap:
            # Grown before the job is taken, so that a MemoryError leaves nothing behind.
            _grow(<void**>&e.heap, &e.heap_cap, sizeof(uint32_t), e.heap_len)
        j = self._new_job()  # may move self.jobs: take pointers after it
        job = &self.jobs[j]
        job.env = env
        job.prev = job.next = NIL
        job.heap_pos = NIL  # in the run (or running: _start sets the agent)
        job.priority = priority
        job.stamp = self.clock
        self.clock += 1
        if e.n_waiting == 0 and e.ready_head != NIL:
            o = e.ready_head
            agent[0] = self.offers[o].agent
            self._start(j, o)
        else:
            job.state = JOB_WAITING
            if to_heap:
                e.heap[e.heap_len] = j
                e.heap_len += 1
                self._heap_up(e, e.heap_len - 1)
            else:
                job.prev = e.wait_tail
                if e.wait_tail != NIL:
                    self.jobs[e.wait_tail].next = j
                else:
                    e.wait_head = j
                e.wait_tail = j
            e.n_waiting += 1
            self.n_waiting += 1
            agent[0] = -1
        if FB_DEBUG:
            self._debug_env(env)
            if agent[0] >= 0:
                self._debug_agent(agent[0])
        return j

    cdef int c_finish(self, int job) except -2:
        cdef uint32_t a, o, nj
        cdef Job* done
        cdef Agent* ag
        self._valid_job(job, JOB_RUNNING)
        done = &self.jobs[job]
        a = done.agent
        ag = &self.agents[a]
        if done.prev != NIL:
            self.jobs[done.prev].next = done.next
        else:
            ag.job_head = done.next
        if done.next != NIL:
            self.jobs[done.next].prev = done.prev
        else:
            ag.job_tail = done.prev
        ag.n_jobs -= 1
        ag.free += 1
        self.n_running -= 1
        self._free_job(job)

        o = self._best_offer(a, &nj)
        if o == NIL:
            ag.pending = 0
            if not ag.ready:
                self._ready_join(a)
        else:
            # If the agent had no free slot, the freed one passes straight to the waiting
            # job: the agent is not in the ready queues and _start leaves it out of them.
            self._unqueue(nj)
            self._start(nj, o)
        if FB_DEBUG:
            self._debug_agent(a)
            self._debug_env(self.jobs[job].env)
            if nj != NIL:
                self._debug_env(self.jobs[nj].env)
        return -1 if nj == NIL else <int>nj

    cdef int c_next_job(self, int agent) except -2:
        cdef uint32_t o, j
        cdef Agent* ag
        self._valid_agent(agent)
        ag = &self.agents[agent]
        if ag.free == 0:
            ag.pending = 0
            return -1
        o = self._best_offer(agent, &j)
        if o == NIL:
            ag.pending = 0
            return -1
        self._unqueue(j)
        self._start(j, o)
        if FB_DEBUG:
            self._debug_agent(agent)
            self._debug_env(self.jobs[j].env)
        return j

    cdef int c_cancel(self, int job) except -1:
        self._valid_job(job, JOB_WAITING)
        self._unqueue(job)
        self._free_job(job)
        if FB_DEBUG:
            self._debug_env(self.jobs[job].env)
        return 0

    cdef int c_job_state(self, int job) noexcept:
        if job < 0 or <uint32_t>job >= self.jobs_len:
            return JOB_FREE
        return self.jobs[job].state

    cdef int c_job_agent(self, int job) noexcept:
        if job < 0 or <uint32_t>job >= self.jobs_len or self.jobs[job].state != JOB_RUNNING:
            return -1
        return self.jobs[job].agent

    # -------------------------------------------------------------------- accessors

    def job_state(self, job: int) -> int:
        """JOB_FREE, JOB_WAITING or JOB_RUNNING (JOB_FREE for an index never used)."""
        return self.c_job_state(_arg(job))

    def job_agent(self, job: int) -> int:
        """The agent a running job runs on, -1 for any other job."""
        return self.c_job_agent(_arg(job))

    def job_env(self, job: int) -> int:
        """The environment of a waiting or running job."""
        cdef int j = _arg(job)
        self._valid_job(j, -1)
        return self.jobs[j].env

    def job_priority(self, job: int) -> int:
        """The priority of a waiting or running job."""
        cdef int j = _arg(job)
        self._valid_job(j, -1)
        return self.jobs[j].priority

    def agent_slots(self, agent: int) -> int:
        """How many slots the agent has."""
        cdef int a = _arg(agent)
        self._valid_agent(a)
        return self.agents[a].slots

    def agent_free_slots(self, agent: int) -> int:
        """How many of the agent's slots are free."""
        cdef int a = _arg(agent)
        self._valid_agent(a)
        return self.agents[a].free

    def agent_envs(self, agent: int) -> tuple[int, ...]:
        """The environments the agent offers, deduplicated, in the order given."""
        cdef int a = _arg(agent)
        cdef uint32_t o
        self._valid_agent(a)
        envs = []
        o = self.agents[a].offer_head
        while o != NIL:
            envs.append(self.offers[o].env)
            o = self.offers[o].agent_next
        return tuple(envs)

    def agent_alive(self, agent: int) -> bool:
        """Whether the index names a registered agent."""
        cdef int a = _arg(agent)
        return a >= 0 and <uint32_t>a < self.agents_len and self.agents[a].alive != 0

    def agent_jobs(self, agent: int) -> list[int]:
        """The jobs running on the agent, in dispatch order."""
        cdef int a = _arg(agent)
        cdef uint32_t j
        self._valid_agent(a)
        jobs = []
        j = self.agents[a].job_head
        while j != NIL:
            jobs.append(j)
            j = self.jobs[j].next
        return jobs

    def waiting_count(self) -> int:
        """How many jobs wait."""
        return self.n_waiting

    def running_count(self) -> int:
        """How many jobs run."""
        return self.n_running

    def waiting_in_env(self, env: int) -> int:
        """How many jobs wait for the environment."""
        return self.envs[self._env_arg(env)].n_waiting

    def waiting_jobs(self) -> list[int]:
        """All waiting jobs in arrival order, whatever their priority (a snapshot for queue listings)."""
        return self._jobs_in_state(JOB_WAITING)

    def running_jobs(self) -> list[int]:
        """All running jobs in dispatch order (a snapshot for queue listings; sorts)."""
        return self._jobs_in_state(JOB_RUNNING)

    @property
    def work(self) -> int:
        """Agent-environment pairs visited so far by the scheduling operations.

        Operations visit the environments of the one agent they concern (to find its
        oldest waiting job, or to move it in or out of the ready queues), nothing else
        that grows; this counter lets tests check that.
        """
        return self.work_done

    def _jobs_in_state(self, int state):
        # Walk only the lists that hold jobs of this state (the environments' queues, or
        # the agents' job lists) and sort their (stamp, job) pairs in C: a snapshot of a
        # million waiting jobs must not stall the broker for seconds.
        cdef uint32_t count = self.n_waiting if state == JOB_WAITING else self.n_running
        cdef Stamped* pairs = <Stamped*>PyMem_Malloc(max(count, 1) * sizeof(Stamped))
        cdef uint32_t n = 0, i, j, k, lists, sources = 0
        if pairs == NULL:
            raise MemoryError()
        try:
            lists = self.envs_len if state == JOB_WAITING else self.agents_len
            for i in range(lists):
                j = self.envs[i].wait_head if state == JOB_WAITING else (
                    self.agents[i].job_head if self.agents[i].alive else NIL)
                if j != NIL:
                    sources += 1
                while j != NIL and n < count:
                    pairs[n].stamp = self.jobs[j].stamp
                    pairs[n].job = j
                    n += 1
                    j = self.jobs[j].next
                if state == JOB_WAITING and self.envs[i].heap_len:
                    sources += 2  # a heap is not in stamp order
                    for k in range(self.envs[i].heap_len):
                        if n >= count:
                            break
                        j = self.envs[i].heap[k]
                        pairs[n].stamp = self.jobs[j].stamp
                        pairs[n].job = j
                        n += 1
            if sources > 1:  # one run is already in stamp order
                qsort(pairs, n, sizeof(Stamped), _by_stamp)
            return [pairs[i].job for i in range(n)]
        finally:
            PyMem_Free(pairs)

    def _env_arg(self, env):
        cdef int e = _arg(env)
        if e < 0 or <uint32_t>e >= self.envs_len:
            raise ValueError(f"unknown environment {env}")
        return e

    # ------------------------------------------------------------------------ check

    def check(self) -> None:
        """Verify every invariant (slow, for tests); raise AssertionError naming the broken one."""
        cdef uint32_t j, a, e, o, k, steps, count, prev
        cdef uint64_t last_stamp = 0
        cdef Job* job
        cdef Agent* ag
        cdef Env* env

        # Free lists: bounded walks, so that a cycle is reported rather than spun on.
        free_jobs = set()
        j = self.job_free
        while j != NIL:
            if j >= self.jobs_len or j in free_jobs:
                _fail(f"job free list broken at {j}")
            if self.jobs[j].state != JOB_FREE:
                _fail(f"job {j}: on the free list but not free")
            free_jobs.add(j)
            j = self.jobs[j].next
        free_agents = set()
        a = self.agent_free
        while a != NIL:
            if a >= self.agents_len or a in free_agents:
                _fail(f"agent free list broken at {a}")
            free_agents.add(a)
            a = self.agents[a].next_free
        free_offers = set()
        o = self.offer_free
        while o != NIL:
            if o >= self.offers_len or o in free_offers:
                _fail(f"offer free list broken at {o}")
            free_offers.add(o)
            o = self.offers[o].agent_next

        waiting = running = 0
        for j in range(self.jobs_len):
            job = &self.jobs[j]
            if job.state == JOB_FREE:
                if j not in free_jobs:
                    _fail(f"job {j}: free but not on the free list")
            elif job.state == JOB_WAITING:
                waiting += 1
                if job.env >= self.envs_len:
                    _fail(f"job {j}: waiting with a bad env")
                if job.heap_pos != NIL and (
                        job.heap_pos >= self.envs[job.env].heap_len or self.envs[job.env].heap[job.heap_pos] != j):
                    _fail(f"job {j}: heap position is wrong")
            elif job.state == JOB_RUNNING:
                running += 1
                if job.agent >= self.agents_len or not self.agents[job.agent].alive:
                    _fail(f"job {j}: runs on a dead agent")
            else:
                _fail(f"job {j}: bad state {job.state}")
            if job.state == JOB_FREE and job.agent != NIL:
                _fail(f"job {j}: free but has an agent or a heap position")
        if waiting != self.n_waiting:
            _fail("waiting count is wrong")
        if running != self.n_running:
            _fail("running count is wrong")

        # Every waiting job is in its environment's queue (the counts then match).
        queued = 0
        for e in range(self.envs_len):
            env = &self.envs[e]
            count = 0
            prev = NIL
            j = env.wait_head
            while j != NIL:
                if count >= self.jobs_len:
                    _fail(f"env {e}: queue has a cycle")
                job = &self.jobs[j]
                if job.state != JOB_WAITING or job.env != e or job.heap_pos != NIL:
                    _fail(f"env {e}: queues job {j}, not waiting for it in the run")
                if job.prev != prev:
                    _fail(f"env {e}: bad back link at job {j}")
                if count and not _before(&self.jobs[prev], job):
                    _fail(f"env {e}: run out of (priority, arrival) order")
                count += 1
                prev = j
                j = job.next
            if prev != env.wait_tail:
                _fail(f"env {e}: run tail is wrong")
            if env.heap_len > env.heap_cap or (env.heap_cap and env.heap == NULL):
                _fail(f"env {e}: heap length or capacity is wrong")
            for k in range(env.heap_len):
                j = env.heap[k]
                if j >= self.jobs_len:
                    _fail(f"env {e}: heap holds a bad index {j}")
                job = &self.jobs[j]
                if job.state != JOB_WAITING or job.env != e or job.heap_pos != k:
                    _fail(f"env {e}: heap holds job {j}, not waiting for it at {k}")
                if k and not _before(&self.jobs[env.heap[(k - 1) // 2]], job):
                    _fail(f"env {e}: heap order broken at {k}")
            count += env.heap_len
            if count != env.n_waiting:
                _fail(f"env {e}: waiting count is wrong")
            queued += count

            prev = NIL
            steps = 0
            o = env.ready_head
            while o != NIL:
                if steps >= self.offers_len:
                    _fail(f"env {e}: ready queue has a cycle")
                if o in free_offers or self.offers[o].env != e or self.offers[o].prev != prev:
                    _fail(f"env {e}: ready queue broken at offer {o}")
                ag = &self.agents[self.offers[o].agent]
                if not ag.alive or not ag.ready:
                    _fail(f"env {e}: agent {self.offers[o].agent} queued but not ready")
                steps += 1
                prev = o
                o = self.offers[o].next
            if prev != env.ready_tail:
                _fail(f"env {e}: ready queue tail is wrong")
        if queued != self.n_waiting:
            _fail("some waiting job is in no queue")

        on_agents = 0
        for a in range(self.agents_len):
            ag = &self.agents[a]
            if not ag.alive:
                if a not in free_agents:
                    _fail(f"agent {a}: dead but not on the free list")
                continue
            if a in free_agents:
                _fail(f"agent {a}: alive but on the free list")
            if ag.free + ag.n_jobs != ag.slots:
                _fail(f"agent {a}: slots")
            if ag.ready != (ag.free > 0):
                _fail(f"agent {a}: ready flag")
            count = 0
            prev = NIL
            j = ag.job_head
            while j != NIL:
                if count >= self.jobs_len:
                    _fail(f"agent {a}: job list has a cycle")
                job = &self.jobs[j]
                if job.state != JOB_RUNNING or job.agent != a or job.prev != prev:
                    _fail(f"agent {a}: job list broken at job {j}")
                if count and job.stamp <= last_stamp:
                    _fail(f"agent {a}: jobs out of dispatch order")
                last_stamp = job.stamp
                count += 1
                prev = j
                j = job.next
            if prev != ag.job_tail or count != ag.n_jobs:
                _fail(f"agent {a}: job list tail or count is wrong")
            on_agents += count

            seen = set()
            o = ag.offer_head
            while o != NIL:
                if o in free_offers or o in seen or self.offers[o].agent != a:
                    _fail(f"agent {a}: offer chain broken at {o}")
                seen.add(o)
                e = self.offers[o].env
                if e >= self.envs_len:
                    _fail(f"agent {a}: offers unknown env {e}")
                in_queue = self.offers[o].prev != NIL or self.envs[e].ready_head == o
                if in_queue != (ag.free > 0):
                    _fail(f"agent {a}: ready queue of env {e}")
                if ag.free > 0 and not ag.pending and self.envs[e].n_waiting:
                    _fail(f"env {e}: jobs wait while agent {a} has a free slot")
                o = self.offers[o].agent_next
            if len(seen) != ag.n_envs or len({self.offers[o].env for o in seen}) != len(seen):
                _fail(f"agent {a}: environment count or duplicate")
        if on_agents != self.n_running:
            _fail("some running job is on no agent")

    # -------------------------------------------------------------------- internals

    cdef int _valid_job(self, int job, int state) except -1:
        """Raise ValueError unless ``job`` is in use (and in ``state``, unless that is -1)."""
        if job < 0 or <uint32_t>job >= self.jobs_len or self.jobs[job].state == JOB_FREE:
            raise ValueError(f"unknown job {job}")
        if state == JOB_WAITING and self.jobs[job].state != JOB_WAITING:
            raise ValueError(f"job {job} is not waiting")
        if state == JOB_RUNNING and self.jobs[job].state != JOB_RUNNING:
            raise ValueError(f"job {job} is not running")
        return 0

    cdef int _valid_agent(self, int agent) except -1:
        if agent < 0 or <uint32_t>agent >= self.agents_len or not self.agents[agent].alive:
            raise ValueError(f"unknown agent {agent}")
        return 0

    cdef int _new_job(self) except -1:
        cdef uint32_t j
        if self.job_free != NIL:
            j = self.job_free
            self.job_free = self.jobs[j].next
            return j
        if self.jobs_len >= self.jobs_cap:
            _grow(<void**>&self.jobs, &self.jobs_cap, sizeof(Job), self.jobs_len)
        self.jobs_len += 1
        return self.jobs_len - 1

    cdef void _free_job(self, uint32_t job) noexcept:
        self.jobs[job].state = JOB_FREE
        self.jobs[job].agent = NIL  # (the heap position's bytes too)
        self.jobs[job].prev = NIL
        self.jobs[job].next = self.job_free
        self.job_free = job

    cdef uint32_t _best_offer(self, uint32_t agent, uint32_t* job) noexcept:
        """The agent's offer whose environment holds the best waiting job (put in ``*job``).

        NIL (and ``*job`` NIL) if no job waits in the agent's environments.
        """
        cdef uint32_t best = NIL, best_job = NIL, j
        cdef uint32_t o = self.agents[agent].offer_head
        while o != NIL:
            self.work_done += 1
            j = _env_best(&self.envs[self.offers[o].env], self.jobs)
            if j != NIL and (best == NIL or _before(&self.jobs[j], &self.jobs[best_job])):
                best = o
                best_job = j
            o = self.offers[o].agent_next
        job[0] = best_job
        return best

    cdef void _unqueue(self, uint32_t job) noexcept:
        """Take a waiting job out of its environment's run or heap."""
        cdef Job* j = &self.jobs[job]
        cdef Env* e = &self.envs[j.env]
        cdef uint32_t pos, last
        if j.heap_pos == NIL:
            if j.prev != NIL:
                self.jobs[j.prev].next = j.next
            else:
                e.wait_head = j.next
            if j.next != NIL:
                self.jobs[j.next].prev = j.prev
            else:
                e.wait_tail = j.prev
            j.prev = j.next = NIL
        else:
            pos = j.heap_pos
            j.heap_pos = NIL
            e.heap_len -= 1
            last = e.heap[e.heap_len]
            if last != job:  # the last job fills the hole and moves up or down
                e.heap[pos] = last
                self.jobs[last].heap_pos = pos
                self._heap_up(e, pos)
                self._heap_down(e, self.jobs[last].heap_pos)
        e.n_waiting -= 1
        self.n_waiting -= 1

    cdef void _heap_up(self, Env* env, uint32_t pos) noexcept:
        """Move the job at ``pos`` towards the top while it goes before its parent."""
        cdef uint32_t job = env.heap[pos], parent
        while pos > 0:
            parent = (pos - 1) // 2
            if not _before(&self.jobs[job], &self.jobs[env.heap[parent]]):
                break
            env.heap[pos] = env.heap[parent]
            self.jobs[env.heap[pos]].heap_pos = pos
            pos = parent
        env.heap[pos] = job
        self.jobs[job].heap_pos = pos

    cdef void _heap_down(self, Env* env, uint32_t pos) noexcept:
        """Move the job at ``pos`` towards the leaves while a child goes before it."""
        cdef uint32_t job = env.heap[pos], child
        cdef uint64_t c
        while True:
            c = 2 * <uint64_t>pos + 1
            if c >= env.heap_len:
                break
            child = <uint32_t>c
            if child + 1 < env.heap_len and _before(&self.jobs[env.heap[child + 1]], &self.jobs[env.heap[child]]):
                child += 1
            if not _before(&self.jobs[env.heap[child]], &self.jobs[job]):
                break
            env.heap[pos] = env.heap[child]
            self.jobs[env.heap[pos]].heap_pos = pos
            pos = child
        env.heap[pos] = job
        self.jobs[job].heap_pos = pos

    cdef void _start(self, uint32_t job, uint32_t offer) noexcept:
        """Run ``job`` on the agent of ``offer`` (which has a free slot and offers the job's env)."""
        cdef uint32_t a = self.offers[offer].agent
        cdef Agent* ag = &self.agents[a]
        cdef Job* j = &self.jobs[job]
        j.state = JOB_RUNNING
        j.agent = a
        j.stamp = self.clock
        self.clock += 1
        j.next = NIL
        j.prev = ag.job_tail
        if ag.job_tail != NIL:
            self.jobs[ag.job_tail].next = job
        else:
            ag.job_head = job
        ag.job_tail = job
        ag.n_jobs += 1
        ag.free -= 1
        self.n_running += 1
        # An agent with a free slot is always in the ready queues, except in finish's
        # hand-over, where the slot it frees is taken at once and it never joined them.
        if ag.free == 0:
            if ag.ready:
                self._ready_leave(a)
        else:
            self._ready_unlink(offer)
            self._ready_append(offer)

    cdef void _ready_join(self, uint32_t agent) noexcept:
        cdef uint32_t o = self.agents[agent].offer_head
        while o != NIL:
            self.work_done += 1
            self._ready_append(o)
            o = self.offers[o].agent_next
        self.agents[agent].ready = 1

    cdef void _ready_leave(self, uint32_t agent) noexcept:
        cdef uint32_t o = self.agents[agent].offer_head
        while o != NIL:
            self.work_done += 1
            self._ready_unlink(o)
            o = self.offers[o].agent_next
        self.agents[agent].ready = 0

    cdef void _ready_unlink(self, uint32_t offer) noexcept:
        cdef Offer* o = &self.offers[offer]
        cdef Env* e = &self.envs[o.env]
        if o.prev != NIL:
            self.offers[o.prev].next = o.next
        else:
            e.ready_head = o.next
        if o.next != NIL:
            self.offers[o.next].prev = o.prev
        else:
            e.ready_tail = o.prev
        o.prev = o.next = NIL

    cdef void _ready_append(self, uint32_t offer) noexcept:
        cdef Offer* o = &self.offers[offer]
        cdef Env* e = &self.envs[o.env]
        o.next = NIL
        o.prev = e.ready_tail
        if e.ready_tail != NIL:
            self.offers[e.ready_tail].next = offer
        else:
            e.ready_head = offer
        e.ready_tail = offer

    cdef int _debug_agent(self, uint32_t agent) except -1:
        """O(1) checks on one agent, run after mutations in FB_DEBUG builds."""
        cdef Agent* ag = &self.agents[agent]
        if not ag.alive:
            return 0
        if ag.free + ag.n_jobs != ag.slots:
            _fail(f"agent {agent}: free {ag.free} + running {ag.n_jobs} != slots {ag.slots}")
        if ag.ready != (ag.free > 0):
            _fail(f"agent {agent}: ready flag disagrees with free slots")
        if (ag.n_jobs == 0) != (ag.job_head == NIL) or (ag.job_head == NIL) != (ag.job_tail == NIL):
            _fail(f"agent {agent}: job list ends disagree with its count")
        return 0

    cdef int _debug_env(self, uint32_t env) except -1:
        """O(1) checks on one environment, run after mutations in FB_DEBUG builds."""
        cdef Env* e = &self.envs[env]
        if (e.n_waiting == 0) != (e.wait_head == NIL and e.heap_len == 0) or (
                (e.wait_head == NIL) != (e.wait_tail == NIL)):
            _fail(f"env {env}: queue ends disagree with its count")
        if e.heap_len > e.n_waiting or e.heap_len > e.heap_cap:
            _fail(f"env {env}: heap length disagrees with its count or capacity")
        if e.heap_len and self.jobs[e.heap[0]].heap_pos != 0:
            _fail(f"env {env}: heap top does not know its position")
        if (e.ready_head == NIL) != (e.ready_tail == NIL):
            _fail(f"env {env}: ready queue ends disagree")
        # Jobs may wait only while every ready agent offering env is still pending.
        if e.n_waiting and e.ready_head != NIL and not self.agents[self.offers[e.ready_head].agent].pending:
            _fail(f"env {env}: jobs wait while a drained agent has a free slot")
        return 0
