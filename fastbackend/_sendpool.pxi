# Buffers for the frames the compiled core builds per job (the agent's new-job frame, the
# client's result), recycled instead of malloc'd and freed for every message.
#
# Why: libzmq frees a sent message on its I/O thread, so a buffer the main thread
# malloc'd is never back in the main thread's own glibc cache; each such frame cost
# ~300 main-thread instructions in malloc's bins (callgrind).  Here a frame's buffer
# comes from a per-size-class free list, and libzmq hands it back through the free
# function of zmq_msg_init_data, on whatever thread closes the message: that pushes it
# onto a lock-free stack (one per class), which the main thread takes whole when its
# own list runs dry.  Only frames of SENDPOOL_MIN..SENDPOOL_MAX bytes are pooled: a
# smaller one lives inside libzmq's message (no allocation at all below 34 bytes, and
# zmq_msg_init_data would add one), a larger one is rare (payload) and copied anyway.
# The lists are process-wide and outlive any broker, as libzmq may free a message
# after its socket is gone; what the main thread keeps per class is bounded.  "The main
# thread" is whoever holds the GIL: every broker of the process (an embedded one runs in
# a thread of its own) takes buffers only from compiled code that holds it, so the free
# lists need no lock; only the returned stacks are shared with libzmq's threads.

cdef extern from *:
    """
    #include <stdatomic.h>
    #include <stdlib.h>

    #define FB_POOL_CLASSES 7              /* buffers of 256 B << class: 256 B .. 16 KiB */
    #define FB_POOL_SHIFT 8
    #define FB_POOL_KEEP_BYTES (1 << 20)   /* most the main thread keeps per class */

    typedef struct fb_pool_buf {
        struct fb_pool_buf* next;
        size_t cls;
    } fb_pool_buf;                         /* 16 bytes, then the frame */

    static _Atomic(fb_pool_buf*) fb_pool_returned[FB_POOL_CLASSES];
    static fb_pool_buf* fb_pool_free[FB_POOL_CLASSES];

    /* libzmq's free function: any thread, any time (push onto a Treiber stack; the
       consumer only ever takes the whole stack, so there is no ABA). */
    static void fb_pool_release(void* data, void* hint) {
        fb_pool_buf* b = (fb_pool_buf*)hint;
        _Atomic(fb_pool_buf*)* head = &fb_pool_returned[b->cls];
        fb_pool_buf* old = atomic_load_explicit(head, memory_order_relaxed);
        (void)data;
        do {
            b->next = old;
        } while (!atomic_compare_exchange_weak_explicit(head, &old, b, memory_order_release,
                                                        memory_order_relaxed));
    }

    /* The returned buffers of class c, trimmed to what the main thread keeps. */
    static fb_pool_buf* fb_pool_refill(size_t c) {
        fb_pool_buf* list = atomic_exchange_explicit(&fb_pool_returned[c], NULL, memory_order_acquire);
        size_t keep = FB_POOL_KEEP_BYTES >> (FB_POOL_SHIFT + c);
        fb_pool_buf* b = list;
        while (b != NULL && --keep > 0)
            b = b->next;
        if (b != NULL) {
            fb_pool_buf* extra = b->next;
            b->next = NULL;
            while (extra != NULL) {
                fb_pool_buf* next = extra->next;
                free(extra);
                extra = next;
            }
        }
        return list;
    }

    /* A buffer for a frame of `size` bytes (GIL held), its pool header in *hint;
       NULL when out of memory or beyond the largest class. */
    static void* fb_pool_take(size_t size, void** hint) {
        size_t need = size + sizeof(fb_pool_buf), c = 0;
        fb_pool_buf* b;
        while (c < FB_POOL_CLASSES && ((size_t)1 << (FB_POOL_SHIFT + c)) < need)
            c++;
        if (c == FB_POOL_CLASSES)
            return NULL;
        b = fb_pool_free[c];
        if (b == NULL)
            b = fb_pool_refill(c);
        if (b == NULL) {
            b = (fb_pool_buf*)malloc((size_t)1 << (FB_POOL_SHIFT + c));
            if (b == NULL)
                return NULL;
            b->cls = c;
            b->next = NULL;
        }
        fb_pool_free[c] = b->next;
        *hint = b;
        return (char*)b + sizeof(fb_pool_buf);
    }

    /* GIL held: the buffers on the free lists and in the returned stacks (tests). */
    static size_t fb_pool_count(size_t c) {
        size_t n = 0;
        fb_pool_buf* b;
        for (b = fb_pool_free[c]; b != NULL; b = b->next)
            n++;
        for (b = atomic_load(&fb_pool_returned[c]); b != NULL; b = b->next)
            n++;
        return n;
    }
    """
    int FB_POOL_CLASSES
    void fb_pool_release(void* data, void* hint) noexcept nogil
    void* fb_pool_take(size_t size, void** hint) noexcept nogil
    size_t fb_pool_count(size_t c) noexcept nogil

cdef enum:
    SENDPOOL_MIN = 128            # below: libzmq's own allocation is as cheap
    SENDPOOL_MAX = 16384 - 16     # the largest class, less its header


cdef inline int _msg_init_out(fb_zmq_msg_t* msg, size_t size) noexcept:
    """zmq_msg_init_size for a frame the core builds: from the pool when its size is
    pooled.  0, or -1 when out of memory."""
    cdef void* hint = NULL
    cdef void* data
    if SENDPOOL_MIN <= size <= SENDPOOL_MAX:
        data = fb_pool_take(size, &hint)
        if data != NULL:
            if lz.msg_init_data(msg, data, size, fb_pool_release, hint) == 0:
                return 0
            fb_pool_release(data, hint)
    return lz.msg_init_size(msg, size)


def sendpool_counts():
    """Buffers held by the send pool per size class (tests: the pool does not grow with
    the jobs sent)."""
    return [fb_pool_count(c) for c in range(FB_POOL_CLASSES)]
