/* One decode step's attention for one layer in a single call: rotate the new query and key (RoPE), write the key
   and value into the cache at `pos`, then attend over the cache's first L positions (loom_decode_attention).
   In torch this is ~40 small ops per layer (cat, mul, flip, add, slices, two cache copies, the attention's checks);
   at batch 1 their dispatch costs more than the arithmetic.

   The rotation rounds exactly as torch's `x * cos + swap_halves(x) * sin` does in x's dtype (sin carries
   rotate-half's sign, see loom/models/rope.py): each product rounded to the dtype, then the sum rounded once more
   (bf16: the fp32 sum of two bf16 values, rounded to nearest even). Built with -ffp-contract=off, so no FMA. */
#include "common.h"

/* r = x * c + swap_halves(x) * s over D values (D even), rounded as torch's three ops are */
static void rotate(const void *x, const void *c, const void *s, void *r, long D, int bf16) {
    long half = D / 2;
    for (long i = 0; i < D; i++) {
        long j = i < half ? i + half : i - half;
        float a = load_f(x, i, bf16) * load_f(c, i, bf16);
        float b = load_f(x, j, bf16) * load_f(s, i, bf16);
        if (bf16)
            ((uint16_t *)r)[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(a)) + bf16_to_f32(f32_to_bf16(b)));
        else
            ((float *)r)[i] = a + b;
    }
}

static void copy_row(const void *x, void *y, long D, int bf16) { memcpy(y, x, (size_t)D * (bf16 ? 2 : 4)); }

int loom_rope_cache_attention(const void *q, long q_sb, const void *k, long k_sb, const void *v, long v_sb,
                              const void *cos, const void *sin, long cs_sb, void *kc, void *vc, long c_sb, long c_sh,
                              long pos, const uint8_t *mask, long m_sb, void *out, int bf16, long B, long H,
                              long Hkv, long L, long D, float scale, int threads) {
    long es = bf16 ? 2 : 4;
    char *qr = malloc((size_t)(B * H * D * es)); /* the rotated queries, (B, H, D) */
    if (!qr) return -1;
    for (long b = 0; b < B; b++) {
        const char *cb = (const char *)cos + b * cs_sb * es, *sb = (const char *)sin + b * cs_sb * es;
        for (long h = 0; h < H; h++)
            rotate((const char *)q + (b * q_sb + h * D) * es, cb, sb, qr + (b * H + h) * D * es, D, bf16);
        for (long h = 0; h < Hkv; h++) {
            long at = (b * c_sb + h * c_sh + pos * D) * es;
            rotate((const char *)k + (b * k_sb + h * D) * es, cb, sb, (char *)kc + at, D, bf16);
            copy_row((const char *)v + (b * v_sb + h * D) * es, (char *)vc + at, D, bf16);
        }
    }
    int status = loom_decode_attention(qr, H * D, D, kc, c_sb, c_sh, D, vc, c_sb, c_sh, D, mask, m_sb, out, bf16, B, H,
                                       Hkv, L, D, scale, threads);
    free(qr);
    return status;
}

/* The index of each row's largest value, as torch.argmax picks it: the first maximal value, or the first NaN where
   the row holds one. Greedy decoding's pick over the vocabulary, ~5x faster than torch's reduction at 50k logits. */
static long argmax_row(const float *x, long n) {
    __m256 best8 = _mm256_set1_ps(-INFINITY), nan8 = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        best8 = _mm256_max_ps(best8, v);
        nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8], best = -INFINITY;
    int nan = _mm256_movemask_ps(nan8) != 0;
    _mm256_storeu_ps(lanes, best8);
    for (int j = 0; j < 8; j++) best = lanes[j] > best ? lanes[j] : best;
    for (; i < n; i++) {
        nan |= x[i] != x[i];
        best = x[i] > best ? x[i] : best;
    }
    if (nan) {
        for (i = 0; i < n; i++)
            if (x[i] != x[i]) return i;
    }
    __m256 b = _mm256_set1_ps(best);
    for (i = 0; i + 8 <= n; i += 8) {
        int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), b, _CMP_EQ_OQ));
        if (hit) return i + __builtin_ctz(hit);
    }
    for (; i < n; i++)
        if (x[i] == best) return i;
    return 0;
}

void loom_argmax_rows(const float *x, long rows, long n, int64_t *out) {
    for (long r = 0; r < rows; r++) out[r] = argmax_row(x + r * n, n);
}

/* How a chain's projection stores its weight: in the layer's dtype (kind 0: loom_dense_gemm, the weight w and bias
   in the dtype), or quantized as loom's weight-only Linears hold it (loom/quantization/linear.py): kind 1 int8 with a
   float32 scale per row (loom_int8_gemm), 2 int8 with a float16/float32 scale per `group` inputs
   (loom_int8_group_gemm), 3 packed int4 with such scales and zero points or none (symmetric: zero 8;
   loom_int4_gemm, or loom_int4_tiles_gemm where the module keeps tiles, loom_int4_a8_gemm with 8-bit
   activations). A quantized projection
   runs exactly as its module's operator does (loom::int8_linear, loom::int8_group_linear, loom::int4_linear): the
   input as float32, the kernel's float32 product, cast to the dtype (round to nearest even, NaN 0x7fc0 as torch's
   cast), then the module's `y + bias` as torch's add rounds it. */
typedef struct {
    int kind;          /* 0 dense, 1 int8, 2 int8 group, 3 int4 */
    int half;          /* scales (and zero points) float16 */
    long group;        /* inputs per scale (kinds 2, 3) */
    const void *scale; /* kinds 1-3 */
    const void *zero;  /* kind 3: zero points, or NULL (symmetric) */
    const void *tiles; /* kind 3: the module's tiles (loom_int4_tiles_gemm), or NULL (the saved layout) */
    int a8;            /* kind 3 with tiles: 8-bit activations (loom_int4_a8_gemm, set_activation_bits) */
} chain_quant;

static inline uint16_t to_bf16_as_torch(float f) { return f != f ? (uint16_t)0x7fc0 : f32_to_bf16(f); }

/* y (B, N) = x (B, K) W^T + b for projection j of a chain layer, through the kernel its module's operator calls */
static int project(const chain_quant *qd, int j, const void *w, const void *b, const void *x, void *y, int bf16,
                   long B, long N, long K, int threads) {
    const chain_quant *q = qd ? qd + j : NULL;
    if (!q || q->kind == 0) return loom_dense_gemm(x, bf16, w, bf16, b, bf16, y, bf16, B, N, K, threads);
    float *xf = (float *)x, *yf = (float *)y, *buf = NULL;
    if (bf16) {
        buf = malloc(sizeof(float) * (size_t)(B * K + B * N));
        if (!buf) return -1;
        xf = buf;
        yf = buf + B * K;
        for (long i = 0; i < B * K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    }
    int status;
    if (q->kind == 1)
        status = loom_int8_gemm(xf, w, q->scale, yf, B, N, K, threads);
    else if (q->kind == 2)
        status = loom_int8_group_gemm(xf, w, q->scale, q->half, yf, B, N, K, q->group, threads);
    else if (q->tiles && q->a8)
        status = loom_int4_a8_gemm(xf, q->tiles, w, q->scale, q->zero, q->half, yf, B, N, K, q->group, threads);
    else if (q->tiles)
        status = loom_int4_tiles_gemm(xf, q->tiles, w, q->scale, q->zero, q->half, yf, B, N, K, q->group, threads);
    else
        status = loom_int4_gemm(xf, w, q->scale, q->zero, q->half, yf, B, N, K, q->group, threads);
    if (bf16) {
        for (long i = 0; i < B * N; i++) {
            float v = yf[i];
            if (b) v = bf16_to_f32(to_bf16_as_torch(v)) + bf16_to_f32(((const uint16_t *)b)[i % N]);
            ((uint16_t *)y)[i] = to_bf16_as_torch(v);
        }
        free(buf);
    } else if (b) {
        for (long i = 0; i < B * N; i++) yf[i] = yf[i] + ((const float *)b)[i % N];
    }
    return status ? -1 : 0;
}

/* The attention half of a pre-norm decoder layer's decode step, up to the MLP's input:
     h = rms_norm(x); attn = rope_cache_attention(q, k, v) of h Wq + bq, h Wk + bk, h Wv + bv;
     x_out = x + (attn Wo + bo); h2 = rms_norm(x_out)
   each step through the same kernel its torch operator calls (loom_rms_norm, loom_dense_gemm,
   loom_rope_cache_attention), so every intermediate is bitwise the operator's; the residual add rounds as torch's.
   w and b hold q, k, v, o (a NULL bias: none). qn / kn (or NULL): per-head RMSNorm weights (D) applied to the
   queries and keys before RoPE with qk_eps, as Qwen3's q_norm / k_norm modules do (loom_rms_norm over B * heads rows).
   x_out may be x. */
static int layer_attention(const void *x, void *x_out, void *h2, int bf16, long B, long hidden, long H, long Hkv,
                           long D, const void *ln1, const void *ln2, float eps, const void *qn, const void *kn,
                           float qk_eps, const void *const *w, const void *const *b, const chain_quant *qd,
                           const void *cos, const void *sin,
                           long cs_sb, void *kc, void *vc, long c_sb, long c_sh, long pos, const uint8_t *mask,
                           long m_sb, long L, float scale, int threads) {
    long es = bf16 ? 2 : 4, qn_ = H * D, kn_ = Hkv * D;
    char *h = malloc((size_t)(B * (2 * hidden + 2 * qn_ + 2 * kn_) * es));
    if (!h) return -1;
    char *q = h + B * hidden * es, *k = q + B * qn_ * es, *v = k + B * kn_ * es, *attn = v + B * kn_ * es;
    char *o = attn + B * qn_ * es;
    int status = 0;
    loom_rms_norm(x, ln1, h, bf16, B, hidden, eps, threads);
    status |= project(qd, 0, w[0], b[0], h, q, bf16, B, qn_, hidden, threads);
    status |= project(qd, 1, w[1], b[1], h, k, bf16, B, kn_, hidden, threads);
    status |= project(qd, 2, w[2], b[2], h, v, bf16, B, kn_, hidden, threads);
    if (qn) loom_rms_norm(q, qn, q, bf16, B * H, D, qk_eps, threads);
    if (kn) loom_rms_norm(k, kn, k, bf16, B * Hkv, D, qk_eps, threads);
    status |= loom_rope_cache_attention(q, qn_, k, kn_, v, kn_, cos, sin, cs_sb, kc, vc, c_sb, c_sh, pos, mask, m_sb,
                                        attn, bf16, B, H, Hkv, L, D, scale, threads);
    status |= project(qd, 3, w[3], b[3], attn, o, bf16, B, hidden, qn_, threads);
    for (long i = 0; i < B * hidden; i++) {
        if (bf16)
            ((uint16_t *)x_out)[i] = f32_to_bf16(load_f(x, i, 1) + load_f(o, i, 1));
        else
            ((float *)x_out)[i] = ((const float *)x)[i] + ((const float *)o)[i];
    }
    loom_rms_norm(x_out, ln2, h2, bf16, B, hidden, eps, threads);
    free(h);
    return status ? -1 : 0;
}

/* The attention half of a pre-norm decoder layer's decode step and the MLP's input projections in one call
   (layer_attention, then g = h2 Wgate + bgate; u = h2 Wup + bup). Weights and biases come in the order q, k, v, o,
   gate, up (a NULL bias: none). The caller runs the activation and the down projection (torch's own ops). Returns
   -1 when scratch memory could not be allocated. */
int loom_decode_layer_attention(const void *x, void *x_out, void *g, void *u, int bf16, long B, long hidden, long H,
                                long Hkv, long D, long I, const void *ln1, const void *ln2, float eps,
                                const void *wq, const void *wk, const void *wv, const void *wo, const void *wg,
                                const void *wu, const void *bq, const void *bk, const void *bv, const void *bo,
                                const void *bg, const void *bu, const void *cos, const void *sin, long cs_sb, void *kc,
                                void *vc, long c_sb, long c_sh, long pos, const uint8_t *mask, long m_sb, long L,
                                float scale, int threads) {
    char *h2 = malloc((size_t)(B * hidden * (bf16 ? 2 : 4)));
    if (!h2) return -1;
    const void *w[4] = {wq, wk, wv, wo}, *b[4] = {bq, bk, bv, bo};
    int status = layer_attention(x, x_out, h2, bf16, B, hidden, H, Hkv, D, ln1, ln2, eps, NULL, NULL, 0.0f, w, b, NULL,
                                 cos, sin, cs_sb, kc, vc, c_sb, c_sh, pos, mask, m_sb, L, scale, threads);
    status |= loom_dense_gemm(h2, bf16, wg, bf16, bg, bf16, g, bf16, B, I, hidden, threads);
    status |= loom_dense_gemm(h2, bf16, wu, bf16, bu, bf16, u, bf16, B, I, hidden, threads);
    free(h2);
    return status ? -1 : 0;
}

/* A decode chain: the decode steps of consecutive pre-norm decoder layers, dense (Llama's MLP) or mixture of
   experts (a top-k router over experts packed as in csrc/moe.c), with far fewer calls than the modules take.
   loom/kernels/chain.py builds one `chain_layer` per layer (its ctypes Structure mirrors this layout field for field)
   and one `chain_step` per chain, whose step-varying fields it sets once per token. A dense layer takes one call:
   between two calls the caller turns the previous layer's `a` into act(a) * u with torch's own ops (their rounding is
   torch's). A MoE layer takes two: after the first (attention, then the router's logits) the caller routes in torch
   (softmax, top-k, normalisation: the module's own ops) into `chosen` / `rw`; loom_decode_chain_experts then runs the
   routed experts' gate and up projections into `a` (B * k, 2I), the caller writes act(a[:, :I]) * a[:, I:] into `u`,
   and the next call finishes the layer with loom_moe_down. A shared expert (Qwen2-MoE) has its gate logit and gate and
   up projections computed with the router's; the caller turns them into sigmoid(logit) and act(gate) * up with torch's
   ops, and the finishing call adds sigmoid(logit) * down(...) to the routed sum, rounding as the module's torch ops
   do. Every value is bitwise what the modules compute. */
typedef struct {
    const void *ln1, *ln2, *w[7], *b[7]; /* q, k, v, o, gate, up, down (MoE: router, gate_up, down); NULL bias: none */
    void *kc, *vc;                       /* (B, Hkv, capacity, D) cache buffers */
    void *a, *u;                         /* dense: (B, I) gate and up projections; MoE: (B*k, 2I) and (B*k, I) */
    void *h2;                            /* (B, hidden): the MLP's normalised input */
    const void *qn, *kn;                 /* (D) per-head query / key norm weights, or NULL */
    void *logits;                        /* MoE: (B, E) router logits */
    const int64_t *chosen;               /* MoE: (B, k) experts the caller routed each row to */
    const void *rw;                      /* MoE: (B, k) their weights, fp32 or bf16 (rw_bf16) */
    const void *sw[4], *sb[4];           /* MoE shared expert (sw[0] NULL: none): its gate (1, hidden), gate and up
                                            (Is, hidden) and down (hidden, Is) projections' weights and biases */
    void *sg, *sa, *su;                  /* (B, 1) sigmoid(gate logit), set by the caller; (B, Is) gate and up */
    const chain_quant *q;                /* NULL, or per projection (7) how its weight is stored */
    long hidden, H, Hkv, D, I, c_sb, c_sh;
    long E, k, Is; /* MoE: experts, top-k and the shared expert's width; E = 0: a dense layer */
    float eps, scale, qk_eps;
    int rw_bf16;
} chain_layer;

typedef struct {
    void *x; /* (B, hidden) residual stream, updated in place */
    const void *cos, *sin;
    long cs_sb, pos, B; /* the new token's position, written to the caches */
    long L;              /* keys 0..L-1 are attended to (pos + 1; a static cache's whole length, masked) */
    const uint8_t *mask; /* NULL, or (B, >= L) bools with row stride m_sb (0: one row for all): keys to attend to */
    long m_sb;
    int bf16, threads;
    int no_products; /* benchmarks only (bench/bench_decode_overhead.py --no-matmul): products are zeros */
    const void *head; /* NULL, or a chain_layer holding the model's final norm (ln1, eps) and head (w[0], b[0], q[0];
                         I = the vocabulary): the call that finishes the last layer writes the logits too */
    void *logits;     /* (B, I) in the dtype, with head */
} chain_step;

/* x += d over B * hidden values, rounded as torch's add */
static void add_residual(void *x, const void *d, long count, int bf16) {
    for (long i = 0; i < count; i++) {
        if (bf16)
            ((uint16_t *)x)[i] = f32_to_bf16(load_f(x, i, 1) + load_f(d, i, 1));
        else
            ((float *)x)[i] += ((const float *)d)[i];
    }
}

/* The chain step with every product replaced by zeros: what is left is the step's work outside the matmul kernels
   (norms, RoPE, cache write, attention, residual adds), for measuring that overhead. Tokens then mean nothing. */
static int chain_step_without_products(const chain_layer *p, const chain_layer *n, const chain_step *s) {
    int bf16 = s->bf16;
    long es = bf16 ? 2 : 4, B = s->B;
    if (p) {
        char *d = calloc((size_t)(B * p->hidden), (size_t)es);
        if (!d) return -1;
        add_residual(s->x, d, B * p->hidden, bf16);
        free(d);
    }
    if (!n) return 0;
    long qn = n->H * n->D, kn = n->Hkv * n->D;
    char *h = calloc((size_t)(B * (2 * n->hidden + 2 * qn + 2 * kn)), (size_t)es);
    if (!h) return -1;
    char *q = h + B * n->hidden * es, *k = q + B * qn * es, *v = k + B * kn * es, *attn = v + B * kn * es;
    char *o = attn + B * qn * es;
    loom_rms_norm(s->x, n->ln1, h, bf16, B, n->hidden, n->eps, s->threads);
    int status = loom_rope_cache_attention(q, qn, k, kn, v, kn, s->cos, s->sin, s->cs_sb, n->kc, n->vc, n->c_sb,
                                           n->c_sh, s->pos, s->mask, s->m_sb, attn, bf16, B, n->H, n->Hkv, s->L, n->D,
                                           n->scale, s->threads);
    add_residual(s->x, o, B * n->hidden, bf16);
    loom_rms_norm(s->x, n->ln2, n->h2, bf16, B, n->hidden, n->eps, s->threads);
    if (n->E) {
        memset(n->logits, 0, (size_t)(B * n->E * es));
        if (n->sw[0]) {
            memset(n->sg, 0, (size_t)(B * es));
            memset(n->sa, 0, (size_t)(B * n->Is * es));
            memset(n->su, 0, (size_t)(B * n->Is * es));
        }
    } else {
        memset(n->a, 0, (size_t)(B * n->I * es));
        memset(n->u, 0, (size_t)(B * n->I * es));
    }
    free(h);
    return status;
}

/* d (B, hidden) += sg * (sa @ Wdown^T + b): a MoE layer's shared expert, rounded as torch's mul and add are (the
   routed sum plus the gated shared expert's output, each product and sum rounded to the dtype) */
static int add_shared_expert(const chain_layer *p, const chain_step *s, void *d) {
    int bf16 = s->bf16;
    long B = s->B, N = p->hidden;
    char *e = malloc((size_t)(B * N * (bf16 ? 2 : 4)));
    if (!e) return -1;
    int status = loom_dense_gemm(p->sa, bf16, p->sw[3], bf16, p->sb[3], bf16, e, bf16, B, N, p->Is, s->threads);
    for (long b = 0; b < B && !status; b++) {
        float g = load_f(p->sg, b, bf16);
        for (long c = b * N; c < (b + 1) * N; c++) {
            if (bf16) {
                float t = bf16_to_f32(f32_to_bf16(g * load_f(e, c, 1)));
                ((uint16_t *)d)[c] = f32_to_bf16(load_f(d, c, 1) + t);
            } else {
                float t = g * ((const float *)e)[c];
                ((float *)d)[c] = ((const float *)d)[c] + t;
            }
        }
    }
    free(e);
    return status;
}

/* The model's final norm and head after the last layer: logits (B, V) = rms_norm(x) W^T + b, through the kernels
   the modules' operators call (loom::rms_norm, then the head's product as `project` runs it), bitwise theirs */
static int chain_head(const chain_step *s) {
    const chain_layer *h = s->head;
    long es = s->bf16 ? 2 : 4;
    char *t = malloc((size_t)(s->B * h->hidden * es));
    if (!t) return -1;
    loom_rms_norm(s->x, h->ln1, t, s->bf16, s->B, h->hidden, h->eps, s->threads);
    int status = 0;
    if (s->no_products)
        memset(s->logits, 0, (size_t)(s->B * h->I * es));
    else
        status = project(h->q, 0, h->w[0], h->b[0], t, s->logits, s->bf16, s->B, h->I, h->hidden, s->threads);
    free(t);
    return status;
}

/* Finish layer `done` (x += its MLP's output: the down projection of `a`, or for MoE the routed experts' down
   projections of `u` weighted by `rw`, rounded as torch's add) and run layer `next` up to its MLP's input projections
   (dense: gate and up into `a`, `u`; MoE: the router's logits), in place on x; either may be NULL. Returns -1 when
   scratch memory could not be allocated, -2 where `chosen` holds an expert index out of range. */
int loom_decode_chain_step(const void *done, const void *next, const void *step) {
    const chain_layer *p = done, *n = next;
    const chain_step *s = step;
    int bf16 = s->bf16, status = 0;
    if (s->no_products) {
        status = chain_step_without_products(p, n, s);
        return status || n || !s->head ? status : chain_head(s);
    }
    if (p) {
        long count = s->B * p->hidden;
        char *d = malloc((size_t)(count * (bf16 ? 2 : 4)));
        if (!d) return -1;
        if (p->E) {
            status = loom_moe_down(p->u, p->w[6], p->chosen, p->rw, p->rw_bf16, d, bf16, s->B, p->k, p->E, p->hidden,
                                   p->I, s->threads);
            if (!status && p->sw[0]) status = add_shared_expert(p, s, d);
        } else
            status = project(p->q, 6, p->w[6], p->b[6], p->a, d, bf16, s->B, p->hidden, p->I, s->threads);
        if (!status) add_residual(s->x, d, count, bf16);
        free(d);
        if (status) return status;
    }
    if (n) {
        status |= layer_attention(s->x, s->x, n->h2, bf16, s->B, n->hidden, n->H, n->Hkv, n->D, n->ln1, n->ln2,
                                  n->eps, n->qn, n->kn, n->qk_eps, n->w, n->b, n->q, s->cos, s->sin, s->cs_sb, n->kc,
                                  n->vc, n->c_sb, n->c_sh, s->pos, s->mask, s->m_sb, s->L, n->scale, s->threads);
        if (n->E) {
            status |= loom_dense_gemm(n->h2, bf16, n->w[4], bf16, n->b[4], bf16, n->logits, bf16, s->B, n->E,
                                      n->hidden, s->threads);
            if (n->sw[0]) {
                status |= loom_dense_gemm(n->h2, bf16, n->sw[0], bf16, n->sb[0], bf16, n->sg, bf16, s->B, 1,
                                          n->hidden, s->threads);
                status |= loom_dense_gemm(n->h2, bf16, n->sw[1], bf16, n->sb[1], bf16, n->sa, bf16, s->B, n->Is,
                                          n->hidden, s->threads);
                status |= loom_dense_gemm(n->h2, bf16, n->sw[2], bf16, n->sb[2], bf16, n->su, bf16, s->B, n->Is,
                                          n->hidden, s->threads);
            }
        } else {
            status |= project(n->q, 4, n->w[4], n->b[4], n->h2, n->a, bf16, s->B, n->I, n->hidden, s->threads);
            status |= project(n->q, 5, n->w[5], n->b[5], n->h2, n->u, bf16, s->B, n->I, n->hidden, s->threads);
        }
    } else if (s->head)
        status = chain_head(s);
    return status ? -1 : 0;
}

/* A MoE layer's routed experts' gate and up projections (loom_moe_gate_up of `h2` over `chosen`) into `a`, after
   the caller routed the logits of its loom_decode_chain_step. Returns -1 (scratch memory) or -2 (an expert index out
   of range) on failure. */
int loom_decode_chain_experts(const void *layer, const void *step) {
    const chain_layer *n = layer;
    const chain_step *s = step;
    if (s->no_products) {
        memset(n->a, 0, (size_t)(s->B * n->k * 2 * n->I * (s->bf16 ? 2 : 4)));
        return 0;
    }
    return loom_moe_gate_up(n->h2, n->w[5], n->chosen, n->a, s->bf16, s->B, n->k, n->E, 2 * n->I, n->hidden,
                            s->threads);
}

/* A step of a chain of dense layers whose activation is SiLU, in one call: loom_decode_chain_step over `layers` (n
   chain_layer pointers) with a = silu(a) * u between two (loom_silu_mul or, bfloat16, loom_silu_mul_bf16: torch's
   silu_ and mul_ bits, `vec_block` as there), then the call that finishes the last layer (and runs the head, where
   the step has one). */
int loom_decode_chain_layers(const void *layer_array, long n, const void *step, long vec_block) {
    const void *const *layers = layer_array;
    const chain_step *s = step;
    const void *done = NULL;
    for (long i = 0; i < n; i++) {
        const chain_layer *p = layers[i];
        int status = loom_decode_chain_step(done, p, step);
        if (status) return status;
        if (s->bf16)
            loom_silu_mul_bf16(p->a, p->u, s->B * p->I, vec_block);
        else
            loom_silu_mul(p->a, p->u, s->B * p->I, vec_block);
        done = p;
    }
    return loom_decode_chain_step(done, NULL, step);
}

/* Greedy decoding of one row for up to `steps` tokens in one call, each step as the generate loop's would run it:
   the token's embedding row (x = embed[token], in the chain's dtype), the step at position pos (its rotary row t of
   cos / sin, each (steps, D) in the dtype with row stride cs_rs; keys 0..pos), every layer
   (loom_decode_chain_layers), the final norm and head into step->logits ((1, V) in the dtype), then the first
   maximal logit as float32 (argmax_row, torch.argmax's pick after the loop's `.float()`) as the next token, written
   to out[t]. Starts from `first`, fed at step->pos; stops after a token in eos (n_eos ids) or after `steps`. Returns
   the tokens written, or -1 (scratch memory), -3 (a token outside the embedding's rows). */
long loom_decode_chain_greedy(const void *layers, long n, void *step, long vec_block, const void *embed,
                              long embed_rows, const void *cos, const void *sin, long cs_rs, long first,
                              int64_t *out, long steps, const int64_t *eos, long n_eos) {
    chain_step *s = step;
    const chain_layer *head = s->head;
    long hidden = ((const chain_layer *const *)layers)[0]->hidden, pos = s->pos, V = head->I, es = s->bf16 ? 2 : 4;
    float *scores = s->bf16 ? malloc(sizeof(float) * (size_t)V) : (float *)s->logits;
    if (!scores) return -1;
    int64_t token = first;
    long written = steps;
    for (long t = 0; t < steps; t++) {
        if (token < 0 || token >= embed_rows) {
            written = -3;
            break;
        }
        memcpy(s->x, (const char *)embed + token * hidden * es, (size_t)(hidden * es));
        s->cos = (const char *)cos + t * cs_rs * es;
        s->sin = (const char *)sin + t * cs_rs * es;
        s->pos = pos + t;
        s->L = pos + t + 1;
        if (loom_decode_chain_layers(layers, n, step, vec_block)) {
            written = -1;
            break;
        }
        if (s->bf16)
            for (long v = 0; v < V; v++) scores[v] = bf16_to_f32(((const uint16_t *)s->logits)[v]);
        token = argmax_row(scores, V);
        out[t] = token;
        int stop = 0;
        for (long e = 0; e < n_eos; e++) stop |= eos[e] == token;
        if (stop) {
            written = t + 1;
            break;
        }
    }
    if (s->bf16) free(scores);
    return written;
}
