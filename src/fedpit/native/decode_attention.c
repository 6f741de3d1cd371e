/* One decode step's attention for bf16 key/value caches on a CPU: see kernels.py for why.
 *
 * For every (row, key/value head), the `group` query heads that share that key/value head are computed
 * together, so each cached key and value is read once per step, not once per query head. Scores, softmax
 * and the weighted sum of values are in fp32; the output is rounded to bf16 once, at the end. Keys are
 * taken four at a time so that the dot products form independent chains the compiler keeps in separate
 * vector registers. Masked positions get a weight of exactly zero.
 *
 * Where the compiler targets AVX512-BF16, head sizes 64 and 128 with few query heads per key/value head (the
 * group's fp32 sums fit in registers) take `attend_bf16` instead: q·k with `vdpbf16ps` on the bf16 keys as
 * stored, sixteen keys at a time, their sixteen sums reduced together; values as above, in registers.
 *
 * Built at first use with decode_ops.c into one library (build.py says how and with which flags).
 */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "kernels.h"

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

/* Each of `group` rows of `keys` scores in `weights` becomes exp(score - max) over the attended keys (0 for the
 * others), its sum in total[g]. */
static inline void softmax(float *weights, const uint8_t *attended, int64_t group, int64_t keys, float *total) {
    for (int64_t g = 0; g < group; g++) {
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
    softmax(weights, attended, group, keys, total);

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

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define FAST_PATH 1

/* The 16 vectors p[0..15] summed across their lanes, p[j]'s sum in lane j: pairs of vectors interleaved and
 * added, four times (45 shuffles and additions where sixteen separate horizontal sums take about 130). */
static inline __attribute__((always_inline)) __m512 sum_lanes16(const __m512 *p) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* `attend` for head sizes of whole 32-element vectors and G query heads a key/value head (G * DIM <= 256,
 * constants at each call): q·k with `vdpbf16ps` on the bf16 keys as stored (the products exact, the sums
 * fp32), sixteen keys at a time; the weighted sum of values in fp32 registers. */
static inline __attribute__((always_inline)) int attend_bf16(
    const int DIM, const int G, const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask,
    uint16_t *out, int64_t item, int64_t kv_heads, int64_t keys, int64_t k_row, int64_t k_head, int64_t k_key,
    int64_t v_row, int64_t v_head, int64_t v_key, int64_t mask_row, float scale) {
    enum { PAIRS = 4, FLOATS = 8 }; /* at most 4 vectors of 32 bf16, 8 vectors of 16 fp32 per head */
    const int64_t row = item / kv_heads, head = item % kv_heads;
    float *weights = malloc(sizeof(float) * (size_t)(G * keys));
    if (weights == NULL) return -1;
    const uint16_t *k_item = k + row * k_row + head * k_head, *v_item = v + row * v_row + head * v_head;
    const uint8_t *attended = mask + row * mask_row;
    const __m512 scaled = _mm512_set1_ps(scale);

    for (int g = 0; g < G; g++) {
        __m512i query[PAIRS];
        for (int c = 0; c < DIM / 32; c++)
            query[c] = _mm512_loadu_si512((const void *)(q + (item * G + g) * DIM + c * 32));
        for (int64_t t = 0; t < keys; t += 16) {
            const int64_t n = keys - t < 16 ? keys - t : 16;
            __m512 parts[16];
            for (int j = 0; j < 16; j++) {
                const uint16_t *key = k_item + (t + (j < n ? j : 0)) * k_key;
                __m512 sum = _mm512_setzero_ps();
                for (int c = 0; c < DIM / 32; c++)
                    sum = _mm512_dpbf16_ps(sum, (__m512bh)query[c],
                                           (__m512bh)_mm512_loadu_si512((const void *)(key + c * 32)));
                parts[j] = sum;
            }
            _mm512_mask_storeu_ps(weights + g * keys + t, (__mmask16)((1u << n) - 1u),
                                  _mm512_mul_ps(sum_lanes16(parts), scaled));
        }
    }

    float total[MAX_GROUP];
    softmax(weights, attended, G, keys, total);

    __m512 acc[G * DIM / 16];
    for (int i = 0; i < G * DIM / 16; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t t = 0; t < keys; t++) {
        const uint16_t *value = v_item + t * v_key;
        __m512 values[FLOATS];
        for (int c = 0; c < DIM / 16; c++)
            values[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(value + c * 16))), 16));
        for (int g = 0; g < G; g++) {
            const __m512 weight = _mm512_set1_ps(weights[g * keys + t]);
            for (int c = 0; c < DIM / 16; c++)
                acc[g * (DIM / 16) + c] = _mm512_fmadd_ps(weight, values[c], acc[g * (DIM / 16) + c]);
        }
    }
    uint16_t *out_item = out + item * G * DIM;
    for (int g = 0; g < G; g++) {
        const __m512 inverse = _mm512_set1_ps(total[g] > 0.0f ? 1.0f / total[g] : 0.0f); /* none attended: 0 */
        for (int c = 0; c < DIM / 16; c++)
            _mm256_storeu_si256((__m256i *)(out_item + g * DIM + c * 16),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g * (DIM / 16) + c], inverse)));
    }
    free(weights);
    return 0;
}
#endif

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
#ifdef FAST_PATH
#define FAST(DIM, G) attend_bf16(DIM, G, q, k, v, mask, out, item, kv_heads, keys, k_row, k_head, k_key, v_row, \
                                 v_head, v_key, mask_row, scale)
#define DISPATCH()                                                                                               \
    (dim == 64 && group == 1   ? FAST(64, 1)                                                                     \
     : dim == 64 && group == 2 ? FAST(64, 2)                                                                     \
     : dim == 64 && group == 3 ? FAST(64, 3)                                                                     \
     : dim == 64 && group == 4 ? FAST(64, 4)                                                                     \
     : dim == 128 && group == 1 ? FAST(128, 1)                                                                   \
     : dim == 128 && group == 2 ? FAST(128, 2)                                                                   \
     : dim == 64                ? ATTEND(64)                                                                     \
     : dim == 128               ? ATTEND(128)                                                                    \
                                : ATTEND(dim))
#else
#define DISPATCH() (dim == 64 ? ATTEND(64) : dim == 128 ? ATTEND(128) : ATTEND(dim))
#endif
#pragma omp parallel for schedule(static)
    for (int64_t item = 0; item < rows * kv_heads; item++) {
        const int status = DISPATCH();
        if (status != 0) {
#pragma omp atomic write
            failed = 1;
        }
    }
#undef ATTEND
#undef DISPATCH
    return failed ? -1 : 0;
}
