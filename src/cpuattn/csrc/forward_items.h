/* The forward item kernels of one (ISA, compute type T), over any K and V
 * storage types: they reach the rows through TN(kv_table) (forward_isa.h),
 * by the call's k_dtype and v_dtype. Included by forward_isa.h after the
 * storage layers.
 *
 * Two item kernels:
 *  - tiled: flash attention on (query block x key tile) with the two tile
 *    products as register-blocked micro-kernels. Scores are kept transposed
 *    (keys x query rows) so the online softmax, the masks and the rescaling
 *    all run along vector lanes of query rows. Rows not stored as T are
 *    converted (dequantised) one key tile at a time into L1 scratch.
 *  - decode: few query rows (decode, small GQA groups); each key row is
 *    loaded once for all the query heads of its group, straight from the
 *    pages (forward_kv.h).
 */

/* Row addresses of keys j0 .. j0+n-1 of sequence b, kv head kvh, in x, and
 * of their scales in xs (into sout, when the type has scales). */
static void TN(tile_rows)(const cpa_fwd_args *a, int dtype, int64_t b, int64_t kvh,
                          const cpa_rows *x, const cpa_rows *xs, int64_t j0, int64_t n,
                          const void **out, const void **sout)
{
    const TN(kv_ops) *ops = &TN(kv_table)[dtype];
    const int64_t bsz = cpa_max(cpa_dtype_bits(dtype) / 8, 1);   /* int4: the array's elements are bytes */
    cpa_kv_rows(a, b, (const char *)x->data + (cpa_kv_seq(a, x, b) + kvh * x->head) * bsz, (size_t)bsz,
                x->tok, x->seq, j0, n, out);
    if (ops->scale_bytes)
        cpa_kv_rows(a, b, (const char *)xs->data + (cpa_kv_seq(a, xs, b) + kvh * xs->head) * ops->scale_bytes,
                    (size_t)ops->scale_bytes, xs->tok, xs->seq, j0, n, sout);
}

#if CPA_HAS_DPBF16
/* whether bf16 row p of n elements is all finite */
static inline int TN(bf16_finite)(const uint16_t *p, int64_t n)
{
    for (int64_t d = 0; d < n; d++)
        if ((p[d] & 0x7f80) == 0x7f80) return 0;
    return 1;
}
#endif

static inline int TN(row_finite)(const T *p, int64_t n)
{
    for (int64_t d = 0; d < n; d++)
        if (!(p[d] - p[d] == 0)) return 0;
    return 1;
}

static void TN(tiled)(const cpa_fwd_args *a, const cpa_fwd_item *it, char *scratch, char *partials)
{
    const int64_t b = it->seq, kvh = it->kvh;
    const int64_t nq = a->q_len[b], Sk = a->k_len[b];
    const int64_t g = a->num_heads / a->num_kv_heads, bq = cpa_block_tokens(g);
    const int64_t t0 = (int64_t)it->qblock * bq, nt = cpa_min(bq, nq - t0);
    const int64_t M = nt * g, Mp = cpa_roundup(M, NVL);
    const int64_t Dk = a->head_dim_qk, Dv = a->head_dim_v;

    cpa_tiled_layout L;
    cpa_tiled_plan(a, sizeof(T), &L);
    T *QT = (T *)(scratch + L.qt), *ST = (T *)(scratch + L.st), *OT = (T *)(scratch + L.ot);
    T *m = (T *)(scratch + L.m), *l = (T *)(scratch + L.l), *alpha = (T *)(scratch + L.alpha);
    TN(ielem) *lo = (TN(ielem) *)(scratch + L.lo), *hi = (TN(ielem) *)(scratch + L.hi);
    const T **krow = (const T **)(scratch + L.krow), **vrow = (const T **)(scratch + L.vrow);
    T *kc = (T *)(scratch + L.kc), *vc = (T *)(scratch + L.vc), *zero = (T *)(scratch + L.zero);
    int64_t *fix = (int64_t *)(scratch + L.fix);
    const void **vraw = (const void **)(scratch + L.vraw), **kraw = (const void **)(scratch + L.kraw);
    const void **vsraw = (const void **)(scratch + L.vsraw), **ksraw = (const void **)(scratch + L.ksraw);
    const T **vfix = (const T **)(scratch + L.vfix);
    T *apos = (T *)(scratch + L.apos), *aslope = (T *)(scratch + L.aslope);
    /* element (d, r) of the output accumulator is OT[d * o_d + r * o_r]: O^T
     * (dims x query lanes), or on the amx path O (query rows, its P V tiles' layout) */
#if CPA_HAS_AMX
    const int64_t o_d = 1, o_r = Dv;
#else
    const int64_t o_d = Mp, o_r = 1;
#endif
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
            apos[r] = (T)(t + Sk - nq);
            aslope[r] = a->alibi ? (T)a->alibi[head] : 0;
        } else {
            lo[r] = 1; hi[r] = 0;
            apos[r] = aslope[r] = 0;
        }
        m[r] = -INFINITY; l[r] = 0;
    }
    if (a->tree)   /* draft keys are seen per the tree: none by every row */
        ihi = cpa_min(ihi, Sk - nq - 1);
    memset(OT, 0, (size_t)(Dv * Mp) * sizeof(T));
    /* scratch is malloc'ed: the zero row must be written, it stands in for
     * padded keys and for hidden non-finite value rows in the products */
    memset(zero, 0, (size_t)cpa_max(Dk, Dv) * sizeof(T));
    for (int64_t i = 0; i < CPA_BK_PAD; i++) krow[i] = zero;

    const T cap = (T)a->softcap;
#if CPA_HAS_AMX
    TN(amx_begin)();
#endif
    for (int64_t j0 = it->key_lo - it->key_lo % CPA_BK; j0 <= it->key_hi; j0 += CPA_BK) {
        const int64_t jhi = cpa_min(j0 + CPA_BK - 1, it->key_hi), n = jhi - j0 + 1;
        const int full = (j0 >= ilo && jhi <= ihi);
        TN(tile_rows)(a, a->k_dtype, b, kvh, &a->k, &a->k_scale, j0, n, kraw, ksraw);
        TN(tile_rows)(a, a->v_dtype, b, kvh, &a->v, &a->v_scale, j0, n, vraw, vsraw);
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
            krow[i] = TN(kv_table)[a->k_dtype].to_t(kraw[i], ksraw[i], Dk, kc + i * Dk);
            vrow[i] = TN(kv_table)[a->v_dtype].to_t(vraw[i], vsraw[i], Dv, vc + i * Dv);
#endif
        }
        for (int64_t i = n; i < CPA_BK_PAD; i++) krow[i] = zero;

        /* S^T = K Q^T: key rows x query lanes */
#if CPA_HAS_AMX
        TN(amx_scores)(Dk, cpa_roundup(n, 32), (const uint16_t *const *)krow, (uint16_t *)kc, QP, Mp,
                       ST, (T)a->scale);
#else
        const int64_t nkp = cpa_roundup(n, MR);
        for (int64_t i0 = 0; i0 < nkp; i0 += MR)
            for (int64_t c = 0; c < Mp; c += NVL)
#if CPA_HAS_DPBF16
                TN(mk_rows_bf16)(Dk, (const uint16_t *const *)(krow + i0), QP + c, Mp,
                                 ST + i0 * Mp + c, Mp, (T)a->scale);
#else
                TN(mk_rows)(Dk, krow + i0, QT + c, Mp, ST + i0 * Mp + c, Mp);
#endif
#endif

        /* softcap first, then the mask (a capped -inf would become finite) */
        if (cap > 0)
            for (int64_t i = 0; i < n; i++)
                for (int64_t c = 0; c < Mp; c += VL)
                    TN(vst)(ST + i * Mp + c, cap * TN(vtanh)(TN(vld)(ST + i * Mp + c) / cap));
        /* ALiBi after the softcap: - slope * |p - j| */
        if (a->alibi)
            for (int64_t i = 0; i < n; i++) {
                const V j = TN(vset1)((T)(j0 + i));
                for (int64_t c = 0; c < Mp; c += VL) {
                    const V dist = TN(vld)(apos + c) - j;
                    TN(vst)(ST + i * Mp + c, TN(vld)(ST + i * Mp + c)
                                                 - TN(vld)(aslope + c) * TN(vmax)(dist, -dist));
                }
            }
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

        if (a->tree && jhi >= Sk - nq)
            for (int64_t i = cpa_max(0, Sk - nq - j0); i < n; i++)
                for (int64_t r = 0; r < M; r++)
                    if (cpa_tree_hides(a, b, t0 + r / g, j0 + i)) ST[i * Mp + r] = -INFINITY;

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
#if CPA_HAS_AMX
            for (int64_t r = 0; r < Mp; r++) {
                if (alpha[r] == 1) continue;
                const V al = TN(vset1)(alpha[r]);
                for (int64_t d = 0; d < Dv; d += VL) TN(vst)(OT + r * Dv + d, TN(vld)(OT + r * Dv + d) * al);
            }
#else
            for (int64_t d = 0; d < Dv; d++)
                for (int64_t c = 0; c < Mp; c += VL)
                    TN(vst)(OT + d * Mp + c, TN(vld)(OT + d * Mp + c) * TN(vld)(alpha + c));
#endif

        /* 0 * NaN is NaN: a non-finite value row hidden from some query rows
         * must not enter the shared product; add it only where it is seen. */
        int64_t nfix = 0;
        if (!full)
            for (int64_t i = 0; i < n; i++) {
                if (j0 + i >= ilo && j0 + i <= ihi) continue;
#if CPA_HAS_DPBF16
                if (TN(bf16_finite)((const uint16_t *)vraw[i], Dv)) continue;
                vfix[nfix] = NULL;
#else
                if (TN(row_finite)(vrow[i], Dv)) continue;
                vfix[nfix] = vrow[i];
#endif
                fix[nfix++] = i;
                vrow[i] = zero;
            }

        /* O^T += V^T P^T */
#if CPA_HAS_AMX
        TN(amx_values)(n, (const uint16_t *const *)vrow, Dv, (const uint16_t *)zero, ST, Mp,
                       (uint32_t *)vc, (uint32_t *)(scratch + L.pp), (uint32_t *)(scratch + L.pt), OT);
#elif CPA_HAS_DPBF16
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
        TN(acc_cols)(n, vrow, Dv, ST, OT, Mp, Mp);
#endif
        for (int64_t f = 0; f < nfix; f++) {
            const int64_t i = fix[f], j = j0 + i;
            for (int64_t r = 0; r < M; r++)
                if (j >= lo[r] && j <= hi[r] && !cpa_tree_hides(a, b, t0 + r / g, j))
                    for (int64_t d = 0; d < Dv; d++)
#if CPA_HAS_DPBF16
                        OT[d * o_d + r * o_r] += ST[i * Mp + r] * cpa_bf16_to_f32(((const uint16_t *)vraw[i])[d]);
#else
                        OT[d * o_d + r * o_r] += ST[i * Mp + r] * vfix[f][d];
#endif
        }
    }

#if CPA_HAS_AMX
    TN(amx_end)();
#endif
    for (int64_t r = 0; r < M; r++) {
        if (it->slot < 0) {
            RN_CALL(store_row)(a, b, t0 + r / g, kvh * g + r % g, OT + r * o_r, o_d, m[r], l[r]);
        } else {
            T *part = (T *)(partials + it->slot * cpa_fwd_slot_bytes(a)) + r * (Dv + 2);
            for (int64_t d = 0; d < Dv; d++) part[d] = OT[d * o_d + r * o_r];
            part[Dv] = m[r]; part[Dv + 1] = l[r];
        }
    }
}

/* ---- decode kernel ----
 * An item holds nkvh kv heads x M = g * nq query rows and one split of keys.
 * Pass 1 (the K type's dec_scores) computes every score; the softmax of
 * each row then needs no rescaling; pass 2 (the V type's dec_values) reads
 * V in the same order and accumulates P V into rows that stay in L1. Both
 * passes prefetch the rows CPA_DEC_AHEAD bytes ahead. Each score and output
 * element is summed in the same order whatever the blocking, so results do
 * not depend on the split of work.
 * A shared item (it->nshare > 1, cpa_fwd_share) runs the query rows of
 * several sequences that read the same pages for these keys: M is the sum of
 * their rows, the pages are read once for all of them, and since no row's
 * arithmetic depends on the rows beside it, each row's result is bitwise
 * that of its own item. */
static void TN(decode)(const cpa_fwd_args *a, const cpa_fwd_item *it, char *scratch, char *partials)
{
    if (it->nshare == 0)
        return;   /* run by the shared item before it */
    const int64_t kvh0 = it->kvh, nh = it->nkvh, ns = it->nshare;
    const int64_t g = a->num_heads / a->num_kv_heads;
    const int64_t Dv = a->head_dim_v;
    int64_t M = 0;
    for (int64_t m = 0; m < ns; m++) M += g * a->q_len[it[m].seq];
    const int64_t R = nh * M;

    cpa_decode_layout L;
    cpa_decode_plan(a, sizeof(T), R, &L);
    T *mrow = (T *)(scratch + L.m), *lrow = (T *)(scratch + L.l);
    int64_t *lo = (int64_t *)(scratch + L.rows), *hi = lo + M, *rseq = hi + M, *rtok = rseq + M;
    int64_t ilo = 0, ihi = INT64_MAX;
    const int64_t k0 = it->key_lo, n = cpa_max(it->key_hi - it->key_lo + 1, 0);
    TN(dec) c = {
        .a = a, .b = it->seq, .kvh0 = kvh0, .nh = nh, .M = M, .k0 = k0, .n = n,
        .qst = L.qstride, .scs = L.scstride,
        .qs = (T *)(scratch + L.qs), .sc = (T *)(scratch + L.sc), .o = (T *)(scratch + L.o),
        .row = (const void **)(scratch + L.row), .srow = (const void **)(scratch + L.srow),
        .lo = lo, .hi = hi, .rseq = rseq, .rtok = rtok,
    };

    /* row r = the rows of the items in turn: keys it sees (the same for
     * every head), its sequence and token; and the keys every row sees */
    for (int64_t m = 0, r = 0; m < ns; m++) {
        const int64_t b = it[m].seq, nq = a->q_len[b], Sk = a->k_len[b];
        for (int64_t rl = 0; rl < g * nq; rl++, r++) {
            rseq[r] = b;
            rtok[r] = rl / g;
            cpa_visible_keys(&a->mask, nq, Sk, rl / g, &lo[r], &hi[r]);
            ilo = cpa_max(ilo, lo[r]);
            ihi = cpa_min(ihi, cpa_min(hi[r], Sk - 1));
        }
        if (a->tree)   /* draft keys are seen per the tree: none by every row */
            ihi = cpa_min(ihi, Sk - nq - 1);
    }
    c.s0 = cpa_min(cpa_max(ilo - k0, 0), n);
    c.s1 = cpa_max(cpa_min(ihi - k0 + 1, n), c.s0);
    for (int64_t hh = 0; hh < nh; hh++)
        for (int64_t r = 0; r < M; r++)
            RN_CALL(load_q_row)(a, cpa_at(&a->q, rseq[r], a->q_start[rseq[r]] + rtok[r], (kvh0 + hh) * g + r % g),
                                c.qs + (hh * M + r) * c.qst, 1, (T)a->scale);

    TN(kv_table)[a->k_dtype].scores(&c);

    /* softmax of each row over the split: softcap, mask, max, exp, sum */
    const int64_t npad = cpa_roundup(n, VL);
    V iota;
    for (int k = 0; k < VL; k++) iota[k] = (T)k;
    const T cap = (T)a->softcap;
    for (int64_t rr = 0; rr < R; rr++) {
        const int64_t r = rr % M, b = rseq[r], nq = a->q_len[b], Sk = a->k_len[b];
        T *s = c.sc + rr * c.scs;
        if (cap > 0)
            for (int64_t i = 0; i < npad; i += VL) TN(vst)(s + i, cap * TN(vtanh)(TN(vld)(s + i) / cap));
        if (a->alibi) {   /* - slope * |p - j|, p - j = (p - k0) - i */
            const V slope = TN(vset1)((T)a->alibi[(kvh0 + rr / M) * g + r % g]);
            V dist = TN(vset1)((T)(rtok[r] + Sk - nq - k0)) - iota;
            for (int64_t i = 0; i < npad; i += VL, dist -= (T)VL)
                TN(vst)(s + i, TN(vld)(s + i) - slope * TN(vmax)(dist, -dist));
        }
        /* keys [v0, v1) of the split are visible to row r */
        const int64_t v0 = cpa_min(cpa_max(lo[r] - k0, 0), n), v1 = cpa_max(cpa_min(hi[r] - k0 + 1, n), v0);
        for (int64_t i = 0; i < v0; i++) s[i] = -INFINITY;
        for (int64_t i = v1; i < npad; i++) s[i] = -INFINITY;
        if (a->tree)
            for (int64_t i = cpa_max(v0, Sk - nq - k0); i < v1; i++)
                if (cpa_tree_hides(a, b, rtok[r], k0 + i)) s[i] = -INFINITY;
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

    TN(kv_table)[a->v_dtype].values(&c);

    /* each item's rows to its output or its partial slot (rows hh * Mm + rl) */
    for (int64_t m = 0, r0 = 0; m < ns; m++) {
        const int64_t b = it[m].seq, Mm = g * a->q_len[b];
        for (int64_t hh = 0; hh < nh; hh++)
            for (int64_t rl = 0; rl < Mm; rl++) {
                const int64_t rr = hh * M + r0 + rl;
                if (it[m].slot < 0) {
                    RN_CALL(store_row)(a, b, rl / g, (kvh0 + hh) * g + rl % g, c.o + rr * Dv, 1,
                                       mrow[rr], lrow[rr]);
                } else {
                    T *part = (T *)(partials + it[m].slot * cpa_fwd_slot_bytes(a)) + (hh * Mm + rl) * (Dv + 2);
                    memcpy(part, c.o + rr * Dv, (size_t)Dv * sizeof(T));
                    part[Dv] = mrow[rr]; part[Dv + 1] = lrow[rr];
                }
            }
        r0 += Mm;
    }
}

static void TN(item)(const cpa_fwd_args *a, const cpa_fwd_item *it, char *scratch, char *partials)
{
    const int64_t g = a->num_heads / a->num_kv_heads;
    if (cpa_use_decode(g, a->q_len[it->seq]))
        TN(decode)(a, it, scratch, partials);
    else
        TN(tiled)(a, it, scratch, partials);
}
