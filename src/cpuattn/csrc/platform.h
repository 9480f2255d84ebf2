/* Platform facts the kernels need: which SIMD paths this CPU and OS can run,
 * and the OpenMP runtime (absent in a serial build). */
#ifndef CPUATTN_PLATFORM_H
#define CPUATTN_PLATFORM_H

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CPA_X86 1
#else
#define CPA_X86 0
#endif

/* Whether this compiler can build the avx512bf16 region (GCC >= 10, Clang >= 9);
 * CPUID never selects a path the build lacks. */
#if CPA_X86 && ((defined(__clang__) && __clang_major__ >= 9) || \
                (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define CPA_HAVE_BF16_TARGET 1
#else
#define CPA_HAVE_BF16_TARGET 0
#endif

/* CPU features a path may need; each is set only when the OS also saves the
 * register state it uses (XCR0). */
enum {
    CPA_FEAT_AVX2 = 1 << 0,      /* AVX2 + FMA + F16C, YMM state */
    CPA_FEAT_AVX512 = 1 << 1,    /* AVX-512 F/DQ/BW/VL, opmask and ZMM state */
    CPA_FEAT_AVX512BF16 = 1 << 2, /* AVX512_BF16 (vdpbf16ps) */
    CPA_FEAT_AMX = 1 << 3         /* AMX-TILE + AMX-BF16, tile state in XCR0, and
                                   * (Linux) the process's permission to use it */
};

/* The AMX path: x86-64 Linux only (the OS must grant the tile state to the
 * process, and only Linux's arch_prctl request is implemented), with the
 * avx512bf16 region it builds on. CPA_AMX_EMULATE (development and the
 * native check only) runs the tile instructions as C on any AVX512_BF16 CPU. */
#if CPA_HAVE_BF16_TARGET && (defined(__linux__) || defined(CPA_AMX_EMULATE))
#define CPA_HAVE_AMX_TARGET 1
#else
#define CPA_HAVE_AMX_TARGET 0
#endif

/* The SIMD paths, in order of preference (a later supported one is faster):
 * X(ENUM, tag, name, features it needs, path whose kernels fill in for ones
 * this path does not compile). The kernels of a path are compiled in
 * isa_regions.h under the same tag. A path is supported when the CPU has all
 * its features: no path's needs are assumed to contain another's. */
#define CPA_ISAS_BASE(X) X(CPA_ISA_SCALAR, base, "scalar", 0, CPA_ISA_SCALAR)
#if CPA_X86
#define CPA_ISAS_X86(X)                                                              \
    X(CPA_ISA_AVX2, avx2, "avx2", CPA_FEAT_AVX2, CPA_ISA_SCALAR)                     \
    X(CPA_ISA_AVX512, avx512, "avx512", CPA_FEAT_AVX2 | CPA_FEAT_AVX512, CPA_ISA_AVX2)
#else
#define CPA_ISAS_X86(X)
#endif
#if CPA_HAVE_BF16_TARGET
#define CPA_ISAS_BF16(X)                                                              \
    X(CPA_ISA_AVX512BF16, avx512bf16, "avx512bf16",                                   \
      CPA_FEAT_AVX2 | CPA_FEAT_AVX512 | CPA_FEAT_AVX512BF16, CPA_ISA_AVX512)
#else
#define CPA_ISAS_BF16(X)
#endif
#if CPA_HAVE_AMX_TARGET
#define CPA_ISAS_AMX(X)                                                               \
    X(CPA_ISA_AMX, amx, "amx",                                                        \
      CPA_FEAT_AVX2 | CPA_FEAT_AVX512 | CPA_FEAT_AVX512BF16 | CPA_FEAT_AMX, CPA_ISA_AVX512BF16)
#else
#define CPA_ISAS_AMX(X)
#endif
#define CPA_ISAS(X) CPA_ISAS_BASE(X) CPA_ISAS_X86(X) CPA_ISAS_BF16(X) CPA_ISAS_AMX(X)

#define CPA_ISA_ENUM_(e, tag, name, feats, fallback) e,
enum cpa_isa { CPA_ISAS(CPA_ISA_ENUM_) CPA_ISA_COUNT };
#undef CPA_ISA_ENUM_

/* Feature bits of this CPU and OS (CPUID and XCR0). */
int cpa_cpu_features(void);
/* Whether path `isa` can run here. */
int cpa_isa_supported(int isa);
/* The last supported path of the list, amx excepted (opt-in for now). */
int cpa_isa_best(void);
/* The path whose kernels stand in where `isa` compiles none (itself for the
 * scalar path). */
int cpa_isa_fallback(int isa);
/* Name of a path: "scalar" (baseline: SSE2 on x86-64, NEON on aarch64),
 * "avx2", "avx512", "avx512bf16", "amx"; NULL outside the list. */
const char *cpa_isa_name(int isa);

int cpa_openmp_enabled(void);
int cpa_omp_max_threads(void);

#endif
