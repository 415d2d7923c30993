// SPDX-License-Identifier: GPL-2.0
/* Test fixture for encapfwd.xdp.libbpf (not part of the data plane).
 *
 * xdp_echo: IPv4 frames get their Ethernet addresses swapped and go back out (XDP_TX); when config.prepend
 * is set they first get 4 bytes in front: htons(config.tag), htons(inner[0]) where inner is the map in slot
 * 0 of `outer` (0 when the slot is empty), whose slot 1 counts the frames that read it. Other frames:
 * XDP_PASS. Counts into the per-CPU `counters`.
 * xdp_count_pass: counts into counters[ECHO_CNT_SEEN] and passes (a veth peer's pass-through).
 * `table` is not used by the programs: it is the batch-update test's 65,537-slot array.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "echo.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ECHO_NCOUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct echo_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ECHO_TABLE_SIZE);
	__type(key, __u32);
	__type(value, __u32);
} table SEC(".maps");

struct inner_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} inner0 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct inner_map);
} outer SEC(".maps") = {
	.values = { [0] = &inner0 },
};

static __always_inline void count(__u32 index)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &index);

	if (value)
		*value += 1;   /* per-CPU: no other CPU writes this slot */
}

SEC("xdp")
int xdp_echo(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	unsigned char mac[ETH_ALEN];
	struct echo_config *cfg;
	__u32 zero = 0, one = 1, inner_value = 0, tag;
	__u32 *slot, *hits;
	void *inner;
	__u16 *word;

	count(ECHO_CNT_PACKETS);
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP)) {
		count(ECHO_CNT_PASS);
		return XDP_PASS;
	}
	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (cfg && cfg->prepend) {
		tag = cfg->tag;
		inner = bpf_map_lookup_elem(&outer, &zero);
		if (inner) {
			slot = bpf_map_lookup_elem(inner, &zero);
			if (slot)
				inner_value = *slot;
			hits = bpf_map_lookup_elem(inner, &one);
			if (hits)
				__sync_fetch_and_add(hits, 1);
		}
		if (bpf_xdp_adjust_head(ctx, -ECHO_PREPEND))
			return XDP_ABORTED;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if (data + ECHO_PREPEND > data_end)
			return XDP_ABORTED;
		word = data;
		word[0] = bpf_htons((__u16)tag);
		word[1] = bpf_htons((__u16)inner_value);
	}
	count(ECHO_CNT_TX);
	return XDP_TX;
}

SEC("xdp")
int xdp_count_pass(struct xdp_md *ctx)
{
	count(ECHO_CNT_SEEN);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
