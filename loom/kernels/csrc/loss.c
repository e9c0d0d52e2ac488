/* Token cross entropy over a vocabulary: the language-model loss, forward and backward, straight from the logits in
   their own dtype. torch computes it as logits.float() (a copy), log_softmax (a second full-size fp32 tensor, kept
   for backward), nll_loss, and in backward a zero-filled gradient, log_softmax's backward and a cast back: five
   passes over (rows, vocab). Here the forward reads each row once for its maximum and once for its sum of
   exponentials and keeps two floats per row; the backward reads the row once and writes its gradient. */
#include "common.h"

typedef struct {
    const void *x; const int64_t *labels; float *loss, *stats; const float *grad_loss; void *grad;
    long V, stride, ignore; int bf16; int bad;
} ce_job;

/* the largest value of row `x` (fp32 or bf16, n values) and whether it holds a NaN */
static float row_max(const void *x, long n, int bf16, int *nan) {
    __m256 m8 = _mm256_set1_ps(-INFINITY), u8 = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = load8(x, i, bf16);
        m8 = _mm256_max_ps(m8, v);
        u8 = _mm256_or_ps(u8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float m[8];
    _mm256_storeu_ps(m, m8);
    float mx = m[0];
    for (int k = 1; k < 8; k++) mx = m[k] > mx ? m[k] : mx;
    int any = _mm256_movemask_ps(u8) != 0;
    for (; i < n; i++) {
        float v = load_f(x, i, bf16);
        any |= isnan(v);
        mx = v > mx ? v : mx;
    }
    *nan = any;
    return mx;
}

/* sum of e^(x - mx) over the row, in fp32 (8 lane sums, then across lanes) */
static float row_sum_exp(const void *x, long n, int bf16, float mx) {
    __m256 m8 = _mm256_set1_ps(mx), a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_add_ps(a0, exp8(_mm256_sub_ps(load8(x, i, bf16), m8)));
        a1 = _mm256_add_ps(a1, exp8(_mm256_sub_ps(load8(x, i + 8, bf16), m8)));
    }
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; i < n; i++) s += expf(load_f(x, i, bf16) - mx);
    return s;
}

static void ce_forward_rows(const void *p, long begin, long end) {
    ce_job *j = (ce_job *)p;
    for (long r = begin; r < end; r++) {
        long label = j->labels[r];
        float *st = j->stats + 2 * r;
        if (label == j->ignore) { j->loss[r] = 0.0f; st[0] = st[1] = 0.0f; continue; }
        if (label < 0 || label >= j->V) { j->bad = 1; j->loss[r] = NAN; st[0] = st[1] = NAN; continue; }
        const char *row = (const char *)j->x + r * j->stride * (j->bf16 ? 2 : 4);
        int nan;
        float mx = row_max(row, j->V, j->bf16, &nan);
        if (nan || isinf(mx)) { /* torch: NaN for the whole row (x - max is NaN somewhere) */
            j->loss[r] = NAN; st[0] = st[1] = NAN;
            continue;
        }
        float logsum = logf(row_sum_exp(row, j->V, j->bf16, mx));
        st[0] = mx;
        st[1] = logsum;
        j->loss[r] = -((load_f(row, label, j->bf16) - mx) - logsum); /* log_softmax's (x - max) - log(sum) */
    }
}

static void ce_backward_rows(const void *p, long begin, long end) {
    const ce_job *j = (const ce_job *)p;
    const long V = j->V;
    for (long r = begin; r < end; r++) {
        long label = j->labels[r];
        char *out = (char *)j->grad + r * V * (j->bf16 ? 2 : 4);
        if (label == j->ignore) { memset(out, 0, (size_t)V * (j->bf16 ? 2 : 4)); continue; }
        const char *row = (const char *)j->x + r * j->stride * (j->bf16 ? 2 : 4);
        const float mx = j->stats[2 * r], logsum = j->stats[2 * r + 1], w = j->grad_loss[r];
        if (isnan(mx)) { /* a NaN loss: NaN gradient across the row, as torch's */
            for (long i = 0; i < V; i++) {
                if (j->bf16) ((uint16_t *)out)[i] = 0x7fc0;
                else ((float *)out)[i] = NAN;
            }
            continue;
        }
        /* log_softmax's backward of nll's gradient (-w at the label): e^(logp) * w, and -w + e^(logp) * w at the
           label, in fp32, rounded once to the logits' dtype */
        __m256 m8 = _mm256_set1_ps(mx), l8 = _mm256_set1_ps(logsum), w8 = _mm256_set1_ps(w);
        long i = 0;
        for (; i + 8 <= V; i += 8) {
            __m256 g = _mm256_mul_ps(exp8(_mm256_sub_ps(_mm256_sub_ps(load8(row, i, j->bf16), m8), l8)), w8);
            if (j->bf16) {
                __m256i o = round_bf16_8(g);
                _mm_storeu_si128((__m128i *)((uint16_t *)out + i),
                                 _mm_packus_epi32(_mm256_castsi256_si128(o), _mm256_extracti128_si256(o, 1)));
            } else {
                _mm256_storeu_ps((float *)out + i, g);
            }
        }
        for (; i < V; i++) {
            float g = expf((load_f(row, i, j->bf16) - mx) - logsum) * w;
            if (j->bf16) ((uint16_t *)out)[i] = f32_to_bf16(g);
            else ((float *)out)[i] = g;
        }
        float g = -w + expf((load_f(row, label, j->bf16) - mx) - logsum) * w;
        if (j->bf16) ((uint16_t *)out)[label] = f32_to_bf16(g);
        else ((float *)out)[label] = g;
    }
}

static long ce_chunk(long V) {
    long c = V > 0 ? 65536 / V : 1;
    return c > 0 ? c : 1;
}

/* Per-row losses -log_softmax(x[r])[labels[r]] of `rows` rows of V logits (fp32 or bf16, row r at x + r * stride,
   unit stride along the row) into loss (rows,) fp32, 0 where labels[r] == ignore; stats (rows, 2) keeps each row's
   max and log-sum for the backward. Returns 0, or -2 when a label is neither `ignore` nor in [0, V). */
int loom_token_nll(const void *x, int bf16, long rows, long V, long stride, const int64_t *labels, long ignore,
                   float *loss, float *stats, int threads) {
    ce_job job = {x, labels, loss, stats, NULL, NULL, V, stride, ignore, bf16, 0};
    parallel_run(ce_forward_rows, &job, rows, ce_chunk(V), threads);
    return job.bad ? -2 : 0;
}

/* The logits' gradient of those losses, each row's scaled by grad_loss[r] (fp32): written into grad (rows, V)
   contiguous, in the logits' dtype; zero rows where the label is `ignore`. Labels were checked by the forward. */
void loom_token_nll_backward(const void *x, int bf16, long rows, long V, long stride, const int64_t *labels,
                             long ignore, const float *stats, const float *grad_loss, void *grad, int threads) {
    ce_job job = {x, labels, NULL, (float *)stats, grad_loss, grad, V, stride, ignore, bf16, 0};
    parallel_run(ce_backward_rows, &job, rows, ce_chunk(V), threads);
}
