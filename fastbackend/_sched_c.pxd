# Declarations of the compiled scheduler, for the broker's Cython module to cimport:
#
#     from fastbackend._sched_c cimport Scheduler, JOB_WAITING, JOB_RUNNING
#
# Jobs, agents, offers (one per agent-environment pair) and environments live in four
# C arrays of structs grown by doubling.  They link to one another by uint32 index, with
# NIL for "none", so that unlinking is O(1) and nothing is malloc'ed per node.  No struct
# holds a Python object: the only Python state is the environment keys.  Each environment
# also owns one malloc'ed array, the heap of its out-of-order waiting jobs.

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

# Job states; also module attributes (plain ints) for Python callers.
cpdef enum:
    JOB_FREE = 0
    JOB_WAITING = 1
    JOB_RUNNING = 2

cdef enum:
    NIL = 0xFFFFFFFF
    ENV_MAX = 0x3FFFFFFF   # environment ids fit Job.env's 30 bits


# A job: 32 bytes (a million queued jobs hold a million of them).  ``agent`` (running) and
# ``heap_pos`` (waiting) share their four bytes, and ``env`` and ``state`` theirs: C
# declares the layout, Cython reads the fields by name.
cdef extern from *:
    """
    #include <stdint.h>
    typedef struct {
        uint64_t stamp;     /* clock value at arrival while waiting, at dispatch while running */
        int64_t priority;   /* lower starts first; waiting jobs are ordered by (priority, stamp) */
        /* Waiting in the run: neighbours in the environment's run.  Running: neighbours
           in the agent's job list.  Free: next is the next free job.  Otherwise NIL. */
        uint32_t prev;
        uint32_t next;
        union {
            uint32_t agent;     /* running: its agent */
            uint32_t heap_pos;  /* waiting: its index in the environment's heap, NIL in the run */
        };                      /* free: NIL */
        uint32_t env : 30;      /* ENV_MAX is the largest */
        uint32_t state : 2;
    } fb_sched_job;
    """
    ctypedef struct Job "fb_sched_job":
        uint64_t stamp
        int64_t priority
        uint32_t prev
        uint32_t next
        uint32_t agent
        uint32_t heap_pos
        uint32_t env
        uint32_t state


ctypedef struct Agent:
    uint32_t slots
    uint32_t free          # free slots
    uint32_t n_jobs        # running jobs; free + n_jobs == slots
    uint32_t job_head      # running jobs, in dispatch order
    uint32_t job_tail
    uint32_t offer_head    # the agent's offers, in the order the environments were given
    uint32_t n_envs
    uint32_t next_free     # free list link while dead
    uint8_t alive
    uint8_t ready          # its offers are in the ready queues; == (alive and free > 0)
    uint8_t pending        # added, and next_job has not yet returned -1 for it


ctypedef struct Offer:
    # "agent offers env": one node per pair, the node that sits in env's ready queue.
    uint32_t agent
    uint32_t env
    uint32_t prev          # neighbours in the environment's ready queue, while ready
    uint32_t next
    uint32_t agent_next    # the agent's next offer; free list link while free


ctypedef struct Env:
    # Waiting jobs (see _sched_py): the run, a FIFO whose (priority, stamp) keys increase
    # from head to tail, holds every job whose priority was not below the tail's when it
    # arrived; the others are in the heap, a binary min-heap by key of job indices.
    uint32_t wait_head     # the run
    uint32_t wait_tail
    uint32_t* heap         # PyMem-allocated, heap_cap entries; freed in __dealloc__
    uint32_t heap_len
    uint32_t heap_cap
    uint32_t n_waiting     # in the run and the heap
    uint32_t ready_head    # offers of agents with a free slot, head is served next
    uint32_t ready_tail


@cython.final
cdef class Scheduler:
    cdef Job* jobs
    cdef Agent* agents
    cdef Offer* offers
    cdef Env* envs
    cdef uint32_t jobs_len, jobs_cap, job_free       # len: one more than the highest index used
    cdef uint32_t agents_len, agents_cap, agent_free
    cdef uint32_t offers_len, offers_cap, offer_free
    cdef uint32_t envs_len, envs_cap
    cdef uint64_t clock
    cdef uint32_t n_waiting, n_running
    cdef uint64_t work_done
    cdef dict env_ids        # name -> environment index
    cdef list env_names      # environment index -> name

    # The broker's fast path.  Arguments out of range or naming a free job / dead
    # agent raise ValueError.
    # The new job; *agent = -1 if it waits.  Any int64_t priority is valid.
    cdef int c_submit(self, int env, int64_t priority, int* agent) except -1
    cdef int c_finish(self, int job) except -2                  # the job started in its slot, or -1
    cdef int c_next_job(self, int agent) except -2              # the job started, or -1
    cdef int c_cancel(self, int job) except -1
    cdef int c_job_state(self, int job) noexcept                # JOB_FREE when out of range
    cdef int c_job_agent(self, int job) noexcept                # -1 unless running

    # Internals.
    cdef int _valid_job(self, int job, int state) except -1
    cdef int _valid_agent(self, int agent) except -1
    cdef int _new_job(self) except -1
    cdef void _free_job(self, uint32_t job) noexcept
    cdef uint32_t _best_offer(self, uint32_t agent, uint32_t* job) noexcept
    cdef void _unqueue(self, uint32_t job) noexcept
    cdef void _heap_up(self, Env* env, uint32_t pos) noexcept
    cdef void _heap_down(self, Env* env, uint32_t pos) noexcept
    cdef void _start(self, uint32_t job, uint32_t offer) noexcept
    cdef void _ready_join(self, uint32_t agent) noexcept
    cdef void _ready_leave(self, uint32_t agent) noexcept
    cdef void _ready_unlink(self, uint32_t offer) noexcept
    cdef void _ready_append(self, uint32_t offer) noexcept
    cdef int _debug_agent(self, uint32_t agent) except -1
    cdef int _debug_env(self, uint32_t env) except -1
