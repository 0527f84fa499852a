# The few libzmq functions the compiled drain calls, taken from the libzmq that pyzmq
# has already loaded.
#
# Why not cimport pyzmq: its Cython API needs libzmq's zmq.h at build time, which
# pyzmq's wheels do not ship.  Why not link libzmq ourselves: a second copy of libzmq
# in the process would not know the sockets of the first (they would corrupt each
# other).  So, at import, we dlopen pyzmq's own extension with RTLD_NOLOAD (which
# never loads anything new: it only hands back what is already mapped) and resolve
# each function with dlsym on that handle, which searches the extension and then the
# libraries it depends on -- the bundled libzmq of a wheel, or the system libzmq of a
# source build.  The prototypes below are libzmq's stable C ABI (unchanged since 4.0),
# so a pyzmq upgrade keeps working; a pyzmq whose libzmq does not export them makes
# the import fail loudly and the broker use the pure-Python core.

from libc.errno cimport EAGAIN, EHOSTUNREACH, EINTR
from libc.limits cimport INT_MAX

cdef extern from "<dlfcn.h>" nogil:
    void* dlopen(const char* filename, int flags)
    void* dlsym(void* handle, const char* symbol)
    char* dlerror()
    int RTLD_NOW
    int RTLD_NOLOAD

cdef extern from *:
    """
    /* libzmq's zmq_msg_t: 64 opaque bytes, pointer-aligned. */
    typedef struct fb_zmq_msg_t {
        unsigned char _[64] __attribute__((aligned(sizeof(void *))));
    } fb_zmq_msg_t;
    """
    ctypedef struct fb_zmq_msg_t:
        pass

ctypedef int (*msg_init_t)(fb_zmq_msg_t*) noexcept nogil
ctypedef int (*msg_init_size_t)(fb_zmq_msg_t*, size_t) noexcept nogil
ctypedef void (*free_fn_t)(void*, void*) noexcept nogil
ctypedef int (*msg_init_data_t)(fb_zmq_msg_t*, void*, size_t, free_fn_t, void*) noexcept nogil
ctypedef int (*msg_recv_t)(fb_zmq_msg_t*, void*, int) noexcept nogil
ctypedef int (*msg_send_t)(fb_zmq_msg_t*, void*, int) noexcept nogil
ctypedef int (*msg_close_t)(fb_zmq_msg_t*) noexcept nogil
ctypedef void* (*msg_data_t)(fb_zmq_msg_t*) noexcept nogil
ctypedef size_t (*msg_size_t)(const fb_zmq_msg_t*) noexcept nogil
ctypedef int (*msg_more_t)(const fb_zmq_msg_t*) noexcept nogil
ctypedef int (*send_t)(void*, const void*, size_t, int) noexcept nogil
ctypedef int (*getsockopt_t)(void*, int, void*, size_t*) noexcept nogil
ctypedef int (*errno_t)() noexcept nogil
ctypedef void (*version_t)(int*, int*, int*) noexcept nogil

cdef enum:
    ZMQ_DONTWAIT = 1
    ZMQ_SNDMORE = 2
    ZMQ_EVENTS = 15
    ZMQ_POLLIN = 1

cdef struct LibZMQ:
    msg_init_t msg_init
    msg_init_size_t msg_init_size
    msg_init_data_t msg_init_data
    msg_recv_t msg_recv
    msg_send_t msg_send
    msg_close_t msg_close
    msg_data_t msg_data
    msg_size_t msg_size
    msg_more_t msg_more
    send_t send
    getsockopt_t getsockopt
    errno_t last_errno
    version_t version

cdef LibZMQ lz


cdef void* _symbol(void* handle, const char* name) except NULL:
    cdef void* found = dlsym(handle, name)
    if found == NULL:
        raise ImportError(f"pyzmq's libzmq does not export {name.decode()}")
    return found


cdef int _load_libzmq() except -1:
    """Fill ``lz`` from the libzmq instance pyzmq uses."""
    from zmq.backend.cython import _zmq as pyzmq_extension

    cdef bytes path = pyzmq_extension.__file__.encode()
    cdef void* handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD)
    if handle == NULL:
        raise ImportError(f"cannot find pyzmq's extension in this process: {dlerror().decode()}")
    lz.msg_init = <msg_init_t>_symbol(handle, b"zmq_msg_init")
    lz.msg_init_size = <msg_init_size_t>_symbol(handle, b"zmq_msg_init_size")
    lz.msg_init_data = <msg_init_data_t>_symbol(handle, b"zmq_msg_init_data")
    lz.msg_recv = <msg_recv_t>_symbol(handle, b"zmq_msg_recv")
    lz.msg_send = <msg_send_t>_symbol(handle, b"zmq_msg_send")
    lz.msg_close = <msg_close_t>_symbol(handle, b"zmq_msg_close")
    lz.msg_data = <msg_data_t>_symbol(handle, b"zmq_msg_data")
    lz.msg_size = <msg_size_t>_symbol(handle, b"zmq_msg_size")
    lz.msg_more = <msg_more_t>_symbol(handle, b"zmq_msg_more")
    lz.send = <send_t>_symbol(handle, b"zmq_send")
    lz.getsockopt = <getsockopt_t>_symbol(handle, b"zmq_getsockopt")
    lz.last_errno = <errno_t>_symbol(handle, b"zmq_errno")
    lz.version = <version_t>_symbol(handle, b"zmq_version")

    # The same instance must report the same version as pyzmq; a mismatch means the
    # lookup found another copy, which must never touch pyzmq's sockets.
    import zmq as pyzmq
    cdef int major, minor, patch
    lz.version(&major, &minor, &patch)
    if (major, minor, patch) != pyzmq.zmq_version_info():
        raise ImportError(f"resolved libzmq {major}.{minor}.{patch} is not pyzmq's {pyzmq.zmq_version()}")
    return 0


_load_libzmq()


# A signal landing while libzmq polls its command mailbox makes a non-blocking call
# fail with EINTR before it has taken or queued anything (libzmq's process_commands),
# so the call is simply made again, as pyzmq does for its own sockets.  Treating EINTR
# as an error would drop a message's tail (its body then read as the next identity)
# or, from ZMQ_EVENTS, lose the edge-triggered wake-up.  Bounded: a process flooded
# with signals gets the error after EINTR_RETRIES tries.
DEF EINTR_RETRIES = 64


cdef inline int _msg_recv(fb_zmq_msg_t* msg, void* socket) noexcept nogil:
    cdef int tries = EINTR_RETRIES
    cdef int rc = lz.msg_recv(msg, socket, ZMQ_DONTWAIT)
    while rc < 0 and tries > 0 and lz.last_errno() == EINTR:
        tries -= 1
        rc = lz.msg_recv(msg, socket, ZMQ_DONTWAIT)
    return rc


cdef inline Py_ssize_t _msg_size_of(fb_zmq_msg_t* msg, int received) noexcept nogil:
    """The size of a message ``_msg_recv`` just returned ``received`` (>= 0) for: that value,
    unless zmq_msg_recv clamped it (a message of INT_MAX bytes or more), saving a call."""
    if received < INT_MAX:
        return received
    return <Py_ssize_t>lz.msg_size(msg)


cdef inline int _msg_send(fb_zmq_msg_t* msg, void* socket) noexcept nogil:
    cdef int tries = EINTR_RETRIES
    cdef int rc = lz.msg_send(msg, socket, ZMQ_DONTWAIT)
    while rc < 0 and tries > 0 and lz.last_errno() == EINTR:
        tries -= 1
        rc = lz.msg_send(msg, socket, ZMQ_DONTWAIT)
    return rc


cdef inline int _send_more(void* socket, const char* data, size_t size) noexcept nogil:
    cdef int tries = EINTR_RETRIES
    cdef int rc = lz.send(socket, data, size, ZMQ_SNDMORE | ZMQ_DONTWAIT)
    while rc < 0 and tries > 0 and lz.last_errno() == EINTR:
        tries -= 1
        rc = lz.send(socket, data, size, ZMQ_SNDMORE | ZMQ_DONTWAIT)
    return rc


cdef inline bint _has_input(void* socket) noexcept:
    """True when a message waits.  When EINTR outlasts the retries, True as well: the
    caller then drains (and meets the error there) rather than sleep past a wake-up.
    Any other error (a closed socket at shutdown) means nothing to read."""
    cdef int events = 0
    cdef size_t size = sizeof(events)
    cdef int tries = EINTR_RETRIES
    while lz.getsockopt(socket, ZMQ_EVENTS, &events, &size) != 0:
        if lz.last_errno() != EINTR:
            return False
        if tries == 0:
            return True
        tries -= 1
        size = sizeof(events)
    return (events & ZMQ_POLLIN) != 0
