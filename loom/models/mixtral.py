"""Mixtral = Mistral whose feed-forward is a sparse mixture of experts. Module names are the Hub checkpoints' (and
what the reference's save_pretrained writes): `block_sparse_moe.gate` (the router) and
`block_sparse_moe.experts.N.w1/w2/w3`. The top-k weights are always renormalised and stay in float32; in training
`router_jitter_noise` scales the block's input by random noise."""
from __future__ import annotations

from torch import nn

from loom.models.common import activation
from loom.models.heads import QuestionAnsweringHead, TokenClassificationHead
from loom.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaForSequenceClassification, LlamaPreTrainedModel
from loom.models.mistral import MistralConfig, MistralModel
from loom.models.moe import AuxLossCausalLM, RouterLogitsModel, SparseMoE, check_top_k, mlp_tp_plan


class MixtralConfig(MistralConfig):
    model_type = "mixtral"
    attribute_map = {"num_experts": "num_local_experts"}
    defaults = {**MistralConfig.defaults, "rms_norm_eps": 1e-5, "sliding_window": None, "rope_theta": 1e6,
                "num_experts_per_tok": 2, "num_local_experts": 8, "output_router_logits": False,
                "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0}


class MixtralExpert(nn.Module):
    """One expert: w2(act(w1 x) * w3 x)."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.w1 = nn.Linear(h, i, bias=False)
        self.w2 = nn.Linear(i, h, bias=False)
        self.w3 = nn.Linear(h, i, bias=False)
        self.act_fn = activation(config.hidden_act)

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class MixtralDecoderLayer(LlamaDecoderLayer):
    mlp_name = "block_sparse_moe"

    def make_mlp(self, config: MixtralConfig, layer_idx: int) -> nn.Module:
        check_top_k(config, "num_local_experts")
        experts = [MixtralExpert(config) for _ in range(config.num_local_experts)]
        return SparseMoE(config.hidden_size, experts, config.num_experts_per_tok, normalize=True,
                         weights_in_logits_dtype=False, jitter_noise=config.router_jitter_noise,
                         linear_names=("w1", "w3", "w2"))


class MixtralPreTrainedModel(LlamaPreTrainedModel):
    config_class = MixtralConfig
    _no_split_modules = ["MixtralDecoderLayer"]
    _config_dims = {r"block_sparse_moe\.gate\.weight$": (0, "num_local_experts", "experts")}
    _tp_plan = {**{k: v for k, v in LlamaPreTrainedModel._tp_plan.items() if ".mlp." not in k},
                **mlp_tp_plan("model.layers.*.block_sparse_moe.experts.*", ("w1", "w3"), ("w2",))}


class MixtralModel(RouterLogitsModel, MixtralPreTrainedModel, MistralModel):
    layer_class = MixtralDecoderLayer


class MixtralForCausalLM(AuxLossCausalLM, MixtralPreTrainedModel, LlamaForCausalLM):
    model_class = MixtralModel


class MixtralForSequenceClassification(MixtralPreTrainedModel, LlamaForSequenceClassification):
    model_class = MixtralModel


class MixtralForTokenClassification(TokenClassificationHead, MixtralPreTrainedModel):
    model_class = MixtralModel


class MixtralForQuestionAnswering(QuestionAnsweringHead, MixtralPreTrainedModel):
    model_class = MixtralModel


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"mixtral": (MixtralConfig, {
    "base": MixtralModel, "causal-lm": MixtralForCausalLM,
    "sequence-classification": MixtralForSequenceClassification,
    "token-classification": MixtralForTokenClassification, "question-answering": MixtralForQuestionAnswering})}
