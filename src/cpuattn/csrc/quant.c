#include "quant.h"

#include <math.h>
#include <string.h>

#include "engine.h"
#include "half.h"

/* An fp8 format: mantissa bits, exponent bias, largest finite code. */
typedef struct {
    int mbits, bias, maxcode;
    float qmax;
} cpa_fp8;

static const cpa_fp8 FP8_E4M3 = {3, 7, 0x7e, 448.0f};
static const cpa_fp8 FP8_E5M2 = {2, 15, 0x7b, 57344.0f};

/* |v| (finite, >= 0) as an fp8 magnitude code, round half to even,
 * saturating at the largest finite value. Subnormal and normal codes are
 * one integer range (code 2^mbits is the smallest normal), so one rint
 * covers both, including the carry into the next exponent. */
static uint8_t fp8_code(float v, const cpa_fp8 *f)
{
    const int steps = 1 << f->mbits;
    const int emin = 1 - f->bias;                       /* exponent of the smallest normal */
    long c;
    if (v < ldexpf(1.0f, emin)) {
        c = lrintf(ldexpf(v, f->bias - 1 + f->mbits));  /* v / (smallest subnormal) */
    } else {
        int e = ilogbf(v);
        float frac = ldexpf(v, -e) - 1.0f;             /* in [0, 1), exact */
        c = (long)(e + f->bias) * steps + lrintf(frac * (float)steps);
    }
    return (uint8_t)(c > f->maxcode ? f->maxcode : c);
}

static float fp8_value(uint8_t c, const cpa_fp8 *f)
{
    const int steps = 1 << f->mbits;
    const int mag = c & 0x7f, e = mag >> f->mbits, m = mag & (steps - 1);
    float v;
    if (f->mbits == 3 && mag == 0x7f)
        v = NAN;                                        /* e4m3fn: S.1111.111 is NaN, no inf */
    else if (f->mbits == 2 && e == 31)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexpf((float)m, 1 - f->bias - f->mbits);
    else
        v = ldexpf((float)(steps + m), e - f->bias - f->mbits);
    return (c & 0x80) ? -v : v;
}

float cpa_e4m3_to_f32(uint8_t c) { return fp8_value(c, &FP8_E4M3); }
float cpa_e5m2_to_f32(uint8_t c) { return fp8_value(c, &FP8_E5M2); }

int64_t cpa_quant_row_bytes(int dtype, int64_t d)
{
    return dtype == CPA_I4 ? d / 2 : d;
}

int64_t cpa_quant_scales_per_row(int dtype, int64_t d)
{
    return dtype == CPA_I4 ? (d + CPA_INT4_GROUP - 1) / CPA_INT4_GROUP : 1;
}

/* max |x| over n values, or NaN if any is NaN or inf. */
static float absmax(const float *x, int64_t n)
{
    float m = 0;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        if (!(a <= 3.4028235e38f)) return NAN;
        if (a > m) m = a;
    }
    return m;
}

static int8_t int_code(float v, float qmax)
{
    float c = nearbyintf(v);                            /* half to even */
    return (int8_t)(c > qmax ? qmax : c < -qmax ? -qmax : c);
}

static void quantize_row(int dtype, const float *x, int64_t d, uint8_t *codes, void *scales)
{
    if (dtype == CPA_I4) {
        uint16_t *sc = scales;
        memset(codes, 0, (size_t)(d / 2));
        for (int64_t g0 = 0, gi = 0; g0 < d; g0 += CPA_INT4_GROUP, gi++) {
            const int64_t n = cpa_min(CPA_INT4_GROUP, d - g0);
            const float m = absmax(x + g0, n);
            sc[gi] = cpa_f32_to_f16(m / 7.0f);
            const float s = cpa_f16_to_f32(sc[gi]);     /* the scale as stored */
            if (!(s > 0)) continue;                     /* zero or NaN: zero codes */
            for (int64_t i = g0; i < g0 + n; i++) {
                const uint8_t c = (uint8_t)int_code(x[i] / s, 7.0f) & 0xf;
                codes[i / 2] |= (uint8_t)(i % 2 ? c << 4 : c);
            }
        }
        return;
    }
    const cpa_fp8 *f8 = dtype == CPA_E4M3 ? &FP8_E4M3 : dtype == CPA_E5M2 ? &FP8_E5M2 : NULL;
    const float qmax = f8 ? f8->qmax : 127.0f;
    const float m = absmax(x, d), s = m / qmax;
    *(float *)scales = s;
    if (!(s > 0)) {                                     /* zero or NaN: zero codes */
        memset(codes, 0, (size_t)d);
        return;
    }
    for (int64_t i = 0; i < d; i++) {
        const float v = x[i] / s;
        if (f8)
            codes[i] = (uint8_t)((v < 0 ? 0x80 : 0) | fp8_code(fabsf(v), f8));
        else
            codes[i] = (uint8_t)int_code(v, qmax);
    }
}

void cpa_quantize_rows(int dtype, const float *x, int64_t xstride, int64_t n, int64_t d,
                       uint8_t *codes, int64_t code_stride, void *scales, int64_t scale_stride)
{
    const size_t ssize = dtype == CPA_I4 ? 2 : 4;
    for (int64_t r = 0; r < n; r++)
        quantize_row(dtype, x + r * xstride, d, codes + r * code_stride,
                     (char *)scales + (size_t)(r * scale_stride) * ssize);
}

void cpa_fp8_encode(int dtype, const float *x, int64_t n, float scale, uint8_t *codes)
{
    const cpa_fp8 *f8 = dtype == CPA_E4M3 ? &FP8_E4M3 : &FP8_E5M2;
    for (int64_t i = 0; i < n; i++) {
        const float v = scale > 0 ? x[i] / scale : 0.0f;
        if (!(fabsf(v) <= 3.4028235e38f))
            codes[i] = 0x7f;                            /* NaN in both formats */
        else
            codes[i] = (uint8_t)((v < 0 ? 0x80 : 0) | fp8_code(fabsf(v), f8));
    }
}

void cpa_dequantize_rows(int dtype, const uint8_t *codes, int64_t code_stride, const void *scales,
                         int64_t scale_stride, int64_t n, int64_t d, float *out, int64_t ostride)
{
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *c = codes + r * code_stride;
        float *o = out + r * ostride;
        if (dtype == CPA_I4) {
            const uint16_t *sc = (const uint16_t *)scales + r * scale_stride;
            for (int64_t i = 0; i < d; i++) {
                const int nib = i % 2 ? c[i / 2] >> 4 : c[i / 2] & 0xf;
                o[i] = cpa_f16_to_f32(sc[i / CPA_INT4_GROUP]) * (float)(nib >= 8 ? nib - 16 : nib);
            }
            continue;
        }
        const float s = ((const float *)scales)[r * scale_stride];
        for (int64_t i = 0; i < d; i++)
            o[i] = s * (dtype == CPA_I8 ? (float)(int8_t)c[i]
                        : dtype == CPA_E4M3 ? cpa_e4m3_to_f32(c[i]) : cpa_e5m2_to_f32(c[i]));
    }
}
