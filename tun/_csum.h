/* The Internet checksum's sum, shared by the C extensions (tun/_gso_c.c, udpflannel/_lone.c).
 *
 * be_sum(p, n) is the sum of p[0..n) as big-endian 16-bit words (an odd last byte is the high half of
 * a zero-padded word), returned folded to 16 bits: a value congruent to the plain sum mod 0xFFFF, and
 * 0 only for an all-zero input. That is all the callers use: they add sums, then take them mod 0xFFFF
 * (2**16 = 1 mod 0xFFFF).
 *
 * Why not one byte at a time in network order, as the headers are read: the sum is most of the cut's
 * and the GRO check's time (two passes over every byte of a bulk transfer). RFC 1071's byte-order
 * independence lets the loop add native 32-bit words instead (a 32-bit word is its two 16-bit halves
 * mod 0xFFFF), which the compiler turns into wide vector adds; one byte swap at the end turns a
 * little-endian host's sum into the network-order one. Loads go through memcpy: no alignment is
 * assumed, and nothing here depends on the architecture but the byte order, which is tested at run
 * time (a constant the compiler folds).
 */
#ifndef UDPFLANNEL_CSUM_H
#define UDPFLANNEL_CSUM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline int host_is_little_endian(void)
{
    const uint16_t one = 1;
    uint8_t first;
    memcpy(&first, &one, 1);
    return first == 1;
}

static uint64_t be_sum(const uint8_t *p, ptrdiff_t n)
{
    /* Two accumulators of 32-bit words: at most 2**29 words each below 2**64, so up to 4 GB, far more
     * than an IPv4 packet or a 64 KB table row. */
    uint64_t a = 0, b = 0;
    ptrdiff_t k = 0;
    for (; k + 8 <= n; k += 8) {
        uint32_t x, y;
        memcpy(&x, p + k, 4);
        memcpy(&y, p + k + 4, 4);
        a += x;
        b += y;
    }
    a += b;
    for (; k + 2 <= n; k += 2) {
        uint16_t x;
        memcpy(&x, p + k, 2);
        a += x;
    }
    if (k < n) { /* the odd last byte: the first byte of a zero-padded word, in either byte order */
        const uint8_t last[2] = {p[k], 0};
        uint16_t x;
        memcpy(&x, last, 2);
        a += x;
    }
    while (a >> 16) /* fold: 2**16 = 1 mod 0xFFFF */
        a = (a & 0xFFFF) + (a >> 16);
    if (host_is_little_endian()) /* a sum of byte-swapped words is the byte-swapped sum (RFC 1071) */
        a = (a & 0xFF) << 8 | a >> 8;
    return a;
}

#endif
