/* The forward attention engine shared by dense, varlen and paged attention.
 *
 * Every call is described as a list of sequences. Sequence b has q_len[b]
 * query tokens (its last q_len[b] positions) at rows q_start[b] + t of q,
 * out and lse, and k_len[b] keys at rows k_start[b] + j of k and v (see
 * cpa_rows in engine.h). With a block table, key j of sequence b is slot
 * j % page_size of page block_table[b*bt_stride + j / page_size]. K and V
 * may have different storage types; low-bit rows (int8, int4, fp8) have
 * scales, addressed like their rows (k_scale, v_scale: row (page, slot,
 * head) of scales; seq = tok = head = 0 for one per-tensor scale). The facade
 * validates everything before the engine runs: the kernels trust their input.
 *
 * Work is split into items (sequence, kv heads, query block, kv split): the
 * tiled (prefill) kernel takes one kv head per item, the decode kernel a
 * group of up to CPA_DEC_HEADS kv heads, so that it streams each token's
 * K/V rows of all those heads in memory order. The blocking depends only on
 * a sequence's own shape, never on the thread count, so results are bitwise
 * reproducible and batch-invariant.
 */
#ifndef CPUATTN_FORWARD_H
#define CPUATTN_FORWARD_H
#include <stddef.h>
#include <stdint.h>
#include "engine.h"

typedef struct {
    cpa_rows q, k, v, out;
    cpa_rows lse;                   /* float32, or float64 for float64 input; data may be NULL */
    int32_t num_heads, num_kv_heads, head_dim_qk, head_dim_v;
    cpa_rows k_scale, v_scale;      /* float32 (int8, fp8) or float16 (int4); data NULL: none */
    int32_t q_dtype, k_dtype, v_dtype;   /* enum cpa_dtype (engine.h) */
    double scale, softcap;          /* softcap 0 = off */
    cpa_mask mask;
    /* per query head, or NULL: a sink logit joining each row's softmax
     * denominator with no value (gpt-oss), and an ALiBi slope: the score of
     * query position p and key j gets - slope * |p - j| after the softcap */
    const double *sinks, *alibi;
    int64_t num_seqs;
    const int64_t *q_start, *k_start, *q_len, *k_len;   /* per sequence */
    const int32_t *block_table;     /* NULL: dense */
    int64_t bt_stride, page_size;
    /* speculative-decoding tree masks, or NULL: query t of sequence b (of
     * n = q_len[b]) sees draft key i (the i-th of its last n keys) iff
     * tree[tree_start[b] + t * n + i]; keys before the draft as the mask says */
    const uint8_t *tree;
    const int64_t *tree_start;
} cpa_fwd_args;

/* Whether the tree mask hides key j from query t of sequence b. */
static inline int cpa_tree_hides(const cpa_fwd_args *a, int64_t b, int64_t t, int64_t j)
{
    const int64_t n = a->q_len[b], d0 = a->k_len[b] - n;
    return a->tree && j >= d0 && !a->tree[a->tree_start[b] + t * n + (j - d0)];
}

typedef struct {
    int64_t seq, slot;              /* slot: partial-result slot, -1 = write the output */
    int32_t kvh, nkvh, qblock;      /* kv heads [kvh, kvh + nkvh) */
    /* decode items of several sequences that read the same pages for the
     * same keys run as one (cpa_fwd_share): 1 = an item of its own; n > 1 =
     * this item and the n - 1 after it, run together by this one; 0 = run
     * by an earlier item (its kernel call does nothing) */
    int32_t nshare;
    int64_t key_lo, key_hi;         /* keys this item reads: [key_lo, key_hi] */
} cpa_fwd_item;

typedef struct {
    int64_t seq, slot0;
    int32_t kvh, nkvh, nsplit;
} cpa_fwd_merge;

/* Counts (items == NULL) or fills the work lists. Returns the item count;
 * *n_merges and *n_slots receive the merge count and partial-slot count. */
int64_t cpa_fwd_plan(const cpa_fwd_args *a, cpa_fwd_item *items, cpa_fwd_merge *merges,
                     int64_t *n_merges, int64_t *n_slots);
/* Shared-prefix decode: reorders a filled work list so that decode items of
 * different sequences reading the same physical pages (same kv heads, same
 * key range, the same page at every position of it) follow each other, and
 * marks them (nshare) to run as one item that reads those pages once for all
 * their query rows. Each row's arithmetic stays that of its own item, so
 * results are bitwise unchanged. *max_rows receives the most query rows (kv
 * heads x rows) of one decode item. Returns 0, or -1 when out of memory. */
int cpa_fwd_share(const cpa_fwd_args *a, cpa_fwd_item *items, int64_t n, int64_t *max_rows);
/* Whether any sequence runs the tiled kernel (else all run the decode one). */
int cpa_fwd_uses_tiled(const cpa_fwd_args *a);
/* Scratch bytes one thread needs (dec_rows: cpa_fwd_share's max_rows, or
 * 0), and bytes of one partial slot. */
size_t cpa_fwd_scratch_bytes(const cpa_fwd_args *a, int any_tiled, int64_t dec_rows);
size_t cpa_fwd_slot_bytes(const cpa_fwd_args *a);

typedef void (*cpa_fwd_item_fn)(const cpa_fwd_args *, const cpa_fwd_item *, char *scratch,
                                char *partials);
/* Kernel for this call's dtypes on SIMD path `isa` (or the path that fills
 * in for it); NULL if no kernel takes this dtype combination. */
cpa_fwd_item_fn cpa_fwd_kernel(const cpa_fwd_args *a, int isa);
void cpa_fwd_merge_one(const cpa_fwd_args *a, const cpa_fwd_merge *m, const char *partials,
                       char *scratch);  /* scratch: (nsplit + head_dim_v) doubles */

#endif
