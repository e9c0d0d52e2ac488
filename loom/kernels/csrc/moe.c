/* A mixture-of-experts block's expert products for a decode step, two calls per layer instead of ~10 torch ops per
   active expert. T tokens each chose k of E experts (chosen: (T, k), token t's j-th choice is slot t * k + j). The
   slots are grouped by expert, in ascending expert order and ascending slot order within an expert (the stable sort
   of the module path), and each expert runs one product over exactly its rows through loom_dense_gemm: every row of
   a product is computed on its own, so each value is bitwise what the per-expert Linear gives.
   The caller applies the activation between the two calls (torch's own op, so its rounding is torch's). */
#include "common.h"

/* slot order grouped by expert; start[e] .. start[e + 1] are expert e's. -2: an expert index out of range */
static int group_slots(const int64_t *chosen, long S, long E, long *order, long *start) {
    for (long e = 0; e <= E; e++) start[e] = 0;
    for (long s = 0; s < S; s++) {
        if (chosen[s] < 0 || chosen[s] >= E) return -2;
        start[chosen[s] + 1]++;
    }
    for (long e = 0; e < E; e++) start[e + 1] += start[e];
    long *fill = malloc(sizeof(long) * (E > 0 ? E : 1));
    if (!fill) return -1;
    memcpy(fill, start, sizeof(long) * E);
    for (long s = 0; s < S; s++) order[fill[chosen[s]]++] = s;
    free(fill);
    return 0;
}

/* y (T * k, N) in grouped slot order = x[token of slot] @ w[expert].T, w (E, N, K): the experts' fused gate and up
   projections. x, w, y all fp32 or all bf16. */
int loom_moe_gate_up(const void *x, const void *w, const int64_t *chosen, void *y, int bf16, long T, long k, long E,
                     long N, long K, int threads) {
    long S = T * k, es = bf16 ? 2 : 4;
    long *order = malloc(sizeof(long) * (S + E + 1));
    char *rows = malloc((size_t)(S * K * es) + 1);
    int status = order && rows ? 0 : -1;
    if (!status) status = group_slots(chosen, S, E, order, order + S);
    const long *start = order + S;
    for (long e = 0; e < E && !status; e++) {
        long n = start[e + 1] - start[e];
        if (!n) continue;
        for (long i = 0; i < n; i++) /* the expert's rows, gathered */
            memcpy(rows + i * K * es, (const char *)x + order[start[e] + i] / k * K * es, (size_t)(K * es));
        status = loom_dense_gemm(rows, bf16, (const char *)w + e * N * K * es, bf16, NULL, 0,
                                 (char *)y + start[e] * N * es, bf16, n, N, K, threads);
    }
    free(order);
    free(rows);
    return status;
}

/* out (T, N) = sum over token t's k experts, in ascending expert order, of (h[slot] @ w[expert].T) * weights[slot],
   h (T * k, K) in grouped slot order, w (E, N, K). Rounds as the module path's torch ops do: the product in the
   dtype, times the routing weight in fp32 (weights fp32, or bf16 widened), rounded to the dtype, then added to the
   running sum in the dtype. h, w, out all fp32 or all bf16. */
int loom_moe_down(const void *h, const void *w, const int64_t *chosen, const void *weights, int wbf16, void *out,
                  int bf16, long T, long k, long E, long N, long K, int threads) {
    long S = T * k, es = bf16 ? 2 : 4;
    long *order = malloc(sizeof(long) * (S + E + 1));
    char *part = malloc((size_t)(S * N * es) + 1);
    int status = order && part ? 0 : -1;
    if (!status) status = group_slots(chosen, S, E, order, order + S);
    memset(out, 0, (size_t)(T * N * es));
    const long *start = order + S;
    for (long e = 0; e < E && !status; e++) {
        long n = start[e + 1] - start[e];
        if (!n) continue;
        status = loom_dense_gemm((const char *)h + start[e] * K * es, bf16, (const char *)w + e * N * K * es, bf16,
                                 NULL, 0, part, bf16, n, N, K, threads);
        for (long i = 0; i < n && !status; i++) {
            long slot = order[start[e] + i], t = slot / k;
            float r = load_f(weights, slot, wbf16);
            if (bf16) {
                const uint16_t *p = (const uint16_t *)part + i * N;
                uint16_t *o = (uint16_t *)out + t * N;
                for (long c = 0; c < N; c++) {
                    float v = bf16_to_f32(f32_to_bf16(bf16_to_f32(p[c]) * r));
                    o[c] = f32_to_bf16(bf16_to_f32(o[c]) + v);
                }
            } else {
                const float *p = (const float *)part + i * N;
                float *o = (float *)out + t * N;
                for (long c = 0; c < N; c++) {
                    float v = p[c] * r;
                    o[c] = o[c] + v;
                }
            }
        }
    }
    free(order);
    free(part);
    return status;
}
