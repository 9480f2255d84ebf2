/* Forward engine: planning, scratch layout, ISA x dtype dispatch, merge.
 * The kernel bodies (forward_body.h, simd_t.h) are compiled once per ISA
 * target region below; nothing here depends on the thread count. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "engine.h"
#include "forward.h"
#include "half.h"
#include "platform.h"
#include "quant.h"

/* Blocking constants. Shapes only, never thread counts. */
#define CPA_BK 64            /* keys per tile */
#define CPA_BK_PAD (CPA_BK + 8) /* key rows of a tile rounded up to any ISA's MR (<= 8) */
#define CPA_MROWS 64         /* target query rows (tokens x group heads) per block */
#define CPA_SPLIT 512        /* keys per split-KV chunk (multiple of CPA_BK) */
#define CPA_DEC_MAX_M 8      /* query rows per kv head up to which the decode kernel is used */
#define CPA_DEC_HEADS 8      /* kv heads per decode item: their rows of a token are adjacent */

static inline int64_t cpa_block_tokens(int64_t g) { return g >= CPA_MROWS ? 1 : CPA_MROWS / g; }
static inline int cpa_use_decode(int64_t g, int64_t nq) { return g * nq <= CPA_DEC_MAX_M; }

/* kv heads in one decode item */
static inline int64_t cpa_dec_heads(const cpa_fwd_args *a)
{
    return cpa_min(a->num_kv_heads, CPA_DEC_HEADS);
}

/* Keys per split. A decode item with fewer kv heads takes proportionally
 * more keys (MQA: 8 x 512), so that its score tile, and the bytes it
 * streams per pass, stay the same size: fewer items, fewer pass switches
 * and merges for one long sequence. A function of the call's head counts
 * only, so results stay batch-invariant. */
static inline int64_t cpa_split_keys(const cpa_fwd_args *a, int decode)
{
    return decode ? CPA_SPLIT * (CPA_DEC_HEADS / cpa_dec_heads(a)) : CPA_SPLIT;
}

/* Element offset of sequence b's first key row in k or v (0 when paged:
 * the block table locates every row). */
static inline int64_t cpa_kv_seq(const cpa_fwd_args *a, const cpa_rows *x, int64_t b)
{
    return a->block_table ? 0 : x->seq * b + x->tok * a->k_start[b];
}

/* Addresses of key rows j0 .. j0+n-1 of sequence b: out[i] = base + element
 * offset * esize. Walks the page chain once instead of dividing per row. */
static void cpa_kv_rows(const cpa_fwd_args *a, int64_t b, const char *base, size_t esize,
                        int64_t tok, int64_t page, int64_t j0, int64_t n, const void **out)
{
    if (!a->block_table) {
        for (int64_t i = 0; i < n; i++) out[i] = base + (size_t)((j0 + i) * tok) * esize;
        return;
    }
    const int64_t P = a->page_size;
    const int32_t *chain = a->block_table + b * a->bt_stride;
    int64_t pg = j0 / P, slot = j0 % P;
    const char *p = base + (size_t)(chain[pg] * page + slot * tok) * esize;
    for (int64_t i = 0; i < n; i++) {
        out[i] = p;
        if (++slot == P && i + 1 < n) {
            slot = 0;
            p = base + (size_t)(chain[++pg] * page) * esize;
        } else {
            p += tok * (int64_t)esize;
        }
    }
}

/* The decode kernel reads each page of a chain in memory order, but the
 * next page can be anywhere in the pool and the hardware prefetchers neither
 * follow that jump nor run far enough ahead of the arithmetic. So every line
 * of the rows about CPA_DEC_AHEAD bytes ahead is prefetched explicitly
 * (measured on Zen 5: 23 -> 32 GB/s for one core streaming pages with this
 * much arithmetic per byte). */
#define CPA_DEC_AHEAD 16384

/* Tokens to prefetch ahead when one token's rows are `bytes` long. */
static inline int64_t cpa_prefetch_distance(int64_t bytes)
{
    return cpa_max(2, CPA_DEC_AHEAD / cpa_max(bytes, 1));
}

/* Prefetch `bytes` at p (issued between tile products of one head, so that
 * the misses stay spread out rather than filling the miss buffers at once). */
static inline void cpa_prefetch_bytes(const void *p, int64_t bytes)
{
    for (int64_t off = 0; off < bytes; off += 64)
        __builtin_prefetch((const char *)p + off, 0, 3);
}

typedef struct {
    size_t qt, st, ot, m, l, alpha, lo, hi, krow, vrow, kc, vc, zero, fix, vraw, kraw, vsraw, ksraw, vfix,
        pp, pt, apos, aslope, total;
} cpa_tiled_layout;

typedef struct {
    size_t qs, sc, o, m, l, row, srow, rows, total;
    int64_t qstride, scstride;
} cpa_decode_layout;

static void cpa_tiled_plan(const cpa_fwd_args *a, size_t tsize, cpa_tiled_layout *L)
{
    const int64_t g = a->num_heads / a->num_kv_heads;
    const int64_t mp = cpa_roundup(g * cpa_block_tokens(g), 64);
    const int64_t dk = a->head_dim_qk, dv = a->head_dim_v, dmax = cpa_max(dk, dv);
    size_t at = 0;
    L->qt = cpa_take(&at, (size_t)(dk * mp) * tsize);
    L->st = cpa_take(&at, (size_t)(CPA_BK_PAD * mp) * tsize);
    L->ot = cpa_take(&at, (size_t)(dv * mp) * tsize);
    L->m = cpa_take(&at, (size_t)mp * tsize);
    L->l = cpa_take(&at, (size_t)mp * tsize);
    L->alpha = cpa_take(&at, (size_t)mp * tsize);
    L->lo = cpa_take(&at, (size_t)mp * 8);
    L->hi = cpa_take(&at, (size_t)mp * 8);
    L->krow = cpa_take(&at, CPA_BK_PAD * sizeof(void *));
    L->vrow = cpa_take(&at, CPA_BK * sizeof(void *));
    L->kc = cpa_take(&at, (size_t)(CPA_BK * dk) * tsize);
    L->vc = cpa_take(&at, (size_t)(CPA_BK * dv) * tsize);
    L->zero = cpa_take(&at, (size_t)dmax * tsize);
    L->fix = cpa_take(&at, CPA_BK * sizeof(int64_t));
    L->vraw = cpa_take(&at, CPA_BK * sizeof(void *));
    L->kraw = cpa_take(&at, CPA_BK * sizeof(void *));
    L->vsraw = cpa_take(&at, CPA_BK * sizeof(void *));
    L->ksraw = cpa_take(&at, CPA_BK * sizeof(void *));
    L->vfix = cpa_take(&at, CPA_BK * sizeof(void *));
    L->pp = cpa_take(&at, (size_t)(CPA_BK / 2 * mp) * 4);   /* P as bf16 pairs (avx512bf16) */
    L->pt = cpa_take(&at, (size_t)(mp * CPA_BK / 2) * 4);   /* P as key pairs, query rows (amx) */
    L->apos = cpa_take(&at, (size_t)mp * tsize);     /* ALiBi: each lane's position, slope */
    L->aslope = cpa_take(&at, (size_t)mp * tsize);
    L->total = at;
}

/* Decode scratch for `rows` query rows (R = head-in-item * M + r): q
 * (pre-scaled), scores (keys of one split), the output accumulator, running
 * max and sum; row addresses of the item's keys for its first kv head, and
 * of their scales (K in pass 1, V in pass 2); per row r < M its visible keys
 * lo, hi and its sequence and query token (4 arrays of int64). */
static void cpa_decode_plan(const cpa_fwd_args *a, size_t tsize, int64_t rows, cpa_decode_layout *L)
{
    const int64_t split = cpa_split_keys(a, 1);
    L->qstride = cpa_roundup(a->head_dim_qk, 16);
    L->scstride = split + 16;   /* a score row, padded to any vector length */
    size_t at = 0;
    L->qs = cpa_take(&at, (size_t)(rows * L->qstride) * tsize);
    L->sc = cpa_take(&at, (size_t)(rows * L->scstride) * tsize);
    L->o = cpa_take(&at, (size_t)(rows * a->head_dim_v) * tsize);
    L->m = cpa_take(&at, (size_t)rows * tsize);
    L->l = cpa_take(&at, (size_t)rows * tsize);
    L->row = cpa_take(&at, (size_t)split * sizeof(void *));
    L->srow = cpa_take(&at, (size_t)split * sizeof(void *));
    L->rows = cpa_take(&at, (size_t)rows * 4 * sizeof(int64_t));
    L->total = at;
}

static size_t cpa_tsize(const cpa_fwd_args *a) { return a->q_dtype == CPA_F64 ? 8 : 4; }

size_t cpa_fwd_scratch_bytes(const cpa_fwd_args *a, int any_tiled, int64_t dec_rows)
{
    cpa_tiled_layout t;
    cpa_decode_layout d;
    cpa_tiled_plan(a, cpa_tsize(a), &t);
    cpa_decode_plan(a, cpa_tsize(a), cpa_max(dec_rows, cpa_dec_heads(a) * CPA_DEC_MAX_M), &d);
    if (!any_tiled)
        t.total = 0;
    return (t.total > d.total ? t.total : d.total) + CPA_ALIGN;
}

int cpa_fwd_uses_tiled(const cpa_fwd_args *a)
{
    const int64_t g = a->num_heads / a->num_kv_heads;
    for (int64_t b = 0; b < a->num_seqs; b++)
        if (a->q_len[b] > 0 && !cpa_use_decode(g, a->q_len[b]))
            return 1;
    return 0;
}

size_t cpa_fwd_slot_bytes(const cpa_fwd_args *a)
{
    const int64_t g = a->num_heads / a->num_kv_heads;
    const int64_t rows = cpa_max(g * cpa_block_tokens(g), CPA_DEC_HEADS * CPA_DEC_MAX_M);
    return (size_t)(rows * (a->head_dim_v + 2)) * cpa_tsize(a);
}

int64_t cpa_fwd_plan(const cpa_fwd_args *a, cpa_fwd_item *items, cpa_fwd_merge *merges,
                     int64_t *n_merges, int64_t *n_slots)
{
    const int64_t g = a->num_heads / a->num_kv_heads, bq = cpa_block_tokens(g);
    int64_t ni = 0, nm = 0, ns = 0;
    for (int64_t b = 0; b < a->num_seqs; b++) {
        const int64_t nq = a->q_len[b], Sk = a->k_len[b];
        if (nq <= 0)
            continue;
        const int64_t nqb = (nq + bq - 1) / bq;
        /* largest (causal: latest) blocks first, for the dynamic schedule */
        for (int64_t qb = nqb - 1; qb >= 0; qb--) {
            int64_t ulo = INT64_MAX, uhi = -1;
            for (int64_t t = qb * bq; t < cpa_min(nq, (qb + 1) * bq); t++) {
                int64_t lo, hi;
                cpa_visible_keys(&a->mask, nq, Sk, t, &lo, &hi);
                if (hi >= lo) {
                    ulo = cpa_min(ulo, lo);
                    uhi = cpa_max(uhi, hi);
                }
            }
            if (uhi < 0)
                ulo = 0;   /* no visible key: one item writes zeros */
            const int decode = cpa_use_decode(g, nq);
            const int64_t split = cpa_split_keys(a, decode);
            const int64_t c0 = ulo / split, c1 = uhi < 0 ? c0 : uhi / split;
            const int64_t nsplit = (nqb == 1) ? c1 - c0 + 1 : 1;
            const int32_t hstep = decode ? (int32_t)cpa_dec_heads(a) : 1;
            for (int32_t h = 0; h < a->num_kv_heads; h += hstep) {
                const int32_t nh = (int32_t)cpa_min(hstep, a->num_kv_heads - h);
                if (nsplit > 1 && merges) {
                    merges[nm].seq = b; merges[nm].kvh = h; merges[nm].nkvh = nh;
                    merges[nm].nsplit = (int32_t)nsplit; merges[nm].slot0 = ns;
                }
                for (int64_t s = 0; s < nsplit; s++) {
                    if (items) {
                        cpa_fwd_item *it = &items[ni];
                        it->seq = b; it->kvh = h; it->nkvh = nh; it->qblock = (int32_t)qb;
                        it->nshare = 1;
                        it->slot = nsplit > 1 ? ns + s : -1;
                        it->key_lo = nsplit > 1 ? cpa_max(ulo, (c0 + s) * split) : ulo;
                        it->key_hi = nsplit > 1 ? cpa_min(uhi, (c0 + s + 1) * split - 1) : uhi;
                    }
                    ni++;
                }
                if (nsplit > 1) {
                    nm++;
                    ns += nsplit;
                }
            }
        }
    }
    *n_merges = nm;
    *n_slots = ns;
    return ni;
}

/* ---- shared-prefix decode ----
 * Query rows of one shared item (all its kv heads): its scores (rows x one
 * split), q and output rows stay in a core's L2 (about 800 KB at D 128). */
#define CPA_SHARE_ROWS 256

/* Whether item x can run with items of other sequences (decode, some key). */
static int cpa_shareable(const cpa_fwd_args *a, const cpa_fwd_item *x)
{
    const int64_t g = a->num_heads / a->num_kv_heads;
    return x->key_hi >= x->key_lo && cpa_use_decode(g, a->q_len[x->seq]);
}

/* The pages of item x's keys, as a hash (with its heads and key range). */
static uint64_t cpa_item_hash(const cpa_fwd_args *a, const cpa_fwd_item *x)
{
    const int32_t *chain = a->block_table + x->seq * a->bt_stride;
    uint64_t h = 1469598103934665603ull;
    const int64_t head[4] = {x->kvh, x->nkvh, x->key_lo, x->key_hi};
    for (int i = 0; i < 4; i++) h = (h ^ (uint64_t)head[i]) * 1099511628211ull;
    for (int64_t p = x->key_lo / a->page_size; p <= x->key_hi / a->page_size; p++)
        h = (h ^ (uint32_t)chain[p]) * 1099511628211ull;
    return h;
}

/* Whether items x and y read the same rows: heads, keys, the page of each. */
static int cpa_same_rows(const cpa_fwd_args *a, const cpa_fwd_item *x, const cpa_fwd_item *y)
{
    if (x->kvh != y->kvh || x->nkvh != y->nkvh || x->key_lo != y->key_lo || x->key_hi != y->key_hi)
        return 0;
    const int32_t *cx = a->block_table + x->seq * a->bt_stride, *cy = a->block_table + y->seq * a->bt_stride;
    for (int64_t p = x->key_lo / a->page_size; p <= x->key_hi / a->page_size; p++)
        if (cx[p] != cy[p]) return 0;
    return 1;
}

typedef struct { uint64_t hash; int64_t i; } cpa_share_key;

static int cpa_share_cmp(const void *x, const void *y)
{
    const cpa_share_key *p = x, *q = y;
    if (p->hash != q->hash) return p->hash < q->hash ? -1 : 1;
    return (p->i > q->i) - (p->i < q->i);
}

int cpa_fwd_share(const cpa_fwd_args *a, cpa_fwd_item *items, int64_t n, int64_t *max_rows)
{
    const int64_t g = a->num_heads / a->num_kv_heads;
    *max_rows = 0;
    if (!a->block_table || n < 2)
        return 0;
    cpa_share_key *keys = malloc((size_t)n * sizeof *keys);
    int64_t *next = malloc((size_t)n * 2 * sizeof *next);   /* next member of a chunk; chunk state */
    cpa_fwd_item *out = malloc((size_t)n * sizeof *out);
    if (!keys || !next || !out) {
        free(keys); free(next); free(out);
        return -1;
    }
    int64_t *lead = next + n;   /* -1: an item of its own; else its chunk's first item */
    int64_t nk = 0;
    for (int64_t i = 0; i < n; i++) {
        next[i] = lead[i] = -1;
        if (cpa_shareable(a, &items[i])) {
            keys[nk].hash = cpa_item_hash(a, &items[i]);
            keys[nk++].i = i;
        }
    }
    qsort(keys, (size_t)nk, sizeof *keys, cpa_share_cmp);
    /* within each run of one hash (in item order), members of one group of
     * equal rows are cut into chunks of at most CPA_SHARE_ROWS rows */
    for (int64_t s = 0, e; s < nk; s = e) {
        for (e = s + 1; e < nk && keys[e].hash == keys[s].hash; e++) {}
        for (int64_t u = s; u < e; u++) {
            const int64_t first = keys[u].i;
            if (lead[first] >= 0) continue;
            int64_t chunk = first, last = first, rows = g * a->q_len[items[first].seq];
            lead[first] = first;
            for (int64_t w = u + 1; w < e; w++) {
                const int64_t j = keys[w].i, mj = g * a->q_len[items[j].seq];
                if (lead[j] >= 0 || !cpa_same_rows(a, &items[first], &items[j])) continue;
                if ((rows + mj) * items[j].nkvh > CPA_SHARE_ROWS) {
                    chunk = last = j;   /* a new chunk of the same group */
                    rows = 0;
                } else {
                    next[last] = j;
                    last = j;
                }
                lead[j] = chunk;
                rows += mj;
            }
        }
    }
    /* each chunk in place of its first item, its members after it */
    int64_t no = 0;
    for (int64_t i = 0; i < n; i++) {
        if (lead[i] < 0) {
            out[no] = items[i];
            *max_rows = cpa_max(*max_rows, out[no++].nkvh * g * a->q_len[items[i].seq]);
        } else if (lead[i] == i) {
            const int64_t first = no;
            int64_t rows = 0;
            for (int64_t j = i; j >= 0; j = next[j]) {
                out[no] = items[j];
                out[no++].nshare = 0;
                rows += g * a->q_len[items[j].seq];
            }
            out[first].nshare = (int32_t)(no - first);
            *max_rows = cpa_max(*max_rows, out[first].nkvh * rows);
        }
    }
    memcpy(items, out, (size_t)n * sizeof *out);
    free(keys); free(next); free(out);
    return 0;
}

#define CPA_T_BODY "rowio_t.h"
#include "each_t.h"
#define RN_CALL(x) CPA_CAT2(x, TTAG)

#define CPA_ISA_BODY "forward_isa.h"
#include "isa_regions.h"

#define CPA_FWD_ROW_(e, tag, name, feats, fallback) [e] = fwd_kernels_##tag,
static const cpa_fwd_item_fn *const cpa_fwd_table[CPA_ISA_COUNT] = { CPA_ISAS(CPA_FWD_ROW_) };

static int cpa_valid_dtype(int code) { return code >= 0 && code < CPA_DTYPE_COUNT; }

cpa_fwd_item_fn cpa_fwd_kernel(const cpa_fwd_args *a, int isa)
{
    if (isa < 0 || isa >= CPA_ISA_COUNT || !cpa_valid_dtype(a->q_dtype) ||
        !cpa_valid_dtype(a->k_dtype) || !cpa_valid_dtype(a->v_dtype))
        return 0;
    if (cpa_dtype_bits(a->q_dtype) < 16)
        return 0;   /* low-bit types are KV storage only */
    const int q64 = a->q_dtype == CPA_F64;
    if ((a->k_dtype == CPA_F64) != q64 || (a->v_dtype == CPA_F64) != q64)
        return 0;   /* float64 compute needs float64 everywhere */
#if CPA_HAVE_BF16_TARGET
    const int all_bf16 = a->q_dtype == CPA_BF16 && a->k_dtype == CPA_BF16 && a->v_dtype == CPA_BF16;
#if CPA_HAVE_AMX_TARGET
    /* tiles take K rows 32 elements at a time and give 16-dim output tiles */
    if (isa == CPA_ISA_AMX && !(all_bf16 && a->head_dim_qk % 32 == 0 && a->head_dim_v % 16 == 0))
        isa = cpa_isa_fallback(isa);
#endif
    /* the bf16-pair products need Q, K and V in bfloat16 (rounding a
     * float32 Q to bf16 would lose precision the caller asked for) */
    if (isa == CPA_ISA_AVX512BF16 && !all_bf16)
        isa = cpa_isa_fallback(isa);
#endif
    /* a path without its own kernel for this compute type takes its fallback's */
    while (!cpa_fwd_table[isa][q64] && isa != CPA_ISA_SCALAR)
        isa = cpa_isa_fallback(isa);
    return cpa_fwd_table[isa][q64];
}

void cpa_fwd_merge_one(const cpa_fwd_args *a, const cpa_fwd_merge *m, const char *partials,
                       char *scratch)
{
    if (a->q_dtype == CPA_F64)
        merge_f64(a, m, partials, scratch);
    else
        merge_f32(a, m, partials, scratch);
}
