// SPDX-License-Identifier: GPL-2.0-only
/*
 * encapfwd's XDP data plane: executes the controller's forwarding plan (encapfwd.plan) from maps.
 *
 * One generic program for every method: a server's egress is a template (Ethernet MACs + header bytes +
 * a fixed set of per-packet fields, encapfwd.hookspecs.Template), so a third party's tunnel runs here
 * without eBPF of its own. What the program does not finish itself goes up with XDP_PASS to the Python
 * dispatcher (the slow path), which answers exactly as the reference does: fragments, IP options, ICMP,
 * TTL expiry, frames too big for the MTU, first packets of ports whose selection is not a table (unless the
 * slow path is under pressure: see "Overload" below), and all traffic that is not for a cluster address.
 * Frames not sent to this dispatcher's MAC (another host's, or a broadcast/multicast one for a cluster
 * address) are never forwarded: they go up untouched (not-for-us), the kernel treats them as without the
 * program. The Python side (encapfwd/xdp/maps.py) mirrors every layout.
 *
 * Reloads: every plan map holds two generations; the controller fills the idle one, then flips
 * control[0].gen in one word, so no packet sees a half-written plan. Flows carry stable server ids.
 *
 * Overload (docs/live.md, "Overload"; the Python Scheduler follows the same rules for its own flow table):
 * - a TCP segment that misses the flow table and cannot open a connection (not SYN without ACK) is forwarded
 *   by the table but not remembered: an ACK flood would otherwise fill the LRU with junk and evict real flows
 *   (an entry the table still holds, expired or on a server now down, is placed again and kept: it takes no
 *   new entry);
 * - at most overload.newflow_limit new flow entries per CPU per second (Katran's MAX_CONN_RATE): beyond it
 *   a new flow is forwarded by the table but not remembered (0: no limit; the Python executor has none);
 * - under pressure (overload.pressure, set by the controller when the slow path cannot keep up), a new flow
 *   of a wrr or wlc port is placed here by the port's pressure table (a weighted Maglev table of its
 *   eligible servers) and remembered, instead of going up;
 * - without it, at most overload.handup_limit new flows of such ports per CPU per second go up (in windows of
 *   a tenth of a second): beyond them the program places them itself, as under pressure, at once, in the
 *   first milliseconds of a flood, before the controller can have seen the slow path fall behind (it sees
 *   the count grow and turns pressure on; 0: no limit, every new flow goes up; set by the live runtime only).
 * Every flow not remembered, every flow placed under pressure and every one placed beyond the hand-up limit
 * is counted in flow_events.
 * Flows already in the table pay nothing for any of this: it all happens after a miss.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "encapfwd_ctx.h"
#include "encapfwd_pkt.h"

#ifndef MAX_SERVERS
#define MAX_SERVERS 16384 /* server ids (sid) per generation */
#endif
#ifndef MAX_PORTS
#define MAX_PORTS 256 /* ports per generation */
#endif
#ifndef NCPUS
#define NCPUS 1 /* possible CPUs (the loader passes libbpf_num_possible_cpus) */
#endif
#define MAX_HDR 64
#define NO_SERVER 0xFFFFFFFFu

/* The constants encapfwd.xdp.maps mirrors are named enums with maps.py's names (upper case, '-' as '_'):
 * tests/test_xdp_btf.py reads them from the BTF of a build with ENCAPFWD_BTF_CONSTANTS (the end of this file). */
/* template fields (encapfwd.xdp.maps.FIELD_BITS) */
enum template_field { F_IPV4 = 0x01, F_TOS = 0x02, F_DF = 0x04, F_IDENT = 0x08, F_UDP = 0x10, F_ENTROPY = 0x20 };

/* drop reasons the program decides itself (encapfwd.xdp.maps.DROPS; names as the dispatcher's) */
enum drop_reason { D_TRUNCATED, D_BAD_CHECKSUM, D_NOT_PORT, D_NO_SERVER, D_MAX };
/* new flows the program forwarded without remembering them, or placed under pressure
 * (encapfwd.xdp.maps.FLOW_EVENTS) */
enum flow_event { E_NOT_SYN, E_RATE_LIMIT, E_PRESSURE, E_HANDUP_LIMIT, E_MAX };
/* why a frame went up (encapfwd.xdp.maps.PASSES) */
enum pass_reason {
    P_NOT_OURS, P_MALFORMED, P_IP_OPTIONS, P_FRAGMENT, P_NOT_TCP_UDP, P_TTL, P_NEW_FLOW, P_TOO_BIG,
    P_NO_TEMPLATE, P_EXT_HEADER, P_ERROR, P_NOT_FOR_US, P_MAX
};

struct control {
    __u32 gen;
    __u32 owner; /* pid of the controller that installed the plan (a restart replaces a dead one's program) */
};

/* This dispatcher's own MAC, per generation (the plan's executor mac): only frames sent to it are
 * forwarded; a frame for another host's MAC (a bridge flooding unknown unicast) goes up untouched, as the
 * kernel would have it without the program (it drops PACKET_OTHERHOST), counted as not-for-us. */
struct host_entry {
    __u8 mac[6];
    __u8 check; /* 0: the plan has no MAC, every unicast destination is taken */
    __u8 pad;
};

struct vip_key { /* a cluster address (no port: "is this ours") */
    __u8 addr[16];
    __u8 family; /* 4 or 6 */
    __u8 gen;
    __u8 pad[2];
};

struct port_key {
    __u8 addr[16];
    __be16 port; /* network order, as in the packet; 0 = every port */
    __u8 proto;
    __u8 gen;
};

struct port_entry {
    __u32 ring_base; /* first slot of this port's table (or, with ring_size 0, its pressure table) in `ring` */
    __u32 ring_size; /* 0: not a table, new flows go up (or, under pressure, by the pressure table) */
    __u32 timeout;   /* staletimeout, seconds */
    __u32 fallback;  /* slots of the pressure table (wrr, wlc ports; 0: none, new flows always go up) */
};

/* What the controller says about overload (one entry): written at every plan install (the limit) and by
 * DataPlane.set_pressure (the flag); read only when a flow misses the flow table. */
struct overload {
    __u32 pressure;      /* 1: the slow path cannot keep up: place new flows of wrr/wlc ports here */
    __u32 newflow_limit; /* new flow entries per CPU per second (executor newflowlimit); 0: no limit */
    __u32 publish;       /* 1: flow synchronisation runs: every new flow entry goes to `new_flows` too */
    __u32 handup_limit;  /* new flows of wrr/wlc ports handed up per CPU per second, at most; 0: no limit */
};

/* This CPU's window of new flow entries (Katran's MAX_CONN_RATE): at most newflow_limit per second; the same
 * shape counts its hand-ups of new flows (handup_rate, windows of a tenth of a second). */
struct newflow_window {
    __u64 start_ns;
    __u64 count;
};

struct server_entry {
    __u8 dst[6];
    __u8 src[6];
    __u16 hdr_len;
    __u16 fields;
    __u16 mtu;
    __u8 up;
    __u8 xdp; /* 0: no template, frames go up */
    __u8 hdr[MAX_HDR];
};

struct flow_key {
    __u8 src[16];
    __u8 dst[16];
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 pad[3];
};

struct flow_value {
    __u32 sid;
    __u32 pad;
    __u64 seen_ns; /* bpf_ktime_get_ns (CLOCK_MONOTONIC) of the last refresh */
};

/* A new flow entry as published in `new_flows` for flow synchronisation (encapfwd.xdp.maps.FLOW_RECORD;
 * read by encapfwd.xdp.ringbuf, published by encapfwd.flowsync) */
struct flow_record {
    struct flow_key key;
    struct flow_value value;
};

struct counter {
    __u64 packets;
    __u64 bytes;
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct control);
} control SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2); /* generation -> this dispatcher's MAC */
    __type(key, __u32);
    __type(value, struct host_entry);
} host SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 2 * 1024);
    __type(key, struct vip_key);
    __type(value, __u32);
} vips SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 2 * MAX_PORTS * 2);
    __type(key, struct port_key);
    __type(value, __u32); /* index into ports */
} port_index SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2 * MAX_PORTS);
    __type(key, __u32);
    __type(value, struct port_entry);
} ports SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2 * MAX_SERVERS);
    __type(key, __u32);
    __type(value, struct server_entry);
} servers SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2 * 65537); /* set by the loader: 2 generations x the plan's table slots */
    __type(key, __u32);
    __type(value, __u32); /* sid or NO_SERVER */
} ring SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536); /* set by the loader: executor maxflows */
    __uint(map_flags, BPF_F_NO_COMMON_LRU);
    __type(key, struct flow_key);
    __type(value, struct flow_value);
} flows SEC(".maps");

/* New flow entries, while flow synchronisation runs (overload.publish): the controller reads them by mmap
 * without a wake-up (BPF_RB_NO_WAKEUP: it polls). Full: the entry keeps pad 0 and the controller's sweep of
 * `flows` publishes it instead. */
struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 1 << 23); /* 8 MiB: 131,072 records of 64 bytes (with the ring's 8-byte header) */
} new_flows SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, MAX_SERVERS);
    __type(key, __u32);
    __type(value, struct counter);
} stats SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, D_MAX);
    __type(key, __u32);
    __type(value, __u64);
} drops SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, P_MAX);
    __type(key, __u32);
    __type(value, __u64);
} passes SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u32);
} idents SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct overload);
} overload SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct newflow_window);
} newflow_rate SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct newflow_window);
} handup_rate SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, E_MAX);
    __type(key, __u32);
    __type(value, __u64);
} flow_events SEC(".maps");

/* The reason of this CPU's last drop or pass (0x100 | pass reason): what tools and tests read to see
 * why one frame was not forwarded (BPF_PROG_TEST_RUN runs on the caller's CPU). */
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u32);
} last_reason SEC(".maps");

static __always_inline void note(__u32 code)
{
    __u32 zero = 0;
    __u32 *last = bpf_map_lookup_elem(&last_reason, &zero);
    if (last)
        *last = code;
}

static __always_inline int drop(__u32 reason)
{
    __u64 *c = bpf_map_lookup_elem(&drops, &reason);
    if (c)
        *c += 1;
    note(reason);
    return V_DROP;
}

static __always_inline int pass(__u32 reason)
{
    __u64 *c = bpf_map_lookup_elem(&passes, &reason);
    if (c)
        *c += 1;
    note(0x100 | reason);
    /* the host's own traffic and frames for another MAC take their usual way; the rest is the slow path's */
    return reason == P_NOT_OURS || reason == P_NOT_FOR_US ? V_PASS : V_UP;
}

/* The flow key of a TCP/UDP datagram: addresses of *alen* bytes (4 or 16), ports from the L4 header. */
static __always_inline void flow_key_fill(struct flow_key *fk, const __u8 *src, const __u8 *dst, __u32 alen,
                                          __u8 proto, const __u8 *l4)
{
    *fk = (struct flow_key){.sport = *(__be16 *)l4, .dport = *(__be16 *)(l4 + 2), .proto = proto};
    addr_copy(fk->src, src, alen);
    addr_copy(fk->dst, dst, alen);
}

/* zlib.crc32 of the dispatcher's flow key: src + dst + proto + the first four bytes of the L4 header */
static __always_inline __u32 flow_crc(const __u8 *src, const __u8 *dst, __u32 alen, __u8 proto, const __u8 *l4)
{
    __u32 c = crc_bytes(0xFFFFFFFF, src, alen);
    c = crc_bytes(c, dst, alen);
    c = crc_byte(c, proto);
    return crc_bytes(c, l4, 4) ^ 0xFFFFFFFF;
}

static __always_inline void count_flow_event(__u32 event)
{
    __u64 *c = bpf_map_lookup_elem(&flow_events, &event);
    if (c)
        *c += 1;
}

/* Whether this CPU's window in *map* (a per-CPU struct newflow_window) holds *share* events already; else the
 * one about to happen is counted (a window of span_ns starts with the first event after the last one ended). */
static __always_inline int window_full(void *map, __u64 now, __u64 span_ns, __u64 share)
{
    __u32 zero = 0;
    struct newflow_window *w = bpf_map_lookup_elem(map, &zero);
    if (!w)
        return 0;
    if (now - w->start_ns >= span_ns) {
        w->start_ns = now;
        w->count = 1;
        return 0;
    }
    if (w->count >= share)
        return 1;
    w->count += 1;
    return 0;
}

/* Whether this CPU has made *limit* new flow entries in its current one-second window already. */
static __always_inline int newflow_limited(__u64 now, __u32 limit)
{
    return window_full(&newflow_rate, now, 1000000000ull, limit);
}

/* Whether this CPU has handed up its share of new flows (handup_limit / 10 per window of a tenth of a
 * second) already. A tenth-second window lets a flood's first frames past the limit be placed here within
 * milliseconds, and spreads the hand-ups the slow path gets. */
static __always_inline int handup_limited(__u64 now, __u32 limit)
{
    return window_full(&handup_rate, now, 100000000ull, limit / 10 ? limit / 10 : 1);
}

/* Publish a new flow entry for flow synchronisation; its `pad` becomes the publication mark
 * (encapfwd.flowsync.sweep.mark_of: seen_ns >> 30, never 0) so that the controller's sweep of `flows` skips it.
 * The ring full, pad stays 0 and the sweep publishes it. */
static __always_inline void publish_flow(const struct flow_key *fk, struct flow_value *nv)
{
    struct flow_record *r = bpf_ringbuf_reserve(&new_flows, sizeof(*r), 0);
    if (!r)
        return;
    __u32 mark = (__u32)(nv->seen_ns >> 30);
    nv->pad = mark ? mark : 1;
    __builtin_memcpy(&r->key, fk, sizeof(r->key));
    r->value = *nv;
    bpf_ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}

#define TCP_SYN 0x02
#define TCP_ACK 0x10

/* The server for a flow: the flow table first, else the port's table for crc32(flow key) (under pressure, a
 * wrr/wlc port's pressure table); NO_SERVER or a sid; -1: go up. A new flow is remembered unless it is a TCP
 * segment that cannot open a connection or this CPU is over its new-flow limit (a flow the table still holds,
 * expired or on a server now down, is written again in its entry whatever it is). */
static __always_inline __s64 select_server(struct flow_key *fk, struct port_entry *pe, __u32 gen, __u32 alen,
                                           const __u8 *l4, const void *end)
{
    /* CLOCK_MONOTONIC_COARSE (the last tick's time: a few ns instead of a clock read, issue #21); entries
     * written by the slow path carry CLOCK_MONOTONIC and may be up to a tick ahead of it: age 0 */
    __u64 now = bpf_ktime_get_coarse_ns();
    struct flow_value *fv = bpf_map_lookup_elem(&flows, fk);
    if (fv) {
        __u64 seen = fv->seen_ns;
        __u64 age = now > seen ? now - seen : 0;
        if (age <= (__u64)pe->timeout * 1000000000ull) {
            __u32 key = gen * MAX_SERVERS + (fv->sid % MAX_SERVERS);
            struct server_entry *s = bpf_map_lookup_elem(&servers, &key);
            if (s && s->up) {
                if (age > 1000000000ull)
                    fv->seen_ns = now;
                return fv->sid;
            }
        }
    }
    /* a new flow: everything below (hash, overload word, rate window) is paid only now */
    __u32 size = pe->ring_size;
    __u32 zero = 0;
    struct overload *ov = 0;
    __u32 event = E_PRESSURE;
    if (!size) {
        /* not a table: the slow path places the flow, unless it is under pressure (or this CPU handed up its
         * share of new flows in this window already) and the port has a pressure table (wrr, wlc; the plan
         * gives none to stickytime ports, whose client affinity lives in the slow path's table, nor to a
         * plugin's selector, which only Python can run) */
        if (!pe->fallback)
            return -1;
        ov = bpf_map_lookup_elem(&overload, &zero);
        if (!ov)
            return -1;
        if (!ov->pressure) {
            if (!ov->handup_limit || !handup_limited(now, ov->handup_limit))
                return -1;
            event = E_HANDUP_LIMIT;
        }
        size = pe->fallback;
    }
    __u32 hash = flow_crc(fk->src, fk->dst, alen, fk->proto, l4);
    __u32 slot = pe->ring_base + hash % size;
    __u32 *sid = bpf_map_lookup_elem(&ring, &slot);
    if (!sid || *sid == NO_SERVER)
        return NO_SERVER;
    __u32 placed = *sid;
    if (ov)
        count_flow_event(event);
    /* a flow the table still holds (expired, or its server down or gone) is written again in its entry, which
     * takes no new one; the rules are for new entries */
    if (!fv) {
        /* only a SYN (without ACK) opens a TCP connection: anything else is forwarded but not remembered */
        if (fk->proto == IPPROTO_TCP &&
            ((const void *)(l4 + 14) > end || (l4[13] & (TCP_SYN | TCP_ACK)) != TCP_SYN)) {
            count_flow_event(E_NOT_SYN);
            return placed;
        }
        if (!ov)
            ov = bpf_map_lookup_elem(&overload, &zero);
        if (ov && ov->newflow_limit && newflow_limited(now, ov->newflow_limit)) {
            count_flow_event(E_RATE_LIMIT);
            return placed;
        }
    }
    struct flow_value nv = {.sid = placed, .seen_ns = now};
    if (!ov)
        ov = bpf_map_lookup_elem(&overload, &zero);
    if (ov && ov->publish)
        publish_flow(fk, &nv);
    bpf_map_update_elem(&flows, fk, &nv, BPF_ANY);
    return placed;
}

/* A GSO buffer's segment (encapfwd_ctx.h): its transport header (TCP's data offset; UDP 8 bytes) plus
 * gso_size; the caller adds the IP header. 0 when the buffer is not a GSO one (always on XDP). */
static __always_inline __u32 gso_segment(CTX *ctx, __u8 proto, const __u8 *l4)
{
    if (!GSO_SIZE(ctx))
        return 0;
    return (proto == IPPROTO_TCP ? (l4[12] >> 4) * 4 : 8) + GSO_SIZE(ctx);
}

/* Put the template in front of P' (which starts at offset 14 and is `plen` bytes long) and send it. */
static __always_inline int emit(CTX *ctx, struct server_entry *s, __u32 sid, __u32 plen, __u8 tos,
                                __u8 df, __u32 entropy)
{
    __u32 hlen = s->hdr_len;
    if (hlen > MAX_HDR || (hlen & 3))
        return pass(P_ERROR);
    if (hlen) {
        if (GSO_SIZE(ctx)) {
            /* the template's protocol says which tunnel: IPIP, GRE or UDP (GUE) */
            __u8 inner = s->hdr[9];
            __u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4;
            if (inner == IPPROTO_GRE)
                flags |= BPF_F_ADJ_ROOM_ENCAP_L4_GRE;
            else if (inner == IPPROTO_UDP)
                flags |= BPF_F_ADJ_ROOM_ENCAP_L4_UDP;
            if (GROW_HEAD_GSO(ctx, hlen, flags))
                return pass(P_ERROR);
        } else if (GROW_HEAD(ctx, hlen)) {
            return pass(P_ERROR);
        }
    }
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return V_ABORTED;
    /* both MACs in one 8-byte and one 4-byte store (dst and src are adjacent in the entry, as in the frame) */
    _Static_assert(__builtin_offsetof(struct server_entry, src) == 6, "server_entry: dst, then src");
    *(__u64 *)data = *(const __u64 *)s;
    *(__u32 *)(data + 8) = *(const __u32 *)((const __u8 *)s + 8);
    if (hlen) {
        eth->h_proto = bpf_htons(ETH_P_IP);
        /* the header in 8-byte words and, hlen being a multiple of 4, perhaps one last 4-byte word; hlen <=
         * MAX_HDR. The bound checked is 8 bytes even for that last word: P' (20 bytes at least) follows. */
        __u8 *to = (void *)(eth + 1);
        const __u8 *from = s->hdr;
        for (int i = 0; i < MAX_HDR; i += 8) {
            if (i + 4 > hlen)
                break;
            if ((void *)(to + i + 8) > end)
                return V_ABORTED;
            if (i + 8 <= hlen)
                *(__u64 *)(to + i) = *(const __u64 *)(from + i);
            else
                *(__u32 *)(to + i) = *(const __u32 *)(from + i);
        }
        if (s->fields & F_IPV4) {
            __u8 *ip = (void *)(eth + 1);
            if ((void *)(ip + 20) > end)
                return V_ABORTED;
            put_be16(ip + 2, hlen + plen);
            if (s->fields & F_TOS)
                ip[1] = tos;
            if (s->fields & F_DF)
                ip[6] = (ip[6] & ~0x40) | (df ? 0x40 : 0);
            if (s->fields & F_IDENT) {
                /* DF clear: the high half of the space is the program's (the Python engine numbers in the
                 * low half), each CPU its own residue class modulo NCPUS */
                __u16 id = 0;
                if (!(ip[6] & 0x40)) {
                    __u32 zero = 0;
                    __u32 *n = bpf_map_lookup_elem(&idents, &zero);
                    if (n) {
                        *n += 1;
                        id = 0x8000 | ((*n * NCPUS + bpf_get_smp_processor_id() % NCPUS) & 0x7FFF);
                    }
                }
                put_be16(ip + 4, id);
            }
            if (s->fields & (F_UDP | F_ENTROPY)) {
                if ((void *)(ip + 28) > end)
                    return V_ABORTED;
                if (s->fields & F_UDP) {
                    put_be16(ip + 24, hlen - 20 + plen); /* UDP length */
                    put_be16(ip + 26, 0);                /* UDP checksum: none */
                }
                if (s->fields & F_ENTROPY) {
                    put_be16(ip + 20, 0xC000 | (entropy & 0x3FFF));
                }
            }
            ipv4_set_checksum(ip);
        }
    }
    __u32 key = sid % MAX_SERVERS;
    struct counter *c = bpf_map_lookup_elem(&stats, &key);
    if (c) {
        c->packets += 1;
        c->bytes += plen;
    }
    return SEND(ctx);
}

static __always_inline struct server_entry *server_of(__u32 gen, __u32 sid)
{
    __u32 key = gen * MAX_SERVERS + (sid % MAX_SERVERS);
    return bpf_map_lookup_elem(&servers, &key);
}

static __always_inline struct port_entry *port_of(const __u8 *addr, __u32 alen, __be16 dport, __u8 proto,
                                                  __u32 gen)
{
    struct port_key pk = {};
    addr_copy(pk.addr, addr, alen);
    pk.port = dport;
    pk.proto = proto;
    pk.gen = gen;
    __u32 *idx = bpf_map_lookup_elem(&port_index, &pk);
    if (!idx) {
        pk.port = 0;
        idx = bpf_map_lookup_elem(&port_index, &pk);
        if (!idx)
            return 0;
    }
    return bpf_map_lookup_elem(&ports, idx);
}

/* The server entry for flow *fk* (the port's table on a miss); NULL with *verdict* set when the frame is
 * not forwarded here: a new flow of a port without a table or a server without a template goes up, a
 * port with no eligible server drops. */
static __always_inline struct server_entry *server_for(struct flow_key *fk, __u32 alen, const __u8 *l4,
                                                       const void *end, struct port_entry *pe, __u32 gen,
                                                       __u32 *sid, int *verdict)
{
    __s64 got = select_server(fk, pe, gen, alen, l4, end);
    struct server_entry *s = 0;
    if (got < 0)
        *verdict = pass(P_NEW_FLOW);
    else if (got == NO_SERVER)
        *verdict = drop(D_NO_SERVER);
    else if (!(s = server_of(gen, got)))
        *verdict = pass(P_ERROR);
    else if (!s->xdp)
        *verdict = pass(P_NO_TEMPLATE);
    else
        *sid = got;
    return s && s->xdp ? s : 0;
}

/* *group*: the frame came to a link-layer broadcast or multicast address. A router never forwards a unicast
 * packet received so (RFC 1812 5.3.4; Linux's ip_forward drops pkt_type != PACKET_HOST): such a frame for a
 * cluster address goes up untouched as not-for-us; anything else takes its usual way. */
static __always_inline int v4(CTX *ctx, __u32 gen, __u32 group)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    __u8 *ip = data + sizeof(struct ethhdr);
    if ((void *)(ip + 20) > end)
        return pass(P_MALFORMED);
    if (ip[0] != 0x45)
        return pass(ip[0] >> 4 == 4 && (ip[0] & 0xf) > 5 ? P_IP_OPTIONS : P_MALFORMED);
    __u32 n = FRAME_LEN(ctx, data, end); /* the whole frame's length (on TC, not only the linear part's) */
    __u32 tot = get_be16(ip + 2);
    if (tot < 20 || 14 + tot > n)
        return pass(P_MALFORMED);

    /* The common case first: a whole TCP/UDP datagram for a port of ours (one hash lookup). */
    __u8 proto = ip[9];
    __u8 *l4 = ip + 20;
    struct port_entry *pe = 0;
    if (!ipv4_fragment(ip) &&
        ((proto == IPPROTO_TCP && tot >= 20 + 14 && (void *)(l4 + 14) <= end) ||
         (proto == IPPROTO_UDP && tot >= 20 + 8 && (void *)(l4 + 8) <= end)))
        pe = port_of(ip + 16, 4, *(__be16 *)(l4 + 2), proto, gen);
    if (!pe) {
        /* everything else is decided in the reference's order: VIP, checksum, fragment, protocol,
         * truncation, port */
        struct vip_key vk = {.family = 4, .gen = gen};
        __builtin_memcpy(vk.addr, ip + 16, 4);
        if (!bpf_map_lookup_elem(&vips, &vk))
            return pass(P_NOT_OURS);
        if (group)
            return pass(P_NOT_FOR_US);
        if (!ipv4_checksum_ok(ip))
            return drop(D_BAD_CHECKSUM);
        if (ipv4_fragment(ip))
            return pass(P_FRAGMENT);
        if (proto == IPPROTO_TCP) {
            if (tot < 20 + 14 || (void *)(l4 + 14) > end)
                return drop(D_TRUNCATED);
        } else if (proto == IPPROTO_UDP) {
            if (tot < 20 + 8 || (void *)(l4 + 8) > end)
                return drop(D_TRUNCATED);
        } else {
            return pass(P_NOT_TCP_UDP);
        }
        return drop(D_NOT_PORT);
    }
    if (group)
        return pass(P_NOT_FOR_US);
    if (!ipv4_checksum_ok(ip))
        return drop(D_BAD_CHECKSUM);
    if ((void *)(l4 + 4) > end)
        return pass(P_ERROR);
    if (ip[8] <= 1)
        return pass(P_TTL);

    struct flow_key fk __attribute__((aligned(8))); /* flow_crc reads its addresses in 4-byte words */
    flow_key_fill(&fk, ip + 12, ip + 16, 4, proto, l4);
    __u32 sid;
    int verdict;
    struct server_entry *s = server_for(&fk, 4, l4, end, pe, gen, &sid, &verdict);
    if (!s)
        return verdict;
    __u32 seg = gso_segment(ctx, proto, l4);
    if (seg) {
        /* a GSO buffer: each segment must fit; encapsulated, its segments are made shorter by the tunnel's
         * length, so the outer packets are as long as the client's segments were */
        if (20 + seg > s->mtu || (proto != IPPROTO_TCP && s->hdr_len))
            return pass(P_TOO_BIG);
    } else if (s->hdr_len + tot > s->mtu) {
        return pass(P_TOO_BIG);
    }

    ipv4_dec_ttl(ip); /* P' */
    __u8 tos = ip[1];
    __u8 df = ip[6] & 0x40;
    __u32 entropy = s->fields & F_ENTROPY ? crc32(ip + 12, 8) : 0; /* zlib.crc32(src + dst) */
    if (n > 14 + tot) {
        if (TRIM(ctx, 14 + tot, n))
            return pass(P_ERROR);
    }
    return emit(ctx, s, sid, tot, tos, df, entropy);
}

static __always_inline int v6(CTX *ctx, __u32 gen, __u32 group)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    __u8 *ip = data + sizeof(struct ethhdr);
    if ((void *)(ip + 40) > end)
        return pass(P_MALFORMED);
    if (ip[0] >> 4 != 6)
        return pass(P_MALFORMED);
    __u32 n = FRAME_LEN(ctx, data, end); /* the whole frame's length (on TC, not only the linear part's) */
    __u32 plen = get_be16(ip + 4);
    if (plen == 0 || 54 + plen > n)
        return pass(P_MALFORMED);
    struct vip_key vk = {.family = 6, .gen = gen};
    __builtin_memcpy(vk.addr, ip + 24, 16);
    if (!bpf_map_lookup_elem(&vips, &vk))
        return pass(P_NOT_OURS);
    if (group)
        return pass(P_NOT_FOR_US);
    __u8 proto = ip[6];
    __u8 *l4 = ip + 40;
    if (proto == IPPROTO_TCP) {
        if (plen < 14)
            return drop(D_TRUNCATED);
        if ((void *)(l4 + 14) > end)
            return drop(D_TRUNCATED);
    } else if (proto == IPPROTO_UDP) {
        if (plen < 8)
            return drop(D_TRUNCATED);
        if ((void *)(l4 + 8) > end)
            return drop(D_TRUNCATED);
    } else {
        return pass(P_EXT_HEADER);
    }
    struct port_entry *pe = port_of(vk.addr, 16, *(__be16 *)(l4 + 2), proto, gen);
    if (!pe)
        return drop(D_NOT_PORT);
    if (ip[7] <= 1)
        return pass(P_TTL);
    struct flow_key fk __attribute__((aligned(8))); /* flow_crc reads its addresses in 4-byte words */
    flow_key_fill(&fk, ip + 8, ip + 24, 16, proto, l4);
    __u32 sid;
    int verdict;
    struct server_entry *s = server_for(&fk, 16, l4, end, pe, gen, &sid, &verdict);
    if (!s)
        return verdict;
    if (s->hdr_len)
        return pass(P_NO_TEMPLATE); /* IPv6 runs MAC forwarding only */
    __u32 seg = gso_segment(ctx, proto, l4); /* a GSO buffer: each of its segments must fit */
    if (40 + (seg ? seg : plen) > s->mtu)
        return pass(P_TOO_BIG);
    ip[7] -= 1;
    if (n > 54 + plen) {
        if (TRIM(ctx, 54 + plen, n))
            return pass(P_ERROR);
    }
    return emit(ctx, s, sid, 40 + plen, 0, 0, 0);
}

static __always_inline int frame(CTX *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return pass(P_MALFORMED);
    __u32 zero = 0;
    struct control *ctl = bpf_map_lookup_elem(&control, &zero);
    if (!ctl)
        return V_PASS;
    __u32 gen = ctl->gen & 1;
    /* the destination MAC first, as the kernel does (eth_type_trans): another host's unicast address goes
     * up untouched (the kernel drops it, a bridge or macvlan above this interface may want it) */
    __u32 group = eth->h_dest[0] & 1;
    struct host_entry *h = bpf_map_lookup_elem(&host, &gen);
    if (!group && h && h->check) {
        const __u8 *d = eth->h_dest;
        if ((*(const __u32 *)d ^ *(const __u32 *)h->mac) |
            (*(const __u16 *)(d + 4) ^ *(const __u16 *)(h->mac + 4)))
            return pass(P_NOT_FOR_US);
    }
    if (eth->h_proto == bpf_htons(ETH_P_IP))
        return v4(ctx, gen, group);
    if (eth->h_proto == bpf_htons(ETH_P_IPV6))
        return v6(ctx, gen, group);
    return pass(P_NOT_OURS);
}

SEC(ENTRY_SEC)
int ENTRY_NAME(CTX *ctx)
{
#ifdef ENCAPFWD_TC
    if (ctx->mark == SLOW_MARK) /* handed up by this program (below): for the workers and the stack */
        return TC_ACT_OK;
    int verdict;
    /* the program reads and writes the headers in place: a socket buffer whose first PULL_LEN bytes are not
     * all in its linear part (paged, GSO) has those made linear first; one that cannot goes up */
    __u32 want = ctx->protocol == bpf_htons(ETH_P_IP) ? PULL_LEN_V4 : PULL_LEN;
    if (ctx->len < want)
        want = ctx->len;
    if ((long)ctx->data_end - (long)ctx->data < (long)want && bpf_skb_pull_data(ctx, want))
        verdict = pass(P_ERROR);
    else
        verdict = frame(ctx);
    if (verdict != V_UP)
        return verdict;
    ctx->mark = SLOW_MARK;
    return bpf_redirect(ctx->ifindex, BPF_F_INGRESS);
#else
    return frame(ctx);
#endif
}

char LICENSE[] SEC("license") = "GPL";

#ifdef ENCAPFWD_BTF_CONSTANTS
/* Only in the build tests/test_xdp_btf.py makes (never loaded): the constants encapfwd.xdp.maps (and
 * encapfwd.xdp.tc) mirror, as the type of one variable, so that they are in the object's BTF. BTF carries
 * an enum only as part of a variable's type, and a number as an array's length (as __uint does). The
 * objects encapfwd loads are built without it: their instructions and maps stay as they are. */
struct btf_constants {
    enum drop_reason *drop_reason;
    enum pass_reason *pass_reason;
    enum template_field *template_field;
    enum flow_event *flow_event;
    struct flow_record flow_record; /* the new_flows ring's records (whole: a pointer would give only its name) */
    __uint(d_max, D_MAX);
    __uint(p_max, P_MAX);
    __uint(e_max, E_MAX);
    __uint(no_server, NO_SERVER);
    __uint(max_hdr, MAX_HDR);
    __uint(max_servers, MAX_SERVERS);
    __uint(max_ports, MAX_PORTS);
#ifdef ENCAPFWD_TC
    __uint(slow_mark, SLOW_MARK);
#endif
} btf_constants __attribute__((used));
#endif
