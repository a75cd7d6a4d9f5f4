/* quanta's native elementwise int8 kernels: plain C loops, vectorized by the compiler.
 *
 * Each computes exactly what quanta's reference (or its numpy/torch path) computes; the tests
 * compare them element for element. Large tensors are split in blocks across torch's OpenMP
 * threads: the library is built with -fopenmp, and libgomp.so.1 resolves to the copy torch
 * already loaded, so there is one thread pool.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "common.h"
#if QK_X86
#include <immintrin.h>
#endif

/* uint8 add, the reference's formula: y = clamp(rne(fma(a, ra, fma(b, rb, k))), lo, hi).
 * Same-layout dense inputs of n elements. kernels/eltwise.py checks it against reference.add on
 * all 65536 input pairs of each qparams before using it, so it is exact or not used. */
#define QK_ADD_BODY                                                                          \
    for (int64_t i = 0; i < n; i++) {                                                        \
        float v = __builtin_rintf(__builtin_fmaf((float)a[i], ra, __builtin_fmaf((float)b[i], rb, k))); \
        v = v < lo ? lo : v;                                                                 \
        v = v > hi ? hi : v;                                                                 \
        y[i] = (uint8_t)v;                                                                   \
    }

QK_TARGET("avx2,fma") __attribute__((optimize("O3", "no-math-errno"))) static void add_avx2(
    const uint8_t *restrict a, const uint8_t *restrict b, uint8_t *restrict y, int64_t n, float ra,
    float rb, float k, float lo, float hi) {
    QK_ADD_BODY
}

__attribute__((optimize("O3", "no-math-errno"))) static void add_scalar(
    const uint8_t *restrict a, const uint8_t *restrict b, uint8_t *restrict y, int64_t n, float ra,
    float rb, float k, float lo, float hi) {
    QK_ADD_BODY
}

void qk_add_u8(const uint8_t *a, const uint8_t *b, uint8_t *y, int64_t n, float ra, float rb,
               float k, float lo, float hi) {
    QK_BLOCKS(n, add_avx2, add_scalar, (a + start, b + start, y + start, len, ra, rb, k, lo, hi));
}

/* uint8 add in XNNPACK's fixed point, reference.add_fixed_point: y = clamp(((bias + (a - 128) * ma +
 * (b - 128) * mb) >> shift) + zp, lo, hi), bias = 2^(shift-1) - (za - 128) * ma - (zb - 128) * mb
 * folded by the caller, in int32 as XNNPACK computes it (the caller checks the sum cannot
 * overflow); >> on a negative value is GCC's arithmetic shift (floor). Integer only: exact by
 * construction. Same-layout dense inputs of n elements. */
#define QK_ADD_FIXED_BODY                                                                    \
    for (int64_t i = 0; i < n; i++) {                                                        \
        int32_t v = ((bias + ((int32_t)a[i] - 128) * ma + ((int32_t)b[i] - 128) * mb) >> shift) + zp; \
        v = v < lo ? lo : v;                                                                 \
        v = v > hi ? hi : v;                                                                 \
        y[i] = (uint8_t)v;                                                                   \
    }

QK_TARGET("avx2,fma") __attribute__((optimize("O3"))) static void add_fixed_avx2(
    const uint8_t *restrict a, const uint8_t *restrict b, uint8_t *restrict y, int64_t n, int32_t ma,
    int32_t mb, int32_t bias, int32_t shift, int32_t zp, int32_t lo, int32_t hi) {
    QK_ADD_FIXED_BODY
}

__attribute__((optimize("O3"))) static void add_fixed_scalar(
    const uint8_t *restrict a, const uint8_t *restrict b, uint8_t *restrict y, int64_t n, int32_t ma,
    int32_t mb, int32_t bias, int32_t shift, int32_t zp, int32_t lo, int32_t hi) {
    QK_ADD_FIXED_BODY
}

void qk_add_fixed_u8(const uint8_t *a, const uint8_t *b, uint8_t *y, int64_t n, int32_t ma, int32_t mb,
                     int32_t bias, int32_t shift, int32_t zp, int32_t lo, int32_t hi) {
    QK_BLOCKS(n, add_fixed_avx2, add_fixed_scalar,
              (a + start, b + start, y + start, len, ma, mb, bias, shift, zp, lo, hi));
}

/* float32 -> uint8 clamp(rne(x / scale) + zp, 0, 255), as quanta.kernels.onednn.quantize_uint8
 * (a float32 division, then rounding half to even), or with inv != 0 rne(x * inv) (XNNPACK's
 * quantization, inv = f32(1 / scale)). x is [n, c, inner] contiguous; with to_channels_last the
 * result is [n, inner, c] (NCHW -> NHWC in the same pass). */
/* Also counts non-finite inputs: x - x is 0 for a finite x and NaN for NaN or +-inf. */
#define QK_QUANTIZE_LOOP(SCALED)                                                             \
    for (int64_t i = 0; i < len; i++) {                                                      \
        float v = __builtin_rintf(SCALED) + zp;                                              \
        bad |= (x[i] - x[i]) != 0.0f;                                                        \
        v = v < 0.0f ? 0.0f : v;                                                             \
        v = v > 255.0f ? 255.0f : v;                                                         \
        y[i] = (uint8_t)v;                                                                   \
    }
#define QK_QUANTIZE_BODY                                                                     \
    int bad = 0;                                                                             \
    if (inv != 0.0f) {                                                                       \
        QK_QUANTIZE_LOOP(x[i] * inv)                                                         \
    } else {                                                                                 \
        QK_QUANTIZE_LOOP(x[i] / scale)                                                       \
    }                                                                                        \
    return bad;

__attribute__((optimize("O3", "no-math-errno"))) static int quantize_run(
    const float *restrict x, uint8_t *restrict y, int64_t len, float scale, float inv, float zp) {
    QK_QUANTIZE_BODY
}

/* The loop above 32 values at a time in AVX2 intrinsics (the compiler's vectorization of it
 * spent most of its instructions on the clamps and the non-finite count); the same operations
 * in the same order, so the same bytes. Non-finite inputs: exponent bits all ones. */
#define QK_QUANTIZE_VEC(OP)                                                                                \
    for (; i + 32 <= len; i += 32) {                                                                       \
        for (int p = 0; p < 4; p++) {                                                                      \
            __m256 xv = _mm256_loadu_ps(x + i + 8 * p);                                                    \
            __m256 v = _mm256_round_ps(OP(xv, factor), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);     \
            v = _mm256_add_ps(v, vzp);                                                                     \
            __m256i e = _mm256_and_si256(_mm256_castps_si256(xv), exponent);                               \
            flags = _mm256_or_si256(flags, _mm256_cmpeq_epi32(e, exponent));                               \
            q[p] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(v, zero), top));                        \
        }                                                                                                  \
        __m256i w = _mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]), _mm256_packus_epi32(q[2], q[3])); \
        _mm256_storeu_si256((__m256i *)(y + i), _mm256_permutevar8x32_epi32(w, order));                    \
    }

QK_TARGET("avx2") __attribute__((optimize("O3", "no-math-errno"))) static int quantize_run_avx2(
    const float *restrict x, uint8_t *restrict y, int64_t len, float scale, float inv, float zp) {
    int64_t i = 0;
#if QK_X86
    const __m256 factor = _mm256_set1_ps(inv != 0.0f ? inv : scale), vzp = _mm256_set1_ps(zp);
    const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.0f);
    const __m256i exponent = _mm256_set1_epi32(0x7f800000), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i flags = _mm256_setzero_si256(), q[4];
    if (inv != 0.0f) {
        QK_QUANTIZE_VEC(_mm256_mul_ps)
    } else {
        QK_QUANTIZE_VEC(_mm256_div_ps)
    }
    int bad = !_mm256_testz_si256(flags, flags);
#else
    int bad = 0;
#endif
    return bad | quantize_run(x + i, y + i, len - i, scale, inv, zp);
}

#define QK_SPAN 512
#define QK_SPAN_CHANNELS 8

/* Returns 1 if any input is NaN or infinite (the output is then meaningless), else 0. */
int qk_quantize_u8(const float *x, uint8_t *y, int64_t n, int64_t c, int64_t inner, float scale,
                   int32_t zero_point, int to_channels_last, float inv) {
    float zp = (float)zero_point;
    int bad = 0;
    if (!to_channels_last || c == 1) {
        int64_t total = n * c * inner, blocks = (total + QK_BLOCK - 1) / QK_BLOCK;
        int fast = has_avx2_fma();
#pragma omp parallel for schedule(static) reduction(| : bad) if (blocks > 1)
        for (int64_t i = 0; i < blocks; i++) {
            int64_t start = i * QK_BLOCK, len = total - start < QK_BLOCK ? total - start : QK_BLOCK;
            bad |= fast ? quantize_run_avx2(x + start, y + start, len, scale, inv, zp)
                        : quantize_run(x + start, y + start, len, scale, inv, zp);
        }
        return bad;
    }
    /* NCHW -> NHWC in spans of pixels of one image: each channel plane's run quantized with the
     * vectorized loop into a buffer, then interleaved (a stem's 3 planes: ~2x faster than a
     * strided pass per plane). Wide inputs (a conv head's 1x1 maps) walk channel by channel. */
    if (c <= QK_SPAN_CHANNELS) {
        int64_t spans = (inner + QK_SPAN - 1) / QK_SPAN;
        int fast = has_avx2_fma();
#pragma omp parallel for schedule(static) collapse(2) reduction(| : bad) if (n * c * inner > QK_BLOCK)
        for (int64_t b = 0; b < n; b++)
            for (int64_t sp = 0; sp < spans; sp++) {
                uint8_t plane[QK_SPAN_CHANNELS][QK_SPAN];
                int64_t p0 = sp * QK_SPAN, len = inner - p0 < QK_SPAN ? inner - p0 : QK_SPAN;
                for (int64_t ch = 0; ch < c; ch++) {
                    const float *src = x + (b * c + ch) * inner + p0;
                    bad |= fast ? quantize_run_avx2(src, plane[ch], len, scale, inv, zp)
                                : quantize_run(src, plane[ch], len, scale, inv, zp);
                }
                uint8_t *dst = y + (b * inner + p0) * c;
                if (c == 3)  /* RGB: a fixed-stride interleave the compiler unrolls */
                    for (int64_t p = 0; p < len; p++) {
                        dst[3 * p] = plane[0][p];
                        dst[3 * p + 1] = plane[1][p];
                        dst[3 * p + 2] = plane[2][p];
                    }
                else
                    for (int64_t p = 0; p < len; p++)
                        for (int64_t ch = 0; ch < c; ch++) dst[p * c + ch] = plane[ch][p];
            }
        return bad;
    }
#pragma omp parallel for schedule(static) collapse(2) reduction(| : bad) if (n * c * inner > QK_BLOCK)
    for (int64_t b = 0; b < n; b++)
        for (int64_t ch = 0; ch < c; ch++) {
            const float *src = x + (b * c + ch) * inner;
            uint8_t *dst = y + b * c * inner + ch;
            for (int64_t i = 0; i < inner; i++) {
                float v = __builtin_rintf(inv != 0.0f ? src[i] * inv : src[i] / scale) + zp;
                bad |= (src[i] - src[i]) != 0.0f;
                v = v < 0.0f ? 0.0f : v;
                v = v > 255.0f ? 255.0f : v;
                dst[i * c] = (uint8_t)v;
            }
        }
    return bad;
}

/* uint8 NHWC a [n, hw, c] times a float gate g[n * g_batch_stride + c] (a squeeze-excite block's
 * channel scale), requantized like reference.mul: each float32 operation rounded once, in this
 * order (no FMA contraction), then rounding half to even and the activation's clamp. */
static void mul_row(const uint8_t *restrict a, const float *restrict g, uint8_t *restrict y, int64_t c,
                    float sa, float za, float sy, float zy, float lo, float hi);

#if QK_X86
/* mul_row without the division on the common path. For |q| <= 512, q = f32(p * f32(1 / sy))
 * differs from f32(p / sy) (p = f32(v * g)) by less than 512 * 2^-22 = 2^-13, so both round to
 * the same integer unless q lies within 2^-12 of a half-integer; such vectors (~1e-3 of them),
 * and any |q| > 512, divide as the reference does. Same bits as mul_row: the division bounded
 * the plain loop (measured 1.5x faster with AVX2, 2x with AVX-512, one thread). */
#define QK_GATE_LIMIT (0.5f - 0x1p-12f)
#define QK_NEAREST (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

QK_TARGET("avx2") __attribute__((optimize("O3", "fp-contract=off", "no-math-errno"))) static void
mul_row_avx2(const uint8_t *restrict a, const float *restrict g, uint8_t *restrict y, int64_t c,
             float sa, float za, float sy, float zy, float lo, float hi) {
    const __m256 vsa = _mm256_set1_ps(sa), vza = _mm256_set1_ps(za), vsy = _mm256_set1_ps(sy);
    const __m256 vinv = _mm256_set1_ps(1.0f / sy), vzy = _mm256_set1_ps(zy);
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi), sign = _mm256_set1_ps(-0.0f);
    const __m256 limit = _mm256_set1_ps(QK_GATE_LIMIT), big = _mm256_set1_ps(512.0f);
    int64_t i = 0;
    for (; i + 32 <= c; i += 32) {  /* four vectors per branch on the rare exact division */
        __m256 p[4], t[4], bad = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            __m256i a32 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a + i + 8 * k)));
            __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(a32), vza), vsa);
            p[k] = _mm256_mul_ps(v, _mm256_loadu_ps(g + i + 8 * k));
            __m256 q = _mm256_mul_ps(p[k], vinv);
            t[k] = _mm256_round_ps(q, QK_NEAREST);
            __m256 off = _mm256_andnot_ps(sign, _mm256_sub_ps(q, t[k]));
            bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(off, limit, _CMP_GE_OQ),
                                                 _mm256_cmp_ps(_mm256_andnot_ps(sign, q), big, _CMP_GT_OQ)));
        }
        if (_mm256_movemask_ps(bad))
            for (int k = 0; k < 4; k++) t[k] = _mm256_round_ps(_mm256_div_ps(p[k], vsy), QK_NEAREST);
        __m256i r[4];
        for (int k = 0; k < 4; k++)
            r[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(t[k], vzy), vlo), vhi));
        __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(r[0], r[1]), _mm256_packus_epi32(r[2], r[3]));
        bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(y + i), bytes);
    }
    mul_row(a + i, g + i, y + i, c - i, sa, za, sy, zy, lo, hi); /* the tail */
}

QK_TARGET("avx512f,avx512bw") __attribute__((optimize("O3", "fp-contract=off", "no-math-errno"))) static void
mul_row_avx512(const uint8_t *restrict a, const float *restrict g, uint8_t *restrict y, int64_t c,
               float sa, float za, float sy, float zy, float lo, float hi) {
    const __m512 vsa = _mm512_set1_ps(sa), vza = _mm512_set1_ps(za), vsy = _mm512_set1_ps(sy);
    const __m512 vinv = _mm512_set1_ps(1.0f / sy), vzy = _mm512_set1_ps(zy);
    const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
    const __m512 limit = _mm512_set1_ps(QK_GATE_LIMIT), big = _mm512_set1_ps(512.0f);
    int64_t i = 0;
    for (; i + 16 <= c; i += 16) {
        __m512i a32 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(a + i)));
        __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(a32), vza), vsa);
        __m512 p = _mm512_mul_ps(v, _mm512_loadu_ps(g + i));
        __m512 q = _mm512_mul_ps(p, vinv);
        __m512 t = _mm512_roundscale_ps(q, QK_NEAREST);
        if (_mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(q, t)), limit, _CMP_GE_OQ)
            | _mm512_cmp_ps_mask(_mm512_abs_ps(q), big, _CMP_GT_OQ))
            t = _mm512_roundscale_ps(_mm512_div_ps(p, vsy), QK_NEAREST);
        __m512i r = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_add_ps(t, vzy), vlo), vhi));
        _mm_storeu_si128((__m128i *)(y + i), _mm512_cvtusepi32_epi8(r));
    }
    mul_row(a + i, g + i, y + i, c - i, sa, za, sy, zy, lo, hi); /* the tail */
}
#endif

__attribute__((optimize("O3", "fp-contract=off", "no-math-errno"))) static void mul_row(
    const uint8_t *restrict a, const float *restrict g, uint8_t *restrict y, int64_t c, float sa,
    float za, float sy, float zy, float lo, float hi) {
    for (int64_t i = 0; i < c; i++) {
        float v = ((float)a[i] - za) * sa;
        v = __builtin_rintf((v * g[i]) / sy) + zy;
        v = v < lo ? lo : v;
        y[i] = (uint8_t)(v > hi ? hi : v);
    }
}

void qk_mul_channel_u8(const uint8_t *a, const float *g, uint8_t *y, int64_t n, int64_t hw, int64_t c,
                       int64_t g_batch_stride, float sa, int32_t za, float sy, int32_t zy, float lo,
                       float hi) {
    __typeof__(&mul_row) row = mul_row;
#if QK_X86
    if (has_avx512bw())
        row = mul_row_avx512;
    else if (has_avx2_fma())
        row = mul_row_avx2;
#endif
#pragma omp parallel for schedule(static) collapse(2) if (n * hw * c > QK_BLOCK)
    for (int64_t b = 0; b < n; b++)
        for (int64_t p = 0; p < hw; p++) {
            const int64_t at = (b * hw + p) * c;
            row(a + at, g + b * g_batch_stride, y + at, c, sa, (float)za, sy, (float)zy, lo, hi);
        }
}

/* qk_mul_channel_u8 with a uint8 gate gq at (sg, zg), dequantized here as the graph runtime's _dq
 * does it: f32(f32(q - zg) * sg). Saves the float gate's three torch ops per squeeze-excite.
 * Returns 1 if out of memory (nothing written), else 0. */
__attribute__((optimize("fp-contract=off"))) int qk_mul_channel_gate_u8(
    const uint8_t *a, const uint8_t *gq, uint8_t *y, int64_t n, int64_t hw, int64_t c,
    int64_t g_batch_stride, float sa, int32_t za, float sg, int32_t zg, float sy, int32_t zy, float lo,
    float hi) {
    int64_t rows = g_batch_stride ? n : 1;
    float stack[4096], *g = rows * c <= 4096 ? stack : malloc((size_t)(rows * c) * sizeof(float));
    if (!g) return 1;
    for (int64_t i = 0; i < rows * c; i++) g[i] = ((float)gq[i] - (float)zg) * sg;
#pragma GCC diagnostic push /* -Wall: gcc cannot see the loop above fill every value read */
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
    qk_mul_channel_u8(a, g, y, n, hw, c, g_batch_stride, sa, za, sy, zy, lo, hi);
#pragma GCC diagnostic pop
    if (g != stack) free(g);
    return 0;
}
