/* What the forward and backward engines share: the storage dtype table, the
 * attention mask, and the small arithmetic of blocking and scratch layout.
 * A new KV storage type starts here, as one row of CPA_DTYPES. */
#ifndef CPUATTN_ENGINE_H
#define CPUATTN_ENGINE_H
#include <stddef.h>
#include <stdint.h>

/* Storage dtypes: X(ENUM, code, name, bits per element). The code is the
 * kernel table column and the value Python passes (cpuattn._forward.DTYPES
 * is built from this list; the name is the numpy dtype's, except "int4",
 * stored as uint8 pairs). The compute type is float64 for CPA_F64 and
 * float32 for every other storage type. The four low-bit types are KV-only
 * and carry scales (quant.h). */
#define CPA_DTYPES(X)                     \
    X(CPA_F32, 0, "float32", 32)          \
    X(CPA_F64, 1, "float64", 64)          \
    X(CPA_F16, 2, "float16", 16)          \
    X(CPA_BF16, 3, "bfloat16", 16)        \
    X(CPA_I8, 4, "int8", 8)               \
    X(CPA_I4, 5, "int4", 4)               \
    X(CPA_E4M3, 6, "float8_e4m3fn", 8)    \
    X(CPA_E5M2, 7, "float8_e5m2", 8)

#define CPA_DTYPE_ENUM_(e, code, name, size) e = code,
enum cpa_dtype { CPA_DTYPES(CPA_DTYPE_ENUM_) CPA_DTYPE_COUNT };
#undef CPA_DTYPE_ENUM_

/* The same codes as preprocessor numbers, for #if inside kernel bodies. */
#define CPA_KIND_F32 0
#define CPA_KIND_F64 1
#define CPA_KIND_F16 2
#define CPA_KIND_BF16 3
#define CPA_KIND_I8 4
#define CPA_KIND_I4 5
#define CPA_KIND_E4M3 6
#define CPA_KIND_E5M2 7

const char *cpa_dtype_name(int code);   /* NULL outside the table */
int cpa_dtype_bits(int code);           /* 0 outside the table */

/* Which keys a query sees (bottom-right aligned, window -1 = unbounded). */
typedef struct {
    int32_t causal;
    int64_t window_left, window_right;
} cpa_mask;

/* Where the rows of one array are, the same for every array of both
 * engines: row (b, t, h) (sequence b, token t, head h) starts at element
 *     b*seq + t*tok + h*head
 * of data, and the last axis is contiguous. Tokens count from the start of
 * the array: a call's q_start[b] / k_start[b] is the first row of sequence b
 * (dense: 0 with seq the batch stride; packed: cu_seqlens[b] with seq 0).
 * Paged K/V: seq is the page stride and the block table gives the page. */
typedef struct {
    void *data;
    int64_t seq, tok, head;
} cpa_rows;

static inline int64_t cpa_at(const cpa_rows *x, int64_t b, int64_t t, int64_t h)
{
    return b * x->seq + t * x->tok + h * x->head;
}

#define CPA_ALIGN 64

static inline int64_t cpa_min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t cpa_max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t cpa_roundup(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* Keys query token t (of nq, against Sk keys) may see: [*lo, *hi], empty if
 * *hi < *lo. Token t sits at position t + Sk - nq. */
static inline void cpa_visible_keys(const cpa_mask *m, int64_t nq, int64_t Sk, int64_t t,
                                    int64_t *lo, int64_t *hi)
{
    const int64_t p = t + Sk - nq;
    int64_t l = 0, h = Sk - 1;
    if (m->window_left >= 0 && p - m->window_left > l) l = p - m->window_left;
    if (m->causal && p < h) h = p;
    if (m->window_right >= 0 && p + m->window_right < h) h = p + m->window_right;
    *lo = l;
    *hi = h;
}

/* Reserve `bytes` (rounded up to CPA_ALIGN) at *at of a scratch layout. */
static inline size_t cpa_take(size_t *at, size_t bytes)
{
    size_t off = *at;
    *at += (bytes + CPA_ALIGN - 1) / CPA_ALIGN * CPA_ALIGN;
    return off;
}

#define CPA_CAT2_(a, b) a##_##b
#define CPA_CAT2(a, b) CPA_CAT2_(a, b)
#define CPA_CAT3_(a, b, c) a##_##b##_##c
#define CPA_CAT3(a, b, c) CPA_CAT3_(a, b, c)
#define CPA_CAT4_(a, b, c, d) a##_##b##_##c##_##d
#define CPA_CAT4(a, b, c, d) CPA_CAT4_(a, b, c, d)

#endif
