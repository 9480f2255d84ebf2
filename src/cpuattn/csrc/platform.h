/* Platform facts the kernels need: which SIMD path this CPU and OS can run,
 * and the OpenMP runtime (absent in a serial build). */
#ifndef CPUATTN_PLATFORM_H
#define CPUATTN_PLATFORM_H

/* Paths in increasing order: each one's CPU needs are a superset of the
 * previous one's, so "supported" is a prefix of this list. avx512bf16 is
 * avx512 plus AVX512_BF16 (vdpbf16ps) for the bfloat16 prefill kernel. */
enum cpa_isa {
    CPA_ISA_SCALAR = 0, CPA_ISA_AVX2 = 1, CPA_ISA_AVX512 = 2, CPA_ISA_AVX512BF16 = 3,
    CPA_ISA_COUNT = 4
};

/* Whether this compiler can build the avx512bf16 region (GCC >= 10, Clang >= 9);
 * CPUID never selects a path the build lacks. */
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 9) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define CPA_HAVE_BF16_TARGET 1
#else
#define CPA_HAVE_BF16_TARGET 0
#endif

/* Best path this CPU *and* its OS support (CPUID feature bits and the
 * register state enabled in XCR0), never more than the build compiled. */
int cpa_isa_best(void);
/* Name of a path: "scalar" (baseline, NEON on aarch64), "avx2", "avx512",
 * "avx512bf16". */
const char *cpa_isa_name(int isa);

int cpa_openmp_enabled(void);
int cpa_omp_max_threads(void);

#endif
