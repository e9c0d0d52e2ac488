"""Qwen3 = Qwen2 without the q/k/v biases, with an RMSNorm over each head of the queries and keys before RoPE and
an explicit head_dim (128 by default, not hidden_size / heads)."""
from __future__ import annotations

from loom.models.common import RMSNorm
from loom.models.heads import QuestionAnsweringHead, TokenClassificationHead
from loom.models.llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaForSequenceClassification,
                               LlamaPreTrainedModel)
from loom.models.qwen2 import Qwen2Config, Qwen2Model


class Qwen3Config(Qwen2Config):
    model_type = "qwen3"
    defaults = {**Qwen2Config.defaults, "head_dim": 128}


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen3Attention


class Qwen3Model(Qwen2Model):
    config_class = Qwen3Config
    layer_class = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    config_class = Qwen3Config
    model_class = Qwen3Model


class Qwen3ForSequenceClassification(LlamaForSequenceClassification):
    config_class = Qwen3Config
    model_class = Qwen3Model


class Qwen3ForTokenClassification(TokenClassificationHead, LlamaPreTrainedModel):
    config_class = Qwen3Config
    model_class = Qwen3Model


class Qwen3ForQuestionAnswering(QuestionAnsweringHead, LlamaPreTrainedModel):
    config_class = Qwen3Config
    model_class = Qwen3Model
    base_model_prefix = "transformer"  # the reference's name for this head's base model


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"qwen3": (Qwen3Config, {
    "base": Qwen3Model, "causal-lm": Qwen3ForCausalLM, "sequence-classification": Qwen3ForSequenceClassification,
    "token-classification": Qwen3ForTokenClassification, "question-answering": Qwen3ForQuestionAnswering})}
