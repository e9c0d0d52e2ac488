"""The ctypes signatures of the library's exported functions, written once to match csrc/loom_kernels.h (a test
parses the header and compares)."""
from __future__ import annotations

import ctypes

_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float

SIGNATURES: dict[str, tuple[object, list]] = {
    "loom_build_id": (ctypes.c_char_p, []),
    "loom_set_spin": (None, [_I]),
    "loom_pool_helpers": (_I, []),
    "loom_pool_selftest": (_I, [_L, _L, _L, _I, _L, _L, _L]),
    "loom_dense_blocked": (_I, []),
    "loom_dense_gelu": (_I, [_P, _P, _P, _P, _L, _L, _L, _I]),
    "loom_dense_gemm": (_I, [_P, _I, _P, _I, _P, _I, _P, _I, _L, _L, _L, _I]),
    "loom_rms_norm": (None, [_P, _P, _P, _I, _L, _L, _F, _I]),
    "loom_rms_norm_1p": (None, [_P, _P, _P, _I, _L, _L, _F, _I]),
    "loom_decode_attention": (_I, [_P, _L, _L, _P, _L, _L, _L, _P, _L, _L, _L, _P, _L, _P, _I, _L, _L, _L, _L, _L,
                                   _F, _I]),
    "loom_rope_cache_attention": (_I, [_P, _L, _P, _L, _P, _L, _P, _P, _L, _P, _P, _L, _L, _L, _P, _L, _P, _I, _L, _L,
                                       _L, _L, _L, _F, _I]),
    "loom_decode_layer_attention": (_I, [_P, _P, _P, _P, _I, _L, _L, _L, _L, _L, _L, _P, _P, _F] + [_P] * 14
                                    + [_L, _P, _P, _L, _L, _L, _P, _L, _L, _F, _I]),
    "loom_moe_gate_up": (_I, [_P, _P, _P, _P, _I, _L, _L, _L, _L, _L, _I]),
    "loom_moe_down": (_I, [_P, _P, _P, _P, _I, _P, _I, _L, _L, _L, _L, _L, _I]),
    "loom_argmax_rows": (None, [_P, _L, _L, _P]),
    "loom_decode_chain_step": (_I, [_P, _P, _P]),
    "loom_decode_chain_experts": (_I, [_P, _P]),
    "loom_decode_chain_layers": (_I, [_P, _L, _P, _L]),
    "loom_silu_mul": (None, [_P, _P, _L, _L]),
    "loom_silu_mul_bf16": (None, [_P, _P, _L, _L]),
    "loom_decode_chain_greedy": (_L, [_P, _L, _P, _L, _P, _L, _P, _P, _L, _L, _P, _L, _P, _L]),
    "loom_int8_gemm": (_I, [_P, _P, _P, _P, _L, _L, _L, _I]),
    "loom_int8_group_gemm": (_I, [_P, _P, _P, _I, _P, _L, _L, _L, _L, _I]),
    "loom_int4_gemm": (_I, [_P, _P, _P, _P, _I, _P, _L, _L, _L, _L, _I]),
    "loom_int4_a8_gemm": (_I, [_P, _P, _P, _P, _P, _I, _P, _L, _L, _L, _L, _I]),
    "loom_int4_tiles_gemm": (_I, [_P, _P, _P, _P, _P, _I, _P, _L, _L, _L, _L, _I]),
    "loom_int4_tiles_int16": (_I, []),
    "loom_int4_dequantize": (None, [_P, _P, _P, _I, _P, _L, _L, _L, _I]),
    "loom_int4_quantize_asymmetric": (_I, [_P, _P, _P, _P, _L, _L, _L, _I]),
    "loom_flash_attention": (_I, [_P, _P, _P, _P, _L, _L, _L, _P, _I, _L, _L, _L, _L, _L, _L, _F, _I, _P, _P, _I, _P,
                                   _I]),
    "loom_flash_attention_backward": (_I, [_P, _P, _P, _P, _L, _L, _L, _P, _P, _L, _L, _L, _P, _P, _P, _I, _L, _L,
                                           _L, _L, _L, _L, _F, _I, _I]),
    "loom_rope": (None, [_P, _I, _L, _L, _L, _P, _P, _I, _L, _L, _P, _I, _L, _L, _L, _L, _I, _I]),
    "loom_token_nll": (_I, [_P, _I, _L, _L, _L, _P, _L, _P, _P, _I]),
    "loom_token_nll_backward": (None, [_P, _I, _L, _L, _L, _P, _L, _P, _P, _P, _I]),
}


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib
