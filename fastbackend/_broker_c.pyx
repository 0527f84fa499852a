# The broker's hot path, compiled: the fast twin of ``_broker_py`` (read that first:
# it is the readable truth, and this module must behave exactly like it).
#
# What is different here is how the bytes move.  ``drain`` receives with libzmq's
# zmq_msg_recv straight from the ROUTER sockets (see _libzmq.pxi for how we reach the
# very libzmq pyzmq uses), scans the frame in place with the wire module's C
# functions, and writes spliced frames straight into libzmq message buffers that
# zmq_msg_send then owns.  Per message there is no pyzmq call, no asyncio object and
# no decoded message; the Python objects made per job are the ones the state needs
# (the job's key and its client frame, kept until the job's result) plus the identity
# bytes used as dictionary keys.  Both dialects take the same path: the scan says which
# dialect's tables matched, and the splicers follow that dialect's rules.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint32_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from fastbackend._sched_c cimport JOB_RUNNING, Scheduler
from fastbackend._wire_c cimport (
    Scan,
    agent_to_client_size,
    job_key_c,
    job_started_size,
    new_job_size,
    scan_agent_c,
    scan_client_c,
    write_agent_to_client,
    write_job_started,
    write_new_job,
)

import time

import zmq as pyzmq

from fastbackend import protocol
from fastbackend.protocol import DIALECTS, FIRST_GUESS, WireError, WrongDialect

include "_libzmq.pxi"

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


cdef inline int _scan_side(bint from_agent, int dialect, const char* data, Py_ssize_t size,
                           Scan* scan) except -1:
    if from_agent:
        return scan_agent_c(dialect, data, size, scan)
    return scan_client_c(dialect, data, size, scan)


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
    cdef public dict clients      # identity -> dialect it said hello in
    cdef public dict agents
    cdef public list agent_ident
    cdef public list agent_dialect
    cdef public list agent_missed
    cdef public dict jobs
    cdef public list job_key
    cdef public list job_client
    cdef public list job_frame
    cdef public list job_started
    # Per dialect: environment key bytes -> interned id (saves a decode per job).  The
    # key is the name's UTF-8 in 0.5; in 0.9 the type's length (4 bytes), type, name.
    cdef list env_ids
    cdef public Py_ssize_t jobs_submitted
    cdef public Py_ssize_t jobs_done
    cdef public Py_ssize_t frames_dropped
    cdef public bint log_jobs     # per-job DEBUG lines (set by the logic layer from the log level)
    # For the metrics: counters per dialect, time histograms (counts per bucket, sums),
    # and each job's monotonic submission and dispatch times (indexed by job, t_cap long).
    cdef Py_ssize_t submitted_by[N_DIALECTS]
    cdef Py_ssize_t done_by[N_DIALECTS]
    cdef Py_ssize_t wait_counts[N_DIALECTS][N_BUCKETS]
    cdef Py_ssize_t run_counts[N_DIALECTS][N_BUCKETS]
    cdef double wait_total[N_DIALECTS]
    cdef double run_total[N_DIALECTS]
    cdef double* t_submitted
    cdef double* t_sent
    cdef Py_ssize_t t_cap

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
        self.clients = {}
        self.agents = {}
        self.agent_ident = []
        self.agent_dialect = []
        self.agent_missed = []
        self.jobs = {}
        self.job_key = []
        self.job_client = []
        self.job_frame = []
        self.job_started = []
        self.env_ids = [{} for _ in DIALECTS]
        self.log_jobs = False
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
        free(self.t_submitted)
        free(self.t_sent)

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

    cdef int _grow_times(self, Py_ssize_t jobs) except -1:
        cdef Py_ssize_t cap = max(jobs, 2 * self.t_cap)
        cdef double* submitted = <double*>realloc(self.t_submitted, cap * sizeof(double))
        if submitted == NULL:
            raise MemoryError()
        self.t_submitted = submitted
        cdef double* sent = <double*>realloc(self.t_sent, cap * sizeof(double))
        if sent == NULL:
            raise MemoryError()
        self.t_sent = sent
        self.t_cap = cap
        return 0

    # -- sending ------------------------------------------------------------------

    cdef int _send_msg(self, void* handle, const char* ident, Py_ssize_t ident_len,
                       fb_zmq_msg_t* body, str side) except -1:
        """Send [ident, body]; libzmq takes ``body`` on success, we close it otherwise."""
        cdef int err
        if _send_more(handle, ident, ident_len) < 0:
            err = lz.last_errno()
            lz.msg_close(body)
            if err == EHOSTUNREACH:
                self.unreachable(side, PyBytes_FromStringAndSize(ident, ident_len))
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

    def drain(self, int budget):
        """Handle up to ``budget`` messages from each socket; True if more may wait."""
        self._drain(self.agent_handle, budget, True)
        self._drain(self.client_handle, budget, False)
        return _has_input(self.agent_handle) or _has_input(self.client_handle)

    cdef int _drain(self, void* handle, int budget, bint from_agents) except -1:
        cdef fb_zmq_msg_t ident, body, extra
        cdef int frames, err
        cdef bint more
        cdef str side = "agent" if from_agents else "client"
        while budget > 0:
            budget -= 1
            lz.msg_init(&ident)
            if _msg_recv(&ident, handle) < 0:
                err = lz.last_errno()
                lz.msg_close(&ident)
                if err == EAGAIN:
                    return 0
                raise pyzmq.ZMQError(err)
            # A ROUTER hands over whole messages: the rest is already here.
            lz.msg_init(&body)
            frames = 0
            if lz.msg_more(&ident) and _msg_recv(&body, handle) >= 0:
                frames = 1
                more = lz.msg_more(&body)
                while more:  # frames a real peer never sends: counted, then dropped
                    lz.msg_init(&extra)
                    if _msg_recv(&extra, handle) < 0:
                        lz.msg_close(&extra)
                        break
                    frames += 1
                    more = lz.msg_more(&extra)
                    lz.msg_close(&extra)
                # Big frames weigh more (see _broker_py.BYTES_PER_MESSAGE); the extra
                # frames of a malformed message are not counted.
                budget -= <int>(lz.msg_size(&body) // FRAME_WEIGHT)
            try:
                if frames != 1:
                    self.dropped(side, self._ident(&ident),
                                 f"{frames} frames in one message, expected 1", "multipart")
                elif from_agents:
                    self._on_agent(<const char*>lz.msg_data(&ident), lz.msg_size(&ident), &body)
                else:
                    self._on_client(<const char*>lz.msg_data(&ident), lz.msg_size(&ident), &body)
            except Exception:  # a bug must cost one message, never the broker
                self.internal_error(side, self._ident(&ident))
            finally:
                lz.msg_close(&body)
                lz.msg_close(&ident)
        return 0

    cdef bytes _ident(self, fb_zmq_msg_t* ident):
        return PyBytes_FromStringAndSize(<const char*>lz.msg_data(ident), lz.msg_size(ident))

    cdef int _scan(self, bint from_agent, bytes ident, const char* data, Py_ssize_t size, int dialect,
                   bint known, Scan* scan) except -1:
        """Scan as ``dialect``, or as the dialect the frame turns out to be in (see
        ``_broker_py.BrokerCore._scan``); 1 when scanned, 0 when the frame was dropped."""
        cdef str side = "agent" if from_agent else "client"
        first_error = None
        try:
            _scan_side(from_agent, dialect, data, size, scan)
            return 1
        except WrongDialect as exc:
            if self.pinned is not None:
                self.wrong_dialect(side, ident, exc.dialect)
                return 0
            dialect = exc.dialect
        except WireError as exc:
            if known or self.pinned is not None:
                self.dropped(side, ident, str(exc))
                return 0
            dialect, first_error = 1 - dialect, exc  # the other of the two dialects
        try:
            _scan_side(from_agent, dialect, data, size, scan)
            return 1
        except WireError as exc:
            if first_error is not None:
                reason = str(first_error)
            elif isinstance(exc, WrongDialect):
                reason = "holds the type keys of two dialects"
            else:
                reason = str(exc)
            self.dropped(side, ident, reason)
        return 0

    # -- clients ------------------------------------------------------------------

    cdef int _on_client(self, const char* ident_ptr, Py_ssize_t ident_len, fb_zmq_msg_t* body) except -1:
        cdef Scan scan
        cdef const char* data = <const char*>lz.msg_data(body)
        cdef Py_ssize_t size = lz.msg_size(body)
        cdef bytes ident = PyBytes_FromStringAndSize(ident_ptr, ident_len)
        registered = self.clients.get(ident)
        if not self._scan(False, ident, data, size, self.first_guess if registered is None else <int>registered,
                          registered is not None, &scan):
            return 0
        if scan.type == CLIENT_HELLO:
            self.client_hello(ident, PyBytes_FromStringAndSize(data, size), scan.dialect)
            return 0
        if registered is None or <int>registered != scan.dialect:
            self._send_bytes(self.client_handle, ident_ptr, ident_len, UNKNOWN_FRAMES[scan.dialect], "client")
            return 0
        if scan.type == CLIENT_NEW_JOB:
            self._new_job(ident, &scan, data, size)
        elif scan.type == PING:
            self._send_bytes(self.client_handle, ident_ptr, ident_len, PONG_FRAMES[scan.dialect], "client")
        elif scan.type == CLIENT_KILL_JOB:
            self.kill_job(ident, PyUnicode_DecodeUTF8(scan.job_id, scan.job_id_len, NULL), scan.dialect)
        elif scan.type == CLIENT_GET_QUEUE:
            self.client_get_queue(ident, scan.dialect)
        return 0

    cdef int _env(self, const Scan* scan) except -1:
        """The interned environment of a scanned new job (a dict lookup on its bytes)."""
        cdef bytes key
        cdef char* o
        cdef uint32_t type_len
        cdef dict ids = self.env_ids[scan.dialect]
        if scan.env_type == NULL:
            key = PyBytes_FromStringAndSize(scan.env, scan.env_len)
        else:
            type_len = <uint32_t>scan.env_type_len
            key = PyBytes_FromStringAndSize(NULL, 4 + scan.env_type_len + scan.env_len)
            o = PyBytes_AS_STRING(key)
            memcpy(o, &type_len, 4)
            memcpy(o + 4, scan.env_type, scan.env_type_len)
            memcpy(o + 4 + scan.env_type_len, scan.env, scan.env_len)
        env = ids.get(key)
        if env is None:
            name = PyUnicode_DecodeUTF8(scan.env, scan.env_len, NULL)
            if scan.env_type != NULL:
                name = (PyUnicode_DecodeUTF8(scan.env_type, scan.env_type_len, NULL), name)
            env = ids[key] = self.sched.env_id(name)
        return env

    cdef int _new_job(self, bytes ident, Scan* scan, const char* data, Py_ssize_t size) except -1:
        cdef int job, agent = -1
        cdef bytes key = job_key_c(scan.dialect, PyBytes_AS_STRING(ident), PyBytes_GET_SIZE(ident),
                                   scan.job_id, scan.job_id_len)
        self.jobs_submitted += 1
        self.submitted_by[scan.dialect] += 1
        if key in self.jobs:
            self.duplicate_job(ident, PyUnicode_DecodeUTF8(scan.job_id, scan.job_id_len, NULL), scan.dialect)
            return 0
        job = self.sched.c_submit(self._env(scan), scan.priority, &agent)
        if job >= len(self.job_key):
            # Doubling: the scheduler hands out indices one above the highest in use.
            grow = max(job + 1 - len(self.job_key), len(self.job_key))
            self.job_key.extend([None] * grow)
            self.job_client.extend([None] * grow)
            self.job_frame.extend([None] * grow)
            self.job_started.extend([0.0] * grow)
        if job >= self.t_cap:
            self._grow_times(job + 1)
        self.jobs[key] = job
        self.job_key[job] = key
        self.job_client[job] = ident
        self.job_frame[job] = PyBytes_FromStringAndSize(data, size)
        self.t_submitted[job] = _monotonic()
        if FB_DEBUG:
            self._check_counts()
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
        cdef Scan scan
        cdef bytes frame = self.job_frame[job]
        cdef bytes key = self.job_key[job]
        # The frame was validated on arrival; scanning it again is cheaper than
        # keeping every waiting job's field offsets.  A 0.9 key starts with a zero byte.
        scan_client_c(V09 if PyBytes_AS_STRING(key)[0] == 0 else V05,
                      PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame), &scan)
        return self._send_new_job(job, agent, &scan, PyBytes_AS_STRING(frame))

    cdef int _send_new_job(self, int job, int agent, const Scan* scan, const char* frame) except -1:
        """Splice the agent's new-job frame from a scanned client new-job frame and send it."""
        cdef fb_zmq_msg_t out
        cdef bytes client = self.job_client[job]
        cdef bytes agent_ident = self.agent_ident[agent]
        cdef Py_ssize_t ident_len = PyBytes_GET_SIZE(client)
        cdef Py_ssize_t size = new_job_size(scan, ident_len)
        if lz.msg_init_size(&out, size) != 0:
            raise MemoryError()
        written = write_new_job(<char*>lz.msg_data(&out), frame, scan, PyBytes_AS_STRING(client), ident_len)
        if FB_DEBUG and written != size:
            lz.msg_close(&out)
            raise AssertionError(f"new job spliced to {written} bytes, {size} announced")
        cdef double now = _monotonic()
        self.job_started[job] = time.time()
        self.t_sent[job] = now
        self.wait_counts[scan.dialect][_bucket(now - self.t_submitted[job])] += 1
        self.wait_total[scan.dialect] += now - self.t_submitted[job]
        if self.log_jobs:
            self.job_event("sent", job, agent)
        self._send_msg(self.agent_handle, PyBytes_AS_STRING(agent_ident), PyBytes_GET_SIZE(agent_ident),
                       &out, "agent")
        return 0

    cdef int _check_counts(self) except -1:
        """Debug build: every job the broker knows is waiting or running, and no other."""
        cdef Py_ssize_t known = len(self.jobs)
        cdef Py_ssize_t scheduled = self.sched.n_waiting + self.sched.n_running
        if known != scheduled:
            raise AssertionError(f"broker knows {known} jobs, the scheduler holds {scheduled}")
        return 0

    def forget_job(self, int job):
        """Drop a job's key, owner and frame: from now on, messages about it are dropped."""
        self._forget(job)

    cdef int _forget(self, int job) except -1:
        del self.jobs[self.job_key[job]]
        self.job_key[job] = None
        self.job_client[job] = None
        self.job_frame[job] = None
        return 0

    # -- agents -------------------------------------------------------------------

    cdef int _on_agent(self, const char* ident_ptr, Py_ssize_t ident_len, fb_zmq_msg_t* body) except -1:
        cdef Scan scan
        cdef fb_zmq_msg_t out
        cdef const char* data = <const char*>lz.msg_data(body)
        cdef Py_ssize_t size = lz.msg_size(body), out_size
        cdef bytes ident = PyBytes_FromStringAndSize(ident_ptr, ident_len)
        cdef bytes owner
        cdef int agent, job, following
        agent = self.agents.get(ident, -1)
        if not self._scan(True, ident, data, size, self.first_guess if agent < 0 else <int>self.agent_dialect[agent],
                          agent >= 0, &scan):
            return 0
        if scan.type == AGENT_HELLO:
            self.agent_hello(ident, PyBytes_FromStringAndSize(data, size), scan.dialect)
            return 0
        if agent < 0 or <int>self.agent_dialect[agent] != scan.dialect:
            self.dropped("agent", ident, "message from an agent that did not say hello", "unregistered")
            return 0
        if scan.type == PONG:
            self.agent_missed[agent] = 0
            return 0
        job = self.jobs.get(job_key_c(scan.dialect, scan.ident, scan.ident_len, scan.job_id, scan.job_id_len), -1)
        if job < 0 or self.sched.c_job_state(job) != JOB_RUNNING or self.sched.c_job_agent(job) != agent:
            self.dropped("agent", ident, "message about job %r, which is not running there"
                         % PyUnicode_DecodeUTF8(scan.job_id, scan.job_id_len, "replace"), "not_running")
            return 0
        owner = self.job_client[job]
        if scan.type == AGENT_JOB_DONE and self.log_jobs:
            self.job_event("done", job, agent)
        if scan.type == AGENT_JOB_DONE or scan.type == AGENT_JOB_SSH_DEBUG:
            out_size = agent_to_client_size(&scan)
            if lz.msg_init_size(&out, out_size) != 0:
                raise MemoryError()
            write_agent_to_client(<char*>lz.msg_data(&out), data, &scan)
        else:
            out_size = job_started_size(scan.dialect, scan.job_id_len)
            if lz.msg_init_size(&out, out_size) != 0:
                raise MemoryError()
            write_job_started(<char*>lz.msg_data(&out), scan.dialect, scan.job_id, scan.job_id_len)
        self._send_msg(self.client_handle, PyBytes_AS_STRING(owner), PyBytes_GET_SIZE(owner), &out, "client")
        if scan.type == AGENT_JOB_DONE:
            elapsed = _monotonic() - self.t_sent[job]
            self.run_counts[scan.dialect][_bucket(elapsed)] += 1
            self.run_total[scan.dialect] += elapsed
            self._forget(job)
            self.jobs_done += 1
            self.done_by[scan.dialect] += 1
            following = self.sched.c_finish(job)
            if following >= 0:
                self._dispatch(following, agent)
            if FB_DEBUG:
                self._check_counts()
        return 0
