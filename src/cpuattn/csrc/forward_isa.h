/* Everything the forward engine compiles for one SIMD path (CPA_ISA_BODY of
 * isa_regions.h): per compute type T, the vector layer (simd_t.h), one
 * storage layer per KV storage type (forward_kv.h, functions named
 * <name>_<path>_<compute>_<storage>, for example dec_scores_avx512_f32_int8),
 * the table of those layers and the item kernels over it (forward_items.h,
 * item_<path>_<compute>, for example item_avx512_f32). With
 * CPA_REGION_BF16_ONLY (avx512bf16) only bfloat16 storage: dispatch sends
 * every other call to the fallback path.
 * A new storage type: one CPA_DTYPES row (engine.h), one block and one
 * table entry here, its loads in forward_kv.h. */
#define T float
#define T_IS_F64 0
#define TTAG f32
#include "simd_t.h"
#include "forward_t.h"
#if !CPA_REGION_BF16_ONLY
#define KS float
#define KSTAG f32
#define KS_KIND CPA_KIND_F32
#include "forward_kv.h"
#define KS uint16_t
#define KSTAG f16
#define KS_KIND CPA_KIND_F16
#include "forward_kv.h"
#define KS int8_t
#define KSTAG int8
#define KS_KIND CPA_KIND_I8
#include "forward_kv.h"
#define KS uint8_t
#define KSTAG int4
#define KS_KIND CPA_KIND_I4
#include "forward_kv.h"
#define KS uint8_t
#define KSTAG e4m3
#define KS_KIND CPA_KIND_E4M3
#include "forward_kv.h"
#define KS uint8_t
#define KSTAG e5m2
#define KS_KIND CPA_KIND_E5M2
#include "forward_kv.h"
#endif
#define KS uint16_t
#define KSTAG bf16
#define KS_KIND CPA_KIND_BF16
#include "forward_kv.h"
static const TN(kv_ops) TN(kv_table)[CPA_DTYPE_COUNT] = {
#if !CPA_REGION_BF16_ONLY
    [CPA_F32] = KV_OPS(f32), [CPA_F16] = KV_OPS(f16), [CPA_I8] = KV_OPS(int8),
    [CPA_I4] = KV_OPS(int4), [CPA_E4M3] = KV_OPS(e4m3), [CPA_E5M2] = KV_OPS(e5m2),
#endif
    [CPA_BF16] = KV_OPS(bf16),
};
#include "forward_items.h"
#undef T
#undef T_IS_F64
#undef TTAG

#if !CPA_REGION_BF16_ONLY
#define T double
#define T_IS_F64 1
#define TTAG f64
#include "simd_t.h"
#include "forward_t.h"
#define KS double
#define KSTAG f64
#define KS_KIND CPA_KIND_F64
#include "forward_kv.h"
static const TN(kv_ops) TN(kv_table)[CPA_DTYPE_COUNT] = {[CPA_F64] = KV_OPS(f64)};
#include "forward_items.h"
#undef T
#undef T_IS_F64
#undef TTAG
#endif

/* this path's item kernels by compute type: float, double (NULL: none) */
static const cpa_fwd_item_fn CPA_CAT2(fwd_kernels, ISA_TAG)[2] = {
    CPA_CAT3(item, ISA_TAG, f32),
#if !CPA_REGION_BF16_ONLY
    CPA_CAT3(item, ISA_TAG, f64),
#endif
};
