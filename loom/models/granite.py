"""Granite = Llama with four multipliers: `embedding_multiplier` (scales the input embeddings),
`attention_multiplier` (the attention scale, in place of head_dim ** -0.5), `residual_multiplier` (scales each
block's attention and MLP output before the residual add) and `logits_scaling` (divides the logits)."""
from __future__ import annotations

from loom.models.common import check_activation
from loom.models.llama import LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class GraniteConfig(LlamaConfig):
    model_type = "granite"
    defaults = {**LlamaConfig.defaults, "embedding_multiplier": 1.0, "logits_scaling": 1.0,
                "residual_multiplier": 1.0, "attention_multiplier": 1.0}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_activation(self)


class GraniteAttention(LlamaAttention):
    def __init__(self, config: GraniteConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.scaling = config.attention_multiplier


class GraniteDecoderLayer(LlamaDecoderLayer):
    attention_class = GraniteAttention

    def __init__(self, config: GraniteConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.residual_multiplier = config.residual_multiplier

    def forward(self, x, cos, sin, mask, is_causal, cache=None, cache_position=None):
        m = self.residual_multiplier
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, cache_position) * m
        return x + self.mlp(self.post_attention_layernorm(x)) * m


class GraniteModel(LlamaModel):
    config_class = GraniteConfig
    layer_class = GraniteDecoderLayer

    def embed(self, input_ids):
        return self.embed_tokens(input_ids) * self.config.embedding_multiplier

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, *args, **kwargs):
        # the reference scales embeddings passed in by the caller too
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds * self.config.embedding_multiplier
        return super().forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, *args,
                               **kwargs)


class GraniteForCausalLM(LlamaForCausalLM):
    config_class = GraniteConfig
    model_class = GraniteModel

    def finish_logits(self, logits):
        return logits / self.config.logits_scaling


# the registry (loom.auto), the top-level exports and the test tables are derived from this; the reference has no
# sequence-classification head for Granite
MODEL_TYPES = {"granite": (GraniteConfig, {"base": GraniteModel, "causal-lm": GraniteForCausalLM})}
