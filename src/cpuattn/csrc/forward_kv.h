/* The part of the forward engine that reads K/V rows of one storage type KS,
 * for one (ISA, compute type T): element loads, the decode kernel's two
 * register-blocked products and its two passes, and the row conversion the
 * tiled kernel uses. Included by forward_isa.h after simd_t.h for the same
 * ISA and T, once per storage type; forward_items.h then calls these
 * functions through the table TN(kv_table), by the call's K and V dtype, so
 * that any K type pairs with any V type without a kernel per pair.
 * Expects: KS (the element type: float, double, uint16_t, int8_t, uint8_t),
 * KSTAG, KS_KIND (CPA_KIND_*).
 *
 * Low-bit types are dequantised in registers, never into a copy of the
 * pages: int8 and fp8 rows have one scale per row, applied to the score
 * (K) or folded into the softmax weight (V); int4 rows have one float16
 * scale per group of CPA_INT4_GROUP elements, applied to the converted
 * vectors. The compute type of every low-bit type is float. */
#undef FN
#define FN(x) CPA_CAT4(x, ISA_TAG, TTAG, KSTAG)
#undef KS_BITS
#undef KS_ROWSCALE
#undef KS_GROUPSCALE
#undef DEC_PAIRED
#undef KS_AT

#if KS_KIND == CPA_KIND_I4
#define KS_BITS 4
#elif KS_KIND == CPA_KIND_I8 || KS_KIND == CPA_KIND_E4M3 || KS_KIND == CPA_KIND_E5M2
#define KS_BITS 8
#else
#define KS_BITS (8 * (int)sizeof(KS))
#endif
#define KS_ROWSCALE (KS_KIND == CPA_KIND_I8 || KS_KIND == CPA_KIND_E4M3 || KS_KIND == CPA_KIND_E5M2)
#define KS_GROUPSCALE (KS_KIND == CPA_KIND_I4)
/* Rows read 2*VL elements at a time as (even elements, odd elements): a bf16
 * pair is one 32-bit lane (x[2i+1] by masking, x[2i] by shifting), an int4
 * byte holds elements 2i (low nibble) and 2i+1 (high nibble). The q rows and
 * output rows of such a type are kept in the same order while the kernel runs. */
#define DEC_PAIRED (KS_KIND == CPA_KIND_BF16 || KS_KIND == CPA_KIND_I4)
/* Element d of a row (int4: the byte that holds it). */
#if KS_KIND == CPA_KIND_I4
#define KS_AT(p, d) ((p) + (d) / 2)
#else
#define KS_AT(p, d) ((p) + (d))
#endif

/* Bytes of n elements. */
static inline int64_t FN(nbytes)(int64_t n) { return n * KS_BITS / 8; }

/* Bytes per scale of a row: 0 for float storage. */
enum { FN(SCALE_BYTES) = KS_ROWSCALE ? 4 : KS_GROUPSCALE ? 2 : 0 };

/* The scale of element d of a row whose scales start at s. */
static inline T FN(scale_at)(const void *s, int64_t d)
{
#if KS_ROWSCALE
    (void)d;
    return *(const float *)s;
#elif KS_GROUPSCALE
    const uint16_t h = ((const uint16_t *)s)[d / CPA_INT4_GROUP];
#if CPA_HAS_F16C
    return _cvtsh_ss(h);
#else
    return cpa_f16_to_f32(h);
#endif
#else
    (void)s; (void)d;
    return 1;
#endif
}

#if KS_KIND == CPA_KIND_E4M3 || KS_KIND == CPA_KIND_E5M2
/* fp8 bytes (as 32-bit lanes) to float: the magnitude bits placed at the top
 * of a float's exponent and mantissa, times 2^(127 - bias), are exact for
 * normal and subnormal codes alike; then NaN (e4m3fn 0x7f; e5m2 exponent 31
 * with a mantissa) and inf (e5m2), and the sign. */
typedef uint32_t FN(u32v) __attribute__((vector_size(VBYTES)));
static inline V FN(fp8_lanes)(FN(u32v) w)
{
    const FN(u32v) mag = w & 0x7f;
#if KS_KIND == CPA_KIND_E4M3
    V x = (V)(mag << 20) * 0x1p120f;
    x = TN(vsel)((VI)(mag == 0x7f), TN(vset1)(NAN), x);
#else
    V x = (V)(mag << 21) * 0x1p112f;
    x = TN(vsel)((VI)(mag == 0x7c), TN(vset1)(INFINITY), x);
    x = TN(vsel)((VI)(mag > 0x7c), TN(vset1)(NAN), x);
#endif
    return (V)((FN(u32v))x | (w & 0x80) << 24);
}
#endif

#if !KS_GROUPSCALE
/* VL consecutive elements as a compute vector, unscaled (int4 rows are read
 * in pairs only). */
static inline V FN(ldkv)(const KS *p)
{
#if KS_KIND == CPA_KIND_F32 || KS_KIND == CPA_KIND_F64
    return TN(vld)(p);
#elif KS_KIND == CPA_KIND_BF16
    typedef uint16_t h_t __attribute__((vector_size(VBYTES / 2)));
    typedef uint32_t w_t __attribute__((vector_size(VBYTES)));
    h_t h; memcpy(&h, p, sizeof h);
    return (V)(__builtin_convertvector(h, w_t) << 16);
#elif KS_KIND == CPA_KIND_F16 && CPA_HAS_F16C && VBYTES == 64
    return (V)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif KS_KIND == CPA_KIND_F16 && CPA_HAS_F16C && VBYTES == 32
    return (V)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#elif KS_KIND == CPA_KIND_F16
    V v; for (int i = 0; i < VL; i++) v[i] = cpa_f16_to_f32(p[i]); return v;
#elif KS_KIND == CPA_KIND_I8
    return __builtin_convertvector(TN(ld_bytes)(p, 1), V);
#elif KS_KIND == CPA_KIND_E5M2 && CPA_HAS_F16C && VBYTES == 64
    /* an e5m2 byte is the top byte of a float16 */
    return (V)_mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)), 8));
#elif KS_KIND == CPA_KIND_E5M2 && CPA_HAS_F16C && VBYTES == 32
    return (V)_mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p)), 8));
#elif KS_KIND == CPA_KIND_E4M3 || KS_KIND == CPA_KIND_E5M2
    return FN(fp8_lanes)((FN(u32v))TN(ld_bytes)(p, 0));
#endif
}
#endif

/* Element d of a row, unscaled. */
static inline T FN(elem)(const KS *p, int64_t d)
{
#if KS_KIND == CPA_KIND_F16
    return cpa_f16_to_f32(p[d]);
#elif KS_KIND == CPA_KIND_BF16
    return cpa_bf16_to_f32(p[d]);
#elif KS_KIND == CPA_KIND_I4
    /* shifts of unsigned values, then an arithmetic shift: sign extension
     * without shifting a negative number left */
    const uint8_t byte = p[d / 2];
    return (T)((int8_t)(d % 2 ? byte : (uint8_t)(byte << 4)) >> 4);
#elif KS_KIND == CPA_KIND_E4M3
    return cpa_e4m3_to_f32(p[d]);
#elif KS_KIND == CPA_KIND_E5M2
    return cpa_e5m2_to_f32(p[d]);
#else
    return (T)p[d];
#endif
}

#if DEC_PAIRED
/* Elements d .. d + 2*VL - 1 of a row as (even ones, odd ones), with their
 * group scale applied (int4; s: the row's scales; bf16 has none). */
static inline void FN(ld_pairs)(const KS *row, const void *s, int64_t d, V *even, V *odd)
{
#if KS_KIND == CPA_KIND_BF16
    typedef uint32_t w_t __attribute__((vector_size(VBYTES)));
    w_t w;
    (void)s;
    memcpy(&w, row + d, sizeof w);
    *even = (V)(w << 16);
    *odd = (V)(w & 0xFFFF0000u);
#elif VBYTES == 64 && defined(__AVX512F__)
    /* a nibble is an index into the 16 values code * scale: one vpermps
     * per 16 elements converts and scales them */
    static const float codes[16] = {0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};
    const __m512 tab = _mm512_mul_ps(_mm512_loadu_ps(codes), _mm512_set1_ps(FN(scale_at)(s, d)));
    const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)KS_AT(row, d)));
    *even = (V)_mm512_permutexvar_ps(w, tab);   /* uses the low 4 bits of each lane */
    *odd = (V)_mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), tab);
#else
    typedef uint32_t u_t __attribute__((vector_size(VBYTES)));
    const VI w = TN(ld_bytes)(KS_AT(row, d), 1);   /* sign-extended bytes */
    const V g = TN(vset1)(FN(scale_at)(s, d));
    *even = __builtin_convertvector((VI)((u_t)w << 28) >> 28, V) * g;
    *odd = __builtin_convertvector(w >> 4, V) * g;
#endif
}
#endif

/* Row of n elements as dequantised T, into dst when KS is not T; returns the
 * T row. s: the row's scales (low-bit types). */
static const T *FN(to_t)(const void *src, const void *s, int64_t n, T *dst)
{
    const KS *p = (const KS *)src;
#if (KS_KIND == CPA_KIND_F32 && !T_IS_F64) || (KS_KIND == CPA_KIND_F64 && T_IS_F64)
    (void)n; (void)dst; (void)s;
    return (const T *)p;
#else
    int64_t d = 0;
#if KS_GROUPSCALE
    for (; d + 2 * VL <= n; d += 2 * VL) {
        V e, o;
        FN(ld_pairs)(p, s, d, &e, &o);
        for (int i = 0; i < VL; i++) { dst[d + 2 * i] = e[i]; dst[d + 2 * i + 1] = o[i]; }
    }
#else
    const V sv = TN(vset1)(FN(scale_at)(s, 0));
    for (; d + VL <= n; d += VL) TN(vst)(dst + d, KS_ROWSCALE ? FN(ldkv)(p + d) * sv : FN(ldkv)(p + d));
#endif
    for (; d < n; d++) dst[d] = (KS_ROWSCALE || KS_GROUPSCALE) ? FN(elem)(p, d) * FN(scale_at)(s, d)
                                                              : FN(elem)(p, d);
    return dst;
#endif
}

/* ---- decode products ----
 * s[r * sstride + t] = q_r . k_t for RB query rows (qstride apart) and TB
 * key rows k (their scales ks); pf (or NULL): TB rows to prefetch, a line
 * per step, so that the misses are spread over the arithmetic instead of
 * arriving in bursts. */
#define DEC_NEW_LINE(d, step) (((d) * KS_BITS / 8 & 63) < (step) * KS_BITS / 8)

static inline __attribute__((always_inline)) void FN(dec_qk)(
    const T *q, int64_t qstride, const KS *const *k, const char *const *ks, int64_t Dk, T *s,
    int64_t sstride, const KS *const *pf, const int RB, const int TB)
{
    V acc[4][4];
    (void)ks;
    for (int t = 0; t < TB; t++)
        for (int r = 0; r < RB; r++) acc[t][r] = TN(vset1)(0);
    int64_t d = 0;
#if DEC_PAIRED
    for (; d + 2 * VL <= Dk; d += 2 * VL) {
        if (pf && DEC_NEW_LINE(d, 2 * VL))
            for (int t = 0; t < TB; t++) __builtin_prefetch(KS_AT(pf[t], d), 0, 3);
        V ke[4], ko[4];
        for (int t = 0; t < TB; t++) {
            FN(ld_pairs)(k[t], KS_GROUPSCALE ? ks[t] : NULL, d, &ke[t], &ko[t]);
        }
        for (int r = 0; r < RB; r++) {
            V qe = TN(vld)(q + r * qstride + d), qo = TN(vld)(q + r * qstride + d + VL);
            for (int t = 0; t < TB; t++) {
                acc[t][r] += qe * ke[t];
                acc[t][r] += qo * ko[t];
            }
        }
    }
#endif
#if !KS_GROUPSCALE
    for (; d + VL <= Dk; d += VL) {
        if (pf && DEC_NEW_LINE(d, VL))
            for (int t = 0; t < TB; t++) __builtin_prefetch(pf[t] + d, 0, 3);
        V kv[4];
        for (int t = 0; t < TB; t++) kv[t] = FN(ldkv)(k[t] + d);
        for (int r = 0; r < RB; r++) {
            V qv = TN(vld)(q + r * qstride + d);
            for (int t = 0; t < TB; t++) acc[t][r] += qv * kv[t];
        }
    }
#endif
#if CPA_HAS_HSUM_TILE
    if (RB == 4 && TB == 4 && d == Dk) {
        TN(hsum_tile)(acc, s, sstride);
#if KS_ROWSCALE
        for (int t = 0; t < 4; t++) {
            const T sc = FN(scale_at)(ks[t], 0);
            for (int r = 0; r < 4; r++) s[r * sstride + t] *= sc;
        }
#endif
        return;
    }
#endif
    for (int t = 0; t < TB; t++) {
        T x[4];
        if (RB == 4)
            TN(hsum4)(acc[t][0], acc[t][1], acc[t][2], acc[t][3], x);
        else
            for (int r = 0; r < RB; r++) x[r] = TN(hsum)(acc[t][r]);
        for (int r = 0; r < RB; r++) {
            for (int64_t dd = d; dd < Dk; dd++)
                x[r] += q[r * qstride + dd] *
                        (KS_GROUPSCALE ? FN(elem)(k[t], dd) * FN(scale_at)(ks[t], dd) : FN(elem)(k[t], dd));
            s[r * sstride + t] = KS_ROWSCALE ? x[r] * FN(scale_at)(ks[t], 0) : x[r];
        }
    }
}

/* o[r * ostride + :] += sum_t p[r * pstride + t] * v_t, for RB rows and TB
 * value rows v (their scales vs); pf as in dec_qk. A row scale joins p. */
static inline __attribute__((always_inline)) void FN(dec_pv)(
    T *o, int64_t ostride, const T *p, int64_t pstride, const KS *const *v, const char *const *vs,
    int64_t Dv, const KS *const *pf, const int RB, const int TB)
{
    T w[4][4];
    V pb[4][4];
    (void)vs;
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TB; t++) {
            w[r][t] = KS_ROWSCALE ? p[r * pstride + t] * FN(scale_at)(vs[t], 0) : p[r * pstride + t];
            pb[r][t] = TN(vset1)(w[r][t]);
        }
    int64_t d = 0;
#if DEC_PAIRED
    for (; d + 2 * VL <= Dv; d += 2 * VL) {
        if (pf && DEC_NEW_LINE(d, 2 * VL))
            for (int t = 0; t < TB; t++) __builtin_prefetch(KS_AT(pf[t], d), 0, 3);
        V ve[4], vo[4];
        for (int t = 0; t < TB; t++) {
            FN(ld_pairs)(v[t], KS_GROUPSCALE ? vs[t] : NULL, d, &ve[t], &vo[t]);
        }
        for (int r = 0; r < RB; r++) {
            V ae = TN(vld)(o + r * ostride + d), ao = TN(vld)(o + r * ostride + d + VL);
            for (int t = 0; t < TB; t++) {
                ae += pb[r][t] * ve[t];
                ao += pb[r][t] * vo[t];
            }
            TN(vst)(o + r * ostride + d, ae);
            TN(vst)(o + r * ostride + d + VL, ao);
        }
    }
#endif
#if !KS_GROUPSCALE
    for (; d + VL <= Dv; d += VL) {
        if (pf && DEC_NEW_LINE(d, VL))
            for (int t = 0; t < TB; t++) __builtin_prefetch(pf[t] + d, 0, 3);
        V vv[4];
        for (int t = 0; t < TB; t++) vv[t] = FN(ldkv)(v[t] + d);
        for (int r = 0; r < RB; r++) {
            V acc = TN(vld)(o + r * ostride + d);
            for (int t = 0; t < TB; t++) acc += pb[r][t] * vv[t];
            TN(vst)(o + r * ostride + d, acc);
        }
    }
#endif
    for (; d < Dv; d++)
        for (int t = 0; t < TB; t++) {
            const T x = KS_GROUPSCALE ? FN(elem)(v[t], d) * FN(scale_at)(vs[t], d) : FN(elem)(v[t], d);
            for (int r = 0; r < RB; r++) o[r * ostride + d] += w[r][t] * x;
        }
}

/* Reorder each full 2*VL chunk of a row to (even elements, odd elements), or back. */
static inline void FN(pairs_order)(T *row, int64_t n, int split)
{
    T tmp[2 * VL];
    for (int64_t c = 0; c + 2 * VL <= n; c += 2 * VL) {
        T *x = row + c;
        for (int64_t i = 0; i < VL; i++) {
            if (split) { tmp[i] = x[2 * i]; tmp[VL + i] = x[2 * i + 1]; }
            else { tmp[2 * i] = x[i]; tmp[2 * i + 1] = x[VL + i]; }
        }
        memcpy(x, tmp, sizeof tmp);
    }
}

/* Both products over M rows, in register blocks of 4, 2 and 1 rows. */
#define DEC_ROWS(call, M, ...)                                                   \
    do {                                                                         \
        int64_t r_ = 0;                                                          \
        for (; r_ + 4 <= (M); r_ += 4) call(r_, 4, __VA_ARGS__);                 \
        if ((M) - r_ >= 2) { call(r_, 2, __VA_ARGS__); r_ += 2; }                \
        if ((M) - r_ == 1) call(r_, 1, __VA_ARGS__);                             \
    } while (0)
#define DEC_QK_AT(r, RB, TB) \
    FN(dec_qk)(q + (r) * qst, qst, xr, xsr, D, s + (r) * scs, scs, (r) ? NULL : pf, RB, TB)
#define DEC_PV_AT(r, RB, TB) \
    FN(dec_pv)(ob + (r) * D, D, s + (r) * scs, scs, xr, xsr, D, (r) ? NULL : pf, RB, TB)

/* Row addresses of the item's keys k0 .. k0 + n - 1 for its first kv head,
 * in x (and their scales' in xs, for low-bit types). */
static void FN(dec_rows)(const TN(dec) *c, const cpa_rows *x, const cpa_rows *xs)
{
    const cpa_fwd_args *a = c->a;
    const char *base = (const char *)((const KS *)x->data + cpa_kv_seq(a, x, c->b) + c->kvh0 * x->head);
    cpa_kv_rows(a, c->b, base, sizeof(KS), x->tok, x->seq, c->k0, c->n, c->row);
    if (FN(SCALE_BYTES)) {
        const char *sb = (const char *)xs->data + (cpa_kv_seq(a, xs, c->b) + c->kvh0 * xs->head) * FN(SCALE_BYTES);
        cpa_kv_rows(a, c->b, sb, FN(SCALE_BYTES), xs->tok, xs->seq, c->k0, c->n, c->srow);
    }
}

/* Keys [b0, b1) of the item through one decode product, TB key rows at a
 * time, all the item's heads of a token in turn (adjacent in a page, so
 * reads stay in memory order): scores from K (values = 0) or P V added to
 * the output rows (values = 1). c->row / c->srow hold the rows' addresses. */
static inline __attribute__((always_inline)) void FN(dec_sweep)(const TN(dec) *c, const int values,
                                                                int64_t b0, int64_t b1)
{
    enum { TB = TN(DEC_TB) };
    const cpa_fwd_args *a = c->a;
    const cpa_rows *x = values ? &a->v : &a->k, *xs = values ? &a->v_scale : &a->k_scale;
    const int64_t M = c->M, nh = c->nh, D = values ? a->head_dim_v : a->head_dim_qk;
    const int64_t qst = c->qst, scs = c->scs, xh = x->head, xsh = xs->head * FN(SCALE_BYTES);
    const KS **rows = (const KS **)c->row;
    const char **srows = (const char **)c->srow;
    if (b1 <= b0)
        return;
    const int64_t ahead = cpa_prefetch_distance(nh * FN(nbytes)(D));
    for (int64_t i = b0; i < b0 + ahead && i < b1; i++)
        for (int64_t hh = 0; hh < nh; hh++) cpa_prefetch_bytes(rows[i] + hh * xh, FN(nbytes)(D));
    /* many rows (a shared item): CH tokens of one head at a time, so that
     * the head's q or output rows stay in L1 over them (each row still sees
     * the keys in order) */
    const int64_t CH = M > CPA_DEC_MAX_M ? 4 * TB : TB;
    for (int64_t c0 = b0; c0 < b1; c0 += CH)
    for (int64_t hh = 0; hh < nh; hh++)
    for (int64_t i0 = c0, c1 = cpa_min(c0 + CH, b1); i0 < c1; i0 += TB) {
        const int full = i0 + TB <= c1;
        const T *q = c->qs + hh * M * qst;
        T *ob = c->o + hh * M * D, *s = c->sc + hh * M * scs + i0;
        const KS *xr[TB], *pf[TB];
        const char *xsr[TB];
        for (int t = 0; t < TB; t++) pf[t] = rows[cpa_min(i0 + ahead + t, b1 - 1)] + hh * xh;
        const int64_t nb = full ? TB : 1;
        for (int64_t i = i0; i < (full ? i0 + 1 : c1); i++, s++) {
            for (int t = 0; t < nb; t++) {
                xr[t] = rows[i + t] + hh * xh;
                xsr[t] = FN(SCALE_BYTES) ? srows[i + t] + hh * xsh : NULL;
            }
            if (full && values) DEC_ROWS(DEC_PV_AT, M, TB);
            else if (full) DEC_ROWS(DEC_QK_AT, M, TB);
            else if (values) DEC_ROWS(DEC_PV_AT, M, 1);
            else DEC_ROWS(DEC_QK_AT, M, 1);
        }
    }
}

/* Decode pass 1: scores of every key of the item, hidden ones too (the
 * softmax masks them). */
static void FN(dec_scores)(const TN(dec) *c)
{
    FN(dec_rows)(c, &c->a->k, &c->a->k_scale);
    if (DEC_PAIRED)
        for (int64_t rr = 0; rr < c->nh * c->M; rr++) FN(pairs_order)(c->qs + rr * c->qst, c->a->head_dim_qk, 1);
    FN(dec_sweep)(c, 0, 0, c->n);
}

/* o_rr += p_rr,i v_i for keys i in [i0, i1) of the split, only in the rows
 * rr that see key i: for keys hidden from some rows. */
static void FN(dec_pv_seen)(const TN(dec) *c, int64_t i0, int64_t i1)
{
    const cpa_fwd_args *a = c->a;
    const int64_t M = c->M, Dv = a->head_dim_v, vh = a->v.head, vsh = a->v_scale.head * FN(SCALE_BYTES);
    const KS **vrow = (const KS **)c->row;
    const char **vsrow = (const char **)c->srow;
    for (int64_t i = i0; i < i1; i++)
        for (int64_t rr = 0; rr < c->nh * M; rr++) {
            const int64_t r = rr % M;
            if (c->k0 + i < c->lo[r] || c->k0 + i > c->hi[r]
                || cpa_tree_hides(a, c->rseq[r], c->rtok[r], c->k0 + i)) continue;
            const KS *vr = vrow[i] + (rr / M) * vh;
            const char *vsr = FN(SCALE_BYTES) ? vsrow[i] + (rr / M) * vsh : NULL;
            FN(dec_pv)(c->o + rr * Dv, 0, c->sc + rr * c->scs + i, 0, &vr, &vsr, Dv, NULL, 1, 1);
        }
}

/* Decode pass 2: O = P V, V in the order pass 1 read K. Keys every row sees
 * go through the shared product; a key hidden from some rows is added only
 * to the rows that see it, since p = 0 times a NaN or inf in a hidden
 * (stale) value, or its garbage scale, would be NaN. */
static void FN(dec_values)(const TN(dec) *c)
{
    const int64_t rows = c->nh * c->M, Dv = c->a->head_dim_v;
    FN(dec_rows)(c, &c->a->v, &c->a->v_scale);
    memset(c->o, 0, (size_t)(rows * Dv) * sizeof(T));
    FN(dec_pv_seen)(c, 0, c->s0);
    FN(dec_sweep)(c, 1, c->s0, c->s1);
    FN(dec_pv_seen)(c, c->s1, c->n);
    if (DEC_PAIRED)
        for (int64_t rr = 0; rr < rows; rr++) FN(pairs_order)(c->o + rr * Dv, Dv, 0);
}
#undef DEC_ROWS
#undef DEC_QK_AT
#undef DEC_PV_AT
#undef DEC_NEW_LINE
#undef KS
#undef KSTAG
#undef KS_KIND
