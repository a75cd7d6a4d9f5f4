/* quanta's native dynamic-quantization passes (quanta.kernels.dynamic): float32 inputs to uint8
 * with numpy's arithmetic, bit-equal to it (tested), per tensor or per row, and the per-row
 * epilogue of the int8 matmul. */
#include <math.h>
#include <stdint.h>

#include "common.h"

/* Dynamic quantization of a float32 input, in two threaded passes with numpy's arithmetic
 * (quanta.kernels.dynamic): qk_min_max finds the range (returns 1 if any value is NaN or
 * infinite), qk_quantize_dynamic_u8 computes y = trunc(clamp(f32(x * inv) + offset, 0, 255))
 * with offset = zp + 0.5: multiply and add rounded separately (no FMA contraction). */
__attribute__((optimize("O3"))) int qk_min_max_f32(const float *x, int64_t n, float *out) {
    int64_t blocks = (n + QK_BLOCK - 1) / QK_BLOCK;
    float lo = x[0], hi = x[0];
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(min : lo) reduction(max : hi) \
    reduction(| : bad) if (blocks > 1)
    for (int64_t i = 0; i < blocks; i++) {
        int64_t start = i * QK_BLOCK, stop = n - start < QK_BLOCK ? n : start + QK_BLOCK;
        float l = x[start], h = x[start];
        float finite = 0.0f;
        for (int64_t j = start; j < stop; j++) {
            l = x[j] < l ? x[j] : l;
            h = x[j] > h ? x[j] : h;
            finite += x[j] * 0.0f; /* NaN for NaN or +-inf */
        }
        lo = l < lo ? l : lo;
        hi = h > hi ? h : hi;
        bad |= finite != finite;
    }
    out[0] = lo;
    out[1] = hi;
    return bad;
}

#define QK_DYN_BODY                                                                          \
    for (int64_t i = 0; i < len; i++) {                                                      \
        float v = x[i] * inv;                                                                \
        v = v + offset;                                                                      \
        v = v < 0.0f ? 0.0f : v;                                                             \
        v = v > 255.0f ? 255.0f : v;                                                         \
        y[i] = (uint8_t)v;                                                                   \
    }

QK_TARGET("avx2") __attribute__((optimize("O3", "fp-contract=off"))) static void dyn_avx2(
    const float *restrict x, uint8_t *restrict y, int64_t len, float inv, float offset) {
    QK_DYN_BODY
}

__attribute__((optimize("O3", "fp-contract=off"))) static void dyn_plain(
    const float *restrict x, uint8_t *restrict y, int64_t len, float inv, float offset) {
    QK_DYN_BODY
}

void qk_quantize_dynamic_u8(const float *x, uint8_t *y, int64_t n, float inv, float offset) {
    QK_BLOCKS(n, dyn_avx2, dyn_plain, (x + start, y + start, len, inv, offset));
}

/* Per-row dynamic quantization of a [m, k] float32 matrix, numpy's _quantize_rows in C: per row
 * lo = min(row, 0), hi = max(row, 0) (in float64), scale = f32(max((hi - lo) / 255, eps)),
 * zp = clamp(rint(-lo / scale), 0, 255), then the per-tensor pass's arithmetic with
 * inv = 1 / scale and offset = zp + 0.5 in float32. Rows run in parallel. Returns 1 if any value
 * is NaN or infinite (outputs then undefined). */
int qk_quantize_rows_u8(const float *x, uint8_t *y, float *scale, int32_t *zero_point, int64_t m,
                        int64_t k, double eps) {
    int use_fast = has_avx2_fma(), bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (m * k > QK_BLOCK)
    for (int64_t r = 0; r < m; r++) {
        const float *row = x + r * k;
        float l = k ? row[0] : 0.0f, h = l, finite = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            l = row[j] < l ? row[j] : l;
            h = row[j] > h ? row[j] : h;
            finite += row[j] * 0.0f; /* NaN for NaN or +-inf */
        }
        if (finite != finite) {
            bad = 1;
            continue;
        }
        double lo = l < 0.0f ? (double)l : 0.0, hi = h > 0.0f ? (double)h : 0.0;
        double span = (hi - lo) / 255.0;
        float s = (float)(span > eps ? span : eps);
        double z = nearbyint(-lo / (double)s); /* round half to even, as np.rint */
        z = z < 0.0 ? 0.0 : (z > 255.0 ? 255.0 : z);
        scale[r] = s;
        zero_point[r] = (int32_t)z;
        float inv = 1.0f / s, offset = (float)z + 0.5f;
        if (use_fast)
            dyn_avx2(row, y + r * k, k, inv, offset);
        else
            dyn_plain(row, y + r * k, k, inv, offset);
    }
    return bad;
}

/* The per-row epilogue of a dynamic int8 matmul, in place on y [m, n] = sum_k x_q * w * w_scale
 * (the matmul run with input scale 1 and zero point 0):
 * y = bias - (zp_row * s_row) * wsum_scaled + y * s_row, wsum_scaled[j] = w_scale[j] * sum_k w[j, k]. */
__attribute__((optimize("O3"))) void qk_rows_epilogue(float *y, int64_t m, int64_t n, const float *scale,
                                                     const int32_t *zero_point, const float *wsum_scaled,
                                                     const float *bias) {
#pragma omp parallel for schedule(static) if (m * n > QK_BLOCK)
    for (int64_t r = 0; r < m; r++) {
        float s = scale[r], c = (float)zero_point[r] * s;
        float *out = y + r * n;
        for (int64_t j = 0; j < n; j++)
            out[j] = ((bias ? bias[j] : 0.0f) - c * wsum_scaled[j]) + out[j] * s;
    }
}
