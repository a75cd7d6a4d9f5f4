/* quanta's native executor: a converted model's whole forward as one C call.
 *
 * The graph runtime's generated Python calls one native kernel per op; at batch 1 each call
 * costs ~10 us of Python (ctypes, an output tensor, a layout view), 1-3 ms per forward on the
 * CNNs of benchmarks/. quanta/modules/native_program.py turns a forward whose every op has a
 * native kernel into an array of steps over numbered buffers (0: the float input, 1: the
 * output, the rest inside one arena), and qk_program_run runs them in order. Each step calls
 * the same kernel the Python path calls, with the same arguments, so the result is the same
 * bit for bit (checked when the program is built).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "common.h"

/* the kernels of primitives.c and elementwise.c */
int qk_run(void *op, void *src, void *dst, float src_scale, int32_t src_zp, float dst_scale,
           int32_t dst_zp);
int qk_quantize_u8(const float *x, uint8_t *y, int64_t n, int64_t c, int64_t inner, float scale,
                   int32_t zero_point, int to_channels_last, float inv);
void qk_add_u8(const uint8_t *a, const uint8_t *b, uint8_t *y, int64_t n, float ra, float rb,
               float k, float lo, float hi);
void qk_add_fixed_u8(const uint8_t *a, const uint8_t *b, uint8_t *y, int64_t n, int32_t ma,
                     int32_t mb, int32_t bias, int32_t shift, int32_t zp, int32_t lo, int32_t hi);
void qk_max_pool_u8(const uint8_t *x, uint8_t *y, int64_t n, int64_t c, int64_t h, int64_t w,
                    int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                    int64_t oh, int64_t ow);
void qk_adaptive_avg_pool_u8(const uint8_t *x, uint8_t *y, int64_t n, int64_t c, int64_t h,
                             int64_t w, int64_t oh, int64_t ow, int32_t zero_point);
int qk_mul_channel_gate_u8(const uint8_t *a, const uint8_t *gq, uint8_t *y, int64_t n, int64_t hw,
                           int64_t c, int64_t g_batch_stride, float sa, int32_t za, float sg,
                           int32_t zg, float sy, int32_t zy, float lo, float hi);

/* step kinds: the same numbers as native_program.py's Kind */
enum {
    QK_QUANTIZE,   /* i: n, c, inner, zp, to_channels_last; f: scale, inv */
    QK_OP,         /* op: qk_op; i: src_zp, dst_zp; f: dst_scale */
    QK_ADD,        /* i: n; f: ra, rb, k, lo, hi */
    QK_ADD_FIXED,  /* i: n, ma, mb, bias, shift, zp, lo, hi */
    QK_ADD_TABLE,  /* op: uint8 table[65536] indexed by a * 256 + b; i: n */
    QK_MAX_POOL,   /* i: n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow */
    QK_AVG_POOL,   /* i: n, c, h, w, oh, ow, zp */
    QK_GATE,       /* i: n, hw, c, g_batch_stride, za, zg, zy; f: sa, sg, sy, lo, hi */
    QK_CLAMP,      /* i: n, lo, hi */
    QK_TO_NCHW,    /* i: n, c, hw: uint8 NHWC data copied in NCHW order (a flatten after a conv) */
    QK_PAD,        /* i: n, c, h, w, top, bottom, left, right, value: NHWC constant padding */
    QK_CAT,        /* op: int64 [parts][3] = (buffer, row bytes, 256-byte requantize table or 0);
                      i: rows, parts, output row bytes: each output row is the parts' rows in turn */
};

typedef struct {
    int64_t kind, src0, src1, dst; /* buffer numbers; -1: none */
    void *op;
    int64_t i[12];
    float f[8];
} qk_step;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int run_step(const qk_step *p, void *const *buffers);

/* Runs steps[0..count) over buffers. Returns 0, 1 if the input holds NaN or Inf (nothing else
 * ran), or 2 if a kernel failed (qk_last_error says why for a conv/matmul; a gate fails only
 * when out of memory). seconds: NULL, or count doubles that receive each step's wall time. */
int qk_program_run(const qk_step *steps, int64_t count, void *const *buffers, double *seconds) {
    for (int64_t s = 0; s < count; s++) {
        double start = seconds ? now() : 0.0;
        int status = run_step(&steps[s], buffers);
        if (status) return status;
        if (seconds) seconds[s] = now() - start;
    }
    return 0;
}

static int run_step(const qk_step *p, void *const *buffers) {
    const int64_t *i = p->i;
    const float *f = p->f;
    void *a = p->src0 >= 0 ? buffers[p->src0] : NULL;
    void *b = p->src1 >= 0 ? buffers[p->src1] : NULL;
    void *y = buffers[p->dst];
    switch (p->kind) {
    case QK_QUANTIZE:
        if (qk_quantize_u8(a, y, i[0], i[1], i[2], f[0], (int32_t)i[3], (int)i[4], f[1]))
            return 1;
        break;
    case QK_OP:
        if (qk_run(p->op, a, y, 1.0f, (int32_t)i[0], f[0], (int32_t)i[1])) return 2;
        break;
    case QK_ADD:
        qk_add_u8(a, b, y, i[0], f[0], f[1], f[2], f[3], f[4]);
        break;
    case QK_ADD_FIXED:
        qk_add_fixed_u8(a, b, y, i[0], (int32_t)i[1], (int32_t)i[2], (int32_t)i[3],
                        (int32_t)i[4], (int32_t)i[5], (int32_t)i[6], (int32_t)i[7]);
        break;
    case QK_ADD_TABLE: {
        const uint8_t *ta = a, *tb = b, *table = p->op;
        uint8_t *ty = y;
        for (int64_t k = 0; k < i[0]; k++) ty[k] = table[(ta[k] << 8) | tb[k]];
        break;
    }
    case QK_MAX_POOL:
        qk_max_pool_u8(a, y, i[0], i[1], i[2], i[3], i[4], i[5], i[6], i[7], i[8], i[9], i[10],
                       i[11]);
        break;
    case QK_AVG_POOL:
        qk_adaptive_avg_pool_u8(a, y, i[0], i[1], i[2], i[3], i[4], i[5], (int32_t)i[6]);
        break;
    case QK_GATE:
        if (qk_mul_channel_gate_u8(a, b, y, i[0], i[1], i[2], i[3], f[0], (int32_t)i[4], f[1],
                                   (int32_t)i[5], f[2], (int32_t)i[6], f[3], f[4]))
            return 2;
        break;
    case QK_CLAMP: {
        const uint8_t *x = a, lo = (uint8_t)i[1], hi = (uint8_t)i[2];
        uint8_t *out = y;
        for (int64_t k = 0; k < i[0]; k++) out[k] = x[k] < lo ? lo : (x[k] > hi ? hi : x[k]);
        break;
    }
    case QK_TO_NCHW: {
        const uint8_t *x = a;
        uint8_t *out = y;
        int64_t c = i[1], hw = i[2];
        for (int64_t n = 0; n < i[0]; n++)
            for (int64_t ch = 0; ch < c; ch++)
                for (int64_t px = 0; px < hw; px++)
                    out[(n * c + ch) * hw + px] = x[(n * hw + px) * c + ch];
        break;
    }
    case QK_PAD: {
        const uint8_t *x = a;
        uint8_t *out = y;
        int64_t n = i[0], c = i[1], h = i[2], w = i[3], top = i[4], left = i[6];
        int64_t oh = h + top + i[5], ow = w + left + i[7];
        memset(out, (int)i[8], (size_t)(n * oh * ow * c));
        for (int64_t b = 0; b < n; b++)
            for (int64_t r = 0; r < h; r++)
                memcpy(out + ((b * oh + r + top) * ow + left) * c, x + (b * h + r) * w * c, (size_t)(w * c));
        break;
    }
    case QK_CAT: {
        const int64_t *parts = p->op;
        uint8_t *out = y;
        for (int64_t r = 0; r < i[0]; r++) {
            uint8_t *dst = out + r * i[2];
            for (int64_t k = 0; k < i[1]; k++) {
                int64_t len = parts[3 * k + 1];
                const uint8_t *src = (const uint8_t *)buffers[parts[3 * k]] + r * len;
                const uint8_t *table = (const uint8_t *)(intptr_t)parts[3 * k + 2];
                if (table)
                    for (int64_t j = 0; j < len; j++) dst[j] = table[src[j]];
                else
                    memcpy(dst, src, (size_t)len);
                dst += len;
            }
        }
        break;
    }
    default:
        return 2;
    }
    return 0;
}
