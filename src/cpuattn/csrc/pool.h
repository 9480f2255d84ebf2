/* Paged KV page pool: page storage, free list, reference counts and
 * per-sequence page chains, all in C memory guarded by one mutex.
 *
 * Every function takes the lock itself, never needs the GIL (callers release
 * it) and reports failure as a status code: the Cython layer turns codes into
 * exceptions. A failed call changes nothing.
 *
 * K and V each are one 64-byte aligned block of shape
 * (num_layers, num_pages, page_size, num_kv_heads, head_dim) in the pool
 * dtype; a "row" is one token's (num_kv_heads, head_dim) slice of one layer.
 * All layers share the free list and the chains: page g of every layer
 * belongs to the same sequence. Sequence ids index `seqs` and are never
 * reused, so a stale id is always detected. A slot is page * page_size +
 * offset, the address of one token's row in every layer. */
#ifndef CPUATTN_POOL_H
#define CPUATTN_POOL_H
#include <stddef.h>
#include <stdint.h>

#ifdef _WIN32
#include <windows.h>
typedef SRWLOCK cpa_mutex;
#else
#include <pthread.h>
typedef pthread_mutex_t cpa_mutex;
#endif

enum {
    CPA_POOL_OK = 0,
    CPA_POOL_EUNKNOWN = 1,  /* sequence id never created */
    CPA_POOL_EFREED = 2,    /* sequence id already freed */
    CPA_POOL_EFULL = 3,     /* not enough free pages */
    CPA_POOL_ENOMEM = 4,    /* malloc failed (metadata) */
    CPA_POOL_ELEN = 5,      /* truncate past the end */
    CPA_POOL_ETOOLONG = 6,  /* sequence would exceed INT32_MAX tokens */
    CPA_POOL_ERETRY = 7,    /* output buffer too small: size reported, call again */
    CPA_POOL_ESLOT = 8,     /* a slot past the pool's storage */
    CPA_POOL_EFREESLOT = 9, /* a slot in a page that no sequence or plan holds */
};

typedef struct {
    int32_t *pages;   /* page chain, `npages` used of `cap` */
    int64_t len;      /* tokens; -1 once freed */
    int32_t npages, cap;
} cpa_seq;

/* The storage planes of a pool, each (num_layers, num_pages, page_size, row) bytes:
 * K and V rows, and the scales of low-bit K and V rows (absent, row 0
 * bytes, for float storage). Every page operation moves all planes. */
enum { CPA_PLANE_K, CPA_PLANE_V, CPA_PLANE_KS, CPA_PLANE_VS, CPA_PLANES };

typedef struct {
    int64_t num_pages, page_size, num_layers;
    int64_t row_bytes[CPA_PLANES], page_bytes[CPA_PLANES], layer_bytes[CPA_PLANES];
    char *plane[CPA_PLANES];      /* aligned storage, NULL for an absent plane */
    void *plane_raw[CPA_PLANES];  /* what to free() */
    int32_t *free_stack;      /* free page ids; top at num_free - 1 */
    int64_t num_free;
    int32_t *refcount;        /* chain references + pins */
    int32_t *pins;            /* pins alone (attention calls in flight) */
    cpa_seq *seqs;
    int64_t num_seqs, seq_cap, num_alive;
    cpa_mutex lock;
} cpa_pool;

/* A pool of num_pages pages of page_size tokens in num_layers layers;
 * row_bytes: one token's bytes in each plane (all heads, one layer), 0 for
 * an absent plane. */
cpa_pool *cpa_pool_new(int64_t num_pages, int64_t page_size, int64_t num_layers,
                       const int64_t row_bytes[CPA_PLANES]);
void cpa_pool_destroy(cpa_pool *p);

int64_t cpa_pool_num_free(cpa_pool *p);
int64_t cpa_pool_num_alive(cpa_pool *p);
int cpa_pool_create_seq(cpa_pool *p, int64_t *seq_out);
int cpa_pool_seq_len(cpa_pool *p, int64_t seq, int64_t *len_out);
/* Append n rows from contiguous buffers, one per plane, each (num_layers,
 * n, row) (the pool's bytes; NULL for an absent plane). On CPA_POOL_EFULL,
 * *need_out is the number of free pages the call needed. */
int cpa_pool_append(cpa_pool *p, int64_t seq, const char *const rows[CPA_PLANES], int64_t n,
                    int64_t *need_out);
/* Grow the sequence by n tokens without writing them (append's pages and
 * copy-on-write, all-or-nothing) and store their slots in slots[n]. */
int cpa_pool_reserve(cpa_pool *p, int64_t seq, int64_t n, int64_t *slots, int64_t *need_out);
/* Store n rows of one layer (buffers (n, row) per plane) at the given
 * slots; a negative slot is skipped. Every slot is checked first: on
 * CPA_POOL_ESLOT / CPA_POOL_EFREESLOT nothing is written and *bad_out is
 * the index of the first bad slot. */
int cpa_pool_write(cpa_pool *p, int64_t layer, const int64_t *slots, int64_t n,
                   const char *const rows[CPA_PLANES], int64_t *bad_out);
int cpa_pool_fork(cpa_pool *p, int64_t seq, int64_t *seq_out);
int cpa_pool_truncate(cpa_pool *p, int64_t seq, int64_t length, int64_t *len_out);
int cpa_pool_free_seq(cpa_pool *p, int64_t seq);
/* Copy the chain into out[cap]; CPA_POOL_ERETRY if cap < *npages_out. */
int cpa_pool_pages(cpa_pool *p, int64_t seq, int32_t *out, int64_t cap, int64_t *npages_out);
/* Copy the sequence's rows of one layer into one buffer per plane (room
 * for cap rows); CPA_POOL_ERETRY if cap < *len_out. */
int cpa_pool_gather(cpa_pool *p, int64_t seq, int64_t layer, char *const out[CPA_PLANES],
                    int64_t cap, int64_t *len_out);
/* Fill table (n x width, unused slots -1) and lens for the listed sequences;
 * CPA_POOL_ERETRY if width < *width_out (= max(1, longest chain)). With pin,
 * every page the table references gets refcount++ in the same critical
 * section, so it cannot be reused until cpa_pool_unpin. On a bad id,
 * *bad_out is that id and nothing is pinned. */
int cpa_pool_block_table(cpa_pool *p, const int64_t *seqs, int64_t n, int pin, int32_t *table,
                         int64_t width, int32_t *lens, int64_t *width_out, int64_t *bad_out);
void cpa_pool_unpin(cpa_pool *p, const int32_t *table, int64_t n, int64_t width,
                    const int32_t *lens);
/* Copy the reference counts (num_pages entries) into out. */
void cpa_pool_refcounts(cpa_pool *p, int32_t *out);
/* 0 if every invariant holds, else nonzero with a message in msg. */
int cpa_pool_check(cpa_pool *p, char *msg, size_t msg_len);

/* fork(): take the lock before, release it in the parent after, and
 * re-initialise it in the child (whose other threads are gone), so that a
 * fork while another thread is inside a pool call cannot leave the child's
 * copy locked forever. */
void cpa_pool_fork_prepare(cpa_pool *p);
void cpa_pool_fork_parent(cpa_pool *p);
void cpa_pool_fork_child(cpa_pool *p);

#endif
