/* int4 group-wise weights in 16-row tiles: the decode kernels that read them. First, times 8-bit activations: the
   opt-in decode kernel behind loom.quantization.set_activation_bits(model, 8) (loom::int4_linear_a8); at the end
   of the file, times int16 activations (loom_int4_tiles_gemm: loom::int4_linear's decode sizes where the module
   keeps tiles, Int4Linear.wants_tiles). The default int4 kernel (int4.c) rounds
   an activation row to int16, which costs widenings and two multiply-add steps per 4 weights; here activations are
   int8, so the packed nibbles (unsigned bytes) multiply them directly: one vpdpbusd per 4 weights with AVX-512 VNNI,
   vpmaddubsw (+ one vpmaddwd per block) without it. llama.cpp's Q4_0 x Q8_0 product makes the same precision trade.

   The arithmetic, the same at every level, for every row count, and in the torch fallback
   (loom/kernels/ops.py int4_a8_reference), so that all of them give bit-identical results:
   - each activation row is cut into blocks of 32 columns. A block with amax = max|x| >= 1e-30 gets the float32
     scale d = amax / 127 and q = round_half_even(x * (127 / amax)), integers in [-127, 127]; a block with a smaller
     amax (zeros, denormals) gets d = 0 and q = 0. qsum = the exact sum of the block's q;
   - per weight row and block: isum = sum of nibble * q over the block, an exact integer (|isum| <= 32 * 15 * 127),
     then, in float32 and in this order, v = ((float(isum) - zero * float(qsum)) * scale) * d with the block's
     group scale and zero point (8 for the symmetric layout);
   - y = v_0 + v_1 + ... in block order, from +0, in float32.
   Blocks of 32 (GGUF's Q8_0 block) rather than one scale per weight group: every group size the kernel takes is a
   multiple of 32, so a block never straddles two groups and its zero point term needs only the block's qsum; the
   per-block scale costs a few float operations per 32 columns and 16 output rows, and keeps one outlier from
   coarsening the rounding of a whole group.
   Rows holding inf or NaN have no int8 scale: they take the int16 kernel (loom_int4_gemm on the saved layout),
   whose exact path propagates inf and NaN as a float matmul does.

   Layout ("tiles", made from the saved layout by ops.int4_a8_tiles and kept beside it while a kernel here reads
   it): 16 weight rows at a time, block by block, so that vector lanes are output rows and nothing is reduced
   horizontally (llama.cpp repacks Q4_0 the same way for AVX-512). Per tile and block, A8_BLOCK_BYTES(ssz, hz):
   256 bytes of nibbles, 4 vectors of 64: vector j, lane r = bytes 4j..4j+3 of row r's 16 bytes of the block (low
   nibbles: columns 8j, 8j+2, 8j+4, 8j+6; high: the odd ones); then the 16 rows' scales (float16 or float32, as
   stored) and, with zero points, their 16 zeros. An activation block is stored as 8 int32: the 4 even-column and 4
   odd-column bytes of each j, broadcast against the masked nibbles. The tile stream (about the saved weight's
   bytes; more where a group spans several blocks, as its scale is repeated per block) is read once from memory per
   call; up to A8_MB activation rows per pass over a tile, the later passes from L1. */
#include "common.h"

#define A8_TINY 1e-30f /* below this block amax, 127 / amax could overflow: the block counts as zero */
/* prefetch distance in blocks (about 9 KB of a tile stream with float16 scales): one weight stream per thread
   needs that much in flight to reach the read bandwidth. Zen 5, 1 thread, 2048x768 and 50257x768 streamed from
   huge pages, medians of 5 interleaved runs: 4 blocks 28 GB/s, 16 34-37, 24 34-37, 32 37-38 */
#define A8_PF 32
#define A8_ROWS 16     /* weight rows per tile */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define A8_MB 4
#else
#define A8_MB 2
#endif

typedef struct {
    const int32_t *xq; const float *d, *qs; const long *rows; const uint8_t *tiles; int half, hz;
    float *y; long Mq, N, nb, bs;
} a8_job;

/* one block of 32 activations -> 8 int32 of (even, odd) column quads, as the header says; returns d, sets *qsum */
static float a8_block(const float *x, int32_t *out, float *qsum) {
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
        memset(out, 0, 32);
        *qsum = 0;
        return 0.0f;
    }
    const __m256 inv = _mm256_set1_ps(127.0f / amax);
    int32_t r[32], s = 0;
    for (int i = 0; i < 4; i++) /* cvtps rounds to nearest even, as torch.round */
        _mm256_storeu_si256((__m256i *)(r + 8 * i), _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)));
    int8_t *o = (int8_t *)out;
    for (int j = 0; j < 4; j++)
        for (int e = 0; e < 4; e++) {
            o[8 * j + e] = (int8_t)r[8 * j + 2 * e];
            o[8 * j + 4 + e] = (int8_t)r[8 * j + 2 * e + 1];
        }
    for (int c = 0; c < 32; c++) s += r[c];
    *qsum = (float)s;
    return amax / 127.0f;
}

/* rows of x the tiled kernels skipped (holding inf/NaN: not in rows[0..Mq)) through loom_int4_gemm on the saved
   layout, whose exact path propagates inf and NaN as a float matmul does */
static int saved_layout_rows(const float *x, const long *rows, long Mq, const uint8_t *w, const void *scale,
                             const void *zero, int half, float *y, long M, long N, long K, long G, int threads) {
    int failed = 0;
    for (long m = 0, i = 0; m < M && !failed; m++) {
        if (i < Mq && rows[i] == m) i++;
        else failed = loom_int4_gemm(x + m * K, w, scale, zero, half, y + m * N, 1, N, K, G, threads) != 0;
    }
    return failed;
}

#if defined(__AVX512F__)
/* a tile block's 16 scales and zero points (8 where hz = 0), after its 256 bytes of nibbles at p; the block
   A8_PF ahead prefetched */
static inline void tile_params512(const uint8_t *p, long bs, int half, int hz, __m512 *s, __m512 *z) {
    for (int c = 0; c < 5; c++) _mm_prefetch((const char *)(p + A8_PF * bs + 64 * c), _MM_HINT_T0);
    const uint8_t *ps = p + 256;
    *s = half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)ps)) : _mm512_loadu_ps((const float *)ps);
    *z = !hz    ? _mm512_set1_ps(8.0f)
         : half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ps + 32)))
                : _mm512_loadu_ps((const float *)(ps + 64));
}
#endif

/* rows 8h..8h+7 of a tile block's scales and zero points (8 where hz = 0); ps points past its 256 nibble bytes */
static inline void tile_params256(const uint8_t *ps, int h, int half, int hz, __m256 *s, __m256 *z) {
    *s = half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ps + 16 * h)))
              : _mm256_loadu_ps((const float *)ps + 8 * h);
    *z = !hz    ? _mm256_set1_ps(8.0f)
         : half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ps + 32 + 16 * h)))
                : _mm256_loadu_ps((const float *)(ps + 64) + 8 * h);
}

#if A8_MB == 4
#if defined(__AVX512VNNI__)
/* inline asm: with the intrinsic gcc copied every accumulator to another register and back (as in int4.c) */
static inline __m512i a8_dpbusd(__m512i acc, __m512i w, __m512i x) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
}
#endif

/* tile t (rows 16t..16t+15) against activation rows i0..i0+MB-1 */
static inline __attribute__((always_inline)) void a8_tile(const a8_job *j, long t, long i0, int MB) {
    long nb = j->nb, bs = j->bs;
    const uint8_t *tile = j->tiles + t * nb * bs;
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512 f[A8_MB];
    for (int m = 0; m < A8_MB; m++) f[m] = _mm512_setzero_ps();
    for (long b = 0; b < nb; b++) {
        const uint8_t *p = tile + b * bs;
        __m512 s, z;
        tile_params512(p, bs, j->half, j->hz, &s, &z);
        __m512i lo[4], hi[4];
        for (int q = 0; q < 4; q++) {
            __m512i w = _mm512_loadu_si512((const void *)(p + 64 * q));
            lo[q] = _mm512_and_si512(w, m4);
            hi[q] = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
        }
        for (int m = 0; m < MB; m++) {
            const int32_t *xb = j->xq + (i0 + m) * nb * 8 + b * 8;
#if defined(__AVX512VNNI__)
            __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
            for (int q = 0; q < 4; q++) {
                a0 = a8_dpbusd(a0, lo[q], _mm512_set1_epi32(xb[2 * q]));
                a1 = a8_dpbusd(a1, hi[q], _mm512_set1_epi32(xb[2 * q + 1]));
            }
            __m512i isum = _mm512_add_epi32(a0, a1);
#else
            /* int16 pair sums of at most 2 * 15 * 127 each, 8 of them 30480: no saturation */
            __m512i p16 = _mm512_setzero_si512();
            for (int q = 0; q < 4; q++) {
                p16 = _mm512_add_epi16(p16, _mm512_maddubs_epi16(lo[q], _mm512_set1_epi32(xb[2 * q])));
                p16 = _mm512_add_epi16(p16, _mm512_maddubs_epi16(hi[q], _mm512_set1_epi32(xb[2 * q + 1])));
            }
            __m512i isum = _mm512_madd_epi16(p16, _mm512_set1_epi16(1));
#endif
            long k = (i0 + m) * nb + b;
            __m512 v = _mm512_sub_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(z, _mm512_set1_ps(j->qs[k])));
            v = _mm512_mul_ps(_mm512_mul_ps(v, s), _mm512_set1_ps(j->d[k]));
            f[m] = _mm512_add_ps(f[m], v);
        }
    }
    long n0 = t * A8_ROWS, left = j->N - n0;
    __mmask16 mask = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
    for (int m = 0; m < MB; m++) _mm512_mask_storeu_ps(j->y + j->rows[i0 + m] * j->N + n0, mask, f[m]);
}
#else
static inline __attribute__((always_inline)) void a8_tile(const a8_job *j, long t, long i0, int MB) {
    long nb = j->nb, bs = j->bs;
    const uint8_t *tile = j->tiles + t * nb * bs;
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 f[A8_MB][2];
    for (int m = 0; m < A8_MB; m++) f[m][0] = f[m][1] = _mm256_setzero_ps();
    for (long b = 0; b < nb; b++) {
        const uint8_t *p = tile + b * bs;
        for (int c = 0; c < 5; c++) _mm_prefetch((const char *)(p + A8_PF * bs + 64 * c), _MM_HINT_T0);
        const uint8_t *ps = p + 256;
        for (int h = 0; h < 2; h++) { /* rows 8h..8h+7: the h-th 32 bytes of each 64-byte vector */
            __m256 s, z;
            tile_params256(ps, h, j->half, j->hz, &s, &z);
            __m256i lo[4], hi[4];
            for (int q = 0; q < 4; q++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(p + 64 * q + 32 * h));
                lo[q] = _mm256_and_si256(w, m4);
                hi[q] = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
            }
            for (int m = 0; m < MB; m++) {
                const int32_t *xb = j->xq + (i0 + m) * nb * 8 + b * 8;
                __m256i p16 = _mm256_setzero_si256();
                for (int q = 0; q < 4; q++) {
                    p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(lo[q], _mm256_set1_epi32(xb[2 * q])));
                    p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(hi[q], _mm256_set1_epi32(xb[2 * q + 1])));
                }
                long k = (i0 + m) * nb + b;
                __m256 v = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones)),
                                         _mm256_mul_ps(z, _mm256_set1_ps(j->qs[k])));
                v = _mm256_mul_ps(_mm256_mul_ps(v, s), _mm256_set1_ps(j->d[k]));
                f[m][h] = _mm256_add_ps(f[m][h], v);
            }
        }
    }
    long n0 = t * A8_ROWS, left = j->N - n0;
    for (int m = 0; m < MB; m++) {
        float out[16];
        _mm256_storeu_ps(out, f[m][0]);
        _mm256_storeu_ps(out + 8, f[m][1]);
        memcpy(j->y + j->rows[i0 + m] * j->N + n0, out, sizeof(float) * (left >= 16 ? 16 : left));
    }
}
#endif

static void a8_tiles(const void *p, long begin, long end) {
    const a8_job *j = p;
    for (long t = begin; t < end; t++) {
        for (long i = 0; i < j->Mq; i += A8_MB) {
            switch (j->Mq - i < A8_MB ? j->Mq - i : A8_MB) {
            case 1: a8_tile(j, t, i, 1); break;
#if A8_MB == 4
            case 2: a8_tile(j, t, i, 2); break;
            case 3: a8_tile(j, t, i, 3); break;
#endif
            default: a8_tile(j, t, i, A8_MB); break;
            }
        }
    }
}

static int row_finite(const float *x, long K) {
    int ok = 1;
    for (long k = 0; k < K; k++) ok &= fabsf(x[k]) <= 3.4028235e38f; /* false for inf and NaN */
    return ok;
}

/* tiles: the layout of the header for N rows and K / 32 blocks, scales float16 (half = 1) or float32, zero points
   present (hz = 1) or 8; w, scale, zero: the saved layout, for rows holding inf/NaN. Needs G % 32 == 0 and
   K % G == 0 (the operator checks). Scratch: M * K * 1.25 bytes. Returns 0, or -1 when out of memory. */
int loom_int4_a8_gemm(const float *x, const uint8_t *tiles, const uint8_t *w, const void *scale, const void *zero,
                      int half, float *y, long M, long N, long K, long G, int threads) {
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0) {
        memset(y, 0, sizeof(float) * M * N);
        return 0;
    }
    long nb = K / 32, Mq = 0, ssz = half ? 2 : 4;
    int hz = zero != NULL;
    char *buf = malloc(sizeof(long) * M + sizeof(float) * 2 * M * nb + sizeof(int32_t) * M * nb * 8);
    if (!buf) return -1;
    long *rows = (long *)buf;
    float *d = (float *)(rows + M), *qs = d + M * nb;
    int32_t *xq = (int32_t *)(qs + M * nb);
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * K;
        if (!row_finite(xm, K)) continue;
        for (long b = 0; b < nb; b++) d[Mq * nb + b] = a8_block(xm + 32 * b, xq + (Mq * nb + b) * 8, qs + Mq * nb + b);
        rows[Mq++] = m;
    }
    a8_job job = {xq, d, qs, rows, tiles, half, hz, y, Mq, N, nb, 256 + A8_ROWS * ssz * (1 + hz)};
    long ntiles = (N + A8_ROWS - 1) / A8_ROWS;
    if (Mq) parallel_run(a8_tiles, &job, ntiles, chunk_for(ntiles, threads), threads);
    int failed = saved_layout_rows(x, rows, Mq, w, scale, zero, half, y, M, N, K, G, threads);
    free(buf);
    return failed ? -1 : 0;
}


/* ---- int16 activations on the same tiles (the default precision, loom_int4_gemm's arithmetic class) ----------
   The decode kernel of loom::int4_linear when the module keeps tiles (AVX-512BW, or AVX2 below): each activation row
   rounded to int16 with one scale per row (quantize_row, as int4.c), so the only approximation is int4.c's
   (|error| <= max|x| / 65534 * sum|w| beyond fp32 rounding). An int32 lane of tile vector j holds 8 nibbles of
   one weight row (columns 8j..8j+7 of the block, low nibble first); masking the lane's two 16-bit halves by 15
   after shifts of 0, 4, 8 and 12 gives the int16 pairs (8j+i, 8j+4+i), i = 0..3, and vpdpwssd multiplies each
   by the matching activation pair, broadcast from a 16-int32 block of pairs made once per row. Per block and row:
   isum = the exact integer sum (|isum| <= 32 * 15 * 32767 < 2^24, exact in float32 too), then
   f += scale * (isum - zero * qsum) with qsum the exact block sum of q (fused multiply-adds), blocks in order,
   and y = f * xs. Rows holding inf/NaN take loom_int4_gemm on the saved layout, as the 8-bit kernel's do. No
   horizontal sums and one contiguous stream: about twice int4.c's decode kernel on streamed weights. */
typedef struct {
    const int32_t *xp; const float *qs, *xs; const long *rows; const uint8_t *tiles; int half, hz;
    float *y; long Mq, N, nb, bs;
} t16_job;

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define T16_MB 4


#if defined(__AVX512VNNI__)
/* the activation pair broadcast from memory ({1to16}): no register or shuffle for it */
static inline __m512i t16_dp(__m512i acc, __m512i w, const int32_t *x) {
    __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
    return acc;
}
#else
static inline __m512i t16_dp(__m512i acc, __m512i w, const int32_t *x) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_set1_epi32(*x)));
}
#endif

/* tile t against activation rows i0..i0+MB-1; C independent int32 chains per row and block */
static inline __attribute__((always_inline)) void t16_tile(const t16_job *j, long t, long i0, int MB) {
    long nb = j->nb, bs = j->bs;
    const uint8_t *tile = j->tiles + t * nb * bs;
    const __m512i m4 = _mm512_set1_epi16(15);
    __m512 f[T16_MB];
    for (int m = 0; m < T16_MB; m++) f[m] = _mm512_setzero_ps();
    for (long b = 0; b < nb; b++) {
        const uint8_t *p = tile + b * bs;
        __m512 s, z;
        tile_params512(p, bs, j->half, j->hz, &s, &z);
        __m512i acc[T16_MB][4];
        for (int m = 0; m < MB; m++)
            for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_si512();
        for (int q = 0; q < 4; q++) {
            __m512i w = _mm512_loadu_si512((const void *)(p + 64 * q));
            __m512i u[4] = {_mm512_and_si512(w, m4), _mm512_and_si512(_mm512_srli_epi16(w, 4), m4),
                            _mm512_and_si512(_mm512_srli_epi16(w, 8), m4), _mm512_srli_epi16(w, 12)};
            for (int m = 0; m < MB; m++) {
                const int32_t *xb = j->xp + ((i0 + m) * nb + b) * 16 + 4 * q;
                for (int i = 0; i < 4; i++) {
                    int c = MB <= 2 ? i : (i & 1); /* 4 chains a row for 1-2 rows, 2 for more (registers) */
                    acc[m][c] = t16_dp(acc[m][c], u[i], xb + i);
                }
            }
        }
        for (int m = 0; m < MB; m++) {
            __m512i isum = MB <= 2 ? _mm512_add_epi32(_mm512_add_epi32(acc[m][0], acc[m][1]),
                                                      _mm512_add_epi32(acc[m][2], acc[m][3]))
                                   : _mm512_add_epi32(acc[m][0], acc[m][1]);
            __m512 v = _mm512_fnmadd_ps(z, _mm512_set1_ps(j->qs[(i0 + m) * nb + b]), _mm512_cvtepi32_ps(isum));
            f[m] = _mm512_fmadd_ps(s, v, f[m]);
        }
    }
    long n0 = t * A8_ROWS, left = j->N - n0;
    __mmask16 mask = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
    for (int m = 0; m < MB; m++)
        _mm512_mask_storeu_ps(j->y + j->rows[i0 + m] * j->N + n0, mask,
                              _mm512_mul_ps(f[m], _mm512_set1_ps(j->xs[i0 + m])));
}

static void t16_tiles(const void *p, long begin, long end) {
    const t16_job *j = p;
    for (long t = begin; t < end; t++) {
        for (long i = 0; i < j->Mq; i += T16_MB) {
            switch (j->Mq - i < T16_MB ? j->Mq - i : T16_MB) {
            case 1: t16_tile(j, t, i, 1); break;
            case 2: t16_tile(j, t, i, 2); break;
            case 3: t16_tile(j, t, i, 3); break;
            default: t16_tile(j, t, i, T16_MB); break;
            }
        }
    }
}

#else
/* AVX2: the same arithmetic, each tile in two halves of 8 rows (the h-th 32 bytes of each 64-byte vector), one or
   two activation rows a pass. Nibble i of each 16-bit half is masked in place (its value times 16^i; nibble 3
   shifted down, as its top bit is an int16's sign) into its own int32 sums, scaled back at the end with exact
   shifts: one operation a nibble vector instead of a shift and a mask. Bound: those sums are multiples of 16^i and
   |sum| <= 4 * 2 * 3840 * 32767 < 2^31 for i = 2. The general tile loop these replaced (1-2 rows by 4 shifts and
   masks a vector) was compute-bound on an AVX2 core (Zen 3, 1 thread: 11-12 GB/s of tiles even from L2, below its
   16-18 GB/s read bandwidth): gcc hoisted a block's 16 broadcast activation pairs out of the halves' loop and kept
   them, and the float sums, on the stack. Against it (in-process interleaved pairs, tiles streamed from huge
   pages): one row 2048x768 1.08x, 50257x768 1.18x, from L2 1.12x, 2 threads 1.14x and 1.26x; 2048x768 at 2 rows
   1.18x, 3 1.25x, 8 1.19x, 2051x800 at 5 rows 1.20x (an earlier form of the two-row loop: 4 rows 1.14x, 16 1.06x,
   8 rows on 2 threads 1.08x). */

/* the exact sum of a half's four nibble sums (a: nibble 0, b: x16, c: x256, d: nibble 3) */
static inline __m256i t16_nibble_sum(__m256i a, __m256i b, __m256i c, __m256i d) {
    return _mm256_add_epi32(_mm256_add_epi32(a, d), _mm256_add_epi32(_mm256_srai_epi32(b, 4), _mm256_srai_epi32(c, 8)));
}

/* y row rows[i] of tile t's 16 columns: (lo, hi) * xs */
static inline void t16_store(const t16_job *j, long t, long i, __m256 lo, __m256 hi) {
    long n0 = t * A8_ROWS, left = j->N - n0;
    float out[16];
    _mm256_storeu_ps(out, _mm256_mul_ps(lo, _mm256_set1_ps(j->xs[i])));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(hi, _mm256_set1_ps(j->xs[i])));
    memcpy(j->y + j->rows[i] * j->N + n0, out, sizeof(float) * (left >= 16 ? 16 : left));
}

/* tile t against activation row i0: both halves share each broadcast, the float sums stay in registers */
static inline __attribute__((always_inline)) void t16_row1(const t16_job *j, long t, long i0) {
    long nb = j->nb, bs = j->bs;
    const uint8_t *tile = j->tiles + t * nb * bs;
    const __m256i m4 = _mm256_set1_epi16(15), k1 = _mm256_set1_epi16(0xF0), k2 = _mm256_set1_epi16(0xF00);
    __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
    const int32_t *xrow = j->xp + i0 * nb * 16;
    const float *qrow = j->qs + i0 * nb;
    for (long b = 0; b < nb; b++) {
        const uint8_t *p = tile + b * bs, *ps = p + 256;
        for (int c = 0; c < 5; c++) _mm_prefetch((const char *)(p + A8_PF * bs + 64 * c), _MM_HINT_T0);
        const int32_t *xb = xrow + b * 16;
        __m256i a0 = _mm256_setzero_si256(), b0 = a0, c0 = a0, d0 = a0, a1 = a0, b1 = a0, c1 = a0, d1 = a0;
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) {
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(p + 64 * q));
            __m256i w1 = _mm256_loadu_si256((const __m256i *)(p + 64 * q + 32));
            __m256i x0 = _mm256_set1_epi32(xb[4 * q]), x1 = _mm256_set1_epi32(xb[4 * q + 1]);
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_and_si256(w0, m4), x0));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_and_si256(w1, m4), x0));
            b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(_mm256_and_si256(w0, k1), x1));
            b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(_mm256_and_si256(w1, k1), x1));
            __m256i x2 = _mm256_set1_epi32(xb[4 * q + 2]), x3 = _mm256_set1_epi32(xb[4 * q + 3]);
            c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(_mm256_and_si256(w0, k2), x2));
            c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(_mm256_and_si256(w1, k2), x2));
            d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(_mm256_srli_epi16(w0, 12), x3));
            d1 = _mm256_add_epi32(d1, _mm256_madd_epi16(_mm256_srli_epi16(w1, 12), x3));
        }
        __m256 qs = _mm256_set1_ps(qrow[b]), s, z;
        tile_params256(ps, 0, j->half, j->hz, &s, &z);
        f0 = _mm256_fmadd_ps(s, _mm256_fnmadd_ps(z, qs, _mm256_cvtepi32_ps(t16_nibble_sum(a0, b0, c0, d0))), f0);
        tile_params256(ps, 1, j->half, j->hz, &s, &z);
        f1 = _mm256_fmadd_ps(s, _mm256_fnmadd_ps(z, qs, _mm256_cvtepi32_ps(t16_nibble_sum(a1, b1, c1, d1))), f1);
    }
    t16_store(j, t, i0, f0, f1);
}

/* tile t against activation rows i0 and i0 + 1: each half in turn (8 int32 sums a half; both halves at once
   would need all 16 registers for them) */
static inline __attribute__((always_inline)) void t16_row2(const t16_job *j, long t, long i0) {
    long nb = j->nb, bs = j->bs;
    const uint8_t *tile = j->tiles + t * nb * bs;
    const __m256i m4 = _mm256_set1_epi16(15), k1 = _mm256_set1_epi16(0xF0), k2 = _mm256_set1_epi16(0xF00);
    __m256 f00 = _mm256_setzero_ps(), f01 = f00, f10 = f00, f11 = f00;
    const int32_t *xr0 = j->xp + i0 * nb * 16, *xr1 = xr0 + nb * 16;
    const float *q0 = j->qs + i0 * nb, *q1 = q0 + nb;
    for (long b = 0; b < nb; b++) {
        const uint8_t *p = tile + b * bs, *ps = p + 256;
        for (int c = 0; c < 5; c++) _mm_prefetch((const char *)(p + A8_PF * bs + 64 * c), _MM_HINT_T0);
        const int32_t *x0 = xr0 + b * 16, *x1 = xr1 + b * 16;
        __m256 qa = _mm256_set1_ps(q0[b]), qb = _mm256_set1_ps(q1[b]);
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256i a0 = _mm256_setzero_si256(), b0 = a0, c0 = a0, d0 = a0, a1 = a0, b1 = a0, c1 = a0, d1 = a0;
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(p + 64 * q + 32 * h)), u;
                u = _mm256_and_si256(w, m4);
                a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(u, _mm256_set1_epi32(x0[4 * q])));
                a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(u, _mm256_set1_epi32(x1[4 * q])));
                u = _mm256_and_si256(w, k1);
                b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(u, _mm256_set1_epi32(x0[4 * q + 1])));
                b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(u, _mm256_set1_epi32(x1[4 * q + 1])));
                u = _mm256_and_si256(w, k2);
                c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(u, _mm256_set1_epi32(x0[4 * q + 2])));
                c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(u, _mm256_set1_epi32(x1[4 * q + 2])));
                u = _mm256_srli_epi16(w, 12);
                d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(u, _mm256_set1_epi32(x0[4 * q + 3])));
                d1 = _mm256_add_epi32(d1, _mm256_madd_epi16(u, _mm256_set1_epi32(x1[4 * q + 3])));
            }
            __m256 s, z;
            tile_params256(ps, h, j->half, j->hz, &s, &z);
            __m256 v0 = _mm256_fnmadd_ps(z, qa, _mm256_cvtepi32_ps(t16_nibble_sum(a0, b0, c0, d0)));
            __m256 v1 = _mm256_fnmadd_ps(z, qb, _mm256_cvtepi32_ps(t16_nibble_sum(a1, b1, c1, d1)));
            if (h == 0) { f00 = _mm256_fmadd_ps(s, v0, f00); f10 = _mm256_fmadd_ps(s, v1, f10); }
            else { f01 = _mm256_fmadd_ps(s, v0, f01); f11 = _mm256_fmadd_ps(s, v1, f11); }
        }
    }
    t16_store(j, t, i0, f00, f01);
    t16_store(j, t, i0 + 1, f10, f11);
}

static void t16_tiles(const void *p, long begin, long end) {
    const t16_job *j = p;
    for (long t = begin; t < end; t++)
        for (long i = 0; i < j->Mq; i += 2) {
            if (j->Mq - i >= 2) t16_row2(j, t, i);
            else t16_row1(j, t, i);
        }
}
#endif

int loom_int4_tiles_int16(void) { return 1; }

/* tiles, w, scale, zero, half: as loom_int4_a8_gemm. Scratch: M * K * 4.2 bytes. Returns 0, or -1 when out of
   memory. */
int loom_int4_tiles_gemm(const float *x, const uint8_t *tiles, const uint8_t *w, const void *scale, const void *zero,
                         int half, float *y, long M, long N, long K, long G, int threads) {
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0) {
        memset(y, 0, sizeof(float) * M * N);
        return 0;
    }
    long nb = K / 32, Mq = 0, ssz = half ? 2 : 4;
    char *buf = malloc(sizeof(long) * M + sizeof(float) * (M + M * nb) + sizeof(int32_t) * M * nb * 16 +
                       sizeof(int16_t) * K);
    if (!buf) return -1;
    long *rows = (long *)buf;
    float *xs = (float *)(rows + M), *qs = xs + M;
    int32_t *xp = (int32_t *)(qs + M * nb);
    int16_t *q = (int16_t *)(xp + M * nb * 16);
    for (long m = 0; m < M; m++) {
        float sc = quantize_row(x + m * K, q, K);
        if (isnan(sc)) continue; /* inf/NaN: the saved layout's exact path below */
        for (long b = 0; b < nb; b++) {
            const int16_t *qb = q + 32 * b;
            int32_t *o = xp + (Mq * nb + b) * 16, sum = 0;
            for (int jj = 0; jj < 4; jj++)
                for (int i = 0; i < 4; i++)
                    o[4 * jj + i] = (int32_t)((uint32_t)(uint16_t)qb[8 * jj + i] |
                                              ((uint32_t)(uint16_t)qb[8 * jj + 4 + i] << 16));
            for (int c = 0; c < 32; c++) sum += qb[c];
            qs[Mq * nb + b] = (float)sum;
        }
        xs[Mq] = sc;
        rows[Mq++] = m;
    }
    int hz = zero != NULL;
    t16_job job = {xp, qs, xs, rows, tiles, half, hz, y, Mq, N, nb, 256 + A8_ROWS * ssz * (1 + hz)};
    long ntiles = (N + A8_ROWS - 1) / A8_ROWS;
    if (Mq) parallel_run(t16_tiles, &job, ntiles, chunk_for(ntiles, threads), threads);
    int failed = saved_layout_rows(x, rows, Mq, w, scale, zero, half, y, M, N, K, G, threads);
    free(buf);
    return failed ? -1 : 0;
}

