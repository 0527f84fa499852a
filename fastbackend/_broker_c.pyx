# The broker's hot path, compiled: the fast twin of ``_broker_py`` (read that first:
# it is the readable truth, and this module must behave exactly like it).
#
# What is different here is how the bytes move and where the state lives.  ``drain``
# receives with libzmq's zmq_msg_recv straight from the ROUTER sockets (see _libzmq.pxi
# for how we reach the very libzmq pyzmq uses), scans the frame in place with the wire
# module's C functions, and writes spliced frames straight into libzmq message buffers
# that zmq_msg_send then owns.  The per-job state is C: each job is one malloc'ed record
# (its key, its owner's identity and its client frame, see JobRecord), found by key in
# a C hash index (_keymap.pxi); peers and environments are looked up in ByteMaps with the
# bytes of the received frame.  So a job that arrives, runs and ends makes no Python
# object and touches no Python dict.  Both dialects take the same path: the scan says
# which dialect's tables matched, and the splicers follow that dialect's rules.
#
# The rare paths (``broker.BrokerLogic``: hellos, kills, snapshots, removals, logging)
# read the same state through small views (``jobs``, ``job_key``, ``job_client``,
# ``job_frame``, ``job_started``) that build the Python objects when they are asked,
# and use ``clients`` and ``agents`` as the dicts the pure-Python core has.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

from fastbackend._sched_c cimport JOB_RUNNING, Scheduler
from fastbackend._wire_c cimport (
    PLAN_ENTRIES,
    PLAN_NONE,
    NewJobPlan,
    Scan,
    agent_to_client_size,
    job_key_c,
    job_key_size,
    job_started_size,
    new_job_size,
    plan_new_job,
    planned_new_job_size,
    same_bytes,
    scan_agent_c,
    scan_client_c,
    write_agent_to_client,
    write_job_key,
    write_job_started,
    write_new_job,
    write_planned_new_job,
)


import zmq as pyzmq

from fastbackend import protocol
from fastbackend.protocol import DIALECTS, FIRST_GUESS, WireError, WrongDialect

include "_libzmq.pxi"
include "_sendpool.pxi"
include "_keymap.pxi"

cdef extern from *:
    """
    #ifndef FB_DEBUG
    #define FB_DEBUG 0
    #endif
    """
    const int FB_DEBUG

# Message type codes, taken from protocol (module-level C ints, read as fast as literals).
cdef int CLIENT_HELLO = protocol.CLIENT_HELLO
cdef int CLIENT_NEW_JOB = protocol.CLIENT_NEW_JOB
cdef int CLIENT_KILL_JOB = protocol.CLIENT_KILL_JOB
cdef int CLIENT_GET_QUEUE = protocol.CLIENT_GET_QUEUE
cdef int PING = protocol.PING
cdef int PONG = protocol.PONG
cdef int AGENT_HELLO = protocol.AGENT_HELLO
cdef int AGENT_JOB_STARTED = protocol.AGENT_JOB_STARTED
cdef int AGENT_JOB_DONE = protocol.AGENT_JOB_DONE
cdef int AGENT_JOB_SSH_DEBUG = protocol.AGENT_JOB_SSH_DEBUG

cdef enum:
    FRAME_WEIGHT = 64 * 1024   # bytes that count as one more message in a drain's budget
    N_DIALECTS = 2
    N_BUCKETS = 21             # len(_broker_py.TIME_BUCKETS) + 1

from fastbackend._broker_py import TIME_BUCKETS

if len(DIALECTS) != N_DIALECTS or len(TIME_BUCKETS) + 1 != N_BUCKETS:
    raise ImportError("_broker_c was built for another number of dialects or time buckets")
cdef double BOUNDS[N_BUCKETS - 1]
for _i, _bound in enumerate(TIME_BUCKETS):
    BOUNDS[_i] = _bound


cdef inline double _monotonic() noexcept:
    """time.monotonic(), without a Python call (Python reads the same clock)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline double _wall_clock() noexcept:
    """time.time(), without a Python call."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline int _bucket(double seconds) noexcept:
    """The histogram bucket of a duration: bisect_left over BOUNDS, as _broker_py does."""
    cdef int i = 0
    while i < N_BUCKETS - 1 and BOUNDS[i] < seconds:
        i += 1
    return i

#: Whether this build has the invariant checks compiled in (FASTBACKEND_DEBUG=1).
DEBUG = bool(FB_DEBUG)

BYTES_PER_MESSAGE = FRAME_WEIGHT  # must equal _broker_py.BYTES_PER_MESSAGE (a test checks)

cdef int V05 = protocol.V05
cdef int V09 = protocol.V09
# Frames per dialect tag.
cdef tuple PONG_FRAMES = tuple(d.pong_frame for d in DIALECTS)
cdef tuple UNKNOWN_FRAMES = tuple(d.unknown_frame for d in DIALECTS)


# The scanners called through a pointer that Cython treats as not raising: -1 then means
# a WireError is *pending*, and the caller takes the rare path (with its try) only then.
# A try around every scan costs the saving and restoring of the exception state, each
# message (~80 instructions).
ctypedef int (*scan_pending_t)(int, const char*, Py_ssize_t, Scan*) noexcept


cdef inline int _scan_pending(bint from_agent, int dialect, const char* data, Py_ssize_t size,
                              Scan* scan) noexcept:
    """0 when scanned; -1 with the scanner's exception set, not yet raised."""
    cdef scan_pending_t scan_fn
    if from_agent:
        scan_fn = <scan_pending_t>scan_agent_c
    else:
        scan_fn = <scan_pending_t>scan_client_c
    return scan_fn(dialect, data, size, scan)


cdef int _raise_pending() except -1:
    """Raise the exception that is set (Cython raises it when this returns -1)."""
    return -1


cdef struct JobRecord:
    # One malloc per job, freed with its result: this header, then its owner's identity
    # and the client's new-job frame, kept whole so that the agent's frame is spliced from
    # it at dispatch and the queue snapshot can read its fields.  The job's key
    # (wire.job_key: the owner's identity and the job id in 0.5, the job id in 0.9) is not
    # stored apart: the job id is read where it lies in the frame (``job_id_start``,
    # ``job_id_len``), and the key's hash tag is computed again when the job leaves the
    # index.  ``plan`` holds where the entries the agent's frame changes start (made from
    # the arrival scan: a job that waited is spliced without a second scan; plan.n is
    # PLAN_NONE if the frame could not be planned).  32 bytes.
    NewJobPlan plan
    uint32_t job_id_start
    uint32_t job_id_len
    uint32_t frame_size
    uint8_t owner_size
    uint8_t dialect


cdef inline char* _rec_owner(JobRecord* rec) noexcept:
    return <char*>rec + sizeof(JobRecord)


cdef inline char* _rec_frame(JobRecord* rec) noexcept:
    return <char*>rec + sizeof(JobRecord) + rec.owner_size


cdef inline bytes _rec_key(JobRecord* rec):
    """The job's key (wire.job_key), built."""
    return job_key_c(rec.dialect, _rec_owner(rec), rec.owner_size,
                     _rec_frame(rec) + rec.job_id_start, rec.job_id_len)


cdef bint _job_key_is(void* owner, uint32_t job, const char* key, Py_ssize_t size) noexcept:
    """Whether the key of ``job`` is ``key[:size]``: wire.write_job_key's layout, compared
    part by part with the record (owner: the address of a BrokerCore's job_rec)."""
    cdef JobRecord* rec = (<JobRecord***>owner)[0][job]
    cdef Py_ssize_t ident_len = 0 if rec.dialect == V09 else rec.owner_size
    if size != 1 + ident_len + <Py_ssize_t>rec.job_id_len or <uint8_t>key[0] != ident_len:
        return False
    if ident_len and not same_bytes(key + 1, _rec_owner(rec), ident_len):
        return False
    return same_bytes(key + 1 + ident_len, _rec_frame(rec) + rec.job_id_start, rec.job_id_len)


cdef inline size_t _rec_size(JobRecord* rec) noexcept:
    return sizeof(JobRecord) + rec.owner_size + rec.frame_size


# Finished jobs' records are kept for reuse: a record (header, key, owner, frame) is
# usually larger than glibc's per-thread cache takes (1,032 bytes), so each malloc/free
# pair would otherwise go through the arena's bins, ~550 instructions per job (callgrind).
# A spare is kept on the list of its exact capacity (records are sized as glibc would
# size them anyway, in 16-byte steps, so this costs no memory per job) and serves the
# next record of that capacity.  At most SPARE_BYTES are kept; a record over
# SPARE_MAX_BYTES is never kept.
cdef enum:
    SPARE_STEP_SHIFT = 4
    SPARE_MAX_BYTES = 65536
    SPARE_LISTS = (SPARE_MAX_BYTES >> SPARE_STEP_SHIFT) + 1
    SPARE_BYTES = 4 << 20


cdef struct Spares:
    void** lists      # SPARE_LISTS heads; a spare's first word links to the next
    size_t bytes      # held in all the lists


cdef inline size_t _rec_capacity(size_t need) noexcept:
    """What a record of ``need`` bytes is allocated with: glibc's usable size for a
    request of ``need`` (chunks are 16-byte multiples with an 8-byte header)."""
    return ((need + 8 + 15) & ~(<size_t>15)) - 8


cdef inline JobRecord* _spare_or_malloc(Spares* sp, size_t need) noexcept:
    """A record that holds ``need`` bytes: a spare of that capacity, or a new one (NULL
    when out of memory)."""
    cdef size_t cap = _rec_capacity(need)
    cdef size_t i = cap >> SPARE_STEP_SHIFT
    cdef void* rec
    if cap <= SPARE_MAX_BYTES and sp.lists != NULL and sp.lists[i] != NULL:
        rec = sp.lists[i]
        sp.lists[i] = (<void**>rec)[0]
        sp.bytes -= cap
        return <JobRecord*>rec
    return <JobRecord*>malloc(cap)


cdef inline void _spare_or_free(Spares* sp, JobRecord* rec, size_t need) noexcept:
    """Keep ``rec`` (made for ``need`` bytes) as a spare, or free it."""
    cdef size_t cap = _rec_capacity(need)
    cdef size_t i = cap >> SPARE_STEP_SHIFT
    if cap <= SPARE_MAX_BYTES and sp.bytes + cap <= SPARE_BYTES and sp.lists != NULL:
        (<void**>rec)[0] = sp.lists[i]
        sp.lists[i] = <void*>rec
        sp.bytes += cap
    else:
        free(rec)


cdef void _spares_free(Spares* sp) noexcept:
    cdef int i
    cdef void* rec
    if sp.lists == NULL:
        return
    for i in range(SPARE_LISTS):
        while sp.lists[i] != NULL:
            rec = sp.lists[i]
            sp.lists[i] = (<void**>rec)[0]
            free(rec)
    free(sp.lists)
    sp.lists = NULL
    sp.bytes = 0


cdef struct Held:
    # The message a drain is handling, for its caller to close if handling it raised.
    fb_zmq_msg_t ident
    fb_zmq_msg_t body
    bint held          # ident and body hold that message
    int budget         # what is left of the drain's budget


cdef inline bytes _bytes(const char* data, Py_ssize_t size):
    return PyBytes_FromStringAndSize(data, size)


cdef class BrokerCore:
    """Per-job routing between clients and agents; the compiled twin of ``_broker_py.BrokerCore``."""

    IMPL = "c"

    cdef public object agent_socket
    cdef public object client_socket
    cdef void* agent_handle
    cdef void* client_handle
    cdef public object pinned     # the one dialect served, or None
    cdef int first_guess
    cdef public Scheduler sched
    cdef public ByteMap clients   # identity -> dialect it said hello in
    cdef public ByteMap agents    # identity -> agent index
    cdef public list agent_ident
    cdef public list agent_dialect
    cdef public list agent_missed
    # Jobs, by the scheduler's job index (job_cap long): the record (NULL when the index
    # is free) and one monotonic time, the submission's while the job waits, the
    # dispatch's while it runs (the wait / run time histograms; the wall-clock dispatch
    # time the queue snapshot shows is derived from it).  The index finds a job by its key.
    cdef JobRecord** job_rec
    cdef Spares spares
    cdef double* t_mark
    cdef Py_ssize_t job_cap
    cdef Index job_index
    # A buffer to build the key of a job an agent speaks of (grown as needed).
    cdef char* scratch
    cdef Py_ssize_t scratch_cap
    # Per dialect: environment key bytes -> interned id (saves a decode per job).  The
    # key is the name's UTF-8 in 0.5; in 0.9 the type's length (4 bytes), type, name.
    cdef ByteMap env_ids_05
    cdef ByteMap env_ids_09
    cdef public Py_ssize_t jobs_submitted
    cdef public Py_ssize_t jobs_done
    cdef public Py_ssize_t frames_dropped
    cdef public bint log_jobs     # per-job DEBUG lines (set by the logic layer from the log level)
    # What pump() looks at after a drain (see _broker_py): the logic layer's pending work,
    # read here without a Python lookup, and the shell's hook for it.
    cdef public object agents_gone
    cdef public object snapshot
    cdef public object after_pump
    cdef public int batch
    # For the metrics: counters per dialect, time histograms (counts per bucket, sums).
    cdef Py_ssize_t submitted_by[N_DIALECTS]
    cdef Py_ssize_t done_by[N_DIALECTS]
    cdef Py_ssize_t wait_counts[N_DIALECTS][N_BUCKETS]
    cdef Py_ssize_t run_counts[N_DIALECTS][N_BUCKETS]
    cdef double wait_total[N_DIALECTS]
    cdef double run_total[N_DIALECTS]

    def __cinit__(self, *args, **kwargs):
        index_init(&self.job_index)
        # Without its lists (out of memory), the core simply keeps no spares.
        self.spares.lists = <void**>calloc(SPARE_LISTS, sizeof(void*))
        self.spares.bytes = 0

    def __init__(self, agent_socket, client_socket, dialect=None):
        self.agent_socket = agent_socket
        self.client_socket = client_socket
        # The sockets stay owned by pyzmq (and alive through the references above);
        # we only borrow their libzmq handles.
        self.agent_handle = <void*><size_t>agent_socket.underlying
        self.client_handle = <void*><size_t>client_socket.underlying
        self.pinned = dialect
        self.first_guess = FIRST_GUESS if dialect is None else dialect
        self.sched = Scheduler()
        self.clients = ByteMap()
        self.agents = ByteMap()
        self.agent_ident = []
        self.agent_dialect = []
        self.agent_missed = []
        self.env_ids_05 = ByteMap()
        self.env_ids_09 = ByteMap()
        self.log_jobs = False
        self.agents_gone = set()
        self.snapshot = None
        self.after_pump = None
        self.batch = 256
        self.jobs_submitted = 0
        self.jobs_done = 0
        self.frames_dropped = 0
        memset(self.submitted_by, 0, sizeof(self.submitted_by))
        memset(self.done_by, 0, sizeof(self.done_by))
        memset(self.wait_counts, 0, sizeof(self.wait_counts))
        memset(self.run_counts, 0, sizeof(self.run_counts))
        memset(self.wait_total, 0, sizeof(self.wait_total))
        memset(self.run_total, 0, sizeof(self.run_total))

    def __dealloc__(self):
        cdef Py_ssize_t job
        for job in range(self.job_cap):
            free(self.job_rec[job])
        free(self.job_rec)
        _spares_free(&self.spares)
        free(self.t_mark)
        free(self.scratch)
        index_free(&self.job_index)

    @property
    def spare_bytes(self):
        """Bytes held in finished jobs' records kept for reuse (at most SPARE_BYTES)."""
        return self.spares.bytes

    def counters(self):
        """The per-dialect counters and histograms, as plain lists (see ``_broker_py``)."""
        cdef int d
        return {
            "submitted": [self.submitted_by[d] for d in range(N_DIALECTS)],
            "done": [self.done_by[d] for d in range(N_DIALECTS)],
            "wait": [([self.wait_counts[d][b] for b in range(N_BUCKETS)], self.wait_total[d])
                     for d in range(N_DIALECTS)],
            "run": [([self.run_counts[d][b] for b in range(N_BUCKETS)], self.run_total[d])
                    for d in range(N_DIALECTS)],
        }

    cdef int _grow_jobs(self, Py_ssize_t jobs) except -1:
        """Make the per-job arrays at least ``jobs`` long (doubling)."""
        cdef Py_ssize_t cap = max(jobs, 2 * self.job_cap), job
        # Each array is assigned as soon as it is reallocated: a failure leaves every
        # array at least job_cap long, and job_cap tells how long they all are.
        cdef void* p = realloc(self.job_rec, cap * sizeof(JobRecord*))
        if p == NULL:
            raise MemoryError()
        self.job_rec = <JobRecord**>p
        for job in range(self.job_cap, cap):
            self.job_rec[job] = NULL
        p = realloc(self.t_mark, cap * sizeof(double))
        if p == NULL:
            raise MemoryError()
        self.t_mark = <double*>p
        self.job_cap = cap
        return 0

    cdef char* _scratch(self, Py_ssize_t size) except NULL:
        if size > self.scratch_cap:
            p = realloc(self.scratch, size)
            if p == NULL:
                raise MemoryError()
            self.scratch = <char*>p
            self.scratch_cap = size
        return self.scratch

    cdef inline int _job_of(self, const char* key, Py_ssize_t size, uint32_t tag) noexcept:
        """The job whose key is ``key[:size]`` (hash tag ``tag``), or -1."""
        cdef uint32_t job = index_find(&self.job_index, tag, key, size, _job_key_is, <void*>&self.job_rec)
        return -1 if job == INDEX_NONE else <int>job

    cdef int _find_job(self, int dialect, const char* ident, Py_ssize_t ident_len,
                       const char* job_id, Py_ssize_t job_id_len, uint32_t* tag) except -2:
        """The job of that key (see wire.job_key), or -1; the key's hash tag in ``tag``."""
        cdef char* key = self._scratch(job_key_size(dialect, ident_len, job_id_len))
        cdef Py_ssize_t size = write_job_key(key, dialect, ident, ident_len, job_id, job_id_len)
        tag[0] = fb_tag(key, size)
        return self._job_of(key, size, tag[0])

    # -- the views the rare paths read --------------------------------------------

    @property
    def jobs(self):
        """job key -> job index, for the rare paths (a read-only mapping)."""
        return JobsView(self)

    @property
    def job_key(self):
        """job index -> its key (bytes), or None."""
        return JobColumn(self, COLUMN_KEY)

    @property
    def job_client(self):
        """job index -> its owner's identity (bytes), or None."""
        return JobColumn(self, COLUMN_CLIENT)

    @property
    def job_frame(self):
        """job index -> the client's new-job frame (bytes), or None."""
        return JobColumn(self, COLUMN_FRAME)

    @property
    def job_started(self):
        """job index -> its dispatch time (time.time()), 0.0 for a job never sent."""
        return JobColumn(self, COLUMN_STARTED)

    cdef JobRecord* _record(self, Py_ssize_t job) except NULL:
        """A job's record; KeyError (one internal error, as the pure core's dict would raise)
        rather than a crash if the broker and the scheduler ever disagree about a job."""
        if job < 0 or job >= self.job_cap or self.job_rec[job] == NULL:
            raise KeyError(f"job {job} has no record")
        return self.job_rec[job]

    cdef object _column(self, Py_ssize_t job, int column):
        cdef JobRecord* rec
        if job < 0 or job >= self.job_cap:
            raise IndexError(job)
        if column == COLUMN_STARTED:
            # The wall-clock time of the dispatch, from its monotonic time (kept for the
            # run-time histogram): one timestamp per job, not two.
            if self.sched.c_job_state(job) != JOB_RUNNING:
                return 0.0
            return self.t_mark[job] + (_wall_clock() - _monotonic())
        rec = self.job_rec[job]
        if rec == NULL:
            return None
        if column == COLUMN_KEY:
            return _rec_key(rec)
        if column == COLUMN_CLIENT:
            return _bytes(_rec_owner(rec), rec.owner_size)
        return _bytes(_rec_frame(rec), rec.frame_size)

    cdef int _lookup(self, bytes key) except -2:
        return self._job_of(key, len(key), fb_tag(key, len(key)))

    # -- sending ------------------------------------------------------------------

    cdef int _send_msg(self, void* handle, const char* ident, Py_ssize_t ident_len,
                       fb_zmq_msg_t* body, str side) except -1:
        """Send [ident, body]; libzmq takes ``body`` on success, we close it otherwise."""
        cdef int err
        if _send_more(handle, ident, ident_len) < 0:
            err = lz.last_errno()
            lz.msg_close(body)
            if err == EHOSTUNREACH:
                self.unreachable(side, _bytes(ident, ident_len))
                return 0
            raise pyzmq.ZMQError(err)
        if _msg_send(body, handle) < 0:
            # Cannot happen after the identity frame went through (no high-water mark),
            # but never leave a half-sent message unexplained.
            err = lz.last_errno()
            lz.msg_close(body)
            raise pyzmq.ZMQError(err)
        return 0

    cdef int _send_bytes(self, void* handle, const char* ident, Py_ssize_t ident_len,
                         bytes frame, str side) except -1:
        cdef fb_zmq_msg_t body
        cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
        if lz.msg_init_size(&body, size) != 0:
            raise MemoryError()
        memcpy(lz.msg_data(&body), PyBytes_AS_STRING(frame), size)
        return self._send_msg(handle, ident, ident_len, &body, side)

    def send_client(self, bytes ident, bytes frame):
        """Send one frame to a client (see ``_broker_py.BrokerCore.send_client``)."""
        self._send_bytes(self.client_handle, PyBytes_AS_STRING(ident), PyBytes_GET_SIZE(ident), frame, "client")

    def send_agent(self, bytes ident, bytes frame):
        """Send one frame to an agent."""
        self._send_bytes(self.agent_handle, PyBytes_AS_STRING(ident), PyBytes_GET_SIZE(ident), frame, "agent")

    # -- draining -----------------------------------------------------------------

    def pump(self):
        """One wake-up, all in C: drain both sockets (``batch`` messages each at most), and
        enter Python (``after_pump(more)``) only if something is left to do.  The server hands
        this method to the event loop as the sockets' reader callback."""
        cdef bint more = self._drain_both(self.batch)
        if more or self.agents_gone or self.snapshot is not None:
            self.after_pump(more)

    def drain(self, int budget):
        """Handle up to ``budget`` messages from each socket; True if more may wait."""
        return self._drain_both(budget)

    cdef bint _drain_both(self, int budget) except -1:
        self._drain(self.agent_handle, budget, True)
        self._drain(self.client_handle, budget, False)
        return _has_input(self.agent_handle) or _has_input(self.client_handle)

    cdef int _drain(self, void* handle, int budget, bint from_agents) except -1:
        """Handle up to ``budget`` messages from one socket.  A message whose handling
        raises costs that message only (an internal-error log line), never the broker:
        the try is around the run of messages, not each one (see _scan_pending), and the
        run goes on after the failed message."""
        cdef Held held
        held.held = False
        held.budget = budget
        while held.budget > 0:
            try:
                self._drain_run(handle, from_agents, &held)
                return 0
            except Exception:
                if not held.held:
                    raise  # libzmq failed outside a message: as any socket error
                self.internal_error("agent" if from_agents else "client", self._ident(&held.ident))
            finally:
                if held.held:
                    held.held = False
                    lz.msg_close(&held.body)
                    lz.msg_close(&held.ident)
        return 0

    @cython.cdivision(True)  # size // FRAME_WEIGHT: both positive
    cdef int _drain_run(self, void* handle, bint from_agents, Held* held) except -1:
        """_drain's loop; ``held`` holds the message being handled (its frames are closed
        by the caller if this raises) and what is left of the budget."""
        cdef fb_zmq_msg_t extra
        cdef int frames, err, received
        cdef bint more
        cdef const char* data = NULL
        cdef Py_ssize_t size = 0, ident_size
        while held.budget > 0:
            held.budget -= 1
            lz.msg_init(&held.ident)
            received = _msg_recv(&held.ident, handle)
            if received < 0:
                err = lz.last_errno()
                lz.msg_close(&held.ident)
                if err == EAGAIN:
                    held.budget = 0
                    return 0
                raise pyzmq.ZMQError(err)
            # Each frame's size is what zmq_msg_recv returned (it clamps at INT_MAX, far
            # above the largest frame the sockets take; see _msg_size_of).
            ident_size = _msg_size_of(&held.ident, received)
            # A ROUTER hands over whole messages: the rest is already here.
            lz.msg_init(&held.body)
            held.held = True
            frames = 0
            received = _msg_recv(&held.body, handle) if lz.msg_more(&held.ident) else -1
            if received >= 0:
                frames = 1
                more = lz.msg_more(&held.body)
                while more:  # frames a real peer never sends: counted, then dropped
                    lz.msg_init(&extra)
                    if _msg_recv(&extra, handle) < 0:
                        lz.msg_close(&extra)
                        break
                    frames += 1
                    more = lz.msg_more(&extra)
                    lz.msg_close(&extra)
                # Each message's size and data are read once, here.  Big frames weigh
                # more (see _broker_py.BYTES_PER_MESSAGE); the extra frames of a malformed
                # message are not counted.
                data = <const char*>lz.msg_data(&held.body)
                size = _msg_size_of(&held.body, received)
                held.budget -= <int>(size // FRAME_WEIGHT)
            if frames != 1:
                self.dropped("agent" if from_agents else "client", self._ident(&held.ident),
                             f"{frames} frames in one message, expected 1", "multipart")
            elif from_agents:
                self._on_agent(<const char*>lz.msg_data(&held.ident), ident_size, data, size)
            else:
                self._on_client(<const char*>lz.msg_data(&held.ident), ident_size, data, size)
            held.held = False
            lz.msg_close(&held.body)
            lz.msg_close(&held.ident)
        return 0

    cdef bytes _ident(self, fb_zmq_msg_t* ident):
        return _bytes(<const char*>lz.msg_data(ident), lz.msg_size(ident))

    cdef int _scan(self, bint from_agent, const char* ident, Py_ssize_t ident_len, const char* data,
                   Py_ssize_t size, int dialect, bint known, Scan* scan) except -1:
        """Scan as ``dialect``, or as the dialect the frame turns out to be in (see
        ``_broker_py.BrokerCore._scan``); 1 when scanned, 0 when the frame was dropped."""
        if _scan_pending(from_agent, dialect, data, size, scan) == 0:
            return 1
        return self._scan_failed(from_agent, ident, ident_len, data, size, dialect, known, scan)

    cdef int _scan_failed(self, bint from_agent, const char* ident, Py_ssize_t ident_len,
                          const char* data, Py_ssize_t size, int dialect, bint known, Scan* scan) except -1:
        """_scan's rare path, with the first scan's exception pending."""
        cdef str side = "agent" if from_agent else "client"
        first_error = None
        try:
            _raise_pending()
        except WrongDialect as exc:
            if self.pinned is not None:
                self.wrong_dialect(side, _bytes(ident, ident_len), exc.dialect)
                return 0
            dialect = exc.dialect
        except WireError as exc:
            if known or self.pinned is not None:
                self.dropped(side, _bytes(ident, ident_len), str(exc))
                return 0
            dialect, first_error = 1 - dialect, exc  # the other of the two dialects
        if _scan_pending(from_agent, dialect, data, size, scan) == 0:
            return 1
        try:
            _raise_pending()
        except WireError as exc:
            if first_error is not None:
                reason = str(first_error)
            elif isinstance(exc, WrongDialect):
                reason = "holds the type keys of two dialects"
            else:
                reason = str(exc)
            self.dropped(side, _bytes(ident, ident_len), reason)
        return 0

    # -- clients ------------------------------------------------------------------

    cdef int _on_client(self, const char* ident, Py_ssize_t ident_len, const char* data,
                        Py_ssize_t size) except -1:
        cdef Scan scan
        cdef int64_t registered = self.clients.c_get(ident, ident_len, -1)
        if not self._scan(False, ident, ident_len, data, size,
                          self.first_guess if registered < 0 else <int>registered, registered >= 0, &scan):
            return 0
        if scan.type == CLIENT_HELLO:
            self.client_hello(_bytes(ident, ident_len), _bytes(data, size), scan.dialect)
            return 0
        if registered != scan.dialect:
            self._send_bytes(self.client_handle, ident, ident_len, UNKNOWN_FRAMES[scan.dialect], "client")
            return 0
        if scan.type == CLIENT_NEW_JOB:
            self._new_job(ident, ident_len, &scan, data, size)
        elif scan.type == PING:
            self._send_bytes(self.client_handle, ident, ident_len, PONG_FRAMES[scan.dialect], "client")
        elif scan.type == CLIENT_KILL_JOB:
            self.kill_job(_bytes(ident, ident_len), PyUnicode_DecodeUTF8(scan.job_id, scan.job_id_len, NULL),
                          scan.dialect)
        elif scan.type == CLIENT_GET_QUEUE:
            self.client_get_queue(_bytes(ident, ident_len), scan.dialect)
        return 0

    cdef int _env(self, const Scan* scan) except -1:
        """The interned environment of a scanned new job, looked up by its bytes: the name
        (0.5), or the type's length (4 bytes), type and name (0.9), built in the scratch."""
        cdef ByteMap ids = self.env_ids_05 if scan.env_type == NULL else self.env_ids_09
        cdef const char* key = scan.env
        cdef Py_ssize_t size = scan.env_len
        cdef uint32_t type_len
        cdef char* o
        if scan.env_type != NULL:
            size = 4 + scan.env_type_len + scan.env_len
            o = self._scratch(size)
            type_len = <uint32_t>scan.env_type_len
            memcpy(o, &type_len, 4)
            memcpy(o + 4, scan.env_type, scan.env_type_len)
            memcpy(o + 4 + scan.env_type_len, scan.env, scan.env_len)
            key = o
        cdef int64_t env = ids.c_get(key, size, -1)
        if env >= 0:
            return <int>env
        name = PyUnicode_DecodeUTF8(scan.env, scan.env_len, NULL)
        if scan.env_type != NULL:
            name = (PyUnicode_DecodeUTF8(scan.env_type, scan.env_type_len, NULL), name)
        env = self.sched.env_id(name)
        ids.c_set(key, size, env)  # env_id does not touch the scratch
        return <int>env

    cdef int _new_job(self, const char* ident, Py_ssize_t ident_len, Scan* scan, const char* data,
                      Py_ssize_t size) except -1:
        cdef int job, agent = -1
        cdef uint32_t tag
        cdef size_t rec_size = sizeof(JobRecord) + ident_len + size
        cdef JobRecord* rec
        self.jobs_submitted += 1
        self.submitted_by[scan.dialect] += 1
        if self._find_job(scan.dialect, ident, ident_len, scan.job_id, scan.job_id_len, &tag) >= 0:
            self.duplicate_job(_bytes(ident, ident_len),
                               PyUnicode_DecodeUTF8(scan.job_id, scan.job_id_len, NULL), scan.dialect)
            return 0
        rec = _spare_or_malloc(&self.spares, rec_size)
        if rec == NULL:
            raise MemoryError()
        rec.job_id_start = <uint32_t>(scan.job_id - data)  # the scan's spans lie in data
        rec.job_id_len = <uint32_t>scan.job_id_len
        rec.owner_size = <uint8_t>ident_len   # a ZeroMQ identity: 1..255 bytes
        rec.frame_size = <uint32_t>size       # at most MAX_FRAME_SIZE (256 MiB)
        rec.dialect = <uint8_t>scan.dialect
        plan_new_job(data, scan, &rec.plan)  # if it cannot, plan.n says so
        memcpy(_rec_owner(rec), ident, ident_len)
        memcpy(_rec_frame(rec), data, size)
        try:
            # Room first, so that nothing can fail once the scheduler holds the job: its
            # index is at most jobs_len (a freed index, or the next new one).
            if self.sched.jobs_len >= self.job_cap:
                self._grow_jobs(self.sched.jobs_len + 1)
            index_reserve(&self.job_index, self.job_index.count + 1)
            job = self.sched.c_submit(self._env(scan), scan.priority, &agent)
        except BaseException:
            _spare_or_free(&self.spares, rec, rec_size)
            raise
        index_insert(&self.job_index, tag, job)
        self.job_rec[job] = rec
        self.t_mark[job] = _monotonic()  # submitted; _sent_new_job makes it the dispatch time
        if FB_DEBUG:
            self._check_counts()
            # The key read from the record (owner, job id in the frame) finds this job.
            if self._lookup(_rec_key(rec)) != job:
                raise AssertionError(f"job {job} is not found by its own key")
        if self.log_jobs:
            self.job_event("queued", job, -1)
        if agent >= 0:
            # Straight from the received buffer: its scan is still valid.
            self._send_new_job(job, agent, scan, data)
        return 0

    def dispatch(self, int job, int agent):
        """Send a job the scheduler has just started on ``agent``."""
        self._dispatch(job, agent)

    cdef int _dispatch(self, int job, int agent) except -1:
        """Send a job that waited: spliced from its record, by its plan."""
        cdef Scan scan
        cdef fb_zmq_msg_t out
        cdef Py_ssize_t ends[PLAN_ENTRIES]
        cdef JobRecord* rec = self._record(job)
        cdef const char* frame = _rec_frame(rec)
        cdef Py_ssize_t size, written
        if rec.plan.n == PLAN_NONE:  # never so for the dialects' rules, but the scan would do
            scan_client_c(rec.dialect, frame, rec.frame_size, &scan)
            return self._send_new_job(job, agent, &scan, frame)
        size = planned_new_job_size(frame, rec.frame_size, &rec.plan, rec.dialect, rec.owner_size, ends)
        if _msg_init_out(&out, size) != 0:
            raise MemoryError()
        written = write_planned_new_job(<char*>lz.msg_data(&out), frame, rec.frame_size, &rec.plan, ends,
                                        rec.dialect, _rec_owner(rec), rec.owner_size)
        if FB_DEBUG:
            try:
                self._check_planned(rec, <const char*>lz.msg_data(&out), written, size)
            except BaseException:
                lz.msg_close(&out)
                raise
        return self._sent_new_job(job, agent, rec.dialect, &out)

    cdef int _check_planned(self, JobRecord* rec, const char* data, Py_ssize_t written,
                            Py_ssize_t size) except -1:
        """Debug build: a planned splice is the scanned splice of the same frame, byte for byte."""
        cdef Scan scan
        cdef const char* frame = _rec_frame(rec)
        scan_client_c(rec.dialect, frame, rec.frame_size, &scan)
        cdef bytes expected = PyBytes_FromStringAndSize(NULL, new_job_size(&scan, rec.owner_size))
        write_new_job(PyBytes_AS_STRING(expected), frame, &scan, _rec_owner(rec), rec.owner_size)
        if written != size or _bytes(data, written) != expected:
            raise AssertionError(f"planned new-job splice differs from the scanned one ({written}/{size} bytes)")
        return 0

    cdef int _send_new_job(self, int job, int agent, const Scan* scan, const char* frame) except -1:
        """Splice the agent's new-job frame from a scanned client new-job frame and send it."""
        cdef fb_zmq_msg_t out
        cdef JobRecord* rec = self.job_rec[job]
        cdef Py_ssize_t size = new_job_size(scan, rec.owner_size)
        if _msg_init_out(&out, size) != 0:
            raise MemoryError()
        written = write_new_job(<char*>lz.msg_data(&out), frame, scan, _rec_owner(rec), rec.owner_size)
        if FB_DEBUG and written != size:
            lz.msg_close(&out)
            raise AssertionError(f"new job spliced to {written} bytes, {size} announced")
        return self._sent_new_job(job, agent, scan.dialect, &out)

    cdef int _sent_new_job(self, int job, int agent, int dialect, fb_zmq_msg_t* out) except -1:
        """Record a job's dispatch and send its spliced frame (``out``) to its agent."""
        cdef bytes agent_ident = self.agent_ident[agent]
        cdef double now = _monotonic()
        self.wait_counts[dialect][_bucket(now - self.t_mark[job])] += 1
        self.wait_total[dialect] += now - self.t_mark[job]
        self.t_mark[job] = now
        if self.log_jobs:
            try:
                self.job_event("sent", job, agent)
            except BaseException:
                lz.msg_close(out)
                raise
        return self._send_msg(self.agent_handle, PyBytes_AS_STRING(agent_ident), PyBytes_GET_SIZE(agent_ident),
                              out, "agent")

    cdef int _check_counts(self) except -1:
        """Debug build: every job the broker knows is waiting or running, and no other."""
        cdef Py_ssize_t known = self.job_index.count
        cdef Py_ssize_t scheduled = self.sched.n_waiting + self.sched.n_running
        cdef Py_ssize_t job, records = 0
        if known != scheduled:
            raise AssertionError(f"broker knows {known} jobs, the scheduler holds {scheduled}")
        if known < 1024:  # the records too, while that is cheap
            for job in range(self.job_cap):
                records += self.job_rec[job] != NULL
            if records != known:
                raise AssertionError(f"{records} job records for {known} jobs")
        return 0

    def forget_job(self, int job):
        """Drop a job's key, owner and frame: from now on, messages about it are dropped."""
        cdef JobRecord* rec = self._record(job)
        cdef uint32_t tag
        if self._find_job(rec.dialect, _rec_owner(rec), rec.owner_size, _rec_frame(rec) + rec.job_id_start,
                          rec.job_id_len, &tag) != job:
            raise AssertionError(f"job {job} is not found by its own key")
        self._forget(job, tag)

    cdef int _forget(self, int job, uint32_t tag) except -1:
        """Drop a job found under hash tag ``tag`` (what _find_job gave)."""
        cdef JobRecord* rec = self._record(job)
        index_remove(&self.job_index, tag, job)
        self.job_rec[job] = NULL
        _spare_or_free(&self.spares, rec, _rec_size(rec))
        return 0

    # -- agents -------------------------------------------------------------------

    cdef int _on_agent(self, const char* ident, Py_ssize_t ident_len, const char* data,
                       Py_ssize_t size) except -1:
        cdef Scan scan
        cdef fb_zmq_msg_t out
        cdef Py_ssize_t out_size
        cdef JobRecord* rec
        cdef int agent, job, following, dialect = -1
        cdef uint32_t tag
        agent = <int>self.agents.c_get(ident, ident_len, -1)
        if agent >= 0:
            dialect = self.agent_dialect[agent]
        if not self._scan(True, ident, ident_len, data, size,
                          self.first_guess if agent < 0 else dialect, agent >= 0, &scan):
            return 0
        if scan.type == AGENT_HELLO:
            self.agent_hello(_bytes(ident, ident_len), _bytes(data, size), scan.dialect)
            return 0
        if agent < 0 or dialect != scan.dialect:
            self.dropped("agent", _bytes(ident, ident_len), "message from an agent that did not say hello",
                         "unregistered")
            return 0
        if scan.type == PONG:
            self.agent_missed[agent] = 0
            return 0
        job = self._find_job(scan.dialect, scan.ident, scan.ident_len, scan.job_id, scan.job_id_len, &tag)
        if job < 0 or self.sched.c_job_state(job) != JOB_RUNNING or self.sched.c_job_agent(job) != agent:
            self.dropped("agent", _bytes(ident, ident_len), "message about job %r, which is not running there"
                         % PyUnicode_DecodeUTF8(scan.job_id, scan.job_id_len, "replace"), "not_running")
            return 0
        rec = self.job_rec[job]
        if scan.type == AGENT_JOB_DONE and self.log_jobs:
            self.job_event("done", job, agent)
        if scan.type == AGENT_JOB_DONE or scan.type == AGENT_JOB_SSH_DEBUG:
            out_size = agent_to_client_size(&scan)
            if _msg_init_out(&out, out_size) != 0:
                raise MemoryError()
            write_agent_to_client(<char*>lz.msg_data(&out), data, &scan)
        else:
            out_size = job_started_size(scan.dialect, scan.job_id_len)
            if _msg_init_out(&out, out_size) != 0:
                raise MemoryError()
            write_job_started(<char*>lz.msg_data(&out), scan.dialect, scan.job_id, scan.job_id_len)
        self._send_msg(self.client_handle, _rec_owner(rec), rec.owner_size, &out, "client")
        if scan.type == AGENT_JOB_DONE:
            elapsed = _monotonic() - self.t_mark[job]
            self.run_counts[scan.dialect][_bucket(elapsed)] += 1
            self.run_total[scan.dialect] += elapsed
            self._forget(job, tag)
            self.jobs_done += 1
            self.done_by[scan.dialect] += 1
            following = self.sched.c_finish(job)
            if following >= 0:
                self._dispatch(following, agent)
            if FB_DEBUG:
                self._check_counts()
        return 0


cdef enum:
    COLUMN_KEY = 0
    COLUMN_CLIENT = 1
    COLUMN_FRAME = 2
    COLUMN_STARTED = 3


@cython.final
cdef class JobColumn:
    """One field of every job, by job index (``broker.job_key[job]`` and the like):
    the Python object is made when it is read."""

    cdef BrokerCore core
    cdef int column

    def __cinit__(self, BrokerCore core, int column):
        self.core = core
        self.column = column

    def __getitem__(self, Py_ssize_t job):
        return self.core._column(job, self.column)

    def __len__(self):
        return self.core.job_cap


@cython.final
cdef class JobsView(DictFace):
    """job key (bytes, see wire.job_key) -> job index, read-only, like the pure core's dict."""

    cdef BrokerCore core

    def __cinit__(self, BrokerCore core):
        self.core = core

    def get(self, bytes key, default=None):
        cdef int job = self.core._lookup(key)
        return default if job < 0 else job

    def __getitem__(self, bytes key):
        cdef int job = self.core._lookup(key)
        if job < 0:
            raise KeyError(key)
        return job

    def __contains__(self, bytes key):
        return self.core._lookup(key) >= 0

    def __len__(self):
        return self.core.job_index.count

    def items(self):
        cdef Py_ssize_t job
        cdef JobRecord* rec
        out = []
        for job in range(self.core.job_cap):
            rec = self.core.job_rec[job]
            if rec != NULL:
                out.append((_rec_key(rec), job))
        return out
