"""Qwen2 = Llama with biases on the q/k/v projections (none on o_proj) and an optional sliding window on the layers
from `max_window_layers` on (or as `layer_types` says)."""
from __future__ import annotations

from loom.models.common import check_layer_types
from loom.models.heads import QuestionAnsweringHead, TokenClassificationHead
from loom.models.llama import (LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM,
                               LlamaForSequenceClassification, LlamaModel, LlamaPreTrainedModel)


class Qwen2Config(LlamaConfig):
    model_type = "qwen2"
    defaults = {**LlamaConfig.defaults, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
                "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
                "max_window_layers": 28, "layer_types": None, "bos_token_id": None, "eos_token_id": None}
    field_types = {**LlamaConfig.field_types, "sliding_window": (int, None), "layer_types": (list, None)}

    def __post_init__(self) -> None:
        super().__post_init__()
        # as the reference: the window applies only with use_sliding_window, to the layers from max_window_layers on
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                                else "full_attention" for i in range(self.num_hidden_layers)]
        check_layer_types(self)


class Qwen2Attention(LlamaAttention):
    q_bias = k_bias = v_bias = True
    o_bias = False


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen2Attention


class Qwen2Model(LlamaModel):
    config_class = Qwen2Config
    layer_class = Qwen2DecoderLayer


class Qwen2ForCausalLM(LlamaForCausalLM):
    config_class = Qwen2Config
    model_class = Qwen2Model


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    config_class = Qwen2Config
    model_class = Qwen2Model


class Qwen2ForTokenClassification(TokenClassificationHead, LlamaPreTrainedModel):
    config_class = Qwen2Config
    model_class = Qwen2Model


class Qwen2ForQuestionAnswering(QuestionAnsweringHead, LlamaPreTrainedModel):
    config_class = Qwen2Config
    model_class = Qwen2Model
    base_model_prefix = "transformer"  # the reference's name for this head's base model


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"qwen2": (Qwen2Config, {
    "base": Qwen2Model, "causal-lm": Qwen2ForCausalLM, "sequence-classification": Qwen2ForSequenceClassification,
    "token-classification": Qwen2ForTokenClassification, "question-answering": Qwen2ForQuestionAnswering})}
