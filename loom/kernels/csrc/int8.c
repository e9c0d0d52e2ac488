#include "common.h"

/* int8 weight-only GEMM: y (M, N) = x (M, K) fp32 @ (int8 W (N, K) * scale (N,)).T.

   Every path computes the same thing: each activation row is rounded to int16 once per call (quantize_row, one
   scale per row), the products w * q are summed exactly as integers, and y = (float)sum * xs * scale, one rounding.
   So decode and prefill, the AVX2 and the AVX-512 (VNNI or not) code give bit-identical results; only rows holding
   inf/NaN (no int16 scale) take an fp32 path, the same at every level.
   - decode (M <= DECODE_ROWS): weight rows stream from memory once; 16 weights at a time are sign-extended to
     int16 and multiplied pairwise into int32 lanes (vpmaddwd, or vpdpwssd with VNNI), TILE weight rows by up to
     MAXMB activation rows per pass, so each widened weight vector serves several activation rows.
   - prefill (more rows): a GEMM over panels of PW output columns. Each panel is copied once per call into int8
     pairs ordered (k pair, column), so one vector holds two weights of each of VL columns and one broadcast int16
     pair of an activation row feeds them all: no horizontal sums, GMB activation rows per loaded panel vector. The
     whole weight is never expanded; the panel (PW * K bytes) stays in L1/L2.
   Exactness: int32 lanes are flushed into doubles (integers below 2^53 add exactly, and |sum| <= K * 2^22)
   every FLUSH steps. Each step adds to a lane two products of |w| <= 128 and |q| <= 32767, at most 8,388,352, so
   a lane holds at most 256 * 8,388,352 = 2,147,418,112 < 2^31 - 1 after 256 steps: no overflow for any K. */

/* The prefill GEMM's vectors: 512 bits (x86-64-v4 and above) or 256 bits (x86-64-v3), VL int32 lanes. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define WIDE 1
typedef __m512i vint;
#define VL 16
#define v_zero() _mm512_setzero_si512()
#define v_widen(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p))) /* 2*VL int8 -> int16 */
#define v_set1(v) _mm512_set1_epi32(v)
#if defined(__AVX512VNNI__)
#define v_dot(acc, a, b) _mm512_dpwssd_epi32(acc, a, b)
#else
#define v_dot(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
#endif
/* t[0..VL) += lanes of a, or = when `first`. The low half is taken with an extract, not a cast: with the cast
   gcc 12 copied every accumulator twice per step of the loop that produced it (measured 2.5x slower). */
static inline void v_flush(double *t, vint a, int first) {
    __m512d lo = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(a, 0)), hi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(a, 1));
    if (!first) { lo = _mm512_add_pd(lo, _mm512_loadu_pd(t)); hi = _mm512_add_pd(hi, _mm512_loadu_pd(t + 8)); }
    _mm512_storeu_pd(t, lo);
    _mm512_storeu_pd(t + 8, hi);
}
#else
#define WIDE 0
typedef __m256i vint;
#define VL 8
#define v_zero() _mm256_setzero_si256()
#define v_widen(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define v_set1(v) _mm256_set1_epi32(v)
#define v_dot(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
static inline void v_flush(double *t, vint a, int first) {
    __m256d lo = _mm256_cvtepi32_pd(_mm256_extracti128_si256(a, 0)), hi = _mm256_cvtepi32_pd(_mm256_extracti128_si256(a, 1));
    if (!first) { lo = _mm256_add_pd(lo, _mm256_loadu_pd(t)); hi = _mm256_add_pd(hi, _mm256_loadu_pd(t + 4)); }
    _mm256_storeu_pd(t, lo);
    _mm256_storeu_pd(t + 4, hi);
}
#endif

/* Decode works on 256-bit vectors at every level: measured on Zen 4 (which runs 512-bit ops as two halves) the
   512-bit decode streamed weights 1.3-1.9x slower at 2-4 rows; AVX-512 still brings 32 registers for a TILE x 4
   block and VNNI's fused multiply-add (vpdpwssd ymm). */
typedef __m256i dint;
#define DL 8
#define d_zero() _mm256_setzero_si256()
#define d_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define d_widen(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
/* vpdpwssd only from 3 rows up: at 1-2 rows its 4-5 cycle accumulate chains kept fewer weight loads in flight
   than vpmaddwd + vpaddd (1-cycle chains) and decode streamed up to 2x slower; from 3 rows on compute dominates */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define d_dot(acc, a, b) (MB >= 3 ? _mm256_dpwssd_epi32(acc, a, b) : _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)))
#else
#define d_dot(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#endif
/* t + the 8 lanes of a as 4 doubles: exact (integer sums stay below 2^53). Reducing into an int64 general
   register instead cost 30% at 1 row: the vector-to-GPR moves stalled the weight stream. */
static inline __m256d d_flush(__m256d t, dint a) {
    return _mm256_add_pd(t, _mm256_add_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(a, 0)),
                                          _mm256_cvtepi32_pd(_mm256_extracti128_si256(a, 1))));
}

static inline double hsum_pd(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_extractf128_pd(v, 0), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

#define STEP (2 * DL)                  /* columns of K per decode step */
#define FLUSH 256                      /* steps between flushes of the int32 lanes (see above) */
#define MAXMB (WIDE ? 4 : 2)           /* activation rows per decode pass: TILE * MAXMB accumulators */
#define PW (2 * VL)                    /* prefill panel width in output columns (two vectors) */
#define GMB (VL == 16 ? 12 : 6)        /* activation rows per prefill micro-kernel: 2 * GMB accumulators */
#define PF_TILES 4                     /* decode prefetch distance in tiles (2: 28 GB/s, 4: 31; Zen 5, 1 thread) */
#define DECODE_ROWS 64                 /* up to here decode's passes beat the GEMM's panel copies (K 768-2048) */

static inline int32_t load_pair(const int16_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline __m256 widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* rows n0..n0+R-1 (R <= TILE) of an int8 weight against one fp32 activation row; used for rows holding inf/NaN,
   which have no int16 scale, so they propagate exactly as in a float matmul (the same 256-bit code at every level) */
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

/* columns n0..n0+N-1 of one fp32 activation row (inf/NaN) */
static void int8_row_fp32(const float *x, const int8_t *w, const float *scale, float *y, long n0, long n1, long K) {
    long n = n0;
    for (; n + TILE <= n1; n += TILE) int8_rows(x, w, scale, y, n, TILE, K);
    for (; n < n1; n++) int8_rows(x, w, scale, y, n, 1, K);
}

/* activation row -> q = round(x / s) in int16 with s = max|x| / 32767, so |q| <= 32767 and each element is off by
   at most s / 2 (1.5e-5 of max|x|). Returns s, or NAN when the row holds inf/NaN (then the fp32 path is used). */
float quantize_row(const float *x, int16_t *q, long K) {
    /* max |x| in four independent vector chains (a max is exact in any order); a lane holding inf or NaN fails
       the <= FLT_MAX compare, which is ordered (false for NaN) */
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(3.4028235e38f);
    __m256 m0 = _mm256_setzero_ps(), m1 = m0, m2 = m0, m3 = m0, ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    long k0 = 0;
    for (; k0 + 32 <= K; k0 += 32) {
        __m256 a0 = _mm256_and_ps(_mm256_loadu_ps(x + k0), absmask), a1 = _mm256_and_ps(_mm256_loadu_ps(x + k0 + 8), absmask);
        __m256 a2 = _mm256_and_ps(_mm256_loadu_ps(x + k0 + 16), absmask);
        __m256 a3 = _mm256_and_ps(_mm256_loadu_ps(x + k0 + 24), absmask);
        ok = _mm256_and_ps(ok, _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(a0, big, _CMP_LE_OQ),
                                                           _mm256_cmp_ps(a1, big, _CMP_LE_OQ)),
                                             _mm256_and_ps(_mm256_cmp_ps(a2, big, _CMP_LE_OQ),
                                                           _mm256_cmp_ps(a3, big, _CMP_LE_OQ))));
        m0 = _mm256_max_ps(m0, a0); m1 = _mm256_max_ps(m1, a1); m2 = _mm256_max_ps(m2, a2); m3 = _mm256_max_ps(m3, a3);
    }
    float lanes[8], amax = 0;
    int finite = _mm256_movemask_ps(ok) == 0xFF;
    _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
    for (long k = k0; k < K; k++) {
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

typedef struct { const float *x; int16_t *xq; float *xs; long K, Kq; } rows_job;

static void quantize_some(const void *p, long begin, long end) {
    const rows_job *j = p;
    for (long m = begin; m < end; m++) {
        int16_t *q = j->xq + m * j->Kq;
        float s = j->xs[m] = quantize_row(j->x + m * j->K, q, j->K);
        memset(q + (isnan(s) ? 0 : j->K), 0, sizeof(int16_t) * (isnan(s) ? j->Kq : j->Kq - j->K));
    }
}

void quantize_rows(const float *x, int16_t *xq, float *xs, long M, long K, long Kq, int threads) {
    rows_job job = {x, xq, xs, K, Kq};
    if (M < 16) threads = 1; /* a decode step's row or few: not worth waking a helper */
    parallel_run(quantize_some, &job, M, chunk_for(M, threads), threads);
}

typedef struct {
    const float *x; const int16_t *xq; const float *xs; const int8_t *w; const float *scale; float *y;
    long M, N, K, Kq; int *failed;
} int8_job;

/* Accumulators are named variables, not arrays: gcc keeps an array of 16-24 vectors partly on the stack and
   copies it around in the inner loop (measured 2.5x slower). The X-macros below expand one line per row. */
#if WIDE
#define DROWS(X, r) X(r, 0) X(r, 1) X(r, 2) X(r, 3)
#else
#define DROWS(X, r) X(r, 0) X(r, 1)
#endif
#define DTILE(X) DROWS(X, 0) DROWS(X, 1) DROWS(X, 2) DROWS(X, 3)
#if GMB == 12
#define GROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#else
#define GROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#endif

/* -- decode: weight rows n0..n0+R-1 (R <= TILE) against MB consecutive int16 activation rows (stride Kq) ---------- */
static inline __attribute__((always_inline)) void decode_tile(const int8_job *j, long m0, int MB, long n0, int R) {
    const int16_t *xq = j->xq + m0 * j->Kq;
    const int8_t *w = j->w;
    long K = j->K, Kq = j->Kq;
    __m256d tot[TILE][MAXMB];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) tot[r][m] = _mm256_setzero_pd();
    long k = 0;
    while (k + STEP <= K) {
        long stop = K - k > STEP * FLUSH ? k + STEP * FLUSH : K;
#define D_DECL(r, m) dint a##r##m = d_zero();
        DTILE(D_DECL)
        for (; k + STEP <= stop; k += STEP) {
            dint x0 = d_load(xq + k), x1 = MB > 1 ? d_load(xq + Kq + k) : x0;
#if WIDE
            dint x2 = MB > 2 ? d_load(xq + 2 * Kq + k) : x0, x3 = MB > 3 ? d_load(xq + 3 * Kq + k) : x0;
#endif
            /* the TILE rows take TILE * STEP bytes per step; fetch the matching bytes PF_TILES tiles ahead, since the
               hardware prefetcher ramps up too slowly on rows as short as 768 bytes. Into L2, not L1: fetched into
               L1 they evicted the tile being read (1 thread, quiet: head 50257x768 1 row 2629 -> 1795 us, 8 rows
               4587 -> 4308 us, qkvo 1 row 82 -> 41 us) */
            for (int l = 0; l < TILE * STEP; l += 64)
                _mm_prefetch((const char *)(w + (n0 + PF_TILES * TILE) * K + TILE * k + l), _MM_HINT_T1);
            dint w0 = d_widen(w + n0 * K + k);
            dint w1 = R > 1 ? d_widen(w + (n0 + 1) * K + k) : w0, w2 = R > 2 ? d_widen(w + (n0 + 2) * K + k) : w0;
            dint w3 = R > 3 ? d_widen(w + (n0 + 3) * K + k) : w0;
#define D_DOT(r, m) if (r < R && m < MB) a##r##m = d_dot(a##r##m, w##r, x##m);
            DTILE(D_DOT)
        }
#define D_FLUSH(r, m) if (r < R && m < MB) tot[r][m] = d_flush(tot[r][m], a##r##m);
        DTILE(D_FLUSH)
    }
    for (int m = 0; m < MB; m++) {
        for (int r = 0; r < R; r++) {
            const int8_t *wr = w + (n0 + r) * K;
            int32_t tail = 0; /* < STEP products, at most 15 * 128 * 32767 */
            for (long c = k; c < K; c++) tail += (int32_t)wr[c] * xq[m * Kq + c];
            j->y[(m0 + m) * j->N + n0 + r] = (float)(hsum_pd(tot[r][m]) + tail) * j->xs[m0 + m] * j->scale[n0 + r];
        }
    }
}

static void decode_rows(const int8_job *j, long m0, int MB, long n0, int R) {
#define DECODE_CASE(mb)                                                              \
    case mb:                                                                         \
        if (R == TILE) decode_tile(j, m0, mb, n0, TILE);                             \
        else for (int r = 0; r < R; r++) decode_tile(j, m0, mb, n0 + r, 1);          \
        break;
    switch (MB) {
        DECODE_CASE(1) DECODE_CASE(2)
#if WIDE
        DECODE_CASE(3) DECODE_CASE(4)
#endif
    }
#undef DECODE_CASE
}

/* -- decode, one activation row, AVX-512: weight rows n0..n1-1 one after another, in a plain loop over each row
   (one stream, as dense.c's dense_rows1) on 512-bit vectors (the tile code above stays 256-bit; see dint). The same
   exact integer sums as decode_tile, so the same results. Against decode_tile(MB = 1), Zen 5, 1 thread, 2048x768
   streamed from huge pages: 31-32 -> 35-36 GB/s. At x86-64-v3 the same loop on 256-bit vectors measured no
   different from the tiles there (27-33 GB/s both), so AVX2 keeps the tiles. ------------------------------------ */
#if WIDE
#define ROW1_PF 8192 /* software prefetch distance in bytes (4096: 32-36 GB/s, 8192: 34-37) */
/* t + the 16 lanes of a, through d_flush's exact double sums */
static inline __m256d r1_flush(__m256d t, vint a) {
    return d_flush(d_flush(t, _mm512_extracti64x4_epi64(a, 0)), _mm512_extracti64x4_epi64(a, 1));
}

/* vpmaddwd + vpaddd, not v_dot's vpdpwssd: one row's two accumulate chains (see d_dot) */
static inline vint r1_dot(vint acc, const int8_t *w, const int16_t *x) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(v_widen(w), _mm512_loadu_si512((const void *)x)));
}

static void decode_row1(const int8_job *j, long n0, long n1) {
    const int16_t *xq = j->xq;
    const long K = j->K;
    for (long n = n0; n < n1; n++) {
        const int8_t *wr = j->w + n * K;
        __m256d tot = _mm256_setzero_pd();
        long k = 0;
        while (k + 64 <= K) {
            /* each lane adds two products of at most 128 * 32767 a step: FLUSH steps stay below 2^31 */
            long stop = K - k > 64 * FLUSH ? k + 64 * FLUSH : K;
            vint a0 = v_zero(), a1 = v_zero();
            for (; k + 64 <= stop; k += 64) {
                _mm_prefetch((const char *)(wr + k) + ROW1_PF, _MM_HINT_T0);
                a0 = r1_dot(a0, wr + k, xq + k);
                a1 = r1_dot(a1, wr + k + 32, xq + k + 32);
            }
            tot = r1_flush(r1_flush(tot, a0), a1);
        }
        int32_t tail = 0; /* < 64 products, at most 63 * 128 * 32767 */
        for (long c = k; c < K; c++) tail += (int32_t)wr[c] * xq[c];
        j->y[n] = (float)(hsum_pd(tot) + tail) * j->xs[0] * j->scale[n];
    }
}
#endif

static void decode_tiles(const void *p, long begin, long end) {
    const int8_job *j = p;
#if WIDE
    if (j->M == 1 && !isnan(j->xs[0])) {
        decode_row1(j, begin * TILE, end * TILE < j->N ? end * TILE : j->N);
        return;
    }
#endif
    for (long t = begin; t < end; t++) {
        long n0 = t * TILE;
        int R = j->N - n0 < TILE ? (int)(j->N - n0) : TILE;
        /* up to 4 rows, passes of 2 (vpmaddwd): one 4-row vpdpwssd pass streamed weights 1.3x slower (see d_dot) */
        int maxmb = j->M <= 4 ? 2 : MAXMB;
        for (long m = 0; m < j->M;) {
            if (isnan(j->xs[m])) {
                int8_row_fp32(j->x + m * j->K, j->w, j->scale, j->y + m * j->N, n0, n0 + R, j->K);
                m += 1;
                continue;
            }
            int mb = 1;
            while (mb < maxmb && m + mb < j->M && !isnan(j->xs[m + mb])) mb++;
            decode_rows(j, m, mb, n0, R);
            m += mb;
        }
    }
}

/* -- prefill: columns n0..n0+PW-1 of W (zero past N) as int8 pairs, panel[p][c] = (w[n0+c][2p], w[n0+c][2p+1]),
   zero past K -------------------------------------------------------------------------------------------------- */
static void pack_panel(const int8_t *w, int8_t *panel, long N, long K, long n0) {
    long K2 = (K + 1) / 2;
    /* row by row: each weight row is read in order (reading PW rows at once, pair-major, measured 1.3x slower) */
    for (int c = 0; c < PW; c++) {
        int8_t *out = panel + 2 * c;
        if (n0 + c >= N) {
            for (long p = 0; p < K2; p++) out[2 * PW * p] = out[2 * PW * p + 1] = 0;
            continue;
        }
        const int8_t *wr = w + (n0 + c) * K;
        for (long p = 0; p < K / 2; p++) memcpy(out + 2 * PW * p, wr + 2 * p, 2);
        if (K & 1) { out[2 * PW * (K2 - 1)] = wr[K - 1]; out[2 * PW * (K2 - 1) + 1] = 0; }
    }
}

/* MB activation rows from m0 against one packed panel: lane c of accumulator (m, h) sums column n0 + h*VL + c */
static inline __attribute__((always_inline)) void gemm_micro(const int8_job *j, const int8_t *panel, long m0,
                                                             int MB, long n0) {
    const int16_t *xq = j->xq + m0 * j->Kq;
    long K2 = (j->K + 1) / 2, Kq = j->Kq;
    double tot[GMB][PW];
    for (long p = 0; p < K2;) {
        long stop = K2 - p > FLUSH ? p + FLUSH : K2;
        int first = p == 0;
#define G_DECL(m) vint a##m##_0 = v_zero(), a##m##_1 = v_zero();
        GROWS(G_DECL)
        for (; p < stop; p++) {
            const int16_t *xp = xq + 2 * p;
            vint w0 = v_widen(panel + 2 * PW * p), w1 = v_widen(panel + 2 * PW * p + PW);
#define G_DOT(m)                                                                     \
    if (m < MB) {                                                                    \
        vint b = v_set1(load_pair(xp + m * Kq));                                     \
        a##m##_0 = v_dot(a##m##_0, w0, b);                                           \
        a##m##_1 = v_dot(a##m##_1, w1, b);                                           \
    }
            GROWS(G_DOT)
        }
#define G_FLUSH(m) if (m < MB) { v_flush(tot[m], a##m##_0, first); v_flush(tot[m] + VL, a##m##_1, first); }
        GROWS(G_FLUSH)
    }
    long cols = j->N - n0 < PW ? j->N - n0 : PW;
    for (int m = 0; m < MB; m++) {
        float *y = j->y + (m0 + m) * j->N + n0, xs = j->xs[m0 + m];
        for (long c = 0; c < cols; c++) y[c] = (float)tot[m][c] * xs * j->scale[n0 + c];
    }
}

static void gemm_rows(const int8_job *j, const int8_t *panel, long m0, int MB, long n0) {
#define GEMM_CASE(mb) case mb: gemm_micro(j, panel, m0, mb, n0); break;
    switch (MB) {
        GEMM_CASE(1) GEMM_CASE(2) GEMM_CASE(3) GEMM_CASE(4) GEMM_CASE(5) GEMM_CASE(6)
#if GMB == 12
        GEMM_CASE(7) GEMM_CASE(8) GEMM_CASE(9) GEMM_CASE(10) GEMM_CASE(11) GEMM_CASE(12)
#endif
    }
#undef GEMM_CASE
}

static void gemm_panels(const void *p, long begin, long end) {
    const int8_job *j = p;
    int8_t *panel = malloc((size_t)(j->K + 1) * PW + 64);
    if (!panel) { __atomic_store_n(j->failed, 1, __ATOMIC_SEQ_CST); return; }
    for (long t = begin; t < end; t++) {
        long n0 = t * PW, n1 = n0 + PW < j->N ? n0 + PW : j->N;
        pack_panel(j->w, panel, j->N, j->K, n0);
        for (long m = 0; m < j->M; m += GMB) gemm_rows(j, panel, m, j->M - m < GMB ? (int)(j->M - m) : GMB, n0);
        for (long m = 0; m < j->M; m++) /* rows with inf/NaN were computed with a NaN scale; redo them in fp32 */
            if (isnan(j->xs[m])) int8_row_fp32(j->x + m * j->K, j->w, j->scale, j->y + m * j->N, n0, n1, j->K);
    }
    free(panel);
}

/* Returns 0, or -1 when out of memory for the int16 activations or a panel. */
int loom_int8_gemm(const float *x, const int8_t *w, const float *scale, float *y, long M, long N, long K,
                   int threads) {
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0) { memset(y, 0, sizeof(float) * M * N); return 0; }
    long Kq = (K + 63) / 64 * 64; /* int16 rows padded with zeros: whole vectors and pairs never read past a row */
    float *xs = malloc(sizeof(float) * M + sizeof(int16_t) * M * Kq + 64);
    if (!xs) return -1;
    int16_t *xq = (int16_t *)(xs + M);
    quantize_rows(x, xq, xs, M, K, Kq, threads);
    int failed = 0;
    int8_job job = {x, xq, xs, w, scale, y, M, N, K, Kq, &failed};
    if (M <= DECODE_ROWS) {
        long tiles = (N + TILE - 1) / TILE;
        parallel_run(decode_tiles, &job, tiles, chunk_for(tiles, threads), threads);
    } else {
        long panels = (N + PW - 1) / PW;
        parallel_run(gemm_panels, &job, panels, chunk_for(panels, threads), threads);
    }
    free(xs);
    return failed ? -1 : 0;
}
