/* The element-wise work of a bf16 decode step, one call each where torch spends 7 or 8 operations (and a
 * Python-level dispatch per operation) on a few thousand numbers: see kernels.py for why.
 *
 * Each function rounds where torch's bf16 operations round: every product or sum of two bf16 tensors is
 * computed in fp32 and rounded to bf16, and RMSNorm is computed in fp32 and rounded once before its
 * weight, as transformers' Llama/Mistral/Qwen2 RMSNorm does. So `rotary` and the residual sum are bitwise
 * torch's; RMSNorm's mean of squares and SiLU's exponential can differ from torch's in the last fp32 bit,
 * which changes a bf16 result only where it lies on a rounding boundary.
 *
 * One decode step has a handful of rows: its loops run on the calling thread. A prefill's many rows (its
 * tokens) are shared among threads, by the functions named for them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "kernels.h"

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

/* bf16(silu(gate)) * up over `inner` elements. silu(x) = x / (1 + e^-x), written with e^-|x| so the
 * exponential never overflows. */
static inline __attribute__((always_inline)) void silu_times(const uint16_t *gate, const uint16_t *up, uint16_t *out,
                                                             int64_t inner) {
#pragma omp simd
    for (int64_t i = 0; i < inner; i++) {
        const float x = from_bf16(gate[i]);
        const float e = exp_nonpositive(x > 0.0f ? -x : x);
        const float silu = x > 0.0f ? x / (1.0f + e) : x * e / (1.0f + e);
        out[i] = to_bf16(from_bf16(to_bf16(silu)) * from_bf16(up[i]));
    }
}

/* The gated MLP's activation: gate_up [rows, 2 * inner] holds gate then up; out [rows, inner]. */
void silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inner) {
    for (int64_t r = 0; r < rows; r++) silu_times(gate_up + r * 2 * inner, gate_up + r * 2 * inner + inner,
                                                  out + r * inner, inner);
}

/* The same for a prefill's many rows, gate and up [rows, inner] apart: rows shared among torch's OpenMP
 * threads. */
void silu_mul_pair(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t rows, int64_t inner) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) silu_times(gate + r * inner, up + r * inner, out + r * inner, inner);
}

/* RMSNorm (as in `add_rms_norm`, without the residual) of a prefill's many rows, shared among torch's OpenMP
 * threads. */
void rms_norm_rows(const uint16_t *hidden, const uint16_t *weight, uint16_t *out, int64_t rows, int64_t dim,
                   float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        add_rms_norm((uint16_t *)hidden + r * dim, NULL, weight, out + r * dim, 1, dim, eps);
}

/* The softmax of a bf16 prefill's attention scores, in place: the q·k scores of `rows` (query heads and
 * queries) against `keys` keys, as torch's matmul rounded them to bf16, become bf16 weights. Row r is query
 * r % length of batch item r / per_item (rows run [item, head, query]). A key is attended where
 * mask[item * mask_item + query * mask_query + key] is nonzero, or with no mask where key <= offset + query
 * (causal, the queries being the last of the keys). As `attention.matmul_attention` computes it: fp32
 * score * scale, masked keys at fp32's lowest value, exp(x - max) / sum; so a row with no attended key gets
 * the same weight on every key, as torch's softmax gives it. Rows are shared among torch's OpenMP threads. */
static inline __attribute__((always_inline)) void softmax_row(uint16_t *s, const uint8_t *attended,
                                                              const int masked, int64_t end, int64_t keys,
                                                              float scale, float *buffer) {
    const float lowest = -3.0e38f;
    float top = lowest;
#pragma omp simd reduction(max : top)
    for (int64_t t = 0; t < end; t++) {
        const float x = masked && !attended[t] ? lowest : from_bf16(s[t]) * scale;
        top = x > top ? x : top;
    }
    if (top == lowest) { /* nothing attended */
        const uint16_t even = to_bf16(1.0f / (float)keys);
        for (int64_t t = 0; t < keys; t++) s[t] = even;
        return;
    }
    float sum = 0.0f, *e = buffer;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < end; t++) {
        e[t] = masked && !attended[t] ? 0.0f : exp_nonpositive(from_bf16(s[t]) * scale - top);
        sum += e[t];
    }
    const float inverse = 1.0f / sum;
#pragma omp simd
    for (int64_t t = 0; t < end; t++) s[t] = to_bf16(e[t] * inverse);
    for (int64_t t = end; t < keys; t++) s[t] = 0;
}

int masked_softmax(uint16_t *scores, const uint8_t *mask, int64_t rows, int64_t per_item, int64_t length,
                   int64_t keys, int64_t mask_item, int64_t mask_query, int64_t offset, float scale) {
    int failed = 0;
#pragma omp parallel
    { /* the region's block: each thread's buffer lives for its share of the rows */
    float *buffer = malloc(sizeof(float) * (size_t)keys); /* one row's exponentials, per thread */
    if (buffer == NULL) {
#pragma omp atomic write
        failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        if (buffer == NULL) continue;
        const int64_t query = r % length;
        uint16_t *s = scores + r * keys;
        if (mask == NULL) {
            const int64_t end = offset + query + 1 < keys ? offset + query + 1 : keys;
            softmax_row(s, NULL, 0, end, keys, scale, buffer);
        } else {
            softmax_row(s, mask + (r / per_item) * mask_item + query * mask_query, 1, keys, keys, scale, buffer);
        }
    }
    free(buffer);
    }
    return failed ? -1 : 0;
}
