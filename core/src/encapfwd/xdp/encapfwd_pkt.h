/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The byte-level helpers of encapfwd.bpf.c: big-endian 16-bit fields, the IPv4 header checksum (checked,
 * written, updated for TTL - 1) and CRC-32 (zlib.crc32, as the Python dispatcher hashes). Functions of bytes
 * the caller has bounds-checked; always inlined, so the verifier sees each use with its own constant
 * offsets and lengths.
 */
#ifndef ENCAPFWD_PKT_H
#define ENCAPFWD_PKT_H

#include "crc32_table.h"

/* the big-endian 16-bit number at *p* */
static __always_inline __u32 get_be16(const __u8 *p)
{
    return ((__u32)p[0] << 8) | p[1];
}

/* write the low 16 bits of *v* at *p*, big-endian */
static __always_inline void put_be16(__u8 *p, __u32 v)
{
    p[0] = v >> 8;
    p[1] = v & 0xff;
}

/* *n* bytes (4: IPv4, else 16: IPv6) of an address from *from* to *to* (a constant-size copy each) */
static __always_inline void addr_copy(__u8 *to, const __u8 *from, __u32 n)
{
    if (n == 4)
        __builtin_memcpy(to, from, 4);
    else
        __builtin_memcpy(to, from, 16);
}

/* the IPv4 header (IHL 5) as the sum of its ten 16-bit words */
static __always_inline __u32 ipv4_sum(const __u8 *ip)
{
    __u32 sum = 0;
#pragma unroll
    for (int i = 0; i < 20; i += 2)
        sum += get_be16(ip + i);
    return sum;
}

/* The reference's test: the IPv4 header (IHL 5) read as one number is a multiple of 0xFFFF. */
static __always_inline int ipv4_checksum_ok(const __u8 *ip)
{
    return ipv4_sum(ip) % 0xFFFF == 0;
}

/* Write the header checksum of the IPv4 header (IHL 5) at *ip*, as the reference computes it. */
static __always_inline void ipv4_set_checksum(__u8 *ip)
{
    put_be16(ip + 10, 0);
    __u32 sum = ipv4_sum(ip);
    put_be16(ip + 10, (0xFFFF - sum % 0xFFFF) % 0xFFFF);
}

/* TTL - 1, the checksum by RFC 1624 eqn. 3 as the reference computes it: (HC - 0xFEFF) mod 0xFFFF */
static __always_inline void ipv4_dec_ttl(__u8 *ip)
{
    __u32 ck = (get_be16(ip + 10) + 0x100) % 0xFFFF;
    ip[8] -= 1;
    put_be16(ip + 10, ck);
}

/* a fragment: More Fragments set or a fragment offset */
static __always_inline int ipv4_fragment(const __u8 *ip)
{
    return (ip[6] & 0x3F) || ip[7];
}

static __always_inline __u32 crc_byte(__u32 c, __u8 b)
{
    return crc32_table[(c ^ b) & 0xff] ^ (c >> 8);
}

/* zlib.crc32's running value *c* over the first *n* bytes at *p* (n <= 16) */
static __always_inline __u32 crc_bytes(__u32 c, const __u8 *p, __u32 n)
{
#pragma unroll
    for (__u32 i = 0; i < 16; i++) {
        if (i >= n)
            break;
        c = crc_byte(c, p[i]);
    }
    return c;
}

/* zlib.crc32 of the *n* bytes at *p* (n <= 16) */
static __always_inline __u32 crc32(const __u8 *p, __u32 n)
{
    return crc_bytes(0xFFFFFFFF, p, n) ^ 0xFFFFFFFF;
}

#endif
