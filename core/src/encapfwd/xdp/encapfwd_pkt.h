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

/*
 * The IPv4 header checksum without a division and without byte swaps (issue #21: five 4-byte loads instead of
 * twenty 1-byte ones, and none of the up to four 32-bit divisions per frame). The header (IHL 5) is read as
 * five 32-bit words in host order and summed; since 2^16 = 1 (mod 0xFFFF), that sum is congruent modulo 0xFFFF
 * to the sum of the header's ten 16-bit words in host order, and a 16-bit word read in the other byte order
 * is 256 x its value (mod 0xFFFF), 256 being invertible modulo 0xFFFF. So "the sum of the big-endian words
 * is a multiple of 0xFFFF" (the reference's test) holds exactly when this sum is, and the checksum computed
 * in host order and stored in host order is the reference's big-endian one byte for byte (both are in
 * [0, 0xFFFE]: the reference never writes 0xFFFF). On a big-endian host the same code is the plain sum.
 */

/* *s* folded to [0, 0xFFFF], congruent modulo 0xFFFF (s < 2^35) */
static __always_inline __u32 csum_fold(__u64 s)
{
    s = (s & 0xFFFFFFFF) + (s >> 32); /* <= 2^32 + 6 */
    s = (s & 0xFFFF) + (s >> 16);     /* <= 0x1FFFF */
    s = (s & 0xFFFF) + (s >> 16);     /* <= 0x10000 */
    return (s & 0xFFFF) + (s >> 16);  /* <= 0xFFFF */
}

/* the IPv4 header (IHL 5) as the sum of its five 32-bit words in host order */
static __always_inline __u64 ipv4_sum(const __u8 *ip)
{
    const __u32 *w = (const __u32 *)ip;
    return (__u64)w[0] + w[1] + w[2] + w[3] + w[4];
}

/* The reference's test: the IPv4 header (IHL 5) read as one number is a multiple of 0xFFFF. */
static __always_inline int ipv4_checksum_ok(const __u8 *ip)
{
    __u32 r = csum_fold(ipv4_sum(ip));
    return r == 0 || r == 0xFFFF;
}

/* Write the header checksum of the IPv4 header (IHL 5) at *ip*, as the reference computes it:
 * (0xFFFF - sum % 0xFFFF) % 0xFFFF of the header with a zero checksum. */
static __always_inline void ipv4_set_checksum(__u8 *ip)
{
    *(__u16 *)(ip + 10) = 0;
    __u32 ck = 0xFFFF - csum_fold(ipv4_sum(ip));
    *(__u16 *)(ip + 10) = ck == 0xFFFF ? 0 : ck;
}

/* TTL - 1, the checksum by RFC 1624 eqn. 3 as the reference computes it: (HC - 0xFEFF) mod 0xFFFF, i.e.
 * (HC + 0x100) mod 0xFFFF, which is below 2 x 0xFFFF */
static __always_inline void ipv4_dec_ttl(__u8 *ip)
{
    __u32 ck = get_be16(ip + 10) + 0x100;
    if (ck >= 0xFFFF)
        ck -= 0xFFFF;
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

/* zlib.crc32's running value *c* over the 4 bytes at *p*, in one step (slicing by 4: four independent table
 * reads instead of four dependent ones; issue #21) */
static __always_inline __u32 crc_word(__u32 c, const __u8 *p)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    c ^= *(const __u32 *)p;
#else
    c ^= p[0] | ((__u32)p[1] << 8) | ((__u32)p[2] << 16) | ((__u32)p[3] << 24);
#endif
    return crc32_table3[c & 0xff] ^ crc32_table2[(c >> 8) & 0xff] ^ crc32_table1[(c >> 16) & 0xff] ^
           crc32_table[c >> 24];
}

/* zlib.crc32's running value *c* over the first *n* bytes at *p* (n <= 16, a multiple of 4; on the stack, *p*
 * must be 4-byte aligned: the verifier wants aligned stack reads) */
static __always_inline __u32 crc_bytes(__u32 c, const __u8 *p, __u32 n)
{
#pragma unroll
    for (__u32 i = 0; i < 16; i += 4) {
        if (i >= n)
            break;
        c = crc_word(c, p + i);
    }
    return c;
}

/* zlib.crc32 of the *n* bytes at *p* (n <= 16, a multiple of 4) */
static __always_inline __u32 crc32(const __u8 *p, __u32 n)
{
    return crc_bytes(0xFFFFFFFF, p, n) ^ 0xFFFFFFFF;
}

#endif
