#include "common.h"

/* Dense small-M GEMM: y (M, N) = x (M, K) @ W (N, K).T + bias, W fp32 or bf16.
   For decode-sized inputs (M <= 16 rows): the weight is streamed once from memory and each loaded (and, for bf16,
   widened) weight vector is used for up to 4 activation rows. Sums are fp32, bf16 outputs rounded to nearest even.
   Vectors are 8 lanes wide (AVX2) or 16 (AVX-512); the weight is read in blocks of two vectors (DENSE_BLK columns).
   bf16 weights are widened by interleaving with zeros, which yields each block's columns in the order 0-3, 8-11,
   16-19, ... then 4-7, 12-15, ...; the activations (converted to fp32 once per call) are reordered to match.
   With AVX-512 BF16, bf16 weights times bf16 activations use vdpbf16ps instead: bf16 products are exact in fp32,
   so this sums the same products, pairwise, with bf16 denormal inputs read as zero. */
#if defined(__AVX512F__)
#define VW 16
typedef __m512 vec;
#define vzero _mm512_setzero_ps
#define vload _mm512_loadu_ps
#define vfma _mm512_fmadd_ps
#define vsum _mm512_reduce_add_ps
#define DENSE_MB 4 /* 4 weight rows x 4 activation rows: 16 of the 32 vector registers (8 rows spilled) */
static inline void widen(const uint16_t *p, vec *lo, vec *hi) {
    __m512i v = _mm512_loadu_si512(p);
    *lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), v));
    *hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), v));
}
#else
#define VW 8
typedef __m256 vec;
#define vzero _mm256_setzero_ps
#define vload _mm256_loadu_ps
#define vfma _mm256_fmadd_ps
#define vsum hsum
#define DENSE_MB 4 /* 3-4 activation rows run against 2 weight rows at a time (16 registers) */
static inline void widen(const uint16_t *p, vec *lo, vec *hi) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
    *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v));
}
#endif
#define DENSE_BLK (2 * VW)
#define DENSE_TILE 4
/* Prefetch the same columns this many tiles ahead, into L2: with several weight rows interleaved, the hardware
   prefetcher alone reached about half the read bandwidth (Zen 4), and prefetching into L1 evicted the tile. A single
   weight row (one activation row) streams fastest without software prefetch. */
#define DENSE_PF 2

enum { W_F32, W_BF16, W_BF16_DOT }; /* how a block's weights meet the activations */

typedef struct {
    const void *x; const void *w; const void *bias; void *y; long M, N, K; int mode, bbf16, ybf16;
} dense_job;

#if defined(__AVX512F__)
/* columns k.. of a row (fewer than 16 left: the rest masked to zero) as fp32, in natural order */
static inline __m512 load16_tail(const void *p, long off, long left, int bf16) {
    __mmask16 mk = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    if (!bf16) return _mm512_maskz_loadu_ps(mk, (const float *)p + off);
    __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t *)p + off);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

/* weights n0..n0+T-1 (T <= DENSE_TILE, R of them real) against activation rows m0..m0+MB-1 (MB <= DENSE_MB) */
static inline __attribute__((always_inline)) void dense_block(const dense_job *j, long n0, int R, int T, long m0,
                                                              int MB, int mode) {
    const long K = j->K, KB = K / DENSE_BLK * DENSE_BLK;
    const int xbf16 = mode == W_BF16_DOT; /* the dot path reads the caller's bf16 activations as they are */
    const char *x = (const char *)j->x + m0 * K * (xbf16 ? 2 : 4);
    vec acc[DENSE_TILE][DENSE_MB];
    for (int r = 0; r < DENSE_TILE; r++)
        for (int m = 0; m < DENSE_MB; m++) acc[r][m] = vzero();
    const int pf = T > 1 || MB > 1; /* one row streams fastest on the hardware prefetcher alone */
    for (long k = 0; k < KB; k += DENSE_BLK) {
#pragma GCC unroll 4
        for (int r = 0; r < DENSE_TILE; r++) {
            if (r < T && r < R) {
                long off = (n0 + r) * K + k;
#if defined(__AVX512BF16__)
                if (mode == W_BF16_DOT) {
                    const uint16_t *wr = (const uint16_t *)j->w + off;
                    if (pf) _mm_prefetch((const char *)(wr + DENSE_PF * DENSE_TILE * K), _MM_HINT_T1);
                    __m512bh wv = (__m512bh)_mm512_loadu_si512(wr);
#pragma GCC unroll 4
                    for (int m = 0; m < DENSE_MB; m++)
                        if (m < MB)
                            acc[r][m] = _mm512_dpbf16_ps(
                                acc[r][m], wv, (__m512bh)_mm512_loadu_si512((const uint16_t *)x + m * K + k));
                    continue;
                }
#endif
                vec w0, w1;
                if (mode == W_BF16) {
                    const uint16_t *wr = (const uint16_t *)j->w + off;
                    if (pf) _mm_prefetch((const char *)(wr + DENSE_PF * DENSE_TILE * K), _MM_HINT_T1);
                    widen(wr, &w0, &w1);
                } else {
                    const float *wr = (const float *)j->w + off;
                    if (pf) _mm_prefetch((const char *)(wr + DENSE_PF * DENSE_TILE * K), _MM_HINT_T1);
                    if (pf && VW == 16) /* a block is two cache lines */
                        _mm_prefetch((const char *)(wr + DENSE_PF * DENSE_TILE * K + 16), _MM_HINT_T1);
                    w0 = vload(wr);
                    w1 = vload(wr + VW);
                }
                const float *xf = (const float *)x + k;
#pragma GCC unroll 4
                for (int m = 0; m < DENSE_MB; m++) {
                    if (m < MB) {
                        acc[r][m] = vfma(w0, vload(xf + m * K), acc[r][m]);
                        acc[r][m] = vfma(w1, vload(xf + m * K + VW), acc[r][m]);
                    }
                }
            }
        }
    }
#if defined(__AVX512F__)
    /* columns past the last whole block, in natural order, 16 at a time with the rest masked off */
    for (long k = KB; k < K; k += 16)
        for (int r = 0; r < T && r < R; r++) {
            __m512 w = load16_tail(j->w, (n0 + r) * K + k, K - k, mode != W_F32);
            for (int m = 0; m < MB; m++) acc[r][m] = vfma(w, load16_tail(x, m * K + k, K - k, xbf16), acc[r][m]);
        }
#endif
    for (int r = 0; r < T && r < R; r++) {
        long n = n0 + r;
        float b = j->bias ? load_f(j->bias, n, j->bbf16) : 0.0f;
        for (int m = 0; m < MB; m++) {
            float s = vsum(acc[r][m]);
#if !defined(__AVX512F__)
            for (long c = KB; c < K; c++) /* columns past the last whole block keep their natural order */
                s += ((const float *)x)[m * K + c] * load_f(j->w, n * K + c, mode != W_F32);
#endif
            s += b;
            long at = (m0 + m) * j->N + n;
            if (j->ybf16) ((uint16_t *)j->y)[at] = f32_to_bf16(s);
            else ((float *)j->y)[at] = s;
        }
    }
}

/* weights n0..n1-1 against one activation row m0: the same sums in the same order as dense_block(T = 1, MB = 1), in
   a plain loop over the rows. Through dense_block's general tile code, one row at a time streamed 8-15% slower
   from memory (Zen 5, fp32, the same inner loop): its per-row bookkeeping sat between one row's last loads and the
   next's. Software prefetch DENSE_ROW_PF bytes ahead in the stream: the hardware prefetcher stops at each 4 KiB
   page, and weights mapped from a checkpoint file sit in 4 KiB pages (the bench Llama's fp32 weights, 1 thread:
   26-29 -> 29-32 GB/s from the file mapping, 34 -> 36 GB/s from huge pages). 4096 bytes rather than 2048 (Zen 5, 1
   thread, 2048x768 from huge pages, medians of 5 interleaved runs: fp32 32 -> 39 GB/s, bf16 35 -> 37; 6144 no
   better). The distance that keeps a stream fed grows with what one core can read (about bandwidth x latency): on
   an AVX2-only Zen 3 core reading 16-18 GB/s, 1024 bytes beat 4096 (the same harness, medians of 6 interleaved runs:
   fp32 15.5 against 14.7 GB/s, 2048 14.6; the bench model's fp32 decode, 1 thread, 5 of 7 interleaved pairs faster,
   by about 5%; bf16 no different). The AVX2 level takes the shorter one: the CPUs without AVX-512 are the older,
   narrower ones. */
#if defined(__AVX512F__)
#define DENSE_ROW_PF 4096
#else
#define DENSE_ROW_PF 1024
#endif
/* bf16 at x86-64-v3: one row's sum is one chain of fused multiply-adds, two per 32 bytes of weights, and at their
   latency an AVX2 core computed about 13 GB/s of bf16 weights even from L2 (Zen 3 at 2.9 GHz), below what it reads
   from memory. So the plain loop takes four rows at a time, four independent chains, each row's sum in the same order
   as alone: 25 GB/s from L2. Streamed from memory (huge pages, 1 thread, in-process interleaved pairs against one
   row a loop): 2048x768 1.11x, the 50257x768 head 1.01x; 2 threads 1.03x. The 4 rows' run is prefetched in order
   this far ahead (the one-row distance lands behind rows 2-4: 10.9 against 14.2 GB/s); 2 or 8 rows a loop measured
   0.95-1.03x and 0.84-1.16x against 4. AVX-512 keeps one row a loop (vectors twice as wide: on Zen 5 it read bf16
   at 37 GB/s, about the bandwidth). */
#define DENSE_BF16X4_PF 8192
/* output (m0, n) of a plain row loop from its vector sum: lanes summed, the columns past the last whole block (at
   x86-64-v3; AVX-512 folds them into acc first), the bias, stored as fp32 or bf16 */
static inline void dense_row_out(const dense_job *j, const float *xf, long n, long m0, int wbf16, vec acc) {
    float s = vsum(acc);
#if !defined(__AVX512F__)
    const long K = j->K;
    for (long c = K / DENSE_BLK * DENSE_BLK; c < K; c++) s += xf[c] * load_f(j->w, n * K + c, wbf16);
#else
    (void)xf, (void)wbf16;
#endif
    s += j->bias ? load_f(j->bias, n, j->bbf16) : 0.0f;
    long at = m0 * j->N + n;
    if (j->ybf16) ((uint16_t *)j->y)[at] = f32_to_bf16(s);
    else ((float *)j->y)[at] = s;
}

static inline __attribute__((always_inline)) void dense_rows1(const dense_job *j, long n0, long n1, long m0, int mode) {
    const long K = j->K, KB = K / DENSE_BLK * DENSE_BLK;
    const int xbf16 = mode == W_BF16_DOT;
    const char *x = (const char *)j->x + m0 * K * (xbf16 ? 2 : 4);
    const float *xf = (const float *)x;
    long n = n0;
#if !defined(__AVX512F__)
    if (mode == W_BF16) /* four rows at a time, each its own sum in dense_block's order (the same bits) */
        for (; n + 4 <= n1; n += 4) {
            const uint16_t *wr = (const uint16_t *)j->w + n * K;
            vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
            for (long k = 0; k < KB; k += DENSE_BLK) {
                vec w0, w1, x0 = vload(xf + k), x1 = vload(xf + k + VW);
                /* the 4 rows are one contiguous run read at 4 places: fetch it in order, DENSE_BF16X4_PF ahead */
                _mm_prefetch((const char *)(wr + 4 * k) + DENSE_BF16X4_PF, _MM_HINT_T0);
                _mm_prefetch((const char *)(wr + 4 * k) + DENSE_BF16X4_PF + 64, _MM_HINT_T0);
                widen(wr + k, &w0, &w1);
                a0 = vfma(w1, x1, vfma(w0, x0, a0));
                widen(wr + K + k, &w0, &w1);
                a1 = vfma(w1, x1, vfma(w0, x0, a1));
                widen(wr + 2 * K + k, &w0, &w1);
                a2 = vfma(w1, x1, vfma(w0, x0, a2));
                widen(wr + 3 * K + k, &w0, &w1);
                a3 = vfma(w1, x1, vfma(w0, x0, a3));
            }
            dense_row_out(j, xf, n, m0, 1, a0);
            dense_row_out(j, xf, n + 1, m0, 1, a1);
            dense_row_out(j, xf, n + 2, m0, 1, a2);
            dense_row_out(j, xf, n + 3, m0, 1, a3);
        }
#endif
    for (; n < n1; n++) {
        vec acc = vzero();
        if (mode == W_F32) {
            const float *wr = (const float *)j->w + n * K;
            for (long k = 0; k < KB; k += DENSE_BLK) {
                _mm_prefetch((const char *)(wr + k) + DENSE_ROW_PF, _MM_HINT_T0);
                _mm_prefetch((const char *)(wr + k) + DENSE_ROW_PF + 64, _MM_HINT_T0); /* a block: 1-2 lines */
                acc = vfma(vload(wr + k), vload(xf + k), acc);
                acc = vfma(vload(wr + k + VW), vload(xf + k + VW), acc);
            }
        } else if (mode == W_BF16) {
            const uint16_t *wr = (const uint16_t *)j->w + n * K;
            for (long k = 0; k < KB; k += DENSE_BLK) {
                vec w0, w1;
                _mm_prefetch((const char *)(wr + k) + DENSE_ROW_PF, _MM_HINT_T0);
                widen(wr + k, &w0, &w1);
                acc = vfma(w0, vload(xf + k), acc);
                acc = vfma(w1, vload(xf + k + VW), acc);
            }
        }
#if defined(__AVX512BF16__)
        else {
            const uint16_t *wr = (const uint16_t *)j->w + n * K;
            for (long k = 0; k < KB; k += DENSE_BLK) {
                _mm_prefetch((const char *)(wr + k) + DENSE_ROW_PF, _MM_HINT_T0);
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(wr + k),
                                       (__m512bh)_mm512_loadu_si512((const uint16_t *)x + k));
            }
        }
#endif
#if defined(__AVX512F__)
        for (long k = KB; k < K; k += 16)
            acc = vfma(load16_tail(j->w, n * K + k, K - k, mode != W_F32), load16_tail(x, k, K - k, xbf16), acc);
#endif
        dense_row_out(j, xf, n, m0, mode != W_F32, acc);
    }
}

/* one weight tile against every activation row, specialised on the weight format and the rows left */
static inline __attribute__((always_inline)) void dense_tile(const dense_job *j, long n0, int R, int mode) {
    for (long m0 = 0; m0 < j->M; m0 += DENSE_MB) {
        long left = j->M - m0;
        if (left == 1) dense_rows1(j, n0, n0 + R, m0, mode);
        else if (left == 2) dense_block(j, n0, R, DENSE_TILE, m0, 2, mode);
#if defined(__AVX512F__)
        else if (left == 3) dense_block(j, n0, R, DENSE_TILE, m0, 3, mode);
        else dense_block(j, n0, R, DENSE_TILE, m0, 4, mode);
#else
        else { /* 16 accumulators would spill: two halves of 2 weight rows */
            for (int h = 0; h < DENSE_TILE; h += 2) {
                if (left >= 4) dense_block(j, n0 + h, R - h, 2, m0, 4, mode);
                else dense_block(j, n0 + h, R - h, 2, m0, 3, mode);
            }
        }
#endif
    }
}

static void dense_tiles(const void *p, long begin, long end) {
    const dense_job *j = p;
    if (j->M == 1) { /* whole runs of rows, no tile bookkeeping */
        long n0 = begin * DENSE_TILE, n1 = end * DENSE_TILE < j->N ? end * DENSE_TILE : j->N;
        if (j->mode == W_F32) dense_rows1(j, n0, n1, 0, W_F32);
        else if (j->mode == W_BF16) dense_rows1(j, n0, n1, 0, W_BF16);
        else dense_rows1(j, n0, n1, 0, W_BF16_DOT);
        return;
    }
    for (long t = begin; t < end; t++) {
        long n0 = t * DENSE_TILE;
        int R = j->N - n0 < DENSE_TILE ? (int)(j->N - n0) : DENSE_TILE;
        if (j->mode == W_F32) dense_tile(j, n0, R, W_F32);
        else if (j->mode == W_BF16) dense_tile(j, n0, R, W_BF16);
        else dense_tile(j, n0, R, W_BF16_DOT);
    }
}


/* ---- fp32 products of many rows (prefill, encoders): a blocked GEMM with AVX-512 ------------------------------
   y = x W^T (+ bias) for M > 16 rows, all fp32. The weight is first packed in panels of 32 rows (output columns),
   k-major (32 floats a step, rows past N zero; scratch N * K floats, rounded up to 32 rows). Work items are blocks
   of SG_MC activation rows times groups of SG_PG panels, spread over the threads; per block of SG_KC inputs, in
   order, each SG_MR-row group runs against each panel of the item: 2 * SG_MR accumulators, per input k two panel
   vectors and SG_MR broadcast activations, 2 * SG_MR fused multiply-adds. A block's sums start from zero and are added
   to y once per block (the first block stores them), so each output is a sum of K / SG_KC block sums of SG_KC
   products each, in input order, whatever the loop order or thread count: on the bench shapes (K 768-2048) closer
   to the float64 product than torch's MKL sgemm (max error 1.5-3.2e-6 against 2.5-3.4e-6, RMS 2.3-4.1e-7 against
   3.5-5.8e-7) and 1.7-2.1x as fast on the Zen 5 CI machine (MKL's AMD path is 256-bit). The bias is added last.
   The item blocking keeps the activations' block (SG_MC x SG_KC) and the panels' (SG_PG x SG_KC x 32) in L1/L2: a
   loop over whole panels re-read all of x per panel, which at MiniLM's 2,000-row batches made 2 threads barely
   faster than 1. */
#if defined(__AVX512F__)
#define SG_MR 8
#define SG_NR 32
#define SG_KC 64

typedef struct { const float *x, *w, *bias; float *y, *packed; long M, N, K, panels; int gelu; } sg_job;

/* GELU with the error function, x / 2 * (1 + erf(x / sqrt 2)), as torch's exact GELU: erf(z) = 1 - t (a1 + t (a2 +
   t (a3 + t (a4 + t a5)))) e^(-z^2), t = 1 / (1 + p |z|), sign of z (Abramowitz and Stegun 7.1.26, |error| <=
   1.5e-7, the approximation torch's vectorized erf uses too), but 1 + erf(z) for negative z taken as erfc(|z|)
   itself, whose digits torch's 1 + erf loses (x = -5: torch 10% off the true 1.4e-6, this 1e-5). NaN stays NaN,
   and +-inf give NaN, as torch's vectorized GELU gives them. */
static inline __m512 gelu16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)), a = _mm512_abs_ps(z);
    __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one));
    __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
    __m512 e = exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z));
    __m512 q = _mm512_mul_ps(_mm512_mul_ps(r, t), e); /* 1 - erf(|z|) */
    /* 1 + erf(z): 2 - q, or q itself below zero (not 1 - (1 - q), which loses q's digits to rounding) */
    __m512 s = _mm512_mask_sub_ps(q, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GE_OQ), _mm512_set1_ps(2.0f), q);
    __m512 y = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), s);
    return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(a, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ), _mm512_set1_ps(NAN));
}

#define SG_MC 128 /* activation rows per work item: their block of SG_KC inputs (32 KB) stays in L1/L2 */
#define SG_PG 8   /* weight panels per work item (256 outputs): their SG_KC-input blocks (64 KB) stay in L2 */

/* 16 vectors r[0..15] (rows) -> their transpose in place (r[c] = column c): pairs, then 4-row groups within each
   128-bit lane, then the lanes */
static inline void sg_transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);     /* lane L: r0[4L], r1[4L], r0[4L+1], r1[4L+1] */
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]); /* lane L: r0[4L+2], r1[4L+2], r0[4L+3], ... */
    }
    for (int g = 0; g < 4; g++) { /* rows 4g..4g+3: u[4g + c] holds column 4L + c of those rows in lane L */
        u[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
        u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
        u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int c = 0; c < 4; c++) {
        __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
        __m512 w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
        __m512 w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
        r[8 + c] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
        r[4 + c] = _mm512_shuffle_f32x4(v1, w1, 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    }
}

/* weight panel p (rows 32p..32p+31) -> packed + p * K * 32, k-major (32 floats a step), rows past N zero: blocks of
   16 rows x 16 inputs transposed in registers (an element-by-element copy with 128-byte strided stores took 3-4% of
   an encoder's time at 2,048-row batches) */
static void sg_pack(const void *vp, long begin, long end) {
    const sg_job *j = vp;
    long N = j->N, K = j->K;
    for (long pn = begin; pn < end; pn++) {
        float *p = j->packed + pn * K * SG_NR;
        for (long k0 = 0; k0 < K; k0 += 16) {
            const long kn = K - k0 < 16 ? K - k0 : 16;
            const __mmask16 km = kn == 16 ? (__mmask16)0xffff : (__mmask16)((1u << kn) - 1);
            for (int h = 0; h < SG_NR; h += 16) {
                __m512 r[16];
                for (int i = 0; i < 16; i++) {
                    long n = pn * SG_NR + h + i;
                    r[i] = n < N ? _mm512_maskz_loadu_ps(km, j->w + n * K + k0) : _mm512_setzero_ps();
                }
                sg_transpose16(r);
                for (long kk = 0; kk < kn; kk++) _mm512_storeu_ps(p + (k0 + kk) * SG_NR + h, r[kk]);
            }
        }
    }
}
/* rows a[0..mr) (stride lda) times the packed block p (kc steps) into c (stride ldc): stored (first block) or added */
static inline __attribute__((always_inline)) void sg_micro(const float *a, long lda, const float *p, long kc,
                                                           float *c, long ldc, int mr, __mmask16 m0, __mmask16 m1,
                                                           int first) {
    __m512 acc[SG_MR][2];
    for (int i = 0; i < SG_MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (long k = 0; k < kc; k++) {
        __m512 b0 = _mm512_loadu_ps(p + k * SG_NR), b1 = _mm512_loadu_ps(p + k * SG_NR + 16);
        for (int i = 0; i < SG_MR; i++) {
            if (i < mr) {
                __m512 av = _mm512_set1_ps(a[i * lda + k]);
                acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
            }
        }
    }
    for (int i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        if (!first) {
            acc[i][0] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, ci), acc[i][0]);
            acc[i][1] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, ci + 16), acc[i][1]);
        }
        _mm512_mask_storeu_ps(ci, m0, acc[i][0]);
        _mm512_mask_storeu_ps(ci + 16, m1, acc[i][1]);
    }
}

/* the lanes of a panel's two vectors that hold outputs n0..N-1 (the last panel may be partial) */
static inline void sg_masks(long left, __mmask16 *m0, __mmask16 *m1) {
    *m0 = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
    *m1 = left >= 32 ? 0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
}

/* work item i: rows of m-block i / groups, outputs of panel group i % groups; per block of SG_KC inputs, in
   order, every SG_MR-row group of the item against each of its panels (the same sums as any other loop order) */
static void sg_items(const void *vp, long begin, long end) {
    const sg_job *j = vp;
    long M = j->M, N = j->N, K = j->K, groups = (j->panels + SG_PG - 1) / SG_PG;
    for (long it = begin; it < end; it++) {
        long m_lo = it / groups * SG_MC, m_hi = m_lo + SG_MC < M ? m_lo + SG_MC : M;
        long p_lo = it % groups * SG_PG, p_hi = p_lo + SG_PG < j->panels ? p_lo + SG_PG : j->panels;
        for (long k0 = 0; k0 < K; k0 += SG_KC) {
            long kc = K - k0 < SG_KC ? K - k0 : SG_KC;
            int first = k0 == 0;
            for (long m = m_lo; m < m_hi; m += SG_MR) {
                const float *a = j->x + m * K + k0;
                for (long pn = p_lo; pn < p_hi; pn++) {
                    long n0 = pn * SG_NR;
                    __mmask16 m0, m1;
                    sg_masks(N - n0, &m0, &m1);
                    const float *p = j->packed + pn * K * SG_NR + k0 * SG_NR;
                    float *c = j->y + m * N + n0;
                    switch (m_hi - m < SG_MR ? m_hi - m : SG_MR) {
                    case 1: sg_micro(a, K, p, kc, c, N, 1, m0, m1, first); break;
                    case 2: sg_micro(a, K, p, kc, c, N, 2, m0, m1, first); break;
                    case 3: sg_micro(a, K, p, kc, c, N, 3, m0, m1, first); break;
                    case 4: sg_micro(a, K, p, kc, c, N, 4, m0, m1, first); break;
                    case 5: sg_micro(a, K, p, kc, c, N, 5, m0, m1, first); break;
                    case 6: sg_micro(a, K, p, kc, c, N, 6, m0, m1, first); break;
                    case 7: sg_micro(a, K, p, kc, c, N, 7, m0, m1, first); break;
                    default: sg_micro(a, K, p, kc, c, N, SG_MR, m0, m1, first); break;
                    }
                }
            }
        }
        if (j->bias || j->gelu) /* the bias, then GELU, while the item's outputs are still in cache */
            for (long pn = p_lo; pn < p_hi; pn++) {
                long n0 = pn * SG_NR;
                __mmask16 m0, m1;
                sg_masks(N - n0, &m0, &m1);
                __m512 b0 = _mm512_setzero_ps(), b1 = b0;
                if (j->bias)
                    b0 = _mm512_maskz_loadu_ps(m0, j->bias + n0), b1 = _mm512_maskz_loadu_ps(m1, j->bias + n0 + 16);
                for (long m = m_lo; m < m_hi; m++) {
                    float *c = j->y + m * N + n0;
                    __m512 y0 = _mm512_maskz_loadu_ps(m0, c), y1 = _mm512_maskz_loadu_ps(m1, c + 16);
                    if (j->bias) y0 = _mm512_add_ps(y0, b0), y1 = _mm512_add_ps(y1, b1);
                    if (j->gelu) y0 = gelu16(y0), y1 = gelu16(y1);
                    _mm512_mask_storeu_ps(c, m0, y0);
                    _mm512_mask_storeu_ps(c + 16, m1, y1);
                }
            }
    }
}

int loom_dense_blocked(void) { return 1; }

/* Scratch: the packed weight, N rounded up to 32 times K floats. Returns 0, or -1 when out of memory. */
static int sg_gemm(const float *x, const float *w, const float *bias, float *y, long M, long N, long K, int gelu,
                   int threads) {
    long panels = (N + SG_NR - 1) / SG_NR, mblocks = (M + SG_MC - 1) / SG_MC;
    float *packed = aligned_alloc(64, sizeof(float) * (size_t)(panels * SG_NR * K + 16));
    if (!packed) return -1;
    sg_job job = {x, w, bias, y, packed, M, N, K, panels, gelu};
    if (M * N * K < (1L << 21)) threads = 1; /* a few dozen microseconds: not worth waking a helper */
    parallel_run(sg_pack, &job, panels, chunk_for(panels, threads), threads);
    long items = mblocks * ((panels + SG_PG - 1) / SG_PG);
    parallel_run(sg_items, &job, items, 1, threads);
    free(packed);
    return 0;
}
/* y = GELU(x W^T + bias) for fp32 x (M > 16 rows), W, bias (or NULL): the blocked GEMM with GELU (gelu16) applied
   to each output once its sum and bias are in. Returns 0, -1 when out of scratch memory. */
int loom_dense_gelu(const float *x, const float *w, const float *bias, float *y, long M, long N, long K, int threads) {
    if (M <= 0 || N <= 0) return 0;
    return sg_gemm(x, w, bias, y, M, N, K, 1, threads);
}
#else
int loom_dense_blocked(void) { return 0; }

int loom_dense_gelu(const float *x, const float *w, const float *bias, float *y, long M, long N, long K, int threads) {
    (void)x, (void)w, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)threads;
    return -2; /* no blocked GEMM at this level: policy.fp32_gemm_takes says no first */
}
#endif

/* x is fp32 (xbf16 = 0) or bf16; w, bias, y each fp32 or bf16. Returns 0, or -1 when out of scratch memory. */
int loom_dense_gemm(const void *x, int xbf16, const void *w, int wbf16, const void *bias, int bbf16, void *y,
                    int ybf16, long M, long N, long K, int threads) {
    if (M <= 0 || N <= 0) return 0;
#if defined(__AVX512F__)
    if (M > 16 && K > 0 && !xbf16 && !wbf16 && !bbf16 && !ybf16) return sg_gemm(x, w, bias, y, M, N, K, 0, threads);
#endif
    int mode = !wbf16 ? W_F32 : W_BF16;
#if defined(__AVX512BF16__)
    if (wbf16 && xbf16) mode = W_BF16_DOT;
#endif
    float *xf = NULL;
    if (mode != W_BF16_DOT && (xbf16 || wbf16)) {
        xf = malloc(sizeof(float) * M * K);
        if (!xf) return -1;
        long whole = wbf16 ? K / DENSE_BLK * DENSE_BLK : 0; /* the columns of whole blocks are reordered (see top) */
        for (long m = 0; m < M; m++) {
            for (long c = 0; c < K; c++) {
                long src = c;
                if (c < whole) {
                    long p = c % DENSE_BLK, q = p % VW; /* position in the block, in its half */
                    src = c - p + q / 4 * 8 + q % 4 + (p >= VW ? 4 : 0);
                }
                xf[m * K + c] = load_f(x, m * K + src, xbf16);
            }
        }
    }
    dense_job job = {xf ? xf : x, w, bias, y, M, N, K, mode, bbf16, ybf16};
    long tiles = (N + DENSE_TILE - 1) / DENSE_TILE;
    /* a MoE router's few outputs: a few microseconds of work, not worth waking a helper (each row's sum is the same
       on any thread, so this changes no value) */
    if (M * N * K < (1L << 15)) threads = 1;
    parallel_run(dense_tiles, &job, tiles, chunk_for(tiles, threads), threads);
    free(xf);
    return 0;
}
