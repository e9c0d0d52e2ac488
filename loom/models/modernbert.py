"""ModernBERT: a pre-norm encoder without biases (by default) that alternates global attention with local attention
over a bidirectional window of +-local_attention/2 tokens, rotates queries and keys with RoPE (one base for global
layers, another for local ones), and runs a GeGLU MLP; plus its masked-LM, classification and QA heads.

The reference unpads batches only for flash attention; its SDPA/eager path (which loom matches) attends over the
padded batch with padding keys masked."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loom.configuration import TOKEN_ID_TYPES, ConfigFieldError, PretrainedConfig
from loom.modeling import PreTrainedModel
from loom.models.bert import Dropout
from loom.models.common import activation, attention, attention_mask_for, check_activation, check_inputs, \
    check_layer_types, classification_loss, maybe_checkpoint, recording_attentions, span_outputs, token_loss
from loom.models.rope import RotaryEmbedding, apply_rotary
from loom.outputs import ModelOutput


class ModernBertConfig(PretrainedConfig):
    model_type = "modernbert"
    defaults = dict(vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
                    num_attention_heads=12, hidden_activation="gelu", max_position_embeddings=8192,
                    initializer_range=0.02, initializer_cutoff_factor=2.0, norm_eps=1e-5, norm_bias=False,
                    pad_token_id=50283, eos_token_id=50282, bos_token_id=50281, cls_token_id=50281,
                    sep_token_id=50282, attention_bias=False, attention_dropout=0.0, layer_types=None,
                    rope_parameters=None, local_attention=128, embedding_dropout=0.0, mlp_bias=False,
                    mlp_dropout=0.0, decoder_bias=True, classifier_pooling="cls", classifier_dropout=0.0,
                    classifier_bias=False, classifier_activation="gelu", deterministic_flash_attn=False,
                    sparse_prediction=False, sparse_pred_ignore_index=-100, tie_word_embeddings=True,
                    use_cache=False)
    field_types = {**TOKEN_ID_TYPES, "cls_token_id": (int, None), "sep_token_id": (int, None),
                   "layer_types": (list, None), "rope_parameters": (dict, None), "initializer_cutoff_factor":
                   (float, None), "global_attn_every_n_layers": (int,), "global_rope_theta": (float,),
                   "local_rope_theta": (float,)}

    def __post_init__(self) -> None:
        if self.layer_types is None:  # legacy configs: layer 0 and every n-th after it attend globally
            every = self.__dict__.get("global_attn_every_n_layers", 3)
            if every < 1:
                raise ConfigFieldError(f"config global_attn_every_n_layers={every} must be at least 1",
                                       "global_attn_every_n_layers")
            self.layer_types = ["sliding_attention" if i % every else "full_attention"
                                for i in range(self.num_hidden_layers)]
        check_layer_types(self)
        self.rope_parameters = self._per_layer_type_rope()
        if self.classifier_pooling not in ("cls", "mean"):
            raise ConfigFieldError(f"config classifier_pooling={self.classifier_pooling!r} is not supported; use "
                                   "'cls' or 'mean'", "classifier_pooling")
        check_activation(self, "hidden_activation")
        check_activation(self, "classifier_activation")

    def _per_layer_type_rope(self) -> dict:
        """{"full_attention": ..., "sliding_attention": ...} from 5.x rope_parameters or the legacy global_rope_theta,
        local_rope_theta and rope_scaling keys (folded in and dropped, as the reference does; scaling applies to
        both layer types)."""
        legacy = {k: self.__dict__.pop(k, None) for k in ("global_rope_theta", "local_rope_theta", "rope_scaling")}
        rope = dict(self.rope_parameters or {})
        scaling = legacy["rope_scaling"] or {}
        full = {**(rope.get("full_attention") or {"rope_type": "default"}), **scaling}
        full.setdefault("rope_theta", legacy["global_rope_theta"] or 160_000.0)
        local = {**(rope.get("sliding_attention") or {"rope_type": "default"}), **scaling}
        local.setdefault("rope_theta", legacy["local_rope_theta"] or 10_000.0)
        return {**rope, "full_attention": full, "sliding_attention": local}


def _layer_norm(config: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


def _init_as(module: nn.Module, role: str) -> nn.Module:
    """Mark a Linear or Embedding with its initialisation role ("in", "out", "embedding", "final_out"): the reference
    draws each role from a truncated normal of its own width (`ModernBertPreTrainedModel._init_weights`)."""
    module.init_role = role
    return module


class ModernBertEmbeddings(nn.Module):
    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.tok_embeddings = _init_as(nn.Embedding(config.vocab_size, config.hidden_size,
                                                    padding_idx=config.pad_token_id), "embedding")
        self.norm = _layer_norm(config)
        self.drop = Dropout(config.embedding_dropout)

    def forward(self, input_ids, inputs_embeds=None):
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        return self.drop(self.norm(x))


class ModernBertMLP(nn.Module):
    """GeGLU: one fused input projection split into (input, gate) halves, act(input) * gate, then the output."""

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.Wi = _init_as(nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias), "in")
        self.act = activation(config.hidden_activation)
        self.drop = Dropout(config.mlp_dropout)
        self.Wo = _init_as(nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias), "out")

    def forward(self, x):
        h, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.drop(self.act(h) * gate))


class ModernBertAttention(nn.Module):
    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"config hidden_size={config.hidden_size} is not a multiple of num_attention_heads="
                             f"{config.num_attention_heads}")
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.Wqkv = _init_as(nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias), "in")
        self.Wo = _init_as(nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias), "out")
        self.dropout = config.attention_dropout
        self.out_drop = Dropout(config.attention_dropout)

    def forward(self, x, rope, mask):
        B, T, _ = x.shape
        q, k, v = self.Wqkv(x).view(B, T, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        # rotated in float32 whatever the activations' dtype, as the reference does
        q, k = (t.to(v.dtype) for t in apply_rotary(q.float(), k.float(), *rope))
        out = attention(q, k, v, mask, False, implementation=self.config._attn_implementation,
                        dropout=self.dropout if self.training else 0.0)
        return self.out_drop(self.Wo(out.transpose(1, 2).reshape(B, T, -1)))


class ModernBertEncoderLayer(nn.Module):
    def __init__(self, config: ModernBertConfig, layer_idx: int) -> None:
        super().__init__()
        # the embeddings end in a norm, so the first layer's attention reads them as they are
        self.attn_norm = nn.Identity() if layer_idx == 0 else _layer_norm(config)
        self.attn = ModernBertAttention(config)
        self.mlp_norm = _layer_norm(config)
        self.mlp = ModernBertMLP(config)
        self.attention_type = config.layer_types[layer_idx]

    def forward(self, x, rope, mask):
        x = x + self.attn(self.attn_norm(x), rope, mask)
        return x + self.mlp(self.mlp_norm(x))


def window_mask(attention_mask: torch.Tensor | None, T: int, half_window: int, device) -> torch.Tensor | None:
    """Boolean SDPA mask (B|1, 1, T, T) for local layers: query i sees key j when |i - j| <= half_window and j is a
    real token. None when the window cannot bind and there is no padding."""
    if T <= half_window + 1:
        return attention_mask_for(attention_mask, T, 0, T, causal=False, device=device)[0]
    pos = torch.arange(T, device=device)
    allowed = ((pos[:, None] - pos[None, :]).abs() <= half_window)[None, None]  # (1, 1, T, T)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return allowed


class ModernBertPreTrainedModel(PreTrainedModel):
    config_class = ModernBertConfig
    base_model_prefix = "model"
    _no_split_modules = ["ModernBertEmbeddings", "ModernBertEncoderLayer"]
    # Wqkv packs q|k|v and Wi input|gate in their output rows: each rank takes its share of every block
    _tp_plan = {
        "model.layers.*.attn.Wqkv": "packed_colwise:3",
        "model.layers.*.attn.Wo": "rowwise",
        "model.layers.*.mlp.Wi": "packed_colwise:2",
        "model.layers.*.mlp.Wo": "rowwise",
    }

    def _init_weights(self, module: nn.Module) -> None:
        role = getattr(module, "init_role", None)
        if role is None:
            return super()._init_weights(module)
        c = self.config
        std = {"in": c.initializer_range, "embedding": c.initializer_range, "final_out": c.hidden_size ** -0.5,
               "out": c.initializer_range / math.sqrt(2.0 * c.num_hidden_layers)}[role]
        cutoff = (c.initializer_cutoff_factor or 3.0) * std
        nn.init.trunc_normal_(module.weight.data, 0.0, std, -cutoff, cutoff)
        if getattr(module, "bias", None) is not None:
            module.bias.data.zero_()


class ModernBertModel(ModernBertPreTrainedModel):
    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__(config)
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(ModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = _layer_norm(config)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = nn.ModuleDict({kind: RotaryEmbedding(config, head_dim, params=config.rope_parameters[kind])
                                         for kind in sorted(set(config.layer_types))})
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.tok_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.tok_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                output_hidden_states=None, return_dict=None, output_attentions=None, **_):
        check_inputs(input_ids, inputs_embeds)
        x = self.embeddings(input_ids, inputs_embeds)
        T = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device)[None]
        masks = {"full_attention": attention_mask_for(attention_mask, T, 0, T, causal=False, device=x.device)[0],
                 "sliding_attention": window_mask(attention_mask, T, self.config.local_attention // 2, x.device)}
        ropes = {kind: rotary(position_ids, torch.float32) for kind, rotary in self.rotary_emb.items()}
        hidden = [x] if output_hidden_states else None
        with recording_attentions(self.config, output_attentions) as attentions:
            for layer in self.layers:
                kind = layer.attention_type
                x = maybe_checkpoint(layer, self.gradient_checkpointing, x, ropes[kind], masks[kind])
                if hidden is not None:
                    hidden.append(x)
        x = self.final_norm(x)
        if hidden is not None:
            hidden[-1] = x  # the reference reports the last layer's output after the final norm
        return ModelOutput(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None,
                           attentions=tuple(attentions) if attentions is not None else None)


class ModernBertPredictionHead(nn.Module):
    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.dense = _init_as(nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias), "out")
        self.act = activation(config.classifier_activation)
        self.norm = _layer_norm(config)

    def forward(self, h):
        return self.norm(self.act(self.dense(h)))


class ModernBertForMaskedLM(ModernBertPreTrainedModel):
    _tied_weights_keys = {"decoder.weight": "model.embeddings.tok_embeddings.weight"}

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__(config)
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.decoder = _init_as(nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias), "out")
        self.post_init()

    def get_output_embeddings(self):
        return self.decoder

    def set_output_embeddings(self, value):
        self.decoder = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_hidden_states=None, return_dict=None, output_attentions=None, **_):
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states,
                         output_attentions=output_attentions)
        h = out.last_hidden_state
        if self.config.sparse_prediction and labels is not None:
            # the reference's sparse prediction: logits (and the loss) for the labelled tokens only, flattened
            labels = labels.reshape(-1)
            keep = labels != self.config.sparse_pred_ignore_index
            h, labels = h.reshape(labels.shape[0], -1)[keep], labels[keep]
        logits = self.decoder(self.head(h))
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class _ModernBertWithHead(ModernBertPreTrainedModel):
    """Shared body of the classification-style heads: ModernBERT, its prediction head, dropout, one Linear."""

    num_outputs = None  # default: config.num_labels

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__(config)
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.drop = Dropout(config.classifier_dropout)
        self.classifier = _init_as(nn.Linear(config.hidden_size, self.num_outputs or config.num_labels), "final_out")
        self.post_init()

    def scores(self, h):
        return self.classifier(self.drop(self.head(h)))

    def pooled(self, h, attention_mask, first_real_token: bool = False):
        """One vector per sequence as `classifier_pooling` asks: the first token, or the mean of the real tokens."""
        if self.config.classifier_pooling == "cls":
            if not first_real_token or attention_mask is None:
                return h[:, 0]
            return h[torch.arange(h.shape[0], device=h.device), attention_mask.argmax(-1).to(h.device)]
        if attention_mask is None:
            return h.mean(1)
        keep = attention_mask.to(h.device, h.dtype).unsqueeze(-1)
        return (h * keep).sum(1) / keep.sum(1)


class ModernBertForSequenceClassification(_ModernBertWithHead):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_hidden_states=None, return_dict=None, output_attentions=None, **_):
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states,
                         output_attentions=output_attentions)
        logits = self.scores(self.pooled(out.last_hidden_state, attention_mask))
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class ModernBertForTokenClassification(_ModernBertWithHead):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_hidden_states=None, return_dict=None, output_attentions=None, **_):
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states,
                         output_attentions=output_attentions)
        logits = self.scores(out.last_hidden_state)
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class ModernBertForQuestionAnswering(_ModernBertWithHead):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, start_positions=None,
                end_positions=None, inputs_embeds=None, output_hidden_states=None, return_dict=None,
                output_attentions=None, **_):
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states,
                         output_attentions=output_attentions)
        start, end, loss = span_outputs(self.scores(out.last_hidden_state), start_positions, end_positions)
        return ModelOutput(loss=loss, start_logits=start, end_logits=end, hidden_states=out.hidden_states,
                           attentions=out.attentions)


class ModernBertForMultipleChoice(_ModernBertWithHead):
    """Scores (B, choices, T) inputs one choice at a time; "cls" pooling reads each choice's first real token."""

    num_outputs = 1

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_hidden_states=None, return_dict=None, output_attentions=None, **_):
        choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]

        def flat(t, keep):  # (B, choices, ...) -> (B * choices, ...)
            return None if t is None else t.reshape(-1, *t.shape[2:2 + keep])

        attention_mask = flat(attention_mask, 1)
        out = self.model(flat(input_ids, 1), attention_mask, flat(position_ids, 1), flat(inputs_embeds, 2),
                         output_hidden_states, output_attentions=output_attentions)
        logits = self.scores(self.pooled(out.last_hidden_state, attention_mask, first_real_token=True))
        logits = logits.view(-1, choices)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"modernbert": (ModernBertConfig, {
    "base": ModernBertModel, "masked-lm": ModernBertForMaskedLM,
    "sequence-classification": ModernBertForSequenceClassification,
    "token-classification": ModernBertForTokenClassification, "question-answering": ModernBertForQuestionAnswering,
    "multiple-choice": ModernBertForMultipleChoice})}
