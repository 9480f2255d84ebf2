/* Everything backward compiles for one ISA: the float and double vector
 * layers (simd_t.h) and the item kernels over them. Included by backward.c
 * once per ISA target region. */
#define T float
#define T_IS_F64 0
#define TTAG f32
#include "simd_t.h"
#include "backward_body.h"
#undef T
#undef T_IS_F64
#undef TTAG

#define T double
#define T_IS_F64 1
#define TTAG f64
#include "simd_t.h"
#include "backward_body.h"
#undef T
#undef T_IS_F64
#undef TTAG
