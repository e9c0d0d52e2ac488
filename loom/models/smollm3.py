"""SmolLM3 = Llama with RoPE left out on some layers (NoPE: `no_rope_layers`, by default every
`no_rope_layer_interval`-th layer) and, with `use_sliding_window`, a sliding window on those NoPE layers (or as
`layer_types` says). Tied embeddings and rope_theta 2e6 by default."""
from __future__ import annotations

from loom.configuration import ConfigFieldError
from loom.models.common import check_activation, check_layer_types
from loom.models.heads import QuestionAnsweringHead, TokenClassificationHead
from loom.models.llama import (LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM,
                               LlamaForSequenceClassification, LlamaModel, LlamaPreTrainedModel)


class SmolLM3Config(LlamaConfig):
    model_type = "smollm3"
    defaults = {**LlamaConfig.defaults, "vocab_size": 128256, "hidden_size": 2048, "num_hidden_layers": 36,
                "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                "pad_token_id": 128004, "bos_token_id": 128000, "eos_token_id": 128001, "rope_theta": 2000000.0,
                "use_sliding_window": False, "sliding_window": None, "no_rope_layers": None,
                "no_rope_layer_interval": 4, "layer_types": None, "tie_word_embeddings": True}
    field_types = {**LlamaConfig.field_types, "sliding_window": (int, None), "no_rope_layers": (list, None),
                   "layer_types": (list, None)}

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_hidden_layers
        if self.no_rope_layers is None:  # 1 = RoPE, 0 = NoPE, as the reference
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(n)]
        # the reference reads one entry per layer and documents "at least" that many, so longer lists load
        if len(self.no_rope_layers) < n or any(v not in (0, 1) for v in self.no_rope_layers):
            raise ConfigFieldError(f"config no_rope_layers={self.no_rope_layers!r} must hold a 1 (RoPE) or 0 (NoPE) "
                                   f"for each of the num_hidden_layers={n} layers; fix config.json", "no_rope_layers")
        if self.layer_types is None:
            window = self.use_sliding_window and self.sliding_window is not None
            self.layer_types = ["sliding_attention" if window and not self.no_rope_layers[i] else "full_attention"
                                for i in range(n)]
        check_layer_types(self)
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ConfigFieldError("config layer_types names sliding_attention layers but sliding_window is null; "
                                   "set sliding_window to the window length, or make those layers full_attention",
                                   "layer_types")
        check_activation(self)


class SmolLM3Attention(LlamaAttention):
    def __init__(self, config: SmolLM3Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.use_rope = bool(config.no_rope_layers[layer_idx])


class SmolLM3DecoderLayer(LlamaDecoderLayer):
    attention_class = SmolLM3Attention


class SmolLM3Model(LlamaModel):
    """Layer windows follow `layer_types` (the base's rule for families that have them)."""
    config_class = SmolLM3Config
    layer_class = SmolLM3DecoderLayer


class SmolLM3ForCausalLM(LlamaForCausalLM):
    config_class = SmolLM3Config
    model_class = SmolLM3Model


class SmolLM3ForSequenceClassification(LlamaForSequenceClassification):
    config_class = SmolLM3Config
    model_class = SmolLM3Model


class SmolLM3ForTokenClassification(TokenClassificationHead, LlamaPreTrainedModel):
    config_class = SmolLM3Config
    model_class = SmolLM3Model


class SmolLM3ForQuestionAnswering(QuestionAnsweringHead, LlamaPreTrainedModel):
    config_class = SmolLM3Config
    model_class = SmolLM3Model
    base_model_prefix = "transformer"  # the reference's name for this head's base model


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"smollm3": (SmolLM3Config, {
    "base": SmolLM3Model, "causal-lm": SmolLM3ForCausalLM, "sequence-classification":
    SmolLM3ForSequenceClassification,
    "token-classification": SmolLM3ForTokenClassification, "question-answering": SmolLM3ForQuestionAnswering})}
