/* Attention over whole sequences (training, prefill): softmax(q k^T * scale [causal]) v and its backward, for
   q (B, H, T, D) and k, v (B, Hkv, S, D), fp32 or bf16, fp32 sums. torch's CPU flash attention spends most of its
   time outside its small matrix products at training shapes (T 256, D 64: ~17 GFLOP/s forward); here every product
   is one fp32 register-tiled loop over blocks of 32 query rows, and a causal block stops at its last row's key.

   Rounding follows torch's CPU flash attention for bf16 (FlashAttentionKernel.cpp): the probabilities are rounded to
   bf16 before they multiply v, the output is divided by the unrounded fp32 sum, and in the backward the
   probabilities (for dv) and the score gradients (for dq, dk) are rounded to bf16 before their products; dq, dk and
   dv are summed in fp32 and rounded once. */
#include "common.h"

#define FA_BQ 32

/* C (R x N, row stride ldc) (+)= A (R x L, A[r][l] at A + r * ars + l * als) @ B (L x N, row stride ldb); fp32.
   zero: C starts at 0 instead of its contents. Tiles of 4 rows x 16 columns keep 8 sums in registers. */
#if defined(__AVX512F__)
/* MR rows x 32 columns (the columns from n, `m0`/`m1` masking each 16-column half), sums over l in order as the
   AVX2 tiles' (so every level gives the same value) */
static inline __attribute__((always_inline)) void gemm_tile512(float *C, long ldc, const float *A, long ars, long als,
                                                               const float *B, long ldb, long L, long n, int MR,
                                                               __mmask16 m0, __mmask16 m1, int zero) {
    __m512 s[8][2];
    for (int r = 0; r < MR; r++) {
        s[r][0] = zero ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, C + r * ldc + n);
        s[r][1] = zero ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, C + r * ldc + n + 16);
    }
    const float *b = B + n;
    for (long l = 0; l < L; l++, b += ldb) {
        __m512 b0 = _mm512_maskz_loadu_ps(m0, b), b1 = _mm512_maskz_loadu_ps(m1, b + 16);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            __m512 x = _mm512_set1_ps(A[r * ars + l * als]);
            s[r][0] = _mm512_fmadd_ps(x, b0, s[r][0]);
            s[r][1] = _mm512_fmadd_ps(x, b1, s[r][1]);
        }
    }
    for (int r = 0; r < MR; r++) {
        _mm512_mask_storeu_ps(C + r * ldc + n, m0, s[r][0]);
        _mm512_mask_storeu_ps(C + r * ldc + n + 16, m1, s[r][1]);
    }
}
#endif

static void gemm_acc(float *C, long ldc, const float *A, long ars, long als, const float *B, long ldb, long R,
                     long L, long N, int zero) {
    long r = 0;
#if defined(__AVX512F__)
    /* 8 rows x 32 columns: 16 sums in registers, 2 loads and 8 broadcasts per 16 fused multiply-adds */
    for (long n = 0; n < N; n += 32) {
        const long left = N - n;
        const __mmask16 m0 = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1),
                        m1 = left >= 32 ? 0xffff : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
        long rr = 0;
        for (; rr + 8 <= R; rr += 8)
            gemm_tile512(C + rr * ldc, ldc, A + rr * ars, ars, als, B, ldb, L, n, 8, m0, m1, zero);
        for (; rr + 4 <= R; rr += 4)
            gemm_tile512(C + rr * ldc, ldc, A + rr * ars, ars, als, B, ldb, L, n, 4, m0, m1, zero);
        for (; rr < R; rr++)
            gemm_tile512(C + rr * ldc, ldc, A + rr * ars, ars, als, B, ldb, L, n, 1, m0, m1, zero);
    }
    return;
#endif
    for (; r + 4 <= R; r += 4) {
        const float *a0 = A + r * ars, *a1 = a0 + ars, *a2 = a1 + ars, *a3 = a2 + ars;
        float *c0 = C + r * ldc, *c1 = c0 + ldc, *c2 = c1 + ldc, *c3 = c2 + ldc;
        long n = 0;
        for (; n + 16 <= N; n += 16) {
            __m256 s00, s01, s10, s11, s20, s21, s30, s31;
            if (zero) {
                s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = _mm256_setzero_ps();
            } else {
                s00 = _mm256_loadu_ps(c0 + n); s01 = _mm256_loadu_ps(c0 + n + 8);
                s10 = _mm256_loadu_ps(c1 + n); s11 = _mm256_loadu_ps(c1 + n + 8);
                s20 = _mm256_loadu_ps(c2 + n); s21 = _mm256_loadu_ps(c2 + n + 8);
                s30 = _mm256_loadu_ps(c3 + n); s31 = _mm256_loadu_ps(c3 + n + 8);
            }
            const float *b = B + n;
            for (long l = 0; l < L; l++, b += ldb) {
                __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), x;
                long o = l * als;
                x = _mm256_broadcast_ss(a0 + o); s00 = _mm256_fmadd_ps(x, b0, s00); s01 = _mm256_fmadd_ps(x, b1, s01);
                x = _mm256_broadcast_ss(a1 + o); s10 = _mm256_fmadd_ps(x, b0, s10); s11 = _mm256_fmadd_ps(x, b1, s11);
                x = _mm256_broadcast_ss(a2 + o); s20 = _mm256_fmadd_ps(x, b0, s20); s21 = _mm256_fmadd_ps(x, b1, s21);
                x = _mm256_broadcast_ss(a3 + o); s30 = _mm256_fmadd_ps(x, b0, s30); s31 = _mm256_fmadd_ps(x, b1, s31);
            }
            _mm256_storeu_ps(c0 + n, s00); _mm256_storeu_ps(c0 + n + 8, s01);
            _mm256_storeu_ps(c1 + n, s10); _mm256_storeu_ps(c1 + n + 8, s11);
            _mm256_storeu_ps(c2 + n, s20); _mm256_storeu_ps(c2 + n + 8, s21);
            _mm256_storeu_ps(c3 + n, s30); _mm256_storeu_ps(c3 + n + 8, s31);
        }
        for (; n < N; n++) {
            float t0 = zero ? 0.0f : c0[n], t1 = zero ? 0.0f : c1[n], t2 = zero ? 0.0f : c2[n],
                  t3 = zero ? 0.0f : c3[n];
            for (long l = 0; l < L; l++) {
                float bv = B[l * ldb + n];
                long o = l * als;
                t0 += a0[o] * bv; t1 += a1[o] * bv; t2 += a2[o] * bv; t3 += a3[o] * bv;
            }
            c0[n] = t0; c1[n] = t1; c2[n] = t2; c3[n] = t3;
        }
    }
    for (; r < R; r++) {
        const float *a = A + r * ars;
        float *c = C + r * ldc;
        long n = 0;
        for (; n + 8 <= N; n += 8) {
            __m256 s = zero ? _mm256_setzero_ps() : _mm256_loadu_ps(c + n);
            for (long l = 0; l < L; l++) s = _mm256_fmadd_ps(_mm256_broadcast_ss(a + l * als),
                                                             _mm256_loadu_ps(B + l * ldb + n), s);
            _mm256_storeu_ps(c + n, s);
        }
        for (; n < N; n++) {
            float t = zero ? 0.0f : c[n];
            for (long l = 0; l < L; l++) t += a[l * als] * B[l * ldb + n];
            c[n] = t;
        }
    }
}

static inline float round_to(float f, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(f)) : f; }

static inline __m256 round8_if(__m256 v, int bf16) {
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(round_bf16_8(v), 16)) : v;
}

/* rows x D values (row r at src + r * ld, unit stride) as fp32 into dst (rows x D, contiguous) */
static void load_rows(float *dst, const void *src, long ld, long rows, long D, int bf16) {
    for (long r = 0; r < rows; r++) {
        long d = 0;
        for (; d + 8 <= D; d += 8) _mm256_storeu_ps(dst + r * D + d, load8(src, r * ld + d, bf16));
        for (; d < D; d++) dst[r * D + d] = load_f(src, r * ld + d, bf16);
    }
}

/* the transpose: rows x D values into dst (D x ldt) fp32, column r = source row r */
static void load_cols(float *dst, long ldt, const void *src, long ld, long rows, long D, int bf16) {
    for (long r = 0; r < rows; r++)
        for (long d = 0; d < D; d++) dst[d * ldt + r] = load_f(src, r * ld + d, bf16);
}

static void store_row(void *dst, long i, const float *v, long D, float mul, int bf16) {
    for (long d = 0; d < D; d++) {
        float f = v[d] * mul;
        if (bf16) ((uint16_t *)dst)[i + d] = f32_to_bf16(f);
        else ((float *)dst)[i + d] = f;
    }
}

/* x[0:n] *= scale in place; *mx = the largest; returns whether any is NaN */
static int scale_max(float *x, long n, float scale, float *mx) {
    __m256 s8 = _mm256_set1_ps(scale), m8 = _mm256_set1_ps(-INFINITY), u8 = _mm256_setzero_ps();
    long c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + c), s8);
        _mm256_storeu_ps(x + c, v);
        m8 = _mm256_max_ps(m8, v);
        u8 = _mm256_or_ps(u8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float m[8], best = -INFINITY;
    _mm256_storeu_ps(m, m8);
    for (int k = 0; k < 8; k++) best = m[k] > best ? m[k] : best;
    int nan = _mm256_movemask_ps(u8) != 0;
    for (; c < n; c++) {
        x[c] *= scale;
        nan |= isnan(x[c]);
        best = x[c] > best ? x[c] : best;
    }
    *mx = best;
    return nan;
}

/* ds = p * (dp - di), rounded to bf16 when bf16 (dp in ds, n values) */
static void score_grad(float *ds, const float *p, long n, float di, int bf16) {
    __m256 d8 = _mm256_set1_ps(di);
    long c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 g = _mm256_mul_ps(_mm256_loadu_ps(p + c), _mm256_sub_ps(_mm256_loadu_ps(ds + c), d8));
        _mm256_storeu_ps(ds + c, round8_if(g, bf16));
    }
    for (; c < n; c++) ds[c] = round_to(p[c] * (ds[c] - di), bf16);
}

/* One row of the forward's softmax in place: scores sr[0:lim] (the keys this query sees) are scaled, and become
   e^(s - max), rounded to bf16 when bf16 (SDPA's probabilities before they multiply v); sr[lim:Se] become 0.
   *lse = max + log(sum) of the unrounded values. Returns 1 / sum, or NaN for a NaN row (a NaN score, or inf - inf),
   whose sr[0:Se] and lse are then NaN, as torch's. */
static float softmax_row(float *sr, long lim, long Se, float scale, int bf16, float *lse) {
    float mx;
    if (scale_max(sr, lim, scale, &mx) || !isfinite(mx)) {
        for (long c = 0; c < Se; c++) sr[c] = NAN;
        *lse = NAN;
        return NAN;
    }
    __m256 m8 = _mm256_set1_ps(mx), t8 = _mm256_setzero_ps();
    long c = 0;
    for (; c + 8 <= lim; c += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + c), m8));
        t8 = _mm256_add_ps(t8, e);
        _mm256_storeu_ps(sr + c, round8_if(e, bf16));
    }
    float sum = hsum(t8);
    for (; c < lim; c++) {
        float e = expf(sr[c] - mx);
        sum += e;
        sr[c] = round_to(e, bf16);
    }
    for (; c < Se; c++) sr[c] = 0.0f;
    *lse = mx + logf(sum);
    return 1.0f / sum;
}

/* One row of the backward's probabilities in place: raw scores pr[0:lim] become e^(scale * s - lse), unrounded;
   pr[lim:Se] become 0; a row whose lse is not finite (NaN in the forward) becomes NaN. */
static void probs_row(float *pr, long lim, long Se, float scale, float lse) {
    if (!isfinite(lse)) {
        for (long c = 0; c < Se; c++) pr[c] = NAN;
        return;
    }
    __m256 s8 = _mm256_set1_ps(scale), l8 = _mm256_set1_ps(lse);
    long c = 0;
    for (; c + 8 <= lim; c += 8)
        _mm256_storeu_ps(pr + c, exp8(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(pr + c), s8), l8)));
    for (; c < lim; c++) pr[c] = expf(pr[c] * scale - lse);
    for (; c < Se; c++) pr[c] = 0.0f;
}

typedef struct {
    const void *q, *k, *v, *o, *go; void *out, *gq, *gk, *gv; float *lse;
    long B, H, Hkv, T, S, D, o_sb, o_sh, o_st, g_sb, g_sh, g_st;
    float scale; int causal, bf16, failed;
    const int64_t *lens; /* the forward's keys per batch row (a padded batch: keys 0..lens[b]-1 are real), or NULL */
    long qs[3], ks[3], vs[3]; /* the forward's q, k, v strides (batch, head, row), unit stride along D */
    const void *bias; long bs[3]; int bias_bf16; /* the forward's additive score bias (or NULL) and its strides */
} fa_job;

/* scores sr[0:n] of query row i of (b, h) -> sr * scale + bias (as SDPA adds a float mask), when there is a bias;
   returns the scale softmax_row is then to apply (1: already applied) */
static float fa_add_bias(const fa_job *j, float *sr, long n, long b, long h, long i) {
    if (!j->bias) return j->scale;
    const long at = b * j->bs[0] + h * j->bs[1] + i * j->bs[2];
    for (long c = 0; c < n; c++) sr[c] = sr[c] * j->scale + load_f(j->bias, at + c, j->bias_bf16);
    return 1.0f;
}

/* element offsets of row i of (b, head h) in q, and of row 0 of (b, kv head) in k and v */
static inline long fa_q_at(const fa_job *j, long b, long h, long i) {
    return b * j->qs[0] + h * j->qs[1] + i * j->qs[2];
}
static inline long fa_k_at(const fa_job *j, long b, long h) { return b * j->ks[0] + h * j->ks[1]; }
static inline long fa_v_at(const fa_job *j, long b, long h) { return b * j->vs[0] + h * j->vs[1]; }

/* the keys batch row b's queries see at most: lens[b] of a padded batch, else all S */
static inline long fa_keys(const fa_job *j, long b) {
    return j->lens && j->lens[b] < j->S ? (j->lens[b] > 0 ? j->lens[b] : 0) : j->S;
}

/* every output row of (b, h) zero and its log-sum-exp -inf: a padded batch row without keys (SDPA's zero output) */
static void fa_zero_rows(fa_job *j, long b, long h) {
    static const float zeros[256]; /* the head dim is at most 256 (ops.FLASH_MAX_HEAD_DIM) */
    for (long i = 0; i < j->T; i++) {
        store_row(j->out, b * j->o_sb + h * j->o_sh + i * j->o_st, zeros, j->D, 1.0f, j->bf16);
        j->lse[(b * j->H + h) * j->T + i] = -INFINITY;
    }
}

/* one (batch, kv head): the output rows and log-sum-exps of its group's query heads, FA_BQ rows at a time */
static void fa_forward_unit(fa_job *j, long unit) {
    const long T = j->T, S = j->S, D = j->D, b = unit / j->Hkv, hk = unit % j->Hkv, group = j->H / j->Hkv;
    const long Sb = fa_keys(j, b);
    const int bf16 = j->bf16;
    if (Sb == 0) {
        for (long h = hk * group; h < (hk + 1) * group; h++) fa_zero_rows(j, b, h);
        return;
    }
    const size_t es = bf16 ? 2 : 4;
    float *buf = malloc(sizeof(float) * (size_t)(2 * S * D + 2 * FA_BQ * D + FA_BQ * S));
    if (!buf) { j->failed = 1; return; }
    float *kt = buf, *vf = kt + S * D, *qf = vf + S * D, *acc = qf + FA_BQ * D, *s = acc + FA_BQ * D;
    load_cols(kt, S, (const char *)j->k + fa_k_at(j, b, hk) * es, j->ks[2], Sb, D, bf16);
    load_rows(vf, (const char *)j->v + fa_v_at(j, b, hk) * es, j->vs[2], Sb, D, bf16);
    for (long h = hk * group; h < (hk + 1) * group; h++) {
        for (long i0 = 0; i0 < T; i0 += FA_BQ) {
            const long rows = T - i0 < FA_BQ ? T - i0 : FA_BQ;
            const long Se = j->causal ? (i0 + rows < Sb ? i0 + rows : Sb) : Sb;
            load_rows(qf, (const char *)j->q + fa_q_at(j, b, h, i0) * es, j->qs[2], rows, D, bf16);
            gemm_acc(s, Se, qf, D, 1, kt, S, rows, D, Se, 1);
            float inv[FA_BQ];
            for (long r = 0; r < rows; r++) {
                const long i = i0 + r, lim = j->causal ? (i + 1 < Se ? i + 1 : Se) : Se;
                const float sc = fa_add_bias(j, s + r * Se, lim, b, h, i);
                inv[r] = softmax_row(s + r * Se, lim, Se, sc, bf16, j->lse + (b * j->H + h) * T + i);
            }
            gemm_acc(acc, D, s, Se, 1, vf, D, rows, Se, D, 1);
            for (long r = 0; r < rows; r++)
                store_row(j->out, b * j->o_sb + h * j->o_sh + (i0 + r) * j->o_st, acc + r * D, D, inv[r], bf16);
        }
    }
    free(buf);
}

/* one (batch, kv head): dk and dv over every query row of its group's heads, and those rows' dq */
static void fa_backward_unit(fa_job *j, long unit) {
    const long T = j->T, S = j->S, D = j->D, b = unit / j->Hkv, hk = unit % j->Hkv, group = j->H / j->Hkv;
    const int bf16 = j->bf16;
    const size_t es = bf16 ? 2 : 4;
    float *buf = malloc(sizeof(float) * (size_t)(5 * S * D + 4 * FA_BQ * D + 2 * FA_BQ * S));
    if (!buf) { j->failed = 1; return; }
    float *kt = buf, *kf = kt + S * D, *vt = kf + S * D, *dk = vt + S * D, *dv = dk + S * D;
    float *qf = dv + S * D, *gof = qf + FA_BQ * D, *dq = gof + FA_BQ * D, *of = dq + FA_BQ * D;
    float *p = of + FA_BQ * D, *ds = p + FA_BQ * S;
    const long kv_off = (b * j->Hkv + hk) * S * D;
    load_cols(kt, S, (const char *)j->k + kv_off * es, D, S, D, bf16);
    load_rows(kf, (const char *)j->k + kv_off * es, D, S, D, bf16);
    load_cols(vt, S, (const char *)j->v + kv_off * es, D, S, D, bf16);
    memset(dk, 0, sizeof(float) * (size_t)(2 * S * D));
    for (long h = hk * group; h < (hk + 1) * group; h++) {
        for (long i0 = 0; i0 < T; i0 += FA_BQ) {
            const long rows = T - i0 < FA_BQ ? T - i0 : FA_BQ;
            const long Se = j->causal ? (i0 + rows < S ? i0 + rows : S) : S;
            load_rows(qf, (const char *)j->q + ((b * j->H + h) * T + i0) * D * es, D, rows, D, bf16);
            float di[FA_BQ];
            const float *lse = j->lse + (b * j->H + h) * T + i0;
            for (long r = 0; r < rows; r++) {
                long go = b * j->g_sb + h * j->g_sh + (i0 + r) * j->g_st, oo = b * j->o_sb + h * j->o_sh + (i0 + r) * j->o_st;
                float t = 0.0f;
                for (long d = 0; d < D; d++) {
                    gof[r * D + d] = load_f(j->go, go + d, bf16);
                    of[r * D + d] = load_f(j->o, oo + d, bf16);
                    t += gof[r * D + d] * of[r * D + d];
                }
                di[r] = t;
            }
            /* p = e^(scale * q k^T - lse): the forward's probabilities, unrounded; ds = its rounded copy first */
            gemm_acc(p, Se, qf, D, 1, kt, S, rows, D, Se, 1);
            for (long r = 0; r < rows; r++) {
                const long lim = j->causal ? (i0 + r + 1 < Se ? i0 + r + 1 : Se) : Se;
                float *pr = p + r * Se, *dr = ds + r * Se;
                probs_row(pr, lim, Se, j->scale, lse[r]);
                long c = 0;
                for (; c + 8 <= Se; c += 8) _mm256_storeu_ps(dr + c, round8_if(_mm256_loadu_ps(pr + c), bf16));
                for (; c < Se; c++) dr[c] = round_to(pr[c], bf16);
            }
            gemm_acc(dv, D, ds, 1, Se, gof, D, Se, rows, D, 0);         /* dv += p^T do */
            gemm_acc(ds, Se, gof, D, 1, vt, S, rows, D, Se, 1);         /* dp = do v^T */
            for (long r = 0; r < rows; r++) {                           /* ds = p (dp - sum(do * o)) */
                score_grad(ds + r * Se, p + r * Se, Se, di[r], bf16);
            }
            gemm_acc(dq, D, ds, Se, 1, kf, D, rows, Se, D, 1);          /* dq = ds k * scale */
            for (long r = 0; r < rows; r++)
                store_row(j->gq, ((b * j->H + h) * T + i0 + r) * D, dq + r * D, D, j->scale, bf16);
            gemm_acc(dk, D, ds, 1, Se, qf, D, Se, rows, D, 0);          /* dk += ds^T q (* scale below) */
        }
    }
    for (long r = 0; r < S; r++) {
        store_row(j->gk, kv_off + r * D, dk + r * D, D, j->scale, bf16);
        store_row(j->gv, kv_off + r * D, dv + r * D, D, 1.0f, bf16);
    }
    free(buf);
}

#if defined(__AVX512BF16__)
/* bf16 inputs at the x86-64-v4-vnni level: every product of the attention takes bf16 operands (q, k, v, do, and the
   probabilities and score gradients, which torch rounds to bf16 too), so they run on vdpbf16ps, two products per
   fp32 lane and instruction. A holds pairs of bf16 along the sum as 32-bit words (A[r][l] at A + r * ars + l * als);
   B holds the matching pairs, (L2 x N) words with row stride ldb. C (R x N fp32) (+)= A B. The instruction treats
   bf16 subnormals (below ~1e-38) as zero. */
static void gemm_bf16(float *C, long ldc, const uint32_t *A, long ars, long als, const uint32_t *B, long ldb, long R,
                      long L2, long N, int zero) {
    for (long r = 0; r < R; r += 4) {
        const long rr = R - r < 4 ? R - r : 4;
        for (long n = 0; n < N; n += 32) {
            const long nn = N - n < 32 ? N - n : 32;
            const __mmask16 m0 = nn >= 16 ? 0xffff : (__mmask16)((1u << nn) - 1);
            const __mmask16 m1 = nn >= 32 ? 0xffff : nn > 16 ? (__mmask16)((1u << (nn - 16)) - 1) : 0;
            float *c0 = C + r * ldc + n, *c1 = c0 + (rr > 1 ? ldc : 0), *c2 = c0 + (rr > 2 ? 2 * ldc : 0),
                  *c3 = c0 + (rr > 3 ? 3 * ldc : 0);
            __m512 s00, s01, s10, s11, s20, s21, s30, s31;
            if (zero) {
                s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = _mm512_setzero_ps();
            } else { /* rows past R read (and below, do not write) row r again */
                s00 = _mm512_maskz_loadu_ps(m0, c0); s01 = _mm512_maskz_loadu_ps(m1, c0 + 16);
                s10 = _mm512_maskz_loadu_ps(m0, c1); s11 = _mm512_maskz_loadu_ps(m1, c1 + 16);
                s20 = _mm512_maskz_loadu_ps(m0, c2); s21 = _mm512_maskz_loadu_ps(m1, c2 + 16);
                s30 = _mm512_maskz_loadu_ps(m0, c3); s31 = _mm512_maskz_loadu_ps(m1, c3 + 16);
            }
            const uint32_t *a0 = A + r * ars, *a1 = a0 + (rr > 1 ? ars : 0), *a2 = a0 + (rr > 2 ? 2 * ars : 0),
                           *a3 = a0 + (rr > 3 ? 3 * ars : 0);
            const uint32_t *b = B + n;
            for (long l = 0; l < L2; l++, b += ldb) {
                __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, b);
                __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, b + 16);
                long o = l * als;
                __m512bh x = (__m512bh)_mm512_set1_epi32((int)a0[o]);
                s00 = _mm512_dpbf16_ps(s00, x, b0); s01 = _mm512_dpbf16_ps(s01, x, b1);
                x = (__m512bh)_mm512_set1_epi32((int)a1[o]);
                s10 = _mm512_dpbf16_ps(s10, x, b0); s11 = _mm512_dpbf16_ps(s11, x, b1);
                x = (__m512bh)_mm512_set1_epi32((int)a2[o]);
                s20 = _mm512_dpbf16_ps(s20, x, b0); s21 = _mm512_dpbf16_ps(s21, x, b1);
                x = (__m512bh)_mm512_set1_epi32((int)a3[o]);
                s30 = _mm512_dpbf16_ps(s30, x, b0); s31 = _mm512_dpbf16_ps(s31, x, b1);
            }
            /* highest row first, so that a row repeated for a short tile ends with its own (row r's) values */
            if (rr > 3) { _mm512_mask_storeu_ps(c3, m0, s30); _mm512_mask_storeu_ps(c3 + 16, m1, s31); }
            if (rr > 2) { _mm512_mask_storeu_ps(c2, m0, s20); _mm512_mask_storeu_ps(c2 + 16, m1, s21); }
            if (rr > 1) { _mm512_mask_storeu_ps(c1, m0, s10); _mm512_mask_storeu_ps(c1 + 16, m1, s11); }
            _mm512_mask_storeu_ps(c0, m0, s00);
            _mm512_mask_storeu_ps(c0 + 16, m1, s01);
        }
    }
}

/* rows x D bf16 (row r at src + r * ld) as pairs along D: dst (rows x D/2 words) */
static void rows_bf16(uint16_t *dst, const uint16_t *src, long ld, long rows, long D) {
    for (long r = 0; r < rows; r++) memcpy(dst + r * D, src + r * ld, sizeof(uint16_t) * (size_t)D);
}

/* rows x D bf16 -> pairs along D, transposed: dst[p * ldt + r] = (src[r][2p], src[r][2p + 1]); D even */
static void pairs_by_column(uint32_t *dst, long ldt, const uint16_t *src, long ld, long rows, long D) {
    for (long r = 0; r < rows; r++) {
        const uint32_t *row = (const uint32_t *)(src + r * ld);
        for (long p = 0; p < D / 2; p++) dst[p * ldt + r] = row[p];
    }
}

/* rows x D bf16 -> pairs of rows: dst[q * D + d] = (src[2q][d], src[2q + 1][d]); an odd last row pairs with 0 */
static void pairs_of_rows(uint32_t *dst, const uint16_t *src, long ld, long rows, long D) {
    for (long q = 0; q < (rows + 1) / 2; q++) {
        const uint16_t *lo = src + 2 * q * ld, *hi = 2 * q + 1 < rows ? lo + ld : NULL;
        for (long d = 0; d < D; d++) dst[q * D + d] = lo[d] | (uint32_t)(hi ? hi[d] : 0) << 16;
    }
}

/* fp32 values already rounded to bf16 (their low halves zero) -> bf16; n values, then zeros up to `pad` */
static void to_bf16(uint16_t *dst, const float *src, long n, long pad) {
    for (long c = 0; c < n; c++) {
        uint32_t u;
        memcpy(&u, src + c, 4);
        dst[c] = (uint16_t)(u >> 16);
    }
    for (long c = n; c < pad; c++) dst[c] = 0;
}

static void fa_forward_unit_bf16(fa_job *j, long unit) {
    const long T = j->T, S = j->S, D = j->D, b = unit / j->Hkv, hk = unit % j->Hkv, group = j->H / j->Hkv;
    const long Sp = (S + 1) & ~1L, BQp = FA_BQ, Sb = fa_keys(j, b);
    if (Sb == 0) {
        for (long h = hk * group; h < (hk + 1) * group; h++) fa_zero_rows(j, b, h);
        return;
    }
    uint32_t *kp = malloc(sizeof(uint32_t) * (size_t)(D / 2 * S + Sp / 2 * D + BQp * Sp / 2));
    float *fbuf = malloc(sizeof(float) * (size_t)(FA_BQ * D + FA_BQ * S));
    if (!kp || !fbuf) { free(kp); free(fbuf); j->failed = 1; return; }
    uint32_t *vp = kp + D / 2 * S, *pb = vp + Sp / 2 * D;
    float *acc = fbuf, *s = acc + FA_BQ * D;
    pairs_by_column(kp, S, (const uint16_t *)j->k + fa_k_at(j, b, hk), j->ks[2], Sb, D);
    pairs_of_rows(vp, (const uint16_t *)j->v + fa_v_at(j, b, hk), j->vs[2], Sb, D);
    for (long h = hk * group; h < (hk + 1) * group; h++) {
        for (long i0 = 0; i0 < T; i0 += FA_BQ) {
            const long rows = T - i0 < FA_BQ ? T - i0 : FA_BQ;
            const long Se = j->causal ? (i0 + rows < Sb ? i0 + rows : Sb) : Sb, Sep = (Se + 1) & ~1L;
            const uint32_t *qb = (const uint32_t *)((const uint16_t *)j->q + fa_q_at(j, b, h, i0));
            gemm_bf16(s, Se, qb, j->qs[2] / 2, 1, kp, S, rows, D / 2, Se, 1); /* q's row stride is even here */
            float inv[FA_BQ];
            for (long r = 0; r < rows; r++) {
                const long i = i0 + r, lim = j->causal ? (i + 1 < Se ? i + 1 : Se) : Se;
                const float sc = fa_add_bias(j, s + r * Se, lim, b, h, i);
                inv[r] = softmax_row(s + r * Se, lim, Se, sc, 1, j->lse + (b * j->H + h) * T + i);
                to_bf16((uint16_t *)pb + r * Sep, s + r * Se, Se, Sep); /* exact: already rounded (NaN: 0x7fc0) */
            }
            gemm_bf16(acc, D, pb, Sep / 2, 1, vp, D, rows, Sep / 2, D, 1);
            for (long r = 0; r < rows; r++)
                store_row(j->out, b * j->o_sb + h * j->o_sh + (i0 + r) * j->o_st, acc + r * D, D, inv[r], 1);
        }
    }
    free(kp);
    free(fbuf);
}

static void fa_backward_unit_bf16(fa_job *j, long unit) {
    const long T = j->T, S = j->S, D = j->D, b = unit / j->Hkv, hk = unit % j->Hkv, group = j->H / j->Hkv;
    const long Sp = (S + 1) & ~1L, Bp = FA_BQ; /* FA_BQ is even */
    uint32_t *w = malloc(sizeof(uint32_t) * (size_t)(2 * (D / 2) * S + Sp / 2 * D + 2 * (Bp / 2) * D + Bp * D / 2
                                                     + Bp * Sp / 2 + 2 * S * Bp / 2));
    float *f = malloc(sizeof(float) * (size_t)(2 * S * D + 2 * FA_BQ * S + FA_BQ * D));
    if (!w || !f) { free(w); free(f); j->failed = 1; return; }
    uint32_t *kp = w, *vtp = kp + D / 2 * S, *kq = vtp + D / 2 * S, *dop = kq + Sp / 2 * D, *qp = dop + Bp / 2 * D;
    uint16_t *dob = (uint16_t *)(qp + Bp / 2 * D), *dsb = dob + Bp * D, *pt = dsb + Bp * Sp, *dst = pt + S * Bp;
    float *dk = f, *dv = dk + S * D, *p = dv + S * D, *ds = p + FA_BQ * S, *dq = ds + FA_BQ * S;
    const long kv_off = (b * j->Hkv + hk) * S * D;
    const uint16_t *k = (const uint16_t *)j->k + kv_off, *v = (const uint16_t *)j->v + kv_off;
    pairs_by_column(kp, S, k, D, S, D);
    pairs_by_column(vtp, S, v, D, S, D);
    pairs_of_rows(kq, k, D, S, D);
    memset(dk, 0, sizeof(float) * (size_t)(2 * S * D));
    for (long h = hk * group; h < (hk + 1) * group; h++) {
        for (long i0 = 0; i0 < T; i0 += FA_BQ) {
            const long rows = T - i0 < FA_BQ ? T - i0 : FA_BQ, rp = (rows + 1) & ~1L;
            const long Se = j->causal ? (i0 + rows < S ? i0 + rows : S) : S, Sep = (Se + 1) & ~1L;
            const uint16_t *qrows = (const uint16_t *)j->q + ((b * j->H + h) * T + i0) * D;
            float di[FA_BQ];
            const float *lse = j->lse + (b * j->H + h) * T + i0;
            for (long r = 0; r < rows; r++) {
                const uint16_t *go = (const uint16_t *)j->go + b * j->g_sb + h * j->g_sh + (i0 + r) * j->g_st;
                const uint16_t *o = (const uint16_t *)j->o + b * j->o_sb + h * j->o_sh + (i0 + r) * j->o_st;
                float t = 0.0f;
                for (long d = 0; d < D; d++) t += bf16_to_f32(go[d]) * bf16_to_f32(o[d]);
                di[r] = t;
                memcpy(dob + r * D, go, sizeof(uint16_t) * (size_t)D);
            }
            pairs_of_rows(dop, dob, D, rows, D);
            pairs_of_rows(qp, qrows, D, rows, D);
            gemm_bf16(p, Se, (const uint32_t *)qrows, D / 2, 1, kp, S, rows, D / 2, Se, 1);
            for (long r = 0; r < rows; r++) {
                const long lim = j->causal ? (i0 + r + 1 < Se ? i0 + r + 1 : Se) : Se;
                float *pr = p + r * Se;
                probs_row(pr, lim, Se, j->scale, lse[r]);
                for (long c = 0; c < Se; c++) pt[c * rp + r] = f32_to_bf16(pr[c]);
            }
            if (rp > rows)
                for (long c = 0; c < Se; c++) pt[c * rp + rows] = 0;
            gemm_bf16(dv, D, (const uint32_t *)pt, rp / 2, 1, dop, D, Se, rp / 2, D, 0);   /* dv += p^T do */
            gemm_bf16(ds, Se, (const uint32_t *)dob, D / 2, 1, vtp, S, rows, D / 2, Se, 1); /* dp = do v^T */
            for (long r = 0; r < rows; r++) {                                                /* ds = p (dp - di) */
                score_grad(ds + r * Se, p + r * Se, Se, di[r], 1);
                to_bf16(dsb + r * Sep, ds + r * Se, Se, Sep);
                for (long c = 0; c < Se; c++) dst[c * rp + r] = dsb[r * Sep + c];
            }
            if (rp > rows)
                for (long c = 0; c < Se; c++) dst[c * rp + rows] = 0;
            gemm_bf16(dq, D, (const uint32_t *)dsb, Sep / 2, 1, kq, D, rows, Sep / 2, D, 1); /* dq = ds k */
            for (long r = 0; r < rows; r++)
                store_row(j->gq, ((b * j->H + h) * T + i0 + r) * D, dq + r * D, D, j->scale, 1);
            gemm_bf16(dk, D, (const uint32_t *)dst, rp / 2, 1, qp, D, Se, rp / 2, D, 0);  /* dk += ds^T q */
        }
    }
    for (long r = 0; r < S; r++) {
        store_row(j->gk, kv_off + r * D, dk + r * D, D, j->scale, 1);
        store_row(j->gv, kv_off + r * D, dv + r * D, D, 1.0f, 1);
    }
    free(w);
    free(f);
}
#endif

/* bf16 with an even head dim takes vdpbf16ps where the level has it */
static int fa_dot_bf16(const fa_job *j) {
#if defined(__AVX512BF16__)
    return j->bf16 && j->D % 2 == 0;
#else
    (void)j;
    return 0;
#endif
}

static void fa_forward_range(const void *p, long begin, long end) {
    for (long u = begin; u < end; u++) {
#if defined(__AVX512BF16__)
        if (fa_dot_bf16(p)) { fa_forward_unit_bf16((fa_job *)p, u); continue; }
#endif
        fa_forward_unit((fa_job *)p, u);
    }
}

static void fa_backward_range(const void *p, long begin, long end) {
    for (long u = begin; u < end; u++) {
#if defined(__AVX512BF16__)
        if (fa_dot_bf16(p)) { fa_backward_unit_bf16((fa_job *)p, u); continue; }
#endif
        fa_backward_unit((fa_job *)p, u);
    }
}

/* Forward: q (B, H, T, D), k and v (B, Hkv, S, D); out (B, H, T, D) at strides (o_sb, o_sh, o_st) with unit stride
   along D; lse (B, H, T) fp32. Query head h reads kv head h / (H / Hkv); causal: query i sees keys 0..i.
   strides (9 values, 12 with a bias, or NULL for contiguous q, k, v and bias): q's batch, head and row strides,
   then k's, then v's (then the bias's), in elements, unit stride along D (bf16 with an even head dim: q's row stride
   even). lens (B values, or NULL): batch row b's queries see only keys 0..lens[b]-1 (a right-padded batch, as an
   encoder's padding mask gives it: every query row, padding included, attends to them as SDPA's with that mask),
   and a row with lens[b] <= 0 gets zero outputs and -inf log-sum-exps. bias (fp32, or bf16 when bias_bf16; or
   NULL): added to the scaled scores before the softmax, as SDPA adds a float mask, element (b, h, i, j) at
   b * s0 + h * s1 + i * s2 + j where s0..s2 are strides[9..11] (0 along a dimension the bias broadcasts over).
   Returns 0, or -1 when out of scratch memory. */
int loom_flash_attention(const void *q, const void *k, const void *v, void *out, long o_sb, long o_sh, long o_st,
                         float *lse, int bf16, long B, long H, long Hkv, long T, long S, long D, float scale,
                         int causal, const int64_t *lens, const void *bias, int bias_bf16, const int64_t *strides,
                         int threads) {
    fa_job job = {q, k, v, NULL, NULL, out, NULL, NULL, NULL, lse, B, H, Hkv, T, S, D, o_sb, o_sh, o_st, 0, 0, 0,
                  scale, causal, bf16, 0, lens, {H * T * D, T * D, D}, {Hkv * S * D, S * D, D},
                  {Hkv * S * D, S * D, D}, bias, {H * T * S, T * S, S}, bias_bf16};
    if (strides)
        for (int i = 0; i < 3; i++) {
            job.qs[i] = strides[i], job.ks[i] = strides[3 + i], job.vs[i] = strides[6 + i];
            if (bias) job.bs[i] = strides[9 + i];
        }
    parallel_run(fa_forward_range, &job, B * Hkv, 1, threads);
    return job.failed ? -1 : 0;
}

/* Backward of loom_flash_attention: out and lse as it returned them, grad_out at strides (g_sb, g_sh, g_st); dq
   (B, H, T, D), dk and dv (B, Hkv, S, D) contiguous. Returns 0, or -1 when out of scratch memory. */
int loom_flash_attention_backward(const void *q, const void *k, const void *v, const void *out, long o_sb, long o_sh,
                                  long o_st, const float *lse, const void *grad_out, long g_sb, long g_sh, long g_st,
                                  void *dq, void *dk, void *dv, int bf16, long B, long H, long Hkv, long T, long S,
                                  long D, float scale, int causal, int threads) {
    fa_job job = {q, k, v, out, grad_out, NULL, dq, dk, dv, (float *)lse, B, H, Hkv, T, S, D, o_sb, o_sh, o_st,
                  g_sb, g_sh, g_st, scale, causal, bf16, 0, NULL};
    parallel_run(fa_backward_range, &job, B * Hkv, 1, threads);
    return job.failed ? -1 : 0;
}

/* Rotary embedding of whole sequences (training, prefill), as loom's apply_rotary computes it: with sin's first half
   negated (RotaryEmbedding folds rotate-half's sign into it), y_i = x_i c_i + x_j s_i where j is i's position in the
   other half. Each product and the sum are rounded to y's dtype, as torch's mul and add are. The backward (backward
   = 1, x = dy, y = dx) is dx_i = dy_i c_i + dy_j s_j, each step rounded to dx's dtype, as autograd's mul backwards
   and their sum are. */
typedef struct {
    const void *x; const void *cos, *sin; void *y;
    long sb, sh, st, c_sb, c_st, H, T, D; int xbf16, cbf16, ybf16, backward;
} rope_job;

static inline void store8(void *p, long i, __m256 v, int bf16) {
    if (bf16) {
        __m256i o = round_bf16_8(v);
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i),
                         _mm_packus_epi32(_mm256_castsi256_si128(o), _mm256_extracti128_si256(o, 1)));
    } else {
        _mm256_storeu_ps((float *)p + i, v);
    }
}

static void rope_rows(const void *p, long begin, long end) {
    const rope_job *j = p;
    const long D = j->D, h = D / 2, T = j->T, H = j->H;
    const int xb = j->xbf16, cb = j->cbf16, yb = j->ybf16, bw = j->backward;
    for (long row = begin; row < end; row++) {
        const long b = row / (H * T), hd = row / T % H, t = row % T;
        const long xo = b * j->sb + hd * j->sh + t * j->st, co = b * j->c_sb + t * j->c_st, yo = row * D;
        long i = 0;
        for (; i + 8 <= h; i += 8) {
            __m256 x0 = load8(j->x, xo + i, xb), x1 = load8(j->x, xo + h + i, xb);
            __m256 c0 = load8(j->cos, co + i, cb), c1 = load8(j->cos, co + h + i, cb);
            __m256 s0 = load8(j->sin, co + i, cb), s1 = load8(j->sin, co + h + i, cb);
            __m256 a = round8_if(_mm256_mul_ps(x0, c0), yb), bb = round8_if(_mm256_mul_ps(x1, bw ? s1 : s0), yb);
            store8(j->y, yo + i, _mm256_add_ps(a, bb), yb);
            a = round8_if(_mm256_mul_ps(x1, c1), yb);
            bb = round8_if(_mm256_mul_ps(x0, bw ? s0 : s1), yb);
            store8(j->y, yo + h + i, _mm256_add_ps(a, bb), yb);
        }
        for (; i < h; i++) {
            float x0 = load_f(j->x, xo + i, xb), x1 = load_f(j->x, xo + h + i, xb);
            float c0 = load_f(j->cos, co + i, cb), c1 = load_f(j->cos, co + h + i, cb);
            float s0 = load_f(j->sin, co + i, cb), s1 = load_f(j->sin, co + h + i, cb);
            float y0 = round_to(round_to(x0 * c0, yb) + round_to(x1 * (bw ? s1 : s0), yb), yb);
            float y1 = round_to(round_to(x1 * c1, yb) + round_to(x0 * (bw ? s0 : s1), yb), yb);
            if (yb) {
                ((uint16_t *)j->y)[yo + i] = f32_to_bf16(y0);
                ((uint16_t *)j->y)[yo + h + i] = f32_to_bf16(y1);
            } else {
                ((float *)j->y)[yo + i] = y0;
                ((float *)j->y)[yo + h + i] = y1;
            }
        }
    }
}

/* x (B, H, T, D) at strides (sb, sh, st), unit stride along D (D even); cos and sin (B or 1, 1, T, D) at strides
   (c_sb, c_st) (c_sb 0: one for every batch row), one dtype; y (B, H, T, D) contiguous. */
void loom_rope(const void *x, int xbf16, long sb, long sh, long st, const void *cos, const void *sin, int cbf16,
               long c_sb, long c_st, void *y, int ybf16, long B, long H, long T, long D, int backward, int threads) {
    rope_job job = {x, cos, sin, y, sb, sh, st, c_sb, c_st, H, T, D, xbf16, cbf16, ybf16, backward};
    long rows = B * H * T, chunk = D > 0 ? 65536 / D : rows;
    parallel_run(rope_rows, &job, rows, chunk > 0 ? chunk : 1, threads);
}
