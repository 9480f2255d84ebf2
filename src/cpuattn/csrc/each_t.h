/* Includes CPA_T_BODY once per compute type: T float (TTAG f32), then T
 * double (TTAG f64), with T_IS_F64 set; clears CPA_T_BODY afterwards. */
#define T float
#define T_IS_F64 0
#define TTAG f32
#include CPA_T_BODY
#undef T
#undef T_IS_F64
#undef TTAG
#define T double
#define T_IS_F64 1
#define TTAG f64
#include CPA_T_BODY
#undef T
#undef T_IS_F64
#undef TTAG
#undef CPA_T_BODY
