/* Native check of the forward engine without Python: runs dense, packed and
 * paged attention (fp32/fp64/fp16/bf16 storage, GQA, causal, window, softcap,
 * split-KV, rows that see no key, NaN in hidden keys) on every SIMD path this
 * CPU supports and compares against a scalar float64 reference. Built with
 * -DCPA_AMX_EMULATE it also runs the amx path's tile products as C on any
 * AVX512_BF16 CPU (tests/test_native.py does both).
 *
 * Built for the host by tests/test_native.py and for aarch64 (run under
 * qemu-user) by tools/check_aarch64.sh, so the baseline path that aarch64
 * wheels ship is compiled and run somewhere. Exit status 0 = all passed.
 *
 *   cc -O2 -std=gnu11 -Isrc/cpuattn/csrc tests/native/attn_check.c \
 *      src/cpuattn/csrc/forward.c src/cpuattn/csrc/platform.c src/cpuattn/csrc/quant.c -lm
 * (add -fsanitize=address,undefined to catch reads past a row or a buffer)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forward.h"
#include "half.h"
#include "platform.h"
#include "quant.h"

typedef struct {
    const char *name;
    int nseq;
    int64_t sq[3], sk[3];
    int H, Hkv, Dk, Dv;
    int causal;
    int64_t wl, wr;
    double softcap;
    int kv_dtype, q_dtype;
    int page_size;   /* 0 = dense packed */
    int nan_tail;    /* NaN keys / inf values in the last nan_tail keys of sequence 0 */
} tcase;

static const char *dtype_name[] = {"f32", "f64", "f16", "bf16", "int8", "int4", "e4m3", "e5m2"};
static const size_t dtype_size[] = {4, 8, 2, 2, 1, 1, 1, 1};   /* low-bit: bytes (see kv_store) */

/* Low-bit KV storage of one plane: codes and scales, filled with garbage
 * (0xff codes, NaN scales) so that a read of a hidden slot shows; rows are
 * quantised by quant.c, the reference reads them dequantised. */
typedef struct {
    uint8_t *codes;
    void *scales;
    int64_t rb, ns, ssize;   /* row bytes, scales per row, bytes per scale */
} kv_store;

static void kv_store_init(kv_store *s, int dt, int64_t rows, int64_t d)
{
    s->rb = cpa_quant_row_bytes(dt, d);
    s->ns = cpa_quant_scales_per_row(dt, d);
    s->ssize = dt == CPA_I4 ? 2 : 4;
    s->codes = malloc((size_t)(rows * s->rb));
    s->scales = malloc((size_t)(rows * s->ns * s->ssize));
    memset(s->codes, 0xff, (size_t)(rows * s->rb));
    for (int64_t i = 0; i < rows * s->ns; i++) {
        if (dt == CPA_I4) ((uint16_t *)s->scales)[i] = 0x7e00;   /* float16 NaN */
        else ((float *)s->scales)[i] = NAN;
    }
}

/* Quantise row (slot) i from x[d] and write its dequantised values to ref. */
static void kv_store_row(kv_store *s, int dt, int64_t i, const float *x, int64_t d, double *ref)
{
    float back[512];
    char *sc = (char *)s->scales + (size_t)(i * s->ns * s->ssize);
    cpa_quantize_rows(dt, x, d, 1, d, s->codes + i * s->rb, s->rb, sc, s->ns);
    cpa_dequantize_rows(dt, s->codes + i * s->rb, s->rb, sc, s->ns, 1, d, back, d);
    for (int64_t k = 0; k < d; k++) ref[k] = back[k];
}

static void put(void *buf, int dt, int64_t i, double x)
{
    switch (dt) {
    case CPA_F32: ((float *)buf)[i] = (float)x; break;
    case CPA_F64: ((double *)buf)[i] = x; break;
    case CPA_F16: ((uint16_t *)buf)[i] = cpa_f32_to_f16((float)x); break;
    default: ((uint16_t *)buf)[i] = cpa_f32_to_bf16((float)x); break;
    }
}

static double get(const void *buf, int dt, int64_t i)
{
    switch (dt) {
    case CPA_F32: return ((const float *)buf)[i];
    case CPA_F64: return ((const double *)buf)[i];
    case CPA_F16: return cpa_f16_to_f32(((const uint16_t *)buf)[i]);
    default: return cpa_bf16_to_f32(((const uint16_t *)buf)[i]);
    }
}

static uint64_t rng_state = 88172645463325252ull;
static double urand(void)   /* uniform in [-1, 1) */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 4503599627370496.0 - 1.0;
}

/* Keys token t of nq may see (bottom-right aligned), as in forward.c. */
static int visible(const tcase *c, int64_t nq, int64_t sk, int64_t t, int64_t j)
{
    const int64_t p = t + sk - nq;
    if (c->causal && j > p) return 0;
    if (c->wl >= 0 && j < p - c->wl) return 0;
    if (c->wr >= 0 && j > p + c->wr) return 0;
    return 1;
}

static int run_case(const tcase *c, int isa)
{
    const int64_t H = c->H, Hkv = c->Hkv, Dk = c->Dk, Dv = c->Dv, g = H / Hkv;
    int64_t cu_q[4] = {0}, cu_k[4] = {0};
    for (int b = 0; b < c->nseq; b++) {
        cu_q[b + 1] = cu_q[b] + c->sq[b];
        cu_k[b + 1] = cu_k[b] + c->sk[b];
    }
    const int64_t tq = cu_q[c->nseq], tk = cu_k[c->nseq];
    const size_t qs = dtype_size[c->q_dtype], ks = dtype_size[c->kv_dtype];
    const int lse64 = c->q_dtype == CPA_F64, low = cpa_dtype_bits(c->kv_dtype) < 16;

    /* storage: packed (tokens, heads, dim), or pages (num_pages, P, Hkv, D) */
    const int64_t P = c->page_size;
    int64_t pages = 0, width = 1;
    for (int b = 0; b < c->nseq && P; b++) {
        int64_t need = (c->sk[b] + P - 1) / P;
        pages += need;
        if (need > width) width = need;
    }
    const int64_t spare = P ? 2 : 0;
    const int64_t krows = P ? (pages + spare) * P : tk;
    void *q = malloc((size_t)(tq * H * Dk) * qs);   /* exact sizes: a sanitizer build sees over-reads */
    void *k = malloc((size_t)(krows * Hkv * Dk) * ks);
    void *v = malloc((size_t)(krows * Hkv * Dv) * ks);
    void *out = malloc((size_t)(tq * H * Dv) * qs);
    void *lse = malloc((size_t)(H * tq) * 8 + 8);
    int32_t *bt = calloc((size_t)(c->nseq * width), sizeof(int32_t));
    double *kref = malloc((size_t)(tk * Hkv * Dk) * 8), *vref = malloc((size_t)(tk * Hkv * Dv) * 8);
    double *sc = malloc((size_t)(c->sk[0] + c->sk[1] + c->sk[2] + 1) * 8);

    for (int64_t i = 0; i < tq * H * Dk; i++) put(q, c->q_dtype, i, 1.5 * urand());
    /* every slot NaN first: a read of a spare page or stale slot shows */
    for (int64_t i = 0; i < krows * Hkv * Dk && !low; i++) put(k, c->kv_dtype, i, NAN);
    for (int64_t i = 0; i < krows * Hkv * Dv && !low; i++) put(v, c->kv_dtype, i, NAN);
    kv_store kq = {0}, vq = {0};
    if (low) {
        kv_store_init(&kq, c->kv_dtype, krows * Hkv, Dk);
        kv_store_init(&vq, c->kv_dtype, krows * Hkv, Dv);
    }
    float xrow[512];
    /* page ids in a scrambled order: stride 5 through the pool (a pool whose
     * size is a multiple of 5 would repeat pages: choose shapes that avoid it) */
    int64_t next = 0;
    for (int b = 0; b < c->nseq && P; b++)
        for (int64_t pg = 0; pg < (c->sk[b] + P - 1) / P; pg++, next++)
            bt[b * width + pg] = (int32_t)((next * 5 + 1) % (pages + spare));
    for (int b = 0; b < c->nseq; b++)
        for (int64_t j = 0; j < c->sk[b]; j++) {
            const int tail = b == 0 && j >= c->sk[b] - c->nan_tail;
            int64_t row = P ? (int64_t)bt[b * width + j / P] * P + j % P : cu_k[b] + j;
            for (int64_t h = 0; h < Hkv && low; h++) {
                for (int64_t d = 0; d < Dk; d++) xrow[d] = tail ? NAN : (float)urand();
                kv_store_row(&kq, c->kv_dtype, row * Hkv + h, xrow, Dk,
                             kref + ((cu_k[b] + j) * Hkv + h) * Dk);
                for (int64_t d = 0; d < Dv; d++) xrow[d] = (float)urand();
                kv_store_row(&vq, c->kv_dtype, row * Hkv + h, xrow, Dv,
                             vref + ((cu_k[b] + j) * Hkv + h) * Dv);
            }
            for (int64_t h = 0; h < Hkv && !low; h++) {
                for (int64_t d = 0; d < Dk; d++) {
                    int64_t i = (row * Hkv + h) * Dk + d;
                    put(k, c->kv_dtype, i, tail ? NAN : urand());
                    kref[((cu_k[b] + j) * Hkv + h) * Dk + d] = get(k, c->kv_dtype, i);
                }
                for (int64_t d = 0; d < Dv; d++) {
                    int64_t i = (row * Hkv + h) * Dv + d;
                    put(v, c->kv_dtype, i, tail ? INFINITY : urand());
                    vref[((cu_k[b] + j) * Hkv + h) * Dv + d] = get(v, c->kv_dtype, i);
                }
            }
        }

    int64_t q_start[3], k_start[3], q_len[3], k_len[3];
    for (int b = 0; b < c->nseq; b++) {
        q_start[b] = cu_q[b]; k_start[b] = P ? 0 : cu_k[b];
        q_len[b] = c->sq[b]; k_len[b] = c->sk[b];
    }
    cpa_fwd_args a;
    memset(&a, 0, sizeof a);
    /* packed rows: sequence b starts at row q_start[b] (k_start[b]); with pages
     * cpa_rows.seq is the page stride */
    a.q = (cpa_rows){q, 0, H * Dk, Dk};
    a.out = (cpa_rows){out, 0, H * Dv, Dv};
    a.lse = (cpa_rows){lse, 0, 1, tq};
    a.k = (cpa_rows){k, P * Hkv * Dk, Hkv * Dk, Dk};
    a.v = (cpa_rows){v, P * Hkv * Dv, Hkv * Dv, Dv};
    if (low) {   /* rows of bytes, and their scales addressed alike */
        a.k = (cpa_rows){kq.codes, P * Hkv * kq.rb, Hkv * kq.rb, kq.rb};
        a.v = (cpa_rows){vq.codes, P * Hkv * vq.rb, Hkv * vq.rb, vq.rb};
        a.k_scale = (cpa_rows){kq.scales, P * Hkv * kq.ns, Hkv * kq.ns, kq.ns};
        a.v_scale = (cpa_rows){vq.scales, P * Hkv * vq.ns, Hkv * vq.ns, vq.ns};
    }
    a.num_heads = (int32_t)H; a.num_kv_heads = (int32_t)Hkv;
    a.head_dim_qk = (int32_t)Dk; a.head_dim_v = (int32_t)Dv;
    a.q_dtype = c->q_dtype; a.k_dtype = a.v_dtype = c->kv_dtype;
    a.scale = 1.0 / sqrt((double)Dk); a.softcap = c->softcap; a.mask.causal = c->causal;
    a.mask.window_left = c->wl; a.mask.window_right = c->wr;
    a.num_seqs = c->nseq;
    a.q_start = q_start; a.k_start = k_start; a.q_len = q_len; a.k_len = k_len;
    if (P) { a.block_table = bt; a.bt_stride = width; a.page_size = P; }

    cpa_fwd_item_fn kernel = cpa_fwd_kernel(&a, isa);
    if (!kernel) {
        printf("FAIL %-28s %-10s no kernel\n", c->name, cpa_isa_name(isa));
        return 1;
    }
    int64_t nm = 0, ns = 0;
    const int64_t ni = cpa_fwd_plan(&a, NULL, NULL, &nm, &ns);
    cpa_fwd_item *items = malloc((size_t)(ni + 1) * sizeof *items);
    cpa_fwd_merge *merges = malloc((size_t)(nm + 1) * sizeof *merges);
    cpa_fwd_plan(&a, items, merges, &nm, &ns);
    int64_t dec_rows = 0;
    if (cpa_fwd_share(&a, items, ni, &dec_rows) < 0) {
        printf("FAIL %-28s %-10s out of memory\n", c->name, cpa_isa_name(isa));
        return 1;
    }
    int64_t max_split = 0;
    for (int64_t i = 0; i < nm; i++) if (merges[i].nsplit > max_split) max_split = merges[i].nsplit;
    size_t sb = cpa_fwd_scratch_bytes(&a, cpa_fwd_uses_tiled(&a), dec_rows);
    if (sb < (size_t)((max_split + Dv) * 8 + 64)) sb = (size_t)((max_split + Dv) * 8 + 64);
    sb = (sb + 63) / 64 * 64;
    /* malloc + manual alignment: the Windows C runtime has no aligned_alloc */
    char *scratch_raw = malloc(sb + 64);
    char *scratch = (char *)(((uintptr_t)scratch_raw + 63) & ~(uintptr_t)63);
    char *partials = malloc(ns * cpa_fwd_slot_bytes(&a) + 8);
    memset(scratch, 0xff, sb);   /* NaN everywhere: the kernels must not rely on zeroed scratch */
    for (int64_t i = 0; i < ni; i++) kernel(&a, &items[i], scratch, partials);
    for (int64_t i = 0; i < nm; i++) cpa_fwd_merge_one(&a, &merges[i], partials, scratch);

    /* float64 reference on the same (decoded) inputs */
    const double tol = c->q_dtype == CPA_F64 ? 1e-12 : c->q_dtype == CPA_F32 ? 2e-5
                     : c->q_dtype == CPA_F16 ? 3e-3 : 2.5e-2;
    const double ltol = c->q_dtype == CPA_F64 ? 1e-12 : 2e-5;
    double worst = 0, worst_lse = 0;
    int bad = 0;
    for (int b = 0; b < c->nseq; b++)
        for (int64_t t = 0; t < c->sq[b]; t++)
            for (int64_t h = 0; h < H; h++) {
                const int64_t kh = h / g, qi = ((cu_q[b] + t) * H + h) * Dk;
                double m = -INFINITY;
                int any = 0, nan = 0;
                for (int64_t j = 0; j < c->sk[b]; j++) {
                    sc[j] = -INFINITY;
                    if (!visible(c, c->sq[b], c->sk[b], t, j)) continue;
                    double s = 0;
                    for (int64_t d = 0; d < Dk; d++)
                        s += get(q, c->q_dtype, qi + d) * kref[((cu_k[b] + j) * Hkv + kh) * Dk + d];
                    s *= a.scale;
                    if (c->softcap > 0) s = c->softcap * tanh(s / c->softcap);
                    sc[j] = s;
                    any = 1;
                    if (s != s) nan = 1;
                    else if (s > m) m = s;
                }
                double l = 0;
                for (int64_t j = 0; j < c->sk[b]; j++) if (sc[j] > -INFINITY) l += exp(sc[j] - m);
                const double rl = !any ? -INFINITY : nan ? NAN : m + log(l);
                const double kl = lse64 ? ((double *)lse)[h * tq + cu_q[b] + t]
                                        : ((float *)lse)[h * tq + cu_q[b] + t];
                if (isnan(rl) != isnan(kl) || (isinf(rl) && kl != rl)) bad++;
                else if (isfinite(rl)) {
                    double e = fabs(kl - rl) / (ltol + ltol * fabs(rl));
                    if (e > worst_lse) worst_lse = e;
                }
                for (int64_t d = 0; d < Dv; d++) {
                    double r = 0;
                    if (any && !nan)
                        for (int64_t j = 0; j < c->sk[b]; j++)
                            if (sc[j] > -INFINITY)
                                r += exp(sc[j] - m) / l * vref[((cu_k[b] + j) * Hkv + kh) * Dv + d];
                    const double o = get(out, c->q_dtype, ((cu_q[b] + t) * H + h) * Dv + d);
                    if (nan) { if (o == o) bad++; continue; }
                    if (!any) { if (o != 0) bad++; continue; }   /* exactly 0 */
                    double e = fabs(o - r) / (tol + tol * fabs(r));
                    if (!(e <= worst)) worst = e;   /* a NaN output makes worst NaN */
                }
            }
    const int fail = bad || !(worst <= 1) || !(worst_lse <= 1);
    printf("%s %-28s %-10s q=%-4s kv=%-4s err/tol %.3f lse err/tol %.3f%s\n", fail ? "FAIL" : "ok  ",
           c->name, cpa_isa_name(isa), dtype_name[c->q_dtype], dtype_name[c->kv_dtype], worst,
           worst_lse, bad ? " (NaN/-inf/zero rows wrong)" : "");
    free(q); free(k); free(v); free(out); free(lse); free(bt); free(kref); free(vref); free(sc);
    free(kq.codes); free(kq.scales); free(vq.codes); free(vq.scales);
    free(items); free(merges); free(scratch_raw); free(partials);
    return fail;
}

int main(void)
{
    const tcase shapes[] = {
        /* name, nseq, sq, sk, H, Hkv, Dk, Dv, causal, wl, wr, softcap, kv, q, page, nan_tail */
        {"dense causal gqa4", 1, {130}, {130}, 8, 2, 64, 64, 1, -1, -1, 0, 0, 0, 0, 0},
        {"dense sq>sk masked rows", 1, {90}, {70}, 4, 2, 48, 48, 1, -1, -1, 0, 0, 0, 0, 0},
        {"dense odd dim mha", 1, {65}, {200}, 3, 3, 33, 33, 0, -1, -1, 0, 0, 0, 0, 0},
        {"dense window softcap g3", 1, {100}, {100}, 6, 2, 80, 80, 1, 20, 5, 3.0, 0, 0, 0, 0},
        {"dense split-kv g8", 1, {3}, {1100}, 16, 2, 128, 128, 1, -1, -1, 0, 0, 0, 0, 0},
        {"dense decode mqa", 1, {1}, {300}, 8, 1, 96, 96, 1, -1, -1, 0, 0, 0, 0, 0},
        {"dense hidden nan", 1, {100}, {100}, 8, 2, 40, 40, 1, -1, -1, 0, 0, 0, 0, 30},
        {"varlen dk!=dv", 3, {20, 1, 64}, {20, 40, 64}, 4, 4, 24, 16, 1, -1, -1, 0, 0, 0, 0, 0},
        {"paged decode g4", 3, {1, 1, 1}, {700, 5, 64}, 8, 2, 72, 72, 1, -1, -1, 0, 0, 0, 16, 0},
        {"paged prefill g4", 3, {20, 2, 64}, {700, 5, 64}, 8, 2, 72, 72, 1, -1, -1, 0, 0, 0, 16, 0},
        {"paged s1", 1, {1}, {1}, 2, 1, 112, 112, 1, -1, -1, 0, 0, 0, 16, 0},
        /* shapes the amx path takes (head dims multiples of 32, dv of 16):
         * even and uneven key rows (pages of 16 and of 6), a 16-dim value
         * tail, a wide query group, hidden NaN */
        {"tiles causal gqa4 d128", 1, {150}, {150}, 8, 2, 128, 128, 1, -1, -1, 0, 0, 0, 0, 0},
        {"tiles window softcap dv48", 1, {90}, {120}, 4, 1, 64, 48, 1, 30, 0, 2.0, 0, 0, 0, 0},
        {"tiles paged prefill p16", 2, {40, 70}, {300, 90}, 8, 2, 64, 64, 1, -1, -1, 0, 0, 0, 16, 0},
        {"tiles paged prefill p6", 2, {33, 17}, {130, 60}, 4, 2, 64, 64, 1, -1, -1, 0, 0, 0, 6, 0},
        {"tiles hidden nan", 1, {100}, {100}, 8, 2, 64, 64, 1, -1, -1, 0, 0, 0, 0, 30},
        {"tiles wide group dk192 dv128", 1, {2}, {200}, 32, 1, 192, 128, 1, -1, -1, 0, 0, 0, 0, 0},
    };
    const int kinds[][2] = {   /* (kv storage, q dtype) */
        {CPA_F32, CPA_F32}, {CPA_F64, CPA_F64}, {CPA_F16, CPA_F16}, {CPA_BF16, CPA_BF16},
        {CPA_BF16, CPA_F32}, {CPA_F16, CPA_F32},
    };
    const int low_kinds[][2] = {   /* low-bit pages (paged shapes only) */
        {CPA_I8, CPA_F32}, {CPA_I4, CPA_F32}, {CPA_E4M3, CPA_F32}, {CPA_E5M2, CPA_BF16},
    };
    int fails = 0, runs = 0;
    for (int isa = 0; isa < CPA_ISA_COUNT; isa++) if (cpa_isa_supported(isa))
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
            for (size_t kd = 0; kd < sizeof kinds / sizeof *kinds; kd++) {
                tcase c = shapes[s];
                c.kv_dtype = kinds[kd][0];
                c.q_dtype = kinds[kd][1];
                fails += run_case(&c, isa);
                runs++;
            }
            for (size_t kd = 0; kd < sizeof low_kinds / sizeof *low_kinds && shapes[s].page_size; kd++) {
                tcase c = shapes[s];
                c.kv_dtype = low_kinds[kd][0];
                c.q_dtype = low_kinds[kd][1];
                fails += run_case(&c, isa);
                runs++;
            }
        }
    printf("%d of %d runs failed (best SIMD path here: %s)\n", fails, runs,
           cpa_isa_name(cpa_isa_best()));
    return fails != 0;
}
