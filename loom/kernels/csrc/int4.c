/* int4 group-wise weight-only GEMM (a decode kernel and a blocked GEMM for many rows) and dequantization (the
   asymmetric quantizer is in int4_quantize.c). */
#include "common.h"

#define PF_TILES 2 /* prefetch distance in tiles, as in int8.c */

/* activation row -> each 16-block reordered to (even columns, odd columns), matching the nibble order of a byte
   run (low nibble = even column); plus the sum of x over each quantization group for the zero-point term. Only
   for the fp32 path (group sizes the int16 path does not handle). */
static void int4_prepare(const float *x, float *xp, float *gsum, long K, long G) {
    for (long b = 0; b < K; b += 16)
        for (int j = 0; j < 8; j++) { xp[b + j] = x[b + 2 * j]; xp[b + 8 + j] = x[b + 2 * j + 1]; }
    for (long g = 0; g < K / G; g++) {
        float s = 0;
        for (long j = 0; j < G; j++) s += x[g * G + j];
        gsum[g] = s;
    }
}

/* group sums of one int16 row, zero-padded to whole blocks of 8 groups */
#define QSTRIDE(ng) (((ng) + 7) / 8 * 8)

/* int16 activation row (from quantize_row) -> each 32-block reordered to (16 even columns, 16 odd columns), the
   order of the low and high nibbles of 16 packed bytes; plus the exact integer sum of q over each group. The
   zero-point term uses this sum of the rounded q, not of fp32 x, so the kernel computes exactly
   sum_k (nibble_k - zero) * scale * q_k * xs: the dequantized weight times the rounded activations, and the only
   error beyond fp32 rounding is that of q, at most xs / 2 per element, so |error| <= max|x| / 65534 * sum|w|.
   With fp32 sums the zero term would not cancel the rounding in the nibble term, an extra error up to
   |zero * scale| * G * xs / 2 per group even where the dequantized weights are near 0. */
static void int4_prepare_q(const int16_t *q, int16_t *xr, int32_t *qsum, long K, long G) {
    memset(qsum, 0, sizeof(int32_t) * QSTRIDE(K / G));
    for (long b = 0; b < K; b += 32)
        for (int j = 0; j < 16; j++) { xr[b + j] = q[b + 2 * j]; xr[b + 16 + j] = q[b + 2 * j + 1]; }
    for (long g = 0; g < K / G; g++) {
        int32_t s = 0; /* |s| <= G * 32767 < 2^31 for the G <= INT4_MAX_G the int16 path takes */
        for (long j = 0; j < G; j++) s += q[g * G + j];
        qsum[g] = s;
    }
}

/* rows n0..n0+R-1 of a packed int4 weight against one prepared fp32 activation row (the fallback path).
   w = (nibble - zero) * scale per group, so dot = sum_g scale_g * (sum_j nibble_j x_j - zero_g * sum_j x_j). */
static inline __attribute__((always_inline)) void int4_rows(const float *xp, const float *gsum, const uint8_t *w,
                                                            const void *scale, const void *zero, int half, float *y,
                                                            long n0, int R, long K, long G) {
    long ng = K / G;
    __m256 tot[TILE];
    float zterm[TILE];
    const __m256i low4 = _mm256_set1_epi32(15);
    for (int r = 0; r < TILE; r++) { tot[r] = _mm256_setzero_ps(); zterm[r] = 0; }
    for (long g = 0; g < ng; g++) {
        __m256 a[TILE], b[TILE];
        for (int r = 0; r < TILE; r++) { a[r] = _mm256_setzero_ps(); b[r] = _mm256_setzero_ps(); }
        for (long k = g * G; k < (g + 1) * G; k += 16) {
            __m256 xe = _mm256_loadu_ps(xp + k), xo = _mm256_loadu_ps(xp + k + 8);
#pragma GCC unroll 4
            for (int r = 0; r < TILE; r++) {
                if (r < R) {
                    const uint8_t *wr = w + (n0 + r) * (K / 2) + k / 2;
                    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)wr));
                    a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low4)), xe, a[r]);
                    b[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), xo, b[r]);
                }
            }
        }
        for (int r = 0; r < R; r++) {
            long i = (n0 + r) * ng + g;
            float s = load_param(scale, i, half);
            float z = zero ? load_param(zero, i, half) : 8.0f;
            tot[r] = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_add_ps(a[r], b[r]), tot[r]);
            zterm[r] += s * z * gsum[g];
        }
    }
    for (int r = 0; r < R; r++) y[n0 + r] = hsum(tot[r]) - zterm[r];
}

/* one output of a row holding inf/NaN, weight by weight as a float matmul of the dequantized weight computes it:
   the factored form above would turn x = inf into inf - inf = NaN */
static float int4_dot_exact(const float *x, const uint8_t *w, const void *scale, const void *zero, int half, long n,
                            long K, long G) {
    float acc = 0;
    for (long c = 0; c < K; c++) {
        long i = n * (K / G) + c / G;
        float z = zero ? load_param(zero, i, half) : 8.0f;
        uint8_t b = w[n * (K / 2) + c / 2];
        acc += ((float)(c % 2 ? b >> 4 : b & 15) - z) * load_param(scale, i, half) * x[c];
    }
    return acc;
}

/* The int16 path's int32 group sums are flushed to fp32 once per group, after the 8 lanes of a group are added in
   int32 (sum8x8): a group sums at most G products of a nibble <= 15 and |q| <= 32767, G * 491,505, below 2^31 - 1
   for G <= 4096 = INT4_MAX_G (4369 would not be). Larger groups take the fp32 path here (the AVX-512 kernel sums
   32-column sub-blocks, which cannot overflow). */
#define INT4_MAX_G 4096

/* lane i of the result = the sum of the 8 int32 lanes of v[i] */
static inline __m256i sum8x8(const __m256i *v) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    /* a = (v0..v3 low-lane sums | v0..v3 high-lane sums), b likewise for v4..v7 */
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* scale or zero of groups i..i+n-1 (n <= 8; the rest 0) of one row */
static inline __m256 load_params8(const void *p, long i, int n, int half) {
    if (n == 8)
        return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
                    : _mm256_loadu_ps((const float *)p + i);
    float t[8] = {0};
    for (int j = 0; j < n; j++) t[j] = load_param(p, i + j, half);
    return _mm256_loadu_ps(t);
}

/* rows n0..n0+R-1 (R <= TILE) of a packed int4 weight against MB (1 or 2) int16 activation rows prepared by
   int4_prepare_q (xr, stride K; group sums qsum, stride QSTRIDE(K/G); scales xs). Per 32 columns and row: 16
   bytes are widened to int16 once, split into low (even column) and high (odd column) nibbles, and multiplied
   pairwise with the activations into int32 (vpmaddwd); with MB 2 each unpacked weight vector serves both rows.
   The int32 sums of 8 groups are reduced into one vector (lane = group) so that scale and zero are applied to 8
   groups at once: acc += scale * (float(isum) - zero * float(qsum)), y = xs * sum(acc). Applying them one
   group at a time (scalar scale/zero loads, a convert and an FMA per group) was 1.3x slower with groups of 32. */
static inline __attribute__((always_inline)) void int4_rows_q(const int16_t *xr, const int32_t *qsum,
                                                              const float *xs, int MB, const uint8_t *w,
                                                              const void *scale, const void *zero, int half,
                                                              float *y, long N, long n0, int R, long K, long G) {
    long ng = K / G, qs = QSTRIDE(ng);
    __m256 tot[TILE][2];
    const __m256i low4 = _mm256_set1_epi16(15);
    for (int r = 0; r < TILE; r++) tot[r][0] = tot[r][1] = _mm256_setzero_ps();
    for (long g0 = 0; g0 < ng; g0 += 8) {
        int nb = ng - g0 < 8 ? (int)(ng - g0) : 8;
        __m256i isum[TILE][2][8];
        for (int gi = 0; gi < 8; gi++) {
            __m256i a[TILE][2];
            for (int r = 0; r < TILE; r++) a[r][0] = a[r][1] = _mm256_setzero_si256();
            long g = g0 + gi;
            for (long k = g * G; gi < nb && k < (g + 1) * G; k += 32) {
                __m256i x0e = _mm256_loadu_si256((const __m256i *)(xr + k));
                __m256i x0o = _mm256_loadu_si256((const __m256i *)(xr + k + 16));
                __m256i x1e = MB == 2 ? _mm256_loadu_si256((const __m256i *)(xr + K + k)) : x0e;
                __m256i x1o = MB == 2 ? _mm256_loadu_si256((const __m256i *)(xr + K + k + 16)) : x0o;
                /* as in the int8 kernel: the TILE rows take one cache line per step, fetched PF_TILES tiles ahead */
                _mm_prefetch((const char *)(w + (n0 + PF_TILES * TILE) * (K / 2) + TILE * (k / 2)), _MM_HINT_T0);
#pragma GCC unroll 4
                for (int r = 0; r < TILE; r++) {
                    if (r < R) {
                        __m256i v = _mm256_cvtepu8_epi16(
                            _mm_loadu_si128((const __m128i *)(w + (n0 + r) * (K / 2) + k / 2)));
                        __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_srli_epi16(v, 4);
                        a[r][0] = _mm256_add_epi32(a[r][0], _mm256_add_epi32(_mm256_madd_epi16(lo, x0e),
                                                                             _mm256_madd_epi16(hi, x0o)));
                        if (MB == 2)
                            a[r][1] = _mm256_add_epi32(a[r][1], _mm256_add_epi32(_mm256_madd_epi16(lo, x1e),
                                                                                 _mm256_madd_epi16(hi, x1o)));
                    }
                }
            }
            for (int r = 0; r < TILE; r++) { isum[r][0][gi] = a[r][0]; isum[r][1][gi] = a[r][1]; }
        }
        for (int r = 0; r < R; r++) {
            long i = (n0 + r) * ng + g0;
            /* groups past nb have scale 0 and isum 0, and qsum is zero-padded, so they add 0 */
            __m256 s8 = load_params8(scale, i, nb, half);
            __m256 z8 = zero ? load_params8(zero, i, nb, half) : _mm256_set1_ps(8.0f);
            for (int m = 0; m < MB; m++) {
                __m256 isf = _mm256_cvtepi32_ps(sum8x8(isum[r][m]));
                __m256 qf = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(qsum + m * qs + g0)));
                tot[r][m] = _mm256_fmadd_ps(s8, _mm256_fnmadd_ps(z8, qf, isf), tot[r][m]);
            }
        }
    }
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) y[m * N + n0 + r] = hsum(tot[r][m]) * xs[m];
}

typedef struct {
    const float *x, *xp, *gsum, *xs; const int16_t *xr; const int32_t *qsum; const uint8_t *w; const void *scale, *zero;
    int half; float *y; long M, N, K, G;
} int4_job;

static void int4_tiles(const void *p, long begin, long end) {
    const int4_job *j = p;
    const float *xp = j->xp, *gsum = j->gsum, *xs = j->xs;
    const int16_t *xr = j->xr;
    const int32_t *qsum = j->qsum;
    const uint8_t *w = j->w;
    const void *scale = j->scale, *zero = j->zero;
    int half = j->half;
    float *y = j->y;
    long M = j->M, N = j->N, K = j->K, G = j->G, ng = K / G;
    for (long t = begin; t < end; t++) {
        long n0 = t * TILE;
        int R = N - n0 < TILE ? (int)(N - n0) : TILE;
        for (long m = 0; m < M;) {
            float *ym = y + m * N;
            const int16_t *xm = xr + m * K;
            const int32_t *qm = qsum + m * QSTRIDE(ng);
            if (isinf(xs[m])) {
                for (int r = 0; r < R; r++)
                    ym[n0 + r] = int4_dot_exact(j->x + m * K, w, scale, zero, half, n0 + r, K, G);
                m += 1;
            } else if (isnan(xs[m])) {
                const float *xpm = xp + m * K, *gm = gsum + m * ng;
                if (R == TILE) int4_rows(xpm, gm, w, scale, zero, half, ym, n0, TILE, K, G);
                else for (int r = 0; r < R; r++) int4_rows(xpm, gm, w, scale, zero, half, ym, n0 + r, 1, K, G);
                m += 1;
            } else if (m + 1 < M && isfinite(xs[m + 1])) {
                if (R == TILE) int4_rows_q(xm, qm, xs + m, 2, w, scale, zero, half, ym, N, n0, TILE, K, G);
                else for (int r = 0; r < R; r++)
                    int4_rows_q(xm, qm, xs + m, 2, w, scale, zero, half, ym, N, n0 + r, 1, K, G);
                m += 2;
            } else {
                if (R == TILE) int4_rows_q(xm, qm, xs + m, 1, w, scale, zero, half, ym, N, n0, TILE, K, G);
                else for (int r = 0; r < R; r++)
                    int4_rows_q(xm, qm, xs + m, 1, w, scale, zero, half, ym, N, n0 + r, 1, K, G);
                m += 1;
            }
        }
    }
}

/* The decode-size kernel (AVX2; AVX-512 builds take int4_decode512 below for the int16 path and this one for the
   rest): each weight tile streamed once against all M rows. Each activation row is rounded to
   int16 once (quantize_row) and takes the int16 path when G % 32 == 0 and G <= INT4_MAX_G, other group sizes use
   the fp32 path, and rows holding inf/NaN int4_dot_exact. xs[m] says which: the int16 scale, NAN for the fp32
   path, INFINITY for the exact one. Returns 0, or -1 when out of memory. */
static int int4_decode_rows(const float *x, const uint8_t *w, const void *scale, const void *zero, int half,
                            float *y, long M, long N, long K, long G, int threads) {
    if (M <= 0) return 0;
    long ng = K / G;
    int int16_path = G % 32 == 0 && G <= INT4_MAX_G;
    /* xs (M) | gsum (M * ng) | xp (M * K) | qsum (M * QSTRIDE(ng)) int32 | xr (M * K) int16 | q (K) int16 */
    char *buf = malloc(sizeof(float) * (M + M * ng + M * K) + sizeof(int32_t) * M * QSTRIDE(ng) +
                       sizeof(int16_t) * (M + 1) * K);
    if (!buf) return -1;
    float *xs = (float *)buf, *gsum = xs + M, *xp = gsum + M * ng;
    int32_t *qsum = (int32_t *)(xp + M * K);
    int16_t *xr = (int16_t *)(qsum + M * QSTRIDE(ng)), *q = xr + M * K;
    for (long m = 0; m < M; m++) {
        float s = quantize_row(x + m * K, q, K);
        if (isnan(s)) {
            xs[m] = INFINITY;
        } else if (!int16_path) {
            xs[m] = NAN;
            int4_prepare(x + m * K, xp + m * K, gsum + m * ng, K, G);
        } else {
            xs[m] = s;
            int4_prepare_q(q, xr + m * K, qsum + m * QSTRIDE(ng), K, G);
        }
    }
    int4_job job = {x, xp, gsum, xs, xr, qsum, w, scale, zero, half, y, M, N, K, G};
    long tiles = (N + TILE - 1) / TILE;
    parallel_run(int4_tiles, &job, tiles, chunk_for(tiles, threads), threads);
    free(buf);
    return 0;
}

/* ---- the decode kernel with AVX-512 ----------------------------------------------------------------------------
   The same int16 math at twice the width, with no shuffles in the inner loop: each 64-byte load of a weight row
   (128 columns) is read as 16-bit lanes of 4 nibbles, split into 4 vectors of one nibble per lane by shifts and
   masks (columns 4j + i of the block in lane j of vector i, so each activation block is reordered to match once
   per call), and multiplied into int32 with vpdpwssd (VNNI) or vpmaddwd. An int32 lane then holds 8 columns of one
   32-column sub-block; after 4 blocks a reduction tree gives the 16 sub-block sums of 512 columns, which get scale
   and zero per lane: acc += scale * (float(isum) - zero * float(qsum)) with exact integer sums of at most 32
   columns (< 2^24, so exact in fp32 too). Weight rows are streamed one after another against up to 4 activation
   rows. */
#if defined(__AVX512F__)
#if defined(__AVX512VNNI__)
/* inline asm: with the intrinsic, gcc copies every accumulator to another register and back on each step */
static inline __m512i vnni_dpwssd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
    return acc;
}
#define dpwssd512 vnni_dpwssd
#else
#define dpwssd512(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
#endif
#define D_MB 4 /* activation rows per pass over a weight row */
#define D_PF 4 /* prefetch distance in weight rows */

typedef struct {
    const int16_t *xr; const float *qs, *xs; const long *rows; const int32_t *idx; const long *first;
    const uint8_t *w; const void *scale, *zero; int half; float *y; long Mq, N, K, G, Kp, Sp;
} dec512_job;

/* lane s of the sum of 4 blocks' int32 vectors v[0..3] = sum of sub-block s (block s / 4, 128-bit lane s % 4) */
static inline __m512i sum_subblocks(const __m512i *v) {
    __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
    __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
    __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
    /* u lane 4L + i = 128-bit lane L of v[i] = sub-block 4i + L */
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), u);
}

/* the 16 sub-blocks' scale or zero of chunk c of weight row n: groups first[c].. loaded, spread by idx */
static inline __m512 chunk_params(const dec512_job *j, const void *p, long n, long c, long ng) {
    long first = j->first[c], left = ng - first;
    __mmask16 mask = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
    __m512 v = j->half ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)p + n * ng + first))
                       : _mm512_maskz_loadu_ps(mask, (const float *)p + n * ng + first);
    return j->G == 32 ? v : _mm512_permutexvar_ps(_mm512_loadu_si512(j->idx + c * 16), v);
}

/* weight row n against activation rows i0..i0+MB-1 */
static inline __attribute__((always_inline)) void row512(const dec512_job *j, long n, long i0, int MB) {
    long P = j->K / 2, Kp = j->Kp, Sp = j->Sp, nblk = Kp / 128, ng = j->K / j->G;
    const uint8_t *wr = j->w + n * P;
    const int16_t *xr = j->xr + i0 * Kp;
    const float *qs = j->qs + i0 * Sp;
    const __m512i m4 = _mm512_set1_epi16(15);
    __m512 f[D_MB];
    for (int m = 0; m < D_MB; m++) f[m] = _mm512_setzero_ps();
    for (long c = 0; c * 4 < nblk; c++) {
        __m512i v[D_MB][4];
        /* unrolled, so that v stays in registers: spilled, the tree's 64-byte reloads of 64-byte stores stall */
#pragma GCC unroll 4
        for (int b = 0; b < 4; b++) {
            long blk = 4 * c + b, off = blk * 64;
            if (blk >= nblk) {
                for (int m = 0; m < MB; m++) v[m][b] = _mm512_setzero_si512();
                continue;
            }
            /* the rows ahead are fetched by hand: the hardware prefetcher alone was slower on a busy machine */
            _mm_prefetch((const char *)(wr + D_PF * P + off), _MM_HINT_T0);
            __m512i raw = P - off >= 64 ? _mm512_loadu_si512((const void *)(wr + off))
                                        : _mm512_maskz_loadu_epi8((1ULL << (P - off)) - 1, wr + off);
            __m512i n0 = _mm512_and_si512(raw, m4), n1 = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
            __m512i n2 = _mm512_and_si512(_mm512_srli_epi16(raw, 8), m4), n3 = _mm512_srli_epi16(raw, 12);
            for (int m = 0; m < MB; m++) {
                const __m512i *xb = (const __m512i *)(xr + m * Kp + blk * 128);
                __m512i a = dpwssd512(_mm512_setzero_si512(), n0, _mm512_loadu_si512(xb));
                a = dpwssd512(a, n1, _mm512_loadu_si512(xb + 1));
                a = dpwssd512(a, n2, _mm512_loadu_si512(xb + 2));
                v[m][b] = dpwssd512(a, n3, _mm512_loadu_si512(xb + 3));
            }
        }
        __m512 s = chunk_params(j, j->scale, n, c, ng);
        __m512 z = j->zero ? chunk_params(j, j->zero, n, c, ng) : _mm512_set1_ps(8.0f);
        for (int m = 0; m < MB; m++) {
            __m512 isum = _mm512_cvtepi32_ps(sum_subblocks(v[m]));
            f[m] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, _mm512_loadu_ps(qs + m * Sp + 16 * c), isum), f[m]);
        }
    }
    for (int m = 0; m < MB; m++) j->y[j->rows[i0 + m] * j->N + n] = _mm512_reduce_add_ps(f[m]) * j->xs[i0 + m];
}

static void dec512_tiles(const void *p, long begin, long end) {
    const dec512_job *j = p;
    for (long n = begin * TILE; n < end * TILE && n < j->N; n++) {
        for (long i = 0; i < j->Mq; i += D_MB) {
            switch (j->Mq - i < D_MB ? j->Mq - i : D_MB) {
            case 1: row512(j, n, i, 1); break;
            case 2: row512(j, n, i, 2); break;
            case 3: row512(j, n, i, 3); break;
            default: row512(j, n, i, 4); break;
            }
        }
    }
}

/* 128 int16 columns -> 4 vectors, lane j of vector i = column 4j + i (the nibble order of row512's unpack) */
static inline void reorder_block(const int16_t *q, int16_t *out) {
    __m512i in[4];
    for (int v = 0; v < 4; v++) in[v] = _mm512_loadu_si512((const void *)(q + 32 * v));
    for (int i = 0; i < 4; i++) {
        /* lanes j < 16 come from in[0..1], j >= 16 from in[2..3]: index 4 (j % 16) + i into the pair */
        static const int16_t base[32] = {0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60,
                                         0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60};
        __m512i idx = _mm512_add_epi16(_mm512_loadu_si512((const void *)base), _mm512_set1_epi16((short)i));
        __m512i lo = _mm512_permutex2var_epi16(in[0], idx, in[1]), hi = _mm512_permutex2var_epi16(in[2], idx, in[3]);
        _mm512_storeu_si512((void *)(out + 32 * i), _mm512_mask_blend_epi16(0xFFFF0000u, lo, hi));
    }
}

/* int16 rows through row512, rows holding inf/NaN through int4_decode_rows one by one. Scratch: (M + 1) * K * 2
   bytes of int16 activations (padded to 128 columns) and M * K / 32 * 4 of sub-block sums. */
static int int4_decode512(const float *x, const uint8_t *w, const void *scale, const void *zero, int half, float *y,
                          long M, long N, long K, long G, int threads) {
    long Kp = (K + 127) / 128 * 128, nch = (Kp + 511) / 512, Sp = nch * 16, gs = G / 32, Mq = 0;
    char *buf = malloc(sizeof(long) * (M + nch) + sizeof(float) * M * (Sp + 1) + sizeof(int32_t) * nch * 16 +
                       sizeof(int16_t) * (M * Kp + K));
    if (!buf) return -1;
    long *rows = (long *)buf, *first = rows + M;
    float *xs = (float *)(first + nch), *qs = xs + M;
    int32_t *idx = (int32_t *)(qs + M * Sp);
    int16_t *xr = (int16_t *)(idx + nch * 16), *q = xr + M * Kp;
    for (long c = 0; c < nch; c++) {
        first[c] = 16 * c / gs;
        for (int s = 0; s < 16 && gs > 1; s++) idx[c * 16 + s] = (int32_t)((16 * c + s) / gs - first[c]);
    }
    for (long m = 0; m < M; m++) {
        float sc = quantize_row(x + m * K, q, K);
        if (isnan(sc)) continue;
        int16_t *xm = xr + Mq * Kp;
        float *qm = qs + Mq * Sp;
        memset(xm + K / 128 * 128, 0, sizeof(int16_t) * (Kp - K / 128 * 128));
        memset(qm, 0, sizeof(float) * Sp);
        long c = 0;
        for (; c + 128 <= K; c += 128) reorder_block(q + c, xm + c);
        for (; c < K; c++) xm[c / 128 * 128 + c % 4 * 32 + c % 128 / 4] = q[c];
        for (long b = 0; b < K / 32; b++) {
            int32_t sum = 0;
            for (int c = 0; c < 32; c++) sum += q[b * 32 + c];
            qm[b] = (float)sum;
        }
        xs[Mq] = sc;
        rows[Mq++] = m;
    }
    dec512_job job = {xr, qs, xs, rows, idx, first, w, scale, zero, half, y, Mq, N, K, G, Kp, Sp};
    long tiles = (N + TILE - 1) / TILE;
    if (Mq) parallel_run(dec512_tiles, &job, tiles, chunk_for(tiles, threads), threads);
    int failed = 0;
    for (long m = 0, i = 0; m < M && !failed; m++) {
        if (i < Mq && rows[i] == m) i++;
        else failed = int4_decode_rows(x + m * K, w, scale, zero, half, y + m * N, 1, N, K, G, threads) != 0;
    }
    free(buf);
    return failed ? -1 : 0;
}
#endif

/* the decode-size kernel for this build */
static int int4_decode(const float *x, const uint8_t *w, const void *scale, const void *zero, int half, float *y,
                       long M, long N, long K, long G, int threads) {
#if defined(__AVX512F__)
    if (G % 32 == 0) return int4_decode512(x, w, scale, zero, half, y, M, N, K, G, threads);
#endif
    return int4_decode_rows(x, w, scale, zero, half, y, M, N, K, G, threads);
}

/* ---- the blocked GEMM for many rows (prefill) ----------------------------------------------------------------
   Same math as the decode kernel (int16 activations, exact int32 group sums, scale and zero per group), laid out
   for reuse instead of streaming: vector lanes are output columns. A tile of NB weight rows is unpacked once per
   call into int32 pairs (lane n of pair p = nibble (n, 2p) | nibble (n, 2p + 1) << 16, K * NB * 2 bytes, L2-sized
   for K up to ~8k), then every activation row reuses it: per column pair one broadcast activation pair and one
   vpmaddwd / vpdpwssd per NB/VL output columns, MR rows at a time. The unpack (a byte transpose) costs ~0.5
   instructions per pair, the products M/VL, so it pays from a few dozen rows on. One lane sums a whole group,
   G / 2 pairs of products <= 2 * 15 * 32767: below 2^31 for G <= INT4_GEMM_MAX_G. */
#define INT4_GEMM_MAX_G 4096
#define INT4_GEMM_MIN_ROWS 17 /* below, the decode kernel (one pass over the weights) is faster */

#if defined(__AVX512F__)
#define VL 16
#define MR 8 /* 2 * MR int32 accumulators (the fp32 sums live in a small L1 tile) */
typedef __m512i ivec;
typedef __m512 fvec;
#define ivload(p) _mm512_loadu_si512((const void *)(p))
#define ivstore(p, v) _mm512_storeu_si512((void *)(p), v)
#define ivset1 _mm512_set1_epi32
#define ivzero _mm512_setzero_si512
#define fvload _mm512_loadu_ps
#define fvstore _mm512_storeu_ps
#define fvset1 _mm512_set1_ps
#define fvzero _mm512_setzero_ps
#define fvmul _mm512_mul_ps
#define fvmadd _mm512_fmadd_ps
#define fvnmadd _mm512_fnmadd_ps
#define fvcvt _mm512_cvtepi32_ps
#define dpwssd dpwssd512

/* 16 bytes of a weight row -> 16 int32 lanes (low nibble) | (high nibble << 16) */
static inline ivec pair_lanes(const uint8_t *p) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm512_and_si512(_mm512_or_si512(b, _mm512_slli_epi32(b, 12)), _mm512_set1_epi32(0x000F000F));
}

/* r[i] lane j -> r[j] lane i */
static inline void transpose_lanes(ivec r[VL]) {
    ivec t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* u[4q + j], 128-bit lane L: rows 4q..4q+3 at column 4L + j */
    for (int q = 0; q < 16; q += 4) {
        u[q] = _mm512_unpacklo_epi64(t[q], t[q + 2]);
        u[q + 1] = _mm512_unpackhi_epi64(t[q], t[q + 2]);
        u[q + 2] = _mm512_unpacklo_epi64(t[q + 1], t[q + 3]);
        u[q + 3] = _mm512_unpackhi_epi64(t[q + 1], t[q + 3]);
    }
    for (int j = 0; j < 4; j++) { /* a 4x4 transpose of 128-bit lanes */
        ivec s0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), s1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
        ivec s2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44), s3 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
        r[j] = _mm512_shuffle_i32x4(s0, s2, 0x88);
        r[4 + j] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
        r[8 + j] = _mm512_shuffle_i32x4(s1, s3, 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
    }
}
#else
#define VL 8
#define MR 4 /* 16 ymm registers: 2 * MR int32 accumulators, 2 weight vectors, a broadcast, madd temporaries */
typedef __m256i ivec;
typedef __m256 fvec;
#define ivload(p) _mm256_loadu_si256((const __m256i *)(p))
#define ivstore(p, v) _mm256_storeu_si256((__m256i *)(p), v)
#define ivset1 _mm256_set1_epi32
#define ivzero _mm256_setzero_si256
#define fvload _mm256_loadu_ps
#define fvstore _mm256_storeu_ps
#define fvset1 _mm256_set1_ps
#define fvzero _mm256_setzero_ps
#define fvmul _mm256_mul_ps
#define fvmadd _mm256_fmadd_ps
#define fvnmadd _mm256_fnmadd_ps
#define fvcvt _mm256_cvtepi32_ps
/* the products added in place, in inline asm: with the intrinsic, gcc added them into a new register and copied
   that back to the accumulator's, 8 register moves a step (Zen 3, 1 thread, 512 rows x 768 @ 768 x 2048: 1.10x
   faster without them, 768 x 2048 @ 2048 x 768 1.20x, 2 threads 1.12x; in-process interleaved pairs) */
static inline __m256i dpwssd(__m256i acc, __m256i a, __m256i b) {
    __asm__("vpaddd %1, %0, %0" : "+x"(acc) : "x"(_mm256_madd_epi16(a, b)));
    return acc;
}

static inline ivec pair_lanes(const uint8_t *p) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    return _mm256_and_si256(_mm256_or_si256(b, _mm256_slli_epi32(b, 12)), _mm256_set1_epi32(0x000F000F));
}

static inline void transpose_lanes(ivec r[VL]) {
    ivec t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int q = 0; q < 8; q += 4) {
        u[q] = _mm256_unpacklo_epi64(t[q], t[q + 2]);
        u[q + 1] = _mm256_unpackhi_epi64(t[q], t[q + 2]);
        u[q + 2] = _mm256_unpacklo_epi64(t[q + 1], t[q + 3]);
        u[q + 3] = _mm256_unpackhi_epi64(t[q + 1], t[q + 3]);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
        r[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
    }
}
#endif
#define NB (2 * VL) /* weight rows per tile: two vectors of output columns */

/* xq: activation rows in blocks of MR (zero rows pad the last block), pair-interleaved: block b holds
   (K/2 pairs x MR rows) int32, each the int16 pair (q[2p], q[2p+1]) of a row; qsum (ng x MR) and xs (MR) per block
   likewise. Activation row m is block m / MR, lane m % MR, and y row m. */
typedef struct {
    const int32_t *xq; const float *qsum, *xs; const uint8_t *w; const void *scale, *zero;
    int half; float *y; long M, N, K, G; int *failed;
} gemm_job;

/* weight rows n0.. (at most NB, the rest zero) -> wt (K/2 pairs x NB lanes), scales and zeros -> sc, zc (ng x NB) */
static void unpack_tile(const gemm_job *j, long n0, int32_t *wt, float *sc, float *zc) {
    long P = j->K / 2, ng = j->K / j->G, rows = j->N - n0 < NB ? j->N - n0 : NB;
    for (int v = 0; v < NB / VL; v++) {
        long rv = rows - v * VL;
        for (long p0 = 0; p0 < P; p0 += VL) {
            ivec r[VL];
            for (int n = 0; n < VL; n++)
                r[n] = n < rv ? pair_lanes(j->w + (n0 + v * VL + n) * P + p0) : ivzero();
            transpose_lanes(r);
            for (int c = 0; c < VL; c++) ivstore(wt + (p0 + c) * NB + v * VL, r[c]);
        }
    }
    for (long n = 0; n < NB; n++)
        for (long g = 0; g < ng; g++) {
            long i = (n0 + n) * ng + g;
            sc[g * NB + n] = n < rows ? load_param(j->scale, i, j->half) : 0.0f;
            zc[g * NB + n] = n >= rows ? 0.0f : j->zero ? load_param(j->zero, i, j->half) : 8.0f;
        }
}

/* one block of MR activation rows against one unpacked tile; y rows of the first mr, columns n0..n0+nv-1. The int32
   group sums are the registers; each group's fp32 term (scale * (sum - zero * qsum)) is added to an L1 tile, in the
   same order as a register sum would be. */
static void gemm_block(const gemm_job *j, const int32_t *wt, const float *sc, const float *zc, long blk, int mr,
                       long n0, long nv) {
    long P = j->K / 2, GP = j->G / 2, ng = j->K / j->G;
    const int32_t *xb = j->xq + blk * P * MR;
    const float *qsum = j->qsum + blk * ng * MR, *xs = j->xs + blk * MR;
    float f[MR][NB] __attribute__((aligned(64)));
    for (long g = 0; g < ng; g++) {
        ivec a[MR][2];
#pragma GCC unroll 8
        for (int m = 0; m < MR; m++) a[m][0] = a[m][1] = ivzero();
        const int32_t *wp = wt + g * GP * NB, *xp = xb + g * GP * MR;
        const int32_t *wend = wp + GP * NB;
        do { /* GP >= 16 */
            ivec w0 = ivload(wp), w1 = ivload(wp + VL);
#pragma GCC unroll 8
            for (int m = 0; m < MR; m++) {
                ivec x = ivset1(xp[m]);
                a[m][0] = dpwssd(a[m][0], w0, x);
                a[m][1] = dpwssd(a[m][1], w1, x);
            }
            wp += NB, xp += MR;
        } while (wp < wend);
        fvec s0 = fvload(sc + g * NB), s1 = fvload(sc + g * NB + VL);
        fvec z0 = fvload(zc + g * NB), z1 = fvload(zc + g * NB + VL);
#pragma GCC unroll 8
        for (int m = 0; m < MR; m++) {
            fvec q = fvset1(qsum[g * MR + m]);
            fvec f0 = g ? fvload(f[m]) : fvzero(), f1 = g ? fvload(f[m] + VL) : fvzero();
            fvstore(f[m], fvmadd(s0, fvnmadd(z0, q, fvcvt(a[m][0])), f0));
            fvstore(f[m] + VL, fvmadd(s1, fvnmadd(z1, q, fvcvt(a[m][1])), f1));
        }
    }
    for (int m = 0; m < mr; m++) {
        float out[NB];
        fvstore(out, fvmul(fvload(f[m]), fvset1(xs[m])));
        fvstore(out + VL, fvmul(fvload(f[m] + VL), fvset1(xs[m])));
        memcpy(j->y + (blk * MR + m) * j->N + n0, out, sizeof(float) * nv);
    }
}

static void gemm_tiles(const void *p, long begin, long end) {
    const gemm_job *j = p;
    long K = j->K, ng = K / j->G;
    int32_t *wt = malloc(sizeof(int32_t) * (K / 2) * NB + 2 * sizeof(float) * ng * NB);
    if (!wt) { __atomic_store_n(j->failed, 1, __ATOMIC_RELAXED); return; }
    float *sc = (float *)(wt + (K / 2) * NB), *zc = sc + ng * NB;
    for (long t = begin; t < end; t++) {
        long n0 = t * NB, nv = j->N - n0 < NB ? j->N - n0 : NB;
        unpack_tile(j, n0, wt, sc, zc);
        for (long b = 0; b * MR < j->M; b++)
            gemm_block(j, wt, sc, zc, b, j->M - b * MR < MR ? (int)(j->M - b * MR) : MR, n0, nv);
    }
    free(wt);
}

typedef struct { const float *x; int32_t *xq; float *qsum, *xs; long M, K, G; int *failed; } prep_job;

/* activation rows of blocks [begin, end) -> their pair-interleaved int16 values, group sums and scales, each row in
   its own slot (row m in block m / MR, lane m % MR). A row holding inf/NaN keeps zeros there and scale NAN: its
   output is computed again by the exact path afterwards. */
static void prep_blocks(const void *p, long begin, long end) {
    const prep_job *j = p;
    long K = j->K, P = K / 2, G = j->G, ng = K / G;
    int16_t *q = malloc(sizeof(int16_t) * K);
    if (!q) { __atomic_store_n(j->failed, 1, __ATOMIC_RELAXED); return; }
    for (long blk = begin; blk < end; blk++)
        for (long r = 0; r < MR && blk * MR + r < j->M; r++) {
            long m = blk * MR + r;
            float s = quantize_row(j->x + m * K, q, K);
            j->xs[m] = s;
            if (isnan(s)) continue;
            int32_t *xb = j->xq + blk * P * MR + r;
            for (long i = 0; i < P; i++) memcpy(xb + i * MR, q + 2 * i, 4);
            for (long g = 0; g < ng; g++) {
                int32_t sum = 0;
                for (long c = g * G; c < (g + 1) * G; c++) sum += q[c];
                j->qsum[blk * ng * MR + g * MR + r] = (float)sum;
            }
        }
    free(q);
}

/* Rows holding inf/NaN go to the decode kernel one by one (its exact path) after the blocked product. Scratch:
   (M + MR) * K * 2 bytes of int16 activations and (M + MR) * (K / G + 1) * 4 of sums and scales, plus
   K * 2 bytes per preparing thread and K * NB * 2 + K / G * NB * 8 bytes per thread for the unpacked tile. The
   activations are prepared on the threads too (each row is independent). Returns 0, or -1 when out of memory. */
static int int4_gemm_blocked(const float *x, const uint8_t *w, const void *scale, const void *zero, int half,
                             float *y, long M, long N, long K, long G, int threads) {
    long ng = K / G, P = K / 2, Mp = (M + MR - 1) / MR * MR;
    char *buf = calloc(1, sizeof(int32_t) * Mp * P + sizeof(float) * Mp * (ng + 1));
    if (!buf) return -1;
    float *xs = (float *)buf, *qsum = xs + Mp;
    int32_t *xq = (int32_t *)(qsum + Mp * ng);
    int failed = 0;
    prep_job prep = {x, xq, qsum, xs, M, K, G, &failed};
    long blocks = Mp / MR;
    parallel_run(prep_blocks, &prep, blocks, chunk_for(blocks, threads), threads);
    gemm_job job = {xq, qsum, xs, w, scale, zero, half, y, M, N, K, G, &failed};
    long tiles = (N + NB - 1) / NB;
    if (!failed) parallel_run(gemm_tiles, &job, tiles, chunk_for(tiles, threads), threads);
    for (long m = 0; m < M && !failed; m++)
        if (isnan(xs[m]))
            failed = int4_decode_rows(x + m * K, w, scale, zero, half, y + m * N, 1, N, K, G, threads) != 0;
    free(buf);
    return failed ? -1 : 0;
}

/* scale/zero: (N, K/G) float32 (half=0) or float16 (half=1); zero NULL means the symmetric layout (zero 8).
   Needs K % G == 0 and G % 16 == 0. Returns 0, or -1 when out of memory. */
int loom_int4_gemm(const float *x, const uint8_t *w, const void *scale, const void *zero, int half, float *y,
                   long M, long N, long K, long G, int threads) {
    if (M <= 0) return 0;
    if (M >= INT4_GEMM_MIN_ROWS && G % 32 == 0 && G <= INT4_GEMM_MAX_G)
        return int4_gemm_blocked(x, w, scale, zero, half, y, M, N, K, G, threads);
    return int4_decode(x, w, scale, zero, half, y, M, N, K, G, threads);
}

typedef struct { const uint8_t *w; const void *scale, *zero; int half; float *out; long K, G; } dequant_job;

static void dequant_rows(const void *p, long begin, long end) {
    const dequant_job *j = p;
    long K = j->K, G = j->G;
    for (long n = begin; n < end; n++) {
        for (long g = 0; g < K / G; g++) {
            float s = load_param(j->scale, n * (K / G) + g, j->half);
            float z = j->zero ? load_param(j->zero, n * (K / G) + g, j->half) : 8.0f;
            for (long c = g * G; c < (g + 1) * G; c += 2) {
                uint8_t b = j->w[n * (K / 2) + c / 2];
                j->out[n * K + c] = ((float)(b & 15) - z) * s;
                j->out[n * K + c + 1] = ((float)(b >> 4) - z) * s;
            }
        }
    }
}

/* the float weight (N, K) of a packed int4 one, for large batches where a float GEMM wins */
void loom_int4_dequantize(const uint8_t *w, const void *scale, const void *zero, int half, float *out, long N,
                          long K, long G, int threads) {
    dequant_job job = {w, scale, zero, half, out, K, G};
    parallel_run(dequant_rows, &job, N, chunk_for(N, threads), threads);
}
