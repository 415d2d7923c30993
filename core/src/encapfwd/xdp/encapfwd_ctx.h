/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The context-specific parts of encapfwd's kernel data plane, so one C program (encapfwd.bpf.c) runs as
 * either executor of the plan:
 *
 * - XDP (the default): frames as XDP buffers, at the driver (native) or after the skb is built (generic);
 *   forwarded with XDP_TX, handed up with XDP_PASS.
 * - TC (built with -DENCAPFWD_TC, encapfwd_tc.bpf.c): frames as socket buffers at tc ingress (tcx or a
 *   clsact qdisc's cls_bpf); encapsulation with bpf_skb_change_head (room in front, as on XDP), out with
 *   bpf_redirect to the same interface's egress (TC_ACT_REDIRECT), handed up with TC_ACT_OK. Where frames
 *   arrive as socket buffers (veth, containers) this saves the skb -> XDP buffer copy native XDP does on a
 *   veth, and generic XDP's extra work.
 *
 * Everything else (parsing, the MAC check, lookups, flow table, Maglev, templates, counters) is shared.
 */
#ifndef ENCAPFWD_CTX_H
#define ENCAPFWD_CTX_H

#ifdef ENCAPFWD_TC
#include <linux/pkt_cls.h>

#define CTX struct __sk_buff
#define V_PASS TC_ACT_OK
#define V_DROP TC_ACT_SHOT
#define V_ABORTED TC_ACT_SHOT
/* *hlen* bytes of room in front of the frame, as bpf_xdp_adjust_head gives: the program then writes the
 * Ethernet header and the template over the first 14 + hlen bytes, and the IP packet stays where it was.
 * bpf_skb_change_head (push + zero the room; the MAC header starts at the new front, the network header
 * stays on the inner packet) costs far less than bpf_skb_adjust_room at the MAC layer, which also moves the
 * Ethernet header and checks and adjusts protocol, GSO and network-header state (issue #21). */
#define GROW_HEAD(ctx, hlen) bpf_skb_change_head((ctx), (hlen), 0)
/* A GSO socket buffer: several TCP segments of one flow in one buffer, made by GRO on a NIC, or by a
 * sender's TSO when frames come over a veth (a host's bridge hands a container the buffers its NIC's GRO
 * made). Forwarded whole, the egress segments it (or its NIC does); the MTU applies to each segment, its
 * headers + gso_size. Encapsulated, the kernel must know the tunnel (gso_type, inner headers) to segment it
 * right: bpf_skb_adjust_room with the ENCAP flags, which also lowers gso_size by the tunnel's length, so
 * that each outer packet is as long as the segment was. XDP never sees one. */
#define GSO_SIZE(ctx) ((ctx)->gso_size)
#define GROW_HEAD_GSO(ctx, hlen, flags) bpf_skb_adjust_room((ctx), (hlen), BPF_ADJ_ROOM_MAC, (flags))
/* cut the frame (n bytes) to *len* bytes: Ethernet padding */
#define TRIM(ctx, len, n) bpf_skb_change_tail((ctx), (len), 0)
/* The bytes the program reads and writes in place, at most: Ethernet + IPv6 + 14 bytes of TCP (IPv4: fewer).
 * A socket buffer that carries them in its pages (a packet socket's TX ring keeps only the Ethernet header
 * linear, TCP its payload) has these, and no more, made linear (bpf_skb_pull_data of the whole frame copied
 * it all, often into a reallocated head); the frame's length is then the socket buffer's, not the linear
 * part's. */
#define PULL_LEN (14 + 40 + 14)
/* IPv4 (no options: a header with options goes up): Ethernet + 20 + 14 bytes of TCP (UDP: 8). Pulling only
 * these leaves the rest of a short frame in its page: pulling a whole 64-byte frame out of a packet socket's
 * page (trafgen) also released that page here, 8 % of the forwarding CPU in a profile. */
#define PULL_LEN_V4 (14 + 20 + 14)
#define FRAME_LEN(ctx, data, end) ((ctx)->len)
/* out of the interface the frame came in by */
#define SEND(ctx) bpf_redirect((ctx)->ifindex, 0)
#define ENTRY_SEC "tc"
#define ENTRY_NAME encapfwd_tc
/* Up to the slow path (the AF_PACKET workers). Packet sockets bound to every protocol (ETH_P_ALL) see a
 * frame before tc ingress runs, so TC_ACT_OK alone would let the workers forward every frame the program
 * forwards as well. The program therefore marks a frame it hands up to the slow path and redirects it to
 * the interface's own ingress (the backlog): the workers' socket filter takes cluster frames only with
 * this mark, and the program lets a marked frame through at once (TC_ACT_OK). Frames that are not the
 * slow path's (not a cluster address, not sent to this dispatcher) go up untouched, unmarked. */
#define SLOW_MARK 0xEF510000u
#define V_UP 0x7E /* internal: pass() -> the entry point marks and re-injects */

#else /* XDP */

#define CTX struct xdp_md
#define V_PASS XDP_PASS
#define V_DROP XDP_DROP
#define V_ABORTED XDP_ABORTED
#define GROW_HEAD(ctx, hlen) bpf_xdp_adjust_head((ctx), -(int)(hlen))
#define GSO_SIZE(ctx) 0
#define GROW_HEAD_GSO(ctx, hlen, flags) ((void)(flags), GROW_HEAD((ctx), (hlen)))
#define TRIM(ctx, len, n) bpf_xdp_adjust_tail((ctx), (int)(len) - (int)(n))
#define FRAME_LEN(ctx, data, end) ((__u32)((end) - (data)))
#define SEND(ctx) XDP_TX
#define V_UP XDP_PASS
#define ENTRY_SEC "xdp"
#define ENTRY_NAME encapfwd_xdp

#endif
#endif
