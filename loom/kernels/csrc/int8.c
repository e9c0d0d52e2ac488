#include "common.h"

/* loom weight-only GEMM kernels: y (M, N) = x (M, K) fp32 @ dequant(W).T, W int8 per-row or packed int4 per-group.
   int8: each activation row is quantized once per call to int16 (one scale per row), then 16 weights at a time are
   sign-extended to int16 and multiplied pairwise into int32 (vpmaddwd): 3 instructions per 16 weights instead of 3
   per 8 with a fp32 widen + FMA, which matters on CPUs that split 256-bit ops in two (AMD Zen 1).
   int4: the same int16 activations; 32 weights at a time are unpacked from 16 bytes to int16 nibbles (3
   instructions) and multiplied pairwise into int32 group sums, which get scale and zero 8 groups at a time.
   Four weight rows share each activation load; two activation rows share each widened/unpacked weight. */
static inline __m256 widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* rows n0..n0+R-1 (R <= TILE) of an int8 weight against one fp32 activation row; used for rows holding inf/NaN,
   which have no int16 scale, so they propagate exactly as in a float matmul */
static inline __attribute__((always_inline)) void int8_rows(const float *x, const int8_t *w, const float *scale,
                                                            float *y, long n0, int R, long K) {
    __m256 a[TILE], b[TILE];
    for (int r = 0; r < TILE; r++) { a[r] = _mm256_setzero_ps(); b[r] = _mm256_setzero_ps(); }
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
#pragma GCC unroll 4
        for (int r = 0; r < TILE; r++) {
            if (r < R) {
                const int8_t *wr = w + (n0 + r) * K + k;
                a[r] = _mm256_fmadd_ps(widen8(wr), x0, a[r]);
                b[r] = _mm256_fmadd_ps(widen8(wr + 8), x1, b[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const int8_t *wr = w + (n0 + r) * K;
        float s = hsum(_mm256_add_ps(a[r], b[r]));
        for (long j = k; j < K; j++) s += (float)wr[j] * x[j];
        y[n0 + r] = s * scale[n0 + r];
    }
}

/* activation row -> q = round(x / s) in int16 with s = max|x| / 32767, so |q| <= 32767 and each element is off by
   at most s / 2 (1.5e-5 of max|x|). Returns s, or NAN when the row holds inf/NaN (then the fp32 path is used). */
float quantize_row(const float *x, int16_t *q, long K) {
    float amax = 0;
    int finite = 1;
    for (long k = 0; k < K; k++) {
        float v = fabsf(x[k]);
        finite &= v <= 3.4028235e38f; /* false for inf and NaN */
        amax = v > amax ? v : amax;
    }
    if (!finite) return NAN;
    float inv = amax > 0 ? 32767.0f / amax : 0.0f;
    const __m256 vinv = _mm256_set1_ps(inv);
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
        __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
        /* packs works per 128-bit lane: (lo0-3, hi0-3 | lo4-7, hi4-7); the permute restores column order */
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
    }
    for (; k < K; k++) q[k] = (int16_t)lrintf(x[k] * inv);
    return amax / 32767.0f;
}

/* int32 accumulators are flushed into fp32 ones every FLUSH steps of 16 columns. Each vpmaddwd lane adds two
   products of |w| <= 128 and |q| <= 32767, at most 8,388,352, so a lane holds at most 256 * 8,388,352 =
   2,147,418,112 < 2^31 - 1 = 2,147,483,647 after 256 steps: no overflow for any K. */
#define FLUSH 256
#define PF_TILES 2

/* rows n0..n0+R-1 (R <= TILE) of an int8 weight against MB (1 or 2) int16-quantized activation rows (xq, stride K;
   scales xs); with MB 2 each widened weight vector serves both rows */
static inline __attribute__((always_inline)) void int8_rows_q(const int16_t *xq, const float *xs, int MB,
                                                              const int8_t *w, const float *scale, float *y, long N,
                                                              long n0, int R, long K) {
    __m256 f[TILE][2];
    for (int r = 0; r < TILE; r++) f[r][0] = f[r][1] = _mm256_setzero_ps();
    long k = 0;
    while (k + 16 <= K) {
        long stop = K - k > 16L * FLUSH ? k + 16L * FLUSH : K;
        __m256i a[TILE][2];
        for (int r = 0; r < TILE; r++) a[r][0] = a[r][1] = _mm256_setzero_si256();
        for (; k + 16 <= stop; k += 16) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + k));
            __m256i x1 = MB == 2 ? _mm256_loadu_si256((const __m256i *)(xq + K + k)) : x0;
            /* the TILE rows take one cache line per step; fetch the matching line PF_TILES tiles ahead, since the
               hardware prefetcher ramps up too slowly on rows as short as 768 bytes */
            _mm_prefetch((const char *)(w + (n0 + PF_TILES * TILE) * K + TILE * k), _MM_HINT_T0);
#pragma GCC unroll 4
            for (int r = 0; r < TILE; r++) {
                if (r < R) {
                    __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + (n0 + r) * K + k)));
                    a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(wv, x0));
                    if (MB == 2) a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(wv, x1));
                }
            }
        }
        for (int r = 0; r < TILE; r++)
            for (int m = 0; m < MB; m++) f[r][m] = _mm256_add_ps(f[r][m], _mm256_cvtepi32_ps(a[r][m]));
    }
    for (int m = 0; m < MB; m++) {
        for (int r = 0; r < R; r++) {
            const int8_t *wr = w + (n0 + r) * K;
            int32_t tail = 0; /* < 16 products, at most 15 * 128 * 32767 */
            for (long j = k; j < K; j++) tail += (int32_t)wr[j] * xq[m * K + j];
            y[m * N + n0 + r] = (hsum(f[r][m]) + (float)tail) * xs[m] * scale[n0 + r];
        }
    }
}

typedef struct {
    const float *x; const int16_t *xq; const float *xs; const int8_t *w; const float *scale; float *y; long M, N, K;
} int8_job;

static void int8_tiles(const void *p, long begin, long end) {
    const int8_job *j = p;
    const float *x = j->x, *xs = j->xs, *scale = j->scale;
    const int16_t *xq = j->xq;
    const int8_t *w = j->w;
    float *y = j->y;
    long M = j->M, N = j->N, K = j->K;
    for (long t = begin; t < end; t++) {
        long n0 = t * TILE;
        int R = N - n0 < TILE ? (int)(N - n0) : TILE;
        for (long m = 0; m < M;) {
            const int16_t *xm = xq + m * K;
            float *ym = y + m * N;
            if (isnan(xs[m])) {
                if (R == TILE) int8_rows(x + m * K, w, scale, ym, n0, TILE, K);
                else for (int r = 0; r < R; r++) int8_rows(x + m * K, w, scale, ym, n0 + r, 1, K);
                m += 1;
            } else if (m + 1 < M && !isnan(xs[m + 1])) {
                if (R == TILE) int8_rows_q(xm, xs + m, 2, w, scale, ym, N, n0, TILE, K);
                else for (int r = 0; r < R; r++) int8_rows_q(xm, xs + m, 2, w, scale, ym, N, n0 + r, 1, K);
                m += 2;
            } else {
                if (R == TILE) int8_rows_q(xm, xs + m, 1, w, scale, ym, N, n0, TILE, K);
                else for (int r = 0; r < R; r++) int8_rows_q(xm, xs + m, 1, w, scale, ym, N, n0 + r, 1, K);
                m += 1;
            }
        }
    }
}

/* Returns 0, or -1 when out of memory for the int16 activations. */
int loom_int8_gemm(const float *x, const int8_t *w, const float *scale, float *y, long M, long N, long K,
                   int threads) {
    if (M <= 0) return 0;
    float *xs = malloc(sizeof(float) * M + sizeof(int16_t) * M * K);
    if (!xs) return -1;
    int16_t *xq = (int16_t *)(xs + M);
    for (long m = 0; m < M; m++) xs[m] = quantize_row(x + m * K, xq + m * K, K);
    int8_job job = {x, xq, xs, w, scale, y, M, N, K};
    long tiles = (N + TILE - 1) / TILE;
    parallel_run(int8_tiles, &job, tiles, chunk_for(tiles, threads), threads);
    free(xs);
    return 0;
}
