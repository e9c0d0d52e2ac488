"""C source of loom's kernel library (x86-64 AVX2/FMA/F16C): the thread pool and helpers every kernel shares,
the dense fp32/bf16 small-M GEMM, and the decode-step ops (RMSNorm, single-query attention). `loom/native.py`
compiles it together with the int8/int4 kernels of `loom/quantization/native_source.py`.

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

static int pool_spins = 0; /* loom_set_spin */

/* How long helpers look for the next job before they sleep, in pause instructions. 0 (the default) while torch's
   OpenMP workers may be spinning after their own regions: on 2 vCPUs a spinning helper and a spinning OpenMP worker
   starve each other (a whole fp32 decode measured 19.6 tok/s with 20000 spins, 22.2 with 2000, 23.8 with none).
   The decode loop, which runs torch on one thread, turns spinning on: waking a sleeping helper costs an
   inter-processor interrupt per kernel call. */
void loom_set_spin(int spins) { __atomic_store_n(&pool_spins, spins, __ATOMIC_SEQ_CST); }

static void *helper_main(void *arg) {
    int me = (int)(long)arg;
    long seen = 0;
    for (;;) {
        long gen = seen;
        for (int i = __atomic_load_n(&pool_spins, __ATOMIC_RELAXED); i > 0 && gen == seen; i--) {
            _mm_pause();
            gen = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST) >> GEN_SHIFT;
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool.mu);
            __atomic_add_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
            while ((gen = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST) >> GEN_SHIFT) == seen)
                pthread_cond_wait(&pool.cv, &pool.mu);
            __atomic_sub_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&pool.mu);
        }
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

/* -- decode-step ops: RMSNorm and single-query attention -----------------------------------------------------
   A decode step is mostly matrix-vector products; what is left around them is many tiny ops, each costing torch
   tens of microseconds of dispatch and (with several threads) a parallel region. These two replace the largest. */
static inline float load_f(const void *p, long i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* 8 consecutive fp32 or bf16 values from p + i as fp32 */
static inline __m256 load8(const void *p, long i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

typedef struct { const void *x, *w; void *y; long n; float eps; int bf16; } norm_job;

static void rms_norm_rows(const void *p, long begin, long end) {
    const norm_job *j = p;
    const long n = j->n;
    const int bf16 = j->bf16;
    for (long r = begin; r < end; r++) {
        long base = r * n, i = 0;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            __m256 v0 = load8(j->x, base + i, bf16), v1 = load8(j->x, base + i + 8, bf16);
            a0 = _mm256_fmadd_ps(v0, v0, a0);
            a1 = _mm256_fmadd_ps(v1, v1, a1);
        }
        float s = hsum(_mm256_add_ps(a0, a1));
        for (; i < n; i++) {
            float v = load_f(j->x, base + i, bf16);
            s += v * v;
        }
        float inv = 1.0f / sqrtf(s / (float)n + j->eps);
        for (i = 0; i < n; i++) {
            float h = load_f(j->x, base + i, bf16) * inv;
            if (bf16) ((uint16_t *)j->y)[base + i] = f32_to_bf16(load_f(j->w, i, 1) * bf16_to_f32(f32_to_bf16(h)));
            else ((float *)j->y)[base + i] = ((const float *)j->w)[i] * h;
        }
    }
}

/* y = w * (x / sqrt(mean(x^2) + eps)) over `rows` rows of n, computed as the reference does: in fp32, and for bf16
   the normalised row is rounded to bf16 before the bf16 weight multiplies it (the product rounded again). Rows are
   split over the pool in blocks of about 128K values; a decode step's few rows run on the caller alone. */
void loom_rms_norm(const void *x, const void *w, void *y, int bf16, long rows, long n, float eps, int threads) {
    norm_job job = {x, w, y, n, eps, bf16};
    long chunk = n > 0 ? (131072 + n - 1) / n : rows;
    parallel_run(rms_norm_rows, &job, rows, chunk > 0 ? chunk : 1, threads);
}

/* e^x for 8 lanes (Cephes' expf: range reduction by ln 2 in two parts, degree-5 polynomial; ~1 ulp); -inf -> 0 */
static inline __m256 exp8(__m256 x) {
    __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

#define ATTN_MAX_D 512
#define ATTN_STACK_L 4096

typedef struct {
    const void *q, *k, *v; const uint8_t *mask; void *out;
    long q_sb, q_sh, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, m_sb; /* strides in elements */
    long H, group, L, D; float scale; int bf16; int failed;
} attn_job;

/* one (batch, head) pair: softmax(q k^T * scale, masked) v in fp32 */
static void attn_one(attn_job *j, long bh) {
    long b = bh / j->H, h = bh % j->H, hk = h / j->group, L = j->L, D = j->D, D8 = D / 8 * 8;
    float qf[ATTN_MAX_D], acc[ATTN_MAX_D], stack_s[ATTN_STACK_L];
    float *s = L <= ATTN_STACK_L ? stack_s : malloc(sizeof(float) * L);
    if (!s) { j->failed = 1; return; }
    long qo = b * j->q_sb + h * j->q_sh;
    for (long d = 0; d < D; d++) qf[d] = load_f(j->q, qo + d, j->bf16);
    const uint8_t *mask = j->mask ? j->mask + b * j->m_sb : NULL;
    long kb = b * j->k_sb + hk * j->k_sh, vb = b * j->v_sb + hk * j->v_sh;
    float mx = -INFINITY;
    for (long l = 0; l < L; l++) {
        if (mask && !mask[l]) { s[l] = -INFINITY; continue; }
        long ko = kb + l * j->k_sl, d = 0;
        __m256 a = _mm256_setzero_ps();
        for (; d < D8; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qf + d), load8(j->k, ko + d, j->bf16), a);
        float dot = hsum(a);
        for (; d < D; d++) dot += qf[d] * load_f(j->k, ko + d, j->bf16);
        s[l] = dot * j->scale;
        if (s[l] > mx) mx = s[l];
    }
    float total = 0.0f;
    if (mx != -INFINITY) {
        long l = 0;
        __m256 m8 = _mm256_set1_ps(mx), t8 = _mm256_setzero_ps();
        for (; l + 8 <= L; l += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + l), m8));
            _mm256_storeu_ps(s + l, e);
            t8 = _mm256_add_ps(t8, e);
        }
        total = hsum(t8);
        for (; l < L; l++) { s[l] = s[l] == -INFINITY ? 0.0f : expf(s[l] - mx); total += s[l]; }
    }
    for (long d = 0; d < D; d++) acc[d] = 0.0f;
    for (long l = 0; l < L; l++) {
        if (s[l] == 0.0f) continue;
        long vo = vb + l * j->v_sl, d = 0;
        __m256 p = _mm256_set1_ps(s[l]);
        for (; d < D8; d += 8)
            _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(p, load8(j->v, vo + d, j->bf16), _mm256_loadu_ps(acc + d)));
        for (; d < D; d++) acc[d] += s[l] * load_f(j->v, vo + d, j->bf16);
    }
    float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (long d = 0; d < D; d++) {
        if (j->bf16) ((uint16_t *)j->out)[bh * D + d] = f32_to_bf16(acc[d] * inv);
        else ((float *)j->out)[bh * D + d] = acc[d] * inv;
    }
    if (s != stack_s) free(s);
}

static void attn_range(const void *p, long begin, long end) {
    for (long bh = begin; bh < end; bh++) attn_one((attn_job *)p, bh);
}

/* Attention of one query per (batch, head) over L keys: q (B, H, D), k/v (B, Hkv, L, D), all strided with unit
   stride along D; query head h reads kv head h / (H / Hkv); mask NULL or (B, L) bytes, nonzero = attend; out (B, H,
   D) contiguous. fp32 sums; bf16 in and out when bf16. Returns 0, or -1 when out of scratch memory. */
int loom_decode_attention(const void *q, long q_sb, long q_sh, const void *k, long k_sb, long k_sh, long k_sl,
                          const void *v, long v_sb, long v_sh, long v_sl, const uint8_t *mask, long m_sb, void *out,
                          int bf16, long B, long H, long Hkv, long L, long D, float scale, int threads) {
    attn_job job = {q, k, v, mask, out, q_sb, q_sh, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, m_sb,
                    H, H / Hkv, L, D, scale, bf16, 0};
    if (B * H * L * D < (1L << 17)) threads = 1; /* a few microseconds of work: not worth waking a helper */
    parallel_run(attn_range, &job, B * H, 1, threads);
    return job.failed ? -1 : 0;
}
"""
