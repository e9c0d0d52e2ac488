/* The functions loom's kernel library exports: one line each, parsed by loom/kernels/build.py's test to check that
   the ctypes declarations match. Shapes are row-major and contiguous unless strides are passed; `long` is 64-bit.
   Every GEMM-like function returns 0, or -1 when it could not allocate its scratch memory. */
#ifndef LOOM_KERNELS_H
#define LOOM_KERNELS_H
#include <stdint.h>

#define LOOM_API __attribute__((visibility("default")))

LOOM_API const char *loom_build_id(void);
LOOM_API void loom_set_spin(int spins);
LOOM_API int loom_pool_helpers(void);
LOOM_API int loom_pool_selftest(long jobs, long total, long chunk, int threads, long item_pauses, long helper_pauses, long publish_pauses);
LOOM_API int loom_dense_blocked(void);
LOOM_API int loom_dense_gelu(const float *x, const float *w, const float *bias, float *y, long M, long N, long K, int threads);
LOOM_API int loom_dense_gemm(const void *x, int xbf16, const void *w, int wbf16, const void *bias, int bbf16, void *y, int ybf16, long M, long N, long K, int threads);
LOOM_API void loom_rms_norm(const void *x, const void *w, void *y, int bf16, long rows, long n, float eps, int threads);
LOOM_API void loom_rms_norm_1p(const void *x, const void *w, void *y, int bf16, long rows, long n, float eps, int threads);
LOOM_API int loom_decode_attention(const void *q, long q_sb, long q_sh, const void *k, long k_sb, long k_sh, long k_sl, const void *v, long v_sb, long v_sh, long v_sl, const uint8_t *mask, long m_sb, void *out, int bf16, long B, long H, long Hkv, long L, long D, float scale, int threads);
LOOM_API int loom_rope_cache_attention(const void *q, long q_sb, const void *k, long k_sb, const void *v, long v_sb, const void *cos, const void *sin, long cs_sb, void *kc, void *vc, long c_sb, long c_sh, long pos, const uint8_t *mask, long m_sb, void *out, int bf16, long B, long H, long Hkv, long L, long D, float scale, int threads);
LOOM_API int loom_decode_layer_attention(const void *x, void *x_out, void *g, void *u, int bf16, long B, long hidden, long H, long Hkv, long D, long I, const void *ln1, const void *ln2, float eps, const void *wq, const void *wk, const void *wv, const void *wo, const void *wg, const void *wu, const void *bq, const void *bk, const void *bv, const void *bo, const void *bg, const void *bu, const void *cos, const void *sin, long cs_sb, void *kc, void *vc, long c_sb, long c_sh, long pos, const uint8_t *mask, long m_sb, long L, float scale, int threads);
LOOM_API int loom_moe_gate_up(const void *x, const void *w, const int64_t *chosen, void *y, int bf16, long T, long k, long E, long N, long K, int threads);
LOOM_API int loom_moe_down(const void *h, const void *w, const int64_t *chosen, const void *weights, int wbf16, void *out, int bf16, long T, long k, long E, long N, long K, int threads);
LOOM_API void loom_argmax_rows(const float *x, long rows, long n, int64_t *out);
LOOM_API int loom_decode_chain_step(const void *done, const void *next, const void *step);
LOOM_API int loom_decode_chain_experts(const void *layer, const void *step);
LOOM_API int loom_decode_chain_layers(const void *layer_array, long n, const void *step, long vec_block);
LOOM_API long loom_decode_chain_greedy(const void *layers, long n, void *step, long vec_block, const void *embed, long embed_rows, const void *cos, const void *sin, long cs_rs, long first, int64_t *out, long steps, const int64_t *eos, long n_eos);
LOOM_API void loom_silu_mul(float *a, const float *u, long n, long vec_block);
LOOM_API void loom_silu_mul_bf16(void *a, const void *u, long n, long vec_block);
LOOM_API int loom_int8_gemm(const float *x, const int8_t *w, const float *scale, float *y, long M, long N, long K, int threads);
LOOM_API int loom_int8_group_gemm(const float *x, const int8_t *w, const void *scale, int half, float *y, long M, long N, long K, long G, int threads);
LOOM_API int loom_int4_gemm(const float *x, const uint8_t *w, const void *scale, const void *zero, int half, float *y, long M, long N, long K, long G, int threads);
LOOM_API int loom_int4_tiles_int16(void);
LOOM_API int loom_int4_tiles_gemm(const float *x, const uint8_t *tiles, const uint8_t *w, const void *scale, const void *zero, int half, float *y, long M, long N, long K, long G, int threads);
LOOM_API int loom_int4_a8_gemm(const float *x, const uint8_t *tiles, const uint8_t *w, const void *scale, const void *zero, int half, float *y, long M, long N, long K, long G, int threads);
LOOM_API void loom_int4_dequantize(const uint8_t *w, const void *scale, const void *zero, int half, float *out, long N, long K, long G, int threads);
LOOM_API int loom_int4_quantize_asymmetric(const float *w, uint8_t *packed, uint16_t *scale, uint16_t *zero, long N, long K, long G, int threads);
LOOM_API int loom_token_nll(const void *x, int bf16, long rows, long V, long stride, const int64_t *labels, long ignore, float *loss, float *stats, int threads);
LOOM_API void loom_token_nll_backward(const void *x, int bf16, long rows, long V, long stride, const int64_t *labels, long ignore, const float *stats, const float *grad_loss, void *grad, int threads);
LOOM_API int loom_flash_attention(const void *q, const void *k, const void *v, void *out, long o_sb, long o_sh, long o_st, float *lse, int bf16, long B, long H, long Hkv, long T, long S, long D, float scale, int causal, const int64_t *lens, const void *bias, int bias_bf16, const int64_t *strides, int threads);
LOOM_API int loom_flash_attention_backward(const void *q, const void *k, const void *v, const void *out, long o_sb, long o_sh, long o_st, const float *lse, const void *grad_out, long g_sb, long g_sh, long g_st, void *dq, void *dk, void *dv, int bf16, long B, long H, long Hkv, long T, long S, long D, float scale, int causal, int threads);
LOOM_API void loom_rope(const void *x, int xbf16, long sb, long sh, long st, const void *cos, const void *sin, int cbf16, long c_sb, long c_st, void *y, int ybf16, long B, long H, long T, long D, int backward, int threads);

#endif
