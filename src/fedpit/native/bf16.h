/* bf16 <-> fp32 and a vectorisable exponential, shared by the decode kernels.
 *
 * The kernels are built with `cc -O3 -march=native -fopenmp -fassociative-math` (build.py). Not -ffast-math:
 * a shared library built with it switches the whole process to flush-to-zero arithmetic. The library links
 * libgomp by its soname, which binds to the copy torch has already loaded, so it shares torch's OpenMP
 * threads and thread count.
 */
#ifndef FEDPIT_BF16_H
#define FEDPIT_BF16_H

#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint16_t to_bf16(float value) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* e^x for x <= 0 (the softmax's shifted scores), written so that the compiler vectorises it: glibc's expf
 * is vectorised only under -ffast-math. 2^n * e^r with |r| <= ln2/2 and Cephes' polynomial for e^r:
 * relative error ~2e-7, below the bf16 output's rounding. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = __builtin_roundf(x * 1.44269504088896341f);
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t scale_bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return p * scale;
}

#endif
