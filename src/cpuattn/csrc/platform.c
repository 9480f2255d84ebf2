#include "platform.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CPA_X86 1
#include <cpuid.h>

static unsigned long long xgetbv0(void)
{
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

int cpa_isa_best(void)
{
#ifdef CPA_X86
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return CPA_ISA_SCALAR;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(osxsave && avx && fma && f16c))
        return CPA_ISA_SCALAR;
    /* The OS must save the YMM (and for AVX-512 the opmask/ZMM) state, or
     * using those registers faults even though CPUID lists them. */
    unsigned long long xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6)
        return CPA_ISA_SCALAR;
    if (__get_cpuid_max(0, 0) < 7)
        return CPA_ISA_SCALAR;
    __cpuid_count(7, 0, a, b, c, d);
    unsigned int max_subleaf = a;
    int avx2 = (b >> 5) & 1;
    int avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1,
        avx512vl = (b >> 31) & 1;
    if (!avx2)
        return CPA_ISA_SCALAR;
    if (avx512f && avx512dq && avx512bw && avx512vl && (xcr0 & 0xe6) == 0xe6) {
        /* leaf 7 sub-leaf 1, EAX bit 5: AVX512_BF16 (no extra OS state) */
        if (max_subleaf >= 1) {
            __cpuid_count(7, 1, a, b, c, d);
            if (CPA_HAVE_BF16_TARGET && ((a >> 5) & 1))
                return CPA_ISA_AVX512BF16;
        }
        return CPA_ISA_AVX512;
    }
    return CPA_ISA_AVX2;
#else
    return CPA_ISA_SCALAR;
#endif
}

const char *cpa_isa_name(int isa)
{
    switch (isa) {
    case CPA_ISA_AVX2: return "avx2";
    case CPA_ISA_AVX512: return "avx512";
    case CPA_ISA_AVX512BF16: return "avx512bf16";
    default:
#if defined(__aarch64__)
        return "scalar";  /* 128-bit vectors: NEON through the compiler */
#else
        return "scalar";
#endif
    }
}

int cpa_openmp_enabled(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int cpa_omp_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
