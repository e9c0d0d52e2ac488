"""OLMo 2 = Llama with post-norm blocks (the attention and MLP outputs are normalised before the residual add; there
is no pre-norm) and an RMSNorm over the whole query and key projections (all heads at once) before RoPE."""
from __future__ import annotations

import torch

from loom.models.common import RMSNorm, check_activation
from loom.models.llama import (LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM,
                               LlamaForSequenceClassification, LlamaModel, LlamaPreTrainedModel)


class Olmo2Config(LlamaConfig):
    model_type = "olmo2"
    defaults = {**LlamaConfig.defaults, "vocab_size": 50304, "pad_token_id": 1, "bos_token_id": None,
                "eos_token_id": 50279, "rms_norm_eps": 1e-5}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_activation(self)


class Olmo2RMSNorm(RMSNorm):
    """Below fp32 the weight multiplies in fp32 before rounding back (Llama's norm rounds first); in fp32 the two
    are the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.float32:
            return super().forward(x)
        return torch.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Olmo2Attention(LlamaAttention):
    def __init__(self, config: Olmo2Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.q_norm = Olmo2RMSNorm(self.num_heads * self.head_dim, config.rms_norm_eps)
        self.k_norm = Olmo2RMSNorm(self.num_kv_heads * self.head_dim, config.rms_norm_eps)

    def project(self, x):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(B, T, -1, self.head_dim)  # (B, T, heads, D)
        k = self.k_norm(self.k_proj(x)).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        return q, k, v


class Olmo2DecoderLayer(LlamaDecoderLayer):
    attention_class = Olmo2Attention
    norm_class = Olmo2RMSNorm

    def __init__(self, config: Olmo2Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        del self.input_layernorm
        self.post_feedforward_layernorm = self.norm_class(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, cache_position=None):
        x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, mask, is_causal, cache, cache_position))
        return x + self.post_feedforward_layernorm(self.mlp(x))


# The norms over whole projections need every head of q and k on each rank: the projections gather their outputs
# and o_proj splits its (replicated) input, as in the reference's plan.
TP_PLAN = {**LlamaPreTrainedModel._tp_plan,
           "model.layers.*.self_attn.q_proj": "colwise_rep",
           "model.layers.*.self_attn.k_proj": "colwise_rep",
           "model.layers.*.self_attn.v_proj": "colwise_rep",
           "model.layers.*.self_attn.o_proj": "rowwise_rep"}


class Olmo2Model(LlamaModel):
    config_class = Olmo2Config
    layer_class = Olmo2DecoderLayer
    norm_class = Olmo2RMSNorm
    _tp_plan = TP_PLAN


class Olmo2ForCausalLM(LlamaForCausalLM):
    config_class = Olmo2Config
    model_class = Olmo2Model
    _tp_plan = TP_PLAN


class Olmo2ForSequenceClassification(LlamaForSequenceClassification):
    config_class = Olmo2Config
    model_class = Olmo2Model
    _tp_plan = TP_PLAN


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"olmo2": (Olmo2Config, {
    "base": Olmo2Model, "causal-lm": Olmo2ForCausalLM, "sequence-classification": Olmo2ForSequenceClassification})}
