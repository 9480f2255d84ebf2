/* One SIMD path's kernels under its compiler target (see isa_regions.h,
 * which sets the parameters this file consumes and clears). */
#ifndef CPA_HAS_DPBF16
#define CPA_HAS_DPBF16 0
#endif
#ifndef CPA_HAS_AMX
#define CPA_HAS_AMX 0
#endif
#ifndef CPA_REGION_BF16_ONLY
#define CPA_REGION_BF16_ONLY 0
#endif
#define NV 2
#define CPA_STR_(...) #__VA_ARGS__
#define CPA_STR(...) CPA_STR_(__VA_ARGS__)

#ifdef CPA_ISA_TARGET
#if defined(__clang__)
_Pragma(CPA_STR(clang attribute push(__attribute__((target(CPA_ISA_TARGET))), apply_to = function)))
#else
_Pragma("GCC push_options")
_Pragma(CPA_STR(GCC target(CPA_ISA_TARGET)))
#endif
#endif

#include CPA_ISA_BODY

#ifdef CPA_ISA_TARGET
#if defined(__clang__)
_Pragma("clang attribute pop")
#else
_Pragma("GCC pop_options")
#endif
#endif

#undef ISA_TAG
#undef VBYTES
#undef MR
#undef NV
#undef CPA_HAS_F16C
#undef CPA_HAS_DPBF16
#undef CPA_HAS_AMX
#undef CPA_REGION_BF16_ONLY
#undef CPA_ISA_TARGET
#undef CPA_STR_
#undef CPA_STR
