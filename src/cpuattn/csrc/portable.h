/* What differs between the operating systems the C engine builds on (Linux,
 * macOS, Windows with mingw-w64), in one place (issue 19).
 *
 * Threads are POSIX threads everywhere: macOS has them, and mingw-w64 ships
 * winpthreads, a pthreads layer over Win32 threads, so workers.c needs no
 * Win32 port. What winpthreads lacks is POSIX signals, handled here.
 * (pthread_atfork is a no-op macro there: Windows has no fork.)
 *
 * Include it first: glibc declares dladdr only under _GNU_SOURCE, which must
 * be set before any system header (Python.h sets it too). */
#ifndef CPUATTN_PORTABLE_H
#define CPUATTN_PORTABLE_H
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE
#endif

#ifdef _WIN32
/* Windows delivers no POSIX signals to threads (CPython takes Ctrl-C through
 * a console handler on a thread of its own), so a new worker has nothing to
 * block. */
typedef int cpa_sigmask;
static inline void cpa_block_signals(cpa_sigmask *old) { *old = 0; }
static inline void cpa_restore_signals(const cpa_sigmask *old) { (void)old; }
#else
#include <pthread.h>
#include <signal.h>
typedef sigset_t cpa_sigmask;
/* Block every signal in the calling thread (threads it creates inherit the
 * mask), saving the old mask in *old. */
static inline void cpa_block_signals(cpa_sigmask *old)
{
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, old);
}
static inline void cpa_restore_signals(const cpa_sigmask *old)
{
    pthread_sigmask(SIG_SETMASK, old, NULL);
}
#endif

/* The compiler that built this file, for cpuattn.info(). */
#if defined(__clang__)
#define CPA_COMPILER "clang " __clang_version__
#elif defined(__MINGW64__)
#define CPA_COMPILER "mingw-w64 gcc " __VERSION__
#elif defined(__GNUC__)
#define CPA_COMPILER "gcc " __VERSION__
#else
#define CPA_COMPILER "unknown"
#endif

/* The OpenMP runtime: its spec date (_OPENMP, 0 without OpenMP) and the
 * file omp_get_max_threads comes from (libgomp, LLVM's libomp, a wheel's
 * bundled copy; the module itself where it is linked statically; "" when
 * unknown or without OpenMP). */
#ifdef _OPENMP
#include <omp.h>
#define CPA_OPENMP_VERSION _OPENMP
#ifdef _WIN32
#include <windows.h>
static inline const char *cpa_openmp_library(void)
{
    static char path[1024];
    HMODULE m;
    if (!GetModuleHandleExA(GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS |
                                GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT,
                            (LPCSTR)(void *)omp_get_max_threads, &m))
        return "";
    const DWORD n = GetModuleFileNameA(m, path, sizeof path);
    return n > 0 && n < sizeof path ? path : "";
}
#else
#include <dlfcn.h>
static inline const char *cpa_openmp_library(void)
{
    Dl_info info;
    return dladdr((void *)omp_get_max_threads, &info) && info.dli_fname ? info.dli_fname : "";
}
#endif
#else
#define CPA_OPENMP_VERSION 0
static inline const char *cpa_openmp_library(void) { return ""; }
#endif

#endif
