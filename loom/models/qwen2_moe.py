"""Qwen2-MoE = Qwen2 whose feed-forward is, on most layers, routed experts plus a shared expert that every token
goes through, scaled by sigmoid(`shared_expert_gate`). Layers listed in `mlp_only_layers`, or off the
`decoder_sparse_step` rhythm, keep a dense MLP of `intermediate_size`; experts use `moe_intermediate_size`. Module
names are the checkpoints' (`mlp.gate`, `mlp.experts.N.*`, `mlp.shared_expert.*`, `mlp.shared_expert_gate`); q/k/v
biases follow `qkv_bias`; top-k weights are renormalised only with `norm_topk_prob`."""
from __future__ import annotations

from torch import nn

from loom.models.heads import QuestionAnsweringHead, TokenClassificationHead
from loom.models.llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaForSequenceClassification,
                               LlamaMLP, LlamaPreTrainedModel)
from loom.models.moe import AuxLossCausalLM, RouterLogitsModel, SparseMoE, check_top_k, mlp_tp_plan
from loom.models.qwen2 import Qwen2Config, Qwen2Model

MOE_DEFAULTS = dict(decoder_sparse_step=1, num_experts_per_tok=4, norm_topk_prob=False, output_router_logits=False,
                    router_aux_loss_coef=0.001, mlp_only_layers=None)


class Qwen2MoeConfig(Qwen2Config):
    model_type = "qwen2_moe"
    defaults = {**Qwen2Config.defaults, **MOE_DEFAULTS, "hidden_size": 2048, "intermediate_size": 5632,
                "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
                "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts": 60,
                "qkv_bias": True}
    field_types = {**Qwen2Config.field_types, "mlp_only_layers": (list[int], None)}

    def __post_init__(self) -> None:
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []
        if self.layer_types is None:  # this family's rule (not Qwen2's): even layers below max_window_layers
            self.layer_types = ["sliding_attention" if self.use_sliding_window and i % 2 == 0
                                and i < self.max_window_layers else "full_attention"
                                for i in range(self.num_hidden_layers)]
        super().__post_init__()


class Qwen2MoeAttention(LlamaAttention):
    o_bias = False

    def __init__(self, config: Qwen2MoeConfig, layer_idx: int) -> None:
        self.q_bias = self.k_bias = self.v_bias = config.qkv_bias  # read when the projections are built
        super().__init__(config, layer_idx)


class Qwen2MoeSparseMoeBlock(SparseMoE):
    def __init__(self, config: Qwen2MoeConfig) -> None:
        experts = [LlamaMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)]
        super().__init__(config.hidden_size, experts, config.num_experts_per_tok, config.norm_topk_prob,
                         weights_in_logits_dtype=True)
        self.shared_expert = LlamaMLP(config, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen2MoeAttention
    moe_class = Qwen2MoeSparseMoeBlock
    experts_key = "num_experts"

    def make_mlp(self, config: Qwen2MoeConfig, layer_idx: int) -> nn.Module:
        if (layer_idx in config.mlp_only_layers or config.num_experts <= 0
                or (layer_idx + 1) % config.decoder_sparse_step):
            return LlamaMLP(config, config.intermediate_size)
        check_top_k(config, self.experts_key)
        return self.moe_class(config)


class Qwen2MoePreTrainedModel(LlamaPreTrainedModel):
    config_class = Qwen2MoeConfig
    _no_split_modules = ["Qwen2MoeDecoderLayer"]
    _config_dims = {r"\.mlp\.gate\.weight$": (0, "num_experts", "experts")}
    _tp_plan = {**LlamaPreTrainedModel._tp_plan, **mlp_tp_plan("model.layers.*.mlp.experts.*"),
                **mlp_tp_plan("model.layers.*.mlp.shared_expert")}


class Qwen2MoeModel(RouterLogitsModel, Qwen2MoePreTrainedModel, Qwen2Model):
    layer_class = Qwen2MoeDecoderLayer


class Qwen2MoeForCausalLM(AuxLossCausalLM, Qwen2MoePreTrainedModel, LlamaForCausalLM):
    model_class = Qwen2MoeModel


class Qwen2MoeForSequenceClassification(Qwen2MoePreTrainedModel, LlamaForSequenceClassification):
    model_class = Qwen2MoeModel


class Qwen2MoeForTokenClassification(TokenClassificationHead, Qwen2MoePreTrainedModel):
    model_class = Qwen2MoeModel


class Qwen2MoeForQuestionAnswering(QuestionAnsweringHead, Qwen2MoePreTrainedModel):
    model_class = Qwen2MoeModel


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"qwen2_moe": (Qwen2MoeConfig, {
    "base": Qwen2MoeModel, "causal-lm": Qwen2MoeForCausalLM,
    "sequence-classification": Qwen2MoeForSequenceClassification,
    "token-classification": Qwen2MoeForTokenClassification, "question-answering": Qwen2MoeForQuestionAnswering})}
