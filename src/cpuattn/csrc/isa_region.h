/* Everything compiled for one ISA: float and double vector layers, then the
 * four (compute, storage) item kernels. Included by forward.c per ISA; with
 * CPA_REGION_BF16_ONLY set, only the (float, bfloat16) kernel (the
 * avx512bf16 region, where the other dtypes reuse the avx512 kernels). */
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
