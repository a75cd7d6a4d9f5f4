/* The oneDNN C API inside torch's libtorch_cpu.so, reached through function pointers that
 * qk_init() (onednn.c) sets from the library's symbol table (it does not export them). */
#ifndef QUANTA_ONEDNN_H
#define QUANTA_ONEDNN_H

#include <stdio.h>

#include "oneapi/dnnl/dnnl.h"

#define QK_FUNCTIONS(X)                                                                      \
    X(dnnl_version) X(dnnl_engine_create) X(dnnl_stream_create) X(dnnl_stream_wait)            \
    X(dnnl_memory_desc_create_with_tag) X(dnnl_memory_desc_destroy)                            \
    X(dnnl_memory_desc_get_size) X(dnnl_memory_create) X(dnnl_memory_destroy)                  \
    X(dnnl_memory_set_data_handle) X(dnnl_primitive_attr_create)                                \
    X(dnnl_primitive_attr_set_scratchpad_mode)                                                  \
    X(dnnl_primitive_attr_destroy) X(dnnl_primitive_attr_set_scales_mask)                       \
    X(dnnl_primitive_attr_set_zero_points_mask) X(dnnl_primitive_attr_set_post_ops)             \
    X(dnnl_post_ops_create) X(dnnl_post_ops_destroy) X(dnnl_post_ops_append_eltwise)            \
    X(dnnl_convolution_forward_primitive_desc_create) X(dnnl_matmul_primitive_desc_create)      \
    X(dnnl_reorder_primitive_desc_create) X(dnnl_primitive_desc_query_md)                       \
    X(dnnl_primitive_desc_destroy) X(dnnl_primitive_create) X(dnnl_primitive_execute)           \
    X(dnnl_primitive_destroy) X(dnnl_get_effective_cpu_isa) X(dnnl_primitive_desc_query)    \
    X(dnnl_memory_desc_clone) X(dnnl_stream_destroy)

#define QK_EXTERN(name) extern __typeof__(&name) p_##name __attribute__((visibility("hidden")));
QK_FUNCTIONS(QK_EXTERN)

extern dnnl_engine_t qk_engine __attribute__((visibility("hidden")));
/* per calling thread: the last failure's message, read right after it (qk_last_error) */
extern __thread char qk_error[256] __attribute__((visibility("hidden")));

#define CHECK(call)                                                                          \
    do {                                                                                     \
        dnnl_status_t s_ = (call);                                                           \
        if (s_ != dnnl_success) {                                                            \
            snprintf(qk_error, sizeof qk_error, "%s failed (oneDNN status %d)", #call, s_);  \
            goto fail;                                                                       \
        }                                                                                    \
    } while (0)

#endif
