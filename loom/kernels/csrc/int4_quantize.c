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
   a torch release change the order, tests/kernels/test_int4_quantize.py's mirrored groups fail). Element i of a
   row of G (G >= 8) goes to accumulator i % 32 (4 accumulators of 8 lanes) while i < 32 * rows, rows = G / 32;
   every 2^power rows a cascade of 4 levels folds them; the elements of the leftover whole vectors go to
   accumulator i % 8; then accumulator l gets l + 8, l + 16 and l + 24 added in turn, and the sum is 0 + the scalar
   tail in order + accumulators 0..7 in order. Rows shorter than 8 use the same scheme on single floats
   (accumulator i % 4, the tail into 0, then 0 + 1 + 2 + 3).

   Here the vector lanes are groups searched side by side (torch's lanes are positions within a group), so each
   lane does exactly one group's scalar arithmetic, in that group's order. */

/* One vector of lanes: 16 groups on the AVX-512 levels, 8 on AVX2 (the arithmetic per lane is the same) */
#ifdef __AVX512F__
#define LANES 16
typedef __m512 vf;
typedef __mmask16 vmask;
typedef __m256i vhalf;
#define vset(x) _mm512_set1_ps(x)
#define vload(p) _mm512_loadu_ps(p)
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vdiv _mm512_div_ps
#define vmax _mm512_max_ps
#define vmin _mm512_min_ps
#define vxor _mm512_xor_ps
#define vround(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vcmp(a, b, op) _mm512_cmp_ps_mask(a, b, op)
#define vpick(a, b, m) _mm512_mask_blend_ps(m, a, b)
#define vto_half(x) _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)
#define vfrom_half(h) _mm512_cvtph_ps(h)
#define vpick_half(a, b, m) _mm256_mask_blend_epi16(m, a, b)
#define vstore_half(p, h) _mm256_storeu_si256((__m256i *)(p), h)
#define vstore_int(p, x) _mm512_storeu_si512((void *)(p), _mm512_cvtps_epi32(x))
#else
#define LANES 8
typedef __m256 vf;
typedef __m256 vmask;
typedef __m128i vhalf;
#define vset(x) _mm256_set1_ps(x)
#define vload(p) _mm256_loadu_ps(p)
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vdiv _mm256_div_ps
#define vmax _mm256_max_ps
#define vmin _mm256_min_ps
#define vxor _mm256_xor_ps
#define vround(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vcmp(a, b, op) _mm256_cmp_ps(a, b, op)
#define vpick(a, b, m) _mm256_blendv_ps(a, b, m)
#define vto_half(x) _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)
#define vfrom_half(h) _mm256_cvtph_ps(h)
static inline __m128i vpick_half(__m128i a, __m128i b, __m256 m) { /* 32-bit lane mask -> 16-bit lanes */
    __m256i mi = _mm256_castps_si256(m);
    return _mm_blendv_epi8(a, b, _mm_packs_epi32(_mm256_castsi256_si128(mi), _mm256_extracti128_si256(mi, 1)));
}
#define vstore_half(p, h) _mm_storeu_si128((__m128i *)(p), h)
#define vstore_int(p, x) _mm256_storeu_si256((__m256i *)(p), _mm256_cvtps_epi32(x))
#endif
/* vmax(a, b) is a > b ? a : b and vmin(a, b) a < b ? a : b per lane: with a NaN or two zeros, the second operand;
   vpick(a, b, m) takes b where m is set */

static inline long ceil_log2(long x) {
    if (x <= 2) return 1;
    long bits = 0;
    for (unsigned long v = (unsigned long)(x - 1); v; v >>= 1) bits++;
    return bits;
}

/* torch's clamp(x, 0, 15): NaN stays NaN, -0.0 stays -0.0 */
static inline vf clamp_nibble(vf q) { return vmin(vset(15.0f), vmax(vset(0.0f), q)); }

/* torch's clamp(min=1e-6) */
static inline vf clamp_step(vf s) { return vmax(vset(1e-6f), s); }

static inline vf nibbles(vf w, vf s, vf z) { return clamp_nibble(vround(vadd(vdiv(w, s), z))); }

/* the squared error of element i of each lane's group for the candidate (s, z): ((q - z) * s - w)^2 */
static inline vf sq_err(const float *t, long i, vf s, vf z) {
    vf w = vload(t + i * LANES);
    vf d = vsub(vmul(vsub(nibbles(w, s, z), z), s), w);
    return vmul(d, d);
}

/* each lane's squared error summed in torch's order; t is the block transposed, (G, LANES) */
static vf block_error(const float *t, long G, vf s, vf z) {
    if (G < 8) {
        vf acc[4] = {vset(0.0f), vset(0.0f), vset(0.0f), vset(0.0f)};
        long full = G / 4 * 4;
        for (long i = 0; i < full; i++) acc[i % 4] = vadd(acc[i % 4], sq_err(t, i, s, z));
        for (long i = full; i < G; i++) acc[0] = vadd(acc[0], sq_err(t, i, s, z));
        return vadd(vadd(vadd(acc[0], acc[1]), acc[2]), acc[3]);
    }
    long nv = G / 8, rows = nv / 4, power = ceil_log2(rows) / 4;
    if (power < 4) power = 4;
    long step = 1L << power, mask = step - 1, r = 0;
    vf acc[4][32];
    int levels = rows >= step ? 4 : 1; /* the upper levels stay 0 otherwise, and x + 0 = x for these sums */
    for (int l = 0; l < levels; l++)
        for (int c = 0; c < 32; c++) acc[l][c] = vset(0.0f);
    while (r + step <= rows) {
        for (long j = 0; j < step; j++, r++)
            for (int c = 0; c < 32; c++) acc[0][c] = vadd(acc[0][c], sq_err(t, 32 * r + c, s, z));
        for (int l = 1; l < 4; l++) {
            for (int c = 0; c < 32; c++) {
                acc[l][c] = vadd(acc[l][c], acc[l - 1][c]);
                acc[l - 1][c] = vset(0.0f);
            }
            if (r & (mask << (l * power))) break;
        }
    }
    for (; r < rows; r++)
        for (int c = 0; c < 32; c++) acc[0][c] = vadd(acc[0][c], sq_err(t, 32 * r + c, s, z));
    for (int l = 1; l < levels; l++)
        for (int c = 0; c < 32; c++) acc[0][c] = vadd(acc[0][c], acc[l][c]);
    for (long i = rows * 32; i < nv * 8; i++) acc[0][i % 8] = vadd(acc[0][i % 8], sq_err(t, i, s, z));
    for (int c = 0; c < 8; c++) acc[0][c] = vadd(vadd(vadd(acc[0][c], acc[0][8 + c]), acc[0][16 + c]), acc[0][24 + c]);
    vf total = vset(0.0f);
    for (long i = nv * 8; i < G; i++) total = vadd(total, sq_err(t, i, s, z));
    for (int c = 0; c < 8; c++) total = vadd(total, acc[0][c]);
    return total;
}

/* the search for the LANES groups of a transposed block: float16 bits of each lane's scale (0 where no candidate
   had a finite error) and its zero point */
static void search_block(const float *t, long G, vhalf *best_scale, vf *best_zero) {
    const vf zero = vset(0.0f), one = vset(1.0f), fifteen = vset(15.0f);
    /* min(w, 0) and max(w, 0) as w < low ? w : low from +0.0: a zero minimum is +0.0 (see the reference) */
    vf low = zero, high = zero;
    for (long i = 0; i < G; i++) {
        vf w = vload(t + i * LANES);
        low = vmin(w, low);
        high = vmax(w, high);
    }
    vf best_err = vset(INFINITY), best_z = zero;
    vhalf best_s = vto_half(zero);
    for (int ia = 0; ia < 3; ia++) {
        for (int ib = 0; ib < 3; ib++) {
            vf lo = vmul(low, vset((float)SHRINKS[ia])), hi = vmul(high, vset((float)SHRINKS[ib]));
            vf neg_lo = vxor(lo, vset(-0.0f));
            vf minmax = clamp_step(vdiv(vsub(hi, lo), fifteen));
            vf z = clamp_nibble(vround(vdiv(neg_lo, minmax)));
            vf above = vsub(fifteen, z), below = z; /* grid steps on each side of 0 */
            vf up = vpick(zero, vdiv(hi, vmax(one, above)), vcmp(above, zero, _CMP_GT_OQ));
            vf down = vpick(zero, vdiv(neg_lo, vmax(one, below)), vcmp(below, zero, _CMP_GT_OQ));
            vf covering = vpick(vmax(up, down), vset(NAN), vcmp(up, down, _CMP_UNORD_Q)); /* torch.maximum */
            const vf steps[2] = {minmax, clamp_step(covering)};
            for (int c = 0; c < 2; c++) {
                vhalf hs = vto_half(steps[c]);
                vf err = block_error(t, G, vfrom_half(hs), z);
                vmask better = vcmp(err, best_err, _CMP_LT_OQ); /* ties keep the earlier candidate */
                best_err = vpick(best_err, err, better);
                best_z = vpick(best_z, z, better);
                best_s = vpick_half(best_s, hs, better);
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
        vhalf hs;
        vf z;
        search_block(t, G, &hs, &z);
        uint16_t sbits[LANES], zbits[LANES];
        vstore_half(sbits, hs);
        vstore_half(zbits, vto_half(z));
        memcpy(j->scale + first, sbits, sizeof(uint16_t) * count);
        memcpy(j->zero + first, zbits, sizeof(uint16_t) * count);
        /* LANES groups hold an even number of weights, so a block's bytes are its own (odd G splits bytes in it) */
        memset(j->packed + first * G / 2, 0, count * G / 2);
        vf s = vfrom_half(hs);
        for (long i = 0; i < G; i++) {
            int32_t q[LANES];
            vstore_int(q, nibbles(vload(t + i * LANES), s, z));
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
