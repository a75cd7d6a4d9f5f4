/* Weight-only linear layers (quanta.kernels.weight_only): float32 activations times int8 or int4
 * weights dequantized on the fly inside the dot product, float32 accumulation. A decode step
 * (one row) is a GEMV bound by how many weight bytes it reads: int8 reads 1/4 of fp32's bytes,
 * int4 1/8. Output rows run in parallel (OpenMP); an AVX2+FMA build beside a plain one.
 *
 * int8: w [n, k] int8, symmetric per output channel: y[m, j] = scale[j] * sum_i x[m, i] w[j, i].
 * int4: w [n, k / 2] uint8; in each block of 32 columns, byte b (0..15) holds column b in its low
 * nibble and column b + 16 in its high nibble; q in 0..15 means q * scale[j, g] + offset[j, g]
 * for group g = i / group (group a multiple of 32; the last group may be shorter), so
 * y[m, j] = sum_g scale[j, g] * sum_{i in g} q x[m, i] + offset[j, g] * sum_{i in g} x[m, i]. */
#include <stdlib.h>

#include "weight_only.h"

/* ---- plain builds ---- */
static float dot_s8_plain(const float *x, const int8_t *w, int64_t k) {
    float acc = 0.0f;
    for (int64_t i = 0; i < k; i++) acc += x[i] * (float)w[i];
    return acc;
}

/* sum over [0, len) of q x (len a multiple of 32, packed as described above) */
static float dot_u4_plain(const float *x, const uint8_t *w, int64_t len) {
    float acc = 0.0f;
    for (int64_t b = 0; b < len; b += 32, w += 16, x += 32)
        for (int j = 0; j < 16; j++) acc += x[j] * (float)(w[j] & 15) + x[j + 16] * (float)(w[j] >> 4);
    return acc;
}

#if QK_X86
QK_TARGET("avx2,fma") static float dot_s8_avx2(const float *x, const int8_t *w, int64_t k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        _mm_prefetch((const char *)(w + i) + QK_WO_PREFETCH, _MM_HINT_T0);
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i))));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i + 8))));
        __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i + 16))));
        __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i + 24))));
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= k; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i)))),
                             _mm256_loadu_ps(x + i), a0);
    float acc = qk_hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < k; i++) acc += x[i] * (float)w[i];
    return acc;
}

/* the group's q . x as 8 partial sums (len a multiple of 32) */
QK_TARGET("avx2,fma") static inline __m256 dot_u4_avx2(const float *x, const uint8_t *w, int64_t len) {
    const __m128i low = _mm_set1_epi8(15);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (int64_t b = 0; b < len; b += 32, w += 16, x += 32) {
        if ((b & 63) == 0) _mm_prefetch((const char *)w + QK_WO_PREFETCH, _MM_HINT_T0);
        __m128i bytes = _mm_loadu_si128((const __m128i *)w);
        __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
        __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(x), a0);
        a1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(x + 8), a1);
        a0 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(x + 16), a0);
        a1 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(x + 24), a1);
    }
    return _mm256_add_ps(a0, a1);
}

QK_TARGET("avx2,fma") static float row_u4_avx2(const float *x, const float *xsum, const uint8_t *w,
                                               const float *scale, const float *offset, int64_t k,
                                               int64_t group) {
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    int64_t g = 0;
    for (int64_t i = 0; i < k; i += group, g++) {
        int64_t len = k - i < group ? k - i : group;
        acc = _mm256_fmadd_ps(dot_u4_avx2(x + i, w + i / 2, len), _mm256_set1_ps(scale[g]), acc);
        off += offset[g] * xsum[g];
    }
    return qk_hsum256(acc) + off;
}
#endif

static float row_u4_plain(const float *x, const float *xsum, const uint8_t *w, const float *scale,
                          const float *offset, int64_t k, int64_t group) {
    float acc = 0.0f;
    int64_t g = 0;
    for (int64_t i = 0; i < k; i += group, g++) {
        int64_t len = k - i < group ? k - i : group;
        acc += scale[g] * dot_u4_plain(x + i, w + i / 2, len) + offset[g] * xsum[g];
    }
    return acc;
}

static float dot_s8(int fast, const float *x, const int8_t *w, int64_t k) {
#if QK_X86
    if (fast) return dot_s8_avx2(x, w, k);
#endif
    (void)fast;
    return dot_s8_plain(x, w, k);
}

static float row_u4(int fast, const float *x, const float *xsum, const uint8_t *w, const float *scale,
                    const float *offset, int64_t k, int64_t group) {
#if QK_X86
    if (fast) return row_u4_avx2(x, xsum, w, scale, offset, k, group);
#endif
    (void)fast;
    return row_u4_plain(x, xsum, w, scale, offset, k, group);
}

/* y [m, n] = x [m, k] @ dequantized(w).T (+ bias); the fast path unless `plain`. */
void qk_wo_linear_s8(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale,
                     int64_t n, const float *bias, float *y, int plain) {
    int fast = !plain && has_avx2_fma();
#pragma omp parallel for schedule(static) if (n * k >= QK_WO_PARALLEL_MIN)
    for (int64_t j = 0; j < n; j++) {
        const int8_t *wj = w + j * k;
        for (int64_t r = 0; r < m; r++) {
            float v = scale[j] * dot_s8(fast, x + r * k, wj, k);
            y[r * n + j] = bias ? v + bias[j] : v;
        }
    }
}

/* the int4 form above; k a multiple of 32, group a multiple of 32 (see the file comment) */
void qk_wo_linear_u4(const float *x, int64_t m, int64_t k, const uint8_t *w, const float *scale,
                     const float *offset, int64_t group, int64_t n, const float *bias, float *y,
                     int plain) {
    int fast = !plain && has_avx2_fma();
    int64_t groups = (k + group - 1) / group;
    float *xsum = malloc(sizeof(float) * (size_t)(m * groups > 0 ? m * groups : 1));
    if (xsum == NULL) return;
    qk_wo_group_sums(x, m, k, group, xsum);
#pragma omp parallel for schedule(static) if (n * k >= QK_WO_PARALLEL_MIN)
    for (int64_t j = 0; j < n; j++) {
        const uint8_t *wj = w + j * (k / 2);
        for (int64_t r = 0; r < m; r++) {
            float v = row_u4(fast, x + r * k, xsum + r * groups, wj, scale + j * groups,
                             offset + j * groups, k, group);
            y[r * n + j] = bias ? v + bias[j] : v;
        }
    }
    free(xsum);
}

/* float32 weights [n, k] of either format (for prefill: dequantize, then sgemm); `plain`: no AVX2 */
static void dequant_s8_row_plain(const int8_t *w, float s, int64_t k, float *o) {
    for (int64_t i = 0; i < k; i++) o[i] = (float)w[i] * s;
}

#if QK_X86
QK_TARGET("avx2,fma") static void dequant_s8_row_avx2(const int8_t *w, float scale, int64_t k, float *o) {
    __m256 s = _mm256_set1_ps(scale);
    int64_t i = 0;
    for (; i + 8 <= k; i += 8)
        _mm256_storeu_ps(o + i, _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i)))), s));
    for (; i < k; i++) o[i] = (float)w[i] * scale;
}
#endif

void qk_wo_dequant_s8(const int8_t *w, const float *scale, int64_t n, int64_t k, float *out, int plain) {
    int fast = !plain && has_avx2_fma();
#pragma omp parallel for schedule(static) if (n * k >= QK_WO_PARALLEL_MIN)
    for (int64_t j = 0; j < n; j++) {
#if QK_X86
        if (fast) {
            dequant_s8_row_avx2(w + j * k, scale[j], k, out + j * k);
            continue;
        }
#endif
        (void)fast;
        dequant_s8_row_plain(w + j * k, scale[j], k, out + j * k);
    }
}

static void dequant_u4_row_plain(const uint8_t *w, const float *scale, const float *offset, int64_t group,
                                 int64_t k, float *o) {
    for (int64_t i = 0; i < k; i += 32, w += 16) {  /* a block of 32 lies in one group */
        float s = scale[i / group], f = offset[i / group];
        for (int b = 0; b < 16; b++) {
            o[i + b] = (float)(w[b] & 15) * s + f;
            o[i + b + 16] = (float)(w[b] >> 4) * s + f;
        }
    }
}

#if QK_X86
/* q * s + f rounded twice, as the plain loop and the specification's float32 do: target "avx2"
   without "fma", or gcc's default -ffp-contract=fast fuses the multiply and the add */
QK_TARGET("avx2") static inline __m256 madd_nofma(__m256 q, __m256 s, __m256 f) {
    return _mm256_add_ps(_mm256_mul_ps(q, s), f);
}

QK_TARGET("avx2") static void dequant_u4_row_avx2(const uint8_t *w, const float *scale,
                                                      const float *offset, int64_t group, int64_t k,
                                                      float *o) {
    const __m128i low = _mm_set1_epi8(15);
    for (int64_t i = 0; i < k; i += 32, w += 16) {
        __m256 s = _mm256_set1_ps(scale[i / group]), f = _mm256_set1_ps(offset[i / group]);
        __m128i bytes = _mm_loadu_si128((const __m128i *)w);
        __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
        _mm256_storeu_ps(o + i, madd_nofma(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), s, f));
        _mm256_storeu_ps(o + i + 8, madd_nofma(
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), s, f));
        _mm256_storeu_ps(o + i + 16, madd_nofma(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), s, f));
        _mm256_storeu_ps(o + i + 24, madd_nofma(
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), s, f));
    }
}
#endif

void qk_wo_dequant_u4(const uint8_t *w, const float *scale, const float *offset, int64_t group,
                      int64_t n, int64_t k, float *out, int plain) {
    int64_t groups = (k + group - 1) / group;
    int fast = !plain && has_avx2_fma();
#pragma omp parallel for schedule(static) if (n * k >= QK_WO_PARALLEL_MIN)
    for (int64_t j = 0; j < n; j++) {
        const uint8_t *wj = w + j * (k / 2);
#if QK_X86
        if (fast) {
            dequant_u4_row_avx2(wj, scale + j * groups, offset + j * groups, group, k, out + j * k);
            continue;
        }
#endif
        (void)fast;
        dequant_u4_row_plain(wj, scale + j * groups, offset + j * groups, group, k, out + j * k);
    }
}
