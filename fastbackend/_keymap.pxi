# Byte strings to small integers, in C: the compiled broker's peer identities, job keys
# and environment keys, looked up straight from the bytes of a received frame.  A Python
# dict would need a new bytes object and a SipHash per lookup, several times per job.
#
# An Index is open addressing with linear probing over a power-of-two array of 64-bit
# slots: the upper half of a slot is its key's hash tag (the upper 32 bits of the 64-bit
# hash, which also gives the home slot), the lower half the value + 1 (0: empty).  Keys
# are not in the index: ``key_is(owner, value, key)`` compares value's key where its owner
# keeps it (a job's record, a ByteMap's own copy), so a slot costs 8 bytes.  The load stays
# between 1/8 and 1/2 (grown and shrunk by doubling), deletion shifts the following
# entries back (no tombstones), and a full 32-bit tag is compared before any key.
#
# The keys come from peers (job ids from clients, identities from anyone who connects),
# so the hash is keyed with a per-process random seed: without it, a client could send
# job ids that all land in one probe run.  It is a multiply-fold mix in the manner of
# wyhash, not a cryptographic hash; the seed is what an attacker would have to learn.

cimport cython
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static uint64_t fb_hash_seed = 0x243F6A8885A308D3ULL;
    static inline uint64_t fb_mix(uint64_t a, uint64_t b) {
    #ifdef __SIZEOF_INT128__
        __uint128_t r = (__uint128_t)a * b;
        return (uint64_t)r ^ (uint64_t)(r >> 64);
    #else
        uint64_t r = a * (b | 1);
        return r ^ (r >> 29) ^ (a >> 32) * b;
    #endif
    }
    /* The hash tag of a byte string: the upper 32 bits of its keyed 64-bit hash. */
    static inline uint32_t fb_tag(const char* p, size_t n) {
        uint64_t h = fb_hash_seed ^ ((uint64_t)n * 0xA0761D6478BD642FULL);
        uint64_t w = 0;
        const size_t whole = n;
        while (n >= 8) {
            memcpy(&w, p, 8);
            h = fb_mix(h ^ w, 0xE7037ED1A0B428DBULL);
            p += 8;
            n -= 8;
        }
        /* The last n < 8 bytes, in fixed-size loads (a memcpy of n bytes is a call): the
           8 bytes ending there, shifted, when the key has them (on a big-endian machine
           the shift keeps other bytes: a weaker hash, still a correct one); else two
           overlapping 4-byte loads, or the first, middle and last byte. */
        if (n > 0) {
            if (whole >= 8) {
                memcpy(&w, p + n - 8, 8);
                w >>= 8 * (8 - n);
            } else if (n >= 4) {
                uint32_t a, b;
                memcpy(&a, p, 4);
                memcpy(&b, p + n - 4, 4);
                w = a | ((uint64_t)b << 32);
            } else {
                w = (uint64_t)(unsigned char)p[0] | ((uint64_t)(unsigned char)p[n >> 1] << 8)
                    | ((uint64_t)(unsigned char)p[n - 1] << 16);
            }
        } else {
            w = 0;
        }
        h = fb_mix(h ^ w ^ 0x8EBC6AF09C88C6E3ULL, 0x589965CC75374CC3ULL);
        return (uint32_t)(fb_mix(h, 0x1D8E4E27C47D124FULL) >> 32);
    }
    """
    uint64_t fb_hash_seed
    uint32_t fb_tag(const char* p, size_t n) noexcept nogil

import os as _os

fb_hash_seed = int.from_bytes(_os.urandom(8), "little")

# Whether value's key is key[:size], asked of the index's owner (see above).
ctypedef bint (*key_is_t)(void* owner, uint32_t value, const char* key, Py_ssize_t size) noexcept

cdef enum:
    INDEX_NONE = 0xFFFFFFFF
    INDEX_MIN_SLOTS = 16


cdef struct Index:
    uint64_t* slots
    uint32_t mask     # slots - 1
    uint32_t count


cdef int index_init(Index* ix) except -1:
    ix.slots = <uint64_t*>calloc(INDEX_MIN_SLOTS, sizeof(uint64_t))
    if ix.slots == NULL:
        raise MemoryError()
    ix.mask = INDEX_MIN_SLOTS - 1
    ix.count = 0
    return 0


cdef void index_free(Index* ix) noexcept:
    free(ix.slots)
    ix.slots = NULL
    ix.mask = 0
    ix.count = 0


cdef inline uint32_t index_find(const Index* ix, uint32_t tag, const char* key, Py_ssize_t size,
                                key_is_t key_is, void* owner) noexcept:
    """The value whose key is ``key[:size]`` (hash tag ``tag``), or INDEX_NONE."""
    cdef uint32_t mask = ix.mask
    cdef uint32_t i = tag & mask
    cdef uint64_t slot
    while True:  # ends: the load is at most 1/2, so an empty slot is always reached
        slot = ix.slots[i]
        if slot == 0:
            return INDEX_NONE
        if <uint32_t>(slot >> 32) == tag and key_is(owner, <uint32_t>slot - 1, key, size):
            return <uint32_t>slot - 1
        i = (i + 1) & mask


cdef inline void _index_place(uint64_t* slots, uint32_t mask, uint64_t entry) noexcept:
    cdef uint32_t i = <uint32_t>(entry >> 32) & mask
    while slots[i] != 0:
        i = (i + 1) & mask
    slots[i] = entry


cdef int _index_resize(Index* ix, uint32_t n_slots) except -1:
    cdef uint64_t* slots = <uint64_t*>calloc(n_slots, sizeof(uint64_t))
    cdef uint32_t i
    if slots == NULL:
        raise MemoryError()
    for i in range(ix.mask + 1):
        if ix.slots[i] != 0:
            _index_place(slots, n_slots - 1, ix.slots[i])
    free(ix.slots)
    ix.slots = slots
    ix.mask = n_slots - 1
    return 0


cdef inline int index_reserve(Index* ix, uint32_t count) except -1:
    """Make room for ``count`` entries, so that inserting up to that many cannot fail."""
    cdef uint64_t n_slots = <uint64_t>ix.mask + 1
    while <uint64_t>count * 2 > n_slots:
        n_slots *= 2
    if n_slots > <uint64_t>ix.mask + 1:
        if n_slots > 0x80000000:
            raise MemoryError("key index full")
        _index_resize(ix, <uint32_t>n_slots)
    return 0


cdef inline int index_insert(Index* ix, uint32_t tag, uint32_t value) except -1:
    """Add ``value`` under hash tag ``tag``; the caller has checked that its key is absent."""
    index_reserve(ix, ix.count + 1)
    _index_place(ix.slots, ix.mask, (<uint64_t>tag << 32) | (value + 1))
    ix.count += 1
    return 0


cdef inline void index_remove(Index* ix, uint32_t tag, uint32_t value) noexcept:
    """Remove ``value`` (added under ``tag``); nothing happens if it is not there."""
    cdef uint32_t mask = ix.mask
    cdef uint32_t i = tag & mask, j, home
    cdef uint64_t entry = (<uint64_t>tag << 32) | (value + 1)
    while ix.slots[i] != entry:
        if ix.slots[i] == 0:
            return
        i = (i + 1) & mask
    # Backward shift: each following entry of the probe run moves into the hole unless its
    # home slot lies cyclically in (hole, its slot], where the hole would hide it.
    j = i
    while True:
        j = (j + 1) & mask
        if ix.slots[j] == 0:
            break
        home = <uint32_t>(ix.slots[j] >> 32) & mask
        if (home <= i or home > j) if i <= j else (home <= i and home > j):
            ix.slots[i] = ix.slots[j]
            i = j
    ix.slots[i] = 0
    ix.count -= 1
    if ix.count * <uint64_t>8 < <uint64_t>mask + 1 and mask + 1 > INDEX_MIN_SLOTS:
        # A burst (a million queued jobs) must not keep its index once it is over.  If the
        # smaller array cannot be had, the larger one simply stays.
        try:
            _index_resize(ix, (mask + 1) // 2)
        except MemoryError:
            pass


cdef struct StoredKey:
    # A ByteMap's own copy of a key: its size, then its bytes.
    Py_ssize_t size
    char data[1]


cdef inline StoredKey* _stored_key(const char* key, Py_ssize_t size) noexcept:
    cdef StoredKey* stored = <StoredKey*>malloc(sizeof(StoredKey) + size)
    if stored != NULL:
        stored.size = size
        memcpy(stored.data, key, size)
    return stored


cdef bint _bytemap_key_is(void* owner, uint32_t entry, const char* key, Py_ssize_t size) noexcept:
    # owner: the address of a ByteMap's stored array (a plain pointer: no reference counting)
    cdef StoredKey* stored = (<StoredKey***>owner)[0][entry]
    return stored.size == size and same_bytes(stored.data, key, size)


_MISSING = object()


cdef class DictFace:
    """What a read-only dict offers, over ``items()`` (a list of (key, value) pairs, in the
    dict's order): the mappings the compiled broker keeps in C show this face to the rare
    paths, which the pure-Python core serves with real dicts."""

    def items(self):
        raise NotImplementedError

    def keys(self):
        return [key for key, _ in self.items()]

    def values(self):
        return [value for _, value in self.items()]

    def __iter__(self):
        return iter(self.keys())

    def __eq__(self, other):
        if isinstance(other, DictFace):
            other = dict(other.items())
        if not isinstance(other, dict):
            return NotImplemented
        return dict(self.items()) == other

    def __repr__(self):
        return f"{type(self).__name__}({dict(self.items())!r})"


@cython.final
cdef class ByteMap(DictFace):
    """A mapping of ``bytes`` keys to ``int`` values kept in C, for the compiled broker.

    The broker looks keys up from C with the bytes of a received frame (``c_get``);
    the Python side (``broker.BrokerLogic``, the metrics) uses it like the dict the
    pure-Python core has in its place.  Iteration follows insertion order, as a dict's
    does, so that both cores send in the same order when they walk their peers.
    """

    cdef Index index
    cdef StoredKey** stored     # keys by entry number, malloc'ed copies; NULL when the entry is free
    cdef int64_t* vals          # values by entry number
    cdef uint32_t* prev         # insertion order (entry numbers, INDEX_NONE at the ends);
    cdef uint32_t* next         # for free entries, next is the free list
    cdef uint32_t head, tail, free_head
    cdef uint32_t n_entries     # entries ever allocated (the arrays' used length)
    cdef uint32_t cap

    def __cinit__(self):
        index_init(&self.index)
        self.head = self.tail = self.free_head = INDEX_NONE

    def __dealloc__(self):
        cdef uint32_t e
        for e in range(self.n_entries):
            free(self.stored[e])
        free(self.stored)
        free(self.vals)
        free(self.prev)
        free(self.next)
        index_free(&self.index)

    # -- C API --------------------------------------------------------------------

    cdef inline uint32_t _find(self, const char* key, Py_ssize_t size, uint32_t* tag) noexcept:
        tag[0] = fb_tag(key, size)
        return index_find(&self.index, tag[0], key, size, _bytemap_key_is, <void*>&self.stored)

    cdef inline int64_t c_get(self, const char* key, Py_ssize_t size, int64_t default) noexcept:
        cdef uint32_t tag
        cdef uint32_t e = self._find(key, size, &tag)
        return default if e == INDEX_NONE else self.vals[e]

    cdef int c_set(self, const char* key, Py_ssize_t size, int64_t value) except -1:
        cdef uint32_t tag
        cdef uint32_t e = self._find(key, size, &tag)
        if e != INDEX_NONE:
            self.vals[e] = value
            return 0
        e = <uint32_t>self._new_entry()
        self.stored[e] = _stored_key(key, size)
        if self.stored[e] == NULL:
            self._release_entry(e)
            raise MemoryError()
        self.vals[e] = value
        try:
            index_insert(&self.index, tag, e)
        except MemoryError:
            free(self.stored[e])
            self.stored[e] = NULL
            self._release_entry(e)
            raise
        # Append to the insertion order.
        self.prev[e] = self.tail
        self.next[e] = INDEX_NONE
        if self.tail == INDEX_NONE:
            self.head = e
        else:
            self.next[self.tail] = e
        self.tail = e
        return 0

    cdef bint c_delete(self, const char* key, Py_ssize_t size) noexcept:
        """Remove ``key``; False if it was not there."""
        cdef uint32_t tag
        cdef uint32_t e = self._find(key, size, &tag)
        if e == INDEX_NONE:
            return False
        index_remove(&self.index, tag, e)
        if self.prev[e] == INDEX_NONE:
            self.head = self.next[e]
        else:
            self.next[self.prev[e]] = self.next[e]
        if self.next[e] == INDEX_NONE:
            self.tail = self.prev[e]
        else:
            self.prev[self.next[e]] = self.prev[e]
        free(self.stored[e])
        self.stored[e] = NULL
        self._release_entry(e)
        return True

    cdef int64_t _new_entry(self) except -1:
        cdef uint32_t e
        if self.free_head != INDEX_NONE:
            e = self.free_head
            self.free_head = self.next[e]
            return e
        if self.n_entries == self.cap:
            self._grow()
        e = self.n_entries
        self.n_entries += 1
        return e

    cdef void _release_entry(self, uint32_t e) noexcept:
        self.next[e] = self.free_head
        self.free_head = e

    cdef int _grow(self) except -1:
        cdef uint32_t cap = self.cap * 2 if self.cap else 8
        if cap >= INDEX_NONE // 2:
            raise MemoryError("ByteMap full")
        # Each array is assigned as soon as it is reallocated, so a failure leaves every
        # array at least self.cap long and the map consistent.
        cdef void* p = realloc(self.stored, cap * sizeof(StoredKey*))
        if p == NULL:
            raise MemoryError()
        self.stored = <StoredKey**>p
        p = realloc(self.vals, cap * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        self.vals = <int64_t*>p
        p = realloc(self.prev, cap * sizeof(uint32_t))
        if p == NULL:
            raise MemoryError()
        self.prev = <uint32_t*>p
        p = realloc(self.next, cap * sizeof(uint32_t))
        if p == NULL:
            raise MemoryError()
        self.next = <uint32_t*>p
        self.cap = cap
        return 0

    # -- the dict-like Python API -------------------------------------------------

    def __len__(self):
        return self.index.count

    def __contains__(self, bytes key):
        cdef uint32_t tag
        return self._find(key, len(key), &tag) != INDEX_NONE

    def __getitem__(self, bytes key):
        cdef uint32_t tag
        cdef uint32_t e = self._find(key, len(key), &tag)
        if e == INDEX_NONE:
            raise KeyError(key)
        return self.vals[e]

    def get(self, bytes key, default=None):
        cdef uint32_t tag
        cdef uint32_t e = self._find(key, len(key), &tag)
        return default if e == INDEX_NONE else self.vals[e]

    def __setitem__(self, bytes key, int64_t value):
        self.c_set(key, len(key), value)

    def __delitem__(self, bytes key):
        if not self.c_delete(key, len(key)):
            raise KeyError(key)

    def pop(self, bytes key, default=_MISSING):
        cdef uint32_t tag
        cdef uint32_t e = self._find(key, len(key), &tag)
        if e == INDEX_NONE:
            if default is _MISSING:
                raise KeyError(key)
            return default
        value = self.vals[e]
        self.c_delete(key, len(key))
        return value

    def items(self):
        """(key, value) pairs in insertion order (a list: safe to change the map meanwhile)."""
        cdef list out = []
        cdef uint32_t e = self.head
        while e != INDEX_NONE:
            out.append((self.stored[e].data[:self.stored[e].size], self.vals[e]))
            e = self.next[e]
        return out
