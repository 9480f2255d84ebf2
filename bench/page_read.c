/* The read bandwidth a paged cache allows, without any attention arithmetic:
 * 2 OpenMP threads sum a 268 MB buffer page by page, once in address order
 * and once in a random page order (as a shuffled block table reads it).
 * Context for the decode figures in RESULTS.md.
 *
 *   gcc -O2 -mavx512f -fopenmp -o /tmp/page_read bench/page_read.c
 *   /tmp/page_read 8192     # page bytes: 8192 = 16 tokens x 1 kv head x 128 x fp32
 *   /tmp/page_read 65536    #             65536 = 16 tokens x 8 kv heads x 128 x fp32
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv)
{
    const long page = argc > 1 ? atol(argv[1]) : 8192;
    const size_t total = (size_t)268 << 20;
    const long np = (long)(total / (size_t)page);
    if (page < 128 || page % 128) {
        fprintf(stderr, "page bytes: a multiple of 128\n");
        return 2;
    }
    float *buf = aligned_alloc(2 << 20, total);
    int *perm = malloc((size_t)np * sizeof(int));
    if (!buf || !perm)
        return 1;
    madvise(buf, total, MADV_HUGEPAGE);
    for (size_t i = 0; i < total / 4; i++) buf[i] = 1.0f;
    for (long i = 0; i < np; i++) perm[i] = (int)i;
    srand(1);
    for (long i = np - 1; i > 0; i--) {
        long j = rand() % (i + 1);
        int t = perm[i]; perm[i] = perm[j]; perm[j] = t;
    }
    for (int random = 0; random < 2; random++)
        for (int rep = 0; rep < 3; rep++) {
            double t = now(), sum = 0;
#pragma omp parallel for num_threads(2) schedule(static) reduction(+ : sum)
            for (long p = 0; p < np; p++) {
                const float *x = buf + (size_t)(random ? perm[p] : p) * (size_t)(page / 4);
                __m512 a = _mm512_setzero_ps(), b = a;
                for (long o = 0; o < page / 4; o += 32) {
                    a = _mm512_add_ps(a, _mm512_loadu_ps(x + o));
                    b = _mm512_add_ps(b, _mm512_loadu_ps(x + o + 16));
                }
                sum += _mm512_reduce_add_ps(_mm512_add_ps(a, b));
            }
            t = now() - t;
            printf("page %6ld bytes, %-14s %.1f GB/s (checksum %s)\n", page,
                   random ? "random order" : "address order", total / t / 1e9,
                   sum == (double)(total / 4) ? "ok" : "BAD");
        }
    return 0;
}
