"""The activation precision of a loaded model's int4 Linears: a runtime choice, like llama.cpp's, never saved.

By default loom's int4 kernels round each activation row to int16 (one scale per row): close to exact, but the
products then need widened nibbles and two multiply-add steps per 4 weights. `set_activation_bits(model, 8)`
switches the int4 Linears to int8 activations with one scale per block of 32 inputs (what llama.cpp's Q4_0 x Q8_0
product does), which the CPU multiplies with the packed nibbles directly (VNNI `vpdpbusd`): faster decode, at the
accuracy cost measured in docs/guides/quantization.md. It applies to products of up to 16 rows (decode); longer
prompts (prefill) keep int16 activations in the blocked int4 GEMM. While 8-bit activations are on, each int4 Linear
on the CPU keeps a second copy of its weights in the kernel's layout (16-row tiles with the scales beside the
nibbles: about the int4 weights' bytes again). With 16 the default decode kernel reads the same tiles where the CPU
runs loom's kernels (Int4Linear.wants_tiles), so they stay; elsewhere switching back to 16 frees them. The saved layout is
unchanged.
"""
from __future__ import annotations

from torch import nn

from loom.quantization.linear import Int4Linear, make_tiles

_BITS = (8, 16)


def set_activation_bits(model: nn.Module, bits: int) -> int:
    """Round the activations of every int4 Linear of `model` to `bits` bits: 8 (int8 per block of 32, faster) or
    16 (int16 per row, the default). Applies to loom's own int4 (`WeightOnlyConfig(bits=4)`), GGUF Q4_0 and
    GPTQ / AWQ / compressed-tensors int4 layers alike; other layers are left as they are. Not stored by
    `save_pretrained`: a reloaded model starts at 16. With 8, each int4 Linear on the CPU also keeps its weights in
    the 8-bit kernel's layout (about its int4 bytes again) until switched back. Returns the number of layers
    switched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_activation_bits: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(bits, bool) or bits not in _BITS:
        raise ValueError(f"set_activation_bits: bits={bits!r} is not supported; use 8 (int8 activations per block "
                         "of 32, faster decode) or 16 (int16 per row, the default)")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Int4Linear)]
    if not layers:
        raise ValueError(f"set_activation_bits: model ({type(model).__name__}) has no int4 Linear layers; 8-bit "
                         "activations apply to int4 weights only (WeightOnlyConfig(bits=4), GGUF Q4_0, GPTQ, AWQ, "
                         "compressed-tensors int4). Load or quantize the model with int4 weights first")
    if bits == 8:
        odd = [(name, m.group_size) for name, m in layers if m.group_size % 32]
        if odd:
            name, group = odd[0]
            raise ValueError(f"set_activation_bits: layer {name!r} has group_size={group} ({len(odd)} such "
                             "layers); 8-bit activations are scaled per block of 32 inputs, so they need int4 group "
                             "sizes that are a multiple of 32")
    for _, m in layers:
        m.activation_bits = bits
    # the tiles: every CPU layer's with 8 bits; with 16 those of the layers whose decode reads them (wants_tiles)
    keep = [m for _, m in layers if m.weight.device.type == "cpu" and (bits == 8 or m.wants_tiles())]
    kept = {id(m) for m in keep}
    for _, m in layers:
        if id(m) not in kept:
            m.drop_a8_tiles()
    make_tiles(keep)
    return len(layers)


def activation_bits(model: nn.Module) -> set[int]:
    """The activation bit widths in use by `model`'s int4 Linears (empty when it has none)."""
    return {m.activation_bits for m in model.modules() if isinstance(m, Int4Linear)}
