/* Paged KV page pool (see pool.h). */
#include "pool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef _WIN32
#define LOCK_INIT(m) InitializeSRWLock(m)
#define LOCK(m) AcquireSRWLockExclusive(m)
#define UNLOCK(m) ReleaseSRWLockExclusive(m)
#define LOCK_DESTROY(m) ((void)0)
#else
#define LOCK_INIT(m) pthread_mutex_init(m, NULL)
#define LOCK(m) pthread_mutex_lock(m)
#define UNLOCK(m) pthread_mutex_unlock(m)
#define LOCK_DESTROY(m) pthread_mutex_destroy(m)
#endif

/* calloc + manual alignment rather than aligned_alloc: for large blocks
 * calloc maps fresh zero pages lazily, so a big pool costs no time or
 * resident memory until it is written, and stale-slot reads see zeros.
 * Decode reads pages scattered over the whole pool: ask for transparent
 * huge pages (as numpy does for large arrays) so that each page of the
 * chain does not also cost a TLB miss. */
static char *alloc_aligned(size_t bytes, void **raw)
{
    *raw = calloc(1, bytes + 64);
    if (!*raw)
        return NULL;
    char *p = (char *)(((uintptr_t)*raw + 63) & ~(uintptr_t)63);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t os_page = 4096, lo = ((uintptr_t)p + os_page - 1) & ~(os_page - 1);
    const uintptr_t hi = ((uintptr_t)p + bytes) & ~(os_page - 1);
    if (bytes >= ((size_t)4 << 20) && hi > lo)
        madvise((void *)lo, hi - lo, MADV_HUGEPAGE);   /* advice only: failure is harmless */
#endif
    return p;
}

cpa_pool *cpa_pool_new(int64_t num_pages, int64_t page_size, int64_t num_layers,
                       const int64_t row_bytes[CPA_PLANES])
{
    cpa_pool *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    LOCK_INIT(&p->lock);
    p->num_pages = num_pages;
    p->page_size = page_size;
    p->num_layers = num_layers;
    int ok = 1;
    for (int i = 0; i < CPA_PLANES; i++) {
        p->row_bytes[i] = row_bytes[i];
        p->page_bytes[i] = page_size * row_bytes[i];
        p->layer_bytes[i] = num_pages * p->page_bytes[i];
        if (row_bytes[i] > 0) {
            p->plane[i] = alloc_aligned((size_t)num_layers * (size_t)p->layer_bytes[i],
                                        &p->plane_raw[i]);
            ok &= p->plane[i] != NULL;
        }
    }
    p->free_stack = malloc((size_t)num_pages * sizeof(int32_t));
    p->refcount = calloc((size_t)num_pages, sizeof(int32_t));
    p->pins = calloc((size_t)num_pages, sizeof(int32_t));
    if (!ok || !p->free_stack || !p->refcount || !p->pins) {
        cpa_pool_destroy(p);
        return NULL;
    }
    /* Stack top is page 0, so a fresh pool hands out pages in order. */
    for (int64_t i = 0; i < num_pages; i++)
        p->free_stack[i] = (int32_t)(num_pages - 1 - i);
    p->num_free = num_pages;
    return p;
}

void cpa_pool_destroy(cpa_pool *p)
{
    if (!p)
        return;
    for (int64_t i = 0; i < p->num_seqs; i++)
        free(p->seqs[i].pages);
    free(p->seqs);
    for (int i = 0; i < CPA_PLANES; i++)
        free(p->plane_raw[i]);
    free(p->free_stack);
    free(p->refcount);
    free(p->pins);
    LOCK_DESTROY(&p->lock);
    free(p);
}

void cpa_pool_fork_prepare(cpa_pool *p)
{
    LOCK(&p->lock);
}

void cpa_pool_fork_parent(cpa_pool *p)
{
    UNLOCK(&p->lock);
}

void cpa_pool_fork_child(cpa_pool *p)
{
    LOCK_INIT(&p->lock);
}

/* ---- helpers: all called with the lock held ---- */

static int lookup(cpa_pool *p, int64_t seq, cpa_seq **out)
{
    if (seq < 0 || seq >= p->num_seqs)
        return CPA_POOL_EUNKNOWN;
    if (p->seqs[seq].len < 0)
        return CPA_POOL_EFREED;
    *out = &p->seqs[seq];
    return CPA_POOL_OK;
}

static int64_t pages_for(cpa_pool *p, int64_t len)
{
    return (len + p->page_size - 1) / p->page_size;
}

static int32_t take_page(cpa_pool *p)
{
    int32_t pg = p->free_stack[--p->num_free];
    p->refcount[pg] = 1;
    return pg;
}

static void release_page(cpa_pool *p, int32_t pg)
{
    if (--p->refcount[pg] == 0)
        p->free_stack[p->num_free++] = pg;
}

static int reserve_chain(cpa_seq *s, int64_t npages)
{
    if (npages <= s->cap)
        return CPA_POOL_OK;
    int64_t cap = s->cap ? 2 * (int64_t)s->cap : 4;
    if (cap < npages)
        cap = npages;
    if (cap > INT32_MAX)
        cap = INT32_MAX;
    int32_t *pages = realloc(s->pages, (size_t)cap * sizeof(int32_t));
    if (!pages)
        return CPA_POOL_ENOMEM;
    s->pages = pages;
    s->cap = (int32_t)cap;
    return CPA_POOL_OK;
}

static int new_seq(cpa_pool *p, int64_t *seq_out)
{
    if (p->num_seqs == p->seq_cap) {
        int64_t cap = p->seq_cap ? 2 * p->seq_cap : 16;
        cpa_seq *seqs = realloc(p->seqs, (size_t)cap * sizeof(cpa_seq));
        if (!seqs)
            return CPA_POOL_ENOMEM;
        p->seqs = seqs;
        p->seq_cap = cap;
    }
    memset(&p->seqs[p->num_seqs], 0, sizeof(cpa_seq));
    *seq_out = p->num_seqs++;
    p->num_alive++;
    return CPA_POOL_OK;
}

/* Row `slot` of page `page` in one layer of plane i. */
static char *row_at(cpa_pool *p, int i, int64_t layer, int64_t page, int64_t slot)
{
    return p->plane[i] + layer * p->layer_bytes[i] + page * p->page_bytes[i] +
           slot * p->row_bytes[i];
}

/* Copy n rows of layers [l0, l1) between a sequence's pages (starting at
 * token `pos`) and one contiguous buffer per plane, (l1 - l0, n, row);
 * to_pages picks the direction. memmove: the caller may pass a view of the
 * pool's own storage. */
static void copy_rows(cpa_pool *p, const cpa_seq *s, int64_t pos, int64_t n, int64_t l0,
                      int64_t l1, char *const buf[CPA_PLANES], int to_pages)
{
    for (int i = 0; i < CPA_PLANES; i++) {
        if (!p->plane[i])
            continue;
        char *b = buf[i];
        for (int64_t layer = l0; layer < l1; layer++)
            for (int64_t at = pos, left = n; left > 0;) {
                int64_t slot = at % p->page_size, cnt = p->page_size - slot;
                if (cnt > left)
                    cnt = left;
                char *pg = row_at(p, i, layer, s->pages[at / p->page_size], slot);
                size_t bytes = (size_t)(cnt * p->row_bytes[i]);
                if (to_pages)
                    memmove(pg, b, bytes);
                else
                    memcpy(b, pg, bytes);
                b += bytes;
                at += cnt;
                left -= cnt;
            }
    }
}

/* Grow sequence s by n tokens: the pages they need, and a copy of a shared
 * partial last page first (copy-on-write: another chain or a pin reads
 * it), its first rows in every layer and plane. All-or-nothing. */
static int grow(cpa_pool *p, cpa_seq *s, int64_t n, int64_t *need_out)
{
    int64_t len = s->len;
    if (n > INT32_MAX - len)
        return CPA_POOL_ETOOLONG;
    int64_t total = pages_for(p, len + n);
    int cow = (len % p->page_size) != 0 && p->refcount[s->pages[s->npages - 1]] > 1;
    int64_t need = total - s->npages + cow;
    if (need > p->num_free) {
        *need_out = need;
        return CPA_POOL_EFULL;
    }
    /* The only allocation, done before any page moves. */
    int rc = reserve_chain(s, total);
    if (rc != CPA_POOL_OK)
        return rc;
    if (cow) {
        int32_t old = s->pages[s->npages - 1], pg = take_page(p);
        for (int i = 0; i < CPA_PLANES; i++)
            for (int64_t layer = 0; p->plane[i] && layer < p->num_layers; layer++)
                memcpy(row_at(p, i, layer, pg, 0), row_at(p, i, layer, old, 0),
                       (size_t)((len % p->page_size) * p->row_bytes[i]));
        release_page(p, old);
        s->pages[s->npages - 1] = pg;
    }
    while (s->npages < total)
        s->pages[s->npages++] = take_page(p);
    s->len = len + n;
    return CPA_POOL_OK;
}

/* ---- public functions ---- */

int64_t cpa_pool_num_free(cpa_pool *p)
{
    LOCK(&p->lock);
    int64_t n = p->num_free;
    UNLOCK(&p->lock);
    return n;
}

int64_t cpa_pool_num_alive(cpa_pool *p)
{
    LOCK(&p->lock);
    int64_t n = p->num_alive;
    UNLOCK(&p->lock);
    return n;
}

int cpa_pool_create_seq(cpa_pool *p, int64_t *seq_out)
{
    LOCK(&p->lock);
    int rc = new_seq(p, seq_out);
    UNLOCK(&p->lock);
    return rc;
}

int cpa_pool_seq_len(cpa_pool *p, int64_t seq, int64_t *len_out)
{
    cpa_seq *s;
    LOCK(&p->lock);
    int rc = lookup(p, seq, &s);
    if (rc == CPA_POOL_OK)
        *len_out = s->len;
    UNLOCK(&p->lock);
    return rc;
}

/* Grow sequence seq by n tokens under the lock, then store their rows
 * (append) or their slots (reserve). */
static int extend(cpa_pool *p, int64_t seq, int64_t n, const char *const rows[CPA_PLANES],
                  int64_t *slots, int64_t *need_out)
{
    cpa_seq *s;
    LOCK(&p->lock);
    int rc = lookup(p, seq, &s);
    const int64_t len = rc == CPA_POOL_OK ? s->len : 0;
    if (rc == CPA_POOL_OK && n > 0 && (rc = grow(p, s, n, need_out)) == CPA_POOL_OK) {
        if (rows)
            copy_rows(p, s, len, n, 0, p->num_layers, (char *const *)rows, 1);
        for (int64_t i = 0; slots && i < n; i++)
            slots[i] = (int64_t)s->pages[(len + i) / p->page_size] * p->page_size +
                       (len + i) % p->page_size;
    }
    UNLOCK(&p->lock);
    return rc;
}

int cpa_pool_append(cpa_pool *p, int64_t seq, const char *const rows[CPA_PLANES], int64_t n,
                    int64_t *need_out)
{
    return extend(p, seq, n, rows, NULL, need_out);
}

int cpa_pool_reserve(cpa_pool *p, int64_t seq, int64_t n, int64_t *slots, int64_t *need_out)
{
    return extend(p, seq, n, NULL, slots, need_out);
}

int cpa_pool_write(cpa_pool *p, int64_t layer, const int64_t *slots, int64_t n,
                   const char *const rows[CPA_PLANES], int64_t *bad_out)
{
    int rc = CPA_POOL_OK;
    LOCK(&p->lock);
    for (int64_t i = 0; i < n && rc == CPA_POOL_OK; i++) {
        if (slots[i] < 0)
            continue;
        if (slots[i] >= p->num_pages * p->page_size)
            rc = CPA_POOL_ESLOT;
        else if (p->refcount[slots[i] / p->page_size] == 0)
            rc = CPA_POOL_EFREESLOT;
        if (rc != CPA_POOL_OK)
            *bad_out = i;
    }
    for (int64_t i = 0; i < n && rc == CPA_POOL_OK; i++) {
        if (slots[i] < 0)
            continue;
        for (int j = 0; j < CPA_PLANES; j++)
            if (p->plane[j])
                memcpy(row_at(p, j, layer, slots[i] / p->page_size, slots[i] % p->page_size),
                       rows[j] + i * p->row_bytes[j], (size_t)p->row_bytes[j]);
    }
    UNLOCK(&p->lock);
    return rc;
}

int cpa_pool_fork(cpa_pool *p, int64_t seq, int64_t *seq_out)
{
    cpa_seq *s;
    int64_t id;
    LOCK(&p->lock);
    int rc = lookup(p, seq, &s);
    if (rc == CPA_POOL_OK)
        rc = new_seq(p, &id);  /* may move p->seqs: look s up again */
    if (rc == CPA_POOL_OK) {
        s = &p->seqs[seq];
        cpa_seq *f = &p->seqs[id];
        if ((rc = reserve_chain(f, s->npages)) != CPA_POOL_OK) {
            p->num_seqs--;  /* undo new_seq: the id was never handed out */
            p->num_alive--;
        } else {
            if (s->npages)  /* an empty chain may be NULL: memcpy(NULL, ...) is UB */
                memcpy(f->pages, s->pages, (size_t)s->npages * sizeof(int32_t));
            f->npages = s->npages;
            f->len = s->len;
            for (int32_t i = 0; i < s->npages; i++)
                p->refcount[s->pages[i]]++;
            *seq_out = id;
        }
    }
    UNLOCK(&p->lock);
    return rc;
}

int cpa_pool_truncate(cpa_pool *p, int64_t seq, int64_t length, int64_t *len_out)
{
    cpa_seq *s;
    LOCK(&p->lock);
    int rc = lookup(p, seq, &s);
    if (rc == CPA_POOL_OK) {
        *len_out = s->len;
        if (length < 0 || length > s->len) {
            rc = CPA_POOL_ELEN;
        } else {
            int64_t keep = pages_for(p, length);
            while (s->npages > keep)
                release_page(p, s->pages[--s->npages]);
            s->len = length;
        }
    }
    UNLOCK(&p->lock);
    return rc;
}

int cpa_pool_free_seq(cpa_pool *p, int64_t seq)
{
    cpa_seq *s;
    LOCK(&p->lock);
    int rc = lookup(p, seq, &s);
    if (rc == CPA_POOL_OK) {
        while (s->npages > 0)
            release_page(p, s->pages[--s->npages]);
        free(s->pages);
        s->pages = NULL;
        s->cap = 0;
        s->len = -1;
        p->num_alive--;
    }
    UNLOCK(&p->lock);
    return rc;
}

int cpa_pool_pages(cpa_pool *p, int64_t seq, int32_t *out, int64_t cap, int64_t *npages_out)
{
    cpa_seq *s;
    LOCK(&p->lock);
    int rc = lookup(p, seq, &s);
    if (rc == CPA_POOL_OK) {
        *npages_out = s->npages;
        if (cap < s->npages)
            rc = CPA_POOL_ERETRY;
        else if (s->npages)
            memcpy(out, s->pages, (size_t)s->npages * sizeof(int32_t));
    }
    UNLOCK(&p->lock);
    return rc;
}

int cpa_pool_gather(cpa_pool *p, int64_t seq, int64_t layer, char *const out[CPA_PLANES],
                    int64_t cap, int64_t *len_out)
{
    cpa_seq *s;
    LOCK(&p->lock);
    int rc = lookup(p, seq, &s);
    if (rc == CPA_POOL_OK) {
        *len_out = s->len;
        if (cap < s->len)
            rc = CPA_POOL_ERETRY;
        else
            copy_rows(p, s, 0, s->len, layer, layer + 1, out, 0);
    }
    UNLOCK(&p->lock);
    return rc;
}

int cpa_pool_block_table(cpa_pool *p, const int64_t *seqs, int64_t n, int pin, int32_t *table,
                         int64_t width, int32_t *lens, int64_t *width_out, int64_t *bad_out)
{
    cpa_seq *s;
    int rc = CPA_POOL_OK;
    int64_t need = 1;
    LOCK(&p->lock);
    for (int64_t i = 0; i < n; i++) {
        if ((rc = lookup(p, seqs[i], &s)) != CPA_POOL_OK) {
            *bad_out = seqs[i];
            goto out;
        }
        if (s->npages > need)
            need = s->npages;
    }
    *width_out = need;
    if (width < need) {
        rc = CPA_POOL_ERETRY;
        goto out;
    }
    for (int64_t i = 0; i < n; i++) {
        s = &p->seqs[seqs[i]];
        int32_t *row = table + i * width;
        if (s->npages)
            memcpy(row, s->pages, (size_t)s->npages * sizeof(int32_t));
        for (int64_t j = s->npages; j < width; j++)
            row[j] = -1;
        lens[i] = (int32_t)s->len;
        if (pin)
            for (int32_t j = 0; j < s->npages; j++) {
                p->refcount[row[j]]++;
                p->pins[row[j]]++;
            }
    }
out:
    UNLOCK(&p->lock);
    return rc;
}

void cpa_pool_unpin(cpa_pool *p, const int32_t *table, int64_t n, int64_t width,
                    const int32_t *lens)
{
    LOCK(&p->lock);
    for (int64_t i = 0; i < n; i++) {
        int64_t np = pages_for(p, lens[i]);
        for (int64_t j = 0; j < np; j++) {
            int32_t pg = table[i * width + j];
            p->pins[pg]--;
            release_page(p, pg);
        }
    }
    UNLOCK(&p->lock);
}

void cpa_pool_refcounts(cpa_pool *p, int32_t *out)
{
    LOCK(&p->lock);
    memcpy(out, p->refcount, (size_t)p->num_pages * sizeof(int32_t));
    UNLOCK(&p->lock);
}

#define FAIL(...) do { snprintf(msg, msg_len, __VA_ARGS__); rc = 1; goto out; } while (0)

int cpa_pool_check(cpa_pool *p, char *msg, size_t msg_len)
{
    int rc = 0;
    int64_t alive = 0, used = 0;
    int64_t *refs = calloc((size_t)p->num_pages, sizeof(int64_t));
    char *on_free = calloc((size_t)p->num_pages, 1);
    LOCK(&p->lock);
    if (!refs || !on_free)
        FAIL("cannot allocate check buffers");
    for (int64_t id = 0; id < p->num_seqs; id++) {
        cpa_seq *s = &p->seqs[id];
        if (s->len < 0) {
            if (s->npages || s->pages)
                FAIL("freed sequence %lld still has pages", (long long)id);
            continue;
        }
        alive++;
        if (s->npages != pages_for(p, s->len) || s->npages > s->cap)
            FAIL("sequence %lld: len %lld needs %lld pages, chain has %d (cap %d)", (long long)id,
                 (long long)s->len, (long long)pages_for(p, s->len), s->npages, s->cap);
        for (int32_t j = 0; j < s->npages; j++) {
            int32_t pg = s->pages[j];
            if (pg < 0 || pg >= p->num_pages)
                FAIL("sequence %lld: page id %d out of range", (long long)id, pg);
            refs[pg]++;
        }
    }
    if (alive != p->num_alive)
        FAIL("num_alive is %lld, counted %lld", (long long)p->num_alive, (long long)alive);
    if (p->num_free < 0 || p->num_free > p->num_pages)
        FAIL("num_free %lld out of range", (long long)p->num_free);
    for (int64_t i = 0; i < p->num_free; i++) {
        int32_t pg = p->free_stack[i];
        if (pg < 0 || pg >= p->num_pages)
            FAIL("free list entry %d out of range", pg);
        if (on_free[pg]++)
            FAIL("page %d is on the free list twice", pg);
        if (p->refcount[pg] != 0)
            FAIL("free page %d has refcount %d", pg, p->refcount[pg]);
    }
    for (int64_t pg = 0; pg < p->num_pages; pg++) {
        if (p->pins[pg] < 0)
            FAIL("page %lld has %d pins", (long long)pg, p->pins[pg]);
        if (p->refcount[pg] != refs[pg] + p->pins[pg])
            FAIL("page %lld: refcount %d, but %lld chain references + %d pins", (long long)pg,
                 p->refcount[pg], (long long)refs[pg], p->pins[pg]);
        if (p->refcount[pg] > 0)
            used++;
        else if (!on_free[pg])
            FAIL("page %lld is unreferenced but not on the free list", (long long)pg);
    }
    if (used + p->num_free != p->num_pages)
        FAIL("%lld referenced + %lld free pages != %lld", (long long)used,
             (long long)p->num_free, (long long)p->num_pages);
out:
    UNLOCK(&p->lock);
    free(refs);
    free(on_free);
    return rc;
}
