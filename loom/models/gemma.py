"""Gemma = Llama with RMSNorms that scale by (1 + weight) in float32, embeddings multiplied by sqrt(hidden_size)
(rounded to the activations' dtype), a tanh-GELU MLP (`hidden_act`), a tied LM head and an explicit head_dim.
Gemma 2 (gemma2.py) and Gemma 3 (gemma3.py) build on it."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from loom.kernels import ops, policy
from loom.models.common import ACTIVATIONS
from loom.models.heads import TokenClassificationHead
from loom.models.llama import (LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaForSequenceClassification,
                               LlamaModel, LlamaPreTrainedModel)


class GemmaConfig(LlamaConfig):
    model_type = "gemma"
    defaults = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                    num_attention_heads=16, num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh",
                    max_position_embeddings=8192, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
                    pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, attention_bias=False,
                    attention_dropout=0.0, use_bidirectional_attention=None)
    field_types = {**{k: v for k, v in LlamaConfig.field_types.items() if k != "pretraining_tp"},
                   "use_bidirectional_attention": (bool, None)}
    activation_key: ClassVar[str] = "hidden_act"  # the config key naming the MLP's activation (Gemma 2/3 differ)

    def __post_init__(self) -> None:
        # the first Gemma releases say "gelu" and mean its tanh approximation; the reference reads it so too
        if self.activation_key == "hidden_act" and self.hidden_act == "gelu":
            self.hidden_act = "gelu_pytorch_tanh"
        super().__post_init__()


def config_where(config) -> str:
    """'path: ' before a message about a config that was read from a file."""
    return f"{config._name_or_path}: " if getattr(config, "_name_or_path", "") else ""


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), all in float32 and rounded to x's dtype once at the end (Llama rounds before its
    weight). The weight starts at zero, the identity scale."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if policy.norm_applies(x, w):
            return ops.gemma_rms_norm(x, w, self.eps)  # C: one call instead of ~6 torch ops
        out = torch.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


class GemmaMLP(nn.Module):
    """Gated feed-forward without biases; the activation comes from the config key its family names."""

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        key = config.activation_key
        name = getattr(config, key)
        if name not in ACTIVATIONS:
            raise ValueError(f"{config_where(config)}config {key}={name!r} is not supported for {config.model_type}; "
                             f"use one of {', '.join(sorted(ACTIVATIONS))} (Gemma checkpoints use "
                             "'gelu_pytorch_tanh')")
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act_fn = ACTIVATIONS[name]()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class GemmaDecoderLayer(LlamaDecoderLayer):
    norm_class = GemmaRMSNorm

    def make_mlp(self, config: GemmaConfig, layer_idx: int) -> nn.Module:
        return GemmaMLP(config)


class GemmaPreTrainedModel(LlamaPreTrainedModel):
    config_class = GemmaConfig
    _no_split_modules = ["GemmaDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GemmaRMSNorm):
            module.weight.data.zero_()


class GemmaModel(GemmaPreTrainedModel, LlamaModel):
    layer_class = GemmaDecoderLayer
    norm_class = GemmaRMSNorm
    runs_bidirectional = False  # whether use_bidirectional_attention=True is supported (Gemma 3's encoder mode)

    def __init__(self, config: GemmaConfig) -> None:
        if getattr(config, "use_bidirectional_attention", None) and not self.runs_bidirectional:
            raise ValueError(f"{config_where(config)}config use_bidirectional_attention=True (an encoder such as "
                             "EmbeddingGemma) is not supported: loom runs Gemma as a causal decoder; set it to false "
                             "or null to use the checkpoint as a decoder")
        super().__init__(config)
        # the scale is rounded to the activations' dtype first (sqrt(3072) is 55.5 in bfloat16), as the reference;
        # a Python number of that value multiplies exactly as a tensor of that dtype would
        scale = config.hidden_size ** 0.5
        self.embed_scales = {dtype: torch.tensor(scale, dtype=dtype, device="cpu").item()
                             for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}

    def embed(self, input_ids):
        x = self.embed_tokens(input_ids)
        return x * self.embed_scales[x.dtype]


class GemmaForCausalLM(GemmaPreTrainedModel, LlamaForCausalLM):
    model_class = GemmaModel


class GemmaForSequenceClassification(GemmaPreTrainedModel, LlamaForSequenceClassification):
    model_class = GemmaModel


class GemmaForTokenClassification(TokenClassificationHead, GemmaPreTrainedModel):
    model_class = GemmaModel


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"gemma": (GemmaConfig, {
    "base": GemmaModel, "causal-lm": GemmaForCausalLM, "sequence-classification": GemmaForSequenceClassification,
    "token-classification": GemmaForTokenClassification})}
