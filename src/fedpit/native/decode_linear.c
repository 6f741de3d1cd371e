/* A decode step's linear layers: a few rows times a bf16 weight, on a CPU with AVX512-BF16: see kernels.py
 * for why.
 *
 * The weight [n, k] is packed once (pack_linear) as blocks of 16 outputs, each block a run of k/2 64-byte
 * vectors that hold the block's 16 weights for two neighbouring inputs. One `vdpbf16ps` then adds, for one
 * row, two inputs' products to 16 fp32 sums, with the row's pair of inputs broadcast. A tile keeps up to
 * 16 such sums in registers (rows x blocks, more blocks where there are fewer rows, so that the
 * weights a step streams from memory are read once for all rows, and enough independent sums are in
 * flight); 9 to 16 rows are two groups of sums over each chunk of weights, the second reading it from L1.
 * More than 16 rows go 16 at a time. Sums are fp32 and the output is rounded once to bf16 (to nearest
 * even), after adding the bias: the arithmetic of torch's bf16 `F.linear`, the sums in another order.
 *
 * Without AVX512-BF16 (and AVX512-BW/VL, which every CPU with it has) at compile time (-march=native on
 * another CPU) `decode_linear` returns -1 and `decode_linear_available` 0, and the decode step keeps oneDNN's
 * products.
 */
#include <stdint.h>
#include <stddef.h>
#include "kernels.h"

#define BLOCK 16  /* outputs a vector of fp32 sums holds */
#define CHUNK 32  /* input pairs of a chunk that two groups of rows share (2 blocks: 4 KiB of weights) */
#define AHEAD 8   /* input pairs a block's weights are prefetched ahead */

/* w [n, k] row-major bf16, k even -> packed [ceil(n / 16)][k / 2][16][2]; outputs past n are zero. */
void pack_linear(const uint16_t *w, uint16_t *packed, int64_t n, int64_t k) {
    const int64_t blocks = (n + BLOCK - 1) / BLOCK, pairs = k / 2;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        uint32_t *out = (uint32_t *)(packed + b * pairs * BLOCK * 2);
        for (int64_t j = 0; j < BLOCK; j++) {
            const int64_t row = b * BLOCK + j;
            const uint32_t *in = (const uint32_t *)(w + row * k);
            for (int64_t p = 0; p < pairs; p++) out[p * BLOCK + j] = row < n ? in[p] : 0u;
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
#include <immintrin.h>

int decode_linear_available(void) { return 1; }

/* sums[m * NB + b] += rows [0, MR) of x (as pairs, row stride xs pairs) times the NB blocks at w0, over
 * input pairs [p0, p1). MR and NB are constants at every call, so the loops unroll and the sums stay in
 * registers (arrays of fixed size: a variable-length one would live on the stack). */
static inline __attribute__((always_inline)) void accumulate(const int MR, const int NB, const uint32_t *x,
                                                             int64_t xs, const uint16_t *w0, int64_t pairs,
                                                             int64_t p0, int64_t p1, __m512 *sums) {
    __m512 acc[16];
    for (int i = 0; i < MR * NB; i++) acc[i] = sums[i];
    for (int64_t p = p0; p < p1; p++) {
        __m512i w[8];
        for (int b = 0; b < NB; b++) {
            w[b] = _mm512_loadu_si512((const void *)(w0 + (b * pairs + p) * BLOCK * 2));
            _mm_prefetch((const char *)(w0 + (b * pairs + p + AHEAD) * BLOCK * 2), _MM_HINT_T0);
        }
        for (int m = 0; m < MR; m++) {
            const __m512i pair = _mm512_set1_epi32((int)x[m * xs + p]);
            for (int b = 0; b < NB; b++)
                acc[m * NB + b] = _mm512_dpbf16_ps(acc[m * NB + b], (__m512bh)pair, (__m512bh)w[b]);
        }
    }
    for (int i = 0; i < MR * NB; i++) sums[i] = acc[i];
}

/* y's columns of blocks [first, first + NB) for MR rows: sums + bias, rounded to bf16; the last block may
 * be partly past n. */
static inline __attribute__((always_inline)) void store(const int MR, const int NB, const __m512 *sums,
                                                        const uint16_t *bias, uint16_t *y, int64_t ys, int64_t n,
                                                        int64_t first) {
    for (int b = 0; b < NB; b++) {
        const int64_t column = (first + b) * BLOCK, left = n - column;
        const __mmask16 keep = left >= BLOCK ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        __m512 add = _mm512_setzero_ps();
        if (bias != NULL)
            add = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, bias + column)), 16));
        for (int m = 0; m < MR; m++)
            _mm256_mask_storeu_epi16(y + m * ys + column, keep,
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(sums[m * NB + b], add)));
    }
}

/* Up to 8 rows, NB blocks from `first`. */
static inline __attribute__((always_inline)) void tile(const int MR, const int NB, const uint32_t *x, int64_t xs,
                                                       const uint16_t *packed, const uint16_t *bias, uint16_t *y,
                                                       int64_t ys, int64_t n, int64_t pairs, int64_t first) {
    __m512 sums[16];
    for (int i = 0; i < MR * NB; i++) sums[i] = _mm512_setzero_ps();
    accumulate(MR, NB, x, xs, packed + first * pairs * BLOCK * 2, pairs, 0, pairs, sums);
    store(MR, NB, sums, bias, y, ys, n, first);
}

/* 8 + MR rows: both groups of sums take each chunk of weights in turn. */
static inline __attribute__((always_inline)) void tile2(const int MR, const int NB, const uint32_t *x, int64_t xs,
                                                        const uint16_t *packed, const uint16_t *bias, uint16_t *y,
                                                        int64_t ys, int64_t n, int64_t pairs, int64_t first) {
    __m512 low[16], high[16];
    for (int i = 0; i < 16; i++) low[i] = high[i] = _mm512_setzero_ps();
    const uint16_t *w0 = packed + first * pairs * BLOCK * 2;
    for (int64_t p0 = 0; p0 < pairs; p0 += CHUNK) {
        const int64_t p1 = p0 + CHUNK < pairs ? p0 + CHUNK : pairs;
        accumulate(8, NB, x, xs, w0, pairs, p0, p1, low);
        accumulate(MR, NB, x + 8 * xs, xs, w0, pairs, p0, p1, high);
    }
    store(8, NB, low, bias, y, ys, n, first);
    store(MR, NB, high, bias, y + 8 * ys, ys, n, first);
}

/* The blocks in tiles of NB, split between the threads; a last, shorter tile one block at a time. */
#define TILES(KIND, MR, NB)                                                                                 \
    {                                                                                                       \
        const int64_t tiles = (blocks + NB - 1) / NB;                                                       \
        _Pragma("omp parallel for schedule(static)") for (int64_t t = 0; t < tiles; t++) {                  \
            const int64_t first = t * NB;                                                                   \
            if (first + NB <= blocks)                                                                       \
                KIND(MR, NB, x32, xs, packed, bias, out, ys, n, pairs, first);                              \
            else                                                                                            \
                for (int64_t b = first; b < blocks; b++) KIND(MR, 1, x32, xs, packed, bias, out, ys, n, pairs, b); \
        }                                                                                                   \
        break;                                                                                              \
    }

/* y [rows, n] (row stride ys) = x [rows, k] (row stride xs; both strides in elements, even) times the
 * weight packed by pack_linear, plus bias [n] (or NULL). Returns 0, or -1 for an odd k or stride. */
int decode_linear(const uint16_t *x, int64_t x_stride, const uint16_t *packed, const uint16_t *bias, uint16_t *y,
                  int64_t ys, int64_t rows, int64_t n, int64_t k) {
    if (k % 2 || x_stride % 2 || rows < 1 || n < 1) return -1;
    const int64_t blocks = (n + BLOCK - 1) / BLOCK, pairs = k / 2, xs = x_stride / 2;
    for (int64_t done = 0; done < rows; done += 16) {
        const uint32_t *x32 = (const uint32_t *)(x + done * x_stride);
        uint16_t *out = y + done * ys;
        switch (rows - done < 16 ? rows - done : 16) {
        case 1: TILES(tile, 1, 8)
        case 2: TILES(tile, 2, 8)
        case 3: TILES(tile, 3, 5)
        case 4: TILES(tile, 4, 4)
        case 5: TILES(tile, 5, 3)
        case 6: TILES(tile, 6, 2)
        case 7: TILES(tile, 7, 2)
        case 8: TILES(tile, 8, 2)
        case 9: TILES(tile2, 1, 2)
        case 10: TILES(tile2, 2, 2)
        case 11: TILES(tile2, 3, 2)
        case 12: TILES(tile2, 4, 2)
        case 13: TILES(tile2, 5, 2)
        case 14: TILES(tile2, 6, 2)
        case 15: TILES(tile2, 7, 2)
        default: TILES(tile2, 8, 2)
        }
    }
    return 0;
}

#else

int decode_linear_available(void) { return 0; }

int decode_linear(const uint16_t *x, int64_t x_stride, const uint16_t *packed, const uint16_t *bias, uint16_t *y,
                  int64_t ys, int64_t rows, int64_t n, int64_t k) {
    (void)x, (void)x_stride, (void)packed, (void)bias, (void)y, (void)ys, (void)rows, (void)n, (void)k;
    return -1;
}

#endif
