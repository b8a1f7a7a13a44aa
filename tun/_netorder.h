/* Network-order (big-endian) loads and stores, one byte at a time: no unaligned access, no byte-order or
 * architecture assumptions. Shared by the C extensions (tun/_gso_c.c, udpflannel/_lone.c). */
#ifndef UDPFLANNEL_NETORDER_H
#define UDPFLANNEL_NETORDER_H

#include <stdint.h>

static inline unsigned get16(const uint8_t *p) { return (unsigned)p[0] << 8 | p[1]; }

static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

#endif
