/* Binding to the oneDNN inside torch: its C API's functions found by offset (see
 * primitives.c for why), the CPU engine, and the per-thread error message. */
#define _GNU_SOURCE
#include <link.h>
#include <stdint.h>
#include <string.h>

#include "onednn.h"

#define QK_POINTER(name) __typeof__(&name) p_##name;
QK_FUNCTIONS(QK_POINTER)
#define QK_NAME(name) #name "\n"
static const char *qk_names = QK_FUNCTIONS(QK_NAME);

dnnl_engine_t qk_engine;
__thread char qk_error[256];

const char *qk_symbol_names(void) { return qk_names; }
const char *qk_last_error(void) { return qk_error; }

static uintptr_t torch_base;
static int find_torch(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    const char *name = info->dlpi_name, *want = (const char *)data;
    size_t n = strlen(name), w = strlen(want);
    if (n >= w && strcmp(name + n - w, want) == 0) {
        torch_base = info->dlpi_addr;
        return 1;
    }
    return 0;
}

/* offsets: the st_value of each name of qk_symbol_names(), in order. Returns oneDNN's
 * major*100+minor on success, 0 on failure (see qk_last_error). */
int qk_init(const char *library_suffix, const uint64_t *offsets, int count) {
    int i = 0;
    torch_base = 0;
    dl_iterate_phdr(find_torch, (void *)library_suffix);
    if (!torch_base) {
        snprintf(qk_error, sizeof qk_error, "%s is not loaded", library_suffix);
        return 0;
    }
#define QK_ASSIGN(name)                                                                      \
    if (i >= count || !offsets[i]) {                                                         \
        snprintf(qk_error, sizeof qk_error, "symbol %s not found", #name);                   \
        return 0;                                                                            \
    }                                                                                        \
    p_##name = (__typeof__(&name))(torch_base + offsets[i++]);
    QK_FUNCTIONS(QK_ASSIGN)
    const dnnl_version_t *v = p_dnnl_version();
    if (v->major != DNNL_VERSION_MAJOR) {
        snprintf(qk_error, sizeof qk_error, "oneDNN %d.%d in torch, headers are %d.x",
                 v->major, v->minor, DNNL_VERSION_MAJOR);
        return 0;
    }
    CHECK(p_dnnl_engine_create(&qk_engine, dnnl_cpu, 0));
    return v->major * 100 + v->minor;
fail:
    return 0;
}

/* dnnl_cpu_isa_t oneDNN's kernels use here (the hardware, capped by ONEDNN_MAX_CPU_ISA). */
int qk_effective_isa(void) { return (int)p_dnnl_get_effective_cpu_isa(); }
