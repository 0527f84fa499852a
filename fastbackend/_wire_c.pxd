# The C-level wire API, for modules that cimport it (the broker calls these with
# pointers straight into libzmq message buffers; no Python object for the frame).
#
# Lifetime rule: every pointer in a Scan points into the buffer that was scanned, so a
# Scan is only valid while that buffer is alive and unchanged.
#
# `dialect` arguments are protocol tags (protocol.V05, protocol.V09).  The scanners
# check it (IndexError for a tag that names no dialect); the noexcept functions below
# take it from a successful scan (s.dialect) or trust the caller to pass a valid one.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy


cdef inline uint64_t _xor8(const unsigned char* p, const unsigned char* q, Py_ssize_t at) noexcept nogil:
    """The 8 bytes at p + at XOR those at q + at: 0 when they are equal."""
    cdef uint64_t x, y
    memcpy(&x, p + at, 8)
    memcpy(&y, q + at, 8)
    return x ^ y


cdef inline uint32_t _xor4(const unsigned char* p, const unsigned char* q, Py_ssize_t at) noexcept nogil:
    """The 4 bytes at p + at XOR those at q + at: 0 when they are equal."""
    cdef uint32_t x, y
    memcpy(&x, p + at, 4)
    memcpy(&y, q + at, 4)
    return x ^ y


cdef inline bint same_bytes(const void* a, const void* b, Py_ssize_t n) noexcept nogil:
    """a[:n] == b[:n] in fixed-size loads instead of a call to memcmp (keys, job ids and
    identities are short: the call costs more than the compare).

    Two overlapping words cover every length from 4 to 16 (the first and the last word),
    four every length from 17 to 32 (the first two and the last two); longer ones are
    compared a word at a time, the last word overlapping.  All reads stay inside a[:n]
    and b[:n].
    """
    cdef const unsigned char* p = <const unsigned char*>a
    cdef const unsigned char* q = <const unsigned char*>b
    cdef Py_ssize_t i
    if n > 32:
        i = 0
        while i < n - 8:
            if _xor8(p, q, i):
                return False
            i += 8
        return _xor8(p, q, n - 8) == 0
    if n > 16:
        return (_xor8(p, q, 0) | _xor8(p, q, 8) | _xor8(p, q, n - 16) | _xor8(p, q, n - 8)) == 0
    if n >= 8:
        return (_xor8(p, q, 0) | _xor8(p, q, n - 8)) == 0
    if n >= 4:
        return (_xor4(p, q, 0) | _xor4(p, q, n - 4)) == 0
    for i in range(n):
        if p[i] != q[i]:
            return False
    return True


cdef enum:
    MAX_FIELDS = 16     # most top-level entries a frame may have
    MAX_DEPTH = 512     # most containers open at once, the message's own map included

cdef struct Scan:
    int type                      # protocol role code (protocol.CLIENT_NEW_JOB, ...)
    int dialect                   # protocol tag of the tables that matched (protocol.V05 / V09)
    const char* job_id            # UTF-8 bytes of the client job id (inside its str), or NULL
    Py_ssize_t job_id_len
    const char* ident             # 0.5 agent messages: client identity bytes (inside the pair), or NULL
    Py_ssize_t ident_len
    const char* env               # client_new_job: environment name UTF-8, or NULL
    Py_ssize_t env_len
    const char* env_type          # 0.9 ClientNewJob: environment_type UTF-8, or NULL
    Py_ssize_t env_type_len
    int64_t priority              # 0.9 ClientNewJob priority clamped to int64 max; 0 otherwise
    int nfields                   # top-level entries, in frame order
    Py_ssize_t key_start[MAX_FIELDS]   # offset of each entry's key
    Py_ssize_t val_start[MAX_FIELDS]   # offset of its value
    Py_ssize_t val_end[MAX_FIELDS]     # end of its value (= key_start of the next entry)
    int field[MAX_FIELDS]         # index in the type's declaration order; -1 for the type key

# What the new-job splice of a stored client_new_job frame needs (see plan_new_job):
# where each entry the dialect's rule changes starts, in frame order, and what is done to
# it.  Each span's end is read from the frame when it is spliced (a str or a fixed-size
# scalar: a few instructions), so that a job keeps 16 bytes of plan, not 32.
cdef enum:
    PLAN_ENTRIES = 3    # the type key, the 0.5 job id, the dropped ones: 3 in both dialects
    PLAN_TYPE = 0       # start: the value of the type key (a str)
    PLAN_PAIR = 1       # start: the job id's value (a str), wrapped in [bin identity, value]
    PLAN_DROP = 2       # start: the key of an entry left out (its value a str or fixed-size scalar)
    PLAN_NONE = 0xFF    # n of a frame that could not be planned (scanned again at dispatch)

cdef struct NewJobPlan:
    uint32_t start[PLAN_ENTRIES]
    uint8_t n
    uint8_t kind[PLAN_ENTRIES]

# Check a whole frame from a client / an agent against the tables of `dialect` and fill
# `out`.  Raise WireError (and return -1) when the frame is not a well-formed message
# of that side, or WrongDialect(tag) (protocol.WrongDialect, a WireError) when the frame
# carries another dialect's type key.
cdef int scan_client_c(int dialect, const char* buf, Py_ssize_t n, Scan* out) except -1
cdef int scan_agent_c(int dialect, const char* buf, Py_ssize_t n, Scan* out) except -1

# Splicers: `*_size` gives the exact length of the frame `write_*` then writes into
# `out` (which must hold that many bytes); `write_*` returns the length written.
# `s` must come from a successful scan of `buf`; the rule applied is s.dialect's
# (protocol.Dialect.new_job / job_done / ssh_debug).

# s.type == CLIENT_NEW_JOB.  The identity is used where the rule makes the 0.5 job id
# pair, then 1 <= ident_len <= 255 (a ZeroMQ identity); otherwise it is ignored.
cdef Py_ssize_t new_job_size(const Scan* s, Py_ssize_t ident_len) noexcept
cdef Py_ssize_t write_new_job(char* out, const char* buf, const Scan* s,
                              const char* ident, Py_ssize_t ident_len) noexcept
# The plan of a client_new_job scan of `buf` (0; or -1, n = PLAN_NONE, if it cannot be
# planned: scan again then), and the new-job splice of the scanned frame `buf` (`size`
# bytes) from its plan alone.
cdef int plan_new_job(const char* buf, const Scan* s, NewJobPlan* plan) noexcept
# planned_new_job_size fills `ends` (PLAN_ENTRIES long) for write_planned_new_job.
cdef Py_ssize_t planned_new_job_size(const char* buf, Py_ssize_t size, const NewJobPlan* plan, int dialect,
                                     Py_ssize_t ident_len, Py_ssize_t* ends) noexcept
cdef Py_ssize_t write_planned_new_job(char* out, const char* buf, Py_ssize_t size, const NewJobPlan* plan,
                                      const Py_ssize_t* ends, int dialect, const char* ident,
                                      Py_ssize_t ident_len) noexcept
# s.type is AGENT_JOB_DONE or AGENT_JOB_SSH_DEBUG (the rule follows from it);
# agent_to_client_size returns -1 for any other type.
cdef Py_ssize_t agent_to_client_size(const Scan* s) noexcept
cdef Py_ssize_t write_agent_to_client(char* out, const char* buf, const Scan* s) noexcept
# backend_job_started(job_id) in `dialect`, job_id given as UTF-8 bytes.
cdef Py_ssize_t job_started_size(int dialect, Py_ssize_t job_id_len) noexcept
cdef Py_ssize_t write_job_started(char* out, int dialect, const char* job_id, Py_ssize_t job_id_len) noexcept

# The broker's key for a job (see wire.job_key).  0.5: 1 <= ident_len <= 255;
# 0.9: the identity is not part of the key (ident may be NULL, ident_len 0).
# job_key_size bytes are written to `out` by write_job_key, which returns that length.
cdef Py_ssize_t job_key_size(int dialect, Py_ssize_t ident_len, Py_ssize_t job_id_len) noexcept
cdef Py_ssize_t write_job_key(char* out, int dialect, const char* ident, Py_ssize_t ident_len,
                              const char* job_id, Py_ssize_t job_id_len) noexcept
cdef bytes job_key_c(int dialect, const char* ident, Py_ssize_t ident_len,
                     const char* job_id, Py_ssize_t job_id_len)
