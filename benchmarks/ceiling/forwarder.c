/*
 * The ceiling broker: the least a broker between these two ROUTER sockets can do.
 *
 *   forwarder AGENT_ADDR CLIENT_ADDR
 *
 * It moves frames between clients and agents without decoding a single message,
 * so what the load generator reaches through it is the best any broker could do on
 * this machine with these peers.  It is built at benchmark time against the libzmq
 * that pyzmq's wheel ships; the few libzmq declarations it needs are written out
 * below, so neither zmq.h nor a system libzmq is required.
 *
 * Routing, and what the generator does to make it trivial:
 *   - The first frame from an unknown agent identity (its agent_hello) registers the
 *     agent and is dropped.  Later single frames from agents (pongs) are dropped.
 *   - The first frame from an unknown client identity (its client_hello) registers the
 *     client and is echoed back: the generator takes any answer to its hello as "you
 *     are registered".  A client frame that is byte-for-byte a ping message (of
 *     either dialect) is answered with that dialect's pong, so heartbeats can be
 *     timed through it too.
 *   - Any other client frame is a job.  It goes to the next agent in round-robin order
 *     as two frames [client identity, payload]: the identity travels beside the
 *     message instead of inside its job_id, as a real broker would put it.
 *   - Agents in ceiling mode (the generator's --envelope) echo that identity frame in
 *     front of their agent_job_started/agent_job_done; the forwarder sends the payload
 *     to that client unchanged.
 * No slot accounting, no queue: jobs go out as fast as they come in.  Messages are
 * moved with zmq_msg_send, so payloads are never copied by this process.
 */
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "zmq_abi.h"

/* {"type": "ping"} and {"type": "pong"} (INGInious 0.5), {"@type": "Ping"} and
 * {"@type": "Pong"} (0.7-0.9.2), as every msgpack encoder writes them.  Nothing else
 * here depends on the dialect: the forwarder never reads a message. */
static const unsigned char PING[] = {0x81, 0xa4, 't', 'y', 'p', 'e', 0xa4, 'p', 'i', 'n', 'g'};
static const unsigned char PONG[] = {0x81, 0xa4, 't', 'y', 'p', 'e', 0xa4, 'p', 'o', 'n', 'g'};
static const unsigned char PING09[] = {0x81, 0xa5, '@', 't', 'y', 'p', 'e', 0xa4, 'P', 'i', 'n', 'g'};
static const unsigned char PONG09[] = {0x81, 0xa5, '@', 't', 'y', 'p', 'e', 0xa4, 'P', 'o', 'n', 'g'};

/* Peers are keyed by their ROUTER identity (5 bytes when the ROUTER assigns it).
 * An open-addressing set is plenty: the generator opens at most a few thousand. */
#define MAX_ID 32
#define TABLE_SIZE 16384 /* power of two, > 2 x peers */
typedef struct {
    unsigned char len; /* 0 = empty slot */
    unsigned char id[MAX_ID];
} peer_t;

static uint32_t hash_id(const unsigned char *id, size_t len) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < len; i++) h = (h ^ id[i]) * 16777619u;
    return h;
}

/* Returns 1 if the identity was already in the set, 0 if it was added, -1 if full. */
static int peer_insert(peer_t *table, const unsigned char *id, size_t len) {
    if (len == 0 || len > MAX_ID) return -1;
    uint32_t i = hash_id(id, len) & (TABLE_SIZE - 1);
    for (int probes = 0; probes < TABLE_SIZE; probes++, i = (i + 1) & (TABLE_SIZE - 1)) {
        if (table[i].len == 0) {
            table[i].len = (unsigned char)len;
            memcpy(table[i].id, id, len);
            return 0;
        }
        if (table[i].len == len && memcmp(table[i].id, id, len) == 0) return 1;
    }
    return -1;
}

static peer_t clients[TABLE_SIZE];
static peer_t agent_set[TABLE_SIZE];
/* Agents in arrival order, for round-robin. */
static unsigned char agent_ids[TABLE_SIZE / 2][MAX_ID];
static size_t agent_lens[TABLE_SIZE / 2];
static size_t n_agents, next_agent;

static void die(const char *what) {
    fprintf(stderr, "forwarder: %s: %s\n", what, zmq_strerror(zmq_errno()));
    exit(1);
}

static void *router(void *ctx, const char *addr) {
    void *s = zmq_socket(ctx, ZMQ_ROUTER);
    int zero = 0, one = 1;
    if (!s) die("zmq_socket");
    /* Unlimited queues: the ceiling must never be the one that drops a message. */
    zmq_setsockopt(s, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_RCVHWM, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_IPV6, &one, sizeof one);
    if (zmq_bind(s, addr) != 0) die(addr);
    return s;
}

/* Receive the rest of a multipart message and throw it away. */
static void drain_parts(zmq_msg_t *last, void *s) {
    while (zmq_msg_more(last)) {
        zmq_msg_close(last);
        zmq_msg_init(last);
        if (zmq_msg_recv(last, s, 0) < 0) break;
    }
    zmq_msg_close(last);
}

static void send_bytes(void *s, const void *data, size_t len, int flags) {
    zmq_msg_t m;
    zmq_msg_init_size(&m, len);
    memcpy(zmq_msg_data(&m), data, len);
    if (zmq_msg_send(&m, s, flags) < 0) zmq_msg_close(&m);
}

/* One message from a client.  Returns 0 when the socket had nothing more to read. */
static int from_client(void *clients_s, void *agents_s) {
    zmq_msg_t id, body;
    zmq_msg_init(&id);
    if (zmq_msg_recv(&id, clients_s, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&id);
        return 0;
    }
    zmq_msg_init(&body);
    zmq_msg_recv(&body, clients_s, 0);
    if (zmq_msg_more(&body)) { /* not a one-frame peer: ignore it */
        zmq_msg_close(&id);
        drain_parts(&body, clients_s);
        return 1;
    }
    int known = peer_insert(clients, zmq_msg_data(&id), zmq_msg_size(&id));
    size_t size = zmq_msg_size(&body);
    if (known == 0) { /* hello: echo it as the registration answer */
        zmq_msg_send(&id, clients_s, ZMQ_SNDMORE);
        zmq_msg_send(&body, clients_s, 0);
    } else if (size == sizeof PING && memcmp(zmq_msg_data(&body), PING, sizeof PING) == 0) {
        zmq_msg_send(&id, clients_s, ZMQ_SNDMORE);
        send_bytes(clients_s, PONG, sizeof PONG, 0);
        zmq_msg_close(&body);
    } else if (size == sizeof PING09 && memcmp(zmq_msg_data(&body), PING09, sizeof PING09) == 0) {
        zmq_msg_send(&id, clients_s, ZMQ_SNDMORE);
        send_bytes(clients_s, PONG09, sizeof PONG09, 0);
        zmq_msg_close(&body);
    } else if (n_agents == 0) { /* nobody to run it: a ceiling keeps no queue */
        zmq_msg_close(&id);
        zmq_msg_close(&body);
    } else {
        size_t a = next_agent++ % n_agents;
        send_bytes(agents_s, agent_ids[a], agent_lens[a], ZMQ_SNDMORE);
        zmq_msg_send(&id, agents_s, ZMQ_SNDMORE);
        zmq_msg_send(&body, agents_s, 0);
    }
    return 1;
}

/* One message from an agent.  Returns 0 when the socket had nothing more to read. */
static int from_agent(void *agents_s, void *clients_s) {
    zmq_msg_t id, first, body;
    zmq_msg_init(&id);
    if (zmq_msg_recv(&id, agents_s, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&id);
        return 0;
    }
    zmq_msg_init(&first);
    zmq_msg_recv(&first, agents_s, 0);
    if (!zmq_msg_more(&first)) { /* hello registers the agent; pongs need nothing */
        const unsigned char *aid = zmq_msg_data(&id);
        size_t len = zmq_msg_size(&id);
        if (peer_insert(agent_set, aid, len) == 0 && n_agents < TABLE_SIZE / 2) {
            memcpy(agent_ids[n_agents], aid, len);
            agent_lens[n_agents++] = len;
        }
        zmq_msg_close(&id);
        zmq_msg_close(&first);
        return 1;
    }
    /* [client identity, payload]: the payload goes to that client as it is. */
    zmq_msg_close(&id);
    zmq_msg_init(&body);
    zmq_msg_recv(&body, agents_s, 0);
    if (zmq_msg_more(&body)) {
        zmq_msg_close(&first);
        drain_parts(&body, agents_s);
        return 1;
    }
    zmq_msg_send(&first, clients_s, ZMQ_SNDMORE);
    zmq_msg_send(&body, clients_s, 0);
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s AGENT_ADDR CLIENT_ADDR\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    void *ctx = zmq_ctx_new();
    if (!ctx) die("zmq_ctx_new");
    void *agents_s = router(ctx, argv[1]);
    void *clients_s = router(ctx, argv[2]);
    zmq_pollitem_t items[2] = {{agents_s, 0, ZMQ_POLLIN, 0}, {clients_s, 0, ZMQ_POLLIN, 0}};
    fprintf(stderr, "forwarder: agents on %s, clients on %s\n", argv[1], argv[2]);
    for (;;) { /* runs until the benchmark ends it with SIGTERM */
        if (zmq_poll(items, 2, -1) < 0) {
            if (zmq_errno() == EINTR) continue;
            die("zmq_poll");
        }
        /* Bounded batches keep one busy side from starving the other. */
        for (int n = 0; n < 256 && from_agent(agents_s, clients_s); n++) {
        }
        for (int n = 0; n < 256 && from_client(clients_s, agents_s); n++) {
        }
    }
}
