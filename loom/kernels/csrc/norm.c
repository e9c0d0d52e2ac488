#include "common.h"

/* RMSNorm. A decode step is mostly matrix-vector products; what is left around them is many tiny ops, each costing
   torch tens of microseconds of dispatch and (with several threads) a parallel region. This and single-query
   attention (attention.c) replace the largest. */
typedef struct { const void *x, *w; void *y; long n; float eps; int bf16, plus_one; } norm_job;

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
        __m256 inv8 = _mm256_set1_ps(inv);
        if (j->plus_one) { /* Gemma: fp32 x / rms * (1 + w), rounded once */
            __m256 one = _mm256_set1_ps(1.0f);
            for (i = 0; i + 8 <= n; i += 8) {
                __m256 y = _mm256_mul_ps(_mm256_mul_ps(load8(j->x, base + i, bf16), inv8),
                                         _mm256_add_ps(one, load8(j->w, i, bf16)));
                if (bf16) {
                    __m256i o = round_bf16_8(y);
                    _mm_storeu_si128((__m128i *)((uint16_t *)j->y + base + i),
                                     _mm_packus_epi32(_mm256_castsi256_si128(o), _mm256_extracti128_si256(o, 1)));
                } else {
                    _mm256_storeu_ps((float *)j->y + base + i, y);
                }
            }
            for (; i < n; i++) {
                float y = load_f(j->x, base + i, bf16) * inv * (1.0f + load_f(j->w, i, bf16));
                if (bf16) ((uint16_t *)j->y)[base + i] = f32_to_bf16(y);
                else ((float *)j->y)[base + i] = y;
            }
            continue;
        }
        for (i = 0; i + 8 <= n; i += 8) { /* the scalar loop below, 8 at a time */
            __m256 h = _mm256_mul_ps(load8(j->x, base + i, bf16), inv8);
            if (bf16) {
                __m256 hr = _mm256_castsi256_ps(_mm256_slli_epi32(round_bf16_8(h), 16));
                __m256i o = round_bf16_8(_mm256_mul_ps(load8(j->w, i, 1), hr));
                _mm_storeu_si128((__m128i *)((uint16_t *)j->y + base + i),
                                 _mm_packus_epi32(_mm256_castsi256_si128(o), _mm256_extracti128_si256(o, 1)));
            } else {
                _mm256_storeu_ps((float *)j->y + base + i, _mm256_mul_ps(_mm256_loadu_ps((const float *)j->w + i), h));
            }
        }
        for (; i < n; i++) {
            float h = load_f(j->x, base + i, bf16) * inv;
            if (bf16) ((uint16_t *)j->y)[base + i] = f32_to_bf16(load_f(j->w, i, 1) * bf16_to_f32(f32_to_bf16(h)));
            else ((float *)j->y)[base + i] = ((const float *)j->w)[i] * h;
        }
    }
}

/* y = w * (x / sqrt(mean(x^2) + eps)) over `rows` rows of n, computed as the reference does: in fp32, and for bf16
   the normalised row is rounded to bf16 before the bf16 weight multiplies it (the product rounded again). Rows are
   split over the pool in blocks of about 128K values; a decode step's few rows run on the caller alone. */
static void run_norm(norm_job *job, long rows, int threads) {
    long chunk = job->n > 0 ? (131072 + job->n - 1) / job->n : rows;
    parallel_run(rms_norm_rows, job, rows, chunk > 0 ? chunk : 1, threads);
}

void loom_rms_norm(const void *x, const void *w, void *y, int bf16, long rows, long n, float eps, int threads) {
    norm_job job = {x, w, y, n, eps, bf16, 0};
    run_norm(&job, rows, threads);
}

/* Gemma's RMSNorm: (x / sqrt(mean(x^2) + eps)) * (1 + w), all in fp32 and rounded to x's dtype once at the end, as
   the reference computes it (x and w fp32, or both bf16). */
void loom_rms_norm_1p(const void *x, const void *w, void *y, int bf16, long rows, long n, float eps, int threads) {
    norm_job job = {x, w, y, n, eps, bf16, 1};
    run_norm(&job, rows, threads);
}
