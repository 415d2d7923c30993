// SPDX-License-Identifier: GPL-2.0-only
/*
 * bench/live.py's traffic generator and return counter (built with encapfwd.xdp.build.build(abs path)).
 *
 * xdp_gen: run by BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES on the generator's veth end (g0).
 *   The kernel recycles the test run's pages with whatever the previous run left in them (our own frame,
 *   or the frame the peer turned around), so every run rewrites the WHOLE frame from the template in
 *   gen_config, then puts a per-run UDP source port in (base_port + seq % flows, seq a per-CPU counter:
 *   `flows` distinct flows). The port is not covered by the IPv4 header checksum and the UDP checksum is
 *   0, so the template's checksums stay right. XDP_TX: out of g0, into the dispatcher's interface.
 *   Paced (rate_pps > 0): a run sends only while the frames sent since start_ns are behind rate_pps (a
 *   token bucket holding at most `burst` frames), else it returns XDP_DROP at once. Each test-run call
 *   costs a fixed setup and teardown (tens of ms on these VMs), so a rate cannot come from many small
 *   calls with sleeps: one long call runs until user space interrupts it with a signal.
 *
 * xdp_count: attached to g0 (a veth end needs an XDP program for frames XDP_TX'd by its peer to arrive);
 *   counts the frames coming back whose destination MAC is count_mac (what the dispatcher forwarded) and
 *   the others apart, and drops everything.
 *
 * counts (per-CPU): [0] frames generated (sent), [1] frames back to count_mac, [2] other frames back,
 * [3] paced runs that sent nothing, [4] frames sent since the pacing started (reset by user space).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>

#define FRAME_LEN 64
#define UDP_SPORT_OFFSET (14 + 20) /* Ethernet + IPv4 header without options */

struct gen_config {
    __u8 frame[FRAME_LEN]; /* the frame, checksums filled in, UDP checksum 0 */
    __u32 flows;           /* distinct source ports (>= 1) */
    __u16 base_port;       /* first source port (host order) */
    __u8 count_mac[6];     /* destination MAC of the frames xdp_count counts as forwarded */
    __u64 rate_pps;        /* 0: every run sends */
    __u64 start_ns;        /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) when the pacing started */
    __u64 burst;           /* frames a paced generator may send at once to catch up */
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct gen_config);
} gen_config SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 5);
    __type(key, __u32);
    __type(value, __u64);
} counts SEC(".maps");

static __always_inline void bump(__u32 index)
{
    __u64 *n = bpf_map_lookup_elem(&counts, &index);
    if (n)
        *n += 1;
}

SEC("xdp")
int xdp_gen(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    __u32 zero = 0, paced_key = 4;
    if (data + FRAME_LEN > end)
        return XDP_ABORTED;
    struct gen_config *c = bpf_map_lookup_elem(&gen_config, &zero);
    __u64 *seq = bpf_map_lookup_elem(&counts, &zero);
    if (!c || !seq)
        return XDP_ABORTED;
    if (c->rate_pps) {
        __u64 *paced = bpf_map_lookup_elem(&counts, &paced_key);
        if (!paced)
            return XDP_ABORTED;
        __u64 due = (bpf_ktime_get_ns() - c->start_ns) * c->rate_pps / 1000000000ull;
        if (*paced >= due) {
            bump(3);
            return XDP_DROP;
        }
        if (due - *paced > c->burst) /* behind (preempted): do not make up more than a burst */
            *paced = due - c->burst;
        *paced += 1;
    }
    __builtin_memcpy(data, c->frame, FRAME_LEN);
    __u64 n = *seq;
    *seq = n + 1;
    __u32 flows = c->flows ? c->flows : 1;
    __u16 port = c->base_port + (__u16)(n % flows);
    __u8 *udp = data + UDP_SPORT_OFFSET;
    udp[0] = port >> 8;
    udp[1] = port & 0xff;
    return XDP_TX;
}

SEC("xdp")
int xdp_count(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    __u32 zero = 0;
    struct gen_config *c = bpf_map_lookup_elem(&gen_config, &zero);
    __u8 *dst = data;
    if (c && data + ETH_ALEN <= end && dst[0] == c->count_mac[0] && dst[1] == c->count_mac[1] &&
        dst[2] == c->count_mac[2] && dst[3] == c->count_mac[3] && dst[4] == c->count_mac[4] &&
        dst[5] == c->count_mac[5])
        bump(1);
    else
        bump(2);
    return XDP_DROP;
}

/* The redirect stage (--generator xdp-redirect): on the far end of a second veth pair that trafgen sends
 * into, every frame is redirected to g0 (stage_target[0]: its ifindex), whose peer f0 then receives it as an
 * XDP frame (veth's ndo_xdp_xmit), as from a NIC's driver; its socket buffer is gone on the stage's CPU. */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u32);
} stage_target SEC(".maps");

SEC("xdp")
int xdp_stage(struct xdp_md *ctx)
{
    __u32 zero = 0;
    __u32 *ifindex = bpf_map_lookup_elem(&stage_target, &zero);
    if (!ifindex || !*ifindex)
        return XDP_DROP;
    return bpf_redirect(*ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
