/* Platform facts the kernels need: which SIMD path this CPU and OS can run,
 * and the OpenMP runtime (absent in a serial build). */
#ifndef CPUATTN_PLATFORM_H
#define CPUATTN_PLATFORM_H

enum cpa_isa { CPA_ISA_SCALAR = 0, CPA_ISA_AVX2 = 1, CPA_ISA_AVX512 = 2, CPA_ISA_COUNT = 3 };

/* Best path this CPU *and* its OS support (CPUID feature bits and the
 * register state enabled in XCR0), never more than the build compiled. */
int cpa_isa_best(void);
/* Name of a path: "scalar" (baseline, NEON on aarch64), "avx2", "avx512". */
const char *cpa_isa_name(int isa);

int cpa_openmp_enabled(void);
int cpa_omp_max_threads(void);

#endif
