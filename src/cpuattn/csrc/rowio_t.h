/* Query-row loads and output-row stores for one compute type T (included by
 * forward.c once for float, once for double). Off the hot loop: a query row
 * is loaded once per work item and an output row stored once. */
#undef RN
#define RN(x) CPA_CAT2(x, TTAG)

/* dst[d * dstride] = scale * q_row[d], converting from the query dtype. */
static void RN(load_q_row)(const cpa_fwd_args *a, int64_t off, T *dst, int64_t dstride, T scale)
{
    const int64_t D = a->head_dim_qk;
    switch (a->q_dtype) {
    case CPA_F32: {
        const float *p = (const float *)a->q.data + off;
        for (int64_t d = 0; d < D; d++) dst[d * dstride] = scale * (T)p[d];
        break;
    }
    case CPA_F64: {
        const double *p = (const double *)a->q.data + off;
        for (int64_t d = 0; d < D; d++) dst[d * dstride] = scale * (T)p[d];
        break;
    }
    case CPA_F16: {
        const uint16_t *p = (const uint16_t *)a->q.data + off;
        for (int64_t d = 0; d < D; d++) dst[d * dstride] = scale * (T)cpa_f16_to_f32(p[d]);
        break;
    }
    default: {
        const uint16_t *p = (const uint16_t *)a->q.data + off;
        for (int64_t d = 0; d < D; d++) dst[d * dstride] = scale * (T)cpa_bf16_to_f32(p[d]);
        break;
    }
    }
}

/* Normalise one accumulated row (o[d * ostride], running max m, sum l) and
 * store it with its lse. A row that saw no key (l == 0) is exactly 0 with
 * lse -inf (or its sink); a NaN sum propagates. A sink joins the sum here,
 * once per row, after any split-KV merge: with m' = max(m, sink) the sum
 * becomes l e^(m - m') + e^(sink - m') and the output o e^(m - m') / that. */
static void RN(store_row)(const cpa_fwd_args *a, int64_t b, int64_t t, int64_t head,
                          const T *o, int64_t ostride, T m, T l)
{
    const int64_t D = a->head_dim_v;
    const int64_t off = cpa_at(&a->out, b, a->q_start[b] + t, head);
    const int empty = (l == 0);
    T div = l;    /* the output is o / div */
    if (a->sinks) {
        const T sink = (T)a->sinks[head];
        if (empty) {
            m = sink;
            l = 1;
        } else {
            const T mm = sink > m ? sink : m;
            const T keep = (T)exp((double)(m - mm));   /* e^(m - m') */
            l = l * keep + (T)exp((double)(sink - mm));
            if (sink != sink) l = sink;                 /* NaN propagates */
            div = l / keep;                             /* keep 0: inf, the output 0 */
            m = mm;
        }
    }
    /* one loop per output dtype, so that each loop vectorises */
#define CPA_STORE(type, conv)                                                   \
    do {                                                                        \
        type *dst = (type *)a->out.data + off;                                       \
        if (empty)                                                              \
            for (int64_t d = 0; d < D; d++) dst[d] = conv((T)0);               \
        else                                                                    \
            for (int64_t d = 0; d < D; d++) dst[d] = conv(o[d * ostride] / div); \
    } while (0)
#define CPA_AS_F32(x) ((float)(x))
#define CPA_AS_F64(x) ((double)(x))
#define CPA_AS_F16(x) cpa_f32_to_f16((float)(x))
#define CPA_AS_BF16(x) cpa_f32_to_bf16((float)(x))
    switch (a->q_dtype) {
    case CPA_F32: CPA_STORE(float, CPA_AS_F32); break;
    case CPA_F64: CPA_STORE(double, CPA_AS_F64); break;
    case CPA_F16: CPA_STORE(uint16_t, CPA_AS_F16); break;
    default: CPA_STORE(uint16_t, CPA_AS_BF16); break;
    }
#undef CPA_STORE
#undef CPA_AS_F32
#undef CPA_AS_F64
#undef CPA_AS_F16
#undef CPA_AS_BF16
    if (a->lse.data) {
        T lse = empty && !a->sinks ? (T)-INFINITY : m + (T)log((double)l);
        int64_t lo = cpa_at(&a->lse, b, a->q_start[b] + t, head);
        if (a->q_dtype == CPA_F64) ((double *)a->lse.data)[lo] = (double)lse;
        else ((float *)a->lse.data)[lo] = (float)lse;
    }
}

/* Merge the partial results of a split sequence in split order. */
static void RN(merge)(const cpa_fwd_args *a, const cpa_fwd_merge *mg, const char *partials,
                      char *scratch)
{
    const int64_t b = mg->seq, g = a->num_heads / a->num_kv_heads;
    const int64_t M = g * a->q_len[b], Dv = a->head_dim_v, ns = mg->nsplit;
    const size_t slot = cpa_fwd_slot_bytes(a);
    T *w = (T *)scratch;
    T *acc = w + ns;
    for (int64_t r = 0; r < M * mg->nkvh; r++) {   /* row r: kv head kvh + r / M */
        T mmax = -INFINITY;
        for (int64_t s = 0; s < ns; s++) {
            const T *part = (const T *)(partials + (mg->slot0 + s) * slot) + r * (Dv + 2);
            if (part[Dv] > mmax || part[Dv] != part[Dv]) mmax = part[Dv];
        }
        T l = 0;
        for (int64_t s = 0; s < ns; s++) {
            const T *part = (const T *)(partials + (mg->slot0 + s) * slot) + r * (Dv + 2);
            w[s] = (mmax == -INFINITY) ? (T)0 : (T)exp((double)(part[Dv] - mmax));
            l += w[s] * part[Dv + 1];
        }
        for (int64_t d = 0; d < Dv; d++) acc[d] = 0;
        for (int64_t s = 0; s < ns; s++) {
            const T *part = (const T *)(partials + (mg->slot0 + s) * slot) + r * (Dv + 2);
            for (int64_t d = 0; d < Dv; d++) acc[d] += w[s] * part[d];
        }
        const int64_t kvh = mg->kvh + r / M, rr = r % M;
        RN(store_row)(a, b, rr / g, kvh * g + rr % g, acc, 1, mmax, l);
    }
}
