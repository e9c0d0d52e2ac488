/* int4 group-wise weights times 8-bit activations: the opt-in decode kernel behind
   loom.quantization.set_activation_bits(model, 8) (loom::int4_linear_a8). The default int4 kernel (int4.c) rounds
   an activation row to int16, which costs widenings and two multiply-add steps per 4 weights; here activations are
   int8, so the packed nibbles (unsigned bytes) multiply them directly: one vpdpbusd per 4 weights with AVX-512 VNNI,
   vpmaddubsw + vpmaddwd without it. llama.cpp's Q4_0 x Q8_0 dot product makes the same precision trade.

   The arithmetic, the same at every level, for every row count, and in the torch fallback
   (loom/kernels/ops.py int4_a8_reference), so that all of them give bit-identical results:
   - each activation row is cut into blocks of 32 columns. A block with amax = max|x| >= 1e-30 gets the float32
     scale d = amax / 127 and q = round_half_even(x * (127 / amax)), integers in [-127, 127]; a block with a smaller
     amax (zeros, denormals) gets d = 0 and q = 0. qsum = the exact sum of the block's q;
   - per weight row and block: isum = sum of nibble * q over the block, an exact integer (|isum| <= 32 * 15 * 127),
     then, in float32 and in this order, v = ((float(isum) - zero * float(qsum)) * scale) * d with the block's
     group scale and zero point (8 for the symmetric layout);
   - v is added to lane b % 16 of 16 float32 lane totals, blocks b in increasing order (the blocks past K / 32 up to
     a multiple of 16 add +0); y = sum of the lanes in the order s_i = l_i + l_{i+8}, t_i = s_i + s_{i+4},
     u_i = t_i + t_{i+2}, y = u_0 + u_1.
   Blocks of 32 (GGUF's Q8_0 block) rather than one scale per weight group: every group size the kernel takes is a
   multiple of 32, so a block never straddles two groups and its zero point term needs only the block's qsum; the
   per-block scale costs one float multiply per 32 columns (16 blocks per vector) and halves the rounding error of
   typical group-128 activations with outliers. 16 lanes are one AVX-512 vector of block sums; the AVX2 code keeps
   them in two 8-lane vectors and does the same operations lane by lane.
   Rows holding inf or NaN have no int8 scale: they take the int16 kernel (loom_int4_gemm), whose exact path
   propagates inf and NaN as a float matmul does.

   Layout: a weight row is streamed as 64-byte (AVX-512: 128 columns) or 32-byte (AVX2: 64 columns) loads; the low
   nibbles are the even columns, the high nibbles the odd ones, so each activation row is reordered once per call
   into (even columns, odd columns) per load width. An int32 lane of the product then holds 8 consecutive columns,
   4 lanes one block; a small reduction tree turns 4 loads' lanes into one lane per block. Weight rows are read once
   from memory against up to A8_MB activation rows per pass (the rest re-read from L1). The saved weight layout is
   used as it is: no repacking at load. */
#include "common.h"

#define A8_TINY 1e-30f /* below this block amax, 127 / amax could overflow: the block counts as zero */
#define A8_PF 4        /* prefetch distance in weight rows */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define LW 16 /* block lanes per float vector */
#define CW 128 /* columns per weight load */
#define A8_MB 4
#else
#define LW 8
#define CW 64
#define A8_MB 2
#endif

typedef struct {
    const int8_t *xq; const float *d, *qs; const long *rows; const int32_t *idx; const long *first;
    const uint8_t *w; const void *scale, *zero; int half; float *y; long Mq, N, K, G, Kp, NBp;
} a8_job;

/* one block of 32 activations -> q (int8, column order); returns d and sets *qsum */
static float a8_block(const float *x, int8_t *q, float *qsum) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v[4], mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], absmask));
    }
    float t[8];
    _mm256_storeu_ps(t, mx);
    float amax = 0;
    for (int i = 0; i < 8; i++) amax = t[i] > amax ? t[i] : amax;
    if (!(amax >= A8_TINY)) {
        memset(q, 0, 32);
        *qsum = 0;
        return 0.0f;
    }
    const __m256 inv = _mm256_set1_ps(127.0f / amax);
    int32_t r[32], s = 0;
    for (int i = 0; i < 4; i++) /* cvtps rounds to nearest even, as torch.round */
        _mm256_storeu_si256((__m256i *)(r + 8 * i), _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)));
    for (int c = 0; c < 32; c++) { q[c] = (int8_t)r[c]; s += r[c]; }
    *qsum = (float)s;
    return amax / 127.0f;
}

/* the final lane sum in the fixed order of the header */
static inline float a8_lanes_sum(__m256 lo, __m256 hi) { return hsum(_mm256_add_ps(lo, hi)); }

#if LW == 16
/* 64 weight bytes (low nibbles lo, high nibbles hi) times the matching 64 even / 64 odd activations: int32 lane i
   = the 8 columns 8i..8i+7 of the 128 */
static inline __m512i a8_dot(__m512i lo, __m512i hi, const int8_t *xe) {
#if defined(__AVX512VNNI__)
    /* inline asm: with the intrinsic gcc copied every accumulator to another register and back (as in int4.c) */
    __m512i acc = _mm512_setzero_si512();
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(lo), "m"(*(const __m512i *)xe));
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(hi), "m"(*(const __m512i *)(xe + 64)));
    return acc;
#else
    /* each int16 pair sum is at most 2 * 15 * 127, two of them 7620: no saturation */
    __m512i p = _mm512_add_epi16(_mm512_maddubs_epi16(lo, _mm512_loadu_si512((const void *)xe)),
                                 _mm512_maddubs_epi16(hi, _mm512_loadu_si512((const void *)(xe + 64))));
    return _mm512_madd_epi16(p, _mm512_set1_epi16(1));
#endif
}

/* lane s of the result = the sum of block s: 128-bit lane s % 4 of v[s / 4] */
static inline __m512i a8_block_sums(const __m512i *v) {
    __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
    __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
    __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
    /* u lane 4L + i = 128-bit lane L of v[i] = block 4i + L */
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), u);
}

/* the scale or zero of the 16 blocks of lane group c of weight row n */
static inline __m512 a8_params(const a8_job *j, const void *p, long n, long c) {
    long ng = j->K / j->G, first = j->first[c], left = ng - first;
    __mmask16 mask = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
    __m512 v = j->half ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)p + n * ng + first))
                       : _mm512_maskz_loadu_ps(mask, (const float *)p + n * ng + first);
    return j->G == 32 ? v : _mm512_permutexvar_ps(_mm512_loadu_si512((const void *)(j->idx + c * 16)), v);
}

/* weight row n against activation rows i0..i0+MB-1 */
static inline __attribute__((always_inline)) void a8_row(const a8_job *j, long n, long i0, int MB) {
    long P = j->K / 2, Kp = j->Kp, NBp = j->NBp, nld = (P + 63) / 64;
    const uint8_t *wr = j->w + n * P;
    const int8_t *xq = j->xq + i0 * Kp;
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512 f[A8_MB];
    for (int m = 0; m < A8_MB; m++) f[m] = _mm512_setzero_ps();
    for (long c = 0; c * 16 < NBp; c++) {
        __m512i v[A8_MB][4];
#pragma GCC unroll 4
        for (int b = 0; b < 4; b++) {
            long ld = 4 * c + b, off = ld * 64;
            if (ld >= nld) {
                for (int m = 0; m < MB; m++) v[m][b] = _mm512_setzero_si512();
                continue;
            }
            _mm_prefetch((const char *)(wr + A8_PF * P + off), _MM_HINT_T0);
            __m512i raw = P - off >= 64 ? _mm512_loadu_si512((const void *)(wr + off))
                                        : _mm512_maskz_loadu_epi8((1ULL << (P - off)) - 1, wr + off);
            __m512i lo = _mm512_and_si512(raw, m4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
            for (int m = 0; m < MB; m++) v[m][b] = a8_dot(lo, hi, xq + m * Kp + ld * 128);
        }
        __m512 s = a8_params(j, j->scale, n, c);
        __m512 z = j->zero ? a8_params(j, j->zero, n, c) : _mm512_set1_ps(8.0f);
        for (int m = 0; m < MB; m++) {
            const float *dm = j->d + (i0 + m) * NBp + 16 * c, *qm = j->qs + (i0 + m) * NBp + 16 * c;
            __m512 t = _mm512_sub_ps(_mm512_cvtepi32_ps(a8_block_sums(v[m])), _mm512_mul_ps(z, _mm512_loadu_ps(qm)));
            t = _mm512_mul_ps(_mm512_mul_ps(t, s), _mm512_loadu_ps(dm));
            f[m] = _mm512_add_ps(f[m], t);
        }
    }
    for (int m = 0; m < MB; m++)
        j->y[j->rows[i0 + m] * j->N + n] =
            a8_lanes_sum(_mm512_castps512_ps256(f[m]), _mm512_extractf32x8_ps(f[m], 1));
}
#else
/* 32 weight bytes times the matching 32 even / 32 odd activations: int32 lane i = columns 8i..8i+7 of the 64 */
static inline __m256i a8_dot(__m256i lo, __m256i hi, const int8_t *xe) {
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xe)),
                                 _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xe + 32))));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* lane s of the result = the sum of block s: 128-bit half s % 2 of v[s / 2] */
static inline __m256i a8_block_sums(const __m256i *v) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    /* a: low half lane i = low half of v[i] (block 2i), high half lane i = high half of v[i] (block 2i + 1) */
    return _mm256_permutevar8x32_epi32(a, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* the scale or zero of the 8 blocks of lane group c of weight row n */
static inline __m256 a8_params(const a8_job *j, const void *p, long n, long c) {
    long ng = j->K / j->G, first = j->first[c], left = ng - first;
    __m256 v;
    if (left >= 8) {
        v = j->half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + n * ng + first)))
                    : _mm256_loadu_ps((const float *)p + n * ng + first);
    } else {
        float t[8] = {0};
        for (long i = 0; i < left; i++) t[i] = load_param(p, n * ng + first + i, j->half);
        v = _mm256_loadu_ps(t);
    }
    return j->G == 32 ? v : _mm256_permutevar8x32_ps(v, _mm256_loadu_si256((const __m256i *)(j->idx + c * 8)));
}

static inline __attribute__((always_inline)) void a8_row(const a8_job *j, long n, long i0, int MB) {
    long P = j->K / 2, Kp = j->Kp, NBp = j->NBp, nld = (P + 31) / 32;
    const uint8_t *wr = j->w + n * P;
    const int8_t *xq = j->xq + i0 * Kp;
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256 f[A8_MB][2];
    for (int m = 0; m < A8_MB; m++) f[m][0] = f[m][1] = _mm256_setzero_ps();
    for (long c = 0; c * 8 < NBp; c++) { /* lane group c: blocks 8c..8c+7, lanes 8 (c % 2).. of the 16 */
        __m256i v[A8_MB][4];
#pragma GCC unroll 4
        for (int b = 0; b < 4; b++) {
            long ld = 4 * c + b, off = ld * 32;
            if (ld >= nld) {
                for (int m = 0; m < MB; m++) v[m][b] = _mm256_setzero_si256();
                continue;
            }
            _mm_prefetch((const char *)(wr + A8_PF * P + off), _MM_HINT_T0);
            /* a row's last load may hold 16 bytes (K % 64 == 32) */
            __m256i raw = P - off >= 32 ? _mm256_loadu_si256((const __m256i *)(wr + off))
                                        : _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(wr + off)));
            if (P - off < 32) raw = _mm256_inserti128_si256(raw, _mm_setzero_si128(), 1);
            __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            for (int m = 0; m < MB; m++) v[m][b] = a8_dot(lo, hi, xq + m * Kp + ld * 64);
        }
        __m256 s = a8_params(j, j->scale, n, c);
        __m256 z = j->zero ? a8_params(j, j->zero, n, c) : _mm256_set1_ps(8.0f);
        for (int m = 0; m < MB; m++) {
            const float *dm = j->d + (i0 + m) * NBp + 8 * c, *qm = j->qs + (i0 + m) * NBp + 8 * c;
            __m256 t = _mm256_sub_ps(_mm256_cvtepi32_ps(a8_block_sums(v[m])), _mm256_mul_ps(z, _mm256_loadu_ps(qm)));
            t = _mm256_mul_ps(_mm256_mul_ps(t, s), _mm256_loadu_ps(dm));
            f[m][c % 2] = _mm256_add_ps(f[m][c % 2], t);
        }
    }
    for (int m = 0; m < MB; m++) j->y[j->rows[i0 + m] * j->N + n] = a8_lanes_sum(f[m][0], f[m][1]);
}
#endif

static void a8_tiles(const void *p, long begin, long end) {
    const a8_job *j = p;
    for (long n = begin * TILE; n < end * TILE && n < j->N; n++) {
        for (long i = 0; i < j->Mq; i += A8_MB) {
            switch (j->Mq - i < A8_MB ? j->Mq - i : A8_MB) {
            case 1: a8_row(j, n, i, 1); break;
#if A8_MB == 4
            case 2: a8_row(j, n, i, 2); break;
            case 3: a8_row(j, n, i, 3); break;
#endif
            default: a8_row(j, n, i, A8_MB); break;
            }
        }
    }
}

static int row_finite(const float *x, long K) {
    int ok = 1;
    for (long k = 0; k < K; k++) ok &= fabsf(x[k]) <= 3.4028235e38f; /* false for inf and NaN */
    return ok;
}

/* scale/zero: (N, K/G) float32 (half=0) or float16 (half=1); zero NULL means the symmetric layout (zero 8).
   Needs G % 32 == 0 and K % G == 0 (the operator checks). Scratch: M * (K + 512) bytes of int8 activations and
   M * K / 32 * 8 of block scales and sums. Returns 0, or -1 when out of memory. */
int loom_int4_a8_gemm(const float *x, const uint8_t *w, const void *scale, const void *zero, int half, float *y,
                      long M, long N, long K, long G, int threads) {
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0) {
        memset(y, 0, sizeof(float) * M * N);
        return 0;
    }
    long nb = K / 32, NBp = (nb + 15) / 16 * 16, Kp = NBp * 32, ngr = NBp / LW, gs = G / 32, Mq = 0;
    char *buf = malloc(sizeof(long) * (M + ngr) + sizeof(int32_t) * ngr * LW + sizeof(float) * 2 * M * NBp +
                       (size_t)M * Kp);
    if (!buf) return -1;
    long *rows = (long *)buf, *first = rows + M;
    int32_t *idx = (int32_t *)(first + ngr);
    float *d = (float *)(idx + ngr * LW), *qs = d + M * NBp;
    int8_t *xq = (int8_t *)(qs + M * NBp);
    for (long c = 0; c < ngr; c++) {
        first[c] = LW * c / gs;
        for (int s = 0; s < LW; s++) idx[c * LW + s] = (int32_t)((LW * c + s) / gs - first[c]);
    }
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * K;
        if (!row_finite(xm, K)) continue;
        int8_t *xr = xq + Mq * Kp;
        float *dm = d + Mq * NBp, *qm = qs + Mq * NBp;
        memset(xr, 0, Kp);
        memset(dm, 0, sizeof(float) * NBp);
        memset(qm, 0, sizeof(float) * NBp);
        for (long b = 0; b < nb; b++) {
            int8_t q[32];
            dm[b] = a8_block(xm + 32 * b, q, qm + b);
            for (int i = 0; i < 32; i++) {
                long col = 32 * b + i, o = col % CW;
                xr[col - o + (o & 1) * (CW / 2) + (o >> 1)] = q[i];
            }
        }
        rows[Mq++] = m;
    }
    a8_job job = {xq, d, qs, rows, idx, first, w, scale, zero, half, y, Mq, N, K, G, Kp, NBp};
    long tiles = (N + TILE - 1) / TILE;
    if (Mq) parallel_run(a8_tiles, &job, tiles, chunk_for(tiles, threads), threads);
    int failed = 0;
    for (long m = 0, i = 0; m < M && !failed; m++) {
        if (i < Mq && rows[i] == m) i++;
        else failed = loom_int4_gemm(x + m * K, w, scale, zero, half, y + m * N, 1, N, K, G, threads) != 0;
    }
    free(buf);
    return failed ? -1 : 0;
}
