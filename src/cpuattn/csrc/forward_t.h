/* What the storage layer (forward_kv.h) and the item kernels
 * (forward_items.h) of one (ISA, compute type T) share: the decode item's
 * state and the table of a storage type's functions. Included by
 * forward_isa.h after simd_t.h. */

/* One decode item (forward_items.h, decode): nh kv heads from kvh0, M query
 * rows each (row R = head-in-item * M + r; g * nq of sequence b, or of
 * several sequences reading the same pages: b's chain locates the rows),
 * keys k0 .. k0 + n - 1, of which [s0, s1) are seen by every row and
 * [lo[r], hi[r]] by row r, query token rtok[r] of sequence rseq[r]. */
typedef struct {
    const cpa_fwd_args *a;
    int64_t b, kvh0, nh, M, k0, n, s0, s1;
    int64_t qst, scs;            /* row strides of qs and sc */
    T *qs, *sc, *o;              /* pre-scaled q rows, scores, output rows */
    const void **row, **srow;    /* scratch: n row addresses, n scale-row addresses */
    const int64_t *lo, *hi, *rseq, *rtok;
} TN(dec);

enum { TN(DEC_TB) = VBYTES == 64 ? 4 : 2 };   /* key rows per block: what the registers hold */

/* A storage type's part of the kernels (forward_kv.h). */
typedef struct {
    void (*scores)(const TN(dec) *);     /* decode pass 1: Q K^T of the item */
    void (*values)(const TN(dec) *);     /* decode pass 2: P V of the item */
    /* a row (and its scales) as dequantised T: dst, or the row itself when
     * it is stored as T */
    const T *(*to_t)(const void *row, const void *scales, int64_t n, T *dst);
    int scale_bytes;                     /* bytes per scale, 0: no scales */
} TN(kv_ops);

#define KV_OPS(tag)                                                                   \
    {CPA_CAT4(dec_scores, ISA_TAG, TTAG, tag), CPA_CAT4(dec_values, ISA_TAG, TTAG, tag), \
     CPA_CAT4(to_t, ISA_TAG, TTAG, tag), CPA_CAT4(SCALE_BYTES, ISA_TAG, TTAG, tag)}
