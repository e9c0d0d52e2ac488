"""Gemma 2 = Gemma with a norm before and after both attention and MLP (sandwich blocks), queries scaled by
`query_pre_attn_scalar` ** -0.5, soft-capped attention scores (`attn_logit_softcapping`) and logits
(`final_logit_softcapping`), sliding-window and global layers alternating (`layer_types`, `sliding_window`), and the
activation under `hidden_activation`. Eager attention by default, as the reference (its SDPA path cannot soft-cap)."""
from __future__ import annotations

from typing import ClassVar

import torch

from loom.models.common import check_layer_types
from loom.models.gemma import (GemmaConfig, GemmaDecoderLayer, GemmaForCausalLM, GemmaForSequenceClassification,
                               GemmaModel, GemmaPreTrainedModel, GemmaRMSNorm, config_where)
from loom.models.heads import TokenClassificationHead
from loom.models.llama import LlamaAttention


class Gemma2Config(GemmaConfig):
    model_type = "gemma2"
    defaults = {**{k: v for k, v in GemmaConfig.defaults.items() if k != "hidden_act"},
                "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
                "num_key_value_heads": 4, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
                "sliding_window": 4096, "layer_types": None, "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": 50.0}
    field_types = {**GemmaConfig.field_types, "sliding_window": (int, None), "layer_types": (list, None),
                   "final_logit_softcapping": (float, None), "attn_logit_softcapping": (float, None)}
    activation_key = "hidden_activation"
    eager_by_default: ClassVar[bool] = True  # the reference has no SDPA path for Gemma 2, so eager is its default

    def __post_init__(self) -> None:
        if self.layer_types is None:  # sliding first, then every other layer global
            self.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if self._attn_implementation is None and self.eager_by_default:
            self._attn_implementation = "eager"
        super().__post_init__()
        check_layer_types(self)


class Gemma2Attention(LlamaAttention):
    def __init__(self, config: Gemma2Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.scaling = config.query_pre_attn_scalar ** -0.5
        self.softcap = config.attn_logit_softcapping


class Gemma2DecoderLayer(GemmaDecoderLayer):
    """x + post_norm(attention(pre_norm(x))), then the same around the MLP."""
    attention_class = Gemma2Attention

    def __init__(self, config: Gemma2Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, cache_position=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, cache_position)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2PreTrainedModel(GemmaPreTrainedModel):
    config_class = Gemma2Config
    _no_split_modules = ["Gemma2DecoderLayer"]


class Gemma2Model(Gemma2PreTrainedModel, GemmaModel):
    layer_class = Gemma2DecoderLayer

    def layer_windows(self) -> list[int | None]:
        config = self.config
        if config.sliding_window is None and "sliding_attention" in config.layer_types:
            raise ValueError(f"{config_where(config)}config layer_types has sliding_attention layers but "
                             "sliding_window is null; set sliding_window (the window those layers attend over) or "
                             "make them full_attention")
        return super().layer_windows()


class Gemma2ForCausalLM(Gemma2PreTrainedModel, GemmaForCausalLM):
    model_class = Gemma2Model

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma2ForSequenceClassification(Gemma2PreTrainedModel, GemmaForSequenceClassification):
    model_class = Gemma2Model


class Gemma2ForTokenClassification(TokenClassificationHead, Gemma2PreTrainedModel):
    model_class = Gemma2Model


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"gemma2": (Gemma2Config, {
    "base": Gemma2Model, "causal-lm": Gemma2ForCausalLM, "sequence-classification": Gemma2ForSequenceClassification,
    "token-classification": Gemma2ForTokenClassification})}
