/* Backward engine: planning, scratch layout, ISA x dtype dispatch. The item
 * kernels (backward_body.h over simd_t.h) are compiled once per ISA target
 * region below, as in forward.c; nothing here depends on the thread count. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "backward.h"
#include "engine.h"
#include "platform.h"

/* Blocking constants. Shapes only, never thread counts. */
#define CPA_BWD_BK 64        /* keys per block; a multiple of every NVL */
#define CPA_BWD_MROWS 64     /* target query rows (tokens x group heads) per block */
#define CPA_BWD_BK_PAD (CPA_BWD_BK + 8)  /* key rows rounded up to any ISA's MR (<= 8) */
#define CPA_BWD_LPAD 32      /* a multiple of every NVL (lanes of one micro-kernel call) */

static inline int64_t cpa_bwd_group(const cpa_bwd_args *a) { return a->num_heads / a->num_kv_heads; }
static inline int64_t cpa_bwd_block_tokens(int64_t g) { return g >= CPA_BWD_MROWS ? 1 : CPA_BWD_MROWS / g; }
/* Row capacity of a query block, padded for any ISA's MR and NVL. */
static inline int64_t cpa_bwd_mcap(int64_t g) { return cpa_roundup(g * cpa_bwd_block_tokens(g), CPA_BWD_LPAD) + 8; }

typedef struct {
    size_t ta, tb, acc1, acc2, p, ds, lse, di, apos, aslope, lo, hi, qrow, dorow, krow, vrow, zero,
        fix, total;
} cpa_bwd_layout;

/* One layout serves both passes (shared buffers: kv pass | q pass). */
static void cpa_bwd_layout_of(const cpa_bwd_args *a, cpa_bwd_layout *L)
{
    const size_t ts = a->f64 ? 8 : 4, ps = sizeof(void *);
    const int64_t BK = CPA_BWD_BK, BKP = CPA_BWD_BK_PAD, mc = cpa_bwd_mcap(cpa_bwd_group(a));
    const int64_t dk = a->head_dim_qk, dv = a->head_dim_v, w = cpa_max(BKP, mc);
    size_t at = 0;
    L->ta = cpa_take(&at, (size_t)(dk * w) * ts);     /* K^T | Q^T */
    L->tb = cpa_take(&at, (size_t)(dv * w) * ts);     /* V^T | dO^T */
    L->acc1 = cpa_take(&at, (size_t)(dk * w) * ts);   /* dK^T | dQ^T */
    L->acc2 = cpa_take(&at, (size_t)(dv * BK) * ts);  /* dV^T */
    L->p = cpa_take(&at, (size_t)(mc * BKP) * ts);    /* P[r][j] | P^T[j][r] */
    L->ds = cpa_take(&at, (size_t)(mc * BKP) * ts);   /* dS, same */
    L->lse = cpa_take(&at, (size_t)mc * ts);
    L->di = cpa_take(&at, (size_t)mc * ts);
    L->apos = cpa_take(&at, (size_t)mc * ts);     /* ALiBi: each row's position and slope */
    L->aslope = cpa_take(&at, (size_t)mc * ts);
    L->lo = cpa_take(&at, (size_t)mc * 8);
    L->hi = cpa_take(&at, (size_t)mc * 8);
    L->qrow = cpa_take(&at, (size_t)mc * ps);
    L->dorow = cpa_take(&at, (size_t)mc * ps);
    L->krow = cpa_take(&at, (size_t)(2 * BKP) * ps);
    L->vrow = cpa_take(&at, (size_t)BKP * ps);
    L->zero = cpa_take(&at, (size_t)cpa_max(dk, dv) * ts);
    L->fix = cpa_take(&at, BK * 8);
    L->total = at;
}

size_t cpa_bwd_scratch_bytes(const cpa_bwd_args *a)
{
    cpa_bwd_layout L;
    cpa_bwd_layout_of(a, &L);
    return L.total + CPA_ALIGN;
}

int64_t cpa_bwd_plan(const cpa_bwd_args *a, int pass, cpa_bwd_item *items)
{
    const int64_t bq = cpa_bwd_block_tokens(cpa_bwd_group(a));
    int64_t ni = 0;
    for (int64_t b = 0; b < a->num_seqs; b++) {
        /* largest items first for the dynamic schedule: under a causal mask
         * early key blocks and late query blocks see the most pairs */
        if (pass == CPA_BWD_KV) {
            const int64_t nkb = (a->k_len[b] + CPA_BWD_BK - 1) / CPA_BWD_BK;
            for (int64_t kb = 0; kb < nkb; kb++)
                for (int32_t h = 0; h < a->num_kv_heads; h++, ni++)
                    if (items) {
                        items[ni].seq = b; items[ni].kvh = h; items[ni].block = (int32_t)kb;
                    }
        } else {
            const int64_t nqb = (a->q_len[b] + bq - 1) / bq;
            for (int64_t qb = nqb - 1; qb >= 0; qb--)
                for (int32_t h = 0; h < a->num_kv_heads; h++, ni++)
                    if (items) {
                        items[ni].seq = b; items[ni].kvh = h; items[ni].block = (int32_t)qb;
                    }
        }
    }
    return ni;
}

#define CPA_ISA_BODY "backward_isa.h"
#include "isa_regions.h"

#define CPA_BWD_ROW_(e, tag, name, feats, fallback) [e] = bwd_kernels_##tag,
static const cpa_bwd_item_fn (*const cpa_bwd_table[CPA_ISA_COUNT])[2] = { CPA_ISAS(CPA_BWD_ROW_) };

cpa_bwd_item_fn cpa_bwd_kernel(const cpa_bwd_args *a, int pass, int isa)
{
    if (isa < 0 || isa >= CPA_ISA_COUNT || (pass != CPA_BWD_KV && pass != CPA_BWD_Q))
        return 0;
    /* a path without its own kernels (avx512bf16) takes its fallback's */
    while (!cpa_bwd_table[isa][pass][a->f64 ? 1 : 0] && isa != CPA_ISA_SCALAR)
        isa = cpa_isa_fallback(isa);
    return cpa_bwd_table[isa][pass][a->f64 ? 1 : 0];
}
