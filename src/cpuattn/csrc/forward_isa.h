/* Everything the forward engine compiles for one SIMD path (CPA_ISA_BODY of
 * isa_regions.h): the float and double vector layers, then one item kernel
 * per storage dtype, named item_<path>_<compute>_<storage> (for example
 * item_avx512_f32_bf16), and the path's row of the dispatch table. With
 * CPA_REGION_BF16_ONLY (avx512bf16) only the (float, bfloat16) kernel; the
 * other entries stay NULL and dispatch takes the fallback path's.
 * A new storage dtype: one include block here, its loads in forward_body.h. */
#define T float
#define T_IS_F64 0
#define TTAG f32
#include "simd_t.h"
#if !CPA_REGION_BF16_ONLY
#define KS float
#define KSTAG f32
#define KS_KIND CPA_KIND_F32
#include "forward_body.h"
#undef KS
#undef KSTAG
#undef KS_KIND
#define KS uint16_t
#define KSTAG f16
#define KS_KIND CPA_KIND_F16
#include "forward_body.h"
#undef KS
#undef KSTAG
#undef KS_KIND
#endif
#define KS uint16_t
#define KSTAG bf16
#define KS_KIND CPA_KIND_BF16
#include "forward_body.h"
#undef KS
#undef KSTAG
#undef KS_KIND
#undef T
#undef T_IS_F64
#undef TTAG

#if !CPA_REGION_BF16_ONLY
#define T double
#define T_IS_F64 1
#define TTAG f64
#include "simd_t.h"
#define KS double
#define KSTAG f64
#define KS_KIND CPA_KIND_F64
#include "forward_body.h"
#undef KS
#undef KSTAG
#undef KS_KIND
#undef T
#undef T_IS_F64
#undef TTAG
#endif

static const cpa_fwd_item_fn CPA_CAT2(fwd_kernels, ISA_TAG)[CPA_DTYPE_COUNT] = {
#if !CPA_REGION_BF16_ONLY
    [CPA_F32] = CPA_CAT3(item, ISA_TAG, f32_f32),
    [CPA_F64] = CPA_CAT3(item, ISA_TAG, f64_f64),
    [CPA_F16] = CPA_CAT3(item, ISA_TAG, f32_f16),
#endif
    [CPA_BF16] = CPA_CAT3(item, ISA_TAG, f32_bf16),
};
