/* The backward attention engine (FlashAttention-2 recomputation from lse),
 * shared by dense, varlen and paged backward.
 *
 * A call is a list of sequences over arrays of one compute type (float32 or
 * float64: the facade converts float16/bfloat16), laid out as in forward.h:
 * sequence b's queries are rows q_start[b] + t of q, out, dout, dq, lse and
 * di, its keys rows k_start[b] + j of k, v, dk and dv (cpa_rows, engine.h).
 * Sequence b's q_len[b] queries are its last positions (bottom-right
 * alignment).
 *
 * Two passes, each parallel over independent items and free of atomics:
 *   q pass:  item (sequence, kv head, query block) -> dQ (and Di) of its rows;
 *   kv pass: item (sequence, kv head, key block) -> dK, dV of those keys,
 *            looping over every query block and query head of the group.
 * Every gradient element is written by exactly one item in a fixed order, so
 * results are bitwise identical for any thread count.
 */
#ifndef CPUATTN_BACKWARD_H
#define CPUATTN_BACKWARD_H
#include <stddef.h>
#include <stdint.h>
#include "engine.h"

typedef struct {
    cpa_rows q, k, v, out, dout, lse;
    cpa_rows dq, dk, dv;
    cpa_rows di;                    /* rowsum(dO * O), laid out like lse: the q pass
                                       writes it, the kv pass reads it */
    int32_t num_heads, num_kv_heads, head_dim_qk, head_dim_v;
    int32_t f64;                    /* 0: float32 compute and storage, 1: float64 */
    double scale, softcap;          /* softcap 0 = off */
    const double *alibi;            /* ALiBi slope per query head (forward.h), or NULL */
    cpa_mask mask;
    int64_t num_seqs;
    const int64_t *q_start, *k_start, *q_len, *k_len;
} cpa_bwd_args;

typedef struct {
    int64_t seq;
    int32_t kvh, block;             /* key block (kv pass) or query block (q pass) */
} cpa_bwd_item;

enum { CPA_BWD_KV = 0, CPA_BWD_Q = 1 };

/* Counts (items == NULL) or fills the work list of one pass. */
int64_t cpa_bwd_plan(const cpa_bwd_args *a, int pass, cpa_bwd_item *items);
/* Scratch bytes one thread needs (either pass). */
size_t cpa_bwd_scratch_bytes(const cpa_bwd_args *a);

typedef void (*cpa_bwd_item_fn)(const cpa_bwd_args *, const cpa_bwd_item *, char *scratch);
/* Item kernel of one pass for this call's dtype on SIMD path `isa`; NULL if none. */
cpa_bwd_item_fn cpa_bwd_kernel(const cpa_bwd_args *a, int pass, int isa);

#endif
