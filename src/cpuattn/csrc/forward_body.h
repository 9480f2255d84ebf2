/* Forward attention work items for one (ISA, compute type T, KV storage KS).
 * Included by forward.c after simd_t.h for the same ISA and T.
 * Expects: KS (float|double|uint16_t), KSTAG, KS_KIND (CPA_KIND_F32..CPA_KIND_BF16).
 *
 * Two item kernels:
 *  - tiled: flash attention on (query block x key tile) with the two tile
 *    products as register-blocked micro-kernels. Scores are kept transposed
 *    (keys x query rows) so the online softmax, the masks and the rescaling
 *    all run along vector lanes of query rows.
 *  - decode: few query rows (decode, small GQA groups); each key row is
 *    loaded once for all the query heads of its group.
 */
#undef FN
#define FN(x) CPA_CAT4(x, ISA_TAG, TTAG, KSTAG)

/* VL consecutive KV elements as a compute vector. */
static inline V FN(ldkv)(const KS *p)
{
#if KS_KIND == CPA_KIND_F32 || KS_KIND == CPA_KIND_F64
    return TN(vld)(p);
#elif KS_KIND == CPA_KIND_BF16
    typedef uint16_t h_t __attribute__((vector_size(VBYTES / 2)));
    typedef uint32_t w_t __attribute__((vector_size(VBYTES)));
    h_t h; memcpy(&h, p, sizeof h);
    return (V)(__builtin_convertvector(h, w_t) << 16);
#elif CPA_HAS_F16C && VBYTES == 64
    return (V)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif CPA_HAS_F16C && VBYTES == 32
    return (V)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    V v; for (int i = 0; i < VL; i++) v[i] = cpa_f16_to_f32(p[i]); return v;
#endif
}

static inline T FN(cvkv)(KS x)
{
#if KS_KIND == CPA_KIND_F16
    return cpa_f16_to_f32(x);
#elif KS_KIND == CPA_KIND_BF16
    return cpa_bf16_to_f32(x);
#else
    return (T)x;
#endif
}

/* Row of n elements as T, into dst when KS is not T; returns the T row. */
static inline const T *FN(row_as_t)(const KS *src, int64_t n, T *dst)
{
#if (KS_KIND == CPA_KIND_F32 && !T_IS_F64) || (KS_KIND == CPA_KIND_F64 && T_IS_F64)
    (void)n; (void)dst;
    return (const T *)src;
#else
    int64_t d = 0;
    for (; d + VL <= n; d += VL) TN(vst)(dst + d, FN(ldkv)(src + d));
    for (; d < n; d++) dst[d] = FN(cvkv)(src[d]);
    return dst;
#endif
}

static inline int FN(row_finite)(const KS *p, int64_t n)
{
    for (int64_t d = 0; d < n; d++) {
        T x = FN(cvkv)(p[d]);
        if (!(x - x == 0)) return 0;
    }
    return 1;
}

static void FN(tiled)(const cpa_fwd_args *a, const cpa_fwd_item *it, char *scratch, char *partials)
{
    const int64_t b = it->seq, kvh = it->kvh;
    const int64_t nq = a->q_len[b], Sk = a->k_len[b];
    const int64_t g = a->num_heads / a->num_kv_heads, bq = cpa_block_tokens(g);
    const int64_t t0 = (int64_t)it->qblock * bq, nt = cpa_min(bq, nq - t0);
    const int64_t M = nt * g, Mp = cpa_roundup(M, NVL);
    const int64_t Dk = a->head_dim_qk, Dv = a->head_dim_v;
    const KS *kbase = (const KS *)a->k.data + cpa_kv_seq(a, &a->k, b) + kvh * a->k.head;
    const KS *vbase = (const KS *)a->v.data + cpa_kv_seq(a, &a->v, b) + kvh * a->v.head;

    cpa_tiled_layout L;
    cpa_tiled_plan(a, sizeof(T), &L);
    T *QT = (T *)(scratch + L.qt), *ST = (T *)(scratch + L.st), *OT = (T *)(scratch + L.ot);
    T *m = (T *)(scratch + L.m), *l = (T *)(scratch + L.l), *alpha = (T *)(scratch + L.alpha);
    TN(ielem) *lo = (TN(ielem) *)(scratch + L.lo), *hi = (TN(ielem) *)(scratch + L.hi);
    const T **krow = (const T **)(scratch + L.krow), **vrow = (const T **)(scratch + L.vrow);
    T *kc = (T *)(scratch + L.kc), *vc = (T *)(scratch + L.vc), *zero = (T *)(scratch + L.zero);
    int64_t *fix = (int64_t *)(scratch + L.fix);
    const KS **vraw = (const KS **)(scratch + L.vraw), **kraw = (const KS **)(scratch + L.kraw);
#if CPA_HAS_DPBF16
    uint32_t *QP = (uint32_t *)QT;   /* ceil(Dk/2) rows of Mp bf16 pairs: fits in Q^T */
#endif

    /* Q^T, pre-scaled; rows r = t * g + head-in-group; padding lanes are 0. */
    memset(QT, 0, (size_t)(Dk * Mp) * sizeof(T));
    int64_t ilo = 0, ihi = Sk - 1;   /* keys every real row sees */
    for (int64_t r = 0; r < Mp; r++) {
        if (r < M) {
            int64_t t = t0 + r / g, head = kvh * g + r % g, rl, rh;
#if CPA_HAS_DPBF16
            /* bf16 Q as (d, d+1) pairs, unscaled (mk_rows_bf16 scales) */
            const uint16_t *qr = (const uint16_t *)a->q.data + cpa_at(&a->q, b, a->q_start[b] + t, head);
            for (int64_t d = 0; d < Dk; d += 2)
                QP[d / 2 * Mp + r] = qr[d] | (d + 1 < Dk ? (uint32_t)qr[d + 1] << 16 : 0);
#else
            RN_CALL(load_q_row)(a, cpa_at(&a->q, b, a->q_start[b] + t, head), QT + r, Mp, (T)a->scale);
#endif
            cpa_visible_keys(&a->mask, nq, Sk, t, &rl, &rh);
            lo[r] = (TN(ielem))rl; hi[r] = (TN(ielem))rh;
            if (rl > ilo) ilo = rl;
            if (rh < ihi) ihi = rh;
        } else {
            lo[r] = 1; hi[r] = 0;
        }
        m[r] = -INFINITY; l[r] = 0;
    }
    memset(OT, 0, (size_t)(Dv * Mp) * sizeof(T));
    /* scratch is malloc'ed: the zero row must be written, it stands in for
     * padded keys and for hidden non-finite value rows in the products */
    memset(zero, 0, (size_t)cpa_max(Dk, Dv) * sizeof(T));
    for (int64_t i = 0; i < CPA_BK_PAD; i++) krow[i] = zero;

    const T cap = (T)a->softcap;
    for (int64_t j0 = it->key_lo - it->key_lo % CPA_BK; j0 <= it->key_hi; j0 += CPA_BK) {
        const int64_t jhi = cpa_min(j0 + CPA_BK - 1, it->key_hi), n = jhi - j0 + 1;
        const int full = (j0 >= ilo && jhi <= ihi);
        cpa_kv_rows(a, b, (const char *)kbase, sizeof(KS), a->k.tok, a->k.seq, j0, n, (const void **)kraw);
        cpa_kv_rows(a, b, (const char *)vbase, sizeof(KS), a->v.tok, a->v.seq, j0, n, (const void **)vraw);
        for (int64_t i = 0; i < n; i++) {
#if CPA_HAS_DPBF16
            /* K stays bf16; an odd row gets a 0 pad so its last pair is not
             * read past the row (the next element may be NaN or unmapped) */
            if (Dk % 2) {
                uint16_t *kp = (uint16_t *)kc + i * (Dk + 1);
                memcpy(kp, kraw[i], (size_t)Dk * sizeof(uint16_t));
                kp[Dk] = 0;
                krow[i] = (const T *)kp;
            } else {
                krow[i] = (const T *)kraw[i];
            }
            vrow[i] = (const T *)vraw[i];   /* paired with the next row before P V */
#else
            krow[i] = FN(row_as_t)(kraw[i], Dk, kc + i * Dk);
            vrow[i] = FN(row_as_t)(vraw[i], Dv, vc + i * Dv);
#endif
        }
        for (int64_t i = n; i < CPA_BK_PAD; i++) krow[i] = zero;

        /* S^T = K Q^T: key rows x query lanes */
        const int64_t nkp = cpa_roundup(n, MR);
        for (int64_t i0 = 0; i0 < nkp; i0 += MR)
            for (int64_t c = 0; c < Mp; c += NVL)
#if CPA_HAS_DPBF16
                TN(mk_rows_bf16)(Dk, (const uint16_t *const *)(krow + i0), QP + c, Mp,
                                 ST + i0 * Mp + c, Mp, (T)a->scale);
#else
                TN(mk_rows)(Dk, krow + i0, QT + c, Mp, ST + i0 * Mp + c, Mp);
#endif

        /* softcap first, then the mask (a capped -inf would become finite) */
        if (cap > 0)
            for (int64_t i = 0; i < n; i++)
                for (int64_t c = 0; c < Mp; c += VL)
                    TN(vst)(ST + i * Mp + c, cap * TN(vtanh)(TN(vld)(ST + i * Mp + c) / cap));
        if (!full)
            for (int64_t i = 0; i < n; i++) {
                VI jv = TN(viset1)((TN(ielem))(j0 + i));
                for (int64_t c = 0; c < Mp; c += VL) {
                    VI lv, hv;
                    memcpy(&lv, lo + c, sizeof lv); memcpy(&hv, hi + c, sizeof hv);
                    V s = TN(vld)(ST + i * Mp + c);
                    TN(vst)(ST + i * Mp + c, TN(vsel)((jv < lv) | (jv > hv), TN(vset1)(-INFINITY), s));
                }
            }

        /* online softmax along the query lanes */
        int rescale = 0;
        for (int64_t c = 0; c < Mp; c += VL) {
            V mx = TN(vset1)(-INFINITY);
            for (int64_t i = 0; i < n; i++) mx = TN(vmax)(mx, TN(vld)(ST + i * Mp + c));
            V mold = TN(vld)(m + c), mnew = TN(vmax)(mold, mx);
            /* a row with no visible key yet keeps m = -inf; shift by 0, not -inf */
            V muse = TN(vsel)(mnew == -INFINITY, TN(vset1)(0), mnew);
            V al = TN(vexp)(mold - muse), ls = TN(vset1)(0);
            for (int64_t i = 0; i < n; i++) {
                V p = TN(vexp)(TN(vld)(ST + i * Mp + c) - muse);
                TN(vst)(ST + i * Mp + c, p);
                ls += p;
            }
            TN(vst)(l + c, TN(vld)(l + c) * al + ls);
            TN(vst)(m + c, mnew);
            TN(vst)(alpha + c, al);
            rescale |= TN(any)(al != 1);
        }
        if (rescale)
            for (int64_t d = 0; d < Dv; d++)
                for (int64_t c = 0; c < Mp; c += VL)
                    TN(vst)(OT + d * Mp + c, TN(vld)(OT + d * Mp + c) * TN(vld)(alpha + c));

        /* 0 * NaN is NaN: a non-finite value row hidden from some query rows
         * must not enter the shared product; add it only where it is seen. */
        int64_t nfix = 0;
        if (!full)
            for (int64_t i = 0; i < n; i++)
                if ((j0 + i < ilo || j0 + i > ihi) && !FN(row_finite)(vraw[i], Dv)) {
                    fix[nfix++] = i;
                    vrow[i] = zero;
                }

        /* O^T += V^T P^T */
#if CPA_HAS_DPBF16
        /* on bf16 pairs of keys: P is rounded to bf16 (relative error <= 2^-9
         * per weight, unbiased; l keeps the fp32 sum), V is bf16 already */
        uint32_t *VP = (uint32_t *)vc, *PP = (uint32_t *)(scratch + L.pp);
        const int64_t n2 = (n + 1) / 2;
        TN(pack_row_pairs)((const uint16_t *const *)vrow, n, Dv, (const uint16_t *)zero, VP);
        TN(pack_p_pairs)(ST, n, Mp, PP);
        for (int64_t c = 0; c < Mp; c += NVL) {
            int64_t d0 = 0;
            for (; d0 + MR <= Dv; d0 += MR)
                TN(mk_cols_bf16)(MR, n2, VP, Dv, d0, PP + c, Mp, OT + d0 * Mp + c, Mp);
            for (; d0 < Dv; d0++)
                TN(mk_cols_bf16)(1, n2, VP, Dv, d0, PP + c, Mp, OT + d0 * Mp + c, Mp);
        }
#else
        for (int64_t c = 0; c < Mp; c += NVL) {
            int64_t d0 = 0;
            for (; d0 + MR <= Dv; d0 += MR)
                TN(mk_cols)(n, vrow, d0, ST + c, Mp, OT + d0 * Mp + c, Mp);
            for (; d0 < Dv; d0++)
                TN(mk_cols1)(n, vrow, d0, ST + c, Mp, OT + d0 * Mp + c);
        }
#endif
        for (int64_t f = 0; f < nfix; f++) {
            const int64_t i = fix[f], j = j0 + i;
            for (int64_t r = 0; r < M; r++)
                if (j >= lo[r] && j <= hi[r])
                    for (int64_t d = 0; d < Dv; d++)
                        OT[d * Mp + r] += ST[i * Mp + r] * FN(cvkv)(vraw[i][d]);
        }
    }

    for (int64_t r = 0; r < M; r++) {
        if (it->slot < 0) {
            RN_CALL(store_row)(a, b, t0 + r / g, kvh * g + r % g, OT + r, Mp, m[r], l[r]);
        } else {
            T *part = (T *)(partials + it->slot * cpa_fwd_slot_bytes(a)) + r * (Dv + 2);
            for (int64_t d = 0; d < Dv; d++) part[d] = OT[d * Mp + r];
            part[Dv] = m[r]; part[Dv + 1] = l[r];
        }
    }
}

/* ---- decode kernel ----
 * An item holds nkvh kv heads x M = g * nq query rows (R = head-in-item * M + r)
 * and one split of keys. Pass 1 reads K token by token, all the item's heads
 * of a token in turn (adjacent in a page, so reads stay in memory order), and
 * computes every score; the softmax of each row then needs no rescaling;
 * pass 2 reads V in the same order and accumulates P V into rows that stay
 * in L1. Both passes prefetch the rows CPA_DEC_AHEAD bytes ahead, a line per
 * vector step. Each score and output element is summed in the same order
 * whatever the blocking, so results do not depend on DEC_TB. */
enum { FN(DEC_TB) = VBYTES == 64 ? 4 : 2 };   /* key rows per block: what the registers hold */

/* Whether the `step` elements at d start a new 64-byte line of a row. */
#define DEC_NEW_LINE(d, step) ((((d) * (int64_t)sizeof(KS)) & 63) < (step) * (int64_t)sizeof(KS))

/* bf16 rows are read 2*VL elements at a time, as VL 32-bit lanes: a bf16 is
 * the top half of a float, so a lane holding the pair (x[2i], x[2i+1]) gives
 * x[2i+1] by masking and x[2i] by shifting: one integer op per vector of
 * floats instead of a widening shuffle and a shift. The q rows and the
 * output rows are kept in the same order (even elements of each 2*VL chunk,
 * then odd ones) while the kernel runs. */
#if KS_KIND == CPA_KIND_BF16
#define DEC_PAIRED 1
typedef uint32_t FN(u32v) __attribute__((vector_size(VBYTES)));
static inline void FN(ld_pairs)(const KS *p, V *even, V *odd)
{
    FN(u32v) w;
    memcpy(&w, p, sizeof w);
    *even = (V)(w << 16);
    *odd = (V)(w & 0xFFFF0000u);
}
#else
#define DEC_PAIRED 0
#endif

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

/* s[r * sstride + t] = q_r . k_t for RB query rows (qstride apart), TB key
 * rows; pf (or NULL): TB rows to prefetch, a line per step, so that the
 * misses are spread over the arithmetic instead of arriving in bursts. */
static inline __attribute__((always_inline)) void FN(dec_qk)(
    const T *q, int64_t qstride, const KS *const *k, int64_t Dk, T *s, int64_t sstride,
    const KS *const *pf, const int RB, const int TB)
{
    V acc[4][4];
    for (int t = 0; t < TB; t++)
        for (int r = 0; r < RB; r++) acc[t][r] = TN(vset1)(0);
    int64_t d = 0;
#if DEC_PAIRED
    for (; d + 2 * VL <= Dk; d += 2 * VL) {
        if (pf && DEC_NEW_LINE(d, 2 * VL))
            for (int t = 0; t < TB; t++) __builtin_prefetch(pf[t] + d, 0, 3);
        V ke[4], ko[4];
        for (int t = 0; t < TB; t++) FN(ld_pairs)(k[t] + d, &ke[t], &ko[t]);
        for (int r = 0; r < RB; r++) {
            V qe = TN(vld)(q + r * qstride + d), qo = TN(vld)(q + r * qstride + d + VL);
            for (int t = 0; t < TB; t++) {
                acc[t][r] += qe * ke[t];
                acc[t][r] += qo * ko[t];
            }
        }
    }
#endif
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
#if CPA_HAS_HSUM_TILE
    if (RB == 4 && TB == 4 && d == Dk) {
        TN(hsum_tile)(acc, s, sstride);
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
            for (int64_t dd = d; dd < Dk; dd++) x[r] += q[r * qstride + dd] * FN(cvkv)(k[t][dd]);
            s[r * sstride + t] = x[r];
        }
    }
}

/* o[r * ostride + :] += sum_t p[r * pstride + t] * v_t, for RB rows and TB
 * value rows; pf as in dec_qk */
static inline __attribute__((always_inline)) void FN(dec_pv)(
    T *o, int64_t ostride, const T *p, int64_t pstride, const KS *const *v, int64_t Dv,
    const KS *const *pf, const int RB, const int TB)
{
    V pb[4][4];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TB; t++) pb[r][t] = TN(vset1)(p[r * pstride + t]);
    int64_t d = 0;
#if DEC_PAIRED
    for (; d + 2 * VL <= Dv; d += 2 * VL) {
        if (pf && DEC_NEW_LINE(d, 2 * VL))
            for (int t = 0; t < TB; t++) __builtin_prefetch(pf[t] + d, 0, 3);
        V ve[4], vo[4];
        for (int t = 0; t < TB; t++) FN(ld_pairs)(v[t] + d, &ve[t], &vo[t]);
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
    for (; d < Dv; d++)
        for (int t = 0; t < TB; t++) {
            const T x = FN(cvkv)(v[t][d]);
            for (int r = 0; r < RB; r++) o[r * ostride + d] += p[r * pstride + t] * x;
        }
}

/* o_rr += p_rr,i v_i for keys i in [i0, i1) of the split, only in the rows
 * rr that see key i: for keys hidden from some rows. */
static void FN(dec_pv_seen)(T *o, const T *sc, int64_t scs, const KS *const *vrow, int64_t vh,
                            int64_t Dv, int64_t M, int64_t R, int64_t k0, int64_t i0, int64_t i1,
                            const int64_t *lo, const int64_t *hi)
{
    for (int64_t i = i0; i < i1; i++)
        for (int64_t rr = 0; rr < R; rr++) {
            const int64_t r = rr % M;
            if (k0 + i < lo[r] || k0 + i > hi[r]) continue;
            const KS *vr = vrow[i] + (rr / M) * vh;
            FN(dec_pv)(o + rr * Dv, 0, sc + rr * scs + i, 0, &vr, Dv, NULL, 1, 1);
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
    FN(dec_qk)(q + (r) * qst, qst, kr, Dk, s + (r) * scs, scs, (r) ? NULL : pf, RB, TB)
#define DEC_PV_AT(r, RB, TB) \
    FN(dec_pv)(ob + (r) * Dv, Dv, s + (r) * scs, scs, vr, Dv, (r) ? NULL : pf, RB, TB)

static void FN(decode)(const cpa_fwd_args *a, const cpa_fwd_item *it, char *scratch, char *partials)
{
    enum { TB = FN(DEC_TB) };
    const int64_t b = it->seq, kvh0 = it->kvh, nh = it->nkvh;
    const int64_t nq = a->q_len[b], Sk = a->k_len[b];
    const int64_t g = a->num_heads / a->num_kv_heads, M = g * nq, R = nh * M;
    const int64_t Dk = a->head_dim_qk, Dv = a->head_dim_v;
    const int64_t kh = a->k.head, vh = a->v.head;

    cpa_decode_layout L;
    cpa_decode_plan(a, sizeof(T), &L);
    T *qs = (T *)(scratch + L.qs), *sc = (T *)(scratch + L.sc), *o = (T *)(scratch + L.o);
    T *mrow = (T *)(scratch + L.m), *lrow = (T *)(scratch + L.l);
    const KS **krow = (const KS **)(scratch + L.krow), **vrow = (const KS **)(scratch + L.vrow);
    const int64_t qst = L.qstride, scs = L.scstride;

    /* keys row r sees (the same for every head), and those every row sees */
    int64_t lo[CPA_DEC_MAX_M], hi[CPA_DEC_MAX_M], ilo = 0, ihi = Sk - 1;
    for (int64_t r = 0; r < M; r++) {
        cpa_visible_keys(&a->mask, nq, Sk, r / g, &lo[r], &hi[r]);
        if (lo[r] > ilo) ilo = lo[r];
        if (hi[r] < ihi) ihi = hi[r];
    }
    for (int64_t hh = 0; hh < nh; hh++)
        for (int64_t r = 0; r < M; r++) {
            T *qr = qs + (hh * M + r) * qst;
            RN_CALL(load_q_row)(a, cpa_at(&a->q, b, a->q_start[b] + r / g, (kvh0 + hh) * g + r % g),
                                qr, 1, (T)a->scale);
            if (DEC_PAIRED) FN(pairs_order)(qr, Dk, 1);
        }

    const int64_t k0 = it->key_lo, n = cpa_max(it->key_hi - it->key_lo + 1, 0);
    cpa_kv_rows(a, b, (const char *)((const KS *)a->k.data + cpa_kv_seq(a, &a->k, b) + kvh0 * kh), sizeof(KS),
                a->k.tok, a->k.seq, k0, n, (const void **)krow);
    cpa_kv_rows(a, b, (const char *)((const KS *)a->v.data + cpa_kv_seq(a, &a->v, b) + kvh0 * vh), sizeof(KS),
                a->v.tok, a->v.seq, k0, n, (const void **)vrow);

    const int64_t kahead = cpa_prefetch_distance(nh * Dk * (int64_t)sizeof(KS));
    const int64_t vahead = cpa_prefetch_distance(nh * Dv * (int64_t)sizeof(KS));
    for (int64_t i = 0; i < kahead && i < n; i++)
        for (int64_t hh = 0; hh < nh; hh++) cpa_prefetch_bytes(krow[i] + hh * kh, Dk * sizeof(KS));

    /* pass 1: scores of every key, hidden ones too (masked below) */
    for (int64_t i0 = 0; i0 < n; i0 += TB) {
        const int full = i0 + TB <= n;
        for (int64_t hh = 0; hh < nh; hh++) {
            const T *q = qs + hh * M * qst;
            T *s = sc + hh * M * scs + i0;
            const KS *kr[TB], *pf[TB];
            for (int t = 0; t < TB; t++) pf[t] = krow[cpa_min(i0 + kahead + t, n - 1)] + hh * kh;
            if (full) {
                for (int t = 0; t < TB; t++) kr[t] = krow[i0 + t] + hh * kh;
                DEC_ROWS(DEC_QK_AT, M, TB);
            } else {
                for (int64_t i = i0; i < n; i++, s++) {
                    kr[0] = krow[i] + hh * kh;
                    DEC_ROWS(DEC_QK_AT, M, 1);
                }
            }
        }
    }

    /* softmax of each row over the split: softcap, mask, max, exp, sum */
    const int64_t npad = cpa_roundup(n, VL);
    const T cap = (T)a->softcap;
    for (int64_t rr = 0; rr < R; rr++) {
        const int64_t r = rr % M;
        T *s = sc + rr * scs;
        if (cap > 0)
            for (int64_t i = 0; i < npad; i += VL) TN(vst)(s + i, cap * TN(vtanh)(TN(vld)(s + i) / cap));
        /* keys [v0, v1) of the split are visible to row r */
        const int64_t v0 = cpa_min(cpa_max(lo[r] - k0, 0), n), v1 = cpa_max(cpa_min(hi[r] - k0 + 1, n), v0);
        for (int64_t i = 0; i < v0; i++) s[i] = -INFINITY;
        for (int64_t i = v1; i < npad; i++) s[i] = -INFINITY;
        V mx = TN(vset1)(-INFINITY);
        for (int64_t i = 0; i < npad; i += VL) mx = TN(vmax)(mx, TN(vld)(s + i));
        T mr = -INFINITY;
        for (int k = 0; k < VL; k++) if (mx[k] > mr || mx[k] != mx[k]) mr = mx[k];
        const T muse = (mr == -INFINITY) ? (T)0 : mr;   /* no visible key: all p = 0 */
        V ls = TN(vset1)(0);
        for (int64_t i = 0; i < npad; i += VL) {
            V p = TN(vexp)(TN(vld)(s + i) - muse);
            TN(vst)(s + i, p);
            ls += p;
        }
        mrow[rr] = mr;
        lrow[rr] = TN(hsum)(ls);
    }

    /* pass 2: O = P V. Keys every row sees go through the shared product; a
     * key hidden from some rows is added only to the rows that see it, since
     * p = 0 times a NaN or inf in a hidden (stale) value would be NaN. */
    memset(o, 0, (size_t)(R * Dv) * sizeof(T));
    for (int64_t i = 0; i < vahead && i < n; i++)
        for (int64_t hh = 0; hh < nh; hh++) cpa_prefetch_bytes(vrow[i] + hh * vh, Dv * sizeof(KS));
    const int64_t s0 = cpa_min(cpa_max(ilo - k0, 0), n), s1 = cpa_max(cpa_min(ihi - k0 + 1, n), s0);
    FN(dec_pv_seen)(o, sc, scs, vrow, vh, Dv, M, R, k0, 0, s0, lo, hi);
    for (int64_t i0 = s0; i0 < s1; i0 += TB) {
        const int full = i0 + TB <= s1;
        for (int64_t hh = 0; hh < nh; hh++) {
            T *ob = o + hh * M * Dv;
            const T *s = sc + hh * M * scs + i0;
            const KS *vr[TB], *pf[TB];
            for (int t = 0; t < TB; t++) pf[t] = vrow[cpa_min(i0 + vahead + t, s1 - 1)] + hh * vh;
            if (full) {
                for (int t = 0; t < TB; t++) vr[t] = vrow[i0 + t] + hh * vh;
                DEC_ROWS(DEC_PV_AT, M, TB);
            } else {
                for (int64_t j = i0; j < s1; j++, s++) {
                    vr[0] = vrow[j] + hh * vh;
                    DEC_ROWS(DEC_PV_AT, M, 1);
                }
            }
        }
    }
    FN(dec_pv_seen)(o, sc, scs, vrow, vh, Dv, M, R, k0, s1, n, lo, hi);

    for (int64_t rr = 0; rr < R; rr++) {
        const int64_t kvh = kvh0 + rr / M, r = rr % M;
        if (DEC_PAIRED) FN(pairs_order)(o + rr * Dv, Dv, 0);
        if (it->slot < 0) {
            RN_CALL(store_row)(a, b, r / g, kvh * g + r % g, o + rr * Dv, 1, mrow[rr], lrow[rr]);
        } else {
            T *part = (T *)(partials + it->slot * cpa_fwd_slot_bytes(a)) + rr * (Dv + 2);
            memcpy(part, o + rr * Dv, (size_t)Dv * sizeof(T));
            part[Dv] = mrow[rr]; part[Dv + 1] = lrow[rr];
        }
    }
}
#undef DEC_ROWS
#undef DEC_QK_AT
#undef DEC_PV_AT
#undef DEC_NEW_LINE
#undef DEC_PAIRED

static void FN(item)(const cpa_fwd_args *a, const cpa_fwd_item *it, char *scratch, char *partials)
{
    const int64_t g = a->num_heads / a->num_kv_heads;
    if (cpa_use_decode(g, a->q_len[it->seq]))
        FN(decode)(a, it, scratch, partials);
    else
        FN(tiled)(a, it, scratch, partials);
}
