/* Everything the backward engine compiles for one SIMD path (CPA_ISA_BODY of
 * isa_regions.h): the float and double vector layers (simd_t.h), the item
 * kernels of both passes over them, and the path's dispatch-table row. The
 * backward computes in float32/float64 only, so a bfloat16-only path
 * compiles nothing and dispatch takes its fallback path's kernels. */
#if !CPA_REGION_BF16_ONLY
#define CPA_T_BODY "backward_body.h"
#include "each_t.h"

static const cpa_bwd_item_fn CPA_CAT2(bwd_kernels, ISA_TAG)[2][2] = {
    [CPA_BWD_KV] = { CPA_CAT3(kv_item, ISA_TAG, f32), CPA_CAT3(kv_item, ISA_TAG, f64) },
    [CPA_BWD_Q] = { CPA_CAT3(q_item, ISA_TAG, f32), CPA_CAT3(q_item, ISA_TAG, f64) },
};
#else
static const cpa_bwd_item_fn CPA_CAT2(bwd_kernels, ISA_TAG)[2][2] = { { 0, 0 }, { 0, 0 } };
#endif
