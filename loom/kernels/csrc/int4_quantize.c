/* The asymmetric int4 quantizer: for each group of G weights, the float16 scale and integer zero point in [0, 15]
   with the smallest squared error, bit for bit what loom/kernels/ops.py's int4_quantize_asymmetric_reference
   computes in torch (the saved checkpoints must not depend on whether the kernels are on).

   The candidates: the group's range [min(w, 0), max(w, 0)] shrunk to [lo, hi] = [low * a, high * b] for a, b in
   SHRINKS (a outer, b inner); zero = round(-lo / s) with the min-max step s = max((hi - lo) / 15, 1e-6), and two
   scales per zero point, the min-max step and the smallest step that still covers [lo, hi] with that zero point.
   Each scale is rounded to float16 before its error is measured; a candidate wins only with a strictly smaller
   error, so ties keep the earlier one. Every operation is a single IEEE float32 operation in torch's order
   (compiled with -ffp-contract=off: no fused multiply-adds), except the sum of the squared errors, whose order
   block_error reproduces. A group where no candidate has a finite error (NaN or inf in it, or a range too
   wide for a float16 scale) gets scale 0, zero 0 and packed 0: the Python side names it in an error. */
#include "common.h"

static const double SHRINKS[3] = {1.0, 0.9, 0.8}; /* converted to float as torch converts a Python float */

/* -- torch's float32 sum over a contiguous row (ATen's cascade sum, SumKernel.cpp) with 8-float vectors: torch
   2.13 sums this way with its AVX-512, AVX2 and generic CPU builds alike (checked with ATEN_CPU_CAPABILITY; should
   a torch release change the order, tests/kernels/test_int4_quantize.py's mirrored groups fail). Element i of a row of G (G >= 8) goes to accumulator i % 32 (4 accumulators of
   8 lanes) while i < 32 * rows, rows = G / 32; every 2^power rows a cascade of 4 levels folds them; the elements
   of the leftover whole vectors go to accumulator i % 8; then accumulator l gets l + 8, l + 16 and l + 24 added
   in turn, and the sum is 0 + the scalar tail in order + accumulators 0..7 in order. Rows shorter than 8 use the
   same scheme on single floats (accumulator i % 4, the tail into 0, then 0 + 1 + 2 + 3).

   Here the vector lanes are 8 groups searched side by side (torch's lanes are positions within a group), so each
   lane does exactly one group's scalar arithmetic, in that group's order. */

#define LANES 8

static inline long ceil_log2(long x) {
    if (x <= 2) return 1;
    long bits = 0;
    for (unsigned long v = (unsigned long)(x - 1); v; v >>= 1) bits++;
    return bits;
}

/* per-lane max(a, b) as a > b ? a : b and min as a < b ? a : b: with a NaN or two zeros, the second operand */
#define VMAX _mm256_max_ps
#define VMIN _mm256_min_ps

/* torch's clamp(x, 0, 15): NaN stays NaN, -0.0 stays -0.0 */
static inline __m256 clamp_nibble(__m256 q) {
    return VMIN(_mm256_set1_ps(15.0f), VMAX(_mm256_setzero_ps(), q));
}

/* torch's clamp(min=1e-6) */
static inline __m256 clamp_step(__m256 s) { return VMAX(_mm256_set1_ps(1e-6f), s); }

static inline __m256 nibbles(__m256 w, __m256 s, __m256 z) {
    return clamp_nibble(_mm256_round_ps(_mm256_add_ps(_mm256_div_ps(w, s), z),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* the squared error of element i of each lane's group for the candidate (s, z): ((q - z) * s - w)^2 */
static inline __m256 sq_err(const float *t, long i, __m256 s, __m256 z) {
    __m256 w = _mm256_loadu_ps(t + i * LANES);
    __m256 d = _mm256_sub_ps(_mm256_mul_ps(_mm256_sub_ps(nibbles(w, s, z), z), s), w);
    return _mm256_mul_ps(d, d);
}

/* each lane's squared error summed in torch's order; t is the block transposed, (G, LANES) */
static __m256 block_error(const float *t, long G, __m256 s, __m256 z) {
    if (G < 8) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        long full = G / 4 * 4;
        for (long i = 0; i < full; i++) acc[i % 4] = _mm256_add_ps(acc[i % 4], sq_err(t, i, s, z));
        for (long i = full; i < G; i++) acc[0] = _mm256_add_ps(acc[0], sq_err(t, i, s, z));
        return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), acc[2]), acc[3]);
    }
    long nv = G / 8, rows = nv / 4, power = ceil_log2(rows) / 4;
    if (power < 4) power = 4;
    long step = 1L << power, mask = step - 1, r = 0;
    __m256 acc[4][32];
    int levels = rows >= step ? 4 : 1; /* the upper levels stay 0 otherwise, and x + 0 = x for these sums */
    for (int l = 0; l < levels; l++)
        for (int c = 0; c < 32; c++) acc[l][c] = _mm256_setzero_ps();
    while (r + step <= rows) {
        for (long j = 0; j < step; j++, r++)
            for (int c = 0; c < 32; c++) acc[0][c] = _mm256_add_ps(acc[0][c], sq_err(t, 32 * r + c, s, z));
        for (int l = 1; l < 4; l++) {
            for (int c = 0; c < 32; c++) {
                acc[l][c] = _mm256_add_ps(acc[l][c], acc[l - 1][c]);
                acc[l - 1][c] = _mm256_setzero_ps();
            }
            if (r & (mask << (l * power))) break;
        }
    }
    for (; r < rows; r++)
        for (int c = 0; c < 32; c++) acc[0][c] = _mm256_add_ps(acc[0][c], sq_err(t, 32 * r + c, s, z));
    for (int l = 1; l < levels; l++)
        for (int c = 0; c < 32; c++) acc[0][c] = _mm256_add_ps(acc[0][c], acc[l][c]);
    for (long i = rows * 32; i < nv * 8; i++) acc[0][i % 8] = _mm256_add_ps(acc[0][i % 8], sq_err(t, i, s, z));
    for (int c = 0; c < 8; c++)
        acc[0][c] = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0][c], acc[0][8 + c]), acc[0][16 + c]),
                                  acc[0][24 + c]);
    __m256 total = _mm256_setzero_ps();
    for (long i = nv * 8; i < G; i++) total = _mm256_add_ps(total, sq_err(t, i, s, z));
    for (int c = 0; c < 8; c++) total = _mm256_add_ps(total, acc[0][c]);
    return total;
}

/* lanes where `m` is set take b, the others a */
static inline __m256 pick(__m256 a, __m256 b, __m256 m) { return _mm256_blendv_ps(a, b, m); }

/* the search for the LANES groups of a transposed block: float16 bits of each lane's scale (0 where no candidate
   had a finite error) and its zero point */
static void search_block(const float *t, long G, __m128i *best_scale, __m256 *best_zero) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), fifteen = _mm256_set1_ps(15.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    /* min(w, 0) and max(w, 0) as w < low ? w : low from +0.0: a zero minimum is +0.0 (see the reference) */
    __m256 low = zero, high = zero;
    for (long i = 0; i < G; i++) {
        __m256 w = _mm256_loadu_ps(t + i * LANES);
        low = VMIN(w, low);
        high = VMAX(w, high);
    }
    __m256 best_err = _mm256_set1_ps(INFINITY), best_z = zero;
    __m128i best_s = _mm_setzero_si128();
    for (int ia = 0; ia < 3; ia++) {
        for (int ib = 0; ib < 3; ib++) {
            __m256 lo = _mm256_mul_ps(low, _mm256_set1_ps((float)SHRINKS[ia]));
            __m256 hi = _mm256_mul_ps(high, _mm256_set1_ps((float)SHRINKS[ib]));
            __m256 neg_lo = _mm256_xor_ps(lo, sign);
            __m256 minmax = clamp_step(_mm256_div_ps(_mm256_sub_ps(hi, lo), fifteen));
            __m256 z = clamp_nibble(_mm256_round_ps(_mm256_div_ps(neg_lo, minmax),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            __m256 above = _mm256_sub_ps(fifteen, z), below = z; /* grid steps on each side of 0 */
            __m256 up = pick(zero, _mm256_div_ps(hi, VMAX(one, above)), _mm256_cmp_ps(above, zero, _CMP_GT_OQ));
            __m256 down = pick(zero, _mm256_div_ps(neg_lo, VMAX(one, below)), _mm256_cmp_ps(below, zero, _CMP_GT_OQ));
            __m256 covering = pick(VMAX(up, down), _mm256_set1_ps(NAN), _mm256_cmp_ps(up, down, _CMP_UNORD_Q));
            covering = clamp_step(covering); /* torch.maximum keeps NaN */
            const __m256 steps[2] = {minmax, covering};
            for (int c = 0; c < 2; c++) {
                __m128i hs = _mm256_cvtps_ph(steps[c], _MM_FROUND_TO_NEAREST_INT);
                __m256 s = _mm256_cvtph_ps(hs);
                __m256 err = block_error(t, G, s, z);
                __m256 better = _mm256_cmp_ps(err, best_err, _CMP_LT_OQ); /* ties keep the earlier candidate */
                best_err = pick(best_err, err, better);
                best_z = pick(best_z, z, better);
                __m128i better16 = _mm_packs_epi32(_mm256_castsi256_si128(_mm256_castps_si256(better)),
                                                   _mm256_extracti128_si256(_mm256_castps_si256(better), 1));
                best_s = _mm_blendv_epi8(best_s, hs, better16);
            }
        }
    }
    *best_scale = best_s;
    *best_zero = best_z;
}

typedef struct { const float *w; uint8_t *packed; uint16_t *scale, *zero; long G, groups; int *failed; } quant_job;

/* blocks [begin, end) of LANES consecutive groups (group i covers w[i * G, (i + 1) * G): rows are whole groups) */
static void quant_blocks(const void *p, long begin, long end) {
    const quant_job *j = p;
    long G = j->G;
    float *t = malloc(sizeof(float) * G * LANES);
    if (!t) { __atomic_store_n(j->failed, 1, __ATOMIC_RELAXED); return; }
    for (long b = begin; b < end; b++) {
        long first = b * LANES, count = j->groups - first < LANES ? j->groups - first : LANES;
        for (long l = 0; l < LANES; l++) { /* missing lanes repeat the first group; their results are dropped */
            const float *src = j->w + (first + (l < count ? l : 0)) * G;
            for (long i = 0; i < G; i++) t[i * LANES + l] = src[i];
        }
        __m128i hs;
        __m256 z;
        search_block(t, G, &hs, &z);
        uint16_t sbits[LANES], zbits[LANES];
        _mm_storeu_si128((__m128i *)sbits, hs);
        _mm_storeu_si128((__m128i *)zbits, _mm256_cvtps_ph(z, _MM_FROUND_TO_NEAREST_INT));
        memcpy(j->scale + first, sbits, sizeof(uint16_t) * count);
        memcpy(j->zero + first, zbits, sizeof(uint16_t) * count);
        /* 8 groups hold an even number of weights, so a block's bytes are its own (G odd splits bytes inside it) */
        memset(j->packed + first * G / 2, 0, count * G / 2);
        __m256 s = _mm256_cvtph_ps(hs);
        for (long i = 0; i < G; i++) {
            int32_t q[LANES];
            _mm256_storeu_si256((__m256i *)q, _mm256_cvtps_epi32(nibbles(_mm256_loadu_ps(t + i * LANES), s, z)));
            for (long l = 0; l < count; l++) {
                if (!sbits[l]) continue; /* no finite candidate: packed stays 0 */
                long e = (first + l) * G + i;
                j->packed[e / 2] |= (uint8_t)(q[l] << (4 * (e & 1)));
            }
        }
    }
    free(t);
}

/* w (N, K) float32 -> packed (N, K/2) nibbles (even column low), scale and zero (N, K/G) float16 bits.
   Needs K even and K % G == 0. Returns 0, or -1 when out of memory. */
int loom_int4_quantize_asymmetric(const float *w, uint8_t *packed, uint16_t *scale, uint16_t *zero, long N,
                                  long K, long G, int threads) {
    int failed = 0;
    long groups = N * (K / G), blocks = (groups + LANES - 1) / LANES;
    quant_job job = {w, packed, scale, zero, G, groups, &failed};
    parallel_run(quant_blocks, &job, blocks, chunk_for(blocks, threads), threads);
    return failed ? -1 : 0;
}
