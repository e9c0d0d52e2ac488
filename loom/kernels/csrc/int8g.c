/* group-wise int8 weight-only GEMM: y (M, N) = x (M, K) fp32 @ W.T with W[n, k] = w[n, k] * scale[n, k / G]:
   int8 weights, one float16 or float32 scale per group of G inputs of a row (GGUF's Q8_0 is G = 32 with float16
   scales, loaded here without any re-quantization).

   The arithmetic, the same at every level, for every row count, and in the torch fallback
   (loom/kernels/ops.py int8_group_reference), so that all of them give bit-identical results:
   - each activation row is rounded to int16 once per call (quantize_row, one scale xs per row, as int8.c);
   - within a group b of row n, lane l (0-7) sums the products w * q of the columns 16s + 2l and 16s + 2l + 1 of
     the group (s = 0 .. G/16 - 1: the int32 lanes vpmaddwd fills from 16 columns) exactly as an integer (below
     G / 8 * 128 * 32767 < 2^31 for G <= INT8G_MAX_G = 512);
   - that lane sum is converted to float32 (exact up to G = 32, rounded to nearest above) and multiplied by the
     group's scale in float32, and added to the float32 lane total t[l], groups in increasing order;
   - y = (((t0 + t4) + (t2 + t6)) + ((t1 + t5) + (t3 + t7))) * xs in float32.
   Float32 after the exact integer sums is llama.cpp's precision too; the error it adds (a few float32 roundings)
   is far below that of the int16 activations (up to max|x| / 65534 per element). Keeping the lanes apart until
   the end costs one convert, multiply and add per group instead of a horizontal sum per group (measured 10-15%
   faster at 1-4 rows than reducing each group to one int32 first, whose shuffles competed with the widening).
   Rows holding inf/NaN have no int16 scale; they take the same lanes and order with products of x itself (summed
   in double per lane) and no xs (row_exact), so inf and NaN propagate as in a float matmul.

   Decode and prefill share one kernel: TILE weight rows against up to MAXMB activation rows per pass. At decode
   sizes (M <= ROW_CHUNK) each weight tile is read from memory once and every pass over it hits L1; for more rows
   the activations are taken ROW_CHUNK rows at a time (ROW_CHUNK * K * 2 bytes of int16, kept in L2) and the
   weight is streamed once per chunk. Nothing is dequantized; the scratch is the int16 activations (M * K * 2
   bytes). Weight vectors are 256-bit at every level, as in int8.c's decode (Zen 4 streamed weights slower with
   512-bit ops); AVX-512 brings 32 registers (4 activation rows per pass instead of 2) and VNNI's fused vpdpwssd
   from 3 rows on. */
#include "common.h"

#define INT8G_MAX_G 512 /* 512 * 128 * 32767 = 2,147,418,112 < 2^31 - 1: a group's int32 sum cannot overflow */
#define PF_TILES 2      /* prefetch distance in tiles, as in int8.c */
#define ROW_CHUNK 64    /* activation rows per sweep over the weight */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MAXMB 4
#else
#define MAXMB 2
#endif

#define g_widen(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define g_load(p) _mm256_loadu_si256((const __m256i *)(p))
/* vpdpwssd only from 3 rows up, for int8.c's reason (at 1-2 rows its longer accumulate chains slowed the stream) */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define g_dot(acc, a, b) (MB >= 3 ? _mm256_dpwssd_epi32(acc, a, b) : _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)))
#else
#define g_dot(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#endif

/* the scales of groups i..i+n-1 (n <= 8, the rest 0) of one row as 8 floats */
static inline __m256 scales8(const void *p, long i, int n, int half) {
    if (n == 8)
        return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
                    : _mm256_loadu_ps((const float *)p + i);
    float t[8] = {0};
    for (int j = 0; j < n; j++) t[j] = load_param(p, i + j, half);
    return _mm256_loadu_ps(t);
}

/* the 8 lane totals in the fixed order ((t0 + t4) + (t2 + t6)) + ((t1 + t5) + (t3 + t7)) */
static inline float hsum_slots(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_extractf128_ps(v, 0), _mm256_extractf128_ps(v, 1)); /* s0+s4 .. s3+s7 */
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));                                             /* (v0+v2), (v1+v3) */
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

typedef struct {
    const float *x; const int16_t *xq; const float *xs; const int8_t *w; const void *scale; int half; float *y;
    long M, N, K, G, Kq;
} int8g_job;

/* one output of a row holding inf/NaN: the kernel's lanes and order with products of x itself (summed in double
   per lane) and no row scale */
static float row_exact(const int8g_job *j, long m, long n) {
    const float *x = j->x + m * j->K;
    const int8_t *w = j->w + n * j->K;
    long G = j->G, ng = j->K / G;
    float t[8] = {0};
    for (long b = 0; b < ng; b++) {
        float s = load_param(j->scale, n * ng + b, j->half);
        for (int l = 0; l < 8; l++) {
            double lane = 0;
            for (long c = b * G + 2 * l; c < (b + 1) * G; c += 16)
                lane += (double)x[c] * w[c] + (double)x[c + 1] * w[c + 1];
            t[l] += (float)lane * s;
        }
    }
    float v0 = t[0] + t[4], v1 = t[1] + t[5], v2 = t[2] + t[6], v3 = t[3] + t[7];
    return (v0 + v2) + (v1 + v3);
}

/* named accumulators (an array of vectors was kept on the stack by gcc in int8.c's measurements); one line per
   (weight row r, activation row m) */
#if MAXMB == 4
#define GROWS(X, r) X(r, 0) X(r, 1) X(r, 2) X(r, 3)
#else
#define GROWS(X, r) X(r, 0) X(r, 1)
#endif
#define GTILE(X) GROWS(X, 0) GROWS(X, 1) GROWS(X, 2) GROWS(X, 3)

/* weight rows n0..n0+R-1 (R <= TILE) against MB activation rows from m0 (int16, stride Kq); G is a constant (32,
   GGUF's Q8_0) or the job's group size, so the common case compiles with its group loop unrolled */
static inline __attribute__((always_inline)) void g_tile(const int8g_job *j, long m0, int MB, long n0, int R, long G) {
    const int16_t *xq = j->xq + m0 * j->Kq;
    const int8_t *w = j->w;
    long K = j->K, Kq = j->Kq, ng = K / G;
#define G_TOT(r, m) __m256 t##r##m = _mm256_setzero_ps();
    GTILE(G_TOT)
    float sc[TILE][8];
    for (long g0 = 0; g0 < ng; g0 += 8) {
        int nb = ng - g0 < 8 ? (int)(ng - g0) : 8;
        for (int r = 0; r < R; r++) _mm256_storeu_ps(sc[r], scales8(j->scale, (n0 + r) * ng + g0, nb, j->half));
        for (int gi = 0; gi < nb; gi++) {
#define G_DECL(r, m) __m256i a##r##m = _mm256_setzero_si256();
            GTILE(G_DECL)
            long k0 = (g0 + gi) * G;
            for (long k = k0; k < k0 + G; k += 16) {
                __m256i x0 = g_load(xq + k), x1 = MB > 1 ? g_load(xq + Kq + k) : x0;
#if MAXMB == 4
                __m256i x2 = MB > 2 ? g_load(xq + 2 * Kq + k) : x0, x3 = MB > 3 ? g_load(xq + 3 * Kq + k) : x0;
#endif
                /* the TILE rows take TILE * 16 bytes per step: fetch as many PF_TILES tiles ahead (as int8.c) */
                _mm_prefetch((const char *)(w + (n0 + PF_TILES * TILE) * K + TILE * k), _MM_HINT_T1);
                __m256i w0 = g_widen(w + n0 * K + k);
                __m256i w1 = R > 1 ? g_widen(w + (n0 + 1) * K + k) : w0;
                __m256i w2 = R > 2 ? g_widen(w + (n0 + 2) * K + k) : w0;
                __m256i w3 = R > 3 ? g_widen(w + (n0 + 3) * K + k) : w0;
#define G_DOT(r, m) if (r < R && m < MB) a##r##m = g_dot(a##r##m, w##r, x##m);
                GTILE(G_DOT)
            }
            /* lane sums times the group's scale, added lane by lane (a separate multiply and add, as the fallback) */
#define G_ACC(r, m) \
    if (r < R && m < MB) t##r##m = _mm256_add_ps(t##r##m, _mm256_mul_ps(_mm256_cvtepi32_ps(a##r##m), s##r));
            __m256 s0 = _mm256_broadcast_ss(&sc[0][gi]);
            __m256 s1 = R > 1 ? _mm256_broadcast_ss(&sc[1][gi]) : s0;
            __m256 s2 = R > 2 ? _mm256_broadcast_ss(&sc[2][gi]) : s0;
            __m256 s3 = R > 3 ? _mm256_broadcast_ss(&sc[3][gi]) : s0;
            GTILE(G_ACC)
        }
    }
#define G_STORE(r, m) if (r < R && m < MB) j->y[(m0 + m) * j->N + n0 + r] = hsum_slots(t##r##m) * j->xs[m0 + m];
    GTILE(G_STORE)
}

static void g_rows(const int8g_job *j, long m0, int MB, long n0, int R) {
#define G_TILE(mb, n, rr) if (j->G == 32) g_tile(j, m0, mb, n, rr, 32); else g_tile(j, m0, mb, n, rr, j->G);
#define G_CASE(mb)                                                                   \
    case mb:                                                                         \
        if (R == TILE) { G_TILE(mb, n0, TILE) }                                      \
        else for (int r = 0; r < R; r++) { G_TILE(mb, n0 + r, 1) }                   \
        break;
    switch (MB) {
        G_CASE(1) G_CASE(2)
#if MAXMB == 4
        G_CASE(3) G_CASE(4)
#endif
    }
#undef G_CASE
#undef G_TILE
}

static void g_tiles(const void *p, long begin, long end) {
    const int8g_job *j = p;
    /* up to 4 rows, passes of 2 (vpmaddwd), as int8.c's decode */
    int maxmb = j->M <= 4 ? (MAXMB < 2 ? MAXMB : 2) : MAXMB;
    for (long c0 = 0; c0 < j->M; c0 += ROW_CHUNK) {
        long c1 = c0 + ROW_CHUNK < j->M ? c0 + ROW_CHUNK : j->M;
        for (long t = begin; t < end; t++) {
            long n0 = t * TILE;
            int R = j->N - n0 < TILE ? (int)(j->N - n0) : TILE;
            for (long m = c0; m < c1;) {
                if (isnan(j->xs[m])) {
                    for (int r = 0; r < R; r++) j->y[m * j->N + n0 + r] = row_exact(j, m, n0 + r);
                    m += 1;
                    continue;
                }
                int mb = 1;
                while (mb < maxmb && m + mb < c1 && !isnan(j->xs[m + mb])) mb++;
                g_rows(j, m, mb, n0, R);
                m += mb;
            }
        }
    }
}

/* Returns 0, or -1 when out of memory for the int16 activations. G must divide K, be a multiple of 16 and at
   most INT8G_MAX_G (the operator checks). */
int loom_int8_group_gemm(const float *x, const int8_t *w, const void *scale, int half, float *y, long M, long N,
                         long K, long G, int threads) {
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0) { memset(y, 0, sizeof(float) * M * N); return 0; }
    long Kq = (K + 63) / 64 * 64; /* int16 rows padded with zeros */
    float *xs = malloc(sizeof(float) * M + sizeof(int16_t) * M * Kq + 64);
    if (!xs) return -1;
    int16_t *xq = (int16_t *)(xs + M);
    quantize_rows(x, xq, xs, M, K, Kq, threads);
    int8g_job job = {x, xq, xs, w, scale, half, y, M, N, K, G, Kq};
    long tiles = (N + TILE - 1) / TILE;
    parallel_run(g_tiles, &job, tiles, chunk_for(tiles, threads), threads);
    free(xs);
    return 0;
}
