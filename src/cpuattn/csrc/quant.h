/* Low-bit KV storage: the one definition of its bytes.
 *
 * Rows are one token's head_dim values of one kv head. Formats (API.md,
 * "Low-bit KV cache"):
 *   int8:  code in [-127, 127], x = scale * code, one float32 scale per row;
 *   int4:  two codes per byte (element 2i in the low nibble, 2i+1 in the
 *          high one), each in [-7, 7]; one float16 scale per group of 32
 *          consecutive elements;
 *   fp8:   float8_e4m3fn / float8_e5m2 values, x = scale * value, one
 *          float32 scale per row.
 * Quantising: scale = max|x| / qmax (qmax 127, 7, 448, 57344) over the row
 * or group, computed in float32; int4 codes use the scale as stored
 * (float16), so that scale * code is what was meant. Codes round half to
 * even and saturate. A zero row (group) gets scale 0 and zero codes; one
 * holding NaN or inf gets scale NaN and zero codes, so the damage shows in
 * the output instead of being clipped away. quantize_kv, the pool and
 * write_kv all call cpa_quantize_rows, so they write the same bytes. */
#ifndef CPUATTN_QUANT_H
#define CPUATTN_QUANT_H
#include <stdint.h>

#define CPA_INT4_GROUP 32

/* Bytes of one row's codes, and scales per row, for head_dim d. */
int64_t cpa_quant_row_bytes(int dtype, int64_t d);
int64_t cpa_quant_scales_per_row(int dtype, int64_t d);

/* n rows of d float32 values (row i at x + i * xstride) into codes (row i at
 * codes + i * code_stride bytes) and scales (row i's first at scales +
 * i * scale_stride elements: float32, or float16 bits for int4). */
void cpa_quantize_rows(int dtype, const float *x, int64_t xstride, int64_t n, int64_t d,
                       uint8_t *codes, int64_t code_stride, void *scales, int64_t scale_stride);

/* n float32 values as fp8 codes of x / scale (one per-tensor scale, as
 * vLLM's k_scale), round half to even, saturating; NaN and inf give the
 * NaN code, a scale <= 0 gives zero codes. */
void cpa_fp8_encode(int dtype, const float *x, int64_t n, float scale, uint8_t *codes);

/* The inverse, to float32: out row i at out + i * ostride. For fp8 a
 * scale_stride of 0 with one scale is the per-tensor form. */
void cpa_dequantize_rows(int dtype, const uint8_t *codes, int64_t code_stride, const void *scales,
                         int64_t scale_stride, int64_t n, int64_t d, float *out, int64_t ostride);

/* One fp8 value as float32 (NaN codes give NaN, e5m2 inf gives inf). */
float cpa_e4m3_to_f32(uint8_t c);
float cpa_e5m2_to_f32(uint8_t c);

#endif
