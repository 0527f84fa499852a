/* The part of zmq.h the C ceilings use: libzmq 4.x's stable C ABI, declared here so that
 * they build against pyzmq's bundled libzmq, which ships no zmq.h (see forwarder.c). */
#ifndef FASTBACKEND_CEILING_ZMQ_ABI_H
#define FASTBACKEND_CEILING_ZMQ_ABI_H

#include <stddef.h>

typedef struct zmq_msg_t {
    _Alignas(void *) unsigned char _[64];
} zmq_msg_t;
typedef struct zmq_pollitem_t {
    void *socket;
    int fd;
    short events;
    short revents;
} zmq_pollitem_t;
#define ZMQ_ROUTER 6
#define ZMQ_POLLIN 1
#define ZMQ_DONTWAIT 1
#define ZMQ_SNDMORE 2
#define ZMQ_LINGER 17
#define ZMQ_SNDHWM 23
#define ZMQ_RCVHWM 24
#define ZMQ_IPV6 42
extern void *zmq_ctx_new(void);
extern void *zmq_socket(void *ctx, int type);
extern int zmq_setsockopt(void *s, int option, const void *value, size_t len);
extern int zmq_bind(void *s, const char *addr);
extern int zmq_poll(zmq_pollitem_t *items, int nitems, long timeout);
extern int zmq_msg_init(zmq_msg_t *msg);
extern int zmq_msg_init_size(zmq_msg_t *msg, size_t size);
extern int zmq_msg_recv(zmq_msg_t *msg, void *s, int flags);
extern int zmq_msg_send(zmq_msg_t *msg, void *s, int flags);
extern int zmq_msg_move(zmq_msg_t *dest, zmq_msg_t *src);
extern int zmq_msg_close(zmq_msg_t *msg);
extern int zmq_msg_more(const zmq_msg_t *msg);
extern void *zmq_msg_data(zmq_msg_t *msg);
extern size_t zmq_msg_size(const zmq_msg_t *msg);
extern int zmq_errno(void);
extern const char *zmq_strerror(int errnum);

#endif
