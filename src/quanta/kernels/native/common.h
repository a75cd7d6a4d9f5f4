/* What quanta's native C files share: ISA dispatch (an AVX2/FMA build of a loop beside a
 * plain one, chosen once at run time) and block-parallel loops over torch's OpenMP pool. */
#pragma once
#include <stdint.h>

#if defined(__x86_64__) || defined(__i386__)
#define QK_X86 1
#define QK_TARGET(isa) __attribute__((target(isa)))
#else
#define QK_X86 0
#define QK_TARGET(isa)
#endif

static inline int has_avx2_fma(void) {
#if QK_X86
    static int fast = -1;
    if (fast < 0) fast = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return fast;
#else
    return 0;
#endif
}

static inline int has_avx512bw(void) {
#if QK_X86
    static int fast = -1;
    if (fast < 0) fast = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    return fast;
#else
    return 0;
#endif
}

#define QK_BLOCK 32768 /* elements per block handed to one OpenMP thread */

/* Runs fast(...) or plain(...) on [start, start + len) blocks of [0, n) across OpenMP threads;
 * the two kernels take (offset pointers..., len, extra args...) as built by ARGS. */
#define QK_BLOCKS(n, fast, plain, ARGS)                                                      \
    do {                                                                                     \
        int use_fast = has_avx2_fma();                                                       \
        int64_t blocks = ((n) + QK_BLOCK - 1) / QK_BLOCK;                                    \
        _Pragma("omp parallel for schedule(static) if (blocks > 1)")                         \
        for (int64_t i = 0; i < blocks; i++) {                                               \
            int64_t start = i * QK_BLOCK, len = (n) - start < QK_BLOCK ? (n) - start : QK_BLOCK; \
            if (use_fast)                                                                    \
                fast ARGS;                                                                   \
            else                                                                             \
                plain ARGS;                                                                  \
        }                                                                                    \
    } while (0)

