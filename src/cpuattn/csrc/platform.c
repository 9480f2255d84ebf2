#include "platform.h"
#include "engine.h"

#ifdef _OPENMP
#include <omp.h>
#else
#include <limits.h>
#include <stdatomic.h>
#include <stdlib.h>
#endif

#if CPA_X86
#include <cpuid.h>
#endif
#if CPA_HAVE_AMX_TARGET && !defined(CPA_AMX_EMULATE)
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if CPA_HAVE_AMX_TARGET && !defined(CPA_AMX_EMULATE)
/* Linux hands the AMX tile data state (8 KB per thread) only to processes
 * that ask for it; a tile instruction before that raises SIGILL. Asked once
 * per process (the grant covers every thread, and a forked child inherits
 * it); pthread_once makes concurrent first calls safe. */
#define CPA_ARCH_REQ_XCOMP_PERM 0x1023
#define CPA_XFEATURE_XTILEDATA 18
static pthread_once_t cpa_amx_once = PTHREAD_ONCE_INIT;
static int cpa_amx_granted;

static void cpa_amx_request(void)
{
    cpa_amx_granted = syscall(SYS_arch_prctl, CPA_ARCH_REQ_XCOMP_PERM, CPA_XFEATURE_XTILEDATA) == 0;
}
#endif

#if CPA_X86

static unsigned long long xgetbv0(void)
{
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

int cpa_cpu_features(void)
{
    int f = 0;
#if CPA_X86
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(osxsave && avx && fma && f16c))
        return 0;
    /* The OS must save the YMM (and for AVX-512 the opmask/ZMM) state, or
     * using those registers faults even though CPUID lists them. */
    unsigned long long xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6 || __get_cpuid_max(0, 0) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    unsigned int max_subleaf = a;
    if ((b >> 5) & 1)
        f |= CPA_FEAT_AVX2;
    int avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1,
        avx512vl = (b >> 31) & 1;
    if (avx512f && avx512dq && avx512bw && avx512vl && (xcr0 & 0xe6) == 0xe6)
        f |= CPA_FEAT_AVX512;
    /* leaf 7 sub-leaf 0, EDX bits 22 and 24: AMX-BF16 and AMX-TILE; their
     * state (XCR0 bits 17, 18: tile config and data) must be OS-enabled */
    const int amx = ((d >> 22) & 1) && ((d >> 24) & 1) && (xcr0 & 0x60000) == 0x60000;
    /* leaf 7 sub-leaf 1, EAX bit 5: AVX512_BF16 (no extra OS state) */
    if (max_subleaf >= 1) {
        __cpuid_count(7, 1, a, b, c, d);
        if ((a >> 5) & 1)
            f |= CPA_FEAT_AVX512BF16;
    }
#if CPA_HAVE_AMX_TARGET && defined(CPA_AMX_EMULATE)
    (void)amx;
    if (f & CPA_FEAT_AVX512BF16)
        f |= CPA_FEAT_AMX;
#elif CPA_HAVE_AMX_TARGET
    if (amx) {
        pthread_once(&cpa_amx_once, cpa_amx_request);
        if (cpa_amx_granted)
            f |= CPA_FEAT_AMX;
    }
#else
    (void)amx;
#endif
#endif
    return f;
}

#define CPA_ISA_FEATS_(e, tag, name, feats, fallback) feats,
static const int cpa_isa_needs[CPA_ISA_COUNT] = { CPA_ISAS(CPA_ISA_FEATS_) };
#define CPA_ISA_NAME_(e, tag, name, feats, fallback) name,
static const char *const cpa_isa_names[CPA_ISA_COUNT] = { CPA_ISAS(CPA_ISA_NAME_) };
#define CPA_ISA_FALLBACK_(e, tag, name, feats, fallback) fallback,
static const int cpa_isa_fallbacks[CPA_ISA_COUNT] = { CPA_ISAS(CPA_ISA_FALLBACK_) };

int cpa_isa_supported(int isa)
{
    if (isa < 0 || isa >= CPA_ISA_COUNT)
        return 0;
    const int need = cpa_isa_needs[isa];
    return (cpa_cpu_features() & need) == need;
}

int cpa_isa_best(void)
{
    int best = CPA_ISA_SCALAR;
    for (int i = 0; i < CPA_ISA_COUNT; i++) {
#if CPA_HAVE_AMX_TARGET
        /* amx is opt-in (CPUATTN_ISA=amx) until it has run on AMX hardware:
         * its tile products are checked only in emulation so far (README) */
        if (i == CPA_ISA_AMX)
            continue;
#endif
        if (cpa_isa_supported(i))
            best = i;
    }
    return best;
}

int cpa_isa_fallback(int isa)
{
    return (isa < 0 || isa >= CPA_ISA_COUNT) ? CPA_ISA_SCALAR : cpa_isa_fallbacks[isa];
}

const char *cpa_isa_name(int isa)
{
    return (isa < 0 || isa >= CPA_ISA_COUNT) ? 0 : cpa_isa_names[isa];
}

#define CPA_DTYPE_NAME_(e, code, name, size) [code] = name,
static const char *const cpa_dtype_names[CPA_DTYPE_COUNT] = { CPA_DTYPES(CPA_DTYPE_NAME_) };
#define CPA_DTYPE_BITS_(e, code, name, bits) [code] = bits,
static const int cpa_dtype_bits_of[CPA_DTYPE_COUNT] = { CPA_DTYPES(CPA_DTYPE_BITS_) };

const char *cpa_dtype_name(int code)
{
    return (code < 0 || code >= CPA_DTYPE_COUNT) ? 0 : cpa_dtype_names[code];
}

int cpa_dtype_bits(int code)
{
    return (code < 0 || code >= CPA_DTYPE_COUNT) ? 0 : cpa_dtype_bits_of[code];
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
    /* No runtime to ask (Apple clang without libomp, CPUATTN_NO_OPENMP): the
     * kernels still run on the worker pool; OMP_NUM_THREADS limits them as
     * a runtime would (its first entry, read once), else nothing does. */
    static _Atomic int limit;   /* 0: not read yet */
    int n = atomic_load_explicit(&limit, memory_order_relaxed);
    if (n == 0) {
        const char *s = getenv("OMP_NUM_THREADS");
        const long v = s ? strtol(s, NULL, 10) : 0;
        n = v >= 1 && v <= INT_MAX ? (int)v : INT_MAX;
        atomic_store_explicit(&limit, n, memory_order_relaxed);
    }
    return n;
#endif
}
