/* Scalar float16/bfloat16 <-> float32 conversions, bit-exact and portable
 * (no _Float16 or F16C needed): used on the baseline path and for the
 * query/output rows, which are not on the hot loop. Round-to-nearest-even. */
#ifndef CPUATTN_HALF_H
#define CPUATTN_HALF_H
#include <stdint.h>
#include <string.h>

static inline float cpa_bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t cpa_f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float cpa_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f)                      /* inf / NaN (keep the payload) */
        return cpa_bits_to_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0)
            return cpa_bits_to_f32(sign);
        /* subnormal: value = man * 2^-24, exact in float32 */
        float f = (float)man * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    return cpa_bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

static inline uint16_t cpa_f32_to_f16(float f)
{
    uint32_t u = cpa_f32_to_bits(f);
    uint32_t sign = (u >> 16) & 0x8000;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)                  /* NaN: quiet, keep top payload bits */
        return (uint16_t)(sign | 0x7e00 | ((a >> 13) & 0x3ff));
    if (a >= 0x477ff000u)                 /* rounds to >= 65520: inf */
        return (uint16_t)(sign | 0x7c00);
    if (a < 0x38800000u) {                /* below the smallest normal half */
        if (a < 0x33000000u)              /* below half the smallest subnormal */
            return (uint16_t)sign;
        uint32_t e = a >> 23, m = (a & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e;         /* 14..24 */
        uint32_t half = m >> shift, rem = m & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1)))
            half++;
        return (uint16_t)(sign | half);
    }
    uint32_t r = a + 0xfff + ((a >> 13) & 1);    /* round to nearest even */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

static inline float cpa_bf16_to_f32(uint16_t h) { return cpa_bits_to_f32((uint32_t)h << 16); }

static inline uint16_t cpa_f32_to_bf16(float f)
{
    uint32_t u = cpa_f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)  /* NaN stays NaN (quiet) */
        return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

#endif
