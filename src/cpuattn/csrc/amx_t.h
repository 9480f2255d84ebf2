/* The tiled kernel's two products on Intel AMX tiles (the amx path: bf16
 * Q, K and V, float T). Included by simd_t.h in the amx region only.
 *
 * Tiles are 16 rows x 64 bytes; tdpbf16ps C += A B takes A as 16 rows of
 * 16 bf16 pairs and B as 16 rows of pairs (row kp: the (2kp, 2kp+1)
 * elements of 16 columns), the layout the avx512bf16 kernel already packs:
 *  - scores, S^T = K Q^T: A = 16 key rows straight from K (32 dims), B = Q^T
 *    as dim pairs (QP), C = 16 keys x 16 query lanes of S^T;
 *  - values, O^T += V^T P^T: A = V^T as key pairs (VP, transposed), B = P^T
 *    as key pairs (PP), C = 16 dims x 16 query lanes of O^T.
 * So the softmax, masks and rescaling of the tiled kernel stay as they are,
 * in fp32 AVX-512 on S^T and O^T. Every product is blocked 2 x 2 (tiles 0-3
 * accumulate, 4-5 hold A, 6-7 hold B). Accuracy is that of the avx512bf16
 * path: exact bf16 products summed in fp32, P rounded to bf16.
 *
 * The tile instructions are written as inline assembly with memory clobbers
 * (GCC 12's intrinsics have none, so it may move loads of a stored tile
 * across the store). CPA_AMX_EMULATE runs them as C instead, so the layouts
 * are tested on any AVX512_BF16 CPU (tests/native/attn_check.c). */
#ifndef CPA_AMX_T_ONCE
#define CPA_AMX_T_ONCE

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) cpa_amx_cfg;

#ifdef CPA_AMX_EMULATE
static _Thread_local uint8_t cpa_tmm[8][16][64];

static void cpa_amx_emu_load(int t, const void *p, int64_t stride)
{
    for (int r = 0; r < 16; r++) memcpy(cpa_tmm[t][r], (const char *)p + r * stride, 64);
}

static void cpa_amx_emu_store(int t, void *p, int64_t stride)
{
    for (int r = 0; r < 16; r++) memcpy((char *)p + r * stride, cpa_tmm[t][r], 64);
}

static float cpa_amx_emu_bf16(const uint8_t *p)
{
    uint32_t w = (uint32_t)(p[0] | p[1] << 8) << 16;
    float f;
    memcpy(&f, &w, 4);
    return f;
}

static void cpa_amx_emu_dp(int c, int a, int b)
{
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            float acc;
            memcpy(&acc, &cpa_tmm[c][m][4 * n], 4);
            for (int k = 0; k < 16; k++)
                for (int e = 0; e < 2; e++)
                    acc += cpa_amx_emu_bf16(&cpa_tmm[a][m][4 * k + 2 * e]) *
                           cpa_amx_emu_bf16(&cpa_tmm[b][k][4 * n + 2 * e]);
            memcpy(&cpa_tmm[c][m][4 * n], &acc, 4);
        }
}
#define CPA_AMX_LOAD(t, p, stride) cpa_amx_emu_load(t, p, stride)
#define CPA_AMX_STORE(t, p, stride) cpa_amx_emu_store(t, p, stride)
#define CPA_AMX_ZERO(t) memset(cpa_tmm[t], 0, sizeof cpa_tmm[t])
#define CPA_AMX_DP(c, a, b) cpa_amx_emu_dp(c, a, b)
#define CPA_AMX_CONFIG(cfg) (void)(cfg)
#define CPA_AMX_RELEASE() ((void)0)
#else
#define CPA_AMX_LOAD(t, p, stride) \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(p), "r"((int64_t)(stride)) : "memory")
#define CPA_AMX_STORE(t, p, stride) \
    __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(p), "r"((int64_t)(stride)) : "memory")
#define CPA_AMX_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
#define CPA_AMX_DP(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#define CPA_AMX_CONFIG(cfg) __asm__ volatile("ldtilecfg %0" ::"m"(*(cfg)) : "memory")
#define CPA_AMX_RELEASE() __asm__ volatile("tilerelease" ::: "memory")
#endif

/* the 2 x 2 blocked product: C tiles 0-3 += A tiles 4-5 times B tiles 6-7 */
#define CPA_AMX_DP2X2() \
    do { CPA_AMX_DP(0, 4, 6); CPA_AMX_DP(1, 4, 7); CPA_AMX_DP(2, 5, 6); CPA_AMX_DP(3, 5, 7); } while (0)
#endif

/* Configure this thread's tiles: 8 tiles of 16 rows x 64 bytes. The
 * configuration is per thread and dropped by amx_end (tilerelease), so an
 * item never depends on what ran on its thread before. */
static inline void TN(amx_begin)(void)
{
    cpa_amx_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    CPA_AMX_CONFIG(&cfg);
}

static inline void TN(amx_end)(void) { CPA_AMX_RELEASE(); }

/* 16 bf16 rows of D elements as one tile operand: the first row and the
 * stride between rows when they are evenly spaced (a dense K, or rows inside
 * one page), else a copy of them, D apart, in pack. */
static inline const uint16_t *TN(amx_rows)(const uint16_t *const *rows, int64_t D, uint16_t *pack,
                                           int64_t *stride)
{
    const intptr_t s = (intptr_t)rows[1] - (intptr_t)rows[0];
    int even = 1;
    for (int r = 2; r < 16 && even; r++)
        even = (intptr_t)rows[r] - (intptr_t)rows[0] == r * s;
    if (even) {
        *stride = s;
        return rows[0];
    }
    for (int r = 0; r < 16; r++) memcpy(pack + r * D, rows[r], (size_t)D * sizeof(uint16_t));
    *stride = D * (int64_t)sizeof(uint16_t);
    return pack;
}

/* S^T rows 0 .. nk-1 (nk a multiple of 32) = scale * K Q^T: krow are bf16
 * key rows of Dk (a multiple of 32) elements, QP holds Dk/2 rows of Mp (a
 * multiple of 32) query pairs; pack has room for 32 rows of Dk. */
static void TN(amx_scores)(int64_t Dk, int64_t nk, const uint16_t *const *krow, uint16_t *pack,
                           const uint32_t *QP, int64_t Mp, T *ST, T scale)
{
    const int64_t ldq = Mp * 4, lds = Mp * (int64_t)sizeof(T);
    for (int64_t i0 = 0; i0 < nk; i0 += 32) {
        int64_t sa, sb;
        const uint16_t *ka = TN(amx_rows)(krow + i0, Dk, pack, &sa);
        const uint16_t *kb = TN(amx_rows)(krow + i0 + 16, Dk, pack + 16 * Dk, &sb);
        for (int64_t c = 0; c < Mp; c += 32) {
            CPA_AMX_ZERO(0); CPA_AMX_ZERO(1); CPA_AMX_ZERO(2); CPA_AMX_ZERO(3);
            for (int64_t d = 0; d < Dk; d += 32) {
                CPA_AMX_LOAD(4, ka + d, sa);
                CPA_AMX_LOAD(5, kb + d, sb);
                CPA_AMX_LOAD(6, QP + d / 2 * Mp + c, ldq);
                CPA_AMX_LOAD(7, QP + d / 2 * Mp + c + 16, ldq);
                CPA_AMX_DP2X2();
            }
            T *s = ST + i0 * Mp + c;
            CPA_AMX_STORE(0, s, lds);
            CPA_AMX_STORE(1, s + 16, lds);
            CPA_AMX_STORE(2, s + 16 * Mp, lds);
            CPA_AMX_STORE(3, s + 16 * Mp + 16, lds);
        }
        const V sv = TN(vset1)(scale);
        for (int64_t i = i0 * Mp; i < (i0 + 32) * Mp; i += VL) TN(vst)(ST + i, TN(vld)(ST + i) * sv);
    }
}

/* dst[c][r] = src[r][c] for a 16 x 16 block of 32-bit words: pairs of rows
 * interleaved by 32 then 64 bits, then 128-bit lanes gathered twice. */
static inline void TN(amx_transpose16)(const uint32_t *src, int64_t lds, uint32_t *dst, int64_t ldd)
{
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(src + i * lds);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* r[4i + j], 128-bit lane L: rows 4i .. 4i+3 of column 4L + j */
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        t[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);       /* lanes 0, 2 of rows 0-7 */
        t[4 + j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);   /* lanes 1, 3 */
        t[8 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    }
    for (int j = 0; j < 4; j++) {
        _mm512_storeu_si512(dst + j * ldd, _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88));
        _mm512_storeu_si512(dst + (4 + j) * ldd, _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0x88));
        _mm512_storeu_si512(dst + (8 + j) * ldd, _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd));
        _mm512_storeu_si512(dst + (12 + j) * ldd, _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0xdd));
    }
}

/* O^T (Dv rows of Mp query lanes) += V^T P^T over n <= 64 keys: vrow are
 * the bf16 value rows (a hidden non-finite one already replaced by the zero
 * row), P^T the fp32 weights in ST (n rows of Mp). VP (32 x Dv words), VT
 * (Dv x 32 words) and PP (32 x Mp words) are scratch. Dv is a multiple of 16. */
static void TN(amx_values)(int64_t n, const uint16_t *const *vrow, int64_t Dv, const uint16_t *zero,
                           const T *ST, int64_t Mp, uint32_t *VP, uint32_t *VT, uint32_t *PP, T *OT)
{
    const int64_t n2 = (n + 1) / 2, np = cpa_roundup(n2, 16);   /* key pairs, padded */
    const int64_t ldo = Mp * (int64_t)sizeof(T), ldp = Mp * 4, ldt = 32 * 4;
    TN(pack_row_pairs)(vrow, n, Dv, zero, VP);
    memset(VP + n2 * Dv, 0, (size_t)((np - n2) * Dv) * 4);
    TN(pack_p_pairs)(ST, n, Mp, PP);
    memset(PP + n2 * Mp, 0, (size_t)((np - n2) * Mp) * 4);
    for (int64_t k = 0; k < np; k += 16)
        for (int64_t d = 0; d < Dv; d += 16)
            TN(amx_transpose16)(VP + k * Dv + d, Dv, VT + d * 32 + k, 32);
    for (int64_t d0 = 0; d0 < Dv; d0 += 32) {
        const int two = d0 + 32 <= Dv;   /* else one last 16-dim block */
        for (int64_t c = 0; c < Mp; c += 32) {
            T *o = OT + d0 * Mp + c;
            CPA_AMX_LOAD(0, o, ldo);
            CPA_AMX_LOAD(1, o + 16, ldo);
            if (two) {
                CPA_AMX_LOAD(2, o + 16 * Mp, ldo);
                CPA_AMX_LOAD(3, o + 16 * Mp + 16, ldo);
            }
            for (int64_t k = 0; k < np; k += 16) {
                CPA_AMX_LOAD(4, VT + d0 * 32 + k, ldt);
                CPA_AMX_LOAD(6, PP + k * Mp + c, ldp);
                CPA_AMX_LOAD(7, PP + k * Mp + c + 16, ldp);
                if (two) {
                    CPA_AMX_LOAD(5, VT + (d0 + 16) * 32 + k, ldt);
                    CPA_AMX_DP2X2();
                } else {
                    CPA_AMX_DP(0, 4, 6);
                    CPA_AMX_DP(1, 4, 7);
                }
            }
            CPA_AMX_STORE(0, o, ldo);
            CPA_AMX_STORE(1, o + 16, ldo);
            if (two) {
                CPA_AMX_STORE(2, o + 16 * Mp, ldo);
                CPA_AMX_STORE(3, o + 16 * Mp + 16, ldo);
            }
        }
    }
}
