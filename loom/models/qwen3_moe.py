"""Qwen3-MoE = Qwen2-MoE without the shared expert and the q/k/v biases (`attention_bias` sets all four), with
Qwen3's per-head q/k norms, and a sliding window (with `use_sliding_window`) on every layer. The expert count is
`num_experts` in the Hub's config.json files, `num_local_experts` in the reference's; both are read."""
from __future__ import annotations

from loom.models.heads import QuestionAnsweringHead, TokenClassificationHead
from loom.models.llama import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaMLP
from loom.models.moe import AuxLossCausalLM, SparseMoE
from loom.models.qwen2_moe import MOE_DEFAULTS, Qwen2MoeDecoderLayer, Qwen2MoeModel, Qwen2MoePreTrainedModel
from loom.models.qwen3 import Qwen3Attention


class Qwen3MoeConfig(LlamaConfig):
    model_type = "qwen3_moe"
    attribute_map = {"num_experts": "num_local_experts"}
    defaults = {**LlamaConfig.defaults, **MOE_DEFAULTS, "vocab_size": 151936, "hidden_size": 2048,
                "intermediate_size": 6144, "num_hidden_layers": 24, "num_key_value_heads": 4,
                "max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
                "use_sliding_window": False, "sliding_window": 4096, "moe_intermediate_size": 768,
                "num_experts_per_tok": 8, "num_local_experts": 128}
    field_types = {**LlamaConfig.field_types, "sliding_window": (int, None), "mlp_only_layers": (list[int], None)}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []


class Qwen3MoeSparseMoeBlock(SparseMoE):
    def __init__(self, config: Qwen3MoeConfig) -> None:
        experts = [LlamaMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)]
        super().__init__(config.hidden_size, experts, config.num_experts_per_tok, config.norm_topk_prob,
                         weights_in_logits_dtype=True)


class Qwen3MoeDecoderLayer(Qwen2MoeDecoderLayer):
    attention_class = Qwen3Attention
    moe_class = Qwen3MoeSparseMoeBlock


class Qwen3MoePreTrainedModel(Qwen2MoePreTrainedModel):
    config_class = Qwen3MoeConfig
    _no_split_modules = ["Qwen3MoeDecoderLayer"]
    _tp_plan = {k: v for k, v in Qwen2MoePreTrainedModel._tp_plan.items() if "shared_expert" not in k}


class Qwen3MoeModel(Qwen3MoePreTrainedModel, Qwen2MoeModel):
    layer_class = Qwen3MoeDecoderLayer

    def layer_windows(self) -> list[int | None]:
        return [self.config.sliding_window] * self.config.num_hidden_layers


class Qwen3MoeForCausalLM(AuxLossCausalLM, Qwen3MoePreTrainedModel, LlamaForCausalLM):
    model_class = Qwen3MoeModel


class Qwen3MoeForSequenceClassification(Qwen3MoePreTrainedModel, LlamaForSequenceClassification):
    model_class = Qwen3MoeModel


class Qwen3MoeForTokenClassification(TokenClassificationHead, Qwen3MoePreTrainedModel):
    model_class = Qwen3MoeModel


class Qwen3MoeForQuestionAnswering(QuestionAnsweringHead, Qwen3MoePreTrainedModel):
    model_class = Qwen3MoeModel
    base_model_prefix = "transformer"  # the reference's name for this head's base model


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"qwen3_moe": (Qwen3MoeConfig, {
    "base": Qwen3MoeModel, "causal-lm": Qwen3MoeForCausalLM,
    "sequence-classification": Qwen3MoeForSequenceClassification,
    "token-classification": Qwen3MoeForTokenClassification, "question-answering": Qwen3MoeForQuestionAnswering})}
