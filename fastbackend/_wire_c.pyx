"""Scan incoming frames and splice outgoing ones: the compiled twin of ``_wire_py``.

The wire schema is written out in ``fastbackend/wire.py``; ``_wire_py.py`` is the
readable statement of the algorithm, which this module follows step for step so that
both give the same result, or the same WireError reason, for any input.

Parsing model: a ``const unsigned char*`` frame, its length ``n`` and a position
``pos``; every length read from a header is compared with the bytes left (``n - pos``)
before any pointer moves, so no read ever leaves the frame.  Nothing here builds a
Python object on the success path of the C-level functions; every ``WireError`` is
raised by one of the small out-of-line ``_fail*`` functions, keeping the scanning
loops tight.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_FromLongLong, PyLong_FromUnsignedLongLong
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from fastbackend import protocol
from fastbackend.protocol import WireError

cdef extern from *:
    """
    #ifndef FB_DEBUG
    #define FB_DEBUG 0
    #endif
    """
    # 1 in the debug build (FASTBACKEND_DEBUG=1): the def wrappers then check that
    # every splice wrote exactly the size its size pass announced.
    const int FB_DEBUG

ctypedef unsigned char uchar

cdef int CLIENT_NEW_JOB = protocol.CLIENT_NEW_JOB
cdef int AGENT_JOB_DONE = protocol.AGENT_JOB_DONE
cdef int AGENT_JOB_SSH_DEBUG = protocol.AGENT_JOB_SSH_DEBUG
cdef Py_ssize_t MAX_FRAME_SIZE = protocol.MAX_FRAME_SIZE

# -- tables, built once at import from protocol's message tables ---------------------

# Field kinds; the names are those of _wire_py.CLIENT_FIELD_KINDS / AGENT_FIELD_KINDS.
cdef enum:
    K_ANY = 0        # pass-through: any well-formed value, skipped
    K_STR = 1        # str holding valid UTF-8
    K_INT = 2        # any msgpack integer
    K_UINT = 3       # msgpack integer >= 0
    K_MAP = 4        # map, contents pass-through
    K_JOB_PAIR = 5   # [bin client_identity (1..255 bytes), str job_id]

# Which Scan pointer a str field fills.
cdef enum:
    CAP_NONE = 0
    CAP_JOB_ID = 1
    CAP_ENV = 2

cdef enum:
    MAX_SIDE_FIELDS = 31   # field ids 0..30 use mask bits 1..31; bit 0 is "type"
    MAX_TYPES = 8
    TYPE_GID = -1
    UNKNOWN_GID = -2

cdef struct FieldDef:
    const char* name       # points into a bytes object kept in _TABLE_NAMES
    Py_ssize_t len
    int kind
    int capture

cdef struct TypeDef:
    const char* name
    Py_ssize_t len
    int code
    uint32_t mask                       # bit gid+1 per declared field, bit 0 for "type"
    signed char index[MAX_SIDE_FIELDS]  # field id -> index in declaration order

cdef struct Side:
    int nfields
    FieldDef fields[MAX_SIDE_FIELDS]
    int ntypes
    TypeDef types[MAX_TYPES]

cdef Side _client_side
cdef Side _agent_side
_TABLE_NAMES = []  # owners of the name buffers the tables point into (kept for the module's life)

_KIND_CODES = {"any": K_ANY, "str": K_STR, "int": K_INT, "uint": K_UINT, "map": K_MAP,
               "job_pair": K_JOB_PAIR}

_CLIENT_TYPED = {
    "job_id": "str", "course_id": "str", "task_id": "str", "environment": "str", "launcher": "str",
    "time_limit": "int", "hard_time_limit": "int", "mem_limit": "int", "name": "str",
}
_AGENT_TYPED = {
    "job_id": "job_pair", "friendly_name": "str", "available_job_slots": "uint",
    "available_containers": "map",
}


def _field_kinds(dict messages, dict typed):
    kinds = {}
    for _code, fields in messages.values():
        for name in fields:
            kinds.setdefault(name, typed.get(name, "any"))
    return kinds


#: The kind of every field a client may send (the tests check it equals _wire_py's).
CLIENT_FIELD_KINDS = _field_kinds(protocol.CLIENT_MESSAGES, _CLIENT_TYPED)
#: The kind of every field an agent may send.
AGENT_FIELD_KINDS = _field_kinds(protocol.AGENT_MESSAGES, _AGENT_TYPED)


cdef const char* _keep(str text, Py_ssize_t* length) except NULL:
    raw = text.encode("utf-8")
    _TABLE_NAMES.append(raw)
    length[0] = len(raw)
    return <const char*>raw


cdef int _build_side(Side* side, dict messages, dict kinds) except -1:
    names = list(kinds)
    if len(names) > MAX_SIDE_FIELDS or len(messages) > MAX_TYPES:
        raise RuntimeError("protocol tables too large for the wire scanner")
    side.nfields = len(names)
    for gid, name in enumerate(names):
        side.fields[gid].name = _keep(name, &side.fields[gid].len)
        side.fields[gid].kind = _KIND_CODES[kinds[name]]
        side.fields[gid].capture = (
            CAP_JOB_ID if name == "job_id" else CAP_ENV if name == "environment" else CAP_NONE
        )
    side.ntypes = len(messages)
    for t, (msgname, (code, fields)) in enumerate(messages.items()):
        side.types[t].name = _keep(msgname, &side.types[t].len)
        side.types[t].code = code
        side.types[t].mask = 1
        for gid in range(MAX_SIDE_FIELDS):
            side.types[t].index[gid] = -1
        for i, name in enumerate(fields):
            gid = names.index(name)
            side.types[t].mask |= (<uint32_t>1) << (gid + 1)
            side.types[t].index[gid] = i
    return 0


_build_side(&_client_side, protocol.CLIENT_MESSAGES, CLIENT_FIELD_KINDS)
_build_side(&_agent_side, protocol.AGENT_MESSAGES, AGENT_FIELD_KINDS)

_NEW_JOB_FIELDS = protocol.CLIENT_MESSAGES["client_new_job"][1]
cdef int NJ_JOB_ID = _NEW_JOB_FIELDS.index("job_id")
cdef int NJ_COURSE_ID = _NEW_JOB_FIELDS.index("course_id")
cdef int NJ_TASK_ID = _NEW_JOB_FIELDS.index("task_id")
cdef int NJ_TIME_LIMIT = _NEW_JOB_FIELDS.index("time_limit")
cdef int NJ_LAUNCHER = _NEW_JOB_FIELDS.index("launcher")
# The splicers rewrite field 0 as the job id in every message they handle.
assert NJ_JOB_ID == 0
assert protocol.AGENT_MESSAGES["agent_job_done"][1][0] == "job_id"
assert protocol.AGENT_MESSAGES["agent_job_ssh_debug"][1][0] == "job_id"

# Type names of the frames the backend builds by splicing (all shorter than 32: fixstr).
cdef const char* BACKEND_NEW_JOB = b"backend_new_job"
cdef const char* BACKEND_JOB_DONE = b"backend_job_done"
cdef const char* BACKEND_JOB_SSH_DEBUG = b"backend_job_ssh_debug"
cdef const char* BACKEND_JOB_STARTED = b"backend_job_started"
cdef enum:
    BACKEND_NEW_JOB_LEN = 15
    BACKEND_JOB_DONE_LEN = 16
    BACKEND_JOB_SSH_DEBUG_LEN = 21
    BACKEND_JOB_STARTED_LEN = 19

# Lead bytes 0xc0..0xdf for the skipper: what follows the lead byte, and its size.
cdef enum:
    L_FIXED = 0    # `size` payload bytes
    L_RAW = 1      # a `size`-byte length, then that many bytes (str, bin)
    L_EXT = 2      # a `size`-byte length, a type byte, then the data
    L_FIXEXT = 3   # a type byte and `size` data bytes
    L_ARRAY = 4    # a `size`-byte item count
    L_MAP = 5      # a `size`-byte pair count
    L_BAD = 6      # 0xc1, never used

cdef uchar LEAD_WHAT[32]
cdef uchar LEAD_SIZE[32]
for _lead, (_what, _size) in enumerate([
    (L_FIXED, 0), (L_BAD, 0), (L_FIXED, 0), (L_FIXED, 0),          # c0 nil, c1, c2 false, c3 true
    (L_RAW, 1), (L_RAW, 2), (L_RAW, 4),                           # c4..c6 bin8/16/32
    (L_EXT, 1), (L_EXT, 2), (L_EXT, 4),                           # c7..c9 ext8/16/32
    (L_FIXED, 4), (L_FIXED, 8),                                   # ca float32, cb float64
    (L_FIXED, 1), (L_FIXED, 2), (L_FIXED, 4), (L_FIXED, 8),       # cc..cf uint8..64
    (L_FIXED, 1), (L_FIXED, 2), (L_FIXED, 4), (L_FIXED, 8),       # d0..d3 int8..64
    (L_FIXEXT, 1), (L_FIXEXT, 2), (L_FIXEXT, 4), (L_FIXEXT, 8), (L_FIXEXT, 16),  # d4..d8
    (L_RAW, 1), (L_RAW, 2), (L_RAW, 4),                           # d9..db str8/16/32
    (L_ARRAY, 2), (L_ARRAY, 4), (L_MAP, 2), (L_MAP, 4),           # dc..df
]):
    LEAD_WHAT[_lead] = _what
    LEAD_SIZE[_lead] = _size
del _lead, _what, _size


# -- failures (out of line: the scanning loops only carry a call and a return) -------

def _show(bytes raw):
    """A key or type name as it appears in a reason (same rule as _wire_py._show)."""
    text = raw[:40].decode("utf-8", "backslashreplace")
    return repr(text + "..." if len(raw) > 40 else text)


cdef int _fail(str reason) except -1:
    raise WireError(reason)


cdef int _truncated() except -1:
    raise WireError("truncated frame")


cdef int _fail_shown(str fmt, const uchar* p, Py_ssize_t n) except -1:
    raise WireError(fmt.format(_show((<const char*>p)[:n])))


cdef int _fail_field(str fmt, const FieldDef* f) except -1:
    raise WireError(fmt.format(f.name[:f.len].decode("utf-8")))


cdef int _fail_key_set(str what, const Side* side, const TypeDef* td, uint32_t bits) except -1:
    cdef int gid = 0
    while not (bits & ((<uint32_t>1) << (gid + 1))):
        gid += 1
    name = side.fields[gid].name[:side.fields[gid].len].decode("utf-8")
    raise WireError(f"{what} key {name!r} for {td.name[:td.len].decode('utf-8')}")


# -- reading --------------------------------------------------------------------------

cdef inline size_t _be(const uchar* p, int size) noexcept:
    """Big-endian unsigned of 1, 2 or 4 bytes (a length or a count)."""
    cdef size_t v = 0
    cdef int i
    for i in range(size):
        v = (v << 8) | p[i]
    return v


cdef Py_ssize_t _skip(const uchar* buf, Py_ssize_t pos, Py_ssize_t n, int depth) except -1:
    """Skip one well-formed value at pos; `depth` containers are already open around it.

    Returns the position after it.  Iterative: `left` counts the values still to skip
    in the innermost open container, `stack` those of the enclosing ones, so a hostile
    nesting costs a WireError at MAX_DEPTH, never the C stack.
    """
    cdef Py_ssize_t stack[MAX_DEPTH]
    cdef int top = 0
    cdef Py_ssize_t left = 1
    cdef Py_ssize_t items
    cdef size_t length
    cdef uchar lead, what
    cdef int size
    while True:
        if pos >= n:
            return _truncated()
        lead = buf[pos]
        pos += 1
        items = -1
        if lead <= 0x7F or lead >= 0xE0:
            pass
        elif lead <= 0x8F:
            items = 2 * (lead & 0x0F)
        elif lead <= 0x9F:
            items = lead & 0x0F
        elif lead <= 0xBF:
            length = lead & 0x1F
            if length > <size_t>(n - pos):
                return _truncated()
            pos += <Py_ssize_t>length
        else:
            what = LEAD_WHAT[lead - 0xC0]
            size = LEAD_SIZE[lead - 0xC0]
            if what == L_FIXED:
                if size > n - pos:
                    return _truncated()
                pos += size
            elif what == L_RAW or what == L_EXT:
                if size > n - pos:
                    return _truncated()
                length = _be(buf + pos, size)
                pos += size
                # An ext also has its type byte.  Compare `length` alone first, so that
                # `length + 1` cannot wrap a 32-bit size_t.
                if length > <size_t>(n - pos) or (what == L_EXT and length + 1 > <size_t>(n - pos)):
                    return _truncated()
                pos += <Py_ssize_t>length + (what == L_EXT)
            elif what == L_FIXEXT:
                if size + 1 > n - pos:
                    return _truncated()
                pos += size + 1
            elif what == L_ARRAY or what == L_MAP:
                if size > n - pos:
                    return _truncated()
                length = _be(buf + pos, size)
                pos += size
                # Any count beyond the bytes left is refused below; clamp it first so
                # that doubling a map's count cannot overflow.
                if length > <size_t>(n - pos):
                    items = n - pos + 1
                else:
                    items = <Py_ssize_t>length * (2 if what == L_MAP else 1)
            else:
                return _fail(f"invalid msgpack byte 0x{lead:02x}")
        if items >= 0:
            if depth + top + 1 > MAX_DEPTH:
                return _fail("nesting too deep")
            # Every item takes at least one byte.
            if items > n - pos:
                return _truncated()
            if items:
                stack[top] = left - 1
                top += 1
                left = items
                continue
        left -= 1
        while left == 0:
            if top == 0:
                return pos
            top -= 1
            left = stack[top]


cdef inline int _read_str(const uchar* buf, Py_ssize_t pos, Py_ssize_t n,
                   Py_ssize_t* start, Py_ssize_t* length) except -1:
    """1 and the payload span if a str is at pos, 0 if another kind of value is."""
    cdef uchar lead
    cdef int size
    cdef size_t l
    if pos >= n:
        return _truncated()
    lead = buf[pos]
    if 0xA0 <= lead <= 0xBF:
        start[0] = pos + 1
        l = lead & 0x1F
    elif 0xD9 <= lead <= 0xDB:
        size = 1 << (lead - 0xD9)
        if size > n - pos - 1:
            return _truncated()
        l = _be(buf + pos + 1, size)
        start[0] = pos + 1 + size
    else:
        return 0
    if l > <size_t>(n - start[0]):
        return _truncated()
    length[0] = <Py_ssize_t>l
    return 1


cdef int _read_int(const uchar* buf, Py_ssize_t pos, Py_ssize_t n,
                   bint* negative, Py_ssize_t* end) except -1:
    """1 if an integer is at pos (its sign and end), 0 if another kind of value is."""
    cdef uchar lead
    cdef int size
    if pos >= n:
        return _truncated()
    lead = buf[pos]
    if lead <= 0x7F or lead >= 0xE0:
        negative[0] = lead >= 0xE0
        end[0] = pos + 1
        return 1
    if 0xCC <= lead <= 0xD3:
        size = 1 << ((lead - 0xCC) & 3)
        if size > n - pos - 1:
            return _truncated()
        negative[0] = lead >= 0xD0 and (buf[pos + 1] & 0x80) != 0
        end[0] = pos + 1 + size
        return 1
    return 0


cdef object _int_value(const uchar* buf, Py_ssize_t pos):
    """The value of an integer a scan has already checked."""
    cdef uchar lead = buf[pos]
    cdef int size, i
    cdef uint64_t v = 0
    if lead <= 0x7F:
        return lead
    if lead >= 0xE0:
        return <int>lead - 0x100
    size = 1 << ((lead - 0xCC) & 3)
    for i in range(size):
        v = (v << 8) | buf[pos + 1 + i]
    if lead < 0xD0:
        return PyLong_FromUnsignedLongLong(v)
    if size < 8 and (v >> (8 * size - 1)):
        v |= ~((<uint64_t>1 << (8 * size)) - 1)  # sign-extend
    return PyLong_FromLongLong(<int64_t>v)


cdef bint _utf8_valid(const uchar* s, Py_ssize_t n) noexcept:
    """Well-formed UTF-8 (Unicode table 3-7), exactly what Python's strict decoder accepts."""
    cdef Py_ssize_t i = 0
    cdef uint64_t word
    cdef uchar c, c1
    while i < n:
        # ASCII eight bytes at a time: job ids and names are nearly always ASCII.
        if i + 8 <= n:
            memcpy(&word, s + i, 8)
            if not (word & 0x8080808080808080ULL):
                i += 8
                continue
        c = s[i]
        if c < 0x80:
            i += 1
        elif c < 0xC2:
            return False
        elif c < 0xE0:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
        elif c < 0xF0:
            if i + 2 >= n:
                return False
            c1 = s[i + 1]
            if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80:
                return False
            if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 >= 0xA0):  # overlong, surrogate
                return False
            i += 3
        elif c < 0xF5:
            if i + 3 >= n:
                return False
            c1 = s[i + 1]
            if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80 or (s[i + 3] & 0xC0) != 0x80:
                return False
            if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 >= 0x90):  # overlong, > U+10FFFF
                return False
            i += 4
        else:
            return False
    return True


cdef Py_ssize_t _job_pair(const uchar* buf, Py_ssize_t pos, Py_ssize_t n, Scan* out) except -1:
    """Check the agent-side job id [bin identity, str job id] at pos; returns its end."""
    cdef uchar lead
    cdef int size
    cdef size_t count, ident_len
    cdef Py_ssize_t ident_start
    cdef Py_ssize_t start = 0, length = 0
    if pos >= n:
        return _truncated()
    lead = buf[pos]
    if 0x90 <= lead <= 0x9F:
        count = lead & 0x0F
        pos += 1
    elif lead == 0xDC or lead == 0xDD:
        size = 2 if lead == 0xDC else 4
        if size > n - pos - 1:
            return _truncated()
        count = _be(buf + pos + 1, size)
        pos += 1 + size
    else:
        return _fail("job_id must be [bin, str]")
    if count != 2:
        return _fail("job_id must be [bin, str]")
    if pos >= n:
        return _truncated()
    lead = buf[pos]
    if not 0xC4 <= lead <= 0xC6:
        return _fail("job_id must be [bin, str]")
    size = 1 << (lead - 0xC4)
    if size > n - pos - 1:
        return _truncated()
    ident_len = _be(buf + pos + 1, size)
    ident_start = pos + 1 + size
    if ident_len > <size_t>(n - ident_start):
        return _truncated()
    if ident_len < 1 or ident_len > 255:
        return _fail("client identity must be 1..255 bytes")
    if not _read_str(buf, ident_start + <Py_ssize_t>ident_len, n, &start, &length):
        return _fail("job_id must be [bin, str]")
    if not _utf8_valid(buf + start, length):
        return _fail("job_id is not valid UTF-8")
    out.ident = <const char*>buf + ident_start
    out.ident_len = <Py_ssize_t>ident_len
    out.job_id = <const char*>buf + start
    out.job_id_len = length
    return start + length


cdef inline bint _same(const uchar* a, const char* b, Py_ssize_t n) noexcept:
    """a[:n] == b[:n], for short keys: a few fixed-size loads instead of a call to memcmp.

    Two overlapping words cover every length from 4 to 16 (the first and the last
    word); all reads stay inside a[:n] and b[:n].
    """
    cdef uint64_t x, y, x2, y2
    cdef uint32_t u, v, u2, v2
    cdef Py_ssize_t i
    if n > 16:
        return memcmp(a, b, n) == 0
    if n >= 8:
        memcpy(&x, a, 8)
        memcpy(&y, b, 8)
        memcpy(&x2, a + n - 8, 8)
        memcpy(&y2, b + n - 8, 8)
        return ((x ^ y) | (x2 ^ y2)) == 0
    if n >= 4:
        memcpy(&u, a, 4)
        memcpy(&v, b, 4)
        memcpy(&u2, a + n - 4, 4)
        memcpy(&v2, b + n - 4, 4)
        return ((u ^ v) | (u2 ^ v2)) == 0
    for i in range(n):
        if a[i] != <uchar>b[i]:
            return False
    return True


cdef inline int _lookup_field(const Side* side, const uchar* key, Py_ssize_t length, int guess) noexcept:
    """The field id of a key, TYPE_GID for "type", or UNKNOWN_GID.

    `guess` is tried first: peers write the fields in declaration order, so the key
    after field g is nearly always field g + 1.
    """
    cdef int gid
    if (0 <= guess < side.nfields and side.fields[guess].len == length
            and _same(key, side.fields[guess].name, length)):
        return guess
    for gid in range(side.nfields):
        if side.fields[gid].len == length and _same(key, side.fields[gid].name, length):
            return gid
    if length == 4 and _same(key, b"type", 4):
        return TYPE_GID
    return UNKNOWN_GID


cdef inline const TypeDef* _lookup_type(const Side* side, const uchar* name, Py_ssize_t length) noexcept:
    cdef int t
    for t in range(side.ntypes):
        if side.types[t].len == length and _same(name, side.types[t].name, length):
            return &side.types[t]
    return NULL


cdef int _scan(const Side* side, const char* frame, Py_ssize_t n, Scan* out) except -1:
    cdef const uchar* buf = <const uchar*>frame
    cdef Py_ssize_t pos, key_start, val_start, i
    cdef Py_ssize_t start = 0, length = 0
    cdef Py_ssize_t type_start = -1, type_len = 0
    cdef size_t count
    cdef int gid = -1, kind
    cdef uint32_t seen = 0, bit, extra, missing
    cdef bint negative = False
    cdef const FieldDef* f
    cdef const TypeDef* td
    cdef uchar lead
    if n > MAX_FRAME_SIZE:
        return _fail("frame too large")
    if n < 1:
        return _truncated()
    lead = buf[0]
    if 0x80 <= lead <= 0x8F:
        count = lead & 0x0F
        pos = 1
    elif lead == 0xDE or lead == 0xDF:
        pos = 3 if lead == 0xDE else 5
        if pos > n:
            return _truncated()
        count = _be(buf + 1, pos - 1)
    else:
        return _fail("not a map")
    if count > MAX_FIELDS:
        return _fail("too many keys")

    out.job_id = NULL
    out.job_id_len = 0
    out.ident = NULL
    out.ident_len = 0
    out.env = NULL
    out.env_len = 0
    for i in range(<Py_ssize_t>count):
        key_start = pos
        if not _read_str(buf, pos, n, &start, &length):
            return _fail("non-str key")
        pos = start + length
        gid = _lookup_field(side, buf + start, length, gid + 1)
        if gid == UNKNOWN_GID:
            return _fail_shown("unexpected key {}", buf + start, length)
        bit = (<uint32_t>1) << (gid + 1)
        if seen & bit:
            return _fail_shown("duplicate key {}", buf + start, length)
        seen |= bit
        val_start = pos
        if gid == TYPE_GID:
            if not _read_str(buf, pos, n, &type_start, &type_len):
                return _fail("type must be a str")
            pos = type_start + type_len
        else:
            f = &side.fields[gid]
            kind = f.kind
            if kind == K_ANY:
                pos = _skip(buf, pos, n, 1)
            elif kind == K_STR:
                if not _read_str(buf, pos, n, &start, &length):
                    return _fail_field("{} must be a str", f)
                if not _utf8_valid(buf + start, length):
                    return _fail_field("{} is not valid UTF-8", f)
                pos = start + length
                if f.capture == CAP_JOB_ID:
                    out.job_id = frame + start
                    out.job_id_len = length
                elif f.capture == CAP_ENV:
                    out.env = frame + start
                    out.env_len = length
            elif kind == K_INT or kind == K_UINT:
                if not _read_int(buf, pos, n, &negative, &pos):
                    return _fail_field("{} must be an int", f)
                if kind == K_UINT and negative:
                    return _fail_field("{} must be >= 0", f)
            elif kind == K_MAP:
                if pos >= n:
                    return _truncated()
                lead = buf[pos]
                if not (0x80 <= lead <= 0x8F or lead == 0xDE or lead == 0xDF):
                    return _fail_field("{} must be a map", f)
                pos = _skip(buf, pos, n, 1)
            else:  # K_JOB_PAIR
                pos = _job_pair(buf, pos, n, out)
        out.key_start[i] = key_start
        out.val_start[i] = val_start
        out.val_end[i] = pos
        out.field[i] = gid
    if pos != n:
        return _fail("trailing bytes after message")

    if type_start < 0:
        return _fail("missing key 'type'")
    td = _lookup_type(side, buf + type_start, type_len)
    if td == NULL:
        return _fail_shown("unknown message type {}", buf + type_start, type_len)
    extra = seen & ~td.mask
    if extra:
        return _fail_key_set("unexpected", side, td, extra)
    missing = td.mask & ~seen
    if missing:
        return _fail_key_set("missing", side, td, missing)
    for i in range(<Py_ssize_t>count):
        if out.field[i] != TYPE_GID:
            out.field[i] = td.index[out.field[i]]
    out.type = td.code
    out.nfields = <int>count
    return 0


cdef int scan_client_c(const char* buf, Py_ssize_t n, Scan* out) except -1:
    return _scan(&_client_side, buf, n, out)


cdef int scan_agent_c(const char* buf, Py_ssize_t n, Scan* out) except -1:
    return _scan(&_agent_side, buf, n, out)


# -- writing (always the shortest header) ---------------------------------------------

cdef inline Py_ssize_t _map_header_size(Py_ssize_t count) noexcept:
    return 1 if count < 16 else 3 if count < 0x10000 else 5


cdef inline Py_ssize_t _str_header_size(Py_ssize_t length) noexcept:
    return 1 if length < 32 else 2 if length < 0x100 else 3 if length < 0x10000 else 5


cdef inline Py_ssize_t _bin_header_size(Py_ssize_t length) noexcept:
    return 2 if length < 0x100 else 3 if length < 0x10000 else 5


cdef inline char* _put_be(char* o, size_t value, int size) noexcept:
    cdef int i
    for i in range(size):
        o[i] = <char>(value >> (8 * (size - 1 - i)))
    return o + size


cdef inline char* _put_map_header(char* o, Py_ssize_t count) noexcept:
    if count < 16:
        o[0] = <char>(0x80 | count)
        return o + 1
    if count < 0x10000:
        o[0] = <char>0xDE
        return _put_be(o + 1, count, 2)
    o[0] = <char>0xDF
    return _put_be(o + 1, count, 4)


cdef inline char* _put_str(char* o, const char* s, Py_ssize_t length) noexcept:
    if length < 32:
        o[0] = <char>(0xA0 | length)
        o += 1
    elif length < 0x100:
        o[0] = <char>0xD9
        o = _put_be(o + 1, length, 1)
    elif length < 0x10000:
        o[0] = <char>0xDA
        o = _put_be(o + 1, length, 2)
    else:
        o[0] = <char>0xDB
        o = _put_be(o + 1, length, 4)
    memcpy(o, s, length)
    return o + length


cdef inline char* _put_bin(char* o, const char* s, Py_ssize_t length) noexcept:
    if length < 0x100:
        o[0] = <char>0xC4
        o = _put_be(o + 1, length, 1)
    elif length < 0x10000:
        o[0] = <char>0xC5
        o = _put_be(o + 1, length, 2)
    else:
        o[0] = <char>0xC6
        o = _put_be(o + 1, length, 4)
    memcpy(o, s, length)
    return o + length


cdef inline char* _copy(char* o, const char* buf, Py_ssize_t start, Py_ssize_t end) noexcept:
    memcpy(o, buf + start, end - start)
    return o + (end - start)


cdef Py_ssize_t new_job_size(const Scan* s, Py_ssize_t ident_len) noexcept:
    """Length of the backend_new_job frame write_new_job makes from a client_new_job scan."""
    cdef Py_ssize_t size = _map_header_size(s.nfields - 1)
    cdef int i
    for i in range(s.nfields):
        if s.field[i] == TYPE_GID:
            size += (s.val_start[i] - s.key_start[i]) + 1 + BACKEND_NEW_JOB_LEN
        elif s.field[i] == NJ_JOB_ID:
            size += s.val_end[i] - s.key_start[i] + 1 + _bin_header_size(ident_len) + ident_len
        elif s.field[i] != NJ_LAUNCHER:
            size += s.val_end[i] - s.key_start[i]
    return size


cdef Py_ssize_t write_new_job(char* out, const char* buf, const Scan* s,
                              const char* ident, Py_ssize_t ident_len) noexcept:
    """Write backend_new_job: type replaced, job_id -> [bin ident, str job_id], launcher dropped.

    Entries are contiguous in the frame, so the untouched ones between two changed
    entries go out in one memcpy; `run` is where the pending span starts.
    """
    cdef char* o = _put_map_header(out, s.nfields - 1)
    cdef Py_ssize_t run = s.key_start[0] if s.nfields else 0
    cdef int i, field
    for i in range(s.nfields):
        field = s.field[i]
        if field == TYPE_GID:
            o = _copy(o, buf, run, s.val_start[i])  # the span and this key
            o = _put_str(o, BACKEND_NEW_JOB, BACKEND_NEW_JOB_LEN)
        elif field == NJ_JOB_ID:
            o = _copy(o, buf, run, s.val_start[i])
            o[0] = <char>0x92
            o = _put_bin(o + 1, ident, ident_len)
            # The client's job id keeps its own encoding, header included.
            o = _copy(o, buf, s.val_start[i], s.val_end[i])
        elif field == NJ_LAUNCHER:
            o = _copy(o, buf, run, s.key_start[i])
        else:
            continue
        run = s.val_end[i]
    if s.nfields:
        o = _copy(o, buf, run, s.val_end[s.nfields - 1])
    return o - out


cdef Py_ssize_t agent_to_client_size(const Scan* s) noexcept:
    """Length of the frame write_agent_to_client makes; -1 if s.type is not spliced so."""
    cdef Py_ssize_t size = _map_header_size(s.nfields)
    cdef Py_ssize_t name_len
    cdef int i
    if s.type == AGENT_JOB_DONE:
        name_len = BACKEND_JOB_DONE_LEN
    elif s.type == AGENT_JOB_SSH_DEBUG:
        name_len = BACKEND_JOB_SSH_DEBUG_LEN
    else:
        return -1
    for i in range(s.nfields):
        if s.field[i] == TYPE_GID:
            size += (s.val_start[i] - s.key_start[i]) + 1 + name_len
        elif s.field[i] == 0:  # job_id
            size += (s.val_start[i] - s.key_start[i]) + _str_header_size(s.job_id_len) + s.job_id_len
        else:
            size += s.val_end[i] - s.key_start[i]
    return size


cdef Py_ssize_t write_agent_to_client(char* out, const char* buf, const Scan* s) noexcept:
    """Write backend_job_done / backend_job_ssh_debug: type replaced, job_id -> the client's str."""
    cdef char* o = _put_map_header(out, s.nfields)
    cdef Py_ssize_t run = s.key_start[0] if s.nfields else 0
    cdef const char* name
    cdef Py_ssize_t name_len
    cdef int i, field
    if s.type == AGENT_JOB_DONE:
        name, name_len = BACKEND_JOB_DONE, BACKEND_JOB_DONE_LEN
    else:
        name, name_len = BACKEND_JOB_SSH_DEBUG, BACKEND_JOB_SSH_DEBUG_LEN
    for i in range(s.nfields):
        field = s.field[i]
        if field == TYPE_GID:
            o = _copy(o, buf, run, s.val_start[i])
            o = _put_str(o, name, name_len)
        elif field == 0:  # job_id
            o = _copy(o, buf, run, s.val_start[i])
            o = _put_str(o, s.job_id, s.job_id_len)
        else:
            continue
        run = s.val_end[i]
    if s.nfields:
        o = _copy(o, buf, run, s.val_end[s.nfields - 1])
    return o - out


cdef Py_ssize_t job_started_size(Py_ssize_t job_id_len) noexcept:
    # fixmap, "type" key (5) + its value, "job_id" key (7) + its value
    return 1 + 5 + 1 + BACKEND_JOB_STARTED_LEN + 7 + _str_header_size(job_id_len) + job_id_len


cdef Py_ssize_t write_job_started(char* out, const char* job_id, Py_ssize_t job_id_len) noexcept:
    cdef char* o = out
    o[0] = <char>0x82
    o = _put_str(o + 1, b"type", 4)
    o = _put_str(o, BACKEND_JOB_STARTED, BACKEND_JOB_STARTED_LEN)
    o = _put_str(o, b"job_id", 6)
    o = _put_str(o, job_id, job_id_len)
    return o - out


cdef bytes job_key_c(const char* ident, Py_ssize_t ident_len, const char* job_id, Py_ssize_t job_id_len):
    cdef bytes key = PyBytes_FromStringAndSize(NULL, 1 + ident_len + job_id_len)
    cdef char* o = PyBytes_AS_STRING(key)
    o[0] = <char><uchar>ident_len
    memcpy(o + 1, ident, ident_len)
    memcpy(o + 1 + ident_len, job_id, job_id_len)
    return key


# -- the Python-visible API (thin wrappers; the tests exercise the C functions through them)

cdef inline object _text(const char* s, Py_ssize_t n):
    if s == NULL:
        return None
    return PyUnicode_DecodeUTF8(s, n, NULL)


cdef int _check_written(Py_ssize_t written, Py_ssize_t size) except -1:
    if written != size:
        raise AssertionError(f"splice wrote {written} bytes, its size pass said {size}")
    return 0


def scan_client(bytes frame not None) -> tuple:
    """Check a client frame: (type code, job_id, environment).

    job_id is set for client_new_job and client_kill_job, environment for
    client_new_job; both are None otherwise.  Raises WireError.
    """
    cdef Scan s
    scan_client_c(PyBytes_AS_STRING(frame), len(frame), &s)
    return s.type, _text(s.job_id, s.job_id_len), _text(s.env, s.env_len)


def queue_fields(bytes frame not None) -> tuple:
    """For a client_new_job frame: (job_id, course_id, task_id, launcher, time_limit)."""
    cdef Scan s
    cdef const char* buf = PyBytes_AS_STRING(frame)
    cdef Py_ssize_t n = len(frame)
    cdef Py_ssize_t start = 0, length = 0
    cdef int i, field
    scan_client_c(buf, n, &s)
    if s.type != CLIENT_NEW_JOB:
        raise WireError("not a client_new_job")
    texts = {}
    time_limit = None
    for i in range(s.nfields):
        field = s.field[i]
        if field == NJ_COURSE_ID or field == NJ_TASK_ID or field == NJ_LAUNCHER:
            _read_str(<const uchar*>buf, s.val_start[i], n, &start, &length)
            texts[field] = PyUnicode_DecodeUTF8(buf + start, length, NULL)
        elif field == NJ_TIME_LIMIT:
            time_limit = _int_value(<const uchar*>buf, s.val_start[i])
    return (_text(s.job_id, s.job_id_len), texts[NJ_COURSE_ID], texts[NJ_TASK_ID], texts[NJ_LAUNCHER],
            time_limit)


def splice_new_job(bytes frame not None, bytes client_identity not None) -> bytes:
    """client_new_job frame -> backend_new_job frame.

    ``type`` is replaced, ``job_id`` becomes ``[bin client_identity, str job_id]``,
    ``launcher`` is removed; every other entry is copied byte for byte.
    """
    cdef Scan s
    cdef const char* buf = PyBytes_AS_STRING(frame)
    cdef Py_ssize_t ident_len = len(client_identity)
    cdef Py_ssize_t size, written
    if ident_len < 1 or ident_len > 255:
        raise WireError("client identity must be 1..255 bytes")
    scan_client_c(buf, len(frame), &s)
    if s.type != CLIENT_NEW_JOB:
        raise WireError("not a client_new_job")
    size = new_job_size(&s, ident_len)
    out = PyBytes_FromStringAndSize(NULL, size)
    written = write_new_job(PyBytes_AS_STRING(out), buf, &s, PyBytes_AS_STRING(client_identity), ident_len)
    if FB_DEBUG:
        _check_written(written, size)
    return out


def scan_agent(bytes frame not None) -> tuple:
    """Check an agent frame: (type code, client_identity, client_job_id).

    The last two are the parts of the job id 2-array of agent_job_started,
    agent_job_done and agent_job_ssh_debug; None for agent_hello and pong.
    Raises WireError.
    """
    cdef Scan s
    scan_agent_c(PyBytes_AS_STRING(frame), len(frame), &s)
    ident = None if s.ident == NULL else PyBytes_FromStringAndSize(s.ident, s.ident_len)
    return s.type, ident, _text(s.job_id, s.job_id_len)


cdef bytes _agent_to_client(bytes frame, int code, str what):
    cdef Scan s
    cdef const char* buf = PyBytes_AS_STRING(frame)
    cdef Py_ssize_t size, written
    scan_agent_c(buf, len(frame), &s)
    if s.type != code:
        raise WireError(f"not an {what}")
    size = agent_to_client_size(&s)
    out = PyBytes_FromStringAndSize(NULL, size)
    written = write_agent_to_client(PyBytes_AS_STRING(out), buf, &s)
    if FB_DEBUG:
        _check_written(written, size)
    return out


def splice_job_done(bytes frame not None) -> bytes:
    """agent_job_done -> backend_job_done: type replaced, job_id replaced by the client's str job id."""
    return _agent_to_client(frame, AGENT_JOB_DONE, "agent_job_done")


def splice_ssh_debug(bytes frame not None) -> bytes:
    """agent_job_ssh_debug -> backend_job_ssh_debug: type replaced, job_id replaced by the client's."""
    return _agent_to_client(frame, AGENT_JOB_SSH_DEBUG, "agent_job_ssh_debug")


def job_started(str job_id not None) -> bytes:
    """Encode backend_job_started(job_id)."""
    cdef Py_ssize_t length, size, written
    cdef const char* raw = PyUnicode_AsUTF8AndSize(job_id, &length)
    size = job_started_size(length)
    out = PyBytes_FromStringAndSize(NULL, size)
    written = write_job_started(PyBytes_AS_STRING(out), raw, length)
    if FB_DEBUG:
        _check_written(written, size)
    return out


def job_key(bytes client_identity not None, str job_id not None) -> bytes:
    """The broker's dictionary key for a job: identity length byte, identity, UTF-8 job id.

    ZeroMQ identities are 1..255 bytes, so the length fits one byte and the key is
    unambiguous.  Raises WireError for any other identity length.
    """
    cdef Py_ssize_t ident_len = len(client_identity)
    cdef Py_ssize_t length
    if ident_len < 1 or ident_len > 255:
        raise WireError("client identity must be 1..255 bytes")
    cdef const char* raw = PyUnicode_AsUTF8AndSize(job_id, &length)
    return job_key_c(PyBytes_AS_STRING(client_identity), ident_len, raw, length)
