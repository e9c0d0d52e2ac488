"""C source of loom's kernel library (x86-64 AVX2/FMA/F16C): the thread pool and helpers every kernel shares,
and the dense fp32/bf16 small-M GEMM. `loom/native.py` compiles it together with the int8/int4 kernels of
`loom/quantization/native_source.py`.

Kept as a Python string so it ships inside the package without package-data configuration.
"""

SOURCE = r"""
/* loom's C kernel library: a helper-thread pool shared by every kernel, dense fp32/bf16 small-M GEMMs, and
   (appended from loom/quantization/native_source.py) the int8/int4 weight-only GEMMs.

   Threads: a small pool of helper threads, not OpenMP. An OpenMP region ends in a barrier that waits for every
   team thread, so on a busy machine one preempted thread stalls each call for a scheduler tick (measured: 30x
   slower decode at load 7 on 2 vCPUs). Here the caller and helpers claim chunks from a shared counter; the
   caller waits only for chunks already being worked on, and a helper that wakes late finds nothing left. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include <math.h>

/* -- helper pool ------------------------------------------------------------------------------------------- */
#define MAX_HELPERS 63
#define GEN_SHIFT 40
#define IDX_MASK ((1L << GEN_SHIFT) - 1)

typedef void (*task_fn)(const void *args, long begin, long end);

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int helpers, sleepers, active;
    long ticket;                 /* (generation << GEN_SHIFT) | next unclaimed item */
    long done, total, chunk;
    task_fn fn;
    const void *args;
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
static pthread_mutex_t caller = PTHREAD_MUTEX_INITIALIZER; /* one job at a time; other callers run inline */

/* claim and run chunks of the job with generation `gen`; returns when none are left */
static void work(long gen) {
    for (;;) {
        long t = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST);
        long idx = t & IDX_MASK;
        if ((t >> GEN_SHIFT) != gen || idx >= __atomic_load_n(&pool.total, __ATOMIC_SEQ_CST)) return;
        long chunk = pool.chunk, end = idx + chunk;
        if (!__atomic_compare_exchange_n(&pool.ticket, &t, t + chunk, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            continue;
        /* the job cannot finish (nor its fields change) until this chunk is counted done */
        if (end > pool.total) end = pool.total;
        pool.fn(pool.args, idx, end);
        __atomic_add_fetch(&pool.done, end - idx, __ATOMIC_SEQ_CST);
    }
}

static void *helper_main(void *arg) {
    int me = (int)(long)arg;
    long seen = 0;
    for (;;) {
        /* sleep until the next job rather than spin for it: torch's OpenMP workers spin after their own regions, and
           on 2 vCPUs a spinning helper and a spinning OpenMP worker starve each other (a whole fp32 decode measured
           19.6 tok/s with 20000 spins first, 22.2 with 2000, 23.8 with none) */
        long gen;
        pthread_mutex_lock(&pool.mu);
        __atomic_add_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
        while ((gen = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST) >> GEN_SHIFT) == seen)
            pthread_cond_wait(&pool.cv, &pool.mu);
        __atomic_sub_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&pool.mu);
        seen = gen;
        if (me < __atomic_load_n(&pool.active, __ATOMIC_SEQ_CST)) work(gen);
    }
    return NULL;
}

static void forget_helpers(void) { pool.helpers = 0; pool.sleepers = 0; } /* a forked child has none */

/* run fn over items [0, total) on `threads` threads (the caller included), in chunks of `chunk` items */
static void parallel_run(task_fn fn, const void *args, long total, long chunk, int threads) {
    if (threads > MAX_HELPERS + 1) threads = MAX_HELPERS + 1;
    if (threads <= 1 || total <= chunk || pthread_mutex_trylock(&caller) != 0) { fn(args, 0, total); return; }
    pthread_mutex_lock(&pool.mu);
    if (pool.helpers == 0) pthread_atfork(NULL, NULL, forget_helpers);
    while (pool.helpers < threads - 1) {
        pthread_t th;
        if (pthread_create(&th, NULL, helper_main, (void *)(long)pool.helpers) != 0) break;
        pthread_detach(th);
        pool.helpers++;
    }
    pthread_mutex_unlock(&pool.mu);
    pool.fn = fn; pool.args = args; pool.chunk = chunk;
    __atomic_store_n(&pool.total, total, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.done, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.active, threads - 1, __ATOMIC_SEQ_CST);
    long gen = (__atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST) >> GEN_SHIFT) + 1;
    __atomic_store_n(&pool.ticket, gen << GEN_SHIFT, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool.sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    work(gen);
    while (__atomic_load_n(&pool.done, __ATOMIC_SEQ_CST) < total) _mm_pause();
    pthread_mutex_unlock(&caller);
}

#define TILE 4

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* tiles of TILE rows, about 8 chunks per thread so a slow thread costs little */
static long chunk_for(long tiles, int threads) {
    long c = tiles / (8L * (threads > 0 ? threads : 1));
    return c > 0 ? c : 1;
}

/* -- dense small-M GEMM: y (M, N) = x (M, K) @ W (N, K).T + bias, W fp32 or bf16 ------------------------------
   For decode-sized inputs (M <= 16 rows): the weight is streamed once from memory and each loaded (and, for bf16,
   widened) weight vector is used for up to 4 activation rows. Activations are converted to fp32 once per call
   (bf16 weights: each 16-block reordered to columns 0-3, 8-11, 4-7, 12-15, the order in which unpacking 16 bf16
   with zeros below yields two fp32 vectors); sums are fp32, and bf16 outputs are rounded to nearest even. */
#define DENSE_MB 4
#define DENSE_PF 2 /* prefetch the same columns this many tiles ahead */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays a (quiet) NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

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
"""
