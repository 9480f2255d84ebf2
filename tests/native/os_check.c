/* Native check of the OS-facing C code without Python: the worker pool
 * (workers.c: threads, per-thread scratch, a second caller while the pool is
 * busy), the page pool (pool.c: its lock, hammered from several threads) and
 * the thread limit of a build without OpenMP (platform.c).
 * tests/native/attn_check.c checks the kernels; this checks what differs
 * between operating systems (see csrc/portable.h), so it is run where the
 * OS differs: on the host by tests/test_native.py and under wine by
 * tools/check_windows.sh. Exit status 0 = all passed.
 *
 *   cc -O2 -std=gnu11 -pthread -Isrc/cpuattn/csrc tests/native/os_check.c \
 *      src/cpuattn/csrc/workers.c src/cpuattn/csrc/pool.c \
 *      src/cpuattn/csrc/platform.c
 */
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "platform.h"
#include "pool.h"
#include "workers.h"

static _Atomic int fails, checks;   /* CHECK runs on several threads */

#define CHECK(cond, ...)                    \
    do {                                    \
        checks++;                           \
        if (!(cond)) {                      \
            printf("FAIL %s:%d ", __FILE__, __LINE__); \
            printf(__VA_ARGS__);            \
            printf("\n");                   \
            fails++;                        \
        }                                   \
    } while (0)

/* ---- workers ---- */

typedef struct {
    int64_t *out;
    _Atomic int64_t sum;
    _Atomic int max_tid, bad_scratch;
    int nthreads;
} job;

static void item(void *ctx, int64_t i, int tid)
{
    job *j = ctx;
    void *owned;
    /* every thread's kept scratch, and once in a while a large one it owns */
    size_t bytes = (i % 97 == 0) ? CPA_SCRATCH_KEEP + 1 : 4096 + (size_t)(i % 5) * 1000;
    char *s = cpa_thread_scratch(bytes, &owned);
    if (!s || ((uintptr_t)s & 63) != 0)
        atomic_fetch_add(&j->bad_scratch, 1);
    else {
        s[0] = (char)i;
        s[bytes - 1] = (char)tid;
    }
    free(owned);
    j->out[i] = 3 * i + 1;
    atomic_fetch_add(&j->sum, i);
    int m = atomic_load(&j->max_tid);
    while (tid > m && !atomic_compare_exchange_weak(&j->max_tid, &m, tid)) {
    }
}

/* Run one job of n items on nthreads threads and check every item ran once. */
static void run_job(int nthreads, int64_t n, const char *who)
{
    static _Thread_local int64_t out[5000];
    job j = {.out = out, .nthreads = nthreads};
    memset(out, 0, sizeof out);
    cpa_parallel_for(nthreads, n, item, &j);
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++)
        bad += out[i] != 3 * i + 1;
    CHECK(bad == 0, "%s: %lld of %lld items not run once", who, (long long)bad, (long long)n);
    CHECK(atomic_load(&j.sum) == n * (n - 1) / 2, "%s: item sum %lld", who,
          (long long)atomic_load(&j.sum));
    CHECK(atomic_load(&j.max_tid) < nthreads, "%s: tid %d of %d threads", who,
          atomic_load(&j.max_tid), nthreads);
    CHECK(atomic_load(&j.bad_scratch) == 0, "%s: %d scratch blocks NULL or unaligned", who,
          atomic_load(&j.bad_scratch));
}

static void *second_caller(void *arg)
{
    (void)arg;
    for (int r = 0; r < 200; r++)
        run_job(4, 1 + r * 13 % 3000, "second caller");
    return NULL;
}

static void check_workers(void)
{
    for (int nt = 1; nt <= 8; nt++)
        for (int64_t n = 0; n <= 4000; n += 997)
            run_job(nt, n, "one caller");
    CHECK(cpa_workers_count() == 7, "pool has %d workers after asking for 8 threads",
          cpa_workers_count());
    /* a caller that finds the pool busy runs its items itself */
    pthread_t t;
    CHECK(pthread_create(&t, NULL, second_caller, NULL) == 0, "pthread_create");
    for (int r = 0; r < 200; r++)
        run_job(3, 1 + r * 7 % 5000, "first caller");
    pthread_join(t, NULL);
    printf("workers: %d threads, jobs of 0-5000 items from two callers\n", cpa_workers_count() + 1);
}

/* ---- page pool ---- */

static cpa_pool *pool;

static void *pool_hammer(void *arg)
{
    const int64_t me = (int64_t)(intptr_t)arg;
    char rows[4 * 2 * 16];   /* 4 tokens x 2 layers x 16-byte rows */
    const char *const planes[CPA_PLANES] = {rows, rows, NULL, NULL};
    for (int r = 0; r < 300; r++) {
        int64_t seq, child, need, len;
        memset(rows, (int)(me + r), sizeof rows);
        if (cpa_pool_create_seq(pool, &seq) != CPA_POOL_OK)
            continue;
        int rc = cpa_pool_append(pool, seq, planes, 4, &need);
        CHECK(rc == CPA_POOL_OK || rc == CPA_POOL_EFULL, "append: status %d", rc);
        if (cpa_pool_fork(pool, seq, &child) == CPA_POOL_OK) {
            rc = cpa_pool_append(pool, child, planes, 3, &need);
            CHECK(rc == CPA_POOL_OK || rc == CPA_POOL_EFULL, "append to fork: status %d", rc);
            CHECK(cpa_pool_truncate(pool, child, 2, &len) == CPA_POOL_OK, "truncate");
            CHECK(cpa_pool_free_seq(pool, child) == CPA_POOL_OK, "free fork");
        }
        CHECK(cpa_pool_free_seq(pool, seq) == CPA_POOL_OK, "free");
        CHECK(cpa_pool_free_seq(pool, seq) == CPA_POOL_EFREED, "double free not refused");
    }
    return NULL;
}

static void check_pool(void)
{
    const int64_t row_bytes[CPA_PLANES] = {16, 16, 0, 0};
    pool = cpa_pool_new(64, 4, 2, row_bytes);
    CHECK(pool != NULL, "cpa_pool_new");
    if (!pool)
        return;
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        CHECK(pthread_create(&t[i], NULL, pool_hammer, (void *)(intptr_t)i) == 0, "pthread_create");
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    char msg[256] = "";
    CHECK(cpa_pool_check(pool, msg, sizeof msg) == 0, "pool invariants: %s", msg);
    CHECK(cpa_pool_num_free(pool) == 64, "%lld of 64 pages free after every sequence was freed",
          (long long)cpa_pool_num_free(pool));
    CHECK(cpa_pool_num_alive(pool) == 0, "%lld sequences alive", (long long)cpa_pool_num_alive(pool));
    cpa_pool_destroy(pool);
    printf("page pool: 4 threads x 300 create/append/fork/truncate/free\n");
}

/* ---- thread limit ---- */

/* Without OpenMP the kernels' thread limit is OMP_NUM_THREADS's first
 * entry, or none (platform.c); with it, the runtime's. */
static void check_thread_limit(void)
{
    if (cpa_openmp_enabled()) {
        CHECK(cpa_omp_max_threads() >= 1, "omp_get_max_threads %d", cpa_omp_max_threads());
        return;
    }
    const char *s = getenv("OMP_NUM_THREADS");
    const long v = s ? strtol(s, NULL, 10) : 0;
    const int want = v >= 1 ? (int)v : INT_MAX;
    CHECK(cpa_omp_max_threads() == want, "thread limit %d without OpenMP, OMP_NUM_THREADS=%s",
          cpa_omp_max_threads(), s ? s : "(unset)");
    printf("thread limit without OpenMP: %d\n", cpa_omp_max_threads());
}

int main(void)
{
    check_thread_limit();
    check_workers();
    check_pool();
    printf("%d of %d checks failed\n", atomic_load(&fails), atomic_load(&checks));
    return fails != 0;
}
