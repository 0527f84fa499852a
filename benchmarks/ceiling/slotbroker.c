/*
 * The slot-aware ceiling: the least a broker that respects agents' job slots can do.
 *
 *   slotbroker AGENT_ADDR CLIENT_ADDR
 *
 * forwarder.c moves every job to an agent the moment it arrives; with nothing to wait
 * for, libzmq batches everything and the figure is not a floor any real broker can
 * reach.  This one does what every real broker must do per job, in plain C:
 *
 *   - it reads every message's msgpack map (one pass over the top-level keys, values
 *     skipped by their headers) to find "type" (0.5) or "@type" (0.7-0.9.2), "job_id",
 *     and, in an agent's hello, "available_job_slots";
 *   - it registers agents (identity -> slot count, in an open-addressing hash) and sends
 *     a job only to an agent with a free slot, round robin; jobs that find no free slot
 *     wait in a FIFO (a ring of received zmq_msg_t: never copied) and go out as "job
 *     done" frees slots;
 *   - it keeps a job table (open-addressing hash keyed by the job id's msgpack bytes,
 *     value: the client's identity); an agent's "job started" and "job done" are routed
 *     to the client by a lookup there, and "job done" removes the entry and frees the
 *     sending agent's slot;
 *   - it answers client pings with the dialect's pong and pings every agent once a
 *     second (agents' pongs are read and looked up).
 *
 * What it skips, compared with a real broker (so the figure is a floor, not a rival):
 *   - no re-encoding: the client's job goes to the agent, and the agent's results go to
 *     the client, byte for byte (a real broker rewrites client_new_job -> backend_new_job
 *     and agent_job_* -> backend_job_*, i.e. splices the job id and copies the frame
 *     once).  The generator's agents echo whatever job id they find and its clients only
 *     look for the job id and a "done" marker, so they do not notice.  In 0.5 the job id
 *     a real broker sends is [client identity, job id]; here the agent echoes the client's
 *     job id and the table gives the client back, which costs a hash lookup instead of
 *     reading the identity from the echoed array;
 *   - no validation of key sets or value types beyond what routing needs; unknown or
 *     malformed messages are dropped and counted;
 *   - no environments: any agent with a free slot takes any job (every agent offers
 *     every environment in the scenarios it runs), so no per-environment queues, no
 *     priorities, no job timeouts, no kill, no agent-death handling (the job table keeps
 *     no agent; an agent that stops answering pings is not removed), no logging;
 *   - the answer to a client's hello is its own hello echoed back (the generator takes
 *     any answer as "registered"; a real broker sends the environments list);
 *   - duplicate job ids are dropped (a real broker answers with an error).
 * Unlimited high-water marks, like forwarder.c: it never drops a message itself.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "zmq_abi.h"

static const unsigned char PING[] = {0x81, 0xa4, 't', 'y', 'p', 'e', 0xa4, 'p', 'i', 'n', 'g'};
static const unsigned char PONG[] = {0x81, 0xa4, 't', 'y', 'p', 'e', 0xa4, 'p', 'o', 'n', 'g'};
static const unsigned char PING09[] = {0x81, 0xa5, '@', 't', 'y', 'p', 'e', 0xa4, 'P', 'i', 'n', 'g'};
static const unsigned char PONG09[] = {0x81, 0xa5, '@', 't', 'y', 'p', 'e', 0xa4, 'P', 'o', 'n', 'g'};

static void die(const char *what) {
    fprintf(stderr, "slotbroker: %s: %s\n", what, zmq_strerror(zmq_errno()));
    exit(1);
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n, size);
    if (!p) {
        fprintf(stderr, "slotbroker: out of memory\n");
        exit(1);
    }
    return p;
}

static uint32_t fnv1a(const unsigned char *p, size_t len) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

/* ------------------------------------------------------------------ msgpack scan */

/* Big-endian unsigned of n bytes at p (n <= 4); the caller checked the bounds. */
static size_t be(const unsigned char *p, int n) {
    size_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* The end of the msgpack object at p, or NULL if it does not fit before end.  Each
 * pass of the loop consumes at least one byte, so it is bounded by the buffer. */
static const unsigned char *mp_skip(const unsigned char *p, const unsigned char *end) {
    size_t need = 1;
    while (need > 0) {
        if (p >= end) return NULL;
        unsigned char b = *p++;
        need--;
        size_t skip = 0;
        int hdr = 0; /* bytes of length that follow b */
        int kind = 0; /* 0: skip bytes, 1: array items, 2: map pairs */
        if (b <= 0x7f || b >= 0xe0) continue;
        if (b <= 0x8f) { need += 2 * (size_t)(b & 0x0f); continue; }
        if (b <= 0x9f) { need += b & 0x0f; continue; }
        if (b <= 0xbf) { skip = b & 0x1f; goto bytes; }
        switch (b) {
        case 0xc0: case 0xc2: case 0xc3: continue;
        case 0xc4: case 0xd9: hdr = 1; break;
        case 0xc5: case 0xda: hdr = 2; break;
        case 0xc6: case 0xdb: hdr = 4; break;
        case 0xc7: hdr = 1; skip = 1; break; /* ext8: length, type */
        case 0xc8: hdr = 2; skip = 1; break;
        case 0xc9: hdr = 4; skip = 1; break;
        case 0xcc: case 0xd0: skip = 1; goto bytes;
        case 0xcd: case 0xd1: skip = 2; goto bytes;
        case 0xca: case 0xce: case 0xd2: skip = 4; goto bytes;
        case 0xcb: case 0xcf: case 0xd3: skip = 8; goto bytes;
        case 0xd4: skip = 2; goto bytes;
        case 0xd5: skip = 3; goto bytes;
        case 0xd6: skip = 5; goto bytes;
        case 0xd7: skip = 9; goto bytes;
        case 0xd8: skip = 17; goto bytes;
        case 0xdc: hdr = 2; kind = 1; break;
        case 0xdd: hdr = 4; kind = 1; break;
        case 0xde: hdr = 2; kind = 2; break;
        case 0xdf: hdr = 4; kind = 2; break;
        default: return NULL; /* 0xc1: never used */
        }
        if ((size_t)(end - p) < (size_t)hdr) return NULL;
        {
            size_t n = be(p, hdr);
            p += hdr;
            if (kind == 1) { need += n; continue; }
            if (kind == 2) { need += 2 * n; continue; }
            skip += n;
        }
    bytes:
        if ((size_t)(end - p) < skip) return NULL;
        p += skip;
    }
    return p;
}

/* A msgpack str at p: its content and length; 0 if p is not a str. */
static int mp_str(const unsigned char *p, const unsigned char *end, const unsigned char **s, size_t *len) {
    if (p >= end) return 0;
    unsigned char b = *p;
    int hdr;
    if (b >= 0xa0 && b <= 0xbf) { *s = p + 1; *len = b & 0x1f; }
    else {
        if (b == 0xd9) hdr = 1;
        else if (b == 0xda) hdr = 2;
        else if (b == 0xdb) hdr = 4;
        else return 0;
        if (end - p < 1 + hdr) return 0;
        *s = p + 1 + hdr;
        *len = be(p + 1, hdr);
    }
    return (size_t)(end - *s) >= *len;
}

enum { T_UNKNOWN, T_CLIENT_HELLO, T_NEW_JOB, T_PING, T_AGENT_HELLO, T_STARTED, T_DONE, T_PONG };
typedef struct {
    int type;
    int v09; /* "@type" (0.7-0.9.2) rather than "type" (0.5) */
    const unsigned char *job_id; /* the job id's whole msgpack object */
    size_t job_id_len;
    long slots;
} scan_t;

#define TYPE(name, type) {name, sizeof name - 1, type}
static const struct { const char *name; size_t len; int type; } TYPES[] = {
    /* the per-job ones first */
    TYPE("client_new_job", T_NEW_JOB), TYPE("ClientNewJob", T_NEW_JOB),
    TYPE("agent_job_started", T_STARTED), TYPE("AgentJobStarted", T_STARTED),
    TYPE("agent_job_done", T_DONE), TYPE("AgentJobDone", T_DONE),
    TYPE("ping", T_PING), TYPE("Ping", T_PING), TYPE("pong", T_PONG), TYPE("Pong", T_PONG),
    TYPE("client_hello", T_CLIENT_HELLO), TYPE("ClientHello", T_CLIENT_HELLO),
    TYPE("agent_hello", T_AGENT_HELLO), TYPE("AgentHello", T_AGENT_HELLO),
};

static int type_of(const unsigned char *s, size_t len) {
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++)
        if (TYPES[i].len == len && memcmp(TYPES[i].name, s, len) == 0) return TYPES[i].type;
    return T_UNKNOWN;
}

/* One pass over the top-level map of a message; 0 if it is not one. */
static int scan(const unsigned char *p, size_t size, scan_t *out) {
    const unsigned char *end = p + size;
    memset(out, 0, sizeof *out);
    out->slots = -1;
    if (size == 0) return 0;
    size_t pairs;
    unsigned char b = *p;
    if (b >= 0x80 && b <= 0x8f) { pairs = b & 0x0f; p += 1; }
    else if (b == 0xde && size >= 3) { pairs = be(p + 1, 2); p += 3; }
    else if (b == 0xdf && size >= 5) { pairs = be(p + 1, 4); p += 5; }
    else return 0;
    for (size_t i = 0; i < pairs; i++) { /* bounded by the pair count and the buffer */
        const unsigned char *key, *value, *next;
        size_t klen;
        if (!mp_str(p, end, &key, &klen)) return 0;
        value = key + klen;
        next = mp_skip(value, end);
        if (!next) return 0;
        if ((klen == 4 && memcmp(key, "type", 4) == 0) || (klen == 5 && memcmp(key, "@type", 5) == 0)) {
            const unsigned char *s;
            size_t slen;
            if (!mp_str(value, end, &s, &slen)) return 0;
            out->type = type_of(s, slen);
            out->v09 = klen == 5;
        } else if (klen == 6 && memcmp(key, "job_id", 6) == 0) {
            out->job_id = value;
            out->job_id_len = (size_t)(next - value);
        } else if (klen == 19 && memcmp(key, "available_job_slots", 19) == 0) {
            unsigned char v = *value;
            if (v <= 0x7f) out->slots = v;
            else if (v == 0xcc || v == 0xcd || v == 0xce) out->slots = (long)be(value + 1, (int)(next - value - 1));
        }
        p = next;
    }
    return 1;
}

/* ------------------------------------------------------------------ agents */

#define MAX_ID 32
#define MAX_AGENTS 4096
#define AGENT_TABLE 8192 /* power of two, > 2 x agents */
typedef struct {
    unsigned char len;
    unsigned char id[MAX_ID];
    int v09;
    long slots, busy;
} agent_t;
static agent_t agents[MAX_AGENTS];
static int agent_index[AGENT_TABLE]; /* index + 1 into agents; 0 = empty */
static size_t n_agents, next_agent, free_slots;

static agent_t *agent_find(const unsigned char *id, size_t len, int add) {
    if (len == 0 || len > MAX_ID) return NULL;
    uint32_t i = fnv1a(id, len) & (AGENT_TABLE - 1);
    for (int probes = 0; probes < AGENT_TABLE; probes++, i = (i + 1) & (AGENT_TABLE - 1)) {
        int k = agent_index[i];
        if (k == 0) {
            if (!add || n_agents >= MAX_AGENTS) return NULL;
            agent_t *a = &agents[n_agents];
            a->len = (unsigned char)len;
            memcpy(a->id, id, len);
            agent_index[i] = (int)++n_agents;
            return a;
        }
        agent_t *a = &agents[k - 1];
        if (a->len == len && memcmp(a->id, id, len) == 0) return a;
    }
    return NULL;
}

/* The next agent with a free slot, round robin (the caller checked free_slots > 0). */
static agent_t *agent_with_slot(void) {
    for (size_t n = 0; n < n_agents; n++) {
        agent_t *a = &agents[next_agent++ % n_agents];
        if (a->busy < a->slots) return a;
    }
    return NULL;
}

/* ------------------------------------------------------------------ job table */

#define MAX_JOB_ID 64
typedef struct {
    unsigned char klen; /* 0 = empty */
    unsigned char cid_len;
    unsigned char key[MAX_JOB_ID];
    unsigned char cid[MAX_ID];
} job_t;
static job_t *jobs;
static size_t jobs_cap = 1024, jobs_n; /* power of two; kept under half full */

static size_t job_slot(const job_t *table, size_t cap, const unsigned char *key, size_t klen, int *found) {
    size_t i = fnv1a(key, klen) & (cap - 1);
    for (size_t probes = 0; probes < cap; probes++, i = (i + 1) & (cap - 1)) {
        if (table[i].klen == 0) { *found = 0; return i; }
        if (table[i].klen == klen && memcmp(table[i].key, key, klen) == 0) { *found = 1; return i; }
    }
    *found = 0;
    return cap; /* cannot happen below half load */
}

static void jobs_grow(void) {
    size_t cap = jobs_cap * 2;
    job_t *table = xcalloc(cap, sizeof *table);
    for (size_t i = 0; i < jobs_cap; i++) {
        if (jobs[i].klen == 0) continue;
        int found;
        size_t at = job_slot(table, cap, jobs[i].key, jobs[i].klen, &found);
        table[at] = jobs[i];
    }
    free(jobs);
    jobs = table;
    jobs_cap = cap;
}

/* 1 added, 0 a duplicate, -1 unusable key. */
static int job_add(const unsigned char *key, size_t klen, const unsigned char *cid, size_t cid_len) {
    if (klen == 0 || klen > MAX_JOB_ID || cid_len == 0 || cid_len > MAX_ID) return -1;
    if (2 * (jobs_n + 1) > jobs_cap) jobs_grow();
    int found;
    size_t at = job_slot(jobs, jobs_cap, key, klen, &found);
    if (found || at == jobs_cap) return 0;
    jobs[at].klen = (unsigned char)klen;
    memcpy(jobs[at].key, key, klen);
    jobs[at].cid_len = (unsigned char)cid_len;
    memcpy(jobs[at].cid, cid, cid_len);
    jobs_n++;
    return 1;
}

static job_t *job_find(const unsigned char *key, size_t klen) {
    if (klen == 0 || klen > MAX_JOB_ID) return NULL;
    int found;
    size_t at = job_slot(jobs, jobs_cap, key, klen, &found);
    return found ? &jobs[at] : NULL;
}

/* Linear probing's deletion: shift later entries of the cluster back into the hole. */
static void job_remove(job_t *entry) {
    size_t mask = jobs_cap - 1, hole = (size_t)(entry - jobs), i = hole;
    for (size_t probes = 0; probes < jobs_cap; probes++) {
        i = (i + 1) & mask;
        if (jobs[i].klen == 0) break;
        size_t home = fnv1a(jobs[i].key, jobs[i].klen) & mask;
        /* move i into the hole if its home is not in (hole, i] cyclically */
        if (((i - home) & mask) >= ((i - hole) & mask)) {
            jobs[hole] = jobs[i];
            hole = i;
        }
    }
    jobs[hole].klen = 0;
    jobs_n--;
}

/* ------------------------------------------------------------------ waiting jobs */

static zmq_msg_t *fifo; /* ring of received job frames, moved in and out, never copied */
static size_t fifo_cap = 1024, fifo_head, fifo_n; /* cap: power of two */

static void fifo_push(zmq_msg_t *msg) {
    if (fifo_n == fifo_cap) {
        zmq_msg_t *ring = xcalloc(fifo_cap * 2, sizeof *ring);
        for (size_t i = 0; i < fifo_n; i++) {
            zmq_msg_init(&ring[i]);
            zmq_msg_move(&ring[i], &fifo[(fifo_head + i) & (fifo_cap - 1)]);
        }
        free(fifo);
        fifo = ring;
        fifo_cap *= 2;
        fifo_head = 0;
    }
    zmq_msg_t *slot = &fifo[(fifo_head + fifo_n++) & (fifo_cap - 1)];
    zmq_msg_init(slot);
    zmq_msg_move(slot, msg);
}

/* ------------------------------------------------------------------ routing */

static void *agents_s, *clients_s;
static unsigned long dropped;

static void send_bytes(void *s, const void *data, size_t len, int flags) {
    zmq_msg_t m;
    zmq_msg_init_size(&m, len);
    memcpy(zmq_msg_data(&m), data, len);
    if (zmq_msg_send(&m, s, flags) < 0) zmq_msg_close(&m);
}

/* Moves ``body`` (a client's job frame) to agent ``a``, which has a free slot. */
static void dispatch(agent_t *a, zmq_msg_t *body) {
    a->busy++;
    free_slots--;
    send_bytes(agents_s, a->id, a->len, ZMQ_SNDMORE);
    if (zmq_msg_send(body, agents_s, 0) < 0) zmq_msg_close(body);
}

/* Waiting jobs go out while slots are free. */
static void dispatch_waiting(void) {
    while (fifo_n > 0 && free_slots > 0) { /* bounded by fifo_n */
        agent_t *a = agent_with_slot();
        if (!a) break;
        zmq_msg_t *msg = &fifo[fifo_head];
        fifo_head = (fifo_head + 1) & (fifo_cap - 1);
        fifo_n--;
        dispatch(a, msg);
    }
}

static void drain_parts(zmq_msg_t *last, void *s) {
    while (zmq_msg_more(last)) {
        zmq_msg_close(last);
        zmq_msg_init(last);
        if (zmq_msg_recv(last, s, 0) < 0) break;
    }
    zmq_msg_close(last);
}

/* Receives [identity, body] from a ROUTER socket; 0 when there was nothing, -1 when the
 * message was not two frames (then already thrown away). */
static int recv_pair(void *s, zmq_msg_t *id, zmq_msg_t *body) {
    zmq_msg_init(id);
    if (zmq_msg_recv(id, s, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(id);
        return 0;
    }
    zmq_msg_init(body);
    zmq_msg_recv(body, s, 0);
    if (zmq_msg_more(body)) {
        zmq_msg_close(id);
        drain_parts(body, s);
        dropped++;
        return -1;
    }
    return 1;
}

static int from_client(void) {
    zmq_msg_t id, body;
    int got = recv_pair(clients_s, &id, &body);
    if (got <= 0) return got != 0;
    scan_t m;
    agent_t *a;
    size_t size = zmq_msg_size(&body);
    const unsigned char *data = zmq_msg_data(&body);
    if (!scan(data, size, &m)) m.type = T_UNKNOWN;
    if (m.type == T_NEW_JOB) {
        if (job_add(m.job_id, m.job_id_len, zmq_msg_data(&id), zmq_msg_size(&id)) <= 0) {
            dropped++;
            zmq_msg_close(&body);
        } else if (fifo_n == 0 && free_slots > 0 && (a = agent_with_slot()) != NULL) {
            dispatch(a, &body);
        } else {
            fifo_push(&body);
            zmq_msg_close(&body);
        }
        zmq_msg_close(&id);
    } else if (m.type == T_PING) {
        zmq_msg_send(&id, clients_s, ZMQ_SNDMORE);
        if (m.v09) send_bytes(clients_s, PONG09, sizeof PONG09, 0);
        else send_bytes(clients_s, PONG, sizeof PONG, 0);
        zmq_msg_close(&body);
    } else if (m.type == T_CLIENT_HELLO) {
        zmq_msg_send(&id, clients_s, ZMQ_SNDMORE);
        zmq_msg_send(&body, clients_s, 0);
    } else {
        dropped++;
        zmq_msg_close(&id);
        zmq_msg_close(&body);
    }
    return 1;
}

static int from_agent(void) {
    zmq_msg_t id, body;
    int got = recv_pair(agents_s, &id, &body);
    if (got <= 0) return got != 0;
    scan_t m;
    size_t size = zmq_msg_size(&body);
    const unsigned char *data = zmq_msg_data(&body);
    if (!scan(data, size, &m)) m.type = T_UNKNOWN;
    agent_t *a = agent_find(zmq_msg_data(&id), zmq_msg_size(&id), m.type == T_AGENT_HELLO);
    zmq_msg_close(&id);
    job_t *job = NULL;
    if (a && (m.type == T_STARTED || m.type == T_DONE)) job = job_find(m.job_id, m.job_id_len);
    if (job) {
        send_bytes(clients_s, job->cid, job->cid_len, ZMQ_SNDMORE);
        if (zmq_msg_send(&body, clients_s, 0) < 0) zmq_msg_close(&body);
        if (m.type == T_DONE) {
            job_remove(job);
            if (a->busy > 0) {
                a->busy--;
                free_slots++;
            }
            dispatch_waiting();
        }
        return 1;
    }
    zmq_msg_close(&body);
    if (a && m.type == T_AGENT_HELLO && m.slots >= 0 && a->slots == 0) {
        a->slots = m.slots;
        a->v09 = m.v09;
        free_slots += (size_t)m.slots;
        dispatch_waiting();
    } else if (!(a && m.type == T_PONG)) {
        dropped++;
    }
    return 1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *router(void *ctx, const char *addr) {
    void *s = zmq_socket(ctx, ZMQ_ROUTER);
    int zero = 0, one = 1;
    if (!s) die("zmq_socket");
    zmq_setsockopt(s, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_RCVHWM, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_IPV6, &one, sizeof one);
    if (zmq_bind(s, addr) != 0) die(addr);
    return s;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s AGENT_ADDR CLIENT_ADDR\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    jobs = xcalloc(jobs_cap, sizeof *jobs);
    fifo = xcalloc(fifo_cap, sizeof *fifo);
    void *ctx = zmq_ctx_new();
    if (!ctx) die("zmq_ctx_new");
    agents_s = router(ctx, argv[1]);
    clients_s = router(ctx, argv[2]);
    zmq_pollitem_t items[2] = {{agents_s, 0, ZMQ_POLLIN, 0}, {clients_s, 0, ZMQ_POLLIN, 0}};
    fprintf(stderr, "slotbroker: agents on %s, clients on %s\n", argv[1], argv[2]);
    double next_ping = now_s() + 1.0;
    for (;;) { /* runs until the benchmark ends it with SIGTERM */
        long wait_ms = (long)((next_ping - now_s()) * 1000.0) + 1;
        if (wait_ms < 0) wait_ms = 0;
        if (zmq_poll(items, 2, wait_ms) < 0) {
            if (zmq_errno() == EINTR) continue;
            die("zmq_poll");
        }
        /* Bounded batches keep one busy side from starving the other. */
        for (int n = 0; n < 256 && from_agent(); n++) {
        }
        for (int n = 0; n < 256 && from_client(); n++) {
        }
        if (now_s() >= next_ping) {
            for (size_t i = 0; i < n_agents; i++) {
                send_bytes(agents_s, agents[i].id, agents[i].len, ZMQ_SNDMORE);
                if (agents[i].v09) send_bytes(agents_s, PING09, sizeof PING09, 0);
                else send_bytes(agents_s, PING, sizeof PING, 0);
            }
            next_ping += 1.0;
            if (next_ping < now_s()) next_ping = now_s() + 1.0;
        }
    }
}
