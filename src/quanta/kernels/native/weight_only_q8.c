/* The int4 weight-only GEMV with int8 activations (QuantConfig.int4_activations = "int8"), the
 * decode path of 4-bit weight-only layers. Each row of x is quantized per block of 32 columns
 * (symmetric: xs = max|x| / 127, xq = round-half-even(x / xs)), and each block's 32 products
 * q * xq are summed exactly in integers: vpmaddubsw's int16 pairs hold at most 2 * 15 * 127 = 3810,
 * so there is no saturation on any AVX2 CPU, VNNI or not. That is one float multiply-add per
 * block of 32 weights instead of one per weight (the float-activation GEMV in weight_only.c is
 * bound by its conversions, not by memory). As in llama.cpp's Q4 x Q8 dot products:
 *   y[m, j] = sum_b xs[m, b] * scale[j, g(b)] * sum_{i in b} (q[j, i] - 8) * xq[m, i]
 *           + sum_g (offset[j, g] + 8 * scale[j, g]) * sum_{i in g} x[m, i]   (float sums of x)
 * Centring q on 8 halves the error against float activations (|q - 8| <= 8, q <= 15). The loops
 * multiply q itself (vpmaddubsw takes unsigned bytes times signed ones) and fold the -8 into the
 * group term, per row of x and group: -8 * scale * sum_{b in g} xs[b] * sum_{i in b} xq[i], so
 *   y = sum_b xs * scale * sum q xq + sum_g offset * xsum[g] + 8 * scale * (xsum[g] - xqsum[g])
 * with xqsum[g] the sum of the quantized x (the same value; one float term per group, not per
 * block and row). NaN/Inf in x: the whole call runs the float-activation GEMV, which carries
 * them as float does. The specification is
 * quanta.kernels.weight_only.reference_linear_int8_activations (plain torch integer arithmetic). */
#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "weight_only.h"

/* one block of 32: xs = max|x| / 127, xq = round-half-even(x / xs); returns 1 if x holds NaN or Inf */
static int quantize_block_plain(const float *xb, int8_t *q, float *xs) {
    int nonfinite = 0;
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) {
        float a = fabsf(xb[i]);
        if (!(a <= FLT_MAX)) nonfinite = 1;
        else if (a > amax) amax = a;
    }
    float s = amax / 127.0f;
    *xs = s;
    for (int i = 0; i < 32; i++) {
        float v = s > 0.0f ? nearbyintf(xb[i] / s) : 0.0f;
        q[i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
    }
    return nonfinite;
}

#if QK_X86
/* the same block with AVX2: the same IEEE division and round-to-nearest-even, so the same bytes */
QK_TARGET("avx2,fma") static int quantize_block_avx2(const float *xb, int8_t *q, float *xs) {
    const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(FLT_MAX);
    __m256 v[4], amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        __m256 a = _mm256_andnot_ps(sign, v[i]);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));  /* NaN or > FLT_MAX */
        amax = _mm256_max_ps(amax, a);
    }
    if (_mm256_movemask_ps(bad)) return quantize_block_plain(xb, q, xs);
    float s = qk_hmax256(amax) / 127.0f;
    *xs = s;
    if (!(s > 0.0f)) {
        for (int i = 0; i < 32; i++) q[i] = 0;
        return 0;
    }
    __m256 sv = _mm256_set1_ps(s), lim = _mm256_set1_ps(127.0f);
    __m256i n[4];
    for (int i = 0; i < 4; i++) {
        __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        n[i] = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(r, lim), _mm256_sub_ps(_mm256_setzero_ps(), lim)));
    }
    /* int32 -> int8 keeping order: the packs interleave 128-bit lanes, the permute undoes it */
    __m256i a16 = _mm256_packs_epi32(n[0], n[1]), b16 = _mm256_packs_epi32(n[2], n[3]);
    __m256i b8 = _mm256_packs_epi16(a16, b16);
    b8 = _mm256_permutevar8x32_epi32(b8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, b8);
    return 0;
}
#endif

/* xq [m, k] int8 and xs [m, k / 32] (k a multiple of 32); returns 1 if x holds NaN or Inf;
   `plain`: the loop without AVX2 (the same bytes) */
int qk_wo_quantize_blocks(const float *x, int64_t m, int64_t k, int8_t *xq, float *xs, int plain) {
    int nonfinite = 0, fast = !plain && has_avx2_fma();
    for (int64_t b = 0; b < m * (k / 32); b++) {
#if QK_X86
        if (fast) {
            nonfinite |= quantize_block_avx2(x + b * 32, xq + b * 32, xs + b);
            continue;
        }
#endif
        nonfinite |= quantize_block_plain(x + b * 32, xq + b * 32, xs + b);
    }
    (void)fast;
    return nonfinite;
}

static float row_q8_plain(const int8_t *xq, const float *xs, const uint8_t *w, const float *scale,
                          int64_t k, int64_t per) {
    float acc = 0.0f;
    for (int64_t b = 0; b < k / 32; b++, w += 16, xq += 32) {
        int32_t dot = 0;
        for (int i = 0; i < 16; i++) dot += (w[i] & 15) * xq[i] + (w[i] >> 4) * xq[i + 16];
        acc += (float)dot * (xs[b] * scale[b / per]);  /* (the AVX2 loop walks groups, no division) */
    }
    return acc;
}

#if QK_X86
/* block b of one weight row: its 32 values q (0..15) as bytes, in x's column order: the 16 bytes
   in both 128-bit lanes, the high lane shifted right by 4 (one broadcast load, one shift, one and) */
QK_TARGET("avx2,fma") static inline __m256i block_nibbles(const uint8_t *w) {
    __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)w));
    return _mm256_and_si256(_mm256_srlv_epi64(both, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(15));
}

/* sum over block b of q * xq (vpmaddubsw: unsigned q times signed xq, pairs <= 2 * 15 * 127)
   as 8 int32 lanes, scaled by xs[b] * (the row's group scale, broadcast) into acc */
#define QK_Q8_BLOCK(acc, wrow, sv)                                                                \
    do {                                                                                          \
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(block_nibbles((wrow) + b * 16), xv), ones); \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(xsb, sv), acc);               \
    } while (0)

/* sum_g offset[g] * xsum[g] + 8 * scale[g] * xres[g]: eight groups per step (a scalar loop would
   chain one float add per group, longer than the whole block loop at k = 576 with groups of 32) */
QK_TARGET("avx2,fma") static float group_terms_avx2(const float *offset, const float *xsum, const float *scale,
                                                    const float *xres, int64_t groups) {
    __m256 a = _mm256_setzero_ps(), c = a, eight = _mm256_set1_ps(8.0f);
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
        a = _mm256_fmadd_ps(_mm256_loadu_ps(offset + g), _mm256_loadu_ps(xsum + g), a);
        c = _mm256_fmadd_ps(_mm256_mul_ps(eight, _mm256_loadu_ps(scale + g)), _mm256_loadu_ps(xres + g), c);
    }
    float v = qk_hsum256(_mm256_add_ps(a, c));
    for (; g < groups; g++) v += offset[g] * xsum[g] + 8.0f * scale[g] * xres[g];
    return v;
}

/* rows j .. j + count - 1 (count 1 or 4: four rows share each block of x) */
QK_TARGET("avx2,fma") static void rows_q8_avx2(const int8_t *xq, const float *xs, const uint8_t *w,
                                               const float *scale, int64_t k, int64_t per,
                                               int64_t groups, int count, float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t stride = k / 2, blocks = k / 32;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t g = 0, b = 0; g < groups; g++) {
        __m256 s0 = _mm256_broadcast_ss(scale + g), s1 = s0, s2 = s0, s3 = s0;
        if (count == 4) {
            s1 = _mm256_broadcast_ss(scale + groups + g);
            s2 = _mm256_broadcast_ss(scale + 2 * groups + g);
            s3 = _mm256_broadcast_ss(scale + 3 * groups + g);
        }
        int64_t stop = b + per < blocks ? b + per : blocks;
        for (; b < stop; b++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
            __m256 xsb = _mm256_broadcast_ss(xs + b);
            if ((b & 3) == 0)
                for (int r = 0; r < count; r++)
                    _mm_prefetch((const char *)(w + r * stride + b * 16) + QK_WO_PREFETCH, _MM_HINT_T0);
            QK_Q8_BLOCK(a0, w, s0);
            if (count == 4) {
                QK_Q8_BLOCK(a1, w + stride, s1);
                QK_Q8_BLOCK(a2, w + 2 * stride, s2);
                QK_Q8_BLOCK(a3, w + 3 * stride, s3);
            }
        }
    }
    out[0] = qk_hsum256(a0);
    if (count == 4) {
        out[1] = qk_hsum256(a1);
        out[2] = qk_hsum256(a2);
        out[3] = qk_hsum256(a3);
    }
}
#endif

/* the layout and arguments of qk_wo_linear_u4 (weight_only.c); `plain`: no AVX2 */
void qk_wo_linear_u4_q8(const float *x, int64_t m, int64_t k, const uint8_t *w, const float *scale,
                        const float *offset, int64_t group, int64_t n, const float *bias, float *y,
                        int plain) {
    int fast = !plain && has_avx2_fma();
    int64_t groups = (k + group - 1) / group, blocks = k / 32, per = group / 32;
    /* one allocation: xs [m, blocks], xsum and xres [m, groups] floats, then xq [m, k] bytes */
    float *xs = malloc(sizeof(float) * (size_t)(m * (blocks + 2 * groups)) + (size_t)(m * k) + 1);
    float *xsum = xs + m * blocks, *xres = xsum + m * groups;
    int8_t *xq = (int8_t *)(xres + m * groups);
    if (xs == NULL || qk_wo_quantize_blocks(x, m, k, xq, xs, plain)) {
        free(xs);
        qk_wo_linear_u4(x, m, k, w, scale, offset, group, n, bias, y, plain);
        return;
    }
    qk_wo_group_sums(x, m, k, group, xsum);
    for (int64_t r = 0; r < m; r++)  /* xres: the part of each group's sum the int8 blocks lose */
        for (int64_t g = 0; g < groups; g++) {
            float sq = 0.0f;
            int64_t stop = (g + 1) * group < k ? (g + 1) * group : k;
            for (int64_t b = g * per; b < (stop + 31) / 32; b++) {
                int32_t t = 0;
                for (int i = 0; i < 32; i++) t += xq[r * k + b * 32 + i];
                sq += xs[r * blocks + b] * (float)t;
            }
            xres[r * groups + g] = xsum[r * groups + g] - sq;
        }
    int64_t quads = (n + 3) / 4;
#pragma omp parallel for schedule(static) if (n * k >= QK_WO_PARALLEL_MIN)
    for (int64_t t = 0; t < quads; t++) {
        int64_t j0 = 4 * t, count = n - j0 < 4 ? n - j0 : 4;
        for (int64_t r = 0; r < m; r++) {
            const int8_t *xr = xq + r * k;
            const float *sr = xs + r * blocks, *xg = xsum + r * groups, *xr_res = xres + r * groups;
            float dots[4];
#if QK_X86
            if (fast && count == 4) {
                rows_q8_avx2(xr, sr, w + j0 * (k / 2), scale + j0 * groups, k, per, groups, 4, dots);
            } else if (fast) {
                for (int64_t c = 0; c < count; c++)
                    rows_q8_avx2(xr, sr, w + (j0 + c) * (k / 2), scale + (j0 + c) * groups, k, per, groups,
                                 1, dots + c);
            } else
#endif
                for (int64_t c = 0; c < count; c++)
                    dots[c] = row_q8_plain(xr, sr, w + (j0 + c) * (k / 2), scale + (j0 + c) * groups, k, per);
            for (int64_t c = 0; c < count; c++) {
                const float *sj = scale + (j0 + c) * groups, *oj = offset + (j0 + c) * groups;
                float v = dots[c];
#if QK_X86
                if (fast)
                    v += group_terms_avx2(oj, xg, sj, xr_res, groups);
                else
#endif
                    for (int64_t g = 0; g < groups; g++) v += oj[g] * xg[g] + 8.0f * sj[g] * xr_res[g];
                y[r * n + j0 + c] = bias ? v + bias[j0 + c] : v;
            }
        }
    }
    free(xs);
    (void)fast;
}
