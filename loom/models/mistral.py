"""Mistral = Llama + sliding-window attention (config.sliding_window; None disables it)."""
from __future__ import annotations

from loom.models.heads import QuestionAnsweringHead, TokenClassificationHead
from loom.models.llama import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel,
                               LlamaPreTrainedModel)


class MistralConfig(LlamaConfig):
    model_type = "mistral"
    defaults = {**LlamaConfig.defaults, "vocab_size": 32000, "intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "sliding_window": 4096,
                "rope_theta": 10000.0}
    field_types = {**LlamaConfig.field_types, "sliding_window": (int, None)}


class MistralModel(LlamaModel):
    config_class = MistralConfig

    def layer_windows(self) -> list[int | None]:
        return [self.config.sliding_window] * self.config.num_hidden_layers


class MistralForCausalLM(LlamaForCausalLM):
    config_class = MistralConfig
    model_class = MistralModel


class MistralForSequenceClassification(LlamaForSequenceClassification):
    config_class = MistralConfig
    model_class = MistralModel


class MistralForTokenClassification(TokenClassificationHead, LlamaPreTrainedModel):
    config_class = MistralConfig
    model_class = MistralModel


class MistralForQuestionAnswering(QuestionAnsweringHead, LlamaPreTrainedModel):
    config_class = MistralConfig
    model_class = MistralModel


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"mistral": (MistralConfig, {
    "base": MistralModel, "causal-lm": MistralForCausalLM, "sequence-classification":
    MistralForSequenceClassification,
    "token-classification": MistralForTokenClassification, "question-answering": MistralForQuestionAnswering})}
