/* quanta's native dynamic-quantization passes (quanta.kernels.dynamic): float32 inputs to uint8
 * with numpy's arithmetic, bit-equal to it (tested), per tensor or per row, and the per-row
 * epilogue of the int8 matmul. */
#include <math.h>
#include <stdint.h>

#include "common.h"
#if QK_X86
#include <immintrin.h>
#endif

/* min and max of x[0..n) (n >= 1) into lo, hi; returns 1 if any value is NaN or infinite.
 * min/max of finite floats do not depend on the order they are taken in, so the vector scan
 * gives the scalar one's values (a -0.0/+0.0 tie may come out either way; callers widen the
 * range to include 0, where both are 0). The scalar loop's float accumulator made it
 * latency-bound (~4 cycles per value): per-row quantization cost more than the GEMM. */
static int range_plain(const float *x, int64_t n, float *lo, float *hi) {
    float l = x[0], h = x[0];
    int bad = 0;
    for (int64_t j = 0; j < n; j++) {
        l = x[j] < l ? x[j] : l;
        h = x[j] > h ? x[j] : h;
        bad |= !isfinite(x[j]);
    }
    *lo = l;
    *hi = h;
    return bad;
}

#if QK_X86
QK_TARGET("avx2") static int range_avx2(const float *x, int64_t n, float *lo, float *hi) {
    __m256 l0 = _mm256_set1_ps(x[0]), h0 = l0, l1 = l0, h1 = l0;
    const __m256i exponent = _mm256_set1_epi32(0x7f800000); /* all ones: Inf or NaN */
    __m256i bad = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + 8);
        l0 = _mm256_min_ps(l0, a);
        h0 = _mm256_max_ps(h0, a);
        l1 = _mm256_min_ps(l1, b);
        h1 = _mm256_max_ps(h1, b);
        __m256i ea = _mm256_and_si256(_mm256_castps_si256(a), exponent);
        __m256i eb = _mm256_and_si256(_mm256_castps_si256(b), exponent);
        bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpeq_epi32(ea, exponent),
                                                   _mm256_cmpeq_epi32(eb, exponent)));
    }
    float ls[8], hs[8];
    _mm256_storeu_ps(ls, _mm256_min_ps(l0, l1));
    _mm256_storeu_ps(hs, _mm256_max_ps(h0, h1));
    float l = ls[0], h = hs[0];
    for (int i = 1; i < 8; i++) {
        l = ls[i] < l ? ls[i] : l;
        h = hs[i] > h ? hs[i] : h;
    }
    int any_bad = !_mm256_testz_si256(bad, bad);
    if (j < n) {
        float tl, th;
        any_bad |= range_plain(x + j, n - j, &tl, &th);
        l = tl < l ? tl : l;
        h = th > h ? th : h;
    }
    *lo = l;
    *hi = h;
    return any_bad;
}
#endif

static int range_f32(const float *x, int64_t n, float *lo, float *hi) {
#if QK_X86
    if (has_avx2_fma()) return range_avx2(x, n, lo, hi);
#endif
    return range_plain(x, n, lo, hi);
}

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
        float l, h;
        bad |= range_f32(x + start, stop - start, &l, &h);
        lo = l < lo ? l : lo;
        hi = h > hi ? h : hi;
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

/* The same arithmetic 32 values at a time in intrinsics: the compiler's own vectorization of
 * QK_DYN_BODY spent ~3 instructions per value on the clamps (compares and blends). min/max
 * against 0 and 255 equal the body's ternaries on finite values (NaN/Inf are refused first). */
QK_TARGET("avx2") __attribute__((optimize("O3", "fp-contract=off"))) static void dyn_avx2(
    const float *restrict x, uint8_t *restrict y, int64_t len, float inv, float offset) {
    int64_t i = 0;
#if QK_X86
    const __m256 vinv = _mm256_set1_ps(inv), voff = _mm256_set1_ps(offset);
    const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i q[4];
    for (; i + 32 <= len; i += 32) {
        for (int p = 0; p < 4; p++) {
            __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * p), vinv), voff);
            q[p] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(v, zero), top));
        }
        __m256i words = _mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]), _mm256_packus_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(y + i), _mm256_permutevar8x32_epi32(words, order));
    }
#endif
    x += i;
    y += i;
    len -= i;
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
        float l = 0.0f, h = 0.0f;
        if (k && range_f32(row, k, &l, &h)) {
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
#define QK_EPILOGUE_ROW                                                                      \
    for (int64_t j = 0; j < n; j++)                                                          \
        out[j] = ((bias ? bias[j] : 0.0f) - c * wsum_scaled[j]) + out[j] * s;

/* One row of the epilogue; the AVX2 build is the same arithmetic (no FMA contraction). */
QK_TARGET("avx2") __attribute__((optimize("O3", "fp-contract=off"))) static void epilogue_row_avx2(
    float *restrict out, int64_t n, float s, float c, const float *restrict wsum_scaled,
    const float *restrict bias) {
    QK_EPILOGUE_ROW
}

__attribute__((optimize("O3", "fp-contract=off"))) static void epilogue_row(
    float *restrict out, int64_t n, float s, float c, const float *restrict wsum_scaled,
    const float *restrict bias) {
    QK_EPILOGUE_ROW
}

void qk_rows_epilogue(float *y, int64_t m, int64_t n, const float *scale, const int32_t *zero_point,
                      const float *wsum_scaled, const float *bias) {
    int fast = has_avx2_fma();
#pragma omp parallel for schedule(static) if (m * n > QK_BLOCK)
    for (int64_t r = 0; r < m; r++) {
        float s = scale[r], c = (float)zero_point[r] * s;
        if (fast)
            epilogue_row_avx2(y + r * n, n, s, c, wsum_scaled, bias);
        else
            epilogue_row(y + r * n, n, s, c, wsum_scaled, bias);
    }
}
