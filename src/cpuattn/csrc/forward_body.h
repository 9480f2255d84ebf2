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
    const KS *kbase = (const KS *)a->k + a->k_off[b] + kvh * a->k_head;
    const KS *vbase = (const KS *)a->v + a->v_off[b] + kvh * a->v_head;

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
            const uint16_t *qr = (const uint16_t *)a->q + a->q_off[b] + t * a->q_tok + head * a->q_head;
            for (int64_t d = 0; d < Dk; d += 2)
                QP[d / 2 * Mp + r] = qr[d] | (d + 1 < Dk ? (uint32_t)qr[d + 1] << 16 : 0);
#else
            RN_CALL(load_q_row)(a, a->q_off[b] + t * a->q_tok + head * a->q_head, QT + r, Mp, (T)a->scale);
#endif
            cpa_row_interval(a, nq, Sk, t, &rl, &rh);
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
        cpa_kv_rows(a, b, (const char *)kbase, sizeof(KS), a->k_tok, a->k_page, j0, n, (const void **)kraw);
        cpa_kv_rows(a, b, (const char *)vbase, sizeof(KS), a->v_tok, a->v_page, j0, n, (const void **)vraw);
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

static void FN(decode)(const cpa_fwd_args *a, const cpa_fwd_item *it, char *scratch, char *partials)
{
    const int64_t b = it->seq, kvh = it->kvh;
    const int64_t nq = a->q_len[b], Sk = a->k_len[b];
    const int64_t g = a->num_heads / a->num_kv_heads, M = g * nq;
    const int64_t Dk = a->head_dim_qk, Dv = a->head_dim_v;
    const KS *kbase = (const KS *)a->k + a->k_off[b] + kvh * a->k_head;
    const KS *vbase = (const KS *)a->v + a->v_off[b] + kvh * a->v_head;

    cpa_decode_layout L;
    cpa_decode_plan(a, sizeof(T), &L);
    T *qs = (T *)(scratch + L.qs), *sc = (T *)(scratch + L.sc), *o = (T *)(scratch + L.o);
    const KS **krow = (const KS **)(scratch + L.krow), **vrow = (const KS **)(scratch + L.vrow);
    char *skip = scratch + L.skip;
    const int64_t qstride = L.qstride, scs = L.scstride;

    int64_t lo[CPA_DEC_MAX_M], hi[CPA_DEC_MAX_M], ilo = 0, ihi = Sk - 1;
    T mrow[CPA_DEC_MAX_M], lrow[CPA_DEC_MAX_M];
    for (int64_t r = 0; r < CPA_DEC_MAX_M; r++) {
        if (r < M) {
            int64_t t = r / g, head = kvh * g + r % g;
            RN_CALL(load_q_row)(a, a->q_off[b] + t * a->q_tok + head * a->q_head, qs + r * qstride, 1, (T)a->scale);
            cpa_row_interval(a, nq, Sk, t, &lo[r], &hi[r]);
            if (lo[r] > ilo) ilo = lo[r];
            if (hi[r] < ihi) ihi = hi[r];
        } else {
            memset(qs + r * qstride, 0, (size_t)qstride * sizeof(T));
            lo[r] = 1; hi[r] = 0;
        }
    }

    const int64_t k0 = it->key_lo, n = it->key_hi - it->key_lo + 1;
    const int64_t npad = cpa_roundup(n > 0 ? n : 0, VL);
    const T cap = (T)a->softcap;
    /* scores: each key row is loaded once for 4 query rows at a time */
    cpa_kv_rows(a, b, (const char *)kbase, sizeof(KS), a->k_tok, a->k_page, k0, n, (const void **)krow);
    cpa_kv_rows(a, b, (const char *)vbase, sizeof(KS), a->v_tok, a->v_page, k0, n, (const void **)vrow);
    for (int64_t i = 0; i < CPA_PREFETCH_ROWS && i < n; i++) {
        cpa_prefetch_row(krow[i], Dk * sizeof(KS));
        cpa_prefetch_row(vrow[i], Dv * sizeof(KS));
    }
    for (int64_t i = 0; i < n; i++) {
        const KS *kr = krow[i];
        /* rows of one head sit a page-row apart: the hardware prefetcher
         * cannot follow the chain, so fetch K and V rows ahead ourselves */
        if (i + CPA_PREFETCH_ROWS < n) {
            cpa_prefetch_row(krow[i + CPA_PREFETCH_ROWS], Dk * sizeof(KS));
            cpa_prefetch_row(vrow[i + CPA_PREFETCH_ROWS], Dv * sizeof(KS));
        }
        for (int64_t r0 = 0; r0 < M; r0 += 4) {
            V acc[4] = {TN(vset1)(0), TN(vset1)(0), TN(vset1)(0), TN(vset1)(0)};
            const T *q0 = qs + r0 * qstride;
            int64_t d = 0;
            for (; d + VL <= Dk; d += VL) {
                V kv = FN(ldkv)(kr + d);
#pragma GCC unroll 4
                for (int rr = 0; rr < 4; rr++) acc[rr] += TN(vld)(q0 + rr * qstride + d) * kv;
            }
            for (int rr = 0; rr < 4 && r0 + rr < M; rr++) {
                T s = TN(hsum)(acc[rr]);
                for (int64_t dd = d; dd < Dk; dd++) s += q0[rr * qstride + dd] * FN(cvkv)(kr[dd]);
                sc[(r0 + rr) * scs + i] = s;
            }
        }
    }
    for (int64_t r = 0; r < M; r++) {
        T *s = sc + r * scs;
        for (int64_t i = n; i < npad; i++) s[i] = -INFINITY;
        if (cap > 0)
            for (int64_t i = 0; i < npad; i += VL) TN(vst)(s + i, cap * TN(vtanh)(TN(vld)(s + i) / cap));
        for (int64_t i = 0; i < n; i++)
            if (k0 + i < lo[r] || k0 + i > hi[r]) s[i] = -INFINITY;
        for (int64_t i = n; i < npad; i++) s[i] = -INFINITY;
        V mx = TN(vset1)(-INFINITY);
        for (int64_t i = 0; i < npad; i += VL) mx = TN(vmax)(mx, TN(vld)(s + i));
        T mr = -INFINITY;
        for (int k = 0; k < VL; k++) if (mx[k] > mr || mx[k] != mx[k]) mr = mx[k];
        T muse = (mr == -INFINITY) ? (T)0 : mr;
        V ls = TN(vset1)(0);
        for (int64_t i = 0; i < npad; i += VL) {
            V p = TN(vexp)(TN(vld)(s + i) - muse);
            TN(vst)(s + i, p);
            ls += p;
        }
        mrow[r] = mr; lrow[r] = TN(hsum)(ls);
    }

    /* value rows that some query row must not see and that are not finite */
    int any_skip = 0;
    for (int64_t i = 0; i < n; i++) {
        skip[i] = (k0 + i < ilo || k0 + i > ihi) && !FN(row_finite)(vrow[i], Dv);
        any_skip |= skip[i];
    }

    /* O = P V, 4 query rows x 4 vectors of D held in registers */
    memset(o, 0, (size_t)(CPA_DEC_MAX_M * Dv) * sizeof(T));
    for (int64_t r0 = 0; r0 < M; r0 += 4) {
        const T *p0 = sc + r0 * scs;
        int64_t d = 0;
        for (; d + 4 * VL <= Dv; d += 4 * VL) {
            V acc[4][4];
#pragma GCC unroll 4
            for (int rr = 0; rr < 4; rr++)
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) acc[rr][c] = TN(vset1)(0);
            for (int64_t i = 0; i < n; i++) {
                if (any_skip && skip[i]) continue;
                V vv[4];
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) vv[c] = FN(ldkv)(vrow[i] + d + c * VL);
#pragma GCC unroll 4
                for (int rr = 0; rr < 4; rr++) {
                    T p = p0[rr * scs + i];
#pragma GCC unroll 4
                    for (int c = 0; c < 4; c++) acc[rr][c] += p * vv[c];
                }
            }
            for (int rr = 0; rr < 4; rr++)
                for (int c = 0; c < 4; c++) TN(vst)(o + (r0 + rr) * Dv + d + c * VL, acc[rr][c]);
        }
        for (; d < Dv; d++)
            for (int rr = 0; rr < 4; rr++) {
                T s = 0;
                for (int64_t i = 0; i < n; i++)
                    if (!(any_skip && skip[i])) s += p0[rr * scs + i] * FN(cvkv)(vrow[i][d]);
                o[(r0 + rr) * Dv + d] = s;
            }
    }
    if (any_skip)
        for (int64_t i = 0; i < n; i++) {
            if (!skip[i]) continue;
            for (int64_t r = 0; r < M; r++)
                if (k0 + i >= lo[r] && k0 + i <= hi[r])
                    for (int64_t d = 0; d < Dv; d++) o[r * Dv + d] += sc[r * scs + i] * FN(cvkv)(vrow[i][d]);
        }

    for (int64_t r = 0; r < M; r++) {
        if (it->slot < 0) {
            RN_CALL(store_row)(a, b, r / g, kvh * g + r % g, o + r * Dv, 1, mrow[r], lrow[r]);
        } else {
            T *part = (T *)(partials + it->slot * cpa_fwd_slot_bytes(a)) + r * (Dv + 2);
            memcpy(part, o + r * Dv, (size_t)Dv * sizeof(T));
            part[Dv] = mrow[r]; part[Dv + 1] = lrow[r];
        }
    }
}

static void FN(item)(const cpa_fwd_args *a, const cpa_fwd_item *it, char *scratch, char *partials)
{
    const int64_t g = a->num_heads / a->num_kv_heads;
    if (cpa_use_decode(g, a->q_len[it->seq]))
        FN(decode)(a, it, scratch, partials);
    else
        FN(tiled)(a, it, scratch, partials);
}
