/* The library's entry points, declared once: every source that defines one includes this, so the compiler
 * checks each definition against the declaration that decode_layers.c (and ctypes, in kernels.py) calls. */
#ifndef FEDPIT_KERNELS_H
#define FEDPIT_KERNELS_H

#include <stdint.h>

/* decode_ops.c */
void add_rms_norm(uint16_t *hidden, const uint16_t *delta, const uint16_t *weight, uint16_t *out, int64_t rows,
                  int64_t dim, float eps);
void rotary(const uint16_t *qkv, int64_t row_stride, const uint16_t *cos, const uint16_t *sin, uint16_t *q,
            uint16_t *k, int64_t rows, int64_t heads_q, int64_t heads_k, int64_t dim);
void silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inner);
void silu_mul_pair(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t rows, int64_t inner);
void rms_norm_rows(const uint16_t *hidden, const uint16_t *weight, uint16_t *out, int64_t rows, int64_t dim,
                   float eps);
int masked_softmax(uint16_t *scores, const uint8_t *mask, int64_t rows, int64_t per_item, int64_t length,
                   int64_t keys, int64_t mask_item, int64_t mask_query, int64_t offset, float scale);

/* decode_linear.c */
void pack_linear(const uint16_t *w, uint16_t *packed, int64_t n, int64_t k);
int decode_linear_available(void);
int decode_linear(const uint16_t *x, int64_t x_stride, const uint16_t *packed, const uint16_t *bias, uint16_t *y,
                  int64_t ys, int64_t rows, int64_t n, int64_t k);

/* decode_attention.c */
int decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out,
                     int64_t rows, int64_t kv_heads, int64_t group, int64_t keys, int64_t dim, int64_t k_row,
                     int64_t k_head, int64_t k_key, int64_t v_row, int64_t v_head, int64_t v_key, int64_t mask_row,
                     float scale);

/* decode_layers.c */
int decode_layers(int64_t layers, const uint64_t *table, int64_t rows, int64_t width, int64_t heads,
                  int64_t kv_heads, int64_t dim, int64_t inner, uint16_t *hidden, uint16_t *delta, uint16_t *normed,
                  uint16_t *qkv, uint16_t *q, uint16_t *k, uint16_t *out, uint16_t *gate_up, uint16_t *act,
                  const uint16_t *cos, const uint16_t *sin, const uint8_t *mask, int64_t mask_row, int64_t slot,
                  int64_t cache_row, int64_t cache_head, int64_t cache_key, float scale, float eps);

#endif
