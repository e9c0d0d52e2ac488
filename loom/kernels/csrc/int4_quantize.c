/* The asymmetric int4 quantizer: for each group of G weights, the float16 scale and integer zero point in [0, 15]
   with the smallest squared error, bit for bit what loom/kernels/ops.py's int4_quantize_asymmetric_reference
   computes in torch (the saved checkpoints must not depend on whether the kernels are on).

   The candidates: the group's range [min(w, 0), max(w, 0)] shrunk to [lo, hi] = [low * a, high * b] for a, b in
   SHRINKS (a outer, b inner); zero = round(-lo / s) with the min-max step s = max((hi - lo) / 15, 1e-6), and two
   scales per zero point, the min-max step and the smallest step that still covers [lo, hi] with that zero point.
   Each scale is rounded to float16 before its error is measured; a candidate wins only with a strictly smaller
   error, so ties keep the earlier one. Every operation is a single IEEE float32 operation in torch's order
   (compiled with -ffp-contract=off: no fused multiply-adds), except the sum of the squared errors, whose order
   torch_order_sum reproduces. A group where no candidate has a finite error (NaN or inf in it, or a range too
   wide for a float16 scale) gets scale 0, zero 0 and packed 0: the Python side names it in an error. */
#include "common.h"

static const double SHRINKS[3] = {1.0, 0.9, 0.8}; /* converted to float as torch converts a Python float */

/* -- torch's float32 sum over a contiguous row (ATen's cascade sum, SumKernel.cpp), with its vector width of 8
   floats: torch dispatches this reduction to its AVX2 kernel on AVX2 and AVX-512 CPUs alike, and its generic
   build also uses 8-float vectors. Vector v holds elements 8v..8v+7; rows of 4 vectors are summed into 4
   accumulators, with a cascade of 4 levels folding every 2^level_power rows; the leftover vectors go into the
   first accumulator, the 4 are added in order, then the scalar tail and the 8 lanes in order. Rows shorter than 8
   use the same scheme on single floats. */

static inline long ceil_log2(long x) {
    if (x <= 2) return 1;
    long bits = 0;
    for (unsigned long v = (unsigned long)(x - 1); v; v >>= 1) bits++;
    return bits;
}

/* squared errors of 8 weights for the candidate (s, z): ((clamp(round(w / s + z), 0, 15) - z) * s - w)^2; the
   clamp keeps NaN as torch's does (max/min return their second operand when either is NaN) */
static inline __m256 sq_err8(const float *w, __m256 s, __m256 z) {
    const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(15.0f);
    __m256 x = _mm256_loadu_ps(w);
    __m256 q = _mm256_round_ps(_mm256_add_ps(_mm256_div_ps(x, s), z), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(hi, _mm256_max_ps(lo, q));
    __m256 d = _mm256_sub_ps(_mm256_mul_ps(_mm256_sub_ps(q, z), s), x);
    return _mm256_mul_ps(d, d);
}

static inline float clamp_nibble(float q) {
    return q < 0.0f ? 0.0f : (q > 15.0f ? 15.0f : q); /* NaN stays NaN; -0.0 stays -0.0, as in torch.clamp */
}

static inline float sq_err1(float w, float s, float z) {
    float d = (clamp_nibble(nearbyintf(w / s + z)) - z) * s - w;
    return d * d;
}

/* the cascade over `rows` rows of 4 vectors, leaving the 4 partial sums in acc0[0..3] */
static void cascade_rows(const float *w, long rows, __m256 s, __m256 z, __m256 acc0[4]) {
    __m256 acc[4][4];
    for (int l = 0; l < 4; l++)
        for (int k = 0; k < 4; k++) acc[l][k] = _mm256_setzero_ps();
    long power = ceil_log2(rows) / 4;
    if (power < 4) power = 4;
    long step = 1L << power, mask = step - 1, i = 0;
    while (i + step <= rows) {
        for (long j = 0; j < step; j++, i++)
            for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], sq_err8(w + (4 * i + k) * 8, s, z));
        for (int l = 1; l < 4; l++) {
            for (int k = 0; k < 4; k++) {
                acc[l][k] = _mm256_add_ps(acc[l][k], acc[l - 1][k]);
                acc[l - 1][k] = _mm256_setzero_ps();
            }
            if (i & (mask << (l * power))) break;
        }
    }
    for (; i < rows; i++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], sq_err8(w + (4 * i + k) * 8, s, z));
    for (int l = 1; l < 4; l++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], acc[l][k]);
    for (int k = 0; k < 4; k++) acc0[k] = acc[0][k];
}

/* the same cascade on single floats (rows of 4 weights), for groups shorter than one vector */
static float scalar_sum(const float *w, long G, float s, float z) {
    float acc[4][4] = {{0}};
    long rows = G / 4, power = ceil_log2(rows) / 4;
    if (power < 4) power = 4;
    long step = 1L << power, mask = step - 1, i = 0;
    while (i + step <= rows) {
        for (long j = 0; j < step; j++, i++)
            for (int k = 0; k < 4; k++) acc[0][k] += sq_err1(w[4 * i + k], s, z);
        for (int l = 1; l < 4; l++) {
            for (int k = 0; k < 4; k++) { acc[l][k] += acc[l - 1][k]; acc[l - 1][k] = 0.0f; }
            if (i & (mask << (l * power))) break;
        }
    }
    for (; i < rows; i++)
        for (int k = 0; k < 4; k++) acc[0][k] += sq_err1(w[4 * i + k], s, z);
    for (int l = 1; l < 4; l++)
        for (int k = 0; k < 4; k++) acc[0][k] += acc[l][k];
    for (long t = rows * 4; t < G; t++) acc[0][0] += sq_err1(w[t], s, z);
    return ((acc[0][0] + acc[0][1]) + acc[0][2]) + acc[0][3];
}

/* the group's squared error for the candidate (s, z), summed in torch's order */
static float group_error(const float *w, long G, float s, float z) {
    if (G < 8) return scalar_sum(w, G, s, z);
    long nv = G / 8, rows = nv / 4;
    __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), acc[4];
    cascade_rows(w, rows, vs, vz, acc);
    for (long v = rows * 4; v < nv; v++) acc[0] = _mm256_add_ps(acc[0], sq_err8(w + v * 8, vs, vz));
    for (int k = 1; k < 4; k++) acc[0] = _mm256_add_ps(acc[0], acc[k]);
    float total = 0.0f, lanes[8];
    for (long t = nv * 8; t < G; t++) total += sq_err1(w[t], s, z);
    _mm256_storeu_ps(lanes, acc[0]);
    for (int l = 0; l < 8; l++) total += lanes[l];
    return total;
}

static inline float clamp_step(float s) {
    return s < 1e-6f ? 1e-6f : s; /* torch's clamp(min=1e-6): NaN stays NaN */
}

static inline float half_round(float s, uint16_t *bits) {
    *bits = _cvtss_sh(s, _MM_FROUND_TO_NEAREST_INT);
    return _cvtsh_ss(*bits);
}

/* search one group; writes its float16 scale and zero point, and its nibbles into the zeroed packed row */
static void quantize_group(const float *w, long G, long c0, uint8_t *row, uint16_t *scale, uint16_t *zero) {
    float low = 0.0f, high = 0.0f; /* min(w, 0) and max(w, 0); a zero minimum is +0.0 (see the reference) */
    for (long i = 0; i < G; i++) {
        low = w[i] < low ? w[i] : low;
        high = w[i] > high ? w[i] : high;
    }
    float best_err = INFINITY, best_z = 0.0f;
    uint16_t best_s = 0;
    for (int ia = 0; ia < 3; ia++) {
        for (int ib = 0; ib < 3; ib++) {
            float lo = low * (float)SHRINKS[ia], hi = high * (float)SHRINKS[ib];
            float minmax = clamp_step((hi - lo) / 15.0f);
            float z = clamp_nibble(nearbyintf(-lo / minmax));
            float above = 15.0f - z, below = z; /* grid steps on each side of 0 */
            float up = above > 0 ? hi / (above < 1.0f ? 1.0f : above) : 0.0f;
            float down = below > 0 ? -lo / (below < 1.0f ? 1.0f : below) : 0.0f;
            float covering = (isnan(up) || isnan(down)) ? NAN : (up > down ? up : down); /* torch.maximum */
            covering = clamp_step(covering);
            const float steps[2] = {minmax, covering};
            for (int c = 0; c < 2; c++) {
                uint16_t hs;
                float s = half_round(steps[c], &hs);
                float err = group_error(w, G, s, z);
                if (err < best_err) { best_err = err; best_s = hs; best_z = z; }
            }
        }
    }
    *scale = best_s;
    *zero = _cvtss_sh(best_z, _MM_FROUND_TO_NEAREST_INT);
    if (best_s == 0) return; /* no finite candidate: packed stays 0 */
    float s = _cvtsh_ss(best_s);
    for (long i = 0; i < G; i++) {
        long c = c0 + i;
        uint8_t q = (uint8_t)clamp_nibble(nearbyintf(w[i] / s + best_z));
        row[c / 2] |= (uint8_t)(q << (4 * (c & 1)));
    }
}

typedef struct { const float *w; uint8_t *packed; uint16_t *scale, *zero; long K, G; } quant_job;

static void quant_rows(const void *p, long begin, long end) {
    const quant_job *j = p;
    long K = j->K, G = j->G, ng = K / G;
    for (long n = begin; n < end; n++) {
        uint8_t *row = j->packed + n * (K / 2);
        memset(row, 0, K / 2);
        for (long g = 0; g < ng; g++)
            quantize_group(j->w + n * K + g * G, G, g * G, row, j->scale + n * ng + g, j->zero + n * ng + g);
    }
}

/* w (N, K) float32 -> packed (N, K/2) nibbles (even column low), scale and zero (N, K/G) float16 bits.
   Needs K even and K % G == 0. */
void loom_int4_quantize_asymmetric(const float *w, uint8_t *packed, uint16_t *scale, uint16_t *zero, long N,
                                   long K, long G, int threads) {
    quant_job job = {w, packed, scale, zero, K, G};
    parallel_run(quant_rows, &job, N, chunk_for(N, threads), threads);
}
