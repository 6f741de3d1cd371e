/* Every decoder layer of one bf16 decode step in one call: see decode_step.py for why.
 *
 * The step's layers call, in the order `DecodeStep._native_step` calls them from Python, the library's own
 * entry points (decode_ops.c, decode_linear.c, decode_attention.c), and write each layer's new key and value
 * into its cache here. So the result is bitwise that of the Python loop; what goes is the ~10 Python-level
 * calls a layer, their argument checks and their new tensors (about 2 ms of an 8-row step of 15 ms).
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

/* The columns of `table`, one row of addresses a layer (0 for a missing bias). */
enum { IN_NORM, POST_NORM, QKV, QKV_BIAS, O, O_BIAS, GATE_UP, GATE_UP_BIAS, DOWN, DOWN_BIAS, KEYS, VALUES, FIELDS };

#define AT(field) ((uint16_t *)(uintptr_t)row[field])

/* hidden [rows, width]: the residual stream, summed in place; on return `delta` holds the last layer's output
 * not yet added to it (the final norm adds it). Buffers: normed [rows, width], qkv [rows, (heads + 2 kv_heads)
 * dim], q [rows, heads, dim], k [rows, kv_heads, dim], out [rows, heads dim], gate_up [rows, 2 inner], act [rows,
 * inner]. cos, sin [rows, dim]; mask [rows, slot + 1] bytes at row stride mask_row. Each layer's caches are
 * [rows, kv_heads, capacity, dim] with the given strides (elements); the new position is `slot`. Returns 0, or
 * -1 where a product or the attention refused its sizes. */
int decode_layers(int64_t layers, const uint64_t *table, int64_t rows, int64_t width, int64_t heads,
                  int64_t kv_heads, int64_t dim, int64_t inner, uint16_t *hidden, uint16_t *delta, uint16_t *normed,
                  uint16_t *qkv, uint16_t *q, uint16_t *k, uint16_t *out, uint16_t *gate_up, uint16_t *act,
                  const uint16_t *cos, const uint16_t *sin, const uint8_t *mask, int64_t mask_row, int64_t slot,
                  int64_t cache_row, int64_t cache_head, int64_t cache_key, float scale, float eps) {
    const int64_t qkv_width = (heads + 2 * kv_heads) * dim;
    for (int64_t layer = 0; layer < layers; layer++) {
        const uint64_t *row = table + layer * FIELDS;
        add_rms_norm(hidden, layer == 0 ? NULL : delta, AT(IN_NORM), normed, rows, width, eps);
        if (decode_linear(normed, width, AT(QKV), AT(QKV_BIAS), qkv, qkv_width, rows, qkv_width, width)) return -1;
        rotary(qkv, qkv_width, cos, sin, q, k, rows, heads, kv_heads, dim);
        uint16_t *keys = AT(KEYS), *values = AT(VALUES);
        for (int64_t r = 0; r < rows; r++)
            for (int64_t h = 0; h < kv_heads; h++) {
                const int64_t at = r * cache_row + h * cache_head + slot * cache_key;
                memcpy(keys + at, k + (r * kv_heads + h) * dim, sizeof(uint16_t) * (size_t)dim);
                memcpy(values + at, qkv + r * qkv_width + (heads + kv_heads + h) * dim, sizeof(uint16_t) * (size_t)dim);
            }
        if (decode_attention(q, keys, values, mask, out, rows, kv_heads, heads / kv_heads, slot + 1, dim, cache_row,
                             cache_head, cache_key, cache_row, cache_head, cache_key, mask_row, scale))
            return -1;
        if (decode_linear(out, heads * dim, AT(O), AT(O_BIAS), delta, width, rows, width, heads * dim)) return -1;
        add_rms_norm(hidden, delta, AT(POST_NORM), normed, rows, width, eps);
        if (decode_linear(normed, width, AT(GATE_UP), AT(GATE_UP_BIAS), gate_up, 2 * inner, rows, 2 * inner, width))
            return -1;
        silu_mul(gate_up, act, rows, inner);
        if (decode_linear(act, inner, AT(DOWN), AT(DOWN_BIAS), delta, width, rows, width, inner)) return -1;
    }
    return 0;
}
