/* quanta's native uint8 pooling kernels on NHWC data: max pooling and adaptive average pooling.
 *
 * Each computes exactly what quanta's QTensor rule computes; the tests compare them element for
 * element. Threads are torch's OpenMP pool, as in elementwise.c.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "common.h"

/* uint8 max pooling on NHWC data, no dilation; taps outside the input are skipped (they never
 * win: every value is >= 0 and each window holds at least one real tap, checked by the caller). */
__attribute__((optimize("O3"))) void qk_max_pool_u8(const uint8_t *x, uint8_t *y, int64_t n, int64_t c,
                                                   int64_t h, int64_t w, int64_t kh, int64_t kw,
                                                   int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                                                   int64_t oh, int64_t ow) {
#pragma omp parallel for schedule(static) collapse(2) if (n * oh * ow * c * kh * kw > 4 * QK_BLOCK)
    for (int64_t b = 0; b < n; b++)
        for (int64_t oy = 0; oy < oh; oy++)
            for (int64_t ox = 0; ox < ow; ox++) {
                uint8_t *restrict out = y + ((b * oh + oy) * ow + ox) * c;
                memset(out, 0, (size_t)c);
                for (int64_t i = 0; i < kh; i++) {
                    int64_t iy = oy * sh - ph + i;
                    if (iy < 0 || iy >= h) continue;
                    for (int64_t j = 0; j < kw; j++) {
                        int64_t ix = ox * sw - pw + j;
                        if (ix < 0 || ix >= w) continue;
                        const uint8_t *restrict in = x + ((b * h + iy) * w + ix) * c;
                        for (int64_t ch = 0; ch < c; ch++) out[ch] = in[ch] > out[ch] ? in[ch] : out[ch];
                    }
                }
            }
}

/* Adds (q - zp) over pixels [p0, p1) of one image's NHWC rows into sum[c] (int32: exact). The
 * raw values are summed four pixels at a time into uint16 (at most 256 pixels: 256 * 255 fits),
 * then into int32, and zp * count comes off at the end: the same integers with a quarter of the
 * accumulator traffic (the per-pixel int32 update bounded the plain loop). */
__attribute__((optimize("O3"))) static void add_pixels(const uint8_t *x, int32_t *restrict sum, int64_t c,
                                                      int64_t p0, int64_t p1, int32_t zp) {
    uint16_t acc[4096];
    if (c > 4096) {
        for (int64_t p = p0; p < p1; p++) {
            const uint8_t *restrict in = x + p * c;
            for (int64_t ch = 0; ch < c; ch++) sum[ch] += (int32_t)in[ch] - zp;
        }
        return;
    }
    for (int64_t start = p0; start < p1; start += 256) {
        int64_t end = p1 - start < 256 ? p1 : start + 256, p = start;
        memset(acc, 0, (size_t)c * sizeof(uint16_t));
        for (; p + 4 <= end; p += 4) {
            const uint8_t *restrict a = x + p * c, *restrict b = a + c, *restrict d = b + c, *restrict e = d + c;
            for (int64_t ch = 0; ch < c; ch++)
                acc[ch] += (uint16_t)((uint16_t)a[ch] + b[ch] + d[ch] + e[ch]);
        }
        for (; p < end; p++)
            for (int64_t ch = 0; ch < c; ch++) acc[ch] += x[p * c + ch];
        for (int64_t ch = 0; ch < c; ch++) sum[ch] += acc[ch];
    }
    for (int64_t ch = 0; ch < c; ch++) sum[ch] -= zp * (int32_t)(p1 - p0);
}

/* One averaged output: the exact window sum over the window size in float32, rounded half to
 * even, + zp, clamped to [0, 255]. */
static inline uint8_t average_u8(int64_t sum, float count, float zp) {
    float v = __builtin_rintf((float)sum / count) + zp;
    v = v < 0.0f ? 0.0f : v;
    return (uint8_t)(v > 255.0f ? 255.0f : v);
}

/* uint8 adaptive average pooling on NHWC data, as quanta's QTensor rule: the float average of
 * (q - zp) over torch's adaptive windows (the sum formed exactly, in int32, then divided in float32
 * by the window size), rounded half to even, + zp, clamped to [0, 255]. */
__attribute__((optimize("O3", "no-math-errno"))) void qk_adaptive_avg_pool_u8(
    const uint8_t *x, uint8_t *y, int64_t n, int64_t c, int64_t h, int64_t w, int64_t oh, int64_t ow,
    int32_t zero_point) {
    float zp = (float)zero_point;
    if (oh == 1 && ow == 1 && n * h * w * c > 4 * QK_BLOCK) {
        /* global pooling (squeeze-excite, a classifier head): one window per image, so split each
         * image's pixels across the threads and add their exact partial sums */
        int threads = omp_get_max_threads();
        int32_t *partial = malloc((size_t)(threads * c) * sizeof(int32_t));
        if (partial) {
            for (int64_t b = 0; b < n; b++) {
                const uint8_t *img = x + b * h * w * c;
#pragma omp parallel num_threads(threads)
                {
                    int t = omp_get_thread_num(), nt = omp_get_num_threads();
                    int64_t p0 = h * w * t / nt, p1 = h * w * (t + 1) / nt;
                    memset(partial + t * c, 0, (size_t)c * sizeof(int32_t));
                    add_pixels(img, partial + t * c, c, p0, p1, zero_point);
#pragma omp barrier
#pragma omp for schedule(static)
                    for (int64_t ch = 0; ch < c; ch++) {
                        int64_t total = 0;
                        for (int i = 0; i < nt; i++) total += partial[i * c + ch];
                        y[b * c + ch] = average_u8(total, (float)(h * w), zp);
                    }
                }
            }
            free(partial);
            return;
        }
    }
#pragma omp parallel for schedule(static) collapse(2) if (n * h * w * c > 4 * QK_BLOCK)
    for (int64_t b = 0; b < n; b++)
        for (int64_t oy = 0; oy < oh; oy++) {
            int32_t sum[c];
            int64_t y0 = oy * h / oh, y1 = ((oy + 1) * h + oh - 1) / oh;
            for (int64_t ox = 0; ox < ow; ox++) {
                int64_t x0 = ox * w / ow, x1 = ((ox + 1) * w + ow - 1) / ow;
                for (int64_t ch = 0; ch < c; ch++) sum[ch] = 0;
                for (int64_t iy = y0; iy < y1; iy++)
                    add_pixels(x + (b * h + iy) * w * c, sum, c, x0, x1, zero_point);
                float count = (float)((y1 - y0) * (x1 - x0));
                uint8_t *out = y + ((b * oh + oy) * ow + ox) * c;
                for (int64_t ch = 0; ch < c; ch++) out[ch] = average_u8(sum[ch], count, zp);
            }
        }
}
