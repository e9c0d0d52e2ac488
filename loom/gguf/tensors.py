"""A GGUF file's tensors as a checkpoint handle: loom's (the reference's) names, llama.cpp's rotary permutation of
Llama's q/k rows undone, float types as stored and quantized types expanded to float32.

The handle quacks like safetensors' `safe_open` (`keys`, `get_tensor`, `get_slice`), so loom's one streaming
loader (loom/loading.py) reads it like any other checkpoint. Q4_0 and Q8_0 Linear weights can instead be taken as
raw blocks (`raw_blocks`) by load.py, which keeps them quantized.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from loom.gguf.config import architecture_of
from loom.gguf.reader import gguf_package, open_gguf

# llama.cpp's tensor names -> the reference's
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
          "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_STORED = ("F32", "F16", "BF16")  # BF16 arrives as raw bytes
_QK = 32  # values per Q4_0 / Q8_0 block


def model_name(gguf_name: str) -> str:
    """The reference's name of a llama.cpp tensor name; unknown names are returned as they are (and then reported
    as unused by the loader)."""
    top, _, suffix = gguf_name.partition(".")
    if top in _TOP and suffix in ("weight", "bias"):
        return f"{_TOP[top]}.{suffix}"
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return gguf_name


def unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's converter, which interleaves each head's two rotary halves row by row (dim 0)."""
    rows = t.shape[0]
    return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """(..., 34) bytes per block: a float16 scale, then 32 int8 values -> (..., 32) float32 q * d."""
    d = blocks[..., :2].contiguous().view(torch.float16).float()
    return blocks[..., 2:].contiguous().view(torch.int8).float() * d


def q4_0_nibbles(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 18) bytes per block: a float16 scale, then 16 bytes whose low nibbles are values 0-15 and high nibbles
    values 16-31 -> ((..., 32) uint8 nibbles, (..., 1) float32 scales); a value is (nibble - 8) * scale."""
    d = blocks[..., :2].contiguous().view(torch.float16).float()
    qs = blocks[..., 2:]
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1), d


def q8_0_values(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 34) bytes per block: a float16 scale, then 32 int8 values -> ((..., 32) int8 values, (...) float16
    scales); a value is q * d."""
    return blocks[..., 2:].contiguous().view(torch.int8), blocks[..., :2].contiguous().view(torch.float16)[..., 0]


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    nibbles, d = q4_0_nibbles(blocks)
    return (nibbles.float() - 8) * d


_TORCH_DEQUANT = {"Q8_0": (34, dequantize_q8_0), "Q4_0": (18, dequantize_q4_0)}


class GgufCheckpoint:
    """The tensors of one GGUF file under the reference's names (see the module docstring)."""

    def __init__(self, file: Path) -> None:
        self.file = Path(file)
        gguf = open_gguf(self.file, arrays=False)
        meta = gguf.fields
        arch = architecture_of(meta, self.file)
        _refuse_rope_scaling(meta, arch, gguf.tensors, self.file)
        self.tensors = {model_name(t.name): t for t in gguf.tensors}
        _check_expandable(gguf.tensors, self.file)
        # llama.cpp permutes q/k rows for its Llama graph only (Qwen's converters leave them as they are)
        self.heads = {}
        if arch == "llama":
            self.heads = {"q_proj": meta.get(f"{arch}.attention.head_count"),
                          "k_proj": meta.get(f"{arch}.attention.head_count_kv",
                                             meta.get(f"{arch}.attention.head_count"))}

    def keys(self):
        return self.tensors.keys()

    def type_name(self, key: str) -> str:
        return self.tensors[key].type_name

    def get_tensor(self, key: str) -> torch.Tensor:
        tensor = self.tensors[key]
        kind = tensor.type_name
        if kind in _STORED:
            t = torch.from_numpy(tensor.data.copy())
            t = t.view(torch.bfloat16) if kind == "BF16" else t
        else:
            t = _dequantize(kind, tensor.data)
        return self._unpermute(key, t.reshape(tensor.shape))

    def raw_blocks(self, key: str) -> torch.Tensor:
        """The raw Q4_0 or Q8_0 blocks of a 2-D weight, (rows, in / 32, 18 or 34) uint8, rows in the reference's
        order."""
        rows, cols = self.tensors[key].shape
        size = _TORCH_DEQUANT[self.tensors[key].type_name][0]
        blocks = torch.from_numpy(self.tensors[key].data.copy()).reshape(rows, cols // _QK, size)
        return self._unpermute(key, blocks)

    def get_slice(self, key: str):
        return _Slice(self, key)

    def _unpermute(self, key: str, t: torch.Tensor) -> torch.Tensor:
        for proj, n_head in self.heads.items():
            if f".{proj}." in key and n_head:
                return unpermute_rows(t, n_head)
        return t


def _dequantize(kind: str, data: np.ndarray) -> torch.Tensor:
    """float32 values of a quantized tensor's bytes: Q8_0 and Q4_0 here, other types by the gguf package."""
    if kind in _TORCH_DEQUANT:
        size, fn = _TORCH_DEQUANT[kind]
        return fn(torch.from_numpy(data.copy()).reshape(-1, size))
    gguf = gguf_package()
    return torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]).copy())


def _check_expandable(tensors, file: Path) -> None:
    """Refuse, before anything is loaded, a type that neither loom nor the gguf package can expand (tried on one row
    of the first tensor of each type)."""
    gguf = gguf_package()
    seen = set(_STORED) | set(_TORCH_DEQUANT)
    for t in tensors:
        if t.type_name in seen:
            continue
        seen.add(t.type_name)
        try:
            gguf.quants.dequantize(t.data[:1], gguf.GGMLQuantizationType[t.type_name])
        except NotImplementedError:
            raise ValueError(f"{file}: tensor {t.name} is stored as {t.type_name}, which neither loom nor the "
                             "installed gguf package can expand; re-quantize the model to Q8_0, Q4_0 or a K-quant, "
                             "or upgrade gguf") from None


def _refuse_rope_scaling(meta: dict, arch: str, tensors, file: Path) -> None:
    # Llama 3.1-style rotary scaling travels as a `rope_freqs` tensor that loom's rotary tables would ignore
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or any(t.name == "rope_freqs.weight" for t in tensors):
        raise ValueError(f"{file}: this GGUF uses rotary scaling ({arch}.rope.scaling.type={scaling!r}"
                         f"{', a rope_freqs tensor' if scaling == 'none' else ''}), which loom cannot read from GGUF; "
                         "its logits would differ from llama.cpp's. Load the original Hugging Face checkpoint")


class _Slice:
    """`get_slice` for tensor-parallel loading: the whole tensor is expanded, then cut."""

    def __init__(self, handle: GgufCheckpoint, key: str) -> None:
        self.handle, self.key = handle, key

    def get_shape(self) -> list[int]:
        return list(self.handle.tensors[self.key].shape)

    def get_dtype(self) -> str:
        kind = self.handle.type_name(self.key)
        return kind if kind in _STORED else "F32"

    def __getitem__(self, index):
        return self.handle.get_tensor(self.key)[index]
