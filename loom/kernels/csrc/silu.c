/* SiLU of a decode step's gate times its up projection, a = silu(a) * u over n values, bitwise what torch's silu_
   then mul_ compute (the greedy runs' activation between two layers, decode.c loom_decode_chain_layers).

   torch's CPU silu for float32 (aten/src/ATen/native/cpu/Activation.cpp through Loops.h) runs x / (1 + exp(-x)) with
   its vector type over blocks of two vectors and the scalar op on what is left: `vec_block` values at a time (32
   where torch's CPU capability is AVX512, 16 for AVX2, 0 for its scalar DEFAULT build), the rest with libm's expf.
   Its vector exp is SLEEF's expf_u10 (with FMA at both levels); vexp below follows that algorithm step for step (the
   SLEEF reference: Naoki Shibata's sleefsimdsp.c, xexpf). Checked against torch over all 2^32 float32 inputs with
   torch at AVX512 (kernels at x86-64-v4 and v3), AVX2 and DEFAULT, and at run time on a probe before a chain uses it
   (loom/kernels/chain.py silu_block). One call is one of torch's loops: torch splits more than 32768 values over its
   threads (chunks with tails of their own), so the chain takes those only while torch has one thread. */
#include "common.h"

#define R_LN2F 1.442695040888963407359924681001892137426645954152985934135449406931f
#define L2UF 0.693145751953125f
#define L2LF 1.428606765330187045e-06f

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
typedef __m512i vi;
#define VSET _mm512_set1_ps
#define VFMA _mm512_fmadd_ps
#define VMUL _mm512_mul_ps
#define VADD _mm512_add_ps
#define VNEG(x) _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000)))
#define VDIV _mm512_div_ps
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VRINT _mm512_cvtps_epi32 /* round to nearest even, as SLEEF's vrint */
#define VTOF _mm512_cvtepi32_ps
#define VHALF(q) _mm512_srai_epi32(q, 1)
#define VSUBI _mm512_sub_epi32
static inline vf pow2i(vi q) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(0x7f)), 23));
}
/* u where -104 <= d <= 100; 0 below -104, inf above 100 (SLEEF's range ends) */
static inline vf vrange(vf d, vf u) {
    u = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(d, VSET(-104.0f), _CMP_NLT_UQ), u);
    return _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(VSET(100.0f), d, _CMP_LT_OQ), VSET(INFINITY));
}
#else
#define VW 8
typedef __m256 vf;
typedef __m256i vi;
#define VSET _mm256_set1_ps
#define VFMA _mm256_fmadd_ps
#define VMUL _mm256_mul_ps
#define VADD _mm256_add_ps
#define VNEG(x) _mm256_xor_ps(x, _mm256_set1_ps(-0.0f))
#define VDIV _mm256_div_ps
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VRINT _mm256_cvtps_epi32
#define VTOF _mm256_cvtepi32_ps
#define VHALF(q) _mm256_srai_epi32(q, 1)
#define VSUBI _mm256_sub_epi32
static inline vf pow2i(vi q) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q, _mm256_set1_epi32(0x7f)), 23));
}
static inline vf vrange(vf d, vf u) {
    u = _mm256_andnot_ps(_mm256_cmp_ps(d, VSET(-104.0f), _CMP_LT_OQ), u);
    return _mm256_blendv_ps(u, VSET(INFINITY), _mm256_cmp_ps(VSET(100.0f), d, _CMP_LT_OQ));
}
#endif

/* SLEEF's xexpf at either width */
static inline vf vexp(vf d) {
    vi q = VRINT(VMUL(d, VSET(R_LN2F)));
    vf qf = VTOF(q), s, u;
    s = VFMA(qf, VSET(-L2UF), d);
    s = VFMA(qf, VSET(-L2LF), s);
    u = VSET(0.000198527617612853646278381f);
    u = VFMA(u, s, VSET(0.00139304355252534151077271f));
    u = VFMA(u, s, VSET(0.00833336077630519866943359f));
    u = VFMA(u, s, VSET(0.0416664853692054748535156f));
    u = VFMA(u, s, VSET(0.166666671633720397949219f));
    u = VFMA(u, s, VSET(0.5f));
    u = VADD(VSET(1.0f), VFMA(VMUL(s, s), u, s));
    vi h = VHALF(q);
    return vrange(d, VMUL(VMUL(u, pow2i(h)), pow2i(VSUBI(q, h))));
}

void loom_silu_mul(float *a, const float *u, long n, long vec_block) {
    long body = vec_block > 0 ? n - n % vec_block : 0, i = 0;
    for (; i < body; i += VW) { /* vec_block is a multiple of VW */
        vf x = VLOAD(a + i);
        vf y = VDIV(x, VADD(VSET(1.0f), vexp(VNEG(x))));
        VSTORE(a + i, VMUL(y, VLOAD(u + i)));
    }
    for (; i < n; i++) {
        float x = a[i], y = x / (1.0f + expf(-x));
        a[i] = y * u[i];
    }
}

/* The same for bfloat16 a and u, as torch's reduced-float silu_ then mul_ compute them: each value to float32,
   x / (1 + exp(-x)) as above (torch's vector loop steps over 2 x its bfloat16 vector: `vec_block` 64 at AVX512, 32 at
   AVX2, 0 for DEFAULT), rounded to bfloat16 (nearest even); then the product of the two bfloat16 values in float32
   rounded once more. A NaN stays a NaN (its payload may differ from torch's). */
void loom_silu_mul_bf16(void *a_, const void *u_, long n, long vec_block) {
    uint16_t *a = a_;
    const uint16_t *u = u_;
    long body = vec_block > 0 ? n - n % vec_block : 0, i = 0;
    float y[VW];
    for (; i < body; i += VW) {
        float xs[VW];
        for (int j = 0; j < VW; j++) xs[j] = bf16_to_f32(a[i + j]);
        vf x = VLOAD(xs);
        VSTORE(y, VDIV(x, VADD(VSET(1.0f), vexp(VNEG(x)))));
        for (int j = 0; j < VW; j++) a[i + j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(y[j])) * bf16_to_f32(u[i + j]));
    }
    for (; i < n; i++) {
        float x = bf16_to_f32(a[i]);
        float s = x / (1.0f + expf(-x));
        a[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(s)) * bf16_to_f32(u[i]));
    }
}
