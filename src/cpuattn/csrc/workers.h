/* cpuattn's own worker pool: the parallel loop of every kernel (issue 12).
 *
 * Why not OpenMP: GNU libgomp workers spin for milliseconds at barriers and
 * between regions, and on a machine with fewer real CPUs than threads that
 * spinning takes the core the thread holding the work needs. Its spin count
 * is read once per process, from the environment, by whichever library
 * loads libgomp first (torch ships one), so a library cannot bound it for
 * its own calls only. This pool spins a bounded time and then sleeps, and
 * hands out items one at a time, so a thread that has a core takes the rest.
 *
 * One job runs at a time. A caller that finds the pool busy (another Python
 * thread's call) runs its items serially on its own thread instead of
 * waiting: results never depend on the thread count or on which thread ran
 * an item, so they are bitwise the same. After fork() the child has no
 * workers and re-creates them on its first threaded call. */
#ifndef CPUATTN_WORKERS_H
#define CPUATTN_WORKERS_H
#include <stddef.h>
#include <stdint.h>

/* How an idle worker, and a caller waiting for the last items, wait: spin
 * with pause for CPA_SPIN_US microseconds (back-to-back kernel calls), then
 * keep looking but give the core away at every look (sched_yield: any
 * runnable thread on this core, the one holding the work included, runs
 * first) until CPA_YIELD_US, then sleep. Sleeping earlier cost 20% on
 * 0.5 ms decode calls at 16 threads (a wake-up per call); spinning without
 * yielding is what starved the working thread on shared CPUs. */
#define CPA_SPIN_US 50
#define CPA_YIELD_US 1000

typedef void (*cpa_item_fn)(void *ctx, int64_t item, int tid);

/* Run fn(ctx, item, tid) once for every item in [0, n_items), on up to
 * nthreads threads; tid is in [0, nthreads) and unique among the threads
 * running at once (the caller is tid 0), so per-thread scratch can be
 * indexed by it. Returns when every item is done. fn must not fail. */
void cpa_parallel_for(int nthreads, int64_t n_items, cpa_item_fn fn, void *ctx);

/* Scratch memory of the calling thread, at least `bytes`, 64-byte aligned,
 * kept for the thread's next call (freed when the thread exits), so that a
 * microsecond kernel call does not pay for a fresh mapping of its scratch;
 * NULL if it cannot be allocated. Up to CPA_SCRATCH_KEEP bytes are kept;
 * a larger request gets memory the caller frees (*owned, else NULL). */
#define CPA_SCRATCH_KEEP ((size_t)8 << 20)
char *cpa_thread_scratch(size_t bytes, void **owned);

/* Worker threads alive now (the pool grows to the largest nthreads - 1 asked). */
int cpa_workers_count(void);

#endif
