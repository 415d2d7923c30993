// SPDX-License-Identifier: GPL-2.0-only
/*
 * Pass every frame: the program the far end of a veth needs so that frames another program sends with
 * XDP_TX arrive (veth delivers XDP_TX frames only to a peer that runs XDP; see ../shared/xdp-notes.md).
 * encapfwd's lab and benchmarks attach it with `ip link set dev PEER xdpdrv obj FILE sec xdp`.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
    return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
