/* What the two weight-only C files share: the parallel threshold, the prefetch distance, the
 * AVX2 horizontal sum and the float-activation int4 GEMV (the int8-activation one falls back to
 * it on NaN/Inf inputs). */
#pragma once
#include <stdint.h>

#include "common.h"
#if QK_X86
#include <immintrin.h>
#endif

#define QK_WO_PARALLEL_MIN 65536 /* weights below which one thread runs the whole layer */
/* Decode reads each weight once from DRAM: the hardware prefetcher alone left the GEMV at a third
   of the memory bandwidth (8 GB/s against sgemv's 26, measured), so the loops also prefetch this
   many bytes ahead in the weight stream (a thread's rows are contiguous, so this runs into the
   next rows). */
#define QK_WO_PREFETCH 4096

#if QK_X86
QK_TARGET("avx2,fma") static inline float qk_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

QK_TARGET("avx2,fma") static inline float qk_hmax256(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* xsum [m, groups]: the float sum of each row of x [m, k] over each group of `group` columns
   (the last group may be shorter); both int4 GEMVs apply their offsets through it */
static inline void qk_wo_group_sums(const float *x, int64_t m, int64_t k, int64_t group, float *xsum) {
    int64_t groups = (k + group - 1) / group;
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            int64_t stop = (g + 1) * group < k ? (g + 1) * group : k;
            for (int64_t i = g * group; i < stop; i++) s += x[r * k + i];
            xsum[r * groups + g] = s;
        }
}

void qk_wo_linear_u4(const float *x, int64_t m, int64_t k, const uint8_t *w, const float *scale,
                     const float *offset, int64_t group, int64_t n, const float *bias, float *y,
                     int plain);
