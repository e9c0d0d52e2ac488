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

/* run fn over items [0, total) on `threads` threads (the caller included), in chunks of `chunk` items (pool.c) */
void parallel_run(task_fn fn, const void *args, long total, long chunk, int threads);

/* activation row -> int16 with one scale per row (int8.c; int4.c uses it too) */
float quantize_row(const float *x, int16_t *q, long K);

#define TILE 4

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* tiles of TILE rows, about 8 chunks per thread so a slow thread costs little */
static inline long chunk_for(long tiles, int threads) {
    long c = tiles / (8L * (threads > 0 ? threads : 1));
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

#endif
