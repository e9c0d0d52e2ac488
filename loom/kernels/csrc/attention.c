/* Single-query attention for decode steps. */
#include "common.h"

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
    int nan_score = 0;
    long l0 = 0;
    if (!mask) /* four keys at a time: four independent sums, each in the order of the one-key loop below */
        for (; l0 + 4 <= L; l0 += 4) {
            long ko = kb + l0 * j->k_sl, d = 0;
            __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (; d < D8; d += 8) {
                __m256 qv = _mm256_loadu_ps(qf + d);
                for (int i = 0; i < 4; i++)
                    a[i] = _mm256_fmadd_ps(qv, load8(j->k, ko + i * j->k_sl + d, j->bf16), a[i]);
            }
            for (int i = 0; i < 4; i++) {
                float dot = hsum(a[i]);
                for (long e = d; e < D; e++) dot += qf[e] * load_f(j->k, ko + i * j->k_sl + e, j->bf16);
                float sc = dot * j->scale;
                s[l0 + i] = sc;
                nan_score |= isnan(sc);
                if (sc > mx) mx = sc;
            }
        }
    for (long l = l0; l < L; l++) {
        if (mask && !mask[l]) { s[l] = -INFINITY; continue; }
        long ko = kb + l * j->k_sl, d = 0;
        __m256 a = _mm256_setzero_ps();
        for (; d < D8; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qf + d), load8(j->k, ko + d, j->bf16), a);
        float dot = hsum(a);
        for (; d < D; d++) dot += qf[d] * load_f(j->k, ko + d, j->bf16);
        s[l] = dot * j->scale;
        nan_score |= isnan(s[l]);
        if (s[l] > mx) mx = s[l];
    }
    /* A NaN or +inf score makes softmax NaN across the whole row (inf - inf = NaN), whatever its position; the
       vectorised exp below would clamp a NaN away instead, so these rows are settled here. A row with nothing to
       attend to (all -inf: every key masked) gives zeros, as torch's SDPA does. */
    if (nan_score || isinf(mx)) {
        int nan_row = nan_score || mx > 0;
        for (long d = 0; d < D; d++) {
            if (j->bf16) ((uint16_t *)j->out)[bh * D + d] = nan_row ? 0x7fc0 : 0;
            else ((float *)j->out)[bh * D + d] = nan_row ? NAN : 0.0f;
        }
        if (s != stack_s) free(s);
        return;
    }
    float total = 0.0f;
    {
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
    /* acc = p @ v: each value's sum over the keys in key order (as one key at a time would add them), 64 values at
       a time kept in registers; masked keys are skipped, while an attended value that is NaN or inf must reach the
       output as in p @ v, even where p underflowed to 0 */
    for (long d0 = 0; d0 < D8; d0 += 64) {
        int nv = (int)((D8 - d0 < 64 ? D8 - d0 : 64) / 8);
        __m256 r[8];
        for (int i = 0; i < 8; i++) r[i] = _mm256_setzero_ps();
        for (long l = 0; l < L; l++) {
            if (mask && !mask[l]) continue;
            long vo = vb + l * j->v_sl + d0;
            __m256 p = _mm256_set1_ps(s[l]);
            for (int i = 0; i < nv; i++) r[i] = _mm256_fmadd_ps(p, load8(j->v, vo + 8 * i, j->bf16), r[i]);
        }
        for (int i = 0; i < nv; i++) _mm256_storeu_ps(acc + d0 + 8 * i, r[i]);
    }
    for (long d = D8; d < D; d++) acc[d] = 0.0f;
    if (D8 < D)
        for (long l = 0; l < L; l++) {
            if (mask && !mask[l]) continue;
            long vo = vb + l * j->v_sl;
            for (long d = D8; d < D; d++) acc[d] += s[l] * load_f(j->v, vo + d, j->bf16);
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
    /* Below this, a few microseconds of work: not worth waking a helper. The query heads of one KV head go to one
       thread together (chunks of a group), so each thread reads only its KV heads' cache. In a decode step the cache
       comes from memory (the weights streamed since evicted it): at 64-128 keys, 12 heads / 4 KV heads, D 64, a
       layer's attention took ~20 us on one thread, and sharing it (it was 1 << 17) took 2-thread decode of the int4
       / int8 incl. head bench models from 2.32 to 2.03 and 3.58 to 3.17 ms a token (Zen 5). */
    if (B * H * L * D < (1L << 14)) threads = 1;
    parallel_run(attn_range, &job, B * H, H / Hkv, threads);
    return job.failed ? -1 : 0;
}
