#include "common.h"

/* Dense small-M GEMM: y (M, N) = x (M, K) @ W (N, K).T + bias, W fp32 or bf16.
   For decode-sized inputs (M <= 16 rows): the weight is streamed once from memory and each loaded (and, for bf16,
   widened) weight vector is used for up to 4 activation rows. Activations are converted to fp32 once per call
   (bf16 weights: each 16-block reordered to columns 0-3, 8-11, 4-7, 12-15, the order in which unpacking 16 bf16
   with zeros below yields two fp32 vectors); sums are fp32, and bf16 outputs are rounded to nearest even. */
#define DENSE_MB 4
#define DENSE_PF 2 /* prefetch the same columns this many tiles ahead */

typedef struct {
    const float *x; const void *w; const void *bias; void *y; long M, N, K; int wbf16, bbf16, ybf16;
} dense_job;

/* weights n0..n0+T-1 (T <= TILE, R of them real) against activation rows m0..m0+MB-1 (MB <= DENSE_MB) */
static inline __attribute__((always_inline)) void dense_block(const dense_job *j, long n0, int R, int T, long m0,
                                                              int MB) {
    const long K = j->K, K16 = K / 16 * 16;
    const float *x = j->x + m0 * K;
    __m256 acc[TILE][DENSE_MB];
    for (int r = 0; r < TILE; r++)
        for (int m = 0; m < DENSE_MB; m++) acc[r][m] = _mm256_setzero_ps();
    for (long k = 0; k < K16; k += 16) {
#pragma GCC unroll 4
        for (int r = 0; r < TILE; r++) {
            if (r < T && r < R) {
                __m256 w0, w1;
                if (j->wbf16) {
                    const uint16_t *wr = (const uint16_t *)j->w + (n0 + r) * K + k;
                    _mm_prefetch((const char *)(wr + DENSE_PF * TILE * K), _MM_HINT_T0);
                    __m256i v = _mm256_loadu_si256((const __m256i *)wr);
                    w0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
                    w1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v));
                } else {
                    const float *wr = (const float *)j->w + (n0 + r) * K + k;
                    _mm_prefetch((const char *)(wr + DENSE_PF * TILE * K), _MM_HINT_T0);
                    w0 = _mm256_loadu_ps(wr);
                    w1 = _mm256_loadu_ps(wr + 8);
                }
#pragma GCC unroll 4
                for (int m = 0; m < DENSE_MB; m++) {
                    if (m < MB) {
                        acc[r][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[r][m]);
                        acc[r][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[r][m]);
                    }
                }
            }
        }
    }
    for (int r = 0; r < T && r < R; r++) {
        long n = n0 + r;
        float b = 0;
        if (j->bias) b = j->bbf16 ? bf16_to_f32(((const uint16_t *)j->bias)[n]) : ((const float *)j->bias)[n];
        for (int m = 0; m < MB; m++) {
            float s = hsum(acc[r][m]);
            for (long c = K16; c < K; c++) /* columns past the last whole 16-block keep their natural order */
                s += x[m * K + c] * (j->wbf16 ? bf16_to_f32(((const uint16_t *)j->w)[n * K + c])
                                              : ((const float *)j->w)[n * K + c]);
            s += b;
            long at = (m0 + m) * j->N + n;
            if (j->ybf16) ((uint16_t *)j->y)[at] = f32_to_bf16(s);
            else ((float *)j->y)[at] = s;
        }
    }
}

static void dense_tiles(const void *p, long begin, long end) {
    const dense_job *j = p;
    for (long t = begin; t < end; t++) {
        long n0 = t * TILE;
        int R = j->N - n0 < TILE ? (int)(j->N - n0) : TILE;
        for (long m0 = 0; m0 < j->M; m0 += DENSE_MB) {
            long left = j->M - m0;
            /* 1-2 rows: 4 weight rows at a time; 3-4 rows: two halves of 2 (16 accumulators would spill) */
            if (left == 1) dense_block(j, n0, R, TILE, m0, 1);
            else if (left == 2) dense_block(j, n0, R, TILE, m0, 2);
            else {
                int mb = left >= DENSE_MB ? DENSE_MB : 3;
                for (int h = 0; h < TILE; h += 2) {
                    if (mb == 4) dense_block(j, n0 + h, R - h, 2, m0, 4);
                    else dense_block(j, n0 + h, R - h, 2, m0, 3);
                }
            }
        }
    }
}

/* x is fp32 (xbf16 = 0) or bf16; w, bias, y each fp32 or bf16. Returns 0, or -1 when out of scratch memory. */
int loom_dense_gemm(const void *x, int xbf16, const void *w, int wbf16, const void *bias, int bbf16, void *y,
                    int ybf16, long M, long N, long K, int threads) {
    if (M <= 0 || N <= 0) return 0;
    float *xf = NULL;
    if (xbf16 || wbf16) {
        xf = malloc(sizeof(float) * M * K);
        if (!xf) return -1;
        static const int order[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15}; /* see top */
        long whole = wbf16 ? K / 16 * 16 : 0; /* columns past the last whole 16-block keep their natural order */
        for (long m = 0; m < M; m++) {
            float *dst = xf + m * K;
            for (long c = 0; c < K; c++) {
                long src = m * K + (c < whole ? c - c % 16 + order[c % 16] : c);
                dst[c] = xbf16 ? bf16_to_f32(((const uint16_t *)x)[src]) : ((const float *)x)[src];
            }
        }
    }
    dense_job job = {xf ? xf : (const float *)x, w, bias, y, M, N, K, wbf16, bbf16, ybf16};
    long tiles = (N + TILE - 1) / TILE;
    parallel_run(dense_tiles, &job, tiles, chunk_for(tiles, threads), threads);
    free(xf);
    return 0;
}
