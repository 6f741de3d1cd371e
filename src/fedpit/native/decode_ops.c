/* The element-wise work of a bf16 decode step, one call each where torch spends 7 or 8 operations (and a
 * Python-level dispatch per operation) on a few thousand numbers: see kernels.py for why.
 *
 * Each function rounds where torch's bf16 operations round: every product or sum of two bf16 tensors is
 * computed in fp32 and rounded to bf16, and RMSNorm is computed in fp32 and rounded once before its
 * weight, as transformers' Llama/Mistral/Qwen2 RMSNorm does. So `rotary` and the residual sum are bitwise
 * torch's; RMSNorm's mean of squares and SiLU's exponential can differ from torch's in the last fp32 bit,
 * which changes a bf16 result only where it lies on a rounding boundary.
 *
 * One decode step has a handful of rows: the loops run on the calling thread.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

/* For each of `rows` rows of `dim`: hidden += delta (a bf16 sum; skipped when delta is NULL), then
 * out = weight * bf16(hidden * 1/sqrt(mean(hidden^2) + eps)). */
void add_rms_norm(uint16_t *hidden, const uint16_t *delta, const uint16_t *weight, uint16_t *out, int64_t rows,
                  int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *h = hidden + r * dim;
        if (delta != NULL) {
            const uint16_t *d = delta + r * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) h[i] = to_bf16(from_bf16(h[i]) + from_bf16(d[i]));
        }
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < dim; i++) {
            const float x = from_bf16(h[i]);
            squares += x * x;
        }
        const float inverse = 1.0f / sqrtf(squares / (float)dim + eps);
        uint16_t *o = out + r * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++)
            o[i] = to_bf16(from_bf16(weight[i]) * from_bf16(to_bf16(from_bf16(h[i]) * inverse)));
    }
}

/* Rotary embedding of one token a row. qkv [rows, row_stride] starts with `heads_q` query heads then
 * `heads_k` key heads of `dim` each; cos, sin [rows, dim]. Writes q [rows, heads_q, dim] and
 * k [rows, heads_k, dim]: x*cos + rotate_half(x)*sin, rotate_half(x) = (-x[dim/2:], x[:dim/2]). */
void rotary(const uint16_t *qkv, int64_t row_stride, const uint16_t *cos, const uint16_t *sin, uint16_t *q,
            uint16_t *k, int64_t rows, int64_t heads_q, int64_t heads_k, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *c = cos + r * dim, *s = sin + r * dim;
        for (int64_t h = 0; h < heads_q + heads_k; h++) {
            const uint16_t *x = qkv + r * row_stride + h * dim;
            uint16_t *o = h < heads_q ? q + (r * heads_q + h) * dim : k + (r * heads_k + h - heads_q) * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) {
                const float rotated = i < half ? -from_bf16(x[i + half]) : from_bf16(x[i - half]);
                const float straight = from_bf16(to_bf16(from_bf16(x[i]) * from_bf16(c[i])));
                const float turned = from_bf16(to_bf16(rotated * from_bf16(s[i])));
                o[i] = to_bf16(straight + turned);
            }
        }
    }
}

/* The gated MLP's activation: gate_up [rows, 2 * inner] holds gate then up; out [rows, inner] =
 * bf16(silu(gate)) * up. silu(x) = x / (1 + e^-x), written with e^-|x| so the exponential never overflows. */
void silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inner) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * 2 * inner, *up = gate + inner;
        uint16_t *o = out + r * inner;
#pragma omp simd
        for (int64_t i = 0; i < inner; i++) {
            const float x = from_bf16(gate[i]);
            const float e = exp_nonpositive(x > 0.0f ? -x : x);
            const float silu = x > 0.0f ? x / (1.0f + e) : x * e / (1.0f + e);
            o[i] = to_bf16(from_bf16(to_bf16(silu)) * from_bf16(up[i]));
        }
    }
}
