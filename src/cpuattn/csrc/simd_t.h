/* Vector primitives for one (ISA, compute type) pair, written once with GCC/
 * Clang vector extensions. forward.c includes this file inside each ISA's
 * target region; the compiler lowers the same source to SSE2/NEON, AVX2+FMA
 * or AVX-512 instructions.
 *
 * Expects: T (float|double), T_IS_F64 (0|1), TTAG, ISA_TAG, VBYTES, MR, NV.
 * Defines (and forward_body.h uses): V, VI, VL, NVL, TN(...) names.
 */
#if defined(__x86_64__)
#include <immintrin.h>   /* include-guarded: harmless on re-inclusion */
#endif
#undef V
#undef VI
#undef VL
#undef NVL
#undef TN
#define TN(x) CPA_CAT3(x, ISA_TAG, TTAG)
#define VL ((int64_t)(VBYTES / sizeof(T)))
#define NVL (NV * VL)

#if T_IS_F64
typedef int64_t TN(ielem);
#else
typedef int32_t TN(ielem);
#endif
typedef T TN(vt) __attribute__((vector_size(VBYTES)));
typedef TN(ielem) TN(vi) __attribute__((vector_size(VBYTES)));
#define V TN(vt)
#define VI TN(vi)

static inline V TN(vld)(const T *p) { V v; memcpy(&v, p, sizeof v); return v; }
static inline void TN(vst)(T *p, V v) { memcpy(p, &v, sizeof v); }
static inline V TN(vset1)(T x) { V v = {0}; return v + x; }
static inline VI TN(viset1)(TN(ielem) x) { VI v = {0}; return v + x; }
/* lanes of a where m is all-ones, else lanes of b */
static inline V TN(vsel)(VI m, V a, V b) { return (V)((m & (VI)a) | (~m & (VI)b)); }
static inline V TN(vmax)(V a, V b) { return TN(vsel)(a > b, a, b); }
/* horizontal sum: halve the vector until one lane is left (a tree of
 * shuffles and adds, not a serial chain through every lane) */
static inline T TN(hsum)(V v)
{
#if VBYTES == 64 && !T_IS_F64 && defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#elif VBYTES == 64 && T_IS_F64 && defined(__AVX512F__)
    return _mm512_reduce_add_pd((__m512d)v);
#else
    T buf[VL];
    memcpy(buf, &v, sizeof v);
    for (int w = VL / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) buf[i] += buf[i + w];
    return buf[0];
#endif
}
/* out[i] = hsum(v[i]) for 4 vectors, each summed by the same tree as hsum
 * (so bitwise equal to it), sharing the shuffles between the four. */
static inline void TN(hsum4)(V v0, V v1, V v2, V v3, T *out)
{
#if VBYTES == 64 && !T_IS_F64 && defined(__AVX512F__)
    const __m512 a0 = (__m512)v0, a1 = (__m512)v1, a2 = (__m512)v2, a3 = (__m512)v3;
    /* 512 -> 256 bits: [a0 folded | a1 folded], [a2 | a3] */
    const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0xEE), _mm512_shuffle_f32x4(a0, a1, 0x44));
    const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0xEE), _mm512_shuffle_f32x4(a2, a3, 0x44));
    /* 256 -> 128 bits: one 128-bit lane per vector */
    const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, 0xDD), _mm512_shuffle_f32x4(t0, t1, 0x88));
    /* 128 -> 64 -> 32 bits within each lane */
    const __m512 w = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
    const __m512 x = _mm512_add_ps(w, _mm512_permute_ps(w, 0xB1));
    float buf[16];
    _mm512_storeu_ps(buf, x);
    out[0] = buf[0]; out[1] = buf[4]; out[2] = buf[8]; out[3] = buf[12];
#else
    out[0] = TN(hsum)(v0); out[1] = TN(hsum)(v1); out[2] = TN(hsum)(v2); out[3] = TN(hsum)(v3);
#endif
}
#undef CPA_HAS_HSUM_TILE   /* set anew for each (ISA, T) */
#if VBYTES == 64 && !T_IS_F64 && defined(__AVX512F__)
#define CPA_HAS_HSUM_TILE 1
/* s[r * sstride + t] = hsum(a[t][r]) for a 4 x 4 tile of vectors, each summed
 * by the same tree as hsum (so bitwise equal to it): the 16 reductions share
 * their shuffles, and each row's 4 sums leave as one 128-bit store. Lane
 * bookkeeping: after the four folds, float 4k + m holds a[m][k]. */
static inline __attribute__((always_inline)) void TN(hsum_tile)(V a[4][4], T *s, int64_t sstride)
{
    __m512 c[8], e[4], f[2];
    for (int j = 0; j < 8; j++) {   /* 512 -> 256 bits: a pair of vectors per result */
        const __m512 x = (__m512)a[(2 * j) / 4][(2 * j) % 4], y = (__m512)a[(2 * j + 1) / 4][(2 * j + 1) % 4];
        c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0xEE), _mm512_shuffle_f32x4(x, y, 0x44));
    }
    for (int j = 0; j < 4; j++)     /* 256 -> 128 bits: four vectors per result */
        e[j] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0xDD),
                             _mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0x88));
    for (int j = 0; j < 2; j++)     /* 128 -> 64 bits */
        f[j] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * j], e[2 * j + 1], 0xEE),
                             _mm512_shuffle_ps(e[2 * j], e[2 * j + 1], 0x44));
    /* 64 -> 32 bits */
    const __m512 h = _mm512_add_ps(_mm512_shuffle_ps(f[0], f[1], 0xDD), _mm512_shuffle_ps(f[0], f[1], 0x88));
    _mm_storeu_ps(s, _mm512_castps512_ps128(h));
    _mm_storeu_ps(s + sstride, _mm512_extractf32x4_ps(h, 1));
    _mm_storeu_ps(s + 2 * sstride, _mm512_extractf32x4_ps(h, 2));
    _mm_storeu_ps(s + 3 * sstride, _mm512_extractf32x4_ps(h, 3));
}
#else
#define CPA_HAS_HSUM_TILE 0
#endif

#if !T_IS_F64
/* VL bytes at p as 32-bit lanes, sign-extended (sign) or zero-extended:
 * one widening load where the ISA has it (GCC's generic vector conversion
 * of bytes is scalarised). */
static inline VI TN(ld_bytes)(const void *p, const int sign)
{
#if VBYTES == 64 && defined(__AVX512F__)
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    return (VI)(sign ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif VBYTES == 32 && defined(__AVX2__)
    const __m128i b = _mm_loadl_epi64((const __m128i *)p);
    return (VI)(sign ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
#else
    VI w;
    for (int i = 0; i < VL; i++) w[i] = sign ? ((const int8_t *)p)[i] : ((const uint8_t *)p)[i];
    return w;
#endif
}
#endif

static inline int TN(any)(VI m) { for (int i = 0; i < VL; i++) if (m[i]) return 1; return 0; }

#if T_IS_F64
/* float64 is the accuracy path: libm per lane, exact special cases. */
static inline V TN(vexp)(V x) { V r = x; for (int i = 0; i < VL; i++) r[i] = exp(x[i]); return r; }
static inline V TN(vtanh)(V x) { V r = x; for (int i = 0; i < VL; i++) r[i] = tanh(x[i]); return r; }
#else
/* expf on vectors: 2^n * P(r), |r| <= ln2/2, Cephes coefficients (~1 ulp).
 * Exact special cases: -inf -> 0, +inf/overflow -> inf, NaN -> NaN (the
 * masking relies on exp(-inf) == 0). Below 2^-100 (x < -69.3) the result is
 * 0: the kernels only take exp of a score minus its row's maximum, so such
 * a weight is under 2^-100 of the row's largest and cannot change a float32
 * result; kept, its products with values (p * v) fall into the subnormal
 * range, which Intel cores compute with microcode assists (ALiBi's distant
 * keys made decode 1.5x slower on a Xeon before this). */
static inline V TN(vexp)(V x)
{
    const V hi = TN(vset1)(88.3762626647949f), lo = TN(vset1)(-69.31471805599453f);
    VI big = x > hi, small = x < lo, nan = x != x;
    V xc = TN(vsel)(big | small | nan, TN(vset1)(0.0f), x);
    const V magic = TN(vset1)(12582912.0f);          /* 1.5 * 2^23: round to int */
    V t = xc * 1.44269504088896341f + magic;
    V n = t - magic;
    V r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    V p = TN(vset1)(1.9875691500E-4f);
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
    VI ni = (VI)t - (VI)magic;
    V res = (V)((VI)p + (ni << 23));
    res = TN(vsel)(small, TN(vset1)(0.0f), res);
    res = TN(vsel)(big, TN(vset1)(INFINITY), res);
    return TN(vsel)(nan, x, res);
}

/* tanh: odd polynomial near 0 (no cancellation), 1 - 2/(e^{2|x|}+1) beyond. */
static inline V TN(vtanh)(V x)
{
    VI neg = x < 0.0f;
    V ax = TN(vsel)(neg, -x, x);
    V z = ax * ax;
    V small = TN(vset1)(-5.70498872745E-3f);
    small = small * z + 2.06390887954E-2f;
    small = small * z - 5.37397155531E-2f;
    small = small * z + 1.33314422036E-1f;
    small = small * z - 3.33332819422E-1f;
    small = small * z * ax + ax;
    V e = TN(vexp)(ax + ax);
    V large = 1.0f - 2.0f / (e + 1.0f);
    V r = TN(vsel)(ax < 0.625f, small, large);
    r = TN(vsel)(x != x, x, r);
    return TN(vsel)(neg, -r, r);
}
#endif

/* Register-blocked tile products. A is read by broadcasting one element at a
 * time, B as vector rows; C is MR x NV vectors held in registers. */

/* C[i][:] = sum_k arow[i][k] * B[k][:] (overwrites C) */
static inline void TN(mk_rows)(int64_t K, const T *const *arow, const T *B, int64_t ldb,
                               T *C, int64_t ldc)
{
    V c[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            c[i][j] = TN(vset1)(0);
    const T *a[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
        a[i] = arow[i];
    for (int64_t k = 0; k < K; k++) {
        V bv[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            bv[j] = TN(vld)(B + k * ldb + j * VL);
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            T x = a[i][k];
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++)
                c[i][j] += x * bv[j];
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            TN(vst)(C + i * ldc + j * VL, c[i][j]);
}

/* C[i][:] += sum_k acol[k][off+i] * B[k][:], for MR rows (mk_cols) or one row. */
static inline void TN(mk_cols)(int64_t K, const T *const *acol, int64_t off, const T *B,
                               int64_t ldb, T *C, int64_t ldc)
{
    V c[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            c[i][j] = TN(vld)(C + i * ldc + j * VL);
    for (int64_t k = 0; k < K; k++) {
        V bv[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            bv[j] = TN(vld)(B + k * ldb + j * VL);
        const T *a = acol[k] + off;
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            T x = a[i];
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++)
                c[i][j] += x * bv[j];
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            TN(vst)(C + i * ldc + j * VL, c[i][j]);
}

static inline void TN(mk_cols1)(int64_t K, const T *const *acol, int64_t off, const T *B,
                                int64_t ldb, T *C)
{
    V c[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; j++)
        c[j] = TN(vld)(C + j * VL);
    for (int64_t k = 0; k < K; k++) {
        T x = acol[k][off];
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            c[j] += x * TN(vld)(B + k * ldb + j * VL);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NV; j++)
        TN(vst)(C + j * VL, c[j]);
}

/* C^T[d][:] += sum_k X[k][d] * B[k][:] for d < D, lanes < ncols; X given by
 * K row pointers, B and C with leading dimension ld. */
static void TN(acc_cols)(int64_t K, const T *const *xrow, int64_t D, const T *B, T *C,
                         int64_t ld, int64_t ncols)
{
    for (int64_t c = 0; c < ncols; c += NVL) {
        int64_t d0 = 0;
        for (; d0 + MR <= D; d0 += MR)
            TN(mk_cols)(K, xrow, d0, B + c, ld, C + d0 * ld + c, ld);
        for (; d0 < D; d0++)
            TN(mk_cols1)(K, xrow, d0, B + c, ld, C + d0 * ld + c);
    }
}

#if CPA_HAS_DPBF16 && !T_IS_F64 && VBYTES == 64
/* mk_rows on bfloat16 pairs with vdpbf16ps: C[i][:] = scale * sum_k
 * arow[i][k] * B[k][:]. arow are bf16 rows with an even length (an odd K is
 * padded with a 0); B row kp holds the (2kp, 2kp+1) bf16 pairs as 32-bit
 * words. bf16 x bf16 products are exact in fp32 and the sums are fp32, so
 * this is as accurate as the fp32 kernel on the same bf16 inputs; the scale
 * multiplies the fp32 sum (a scaled Q rounded back to bf16 would lose bits).
 * vdpbf16ps treats bf16 subnormals (< 1.2e-38) as 0. */
static inline void TN(mk_rows_bf16)(int64_t K, const uint16_t *const *arow, const uint32_t *B,
                                    int64_t ldb, T *C, int64_t ldc, T scale)
{
    __m512 c[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            c[i][j] = _mm512_setzero_ps();
    for (int64_t kp = 0; kp < (K + 1) / 2; kp++) {
        __m512bh bv[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            bv[j] = (__m512bh)_mm512_loadu_si512(B + kp * ldb + j * VL);
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            uint32_t w;
            memcpy(&w, arow[i] + 2 * kp, sizeof w);
            __m512bh av = (__m512bh)_mm512_set1_epi32((int)w);
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++)
                c[i][j] = _mm512_dpbf16_ps(c[i][j], av, bv[j]);
        }
    }
    const __m512 s = _mm512_set1_ps(scale);
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            _mm512_storeu_ps(C + i * ldc + j * VL, _mm512_mul_ps(c[i][j], s));
}

/* mk_cols on bfloat16 pairs: C[i][:] += sum_kp A[kp][off+i] . B[kp][:] for
 * MR rows (rows = MR) or one row (rows = 1), where A and B rows hold
 * (2kp, 2kp+1) pairs as 32-bit words; the dot of a pair is exact in fp32. */
static inline void TN(mk_cols_bf16)(int rows, int64_t K2, const uint32_t *A, int64_t lda,
                                    int64_t off, const uint32_t *B, int64_t ldb, T *C,
                                    int64_t ldc)
{
    __m512 c[MR][NV];
    if (rows == 1) {
        __m512 c1[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            c1[j] = _mm512_loadu_ps(C + j * VL);
        for (int64_t kp = 0; kp < K2; kp++) {
            __m512bh av = (__m512bh)_mm512_set1_epi32((int)A[kp * lda + off]);
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++)
                c1[j] = _mm512_dpbf16_ps(c1[j], av,
                                         (__m512bh)_mm512_loadu_si512(B + kp * ldb + j * VL));
        }
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            _mm512_storeu_ps(C + j * VL, c1[j]);
        return;
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            c[i][j] = _mm512_loadu_ps(C + i * ldc + j * VL);
    for (int64_t kp = 0; kp < K2; kp++) {
        __m512bh bv[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            bv[j] = (__m512bh)_mm512_loadu_si512(B + kp * ldb + j * VL);
        const uint32_t *a = A + kp * lda + off;
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[i]);
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++)
                c[i][j] = _mm512_dpbf16_ps(c[i][j], av, bv[j]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            _mm512_storeu_ps(C + i * ldc + j * VL, c[i][j]);
}

/* Two fp32 rows (keys 2kp, 2kp+1) as VL bf16 pairs, rounded to nearest even
 * by the hardware (NaN stays NaN). */
static inline __m512i TN(pair_bf16)(__m512 lo, __m512 hi)
{
    /* cvtne2ps puts lo in words 0..15 and hi in 16..31: interleave them */
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
    return _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

/* Rows 0..n-1 of P (fp32, row stride ld) as ceil(n/2) rows of bf16 pairs;
 * an odd n pairs the last row with 0. */
static inline void TN(pack_p_pairs)(const T *P, int64_t n, int64_t ld, uint32_t *out)
{
    for (int64_t i = 0; i < n; i += 2)
        for (int64_t c = 0; c < ld; c += VL) {
            __m512 lo = _mm512_loadu_ps(P + i * ld + c);
            __m512 hi = i + 1 < n ? _mm512_loadu_ps(P + (i + 1) * ld + c) : _mm512_setzero_ps();
            _mm512_storeu_si512(out + i / 2 * ld + c, TN(pair_bf16)(lo, hi));
        }
}

/* bf16 rows 0..n-1 (D elements each) interleaved two by two into ceil(n/2)
 * rows of D pairs; an odd n pairs the last row with the zero row. */
static inline void TN(pack_row_pairs)(const uint16_t *const *rows, int64_t n, int64_t D,
                                      const uint16_t *zero, uint32_t *out)
{
    typedef uint16_t h_t __attribute__((vector_size(VBYTES / 2)));
    typedef uint32_t w_t __attribute__((vector_size(VBYTES)));
    for (int64_t i = 0; i < n; i += 2) {
        const uint16_t *r0 = rows[i], *r1 = i + 1 < n ? rows[i + 1] : zero;
        uint32_t *o = out + i / 2 * D;
        int64_t d = 0;
        for (; d + VL <= D; d += VL) {
            h_t h0, h1;
            memcpy(&h0, r0 + d, sizeof h0);
            memcpy(&h1, r1 + d, sizeof h1);
            w_t w = __builtin_convertvector(h0, w_t) | __builtin_convertvector(h1, w_t) << 16;
            memcpy(o + d, &w, sizeof w);
        }
        for (; d < D; d++) o[d] = r0[d] | (uint32_t)r1[d] << 16;
    }
}
#if CPA_HAS_AMX
#include "amx_t.h"
#endif
#endif
