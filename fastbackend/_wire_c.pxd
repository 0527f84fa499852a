# The C-level wire API, for modules that cimport it (the broker calls these with
# pointers straight into libzmq message buffers; no Python object for the frame).
#
# Lifetime rule: every pointer in a Scan points into the buffer that was scanned, so a
# Scan is only valid while that buffer is alive and unchanged.

cdef enum:
    MAX_FIELDS = 16     # most top-level entries a frame may have
    MAX_DEPTH = 512     # most containers open at once, the message's own map included

cdef struct Scan:
    int type                     # protocol type code (protocol.CLIENT_NEW_JOB, ...)
    const char* job_id           # UTF-8 bytes of the client job id (inside its str), or NULL
    Py_ssize_t job_id_len
    const char* ident            # agent messages: client identity bytes (inside the bin), or NULL
    Py_ssize_t ident_len
    const char* env              # client_new_job: environment UTF-8 bytes, or NULL
    Py_ssize_t env_len
    int nfields                  # top-level entries, in frame order
    Py_ssize_t key_start[MAX_FIELDS]   # offset of each entry's key
    Py_ssize_t val_start[MAX_FIELDS]   # offset of its value
    Py_ssize_t val_end[MAX_FIELDS]     # end of its value (= key_start of the next entry)
    int field[MAX_FIELDS]              # index in the type's declaration order; -1 for "type"

# Check a whole frame from a client / an agent and fill `out`.  Raise WireError (and
# return -1) when the frame is not a well-formed message of that side.
cdef int scan_client_c(const char* buf, Py_ssize_t n, Scan* out) except -1
cdef int scan_agent_c(const char* buf, Py_ssize_t n, Scan* out) except -1

# Splicers: `*_size` gives the exact length of the frame `write_*` then writes into
# `out` (which must hold that many bytes); `write_*` returns the length written.
# `s` must come from a successful scan of `buf`.

# s.type == CLIENT_NEW_JOB; 1 <= ident_len <= 255 (a ZeroMQ identity).
cdef Py_ssize_t new_job_size(const Scan* s, Py_ssize_t ident_len) noexcept
cdef Py_ssize_t write_new_job(char* out, const char* buf, const Scan* s,
                              const char* ident, Py_ssize_t ident_len) noexcept
# s.type is AGENT_JOB_DONE or AGENT_JOB_SSH_DEBUG (the backend type name follows from
# it); agent_to_client_size returns -1 for any other type.
cdef Py_ssize_t agent_to_client_size(const Scan* s) noexcept
cdef Py_ssize_t write_agent_to_client(char* out, const char* buf, const Scan* s) noexcept
# backend_job_started(job_id), job_id given as UTF-8 bytes.
cdef Py_ssize_t job_started_size(Py_ssize_t job_id_len) noexcept
cdef Py_ssize_t write_job_started(char* out, const char* job_id, Py_ssize_t job_id_len) noexcept

# The broker's dictionary key for a job (see wire.job_key); 1 <= ident_len <= 255.
cdef bytes job_key_c(const char* ident, Py_ssize_t ident_len, const char* job_id, Py_ssize_t job_id_len)
