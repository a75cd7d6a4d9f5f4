/* quanta's native int8 Conv / Linear: oneDNN primitives built once, executed many times.
 *
 * torch.ops.onednn.qconv2d_pointwise / qlinear_pointwise rebuild the oneDNN primitive
 * descriptor on every call (~30-60 us of fixed cost per op, more than the kernel itself at
 * batch 1). This file builds each primitive once per input shape and keeps it, with its
 * weights reordered into the primitive's own layout.
 *
 * It links no library: the oneDNN inside torch (libtorch_cpu.so) has the whole C API but does
 * not export it. quanta/kernels/native/__init__.py reads the functions' offsets from that
 * file's symbol table and passes them to qk_init() (onednn.c), which adds the library's load
 * address.
 * Same oneDNN, same OpenMP thread pool and same numerics as torch's ops.
 *
 * Numerics (scales are runtime arguments, so one primitive serves any qparams of a shape):
 *   dst = act(acc * wei_scale[c] * src_scale + bias[c]) / dst_scale + dst_zp   (u8 or f32)
 * acc is the int32 sum of (src - src_zp) * wei. The Python side chooses the scales so that
 * this is the reference's single-multiplier requantization (see native/ops.py).
 *
 * Threads: any number of Python threads may run ops at once (ctypes drops the GIL). oneDNN
 * primitives are safe to execute concurrently when each execution brings its own scratchpad;
 * what differs per call (data handles, runtime qparams) lives in an execution slot that one
 * call holds at a time, and each calling thread has its own stream and scratchpad. An op is
 * destroyed only by its Python owner, after the last call that holds it has returned.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "onednn.h"

/* What one execution of an op owns: memory objects for its data and runtime qparams. */
typedef struct {
    dnnl_memory_t src, dst, scratchpad, src_scale, dst_scale, src_zp, dst_zp;
    float src_scale_value, dst_scale_value;
    int32_t src_zp_value, dst_zp_value;
} qk_slot;

#define QK_SLOTS 4 /* concurrent calls of one op beyond this get a temporary slot */

/* One built primitive with its read-only state, and slots for concurrent executions. */
typedef struct {
    dnnl_primitive_t primitive;
    dnnl_memory_t weights, bias, wei_scale;
    dnnl_memory_desc_t src_md, dst_md, pad_md;
    size_t scratchpad_size;
    void *weights_data;
    float *wei_scale_data, *bias_data;
    int32_t src_zp;
    qk_slot *slots[QK_SLOTS];
    int busy[QK_SLOTS];
    char impl[64]; /* oneDNN's name for the kernel it picked ("ref:any" is its scalar one) */
} qk_op;

/* Per calling thread: a stream (oneDNN streams are not thread-safe) and a scratchpad. */
typedef struct {
    dnnl_stream_t stream;
    void *scratchpad;
    size_t scratchpad_size;
} qk_thread;

static pthread_key_t thread_key;
static pthread_once_t thread_key_once = PTHREAD_ONCE_INIT;

static void thread_free(void *p) {
    qk_thread *t = p;
    if (t->stream) p_dnnl_stream_destroy(t->stream);
    free(t->scratchpad);
    free(t);
}

static void thread_key_create(void) { pthread_key_create(&thread_key, thread_free); }

static qk_thread *this_thread(void) {
    pthread_once(&thread_key_once, thread_key_create);
    qk_thread *t = pthread_getspecific(thread_key);
    if (t) return t;
    t = calloc(1, sizeof *t);
    if (!t) return NULL;
    if (p_dnnl_stream_create(&t->stream, qk_engine, dnnl_stream_default_flags) != dnnl_success) {
        free(t);
        snprintf(qk_error, sizeof qk_error, "could not create a oneDNN stream");
        return NULL;
    }
    pthread_setspecific(thread_key, t);
    return t;
}

typedef struct {
    int dst_f32;        /* 1: float32 output, 0: uint8 */
    int activation;     /* 0 none, 1 relu, 2 clip(alpha, beta), 3 gelu erf, 4 gelu tanh,
                           5 swish(alpha), 6 hardswish(alpha, beta), 7 logistic, 8 hardsigmoid */
    float alpha, beta;
    int src_scale;      /* 1: src scale is a runtime argument (dynamic quantization) */
    int dst_scale;      /* 1: dst scale is a runtime argument */
    int src_zp, dst_zp; /* 1: a zero point is applied (0 skips it: zero-point-free kernels are
                           ~2x faster, no weight compensation) */
} qk_epilogue;

static dnnl_memory_t make_memory(int ndims, const dnnl_dims_t dims, dnnl_data_type_t dt,
                                 dnnl_format_tag_t tag, void *data) {
    dnnl_memory_desc_t md = NULL;
    dnnl_memory_t mem = NULL;
    if (p_dnnl_memory_desc_create_with_tag(&md, ndims, dims, dt, tag) != dnnl_success) return NULL;
    if (p_dnnl_memory_create(&mem, md, qk_engine, data) != dnnl_success) mem = NULL;
    p_dnnl_memory_desc_destroy(md);
    return mem;
}

static void slot_destroy(qk_slot *slot) {
    if (!slot) return;
    dnnl_memory_t mems[] = {slot->src, slot->dst, slot->scratchpad, slot->src_scale,
                            slot->dst_scale, slot->src_zp, slot->dst_zp};
    for (size_t i = 0; i < sizeof mems / sizeof mems[0]; i++)
        if (mems[i]) p_dnnl_memory_destroy(mems[i]);
    free(slot);
}

static qk_slot *slot_create(const qk_op *op) {
    qk_slot *slot = calloc(1, sizeof *slot);
    dnnl_dims_t one = {1};
    if (!slot) return NULL;
    slot->src_scale_value = slot->dst_scale_value = 1.0f;
    slot->src_zp_value = op->src_zp;
    if (p_dnnl_memory_create(&slot->src, op->src_md, qk_engine, DNNL_MEMORY_NONE) != dnnl_success ||
        p_dnnl_memory_create(&slot->dst, op->dst_md, qk_engine, DNNL_MEMORY_NONE) != dnnl_success ||
        (op->pad_md &&
         p_dnnl_memory_create(&slot->scratchpad, op->pad_md, qk_engine, DNNL_MEMORY_NONE) != dnnl_success)) {
        slot_destroy(slot);
        snprintf(qk_error, sizeof qk_error, "could not create the memory of an execution slot");
        return NULL;
    }
    slot->src_scale = make_memory(1, one, dnnl_f32, dnnl_a, &slot->src_scale_value);
    slot->dst_scale = make_memory(1, one, dnnl_f32, dnnl_a, &slot->dst_scale_value);
    slot->src_zp = make_memory(1, one, dnnl_s32, dnnl_a, &slot->src_zp_value);
    slot->dst_zp = make_memory(1, one, dnnl_s32, dnnl_a, &slot->dst_zp_value);
    if (!slot->src_scale || !slot->dst_scale || !slot->src_zp || !slot->dst_zp) {
        slot_destroy(slot);
        snprintf(qk_error, sizeof qk_error, "could not create the qparams of an execution slot");
        return NULL;
    }
    return slot;
}

/* Only the op's owner calls this, once no call holds the op (see native/ops.py). */
void qk_destroy(qk_op *op) {
    if (!op) return;
    for (int i = 0; i < QK_SLOTS; i++) slot_destroy(op->slots[i]);
    dnnl_memory_t mems[] = {op->weights, op->bias, op->wei_scale};
    for (size_t i = 0; i < sizeof mems / sizeof mems[0]; i++)
        if (mems[i]) p_dnnl_memory_destroy(mems[i]);
    dnnl_memory_desc_t mds[] = {op->src_md, op->dst_md, op->pad_md};
    for (size_t i = 0; i < sizeof mds / sizeof mds[0]; i++)
        if (mds[i]) p_dnnl_memory_desc_destroy(mds[i]);
    if (op->primitive) p_dnnl_primitive_destroy(op->primitive);
    free(op->weights_data);
    free(op->wei_scale_data);
    free(op->bias_data);
    free(op);
}

static dnnl_primitive_attr_t make_attr(const qk_epilogue *e, int wei_scale_mask) {
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t ops = NULL;
    if (p_dnnl_primitive_attr_create(&attr) != dnnl_success) return NULL;
    /* user scratchpad: one buffer for all ops (they run one at a time), allocated once, instead
     * of oneDNN allocating (and page-faulting) one per execution */
    CHECK(p_dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));
    CHECK(p_dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_WEIGHTS, wei_scale_mask));
    if (e->src_zp) CHECK(p_dnnl_primitive_attr_set_zero_points_mask(attr, DNNL_ARG_SRC, 0));
    if (e->src_scale) CHECK(p_dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_SRC, 0));
    if (!e->dst_f32 && e->dst_zp)
        CHECK(p_dnnl_primitive_attr_set_zero_points_mask(attr, DNNL_ARG_DST, 0));
    if (e->dst_scale) CHECK(p_dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_DST, 0));
    if (e->activation) {
        static const dnnl_alg_kind_t algs[] = {dnnl_alg_kind_undef, dnnl_eltwise_relu,
                                               dnnl_eltwise_clip, dnnl_eltwise_gelu_erf,
                                               dnnl_eltwise_gelu_tanh, dnnl_eltwise_swish,
                                               dnnl_eltwise_hardswish, dnnl_eltwise_logistic,
                                               dnnl_eltwise_hardsigmoid};
        CHECK(p_dnnl_post_ops_create(&ops));
        CHECK(p_dnnl_post_ops_append_eltwise(ops, algs[e->activation], e->alpha, e->beta));
        CHECK(p_dnnl_primitive_attr_set_post_ops(attr, ops));
        p_dnnl_post_ops_destroy(ops);
    }
    return attr;
fail:
    if (ops) p_dnnl_post_ops_destroy(ops);
    p_dnnl_primitive_attr_destroy(attr);
    return NULL;
}

/* Shared second half of conv / matmul creation: primitive, reordered weights, runtime args. */
static qk_op *finish(dnnl_primitive_desc_t pd, int w_ndims, const dnnl_dims_t w_dims,
                     dnnl_format_tag_t w_tag, const int8_t *w, int n_out, const float *scales,
                     const float *bias, int32_t src_zp) {
    qk_op *op = calloc(1, sizeof *op);
    qk_thread *thread = this_thread();
    dnnl_memory_desc_t user_md = NULL;
    dnnl_memory_t user_w = NULL;
    dnnl_primitive_desc_t reorder_pd = NULL;
    dnnl_primitive_t reorder = NULL;
    if (!op || !thread) goto fail;
    CHECK(p_dnnl_primitive_create(&op->primitive, pd));
    const char *impl = NULL;
    if (p_dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) == dnnl_success && impl)
        strncpy(op->impl, impl, sizeof op->impl - 1);
    const_dnnl_memory_desc_t w_md = p_dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    const_dnnl_memory_desc_t src_md = p_dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0);
    const_dnnl_memory_desc_t dst_md = p_dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0);
    if (posix_memalign(&op->weights_data, 64, p_dnnl_memory_desc_get_size(w_md) + 64)) goto fail;
    CHECK(p_dnnl_memory_create(&op->weights, w_md, qk_engine, op->weights_data));
    CHECK(p_dnnl_memory_desc_create_with_tag(&user_md, w_ndims, w_dims, dnnl_s8, w_tag));
    CHECK(p_dnnl_memory_create(&user_w, user_md, qk_engine, (void *)w));
    CHECK(p_dnnl_reorder_primitive_desc_create(&reorder_pd, user_md, qk_engine, w_md, qk_engine, NULL));
    CHECK(p_dnnl_primitive_create(&reorder, reorder_pd));
    dnnl_exec_arg_t reorder_args[] = {{DNNL_ARG_FROM, user_w}, {DNNL_ARG_TO, op->weights}};
    CHECK(p_dnnl_primitive_execute(reorder, thread->stream, 2, reorder_args));
    CHECK(p_dnnl_stream_wait(thread->stream));
    const_dnnl_memory_desc_t pad_md = p_dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    op->scratchpad_size = pad_md ? p_dnnl_memory_desc_get_size(pad_md) : 0;
    if (op->scratchpad_size) CHECK(p_dnnl_memory_desc_clone(&op->pad_md, pad_md));
    CHECK(p_dnnl_memory_desc_clone(&op->src_md, src_md));
    CHECK(p_dnnl_memory_desc_clone(&op->dst_md, dst_md));
    dnnl_dims_t out = {n_out};
    op->wei_scale_data = malloc(sizeof(float) * n_out);
    if (!op->wei_scale_data) goto fail;
    memcpy(op->wei_scale_data, scales, sizeof(float) * n_out);
    op->wei_scale = make_memory(1, out, dnnl_f32, dnnl_a, op->wei_scale_data);
    if (!op->wei_scale) goto fail;
    op->src_zp = src_zp;
    if (bias) {
        op->bias_data = malloc(sizeof(float) * n_out);
        if (!op->bias_data) goto fail;
        memcpy(op->bias_data, bias, sizeof(float) * n_out);
        op->bias = make_memory(1, out, dnnl_f32, dnnl_a, op->bias_data);
        if (!op->bias) goto fail;
    }
    p_dnnl_primitive_destroy(reorder);
    p_dnnl_primitive_desc_destroy(reorder_pd);
    p_dnnl_memory_destroy(user_w);
    p_dnnl_memory_desc_destroy(user_md);
    return op;
fail:
    if (reorder) p_dnnl_primitive_destroy(reorder);
    if (reorder_pd) p_dnnl_primitive_desc_destroy(reorder_pd);
    if (user_w) p_dnnl_memory_destroy(user_w);
    if (user_md) p_dnnl_memory_desc_destroy(user_md);
    qk_destroy(op);
    return NULL;
}

static void release(dnnl_primitive_desc_t pd, dnnl_primitive_attr_t attr, dnnl_memory_desc_t src,
                    dnnl_memory_desc_t wei, dnnl_memory_desc_t bias, dnnl_memory_desc_t dst) {
    if (pd) p_dnnl_primitive_desc_destroy(pd);
    if (attr) p_dnnl_primitive_attr_destroy(attr);
    dnnl_memory_desc_t mds[] = {src, wei, bias, dst};
    for (int i = 0; i < 4; i++)
        if (mds[i]) p_dnnl_memory_desc_destroy(mds[i]);
}

/* Conv2d on an NHWC uint8 input [n, c, h, w] (logical NCHW dims); groups > 1 for grouped and
 * depthwise convs. w: int8 [oc, c/groups, kh, kw] contiguous. scales: float32 [oc].
 * geometry: stride h/w, padding top/left, bottom/right (h, w each), dilation h/w (oneDNN's
 * convention, 0 = dense). */
qk_op *qk_conv_create(const int64_t *shape, int64_t oc, int64_t groups, int64_t kh, int64_t kw,
                      const int64_t *geometry, const int8_t *w, const float *scales,
                      const float *bias, const qk_epilogue *e, int32_t src_zp) {
    dnnl_memory_desc_t src_md = NULL, wei_md = NULL, bias_md = NULL, dst_md = NULL;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t pd = NULL;
    qk_op *op = NULL;
    int64_t n = shape[0], c = shape[1], h = shape[2], wd = shape[3];
    dnnl_dims_t strides = {geometry[0], geometry[1]}, pad_l = {geometry[2], geometry[3]},
                pad_r = {geometry[4], geometry[5]}, dil = {geometry[6], geometry[7]};
    int64_t oh = (h + pad_l[0] + pad_r[0] - (dil[0] + 1) * (kh - 1) - 1) / strides[0] + 1;
    int64_t ow = (wd + pad_l[1] + pad_r[1] - (dil[1] + 1) * (kw - 1) - 1) / strides[1] + 1;
    dnnl_dims_t src_dims = {n, c, h, wd}, dst_dims = {n, oc, oh, ow}, bias_dims = {oc};
    dnnl_dims_t w_dims = {groups, oc / groups, c / groups, kh, kw};
    int grouped = groups > 1;
    CHECK(p_dnnl_memory_desc_create_with_tag(&src_md, 4, src_dims, dnnl_u8, dnnl_nhwc));
    CHECK(p_dnnl_memory_desc_create_with_tag(&dst_md, 4, dst_dims, e->dst_f32 ? dnnl_f32 : dnnl_u8,
                                             dnnl_nhwc));
    CHECK(p_dnnl_memory_desc_create_with_tag(&wei_md, grouped ? 5 : 4,
                                             grouped ? w_dims : w_dims + 1, dnnl_s8,
                                             dnnl_format_tag_any));
    if (bias) CHECK(p_dnnl_memory_desc_create_with_tag(&bias_md, 1, bias_dims, dnnl_f32, dnnl_a));
    attr = make_attr(e, grouped ? 3 : 1);
    if (!attr) goto fail;
    CHECK(p_dnnl_convolution_forward_primitive_desc_create(
        &pd, qk_engine, dnnl_forward_inference, dnnl_convolution_direct, src_md, wei_md, bias_md,
        dst_md, strides, dil, pad_l, pad_r, attr));
    op = finish(pd, grouped ? 5 : 4, grouped ? w_dims : w_dims + 1, grouped ? dnnl_goihw : dnnl_oihw,
                w, (int)oc, scales, bias, src_zp);
fail:
    release(pd, attr, src_md, wei_md, bias_md, dst_md);
    return op;
}

/* Linear as a matmul: uint8 src [m, k] (row-major) times int8 w [n, k] (PyTorch layout). */
qk_op *qk_linear_create(int64_t m, int64_t k, int64_t n, const int8_t *w, const float *scales,
                        const float *bias, const qk_epilogue *e, int32_t src_zp) {
    dnnl_memory_desc_t src_md = NULL, wei_md = NULL, bias_md = NULL, dst_md = NULL;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t pd = NULL;
    qk_op *op = NULL;
    dnnl_dims_t src_dims = {m, k}, w_dims = {k, n}, dst_dims = {m, n}, bias_dims = {1, n};
    CHECK(p_dnnl_memory_desc_create_with_tag(&src_md, 2, src_dims, dnnl_u8, dnnl_ab));
    CHECK(p_dnnl_memory_desc_create_with_tag(&dst_md, 2, dst_dims, e->dst_f32 ? dnnl_f32 : dnnl_u8,
                                             dnnl_ab));
    CHECK(p_dnnl_memory_desc_create_with_tag(&wei_md, 2, w_dims, dnnl_s8, dnnl_format_tag_any));
    if (bias) CHECK(p_dnnl_memory_desc_create_with_tag(&bias_md, 2, bias_dims, dnnl_f32, dnnl_ab));
    attr = make_attr(e, 1 << 1);
    if (!attr) goto fail;
    CHECK(p_dnnl_matmul_primitive_desc_create(&pd, qk_engine, src_md, wei_md, bias_md, dst_md, attr));
    op = finish(pd, 2, w_dims, dnnl_ba, w, (int)n, scales, bias, src_zp);
fail:
    release(pd, attr, src_md, wei_md, bias_md, dst_md);
    return op;
}

/* Takes a free execution slot of op (creating it on first use), or a temporary one when all
 * are in use; *index is the slot's number, or -1 for a temporary slot. */
static qk_slot *slot_acquire(qk_op *op, int *index) {
    for (int i = 0; i < QK_SLOTS; i++) {
        if (__atomic_exchange_n(&op->busy[i], 1, __ATOMIC_ACQUIRE) == 0) {
            if (!op->slots[i]) op->slots[i] = slot_create(op);
            if (op->slots[i]) {
                *index = i;
                return op->slots[i];
            }
            __atomic_store_n(&op->busy[i], 0, __ATOMIC_RELEASE);
            return NULL;
        }
    }
    *index = -1;
    return slot_create(op);
}

static void slot_release(qk_op *op, qk_slot *slot, int index) {
    if (index < 0)
        slot_destroy(slot);
    else
        __atomic_store_n(&op->busy[index], 0, __ATOMIC_RELEASE);
}

/* oneDNN's name for the kernel of op ("jit:avx2", "brg_conv_fwd:avx512_core_amx", "ref:any"). */
const char *qk_impl_name(const qk_op *op) { return op->impl; }

/* Runs a built op. src_scale / dst_scale / zero points are used only where the op was built
 * to take them (see qk_epilogue). Returns 0 on success. Safe to call from several threads at
 * once, on the same op or on different ones. */
int qk_run(qk_op *op, void *src, void *dst, float src_scale, int32_t src_zp, float dst_scale,
           int32_t dst_zp) {
    qk_thread *thread = this_thread();
    int index = -1;
    qk_slot *slot = thread ? slot_acquire(op, &index) : NULL;
    if (!slot) return 1;
    slot->src_scale_value = src_scale;
    slot->src_zp_value = src_zp;
    slot->dst_scale_value = dst_scale;
    slot->dst_zp_value = dst_zp;
    CHECK(p_dnnl_memory_set_data_handle(slot->src, src));
    CHECK(p_dnnl_memory_set_data_handle(slot->dst, dst));
    dnnl_exec_arg_t args[11] = {
        {DNNL_ARG_SRC, slot->src},
        {DNNL_ARG_WEIGHTS, op->weights},
        {DNNL_ARG_DST, slot->dst},
        {DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, op->wei_scale},
        {DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC, slot->src_zp},
        {DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_DST, slot->dst_zp},
        {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, slot->src_scale},
        {DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST, slot->dst_scale},
    };
    int nargs = 8;
    if (op->bias) args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_BIAS, op->bias};
    if (slot->scratchpad) {
        if (op->scratchpad_size > thread->scratchpad_size) {
            free(thread->scratchpad);
            thread->scratchpad_size = 0;
            if (posix_memalign(&thread->scratchpad, 64, op->scratchpad_size)) {
                thread->scratchpad = NULL;
                snprintf(qk_error, sizeof qk_error, "out of memory for the scratchpad");
                goto fail;
            }
            thread->scratchpad_size = op->scratchpad_size;
        }
        CHECK(p_dnnl_memory_set_data_handle(slot->scratchpad, thread->scratchpad));
        args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, slot->scratchpad};
    }
    CHECK(p_dnnl_primitive_execute(op->primitive, thread->stream, nargs, args));
    CHECK(p_dnnl_stream_wait(thread->stream));
    slot_release(op, slot, index);
    return 0;
fail:
    slot_release(op, slot, index);
    return 1;
}
