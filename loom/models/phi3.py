"""Phi-3 = Llama with the checkpoint's fused projections: one `qkv_proj` ([q; k; v] rows) and one `gate_up_proj`
([gate; up] rows), split in the forward; RoPE `default` or `longrope` (with the top-level
`original_max_position_embeddings`), partial rotary, an optional sliding window on every layer and residual
dropout. generate re-reads the whole sequence once it grows past original_max_position_embeddings, as the reference
does: longrope switches to its long factors there, and keys cached with the short ones would be stale."""
from __future__ import annotations

from torch import nn

from loom.configuration import ConfigFieldError
from loom.models.common import activation
from loom.models.heads import TokenClassificationHead
from loom.models.llama import (LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM,
                               LlamaForSequenceClassification, LlamaModel, LlamaPreTrainedModel)

ROPE_TYPES = ("default", "longrope")
LEGACY_LONGROPE = ("su", "yarn")  # names early Phi-3 configs gave longrope; the reference reads them as longrope


class Phi3Config(LlamaConfig):
    model_type = "phi3"
    defaults = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=None, head_dim=None, resid_pdrop=0.0,
                    embd_pdrop=0.0, attention_dropout=0.0, hidden_act="silu", max_position_embeddings=4096,
                    original_max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-5,
                    use_cache=True, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
                    pad_token_id=32000, sliding_window=None)
    field_types = {**LlamaConfig.field_types, "sliding_window": (int, None), "partial_rotary_factor": (float, None)}

    def __post_init__(self) -> None:
        super().__post_init__()
        key = "rope_parameters" if getattr(self, "rope_parameters", None) is not None else "rope_scaling"
        params = {k: v for k, v in getattr(self, key).items() if k != "type"}
        kind = getattr(self, key).get("rope_type", getattr(self, key).get("type", "default"))
        kind = "longrope" if kind in LEGACY_LONGROPE else kind
        if kind not in ROPE_TYPES:
            where = f"{self._name_or_path}: " if self._name_or_path else ""
            raise ConfigFieldError(f"{where}config {key}['rope_type']={kind!r} is not supported by Phi-3 (the "
                                   f"reference's Phi-3 takes {', '.join(map(repr, ROPE_TYPES))}); fix config.json",
                                   key)
        self.rope_parameters = {**params, "rope_type": kind}


class Phi3Attention(LlamaAttention):
    q_bias = k_bias = v_bias = o_bias = False
    qkv_name = "qkv_proj"

    def project(self, x):
        B, T, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split((q_size, kv_size, kv_size), -1)  # all query heads, then keys, then values
        return tuple(t.view(B, T, -1, self.head_dim) for t in (q, k, v))  # (B, T, heads, D)


class Phi3MLP(nn.Module):
    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.activation_fn = activation(config.hidden_act)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, -1)  # the gate rows come first
        return self.down_proj(up * self.activation_fn(gate))


class Phi3DecoderLayer(LlamaDecoderLayer):
    attention_class = Phi3Attention

    def __init__(self, config: Phi3Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_mlp_dropout = nn.Dropout(config.resid_pdrop)

    def make_mlp(self, config: Phi3Config, layer_idx: int) -> nn.Module:
        return Phi3MLP(config)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, cache_position=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, cache_position)
        x = x + self.resid_attn_dropout(attn)
        return x + self.resid_mlp_dropout(self.mlp(self.post_attention_layernorm(x)))


class Phi3PreTrainedModel(LlamaPreTrainedModel):
    config_class = Phi3Config
    _no_split_modules = ["Phi3DecoderLayer"]
    # A colwise shard of a fused [q; k; v] or [gate; up] weight would give one rank the queries and another the
    # values, so these outputs are gathered (every rank then splits the whole tensor) and the next projection
    # takes its rows from the replicated input, as in the reference's plan.
    _tp_plan = {
        "model.embed_tokens": "embedding",
        "model.layers.*.self_attn.qkv_proj": "colwise_rep",
        "model.layers.*.self_attn.o_proj": "rowwise_rep",
        "model.layers.*.mlp.gate_up_proj": "colwise_rep",
        "model.layers.*.mlp.down_proj": "rowwise_rep",
        "lm_head": "colwise_rep",
    }


class Phi3Model(Phi3PreTrainedModel, LlamaModel):
    layer_class = Phi3DecoderLayer

    def layer_windows(self) -> list[int | None]:
        return [self.config.sliding_window] * self.config.num_hidden_layers


class Phi3ForCausalLM(Phi3PreTrainedModel, LlamaForCausalLM):
    model_class = Phi3Model

    @property
    def cache_restart_length(self) -> int | None:
        """generate drops its cache and re-reads the sequence when it grows past this many positions (loom's
        Decoder reads it). The reference does so for every Phi-3 config, whatever its rope_type."""
        return self.config.original_max_position_embeddings


class Phi3ForSequenceClassification(Phi3PreTrainedModel, LlamaForSequenceClassification):
    model_class = Phi3Model


class Phi3ForTokenClassification(TokenClassificationHead, Phi3PreTrainedModel):
    model_class = Phi3Model


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"phi3": (Phi3Config, {
    "base": Phi3Model, "causal-lm": Phi3ForCausalLM, "sequence-classification": Phi3ForSequenceClassification,
    "token-classification": Phi3ForTokenClassification})}
