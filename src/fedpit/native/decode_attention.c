/* One decode step's attention for bf16 key/value caches on a CPU: see kernels.py for why.
 *
 * For every (row, key/value head), the `group` query heads that share that key/value head are computed
 * together, so each cached key and value is read once per step, not once per query head. Scores, softmax
 * and the weighted sum of values are in fp32; the output is rounded to bf16 once, at the end. Keys are
 * taken four at a time so that the dot products form independent chains the compiler keeps in separate
 * vector registers. Masked positions get a weight of exactly zero.
 *
 * Built at first use with decode_ops.c into one library (build.py says how and with which flags).
 */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#define MAX_DIM 256
#define MAX_GROUP 16
#define KEYS 4 /* keys per block of the dot products */

/* Rows t .. t+KEYS-1 of a [keys, dim] bf16 slice (stride `step`) as fp32; past the last key (`n` of them
 * remain), the first row again, which its zero weight or unused score leaves out of the result. */
static inline __attribute__((always_inline)) void load_block(float block[KEYS][MAX_DIM], const uint16_t *rows,
                                                             int64_t t, int64_t n, int64_t step, const int64_t dim) {
    for (int64_t j = 0; j < KEYS; j++) {
        const uint16_t *source = rows + (t + (j < n ? j : 0)) * step;
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) block[j][d] = from_bf16(source[d]);
    }
}

/* One (row, key/value head): `dim` is a compile-time constant where the caller passes one, which lets the
 * compiler unroll the head dimension into whole vector registers. Returns 0, or -1 without memory. */
static inline __attribute__((always_inline)) int attend(
    const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out, int64_t item,
    int64_t kv_heads, int64_t group, int64_t keys, const int64_t dim, int64_t k_row, int64_t k_head, int64_t k_key,
    int64_t v_row, int64_t v_head, int64_t v_key, int64_t mask_row, float scale) {
    const int64_t row = item / kv_heads, head = item % kv_heads;
    float query[MAX_GROUP][MAX_DIM], acc[MAX_GROUP][MAX_DIM], block[KEYS][MAX_DIM];
    float *weights = malloc(sizeof(float) * (size_t)(group * keys));
    if (weights == NULL) return -1;
    const uint16_t *q_item = q + item * group * dim;
    for (int64_t g = 0; g < group; g++)
        for (int64_t d = 0; d < dim; d++) {
            query[g][d] = from_bf16(q_item[g * dim + d]) * scale;
            acc[g][d] = 0.0f;
        }
    const uint16_t *k_item = k + row * k_row + head * k_head, *v_item = v + row * v_row + head * v_head;
    const uint8_t *attended = mask + row * mask_row;

    for (int64_t t = 0; t < keys; t += KEYS) { /* scores: q·k for four keys at a time */
        const int64_t n = keys - t < KEYS ? keys - t : KEYS;
        load_block(block, k_item, t, n, k_key, dim);
        for (int64_t g = 0; g < group; g++) {
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t d = 0; d < dim; d++) {
                const float x = query[g][d];
                s0 += x * block[0][d];
                s1 += x * block[1][d];
                s2 += x * block[2][d];
                s3 += x * block[3][d];
            }
            const float s[KEYS] = {s0, s1, s2, s3};
            for (int64_t j = 0; j < n; j++) weights[g * keys + t + j] = s[j];
        }
    }

    float total[MAX_GROUP];
    for (int64_t g = 0; g < group; g++) { /* softmax over the attended keys */
        float *w = weights + g * keys, top = -3.0e38f, sum = 0.0f;
        for (int64_t t = 0; t < keys; t++)
            if (attended[t] && w[t] > top) top = w[t];
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < keys; t++) {
            const float e = attended[t] ? exp_nonpositive(w[t] - top) : 0.0f;
            w[t] = e;
            sum += e;
        }
        total[g] = sum;
    }

    for (int64_t t = 0; t < keys; t += KEYS) { /* the weighted sum of values, four keys at a time */
        const int64_t n = keys - t < KEYS ? keys - t : KEYS;
        load_block(block, v_item, t, n, v_key, dim);
        for (int64_t g = 0; g < group; g++) {
            const float *w = weights + g * keys + t;
            const float p0 = w[0], p1 = n > 1 ? w[1] : 0.0f, p2 = n > 2 ? w[2] : 0.0f, p3 = n > 3 ? w[3] : 0.0f;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++)
                acc[g][d] += p0 * block[0][d] + p1 * block[1][d] + p2 * block[2][d] + p3 * block[3][d];
        }
    }

    uint16_t *out_item = out + item * group * dim;
    for (int64_t g = 0; g < group; g++) {
        const float inverse = total[g] > 0.0f ? 1.0f / total[g] : 0.0f; /* no attended key: zeros, as SDPA */
        for (int64_t d = 0; d < dim; d++) out_item[g * dim + d] = to_bf16(acc[g][d] * inverse);
    }
    free(weights);
    return 0;
}

/* q, out: [rows, kv_heads, group, dim] contiguous; k, v: [rows, kv_heads, keys, dim] with the given
 * strides (in elements; the last dimension contiguous); mask: [rows, keys] bytes, nonzero = attended,
 * row stride `mask_row`. Returns 0, or -1 if the sizes exceed what the kernel was built for. */
int decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out,
                     int64_t rows, int64_t kv_heads, int64_t group, int64_t keys, int64_t dim,
                     int64_t k_row, int64_t k_head, int64_t k_key, int64_t v_row, int64_t v_head, int64_t v_key,
                     int64_t mask_row, float scale) {
    if (dim > MAX_DIM || group > MAX_GROUP || dim < 1 || group < 1 || keys < 1) return -1;
    int failed = 0;
#define ATTEND(DIM) attend(q, k, v, mask, out, item, kv_heads, group, keys, DIM, k_row, k_head, k_key, \
                          v_row, v_head, v_key, mask_row, scale)
#pragma omp parallel for schedule(static)
    for (int64_t item = 0; item < rows * kv_heads; item++) {
        const int status = dim == 64 ? ATTEND(64) : dim == 128 ? ATTEND(128) : ATTEND(dim);
        if (status != 0) {
#pragma omp atomic write
            failed = 1;
        }
    }
#undef ATTEND
    return failed ? -1 : 0;
}
