/* cpuattn's worker pool (see workers.h).
 *
 * One word holds the job: (threads << 32) | items left to claim. A thread
 * claims an item with a compare-exchange that takes one from "left", and
 * only after that reads the job's function, context and item count: a
 * successful claim proves the job is running and the claimed item undone,
 * and the caller returns only when every item is done, so what a thread
 * reads after a claim belongs to the job it claimed from. A worker that
 * comes late (descheduled, or woken after the job ended) finds left == 0,
 * or claims from the job running then, with that job's thread count; it
 * never touches a finished job, and the caller never waits for a worker
 * that did not claim anything. Idle workers wait for the count of posted
 * jobs to change. */
#include "portable.h"   /* first: see there */
#include "workers.h"

#include <pthread.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static struct {
    alignas(64) _Atomic uint64_t job;  /* (threads << 32) | items left */
    alignas(64) _Atomic int64_t done;  /* items finished */
    alignas(64) _Atomic uint32_t posts; /* jobs posted so far */
    int64_t n_items;                   /* the job: written before it is posted */
    cpa_item_fn fn;
    void *ctx;
    _Atomic int workers;
    pthread_mutex_t busy;              /* held by the caller whose job runs */
    pthread_mutex_t lock;              /* for sleeping on the two conditions */
    pthread_cond_t posted, finished;
} P = {.busy = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER,
       .posted = PTHREAD_COND_INITIALIZER, .finished = PTHREAD_COND_INITIALIZER};

static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;

/* ---- per-thread scratch ---- */

typedef struct {
    void *raw;
    size_t bytes;
} scratch_block;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok;

static void scratch_free(void *p)
{
    scratch_block *b = p;
    free(b->raw);
    free(b);
}

static void scratch_key_init(void)
{
    scratch_key_ok = pthread_key_create(&scratch_key, scratch_free) == 0;
}

static char *aligned64(void *raw)
{
    return (char *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
}

char *cpa_thread_scratch(size_t bytes, void **owned)
{
    *owned = NULL;
    pthread_once(&scratch_once, scratch_key_init);
    scratch_block *b = scratch_key_ok ? pthread_getspecific(scratch_key) : NULL;
    if (bytes > CPA_SCRATCH_KEEP || !scratch_key_ok) {
        *owned = malloc(bytes + 64);
        return *owned ? aligned64(*owned) : NULL;
    }
    if (!b) {
        if (!(b = calloc(1, sizeof(*b))))
            return NULL;
        if (pthread_setspecific(scratch_key, b) != 0) {
            free(b);
            *owned = malloc(bytes + 64);
            return *owned ? aligned64(*owned) : NULL;
        }
    }
    if (b->bytes < bytes) {
        size_t want = bytes < 4096 ? 4096 : bytes;
        void *raw = malloc(want + 64);
        if (!raw)
            return NULL;
        free(b->raw);
        b->raw = raw;
        b->bytes = want;
    }
    return aligned64(b->raw);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int posted_since(const void *seen)
{
    return atomic_load_explicit(&P.posts, memory_order_acquire) != *(const uint32_t *)seen;
}

static int all_done(const void *n)
{
    return atomic_load_explicit(&P.done, memory_order_acquire) == *(const int64_t *)n;
}

/* Wait until ready(arg) without sleeping, for at most CPA_YIELD_US (see
 * workers.h): pauses until CPA_SPIN_US, then a sched_yield after every 32
 * looks; returns whether it got ready. The clock is read every 32 pauses:
 * a call costs about as much as they do. */
static int spin_until(int (*ready)(const void *), const void *arg)
{
    const int64_t start = now_ns();
    for (;;) {
        for (int i = 0; i < 32; i++) {
            if (ready(arg))
                return 1;
            cpu_relax();
        }
        const int64_t waited = now_ns() - start;
        if (waited > CPA_YIELD_US * 1000)
            return 0;
        if (waited > CPA_SPIN_US * 1000)
            sched_yield();
    }
}

/* Claim and run items of the posted job while there are any this thread may
 * take (tid below the job's thread count). */
static void run_items(int tid)
{
    uint64_t w = atomic_load_explicit(&P.job, memory_order_acquire);
    for (;;) {
        uint32_t left = (uint32_t)w;
        if (left == 0 || tid >= (int)(w >> 32))
            return;
        if (!atomic_compare_exchange_weak_explicit(&P.job, &w, w - 1, memory_order_acquire,
                                                   memory_order_acquire))
            continue;
        int64_t n = P.n_items;
        P.fn(P.ctx, n - left, tid);
        if (atomic_fetch_add_explicit(&P.done, 1, memory_order_acq_rel) + 1 == n) {
            /* under the lock: a caller between its last check and its wait
             * holds it, so the signal cannot fall between them */
            pthread_mutex_lock(&P.lock);
            pthread_cond_signal(&P.finished);
            pthread_mutex_unlock(&P.lock);
        }
        w = atomic_load_explicit(&P.job, memory_order_acquire);
    }
}

static void *worker_main(void *arg)
{
    int tid = (int)(intptr_t)arg;
    for (;;) {
        /* read before looking for items: a job posted after this is seen */
        uint32_t seen = atomic_load_explicit(&P.posts, memory_order_acquire);
        run_items(tid);
        if (spin_until(posted_since, &seen))
            continue;
        pthread_mutex_lock(&P.lock);
        while (!posted_since(&seen))
            pthread_cond_wait(&P.posted, &P.lock);
        pthread_mutex_unlock(&P.lock);
    }
    return NULL;
}

/* Workers do not survive fork(): the child starts with none, and with fresh
 * locks, which a parent thread may have held at the fork. */
static void reset_in_child(void)
{
    atomic_store(&P.job, 0);
    atomic_store(&P.workers, 0);
    pthread_mutex_init(&P.busy, NULL);
    pthread_mutex_init(&P.lock, NULL);
    pthread_cond_init(&P.posted, NULL);
    pthread_cond_init(&P.finished, NULL);
}

static void install_fork_handler(void)
{
    pthread_atfork(NULL, NULL, reset_in_child);
}

/* Grow the pool to nthreads - 1 workers (caller holds busy); returns the
 * threads a job can have: fewer when a thread cannot be created. */
static int grow(int nthreads)
{
    int have = atomic_load(&P.workers);
    while (have < nthreads - 1) {
        /* workers block every signal: they belong to the threads that run Python */
        cpa_sigmask old;
        pthread_t t;
        cpa_block_signals(&old);
        int rc = pthread_create(&t, NULL, worker_main, (void *)(intptr_t)(have + 1));
        cpa_restore_signals(&old);
        if (rc != 0)
            break;
        pthread_detach(t);
        atomic_store(&P.workers, ++have);
    }
    return have + 1 < nthreads ? have + 1 : nthreads;
}

void cpa_parallel_for(int nthreads, int64_t n_items, cpa_item_fn fn, void *ctx)
{
    if (nthreads > n_items)
        nthreads = (int)n_items;
    if (nthreads <= 1 || n_items > UINT32_MAX || pthread_mutex_trylock(&P.busy) != 0) {
        for (int64_t i = 0; i < n_items; i++)
            fn(ctx, i, 0);
        return;
    }
    pthread_once(&fork_handler_once, install_fork_handler);
    nthreads = grow(nthreads);
    P.n_items = n_items;
    P.fn = fn;
    P.ctx = ctx;
    atomic_store_explicit(&P.done, 0, memory_order_relaxed);
    atomic_store_explicit(&P.job, (uint64_t)nthreads << 32 | (uint64_t)n_items,
                          memory_order_release);
    atomic_fetch_add_explicit(&P.posts, 1, memory_order_release);
    pthread_mutex_lock(&P.lock);   /* see run_items: no worker misses the post */
    pthread_cond_broadcast(&P.posted);
    pthread_mutex_unlock(&P.lock);

    run_items(0);
    if (!spin_until(all_done, &n_items)) {
        pthread_mutex_lock(&P.lock);
        while (!all_done(&n_items))
            pthread_cond_wait(&P.finished, &P.lock);
        pthread_mutex_unlock(&P.lock);
    }
    pthread_mutex_unlock(&P.busy);
}

int cpa_workers_count(void)
{
    return atomic_load(&P.workers);
}
