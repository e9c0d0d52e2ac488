"""Phi (Phi-1, Phi-1.5, Phi-2) on the Llama stack: attention and MLP side by side on one LayerNorm's output
(x + attn(ln(x)) + mlp(ln(x))), biases everywhere, partial rotary (`partial_rotary_factor`, 0.5 by default), the
output projection named `dense`, optional LayerNorms over each query/key head (`qk_layernorm`), a gelu_new
fc1/fc2 MLP, a final LayerNorm named `final_layernorm` and an lm_head with a bias."""
from __future__ import annotations

from torch import nn

from loom.models.common import activation
from loom.models.heads import TokenClassificationHead
from loom.models.llama import (LlamaAttention, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                               LlamaModel, LlamaPreTrainedModel)


class PhiConfig(LlamaConfig):
    model_type = "phi"
    attribute_map = {"rms_norm_eps": "layer_norm_eps"}  # the Llama stack builds its final norm with rms_norm_eps
    defaults = dict(vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                    num_attention_heads=32, num_key_value_heads=None, head_dim=None, resid_pdrop=0.0,
                    embd_pdrop=0.0, attention_dropout=0.0, hidden_act="gelu_new", max_position_embeddings=2048,
                    initializer_range=0.02, layer_norm_eps=1e-5, use_cache=True, tie_word_embeddings=False,
                    qk_layernorm=False, partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2,
                    pad_token_id=None)
    # rope_parameters['partial_rotary_factor'], when given, wins over the top-level key (as in the reference)
    field_types = {**LlamaConfig.field_types, "partial_rotary_factor": (float, None)}


class PhiAttention(LlamaAttention):
    q_bias = k_bias = v_bias = o_bias = True
    o_name = "dense"

    def __init__(self, config: PhiConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        if config.qk_layernorm:  # LayerNorms over each head's features (the checkpoint's names, not q_norm/k_norm)
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)

    def project(self, x):
        q, k, v = super().project(x)
        if self.config.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        return q, k, v


class PhiMLP(nn.Module):
    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation_fn = activation(config.hidden_act)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    """Parallel block: attention and MLP both read the one input LayerNorm's output."""

    def __init__(self, config: PhiConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = PhiAttention(config, layer_idx)
        self.mlp = PhiMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, cache_position=None):
        h = self.input_layernorm(x)
        attn = self.resid_dropout(self.self_attn(h, cos, sin, mask, is_causal, cache, cache_position))
        return attn + self.resid_dropout(self.mlp(h)) + x


class PhiPreTrainedModel(LlamaPreTrainedModel):
    config_class = PhiConfig
    _no_split_modules = ["PhiDecoderLayer"]
    _tp_plan = {
        "model.embed_tokens": "embedding",
        "model.layers.*.self_attn.q_proj": "colwise",
        "model.layers.*.self_attn.k_proj": "colwise",
        "model.layers.*.self_attn.v_proj": "colwise",
        "model.layers.*.self_attn.dense": "rowwise",
        "model.layers.*.mlp.fc1": "colwise",
        "model.layers.*.mlp.fc2": "rowwise",
        "lm_head": "colwise_rep",
    }


class PhiModel(PhiPreTrainedModel, LlamaModel):
    layer_class = PhiDecoderLayer
    norm_class = nn.LayerNorm
    norm_name = "final_layernorm"

    def __init__(self, config: PhiConfig) -> None:
        super().__init__(config)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)

    def embed(self, input_ids):
        # the reference drops out inputs_embeds too; loom uses given inputs_embeds as they are
        return self.embed_dropout(self.embed_tokens(input_ids))


class PhiForCausalLM(PhiPreTrainedModel, LlamaForCausalLM):
    model_class = PhiModel
    lm_head_bias = True


class PhiForSequenceClassification(PhiPreTrainedModel, LlamaForSequenceClassification):
    model_class = PhiModel


class PhiForTokenClassification(TokenClassificationHead, PhiPreTrainedModel):
    model_class = PhiModel


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"phi": (PhiConfig, {
    "base": PhiModel, "causal-lm": PhiForCausalLM, "sequence-classification": PhiForSequenceClassification,
    "token-classification": PhiForTokenClassification})}
