/* Backward work items for one (ISA, compute type T), over its vector layer
 * (simd_t.h, included here). Included by backward_isa.h once per T.
 *
 * Each pass keeps its scores in the layout that lets every tile product be
 * one of simd_t.h's register-blocked micro-kernels with K/V or Q/dO rows read
 * in place, so only the operands reused across a whole item get packed:
 *   kv pass, P[r][j] (query rows x key lanes), K^T and V^T packed per item:
 *     S = Q K^T, dP = dO V^T (mk_rows); dV^T += dO^T P, dK^T += Q^T dS (mk_cols)
 *   q pass, P^T[j][r] (key rows x query lanes), Q^T and dO^T packed per item:
 *     S^T = K Q^T, dP^T = V dO^T (mk_rows); dQ^T += K^T dS^T (mk_cols)
 * Hidden entries are set to exactly 0 by a select (never by multiplying), so
 * NaN/inf in keys or values a row does not see cannot reach its gradients.
 */
#include "simd_t.h"

typedef struct {
    T *ta, *tb, *acc1, *acc2, *p, *ds, *lse, *di, *apos, *aslope, *zero;
    TN(ielem) *lo, *hi;
    int64_t *fix;
    const T **qrow, **dorow, **krow, **kuse, **vrow;
} TN(bws);

static void TN(bws_init)(const cpa_bwd_args *a, char *scratch, TN(bws) *w)
{
    cpa_bwd_layout L;
    cpa_bwd_layout_of(a, &L);
    w->ta = (T *)(scratch + L.ta);
    w->tb = (T *)(scratch + L.tb);
    w->acc1 = (T *)(scratch + L.acc1);
    w->acc2 = (T *)(scratch + L.acc2);
    w->p = (T *)(scratch + L.p);
    w->ds = (T *)(scratch + L.ds);
    w->lse = (T *)(scratch + L.lse);
    w->di = (T *)(scratch + L.di);
    w->apos = (T *)(scratch + L.apos);
    w->aslope = (T *)(scratch + L.aslope);
    w->zero = (T *)(scratch + L.zero);
    w->lo = (TN(ielem) *)(scratch + L.lo);
    w->hi = (TN(ielem) *)(scratch + L.hi);
    w->fix = (int64_t *)(scratch + L.fix);
    w->qrow = (const T **)(scratch + L.qrow);
    w->dorow = (const T **)(scratch + L.dorow);
    w->krow = (const T **)(scratch + L.krow);
    w->kuse = w->krow + CPA_BWD_BK_PAD;
    w->vrow = (const T **)(scratch + L.vrow);
    memset(w->zero, 0, (size_t)cpa_max(a->head_dim_qk, a->head_dim_v) * sizeof(T));
}

static inline T TN(bdot)(const T *x, const T *y, int64_t n)
{
    V acc = TN(vset1)(0);
    int64_t d = 0;
    for (; d + VL <= n; d += VL)
        acc += TN(vld)(x + d) * TN(vld)(y + d);
    T s = TN(hsum)(acc);
    for (; d < n; d++)
        s += x[d] * y[d];
    return s;
}

static inline int TN(bfinite)(const T *x, int64_t n)
{
    for (int64_t d = 0; d < n; d++)
        if (!(x[d] - x[d] == 0))
            return 0;
    return 1;
}

/* Rows r = (token t0 + r / g, head kvh*g + r % g) of a query block: row
 * pointers, lse, Di = rowsum(dO * O) (computed and stored by the q pass,
 * read by the kv pass) and the visible key interval. Rows that
 * see no key (lse = -inf) and the padding rows up to a multiple of `pad` get
 * an empty interval; padding rows point at the zero row. Returns the padded
 * row count. */
static int64_t TN(load_rows)(const cpa_bwd_args *a, int64_t b, int64_t kvh, int64_t t0,
                             int64_t nt, int64_t pad, int store_di, TN(bws) *w)
{
    const int64_t g = cpa_bwd_group(a), nq = a->q_len[b], Sk = a->k_len[b];
    const int64_t M = nt * g, Mr = cpa_roundup(M, pad), qs = a->q_start[b];
    for (int64_t r = 0; r < Mr; r++) {
        if (r >= M) {
            w->qrow[r] = w->dorow[r] = w->zero;
            w->lse[r] = 0; w->di[r] = 0; w->lo[r] = 1; w->hi[r] = 0;
            w->apos[r] = w->aslope[r] = 0;
            continue;
        }
        const int64_t t = t0 + r / g, h = kvh * g + r % g;
        w->qrow[r] = (const T *)a->q.data + cpa_at(&a->q, b, (qs + t), h);
        w->dorow[r] = (const T *)a->dout.data + cpa_at(&a->dout, b, (qs + t), h);
        T *di = (T *)a->di.data + cpa_at(&a->di, b, (qs + t), h);
        if (store_di) {
            const T *orow = (const T *)a->out.data + cpa_at(&a->out, b, (qs + t), h);
            *di = TN(bdot)(w->dorow[r], orow, a->head_dim_v);
        }
        w->di[r] = *di;
        T l = ((const T *)a->lse.data)[cpa_at(&a->lse, b, qs + t, h)];
        int64_t lo, hi;
        cpa_visible_keys(&a->mask, nq, Sk, t, &lo, &hi);
        if (l == -INFINITY) {   /* the row saw no key: its gradients are 0 */
            lo = 1; hi = 0; l = 0;
        }
        w->lo[r] = (TN(ielem))lo; w->hi[r] = (TN(ielem))hi;
        w->lse[r] = l;
        w->apos[r] = (T)(t + Sk - nq);
        w->aslope[r] = a->alibi ? (T)a->alibi[h] : 0;
    }
    return Mr;
}

/* P = exp(softcap(scale * s) + bias - lse) and dS = P * (dP - Di), times
 * the softcap derivative 1 - tanh^2, on visible lanes; exactly 0 elsewhere.
 * bias: the ALiBi term (a constant of the score: no derivative). */
static inline void TN(dscore)(V s, V dp, V lse, V di, VI vis, T scale, T cap, V bias, V *p,
                              V *ds)
{
    const V zero = TN(vset1)(0);
    V x = s * scale, th = zero;
    if (cap > 0) {
        th = TN(vtanh)(x / cap);
        x = cap * th;
    }
    V pv = TN(vsel)(vis, TN(vexp)(x + bias - lse), zero);
    V d = pv * (dp - di);
    if (cap > 0)
        d = d * (1 - th * th);
    *p = pv;
    *ds = TN(vsel)(vis, d, zero);
}

/* kv pass layout: S (in p) and dP (in ds) of rows < Mr and key lanes < ncp
 * of the block at key j0 become P and dS. */
static void TN(grad_scores_keys)(const cpa_bwd_args *a, int64_t j0, int64_t Mr, int64_t ncp,
                                 TN(bws) *w)
{
    const T scale = (T)a->scale, cap = (T)a->softcap;
    const V zero = TN(vset1)(0);
    VI iota;
    V fiota;
    for (int i = 0; i < VL; i++) {
        iota[i] = (TN(ielem))i;
        fiota[i] = (T)i;
    }
    for (int64_t r = 0; r < Mr; r++) {
        T *pr = w->p + r * CPA_BWD_BK, *dr = w->ds + r * CPA_BWD_BK;
        if (w->hi[r] < j0 || w->lo[r] > j0 + ncp - 1 || w->hi[r] < w->lo[r]) {
            for (int64_t c = 0; c < ncp; c += VL) {
                TN(vst)(pr + c, zero);
                TN(vst)(dr + c, zero);
            }
            continue;
        }
        const V lse = TN(vset1)(w->lse[r]), di = TN(vset1)(w->di[r]);
        const VI lo = TN(viset1)((TN(ielem))(w->lo[r] - j0)), hi = TN(viset1)((TN(ielem))(w->hi[r] - j0));
        const V slope = TN(vset1)(w->aslope[r]);
        for (int64_t c = 0; c < ncp; c += VL) {
            VI jv = TN(viset1)((TN(ielem))c) + iota;
            V p, ds, bias = zero;
            if (a->alibi) {   /* - slope * |p - j|, keys j0 + c + lane */
                const V dist = TN(vset1)(w->apos[r] - (T)(j0 + c)) - fiota;
                bias = zero - slope * TN(vmax)(dist, -dist);
            }
            TN(dscore)(TN(vld)(pr + c), TN(vld)(dr + c), lse, di, (jv >= lo) & (jv <= hi),
                       scale, cap, bias, &p, &ds);
            TN(vst)(pr + c, p);
            TN(vst)(dr + c, ds);
        }
    }
}

/* q pass layout: S^T (in p) and dP^T (in ds) of key rows < n of the block at
 * key j0 and query lanes < Mp become P^T and dS^T. */
static void TN(grad_scores_rows)(const cpa_bwd_args *a, int64_t j0, int64_t n, int64_t Mp,
                                 TN(bws) *w)
{
    const T scale = (T)a->scale, cap = (T)a->softcap;
    for (int64_t i = 0; i < n; i++) {
        T *pr = w->p + i * Mp, *dr = w->ds + i * Mp;
        const VI jv = TN(viset1)((TN(ielem))(j0 + i));
        for (int64_t c = 0; c < Mp; c += VL) {
            VI lo, hi;
            memcpy(&lo, w->lo + c, sizeof lo);
            memcpy(&hi, w->hi + c, sizeof hi);
            V p, ds, bias = TN(vset1)(0);
            if (a->alibi) {   /* - slope * |p - j|, query lanes c.., key j0 + i */
                const V dist = TN(vld)(w->apos + c) - TN(vset1)((T)(j0 + i));
                bias = bias - TN(vld)(w->aslope + c) * TN(vmax)(dist, -dist);
            }
            TN(dscore)(TN(vld)(pr + c), TN(vld)(dr + c), TN(vld)(w->lse + c), TN(vld)(w->di + c),
                       (jv >= lo) & (jv <= hi), scale, cap, bias, &p, &ds);
            TN(vst)(pr + c, p);
            TN(vst)(dr + c, ds);
        }
    }
}

/* The two tile products of a pass over nr rows (a multiple of MR) and nc
 * lanes (a multiple of NVL), leading dimension ld: o1 = r1 b1 (scores, Dk
 * deep) and o2 = r2 b2 (dP, Dv deep), rows given by pointers. */
static void TN(tile_pair)(int64_t nr, int64_t nc, int64_t ld, int64_t Dk, const T *const *r1,
                          const T *b1, T *o1, int64_t Dv, const T *const *r2, const T *b2, T *o2)
{
    for (int64_t i0 = 0; i0 < nr; i0 += MR)
        for (int64_t c = 0; c < nc; c += NVL) {
            TN(mk_rows)(Dk, r1 + i0, b1 + c, ld, o1 + i0 * ld + c, ld);
            TN(mk_rows)(Dv, r2 + i0, b2 + c, ld, o2 + i0 * ld + c, ld);
        }
}

/* kv pass: dK and dV of one key block of one kv head, summed over every query
 * row (all tokens, all query heads of the group) that sees one of its keys. */
static void TN(kv_item)(const cpa_bwd_args *a, const cpa_bwd_item *it, char *scratch)
{
    const int64_t BK = CPA_BWD_BK, b = it->seq, kvh = it->kvh;
    const int64_t g = cpa_bwd_group(a), nq = a->q_len[b], Sk = a->k_len[b], ks = a->k_start[b];
    const int64_t Dk = a->head_dim_qk, Dv = a->head_dim_v, bq = cpa_bwd_block_tokens(g);
    const int64_t j0 = (int64_t)it->block * BK, n = cpa_min(BK, Sk - j0), ncp = cpa_roundup(n, NVL);
    TN(bws) w;
    TN(bws_init)(a, scratch, &w);
    T *kt = w.ta, *vt = w.tb, *dkt = w.acc1, *dvt = w.acc2;

    /* K^T and V^T of the block (ld BK), padding lanes 0 */
    memset(kt, 0, (size_t)(Dk * BK) * sizeof(T));
    memset(vt, 0, (size_t)(Dv * BK) * sizeof(T));
    for (int64_t i = 0; i < n; i++) {
        const T *kr = (const T *)a->k.data + cpa_at(&a->k, b, (ks + j0 + i), kvh);
        const T *vr = (const T *)a->v.data + cpa_at(&a->v, b, (ks + j0 + i), kvh);
        for (int64_t d = 0; d < Dk; d++) kt[d * BK + i] = kr[d];
        for (int64_t d = 0; d < Dv; d++) vt[d * BK + i] = vr[d];
    }
    memset(dkt, 0, (size_t)(Dk * BK) * sizeof(T));
    memset(dvt, 0, (size_t)(Dv * BK) * sizeof(T));

    /* tokens that see a key of the block: a contiguous range, since both
     * ends of the visible interval grow with the token position */
    int64_t ta = nq, tb = -1;
    for (int64_t t = 0; t < nq; t++) {
        int64_t lo, hi;
        cpa_visible_keys(&a->mask, nq, Sk, t, &lo, &hi);
        if (hi >= lo && lo <= j0 + n - 1 && hi >= j0) {
            if (t < ta) ta = t;
            tb = t;
        }
    }
    for (int64_t t0 = ta; t0 <= tb; t0 += bq) {
        const int64_t nt = cpa_min(bq, tb + 1 - t0), M = nt * g;
        const int64_t Mr = TN(load_rows)(a, b, kvh, t0, nt, MR, 0, &w);
        TN(tile_pair)(Mr, ncp, BK, Dk, w.qrow, kt, w.p, Dv, w.dorow, vt, w.ds);
        TN(grad_scores_keys)(a, j0, Mr, ncp, &w);
        TN(acc_cols)(M, w.dorow, Dv, w.p, dvt, BK, ncp);
        TN(acc_cols)(M, w.qrow, Dk, w.ds, dkt, BK, ncp);
    }

    const T scale = (T)a->scale;
    for (int64_t i = 0; i < n; i++) {
        T *dkr = (T *)a->dk.data + cpa_at(&a->dk, b, (ks + j0 + i), kvh);
        T *dvr = (T *)a->dv.data + cpa_at(&a->dv, b, (ks + j0 + i), kvh);
        for (int64_t d = 0; d < Dk; d++) dkr[d] = scale * dkt[d * BK + i];
        for (int64_t d = 0; d < Dv; d++) dvr[d] = dvt[d * BK + i];
    }
}

/* q pass: dQ of one query block (tokens x query heads of one kv group). */
static void TN(q_item)(const cpa_bwd_args *a, const cpa_bwd_item *it, char *scratch)
{
    const int64_t BK = CPA_BWD_BK, b = it->seq, kvh = it->kvh;
    const int64_t g = cpa_bwd_group(a), nq = a->q_len[b], Sk = a->k_len[b], ks = a->k_start[b];
    const int64_t Dk = a->head_dim_qk, Dv = a->head_dim_v, bq = cpa_bwd_block_tokens(g);
    const int64_t t0 = (int64_t)it->block * bq, nt = cpa_min(bq, nq - t0), M = nt * g;
    TN(bws) w;
    TN(bws_init)(a, scratch, &w);
    T *qt = w.ta, *dot = w.tb, *dqt = w.acc1;
    const int64_t Mp = TN(load_rows)(a, b, kvh, t0, nt, NVL, 1, &w);

    /* Q^T and dO^T (ld Mp); padding lanes come from the zero row */
    for (int64_t r = 0; r < Mp; r++) {
        for (int64_t d = 0; d < Dk; d++) qt[d * Mp + r] = w.qrow[r][d];
        for (int64_t d = 0; d < Dv; d++) dot[d * Mp + r] = w.dorow[r][d];
    }
    memset(dqt, 0, (size_t)(Dk * Mp) * sizeof(T));

    /* keys some row sees [ulo, uhi]; keys every row sees [ilo, ihi] */
    int64_t ulo = INT64_MAX, uhi = -1, ilo = 0, ihi = Sk - 1;
    for (int64_t r = 0; r < M; r++) {
        ilo = cpa_max(ilo, w.lo[r]);
        ihi = cpa_min(ihi, w.hi[r]);
        if (w.hi[r] >= w.lo[r]) {
            ulo = cpa_min(ulo, w.lo[r]);
            uhi = cpa_max(uhi, w.hi[r]);
        }
    }
    for (int64_t j0 = uhi < 0 ? 0 : ulo - ulo % BK; j0 <= uhi; j0 += BK) {
        const int64_t n = cpa_min(BK, Sk - j0), nkp = cpa_roundup(n, MR);
        /* 0 * inf is NaN: a non-finite key row hidden from some row of the
         * block is left out of dQ^T += K^T dS^T and added afterwards only to
         * the rows that see it. */
        int64_t nfix = 0;
        for (int64_t i = 0; i < nkp; i++) {
            if (i >= n) {
                w.krow[i] = w.kuse[i] = w.vrow[i] = w.zero;
                continue;
            }
            const int64_t j = ks + j0 + i;
            w.krow[i] = (const T *)a->k.data + cpa_at(&a->k, b, j, kvh);
            w.vrow[i] = (const T *)a->v.data + cpa_at(&a->v, b, j, kvh);
            w.kuse[i] = w.krow[i];
            if ((j0 + i < ilo || j0 + i > ihi) && !TN(bfinite)(w.krow[i], Dk)) {
                w.fix[nfix++] = i;
                w.kuse[i] = w.zero;
            }
        }
        TN(tile_pair)(nkp, Mp, Mp, Dk, w.krow, qt, w.p, Dv, w.vrow, dot, w.ds);
        TN(grad_scores_rows)(a, j0, n, Mp, &w);
        TN(acc_cols)(n, w.kuse, Dk, w.ds, dqt, Mp, Mp);
        for (int64_t f = 0; f < nfix; f++) {
            const int64_t i = w.fix[f], j = j0 + i;
            for (int64_t r = 0; r < M; r++)
                if (j >= w.lo[r] && j <= w.hi[r])
                    for (int64_t d = 0; d < Dk; d++)
                        dqt[d * Mp + r] += w.ds[i * Mp + r] * w.krow[i][d];
        }
    }

    const T scale = (T)a->scale;
    const int64_t qs = a->q_start[b];
    for (int64_t r = 0; r < M; r++) {
        const int64_t t = t0 + r / g, h = kvh * g + r % g;
        T *dqr = (T *)a->dq.data + cpa_at(&a->dq, b, (qs + t), h);
        for (int64_t d = 0; d < Dk; d++) dqr[d] = scale * dqt[d * Mp + r];
    }
}
