"""Scan incoming frames and splice outgoing ones: the compiled twin of ``_wire_py``.

The wire schema is written out in ``fastbackend/wire.py``; ``_wire_py.py`` is the
readable statement of the algorithm, which this module follows step for step so that
both give the same result, or the same WireError / WrongDialect, for any input.

Tables: at import, one ``Side`` per (dialect, side) is built from ``protocol.DIALECTS``
(the fields of every message that side may send, their kinds, the message types and
their key masks), and one ``SpliceRule`` per spliced message from the dialect's
``protocol.Splice`` values.  Nothing the Dialect objects say is restated here.

Parsing model: a ``const unsigned char*`` frame, its length ``n`` and a position
``pos``; every length read from a header is compared with the bytes left (``n - pos``)
before any pointer moves, so no read ever leaves the frame.  Nothing here builds a
Python object on the success path of the C-level functions; every ``WireError`` is
raised by one of the small out-of-line ``_fail*`` functions, keeping the scanning
loops tight, and the search for another dialect's type key (``_foreign_dialect``)
only runs once a key has turned out unknown.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_FromLongLong, PyLong_FromUnsignedLongLong
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdint cimport INT64_MAX, int64_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from fastbackend import protocol
from fastbackend.protocol import WireError, WrongDialect

cdef extern from *:
    """
    #ifndef FB_DEBUG
    #define FB_DEBUG 0
    #endif
    """
    # 1 in the debug build (FASTBACKEND_DEBUG=1): the def wrappers then check that
    # every splice wrote exactly the size its size pass announced.
    const int FB_DEBUG

cdef extern from *:
    """
    /* How many leading bytes of s[:n] are ASCII, counted in 64-byte steps (what is left,
       under 64 bytes or from the first step holding a byte >= 0x80, is the caller's).
       SSE2 is part of x86-64: four 16-byte loads OR-ed, one movemask per 64 bytes. */
    #if defined(__SSE2__)
    #include <emmintrin.h>
    static inline Py_ssize_t fb_ascii_run(const unsigned char* s, Py_ssize_t n) {
        Py_ssize_t i = 0;
        for (; i + 64 <= n; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i*)(s + i));
            __m128i b = _mm_loadu_si128((const __m128i*)(s + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i*)(s + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i*)(s + i + 48));
            if (_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d))))
                break;
        }
        return i;
    }
    #else
    static inline Py_ssize_t fb_ascii_run(const unsigned char* s, Py_ssize_t n) {
        (void)s; (void)n;
        return 0;
    }
    #endif
    """
    Py_ssize_t fb_ascii_run(const unsigned char* s, Py_ssize_t n) noexcept nogil

ctypedef unsigned char uchar

cdef int CLIENT_NEW_JOB = protocol.CLIENT_NEW_JOB
cdef int AGENT_JOB_DONE = protocol.AGENT_JOB_DONE
cdef int AGENT_JOB_SSH_DEBUG = protocol.AGENT_JOB_SSH_DEBUG
cdef int V05 = protocol.V05
cdef int V09 = protocol.V09
cdef Py_ssize_t MAX_FRAME_SIZE = protocol.MAX_FRAME_SIZE

# -- tables, built once at import from protocol.DIALECTS -------------------------------

# Field kinds; the names are those of _wire_py (CLIENT_FIELD_KINDS / AGENT_FIELD_KINDS).
cdef enum:
    K_ANY = 0        # pass-through: any well-formed value, skipped
    K_STR = 1        # str holding valid UTF-8
    K_INT = 2        # any msgpack integer
    K_UINT = 3       # msgpack integer >= 0
    K_MAP = 4        # map, contents pass-through
    K_JOB_PAIR = 5   # 0.5 agent side: [bin client_identity (1..255 bytes), str job_id]

# Which Scan member a typed field fills (by the field's name, as _wire_py decides).
cdef enum:
    CAP_NONE = 0
    CAP_JOB_ID = 1       # str "job_id"
    CAP_ENV = 2          # str "environment"
    CAP_ENV_TYPE = 3     # str "environment_type"
    CAP_PRIORITY = 4     # int "priority"

# How a splice rule rewrites the job id (protocol.Splice.job_id).
cdef enum:
    JOB_ID_KEEP = 0      # None: copied as it is
    JOB_ID_PAIR = 1      # "pair": [bin client identity, the client's job id value]
    JOB_ID_STR = 2       # "str": the job id str found in the 0.5 agent's pair

cdef enum:
    MAX_DIALECTS = 4
    MAX_SIDE_FIELDS = 31   # field ids 0..30 use mask bits 1..31; bit 0 is the type key
    MAX_TYPES = 8
    TYPE_GID = -1
    UNKNOWN_GID = -2
    KEY_BYTES = 32         # room for a key as a fixstr: its header and up to 31 bytes of name

cdef struct KeyEnc:
    # A key as the peers encode it: a fixstr (header byte, then the name), for the
    # scanner's fast path.  `len` is NO_KEY (no frame has room for it, so it never
    # matches) for a name too long for a fixstr.  Keys of at most 16 bytes are also held
    # as two words and the mask of their bytes (`need` = 16, else NO_KEY): compared
    # with the 16 bytes at a position in two loads, no dispatch on the length.
    char enc[KEY_BYTES]
    Py_ssize_t len
    Py_ssize_t need
    uint64_t word[2]
    uint64_t care[2]

cdef struct FieldDef:
    const char* name       # points into a bytes object kept in _TABLE_NAMES
    Py_ssize_t len
    int kind
    int capture
    uint32_t bit           # its bit in a key mask: 1 << (field id + 1)
    KeyEnc key             # its key as the peers encode it

cdef struct TypeDef:
    const char* name
    Py_ssize_t len
    int code
    uint32_t mask                       # bit gid+1 per declared field, bit 0 for the type key
    signed char index[MAX_SIDE_FIELDS]  # field id -> index in declaration order
    bint ascending                      # the declaration order is that of the field ids

cdef struct Side:
    int dialect            # the tag whose tables these are
    bint timestamps        # its peers' msgpack (1.x: 0.9) reads ext -1 as a timestamp
    const char* type_key   # "type" / "@type"
    Py_ssize_t type_key_len
    int nforeign           # the other dialects' type keys: meeting one means the frame is theirs
    const char* foreign_key[MAX_DIALECTS]
    Py_ssize_t foreign_len[MAX_DIALECTS]
    int foreign_tag[MAX_DIALECTS]
    int nfields
    # By field id; fields[nfields] (the guess after the last field) is no field: only
    # its key is set, one that never matches.
    FieldDef fields[MAX_SIDE_FIELDS + 1]
    KeyEnc type_enc                          # the type key as the peers encode it
    int first_guess                          # the field id a frame's first key most likely has
    int ntypes
    TypeDef types[MAX_TYPES]

cdef struct SpliceRule:
    # A protocol.Splice resolved against the incoming message's declaration order.
    const char* out_type
    Py_ssize_t out_type_len
    uint32_t drop          # bit i: the entry of field index i is left out
    int ndrop
    int job_id             # JOB_ID_KEEP / JOB_ID_PAIR / JOB_ID_STR
    # Every entry the rule changes holds a str or a fixed-size scalar in any frame the
    # scan accepts (their kinds say so), so that a plan needs no ends (see plan_new_job).
    bint plannable

cdef struct DialectDef:
    const char* type_key
    Py_ssize_t type_key_len
    const char* job_started   # the type name of backend_job_started
    Py_ssize_t job_started_len
    SpliceRule new_job
    SpliceRule job_done
    SpliceRule ssh_debug
    # Declaration indices of client_new_job fields queue_fields / submission_state
    # read; -1 where the dialect has no such field.
    int nj_course_id
    int nj_task_id
    int nj_launcher
    int nj_time_limit
    int nj_environment_parameters
    int nj_inputdata

cdef int NDIALECTS = len(protocol.DIALECTS)
cdef Side _client_sides[MAX_DIALECTS]
cdef Side _agent_sides[MAX_DIALECTS]
cdef DialectDef _dialects[MAX_DIALECTS]
_TABLE_NAMES = []  # owners of the name buffers the tables point into (kept for the module's life)

_KIND_CODES = {"any": K_ANY, "str": K_STR, "int": K_INT, "uint": K_UINT, "map": K_MAP,
               "job_pair": K_JOB_PAIR}
_CAPTURES = {"job_id": CAP_JOB_ID, "environment": CAP_ENV, "environment_type": CAP_ENV_TYPE,
             "priority": CAP_PRIORITY}
_JOB_ID_MODES = {None: JOB_ID_KEEP, "pair": JOB_ID_PAIR, "str": JOB_ID_STR}


def _field_kinds(dict messages, dict typed):
    """The kind of every field of one side, in first-declaration order (as _wire_py.field_kinds)."""
    kinds = {}
    for _code, fields in messages.values():
        for name in fields:
            kinds.setdefault(name, typed.get(name, "any"))
    return kinds


#: The kind of every field a client / an agent may send, per dialect tag (the tests
#: check they equal _wire_py's).
CLIENT_FIELD_KINDS = [_field_kinds(d.client_messages, d.client_kinds) for d in protocol.DIALECTS]
AGENT_FIELD_KINDS = [_field_kinds(d.agent_messages, d.agent_kinds) for d in protocol.DIALECTS]

# Reasons that name a dialect's type key or message names, by dialect tag.
_TYPE_NOT_STR = [f"{d.type_key} must be a str" for d in protocol.DIALECTS]
_MISSING_TYPE = [f"missing key {d.type_key!r}" for d in protocol.DIALECTS]
_NOT_JOB_DONE = [f"not an {d.agent_type(protocol.AGENT_JOB_DONE)}" for d in protocol.DIALECTS]
_NOT_SSH_DEBUG = [f"not an {d.agent_type(protocol.AGENT_JOB_SSH_DEBUG)}" for d in protocol.DIALECTS]

# Whole-value rules of 0.9 (rare: queue snapshots, kills), taken from the dialect module.
_decode = protocol.decode
_time_estimate = protocol.v09.time_estimate
_input_state = protocol.v09.input_state


cdef const char* _keep(str text, Py_ssize_t* length) except NULL:
    raw = text.encode("utf-8")
    _TABLE_NAMES.append(raw)
    length[0] = len(raw)
    return <const char*>raw


cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX

# The length of a key that is never there (longer than any frame).
cdef Py_ssize_t NO_KEY = PY_SSIZE_T_MAX


cdef int _key_enc(KeyEnc* k, str name) except -1:
    """Fill `k` with `name` encoded as a fixstr (None, or a name too long for one: a key
    that never matches)."""
    cdef char pad[16]
    cdef char mask[16]
    raw = b"" if name is None else name.encode("utf-8")
    memset(k, 0, sizeof(KeyEnc))
    k.len = k.need = NO_KEY
    if name is None or len(raw) + 1 > KEY_BYTES:
        return 0
    k.enc[0] = <char>(0xA0 | len(raw))
    memcpy(k.enc + 1, <const char*>raw, len(raw))
    k.len = len(raw) + 1
    if k.len <= 16:
        k.need = 16
        memset(pad, 0, 16)
        memset(mask, 0, 16)
        memcpy(pad, k.enc, k.len)
        memset(mask, 0xFF, k.len)
        memcpy(k.word, pad, 16)
        memcpy(k.care, mask, 16)
    return 0


cdef int _build_side(Side* side, object dialect, dict messages, dict kinds) except -1:
    names = list(kinds)
    if len(names) > MAX_SIDE_FIELDS or len(messages) > MAX_TYPES:
        raise RuntimeError("protocol tables too large for the wire scanner")
    side.dialect = dialect.tag
    # The 0.9 peers run msgpack 1.x (ext -1 is a timestamp); the 0.5 ones msgpack 0.6,
    # which refuses every negative ext type.
    side.timestamps = dialect.tag == V09
    side.type_key = _keep(dialect.type_key, &side.type_key_len)
    side.nforeign = 0
    for other in protocol.DIALECTS:
        if other.tag != dialect.tag:
            side.foreign_key[side.nforeign] = _keep(other.type_key, &side.foreign_len[side.nforeign])
            side.foreign_tag[side.nforeign] = other.tag
            side.nforeign += 1
    side.nfields = len(names)
    for gid, name in enumerate(names):
        side.fields[gid].name = _keep(name, &side.fields[gid].len)
        side.fields[gid].kind = _KIND_CODES[kinds[name]]
        side.fields[gid].capture = _CAPTURES.get(name, CAP_NONE)
        side.fields[gid].bit = (<uint32_t>1) << (gid + 1)
        _key_enc(&side.fields[gid].key, name)
    _key_enc(&side.fields[side.nfields].key, None)
    _key_enc(&side.type_enc, dialect.type_key)
    # The per-job messages, by far the most frequent, are each side's largest, and
    # start with the job id: the first key of a frame is guessed to be theirs.
    largest = max(messages.values(), key=lambda m: len(m[1]))[1]
    side.first_guess = names.index(largest[0]) if largest else 0
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
        gids = [names.index(name) for name in fields]
        side.types[t].ascending = gids == sorted(gids)
    return 0


cdef int _build_rule(SpliceRule* rule, dict messages, dict kinds, int code, object splice) except -1:
    fields = next(f for c, f in messages.values() if c == code)
    # Field 0 is the job id in every message that is spliced (the splicers rely on it).
    if fields[0] != "job_id":
        raise RuntimeError("a spliced message must declare job_id first")
    rule.out_type = _keep(splice.out_type, &rule.out_type_len)
    rule.drop = 0
    rule.ndrop = 0
    for name in splice.drop:
        rule.drop |= (<uint32_t>1) << fields.index(name)
        rule.ndrop += 1
    rule.job_id = _JOB_ID_MODES[splice.job_id]
    # The type key's value is a str (a type name the scan matched); the 0.5 job id pair
    # wraps the job id's value as it is, and each dropped entry is skipped whole.
    plain = ("str", "int", "uint")
    rule.plannable = (all(kinds.get(name) in plain for name in splice.drop)
                      and (rule.job_id != JOB_ID_PAIR or kinds.get("job_id") == "str"))
    return 0


def _index_or_none(tuple fields, str name):
    return fields.index(name) if name in fields else -1


cdef int _build_dialect(DialectDef* dd, object dialect) except -1:
    dd.type_key = _keep(dialect.type_key, &dd.type_key_len)
    dd.job_started = _keep(dialect.job_started_type, &dd.job_started_len)
    _build_rule(&dd.new_job, dialect.client_messages, CLIENT_FIELD_KINDS[dialect.tag], CLIENT_NEW_JOB,
                dialect.new_job)
    _build_rule(&dd.job_done, dialect.agent_messages, AGENT_FIELD_KINDS[dialect.tag], AGENT_JOB_DONE,
                dialect.job_done)
    _build_rule(&dd.ssh_debug, dialect.agent_messages, AGENT_FIELD_KINDS[dialect.tag], AGENT_JOB_SSH_DEBUG,
                dialect.ssh_debug)
    fields = dialect.client_messages[dialect.client_type(CLIENT_NEW_JOB)][1]
    dd.nj_course_id = _index_or_none(fields, "course_id")
    dd.nj_task_id = _index_or_none(fields, "task_id")
    dd.nj_launcher = _index_or_none(fields, "launcher")
    dd.nj_time_limit = _index_or_none(fields, "time_limit")
    dd.nj_environment_parameters = _index_or_none(fields, "environment_parameters")
    dd.nj_inputdata = _index_or_none(fields, "inputdata")
    return 0


if NDIALECTS > MAX_DIALECTS:
    raise RuntimeError("more dialects than the wire scanner has room for")
for _d in protocol.DIALECTS:
    _build_side(&_client_sides[<int>_d.tag], _d, _d.client_messages, CLIENT_FIELD_KINDS[_d.tag])
    _build_side(&_agent_sides[<int>_d.tag], _d, _d.agent_messages, AGENT_FIELD_KINDS[_d.tag])
    _build_dialect(&_dialects[<int>_d.tag], _d)
del _d

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

# The whole size of a value by its lead byte when that is fixed and the value is always
# well-formed (ints, floats, nil, bools, empty map and array); 0 for every other lead.
cdef uchar SCALAR_SIZE[256]
for _lead in range(256):
    if _lead <= 0x7F or _lead >= 0xE0 or _lead in (0x80, 0x90, 0xC0, 0xC2, 0xC3):
        SCALAR_SIZE[_lead] = 1
    elif 0xCA <= _lead <= 0xD3:
        SCALAR_SIZE[_lead] = 1 + LEAD_SIZE[_lead - 0xC0]
    else:
        SCALAR_SIZE[_lead] = 0
del _lead


def _same_bytes(bytes a not None, bytes b not None) -> bool:
    """same_bytes over two equally long byte strings (for the tests: it must be ``a == b``)."""
    if len(a) != len(b):
        raise ValueError("same_bytes compares equal lengths")
    return same_bytes(<const char*>a, <const char*>b, len(a))


# -- failures (out of line: the scanning loops only carry a call and a return) -------

def _show(bytes raw):
    """A key or type name as it appears in a reason (same rule as _wire_py._show)."""
    text = raw[:40].decode("utf-8", "backslashreplace")
    return repr(text + "..." if len(raw) > 40 else text)


cdef int _fail(str reason) except -1:
    raise WireError(reason)


cdef int _truncated() except -1:
    raise WireError("truncated frame")


cdef int _bad_dialect(int dialect) except -1:
    raise IndexError(f"no dialect has the tag {dialect}")


cdef int _fail_type_key(const Side* side, bint missing) except -1:
    """The type key is missing, or its value is no str (the reason names the side's type key)."""
    raise WireError((_MISSING_TYPE if missing else _TYPE_NOT_STR)[side.dialect])


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


cdef Py_ssize_t _skip(const uchar* buf, Py_ssize_t pos, Py_ssize_t n, int depth,
                      bint timestamps) except -1:
    """Skip one well-formed value at pos; `depth` containers are already open around it.

    Returns the position after it.  Iterative: `left` counts the values still to skip
    in the innermost open container, `stack` those of the enclosing ones (shifted left
    by one, the low bit saying whether that container is a map), so a hostile nesting
    costs a WireError at MAX_DEPTH, never the C stack.

    Well-formed means what the receiver's msgpack loads (see _wire_py._skip): valid
    UTF-8 in every str, no map inside a map key, no reserved (negative) ext type but,
    when `timestamps`, a well-formed timestamp.
    """
    cdef Py_ssize_t stack[MAX_DEPTH]
    cdef int top = 0
    cdef int key_top = -1      # `top` where the map key being skipped began; -1 outside keys
    cdef bint is_map = False   # the innermost open container is a map
    cdef bint in_key, opens_map
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
            if not _text_valid(buf + pos, <Py_ssize_t>length):
                return _fail("invalid UTF-8 in a str")
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
                if what == L_EXT:
                    if buf[pos] >= 0x80:
                        _check_ext(buf + pos, <Py_ssize_t>length, timestamps)
                    pos += 1
                elif lead >= 0xD9 and not _text_valid(buf + pos, <Py_ssize_t>length):  # str8/16/32
                    return _fail("invalid UTF-8 in a str")
                pos += <Py_ssize_t>length
            elif what == L_FIXEXT:
                if size + 1 > n - pos:
                    return _truncated()
                if buf[pos] >= 0x80:
                    _check_ext(buf + pos, size, timestamps)
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
            # A map key is every first value of a pair: an even count left in a map.
            in_key = key_top >= 0 or (is_map and (left & 1) == 0)
            opens_map = lead <= 0x8F or lead >= 0xDE
            if in_key and opens_map:
                return _fail("map as a map key")
            if depth + top + 1 > MAX_DEPTH:
                return _fail("nesting too deep")
            # Every item takes at least one byte.
            if items > n - pos:
                return _truncated()
            if items:
                if in_key and key_top < 0:
                    key_top = top
                stack[top] = ((left - 1) << 1) | is_map
                top += 1
                left = items
                is_map = opens_map
                continue
        left -= 1
        while left == 0:
            if top == 0:
                return pos
            top -= 1
            left = stack[top] >> 1
            is_map = stack[top] & 1
            if top == key_top:
                key_top = -1


cdef inline Py_ssize_t _skip_value(const uchar* buf, Py_ssize_t pos, Py_ssize_t n,
                                   bint timestamps) except -1:
    """_skip(buf, pos, n, 1, timestamps) for a message's top-level value.  Most entries
    hold a scalar of a fixed size, skipped here by the size table (small enough to be
    inlined into the scan); anything else goes to _skip_other."""
    cdef Py_ssize_t size = SCALAR_SIZE[buf[pos]] if pos < n else 0
    if size != 0 and size <= n - pos:
        return pos + size
    return _skip_other(buf, pos, n, timestamps)


cdef Py_ssize_t _skip_other(const uchar* buf, Py_ssize_t pos, Py_ssize_t n,
                            bint timestamps) except -1:
    """_skip_value's other values: a valid fixstr here, without the skipper's loop;
    anything else, or anything amiss, goes to _skip, which accepts and refuses exactly
    as before."""
    cdef Py_ssize_t length
    if pos < n and 0xA0 <= buf[pos] <= 0xBF:
        length = buf[pos] & 0x1F
        if length < n - pos and _text_valid(buf + pos + 1, length):
            return pos + 1 + length
    return _skip(buf, pos, n, 1, timestamps)


cdef int _check_ext(const uchar* p, Py_ssize_t length, bint timestamps) except -1:
    """An ext of negative type (p: its type byte, `length`: its data's): only a timestamp
    a msgpack 1.x peer reads (when `timestamps`) passes (as _wire_py._ext_type)."""
    cdef uint32_t nanoseconds
    if p[0] != 0xFF or not timestamps:
        return _fail(f"reserved ext type {<int>p[0] - 0x100}")
    if length == 4:
        return 0
    if length != 8 and length != 12:
        return _fail("invalid timestamp")
    nanoseconds = _be(p + 1, 4)
    if length == 8:
        nanoseconds >>= 2
    if nanoseconds >= 1000000000:
        return _fail("invalid timestamp")
    return 0


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


cdef inline bint _short_ascii(const uchar* s, Py_ssize_t n) noexcept:
    """s[:n] is ASCII, for n <= 32 (ids, names, keys): a few overlapping loads OR-ed
    together, no loop over the bytes; every read stays inside s[:n]."""
    cdef uint64_t a, b, c, d
    cdef uint32_t u, v
    if n >= 16:
        memcpy(&a, s, 8)
        memcpy(&b, s + 8, 8)
        memcpy(&c, s + (n - 16), 8)
        memcpy(&d, s + (n - 8), 8)
        return ((a | b | c | d) & 0x8080808080808080ULL) == 0
    if n >= 8:
        memcpy(&a, s, 8)
        memcpy(&b, s + (n - 8), 8)
        return ((a | b) & 0x8080808080808080ULL) == 0
    if n >= 4:
        memcpy(&u, s, 4)
        memcpy(&v, s + (n - 4), 4)
        return ((u | v) & 0x80808080U) == 0
    if n == 0:
        return True
    # 1..3 bytes: the first, the middle and the last (overlapping when n < 3).
    return ((s[0] | s[n >> 1] | s[n - 1]) & 0x80) == 0


cdef inline bint _text_valid(const uchar* s, Py_ssize_t n) noexcept:
    """_utf8_valid for a str of any length: short ASCII (nearly every id and name) in a
    few loads, long text by _str_valid."""
    if n <= 32:
        return _short_ascii(s, n) or _utf8_valid(s, n)
    return _str_valid(s, n)


cdef inline bint _str_valid(const uchar* s, Py_ssize_t n) noexcept:
    """_utf8_valid for the strs inside pass-through values, which can be long (a
    submission's source, a grader's output): ASCII 32 bytes at a time first (four words
    OR-ed, which the compiler keeps in registers), the full check from the first chunk
    holding a byte >= 0x80 (a character boundary, since all before it is ASCII).  Where
    SSE2 is (every x86-64), 64 bytes at a time before that (fb_ascii_run)."""
    cdef Py_ssize_t i = fb_ascii_run(s, n)
    cdef uint64_t w0, w1, w2, w3
    while i + 32 <= n:
        memcpy(&w0, s + i, 8)
        memcpy(&w1, s + i + 8, 8)
        memcpy(&w2, s + i + 16, 8)
        memcpy(&w3, s + i + 24, 8)
        if (w0 | w1 | w2 | w3) & 0x8080808080808080ULL:
            break
        i += 32
    return _utf8_valid(s + i, n - i)


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
    if not _text_valid(buf + start, length):
        return _fail("job_id is not valid UTF-8")
    out.ident = <const char*>buf + ident_start
    out.ident_len = <Py_ssize_t>ident_len
    out.job_id = <const char*>buf + start
    out.job_id_len = length
    return start + length


cdef inline bint _key_at(const KeyEnc* k, const uchar* p, Py_ssize_t left) noexcept:
    """The encoded key k is at p (`left` bytes from p to the frame's end): two masked
    words when 16 bytes are left and the key fits them, else _same; reads stay in p[:left]."""
    cdef uint64_t w0, w1
    if k.need <= left:
        memcpy(&w0, p, 8)
        memcpy(&w1, p + 8, 8)
        return (((w0 ^ k.word[0]) & k.care[0]) | ((w1 ^ k.word[1]) & k.care[1])) == 0
    return k.len <= left and same_bytes(p, k.enc, k.len)


cdef inline int64_t _priority_value(const uchar* buf, Py_ssize_t pos) noexcept:
    """The value of an integer a scan has already checked, clamped to int64's maximum.

    A uint64 beyond int64 is served as the largest priority (the scheduler keeps int64),
    as _wire_py's ``min(value, PRIORITY_MAX)``.
    """
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
        return INT64_MAX if v > <uint64_t>INT64_MAX else <int64_t>v
    if size < 8 and (v >> (8 * size - 1)):
        v |= ~((<uint64_t>1 << (8 * size)) - 1)  # sign-extend
    return <int64_t>v


cdef inline int _lookup_field(const Side* side, const uchar* key, Py_ssize_t length, int guess) noexcept:
    """The field id of a key, TYPE_GID for the side's type key, or UNKNOWN_GID.

    `guess` is tried first: peers write the fields in declaration order, so the key
    after field g is nearly always field g + 1.
    """
    cdef int gid
    if (0 <= guess < side.nfields and side.fields[guess].len == length
            and same_bytes(key, side.fields[guess].name, length)):
        return guess
    # The type key next: it is the key that breaks the declaration order (the real
    # peers write it last, some encoders first).
    if length == side.type_key_len and same_bytes(key, side.type_key, length):
        return TYPE_GID
    for gid in range(side.nfields):
        if side.fields[gid].len == length and same_bytes(key, side.fields[gid].name, length):
            return gid
    return UNKNOWN_GID


cdef inline const TypeDef* _lookup_type(const Side* side, const uchar* name, Py_ssize_t length) noexcept:
    cdef int t
    for t in range(side.ntypes):
        if side.types[t].len == length and same_bytes(name, side.types[t].name, length):
            return &side.types[t]
    return NULL


cdef int _foreign_dialect(const Side* side, const uchar* buf, Py_ssize_t pos, Py_ssize_t left,
                          Py_ssize_t n) except? -2:
    """The tag of another dialect whose type key is one of the `left` keys from pos, or -1.

    Only asked once a key has turned out unknown (the real 0.9 peers write ``@type``
    last, so a 0.9 frame read as 0.5 meets a 0.9-only field first).  -1 when none is
    found, or when the rest does not read: the unknown key is then reported as such.
    """
    cdef Py_ssize_t i, start = 0, length = 0
    cdef int j
    try:
        for i in range(left):
            if not _read_str(buf, pos, n, &start, &length):
                return -1
            for j in range(side.nforeign):
                if side.foreign_len[j] == length and memcmp(buf + start, side.foreign_key[j], length) == 0:
                    return side.foreign_tag[j]
            pos = _skip(buf, start + length, n, 1, side.timestamps)
    except WireError:
        return -1
    return -1


cdef int _unknown_key(const Side* side, const uchar* buf, Py_ssize_t key_start, Py_ssize_t left,
                      Py_ssize_t n, Py_ssize_t start, Py_ssize_t length) except -1:
    """Raise for the unknown key at key_start: WrongDialect if the frame is another dialect's."""
    cdef int other = _foreign_dialect(side, buf, key_start, left, n)
    if other >= 0:
        raise WrongDialect(other)
    return _fail_shown("unexpected key {}", buf + start, length)


cdef int _declaration_indices(const Side* side, const TypeDef* td, const uchar* buf, Py_ssize_t n,
                              Scan* out, Py_ssize_t count) except -1:
    """Set each field entry's declaration index from its key (the scan has found them all)."""
    cdef Py_ssize_t i, start = 0, length = 0
    for i in range(count):
        if out.field[i] != TYPE_GID:
            _read_str(buf, out.key_start[i], n, &start, &length)
            out.field[i] = td.index[_lookup_field(side, buf + start, length, -1)]
    return 0


cdef int _scan(const Side* side, const char* frame, Py_ssize_t n, Scan* out) except -1:
    cdef const uchar* buf = <const uchar*>frame
    cdef Py_ssize_t pos, key_start, val_start, i
    cdef Py_ssize_t start = 0, length = 0
    cdef Py_ssize_t type_start = -1, type_len = 0
    cdef size_t count
    cdef int gid, kind
    cdef bint ascending = True   # the frame's fields come in increasing field id order
    cdef uint32_t seen = 0, bit, extra, missing
    cdef bint negative = False
    cdef const FieldDef* f       # the entry's field; NULL for the type key
    # The field the next key most likely is: the one after the last field met.
    cdef const FieldDef* guess = &side.fields[side.first_guess]
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

    out.dialect = side.dialect
    out.job_id = NULL
    out.job_id_len = 0
    out.ident = NULL
    out.ident_len = 0
    out.env = NULL
    out.env_len = 0
    out.env_type = NULL
    out.env_type_len = 0
    out.priority = 0
    for i in range(<Py_ssize_t>count):
        key_start = pos
        # The peers write every key as a fixstr and the fields in declaration order: the
        # guessed field's key (header included) is compared with the bytes at pos in a
        # few loads, then the type key (the one that breaks the order).  Either matches
        # exactly where _read_str + _lookup_field would find that key; anything else
        # (another key, a longer header, a key cut by the frame's end) takes that path.
        if _key_at(&guess.key, buf + pos, n - pos):
            f = guess
            pos += f.key.len
        elif _key_at(&side.type_enc, buf + pos, n - pos):
            f = NULL
            pos += side.type_enc.len
        else:
            if not _read_str(buf, pos, n, &start, &length):
                return _fail("non-str key")
            pos = start + length
            gid = _lookup_field(side, buf + start, length, <int>(guess - side.fields))
            if gid == UNKNOWN_GID:
                return _unknown_key(side, buf, key_start, <Py_ssize_t>count - i, n, start, length)
            if gid == TYPE_GID:
                f = NULL
            else:
                f = &side.fields[gid]
                if f < guess and seen >> 1:  # (any field is in order as the first one)
                    ascending = False
        bit = 1 if f == NULL else f.bit
        if seen & bit:
            _read_str(buf, key_start, n, &start, &length)
            return _fail_shown("duplicate key {}", buf + start, length)
        seen |= bit
        val_start = pos
        if f == NULL:
            if not _read_str(buf, pos, n, &type_start, &type_len):
                return _fail_type_key(side, False)
            pos = type_start + type_len
            out.field[i] = TYPE_GID
        else:
            guess = f + 1
            # The entry's index among the fields (the entries but the type key, if it
            # came before): its declaration index when the type's order is the field
            # ids' and the frame's too (checked after the loop).
            out.field[i] = <int>i - <int>(seen & 1)
            kind = f.kind
            if kind == K_ANY:
                pos = _skip_value(buf, pos, n, side.timestamps)
            else:  # (an if of its own: K_ANY, the most frequent, is tested first)
                if kind == K_STR:
                    if not _read_str(buf, pos, n, &start, &length):
                        return _fail_field("{} must be a str", f)
                    if not _text_valid(buf + start, length):
                        return _fail_field("{} is not valid UTF-8", f)
                    pos = start + length
                    if f.capture == CAP_JOB_ID:
                        out.job_id = frame + start
                        out.job_id_len = length
                    elif f.capture == CAP_ENV:
                        out.env = frame + start
                        out.env_len = length
                    elif f.capture == CAP_ENV_TYPE:
                        out.env_type = frame + start
                        out.env_type_len = length
                elif kind == K_INT or kind == K_UINT:
                    if not _read_int(buf, pos, n, &negative, &pos):
                        return _fail_field("{} must be an int", f)
                    if kind == K_UINT and negative:
                        return _fail_field("{} must be >= 0", f)
                    if f.capture == CAP_PRIORITY:
                        out.priority = _priority_value(buf, val_start)
                elif kind == K_MAP:
                    if pos >= n:
                        return _truncated()
                    lead = buf[pos]
                    if not (0x80 <= lead <= 0x8F or lead == 0xDE or lead == 0xDF):
                        return _fail_field("{} must be a map", f)
                    pos = _skip_value(buf, pos, n, side.timestamps)
                else:  # K_JOB_PAIR
                    pos = _job_pair(buf, pos, n, out)
        out.key_start[i] = key_start
        out.val_start[i] = val_start
        out.val_end[i] = pos
    if pos != n:
        return _fail("trailing bytes after message")

    if type_start < 0:
        return _fail_type_key(side, True)
    td = _lookup_type(side, buf + type_start, type_len)
    if td == NULL:
        return _fail_shown("unknown message type {}", buf + type_start, type_len)
    extra = seen & ~td.mask
    if extra:
        return _fail_key_set("unexpected", side, td, extra)
    missing = td.mask & ~seen
    if missing:
        return _fail_key_set("missing", side, td, missing)
    # The frame holds exactly td's fields; when both orders are the field ids', each
    # entry's ordinal is its declaration index.  Otherwise look each key up again.
    if not (ascending and td.ascending):
        _declaration_indices(side, td, buf, n, out, <Py_ssize_t>count)
    out.type = td.code
    out.nfields = <int>count
    return 0


cdef int scan_client_c(int dialect, const char* buf, Py_ssize_t n, Scan* out) except -1:
    if <unsigned>dialect >= <unsigned>NDIALECTS:
        return _bad_dialect(dialect)
    return _scan(&_client_sides[dialect], buf, n, out)


cdef int scan_agent_c(int dialect, const char* buf, Py_ssize_t n, Scan* out) except -1:
    if <unsigned>dialect >= <unsigned>NDIALECTS:
        return _bad_dialect(dialect)
    return _scan(&_agent_sides[dialect], buf, n, out)


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



cdef inline char* _put_type_name(char* o, const char* name, Py_ssize_t length) noexcept:
    """_put_str for the out type name; a fixstr (every name the dialects have) without a
    call to memcpy: two overlapping fixed-size moves cover any length from 4 to 32."""
    if length >= 32 or length < 4:
        return _put_str(o, name, length)
    o[0] = <char>(0xA0 | length)
    o += 1
    if length >= 16:
        memcpy(o, name, 16)
        memcpy(o + length - 16, name + length - 16, 16)
    elif length >= 8:
        memcpy(o, name, 8)
        memcpy(o + length - 8, name + length - 8, 8)
    else:
        memcpy(o, name, 4)
        memcpy(o + length - 4, name + length - 4, 4)
    return o + length


cdef inline Py_ssize_t _splice_size(const Scan* s, const SpliceRule* rule, Py_ssize_t ident_len) noexcept:
    """Length of the frame _splice_write makes from a scan by a rule."""
    # The rule in locals: loads through the pointers could not be hoisted out of the loop.
    cdef uint32_t drop = rule.drop
    cdef int mode = rule.job_id, nfields = s.nfields
    cdef Py_ssize_t type_value = _str_header_size(rule.out_type_len) + rule.out_type_len
    cdef Py_ssize_t size = _map_header_size(nfields - rule.ndrop)
    cdef int i, field
    for i in range(nfields):
        field = s.field[i]
        if field == TYPE_GID:
            size += (s.val_start[i] - s.key_start[i]) + type_value
        elif field == 0 and mode != JOB_ID_KEEP:  # job_id: field 0 of every spliced message
            if mode == JOB_ID_PAIR:
                size += s.val_end[i] - s.key_start[i] + 1 + _bin_header_size(ident_len) + ident_len
            else:
                size += (s.val_start[i] - s.key_start[i]) + _str_header_size(s.job_id_len) + s.job_id_len
        elif not ((drop >> field) & 1):
            size += s.val_end[i] - s.key_start[i]
    return size


cdef inline Py_ssize_t _splice_write(char* out, const char* buf, const Scan* s, const SpliceRule* rule,
                                     const char* ident, Py_ssize_t ident_len) noexcept:
    """Rebuild a frame: the type key's value becomes rule.out_type, the job id is rewritten
    as rule.job_id says, the entries in rule.drop are left out.

    Entries are contiguous in the frame, so the untouched ones between two changed
    entries go out in one memcpy; `run` is where the pending span starts.
    """
    # The rule and the scan's counts in locals: every write through `o` might alias
    # them as far as the compiler knows, and would otherwise reload them.
    cdef const char* out_type = rule.out_type
    cdef Py_ssize_t out_type_len = rule.out_type_len
    cdef uint32_t drop = rule.drop
    cdef int mode = rule.job_id, nfields = s.nfields
    cdef char* o = _put_map_header(out, nfields - rule.ndrop)
    cdef Py_ssize_t run = s.key_start[0] if nfields else 0
    cdef int i, field
    for i in range(nfields):
        field = s.field[i]
        if field == TYPE_GID:
            o = _copy(o, buf, run, s.val_start[i])  # the span and this key
            o = _put_type_name(o, out_type, out_type_len)
        elif field == 0 and mode != JOB_ID_KEEP:
            o = _copy(o, buf, run, s.val_start[i])
            if mode == JOB_ID_PAIR:
                o[0] = <char>0x92
                o = _put_bin(o + 1, ident, ident_len)
                # The client's job id keeps its own encoding, header included.
                o = _copy(o, buf, s.val_start[i], s.val_end[i])
            else:
                o = _put_str(o, s.job_id, s.job_id_len)
        elif (drop >> field) & 1:
            o = _copy(o, buf, run, s.key_start[i])
        else:
            continue
        run = s.val_end[i]
    if nfields:
        o = _copy(o, buf, run, s.val_end[nfields - 1])
    return o - out


cdef Py_ssize_t new_job_size(const Scan* s, Py_ssize_t ident_len) noexcept:
    """Length of the backend_new_job frame write_new_job makes from a client_new_job scan."""
    return _splice_size(s, &_dialects[s.dialect].new_job, ident_len)


cdef Py_ssize_t write_new_job(char* out, const char* buf, const Scan* s,
                              const char* ident, Py_ssize_t ident_len) noexcept:
    """Write backend_new_job by the scan's dialect's rule (0.5: job_id -> [bin ident, job_id],
    launcher dropped; 0.9: priority and launcher dropped)."""
    return _splice_write(out, buf, s, &_dialects[s.dialect].new_job, ident, ident_len)


# -- the new-job splice of a stored frame, without a second scan ------------------------
#
# A job that waits is spliced later, from the frame its record keeps.  Rather than scan
# that frame again (the largest share of a waiting job's cost), the broker keeps a
# NewJobPlan made from the arrival scan: where the entries the dialect's new-job rule
# changes start (the type key's value, the 0.5 job id's value, the dropped entries' keys),
# in frame order.  Where each ends is read from the frame again, once per dispatch: each
# is a str or a fixed-size scalar (the rule is ``plannable``: the field kinds guarantee
# it), whose header gives its length.  Every byte between them is copied as it is, as
# _splice_write does.  (The debug build checks every planned splice against a scanned one.)

cdef inline Py_ssize_t _plain_end(const uchar* buf, Py_ssize_t pos) noexcept:
    """The end of the str or fixed-size scalar at pos of a scanned frame."""
    cdef uchar lead = buf[pos]
    if 0xA0 <= lead <= 0xBF:
        return pos + 1 + (lead & 0x1F)
    if 0xD9 <= lead <= 0xDB:  # str8/16/32: the length's size, then the length
        return pos + 1 + LEAD_SIZE[lead - 0xC0] + <Py_ssize_t>_be(buf + pos + 1, LEAD_SIZE[lead - 0xC0])
    return pos + SCALAR_SIZE[lead]


cdef int plan_new_job(const char* buf, const Scan* s, NewJobPlan* plan) noexcept:
    """Fill ``plan`` from a client_new_job scan of ``buf``; -1 (and plan.n = PLAN_NONE) if
    it cannot be planned: the rule is not plannable or changes more entries than a plan
    holds (neither is so for the dialects' rules; the caller then scans again at dispatch)."""
    cdef const SpliceRule* rule = &_dialects[s.dialect].new_job
    cdef int i, field, n = 0, kind
    plan.n = PLAN_NONE
    if not rule.plannable:
        return -1
    for i in range(s.nfields):
        field = s.field[i]
        if field == TYPE_GID:
            kind = PLAN_TYPE
        elif field == 0 and rule.job_id == JOB_ID_PAIR:
            kind = PLAN_PAIR
        elif field == 0 and rule.job_id != JOB_ID_KEEP:
            return -1  # a str rewrite: no new-job rule has one
        elif (rule.drop >> field) & 1:
            kind = PLAN_DROP
        else:
            continue
        if n == PLAN_ENTRIES:
            return -1
        plan.kind[n] = <uint8_t>kind
        plan.start[n] = <uint32_t>(s.key_start[i] if kind == PLAN_DROP else s.val_start[i])
        n += 1
    plan.n = <uint8_t>n
    return 0


cdef inline Py_ssize_t _stored_map(const char* buf, Py_ssize_t* entries) noexcept:
    """The entry count of a scanned (so well-formed) frame's map, from its header; where
    its first entry starts, after the header, in ``entries``."""
    cdef uchar lead = <uchar>buf[0]
    if lead == 0xDE:
        entries[0] = 3
        return <Py_ssize_t>_be(<const uchar*>buf + 1, 2)
    if lead == 0xDF:
        entries[0] = 5
        return <Py_ssize_t>_be(<const uchar*>buf + 1, 4)
    entries[0] = 1
    return lead & 0x0F


cdef Py_ssize_t planned_new_job_size(const char* buf, Py_ssize_t size, const NewJobPlan* plan, int dialect,
                                     Py_ssize_t ident_len, Py_ssize_t* ends) noexcept:
    """Length of the frame write_planned_new_job makes (= new_job_size of the arrival scan);
    fills ``ends`` (PLAN_ENTRIES long) for it."""
    cdef const SpliceRule* rule = &_dialects[dialect].new_job
    cdef const uchar* b = <const uchar*>buf
    cdef Py_ssize_t entries
    # Every entry the rule drops is in a scanned frame (as _splice_size counts).
    cdef Py_ssize_t out = _map_header_size(_stored_map(buf, &entries) - rule.ndrop) + size - entries
    cdef int i
    for i in range(plan.n):
        ends[i] = _plain_end(b, plan.start[i])
        if plan.kind[i] == PLAN_TYPE:
            out += _str_header_size(rule.out_type_len) + rule.out_type_len - (ends[i] - plan.start[i])
        elif plan.kind[i] == PLAN_PAIR:
            out += 1 + _bin_header_size(ident_len) + ident_len
        else:
            ends[i] = _plain_end(b, ends[i])  # after the key, the value
            out -= ends[i] - plan.start[i]
    return out


cdef Py_ssize_t write_planned_new_job(char* out, const char* buf, Py_ssize_t size, const NewJobPlan* plan,
                                      const Py_ssize_t* ends, int dialect, const char* ident,
                                      Py_ssize_t ident_len) noexcept:
    """Write backend_new_job from a stored client_new_job frame, its plan and the ends
    planned_new_job_size gave; the bytes are those write_new_job writes from a scan of the
    same frame."""
    cdef const SpliceRule* rule = &_dialects[dialect].new_job
    cdef Py_ssize_t run
    cdef char* o = _put_map_header(out, _stored_map(buf, &run) - rule.ndrop)
    cdef int i
    for i in range(plan.n):
        if plan.kind[i] == PLAN_TYPE:
            o = _copy(o, buf, run, plan.start[i])  # the span and the type key
            o = _put_type_name(o, rule.out_type, rule.out_type_len)
        elif plan.kind[i] == PLAN_PAIR:
            o = _copy(o, buf, run, plan.start[i])
            o[0] = <char>0x92
            o = _put_bin(o + 1, ident, ident_len)
            o = _copy(o, buf, plan.start[i], ends[i])  # the client's job id, as encoded
        else:
            o = _copy(o, buf, run, plan.start[i])
        run = ends[i]
    o = _copy(o, buf, run, size)
    return o - out


cdef inline const SpliceRule* _agent_rule(const Scan* s) noexcept:
    if s.type == AGENT_JOB_DONE:
        return &_dialects[s.dialect].job_done
    if s.type == AGENT_JOB_SSH_DEBUG:
        return &_dialects[s.dialect].ssh_debug
    return NULL


cdef Py_ssize_t agent_to_client_size(const Scan* s) noexcept:
    """Length of the frame write_agent_to_client makes; -1 if s.type is not spliced so."""
    cdef const SpliceRule* rule = _agent_rule(s)
    if rule == NULL:
        return -1
    return _splice_size(s, rule, 0)


cdef Py_ssize_t write_agent_to_client(char* out, const char* buf, const Scan* s) noexcept:
    """Write backend_job_done / backend_job_ssh_debug by the scan's dialect's rule."""
    return _splice_write(out, buf, s, _agent_rule(s), NULL, 0)


cdef Py_ssize_t job_started_size(int dialect, Py_ssize_t job_id_len) noexcept:
    cdef const DialectDef* dd = &_dialects[dialect]
    # fixmap, the type key and its value, "job_id" key (7) and its value
    return (1 + _str_header_size(dd.type_key_len) + dd.type_key_len
            + _str_header_size(dd.job_started_len) + dd.job_started_len
            + 7 + _str_header_size(job_id_len) + job_id_len)


cdef Py_ssize_t write_job_started(char* out, int dialect, const char* job_id, Py_ssize_t job_id_len) noexcept:
    cdef const DialectDef* dd = &_dialects[dialect]
    cdef char* o = out
    o[0] = <char>0x82
    o = _put_str(o + 1, dd.type_key, dd.type_key_len)
    o = _put_str(o, dd.job_started, dd.job_started_len)
    o = _put_str(o, b"job_id", 6)
    o = _put_str(o, job_id, job_id_len)
    return o - out


cdef Py_ssize_t job_key_size(int dialect, Py_ssize_t ident_len, Py_ssize_t job_id_len) noexcept:
    return 1 + job_id_len if dialect == V09 else 1 + ident_len + job_id_len


cdef Py_ssize_t write_job_key(char* out, int dialect, const char* ident, Py_ssize_t ident_len,
                              const char* job_id, Py_ssize_t job_id_len) noexcept:
    """0.5: identity length byte, identity, job id; 0.9 (global ids): a zero byte, job id."""
    if dialect == V09:
        out[0] = 0
        memcpy(out + 1, job_id, job_id_len)
        return 1 + job_id_len
    out[0] = <char><uchar>ident_len
    memcpy(out + 1, ident, ident_len)
    memcpy(out + 1 + ident_len, job_id, job_id_len)
    return 1 + ident_len + job_id_len


cdef bytes job_key_c(int dialect, const char* ident, Py_ssize_t ident_len,
                     const char* job_id, Py_ssize_t job_id_len):
    cdef bytes key = PyBytes_FromStringAndSize(NULL, job_key_size(dialect, ident_len, job_id_len))
    write_job_key(PyBytes_AS_STRING(key), dialect, ident, ident_len, job_id, job_id_len)
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


cdef int _check_dialect(int dialect) except -1:
    if <unsigned>dialect >= <unsigned>NDIALECTS:
        return _bad_dialect(dialect)
    return 0


cdef object _str_at(const char* buf, Py_ssize_t pos, Py_ssize_t n):
    """The text of a str value a scan has already checked."""
    cdef Py_ssize_t start = 0, length = 0
    _read_str(<const uchar*>buf, pos, n, &start, &length)
    return PyUnicode_DecodeUTF8(buf + start, length, NULL)


cdef object _decoded(const char* buf, Py_ssize_t start, Py_ssize_t end):
    """A pass-through value as the real peers decode it, or None where msgpack-python
    refuses what the scanner let through (as _wire_py._decoded)."""
    try:
        return _decode(PyBytes_FromStringAndSize(buf + start, end - start))
    except (ValueError, TypeError):
        return None


cdef int _scan_new_job(bytes frame, int dialect, Scan* s) except -1:
    scan_client_c(dialect, PyBytes_AS_STRING(frame), len(frame), s)
    if s.type != CLIENT_NEW_JOB:
        raise WireError("not a client_new_job")
    return 0


def scan_client(bytes frame not None, int dialect=V05) -> tuple:
    """Check a client frame of ``dialect``: (type code, job_id, environment, priority).

    job_id is set for client_new_job and client_kill_job, environment for
    client_new_job (0.5: its name; 0.9: the pair (environment_type, environment)), None
    otherwise; priority is the 0.9 job's (clamped to int64), 0 otherwise.  Raises
    WireError, or WrongDialect when the frame is in another dialect.
    """
    cdef Scan s
    scan_client_c(dialect, PyBytes_AS_STRING(frame), len(frame), &s)
    env = _text(s.env, s.env_len)
    if s.env_type != NULL:
        env = (_text(s.env_type, s.env_type_len), env)
    return s.type, _text(s.job_id, s.job_id_len), env, s.priority


def queue_fields(bytes frame not None, int dialect=V05) -> tuple:
    """For a client_new_job frame: (job_id, course_id, task_id, launcher, time value).

    The time value is 0.5's ``time_limit``, or 0.9's estimate from
    ``environment_parameters`` (``protocol.v09.time_estimate``).
    """
    cdef Scan s
    cdef const char* buf = PyBytes_AS_STRING(frame)
    cdef Py_ssize_t n = len(frame)
    cdef const DialectDef* dd
    cdef int i, field
    _scan_new_job(frame, dialect, &s)
    dd = &_dialects[dialect]
    course_id = task_id = launcher = time_value = None
    for i in range(s.nfields):
        field = s.field[i]
        if field < 0:
            continue  # the type key (and an index a dialect lacks is -1 too)
        if field == dd.nj_course_id:
            course_id = _str_at(buf, s.val_start[i], n)
        elif field == dd.nj_task_id:
            task_id = _str_at(buf, s.val_start[i], n)
        elif field == dd.nj_launcher:
            launcher = _str_at(buf, s.val_start[i], n)
        elif dialect == V09:
            if field == dd.nj_environment_parameters:
                time_value = _time_estimate(_decoded(buf, s.val_start[i], s.val_end[i]))
        elif field == dd.nj_time_limit:
            time_value = _int_value(<const uchar*>buf, s.val_start[i])
    return _text(s.job_id, s.job_id_len), course_id, task_id, launcher, time_value


def submission_state(bytes frame not None, int dialect=V09) -> object:
    """For a 0.9 ClientNewJob frame: the state its input carries (``inputdata["@state"]``, or "")."""
    cdef Scan s
    cdef const char* buf = PyBytes_AS_STRING(frame)
    cdef int i
    if dialect != V09:
        raise WireError("only dialect 0.9 jobs carry a state")
    _scan_new_job(frame, dialect, &s)
    for i in range(s.nfields):
        if s.field[i] == _dialects[dialect].nj_inputdata:
            return _input_state(_decoded(buf, s.val_start[i], s.val_end[i]))
    raise AssertionError("inputdata not in a scanned ClientNewJob")  # the key set was checked


cdef Py_ssize_t _scan_to_splice(bytes frame, bytes client_identity, int dialect, Scan* s) except -1:
    """Scan a client_new_job frame to splice it for ``client_identity``; the identity's length."""
    cdef Py_ssize_t ident_len = len(client_identity)
    if ident_len < 1 or ident_len > 255:
        raise WireError("client identity must be 1..255 bytes")
    _scan_new_job(frame, dialect, s)
    return ident_len


def splice_new_job(bytes frame not None, bytes client_identity not None, int dialect=V05) -> bytes:
    """client_new_job frame -> backend_new_job frame, by the dialect's rule.

    ``type`` is replaced; 0.5: ``job_id`` becomes ``[bin client_identity, str job_id]``,
    ``launcher`` is removed; 0.9: ``priority`` and ``launcher`` are removed.  Every other
    entry is copied byte for byte.
    """
    cdef Scan s
    cdef const char* buf = PyBytes_AS_STRING(frame)
    cdef Py_ssize_t ident_len = _scan_to_splice(frame, client_identity, dialect, &s)
    cdef Py_ssize_t size, written
    size = new_job_size(&s, ident_len)
    out = PyBytes_FromStringAndSize(NULL, size)
    written = write_new_job(PyBytes_AS_STRING(out), buf, &s, PyBytes_AS_STRING(client_identity), ident_len)
    if FB_DEBUG:
        _check_written(written, size)
    return out


def splice_new_job_planned(bytes frame not None, bytes client_identity not None, int dialect=V05) -> bytes:
    """``splice_new_job`` the way the compiled broker splices a job that waited: from the
    frame and a NewJobPlan made from its scan (for the tests: it must give the same bytes)."""
    cdef Scan s
    cdef NewJobPlan plan
    cdef Py_ssize_t ends[PLAN_ENTRIES]
    cdef const char* buf = PyBytes_AS_STRING(frame)
    cdef Py_ssize_t ident_len = _scan_to_splice(frame, client_identity, dialect, &s)
    cdef Py_ssize_t size, written
    if plan_new_job(buf, &s, &plan) != 0:
        raise AssertionError("this frame cannot be planned")
    size = planned_new_job_size(buf, len(frame), &plan, s.dialect, ident_len, ends)
    out = PyBytes_FromStringAndSize(NULL, size)
    written = write_planned_new_job(PyBytes_AS_STRING(out), buf, len(frame), &plan, ends, s.dialect,
                                    PyBytes_AS_STRING(client_identity), ident_len)
    _check_written(written, size)
    return out


def scan_agent(bytes frame not None, int dialect=V05) -> tuple:
    """Check an agent frame of ``dialect``: (type code, client_identity, job_id).

    job_id is set for the job started / done / ssh debug messages; client_identity too
    in 0.5, where it is part of the job id pair (None in 0.9 and for hello and pong).
    Raises WireError, or WrongDialect when the frame is in another dialect.
    """
    cdef Scan s
    scan_agent_c(dialect, PyBytes_AS_STRING(frame), len(frame), &s)
    ident = None if s.ident == NULL else PyBytes_FromStringAndSize(s.ident, s.ident_len)
    return s.type, ident, _text(s.job_id, s.job_id_len)


cdef bytes _agent_to_client(bytes frame, int dialect, int code, list not_this):
    cdef Scan s
    cdef const char* buf = PyBytes_AS_STRING(frame)
    cdef Py_ssize_t size, written
    scan_agent_c(dialect, buf, len(frame), &s)
    if s.type != code:
        raise WireError(not_this[dialect])
    size = agent_to_client_size(&s)
    out = PyBytes_FromStringAndSize(NULL, size)
    written = write_agent_to_client(PyBytes_AS_STRING(out), buf, &s)
    if FB_DEBUG:
        _check_written(written, size)
    return out


def splice_job_done(bytes frame not None, int dialect=V05) -> bytes:
    """agent_job_done -> backend_job_done: type replaced (0.5: and job_id by the client's str)."""
    return _agent_to_client(frame, dialect, AGENT_JOB_DONE, _NOT_JOB_DONE)


def splice_ssh_debug(bytes frame not None, int dialect=V05) -> bytes:
    """agent_job_ssh_debug -> backend_job_ssh_debug, by the same rule."""
    return _agent_to_client(frame, dialect, AGENT_JOB_SSH_DEBUG, _NOT_SSH_DEBUG)


def job_started(str job_id not None, int dialect=V05) -> bytes:
    """Encode backend_job_started(job_id) in ``dialect``."""
    cdef Py_ssize_t length, size, written
    _check_dialect(dialect)
    cdef const char* raw = PyUnicode_AsUTF8AndSize(job_id, &length)
    size = job_started_size(dialect, length)
    out = PyBytes_FromStringAndSize(NULL, size)
    written = write_job_started(PyBytes_AS_STRING(out), dialect, raw, length)
    if FB_DEBUG:
        _check_written(written, size)
    return out


def job_key(client_identity, str job_id not None, int dialect=V05) -> bytes:
    """The broker's dictionary key for a job.

    0.5: identity length byte, identity, UTF-8 job id (ZeroMQ identities are 1..255
    bytes, so the key is unambiguous; another length raises WireError).  0.9, where job
    ids are global: a zero byte, then the UTF-8 job id (the identity is not used).
    """
    cdef Py_ssize_t ident_len = 0
    cdef Py_ssize_t length
    cdef const char* raw
    if dialect != V09:
        if client_identity is None or not 1 <= len(client_identity) <= 255:
            raise WireError("client identity must be 1..255 bytes")
        if not isinstance(client_identity, bytes):
            raise TypeError("client identity must be bytes")
        ident_len = len(client_identity)
    raw = PyUnicode_AsUTF8AndSize(job_id, &length)
    if dialect == V09:
        return job_key_c(dialect, NULL, 0, raw, length)
    return job_key_c(dialect, PyBytes_AS_STRING(client_identity), ident_len, raw, length)
