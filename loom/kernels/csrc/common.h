/* What every kernel file shares: the thread pool's entry point, the 4-row weight tile, and small SIMD helpers.
   x86-64-v3 (AVX2/FMA/F16C) is the baseline instruction set; build.py compiles for the level chosen at run time. */
#ifndef LOOM_COMMON_H
#define LOOM_COMMON_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "loom_kernels.h"

typedef void (*task_fn)(const void *args, long begin, long end);

/* run fn over items [0, total) on `threads` threads (the caller included), in claims of whole multiples of `chunk`
   items (pool.c) */
void parallel_run(task_fn fn, const void *args, long total, long chunk, int threads);

/* activation row -> int16 with one scale per row (int8.c; int4.c uses it too) */
float quantize_row(const float *x, int16_t *q, long K);

/* rows m of x (M, K) -> xs[m] = quantize_row(x_m, xq + m * Kq), each int16 row zero-padded to Kq (all zeros when
   the row holds inf/NaN, xs[m] NAN), rows spread over `threads` threads when there are many (int8.c) */
void quantize_rows(const float *x, int16_t *xq, float *xs, long M, long K, long Kq, int threads);

#define TILE 4

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* the claim unit for `tiles` items: about 32 units per thread, so the last claims balance the threads (the pool claims
   a share of what is left, in whole units, so a job still takes few claims) */
static inline long chunk_for(long tiles, int threads) {
    long c = tiles / (32L * (threads > 0 ? threads : 1));
    return c > 0 ? c : 1;
}

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

static inline float load_f(const void *p, long i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* 8 consecutive fp32 or bf16 values from p + i as fp32 */
static inline __m256 load8(const void *p, long i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* a quantization scale or zero point stored as float32 (half = 0) or float16 (half = 1) */
static inline float load_param(const void *p, long i, int half) {
    return half ? _cvtsh_ss(((const uint16_t *)p)[i]) : ((const float *)p)[i];
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

#if defined(__AVX512F__)
/* e^x for 16 lanes: exp8's range reduction and polynomial at 512 bits (-inf gives 0) */
static inline __m512 exp16(__m512 x) {
    __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                     _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
}
#endif

/* 8 fp32 rounded to bf16 as f32_to_bf16 does (nearest even, NaN stays a quiet NaN), in each lane's low 16 bits */
static inline __m256i round_bf16_8(__m256 f) {
    __m256i u = _mm256_castps_si256(f), one = _mm256_set1_epi32(1);
    __m256i even = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), one));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, even), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
}

#endif
