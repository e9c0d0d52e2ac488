"""DistilBERT: BERT's post-LayerNorm encoder distilled to 6 layers, without token types or a pooler, with its own key
names (`transformer.layer.N.attention.q_lin`, `sa_layer_norm`, `ffn.lin1`) and heads (`vocab_transform`,
`pre_classifier`). Optionally sinusoidal (fixed at initialisation, stored in the checkpoint) position embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.configuration import TOKEN_ID_TYPES, PretrainedConfig
from loom.kernels import linear_act
from loom.modeling import PreTrainedModel
from loom.models.bert import Dropout, absolute_positions
from loom.models.common import activation, attention, attention_mask_for, check_activation, check_inputs, \
    classification_loss, encoder_threads, maybe_checkpoint, recording_attentions, span_outputs, token_loss
from loom.outputs import ModelOutput


class DistilBertConfig(PretrainedConfig):
    model_type = "distilbert"
    attribute_map = {"hidden_size": "dim", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers"}
    defaults = dict(vocab_size=30522, max_position_embeddings=512, sinusoidal_pos_embds=False, n_layers=6, n_heads=12,
                    dim=768, hidden_dim=3072, dropout=0.1, attention_dropout=0.1, activation="gelu",
                    initializer_range=0.02, qa_dropout=0.1, seq_classif_dropout=0.2, pad_token_id=0,
                    tie_word_embeddings=True)
    field_types = {**TOKEN_ID_TYPES}

    def __post_init__(self) -> None:
        check_activation(self, "activation")


def sinusoidal_positions(n_pos: int, dim: int) -> torch.Tensor:
    """(n_pos, dim) table: sin(pos / 10000^(2i/dim)) in even columns, cos in odd ones, computed in float64."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    pair = torch.arange(dim, dtype=torch.float64) // 2  # columns 2i and 2i+1 share a frequency
    angles = pos / torch.pow(10000.0, 2 * pair / dim)  # (n_pos, dim)
    table = torch.empty(n_pos, dim, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(angles[:, 0::2]), torch.cos(angles[:, 1::2])
    return table.float()


def flatten_choices(*tensors):
    """(B, C, T[, D]) multiple-choice inputs -> (B*C, T[, D]); None stays None."""
    return [None if t is None else t.reshape(-1, *t.shape[2:]) for t in tensors]


class DistilBertEmbeddings(nn.Module):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.dim)
        self.position_embeddings.sinusoidal = config.sinusoidal_pos_embds  # read by _init_weights
        self.LayerNorm = nn.LayerNorm(config.dim, eps=1e-12)
        self.dropout = Dropout(config.dropout)
        self.max_positions = config.max_position_embeddings

    def forward(self, input_ids, inputs_embeds, position_ids):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        position_ids = absolute_positions(position_ids, x, self.max_positions)
        return self.dropout(self.LayerNorm(x + self.position_embeddings(position_ids)))


class DistilBertSelfAttention(nn.Module):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        if config.dim % config.n_heads:
            raise ValueError(f"config dim={config.dim} is not a multiple of n_heads={config.n_heads}")
        self.config = config
        self.head_dim = config.dim // config.n_heads
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)
        self.dropout = config.attention_dropout

    def forward(self, x, mask):
        B, T, _ = x.shape
        q, k, v = (lin(x).view(B, T, -1, self.head_dim).transpose(1, 2)
                   for lin in (self.q_lin, self.k_lin, self.v_lin))  # (B, H, T, D)
        out = attention(q, k, v, mask, False, implementation=self.config._attn_implementation,
                        dropout=self.dropout if self.training else 0.0)
        return self.out_lin(out.transpose(1, 2).reshape(B, T, -1))


class FFN(nn.Module):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.activation = activation(config.activation)
        self.dropout = Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.lin2(linear_act(self.lin1, self.activation, x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.attention = DistilBertSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)

    def forward(self, x, mask):
        a = self.sa_layer_norm(self.attention(x, mask) + x)
        return self.output_layer_norm(self.ffn(a) + a)


class Transformer(nn.Module):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.gradient_checkpointing = False

    def forward(self, x, mask, output_hidden_states=False, output_attentions=None):
        hidden = [x] if output_hidden_states else None
        with recording_attentions(self.config, output_attentions) as attentions:
            for layer in self.layer:
                x = maybe_checkpoint(layer, self.gradient_checkpointing, x, mask)
                if hidden is not None:
                    hidden.append(x)
        return x, hidden, attentions


class DistilBertPreTrainedModel(PreTrainedModel):
    config_class = DistilBertConfig
    base_model_prefix = "distilbert"
    _no_split_modules = ["TransformerBlock"]
    _keys_to_ignore_on_load_unexpected = (r"position_ids$",)
    _tp_plan = {
        "distilbert.transformer.layer.*.attention.q_lin": "colwise",
        "distilbert.transformer.layer.*.attention.k_lin": "colwise",
        "distilbert.transformer.layer.*.attention.v_lin": "colwise",
        "distilbert.transformer.layer.*.attention.out_lin": "rowwise",
        "distilbert.transformer.layer.*.ffn.lin1": "colwise",
        "distilbert.transformer.layer.*.ffn.lin2": "rowwise",
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if getattr(module, "sinusoidal", False):
            with torch.no_grad():
                module.weight.copy_(sinusoidal_positions(*module.weight.shape))


class DistilBertModel(DistilBertPreTrainedModel):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__(config)
        self.embeddings = DistilBertEmbeddings(config)
        self.transformer = Transformer(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **_):
        check_inputs(input_ids, inputs_embeds)
        x = self.embeddings(input_ids, inputs_embeds, position_ids)
        T = x.shape[1]
        mask, _ = attention_mask_for(attention_mask, T, 0, T, causal=False, device=x.device)
        with encoder_threads(self.transformer, x, mask, self.config):
            x, hidden, attentions = self.transformer(x, mask, output_hidden_states, output_attentions)
        return ModelOutput(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None,
                           attentions=tuple(attentions) if attentions is not None else None)


def _outputs(out, **fields):
    return ModelOutput(**fields, hidden_states=out.hidden_states, attentions=out.attentions)


class DistilBertForMaskedLM(DistilBertPreTrainedModel):
    _tied_weights_keys = {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"}

    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__(config)
        self.activation = activation(config.activation)
        self.distilbert = DistilBertModel(config)
        self.vocab_transform = nn.Linear(config.dim, config.dim)
        self.vocab_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)
        self.vocab_projector = nn.Linear(config.dim, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self):
        return self.vocab_projector

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, position_ids=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **_):
        out = self.distilbert(input_ids, attention_mask, inputs_embeds, position_ids, output_hidden_states,
                              output_attentions)
        h = self.vocab_layer_norm(self.activation(self.vocab_transform(out.last_hidden_state)))
        logits = self.vocab_projector(h)
        loss = token_loss(logits, labels) if labels is not None else None
        return _outputs(out, loss=loss, logits=logits)


class _DistilBertFirstTokenHead(DistilBertPreTrainedModel):
    """Sequence classification and multiple choice: the first token through pre_classifier, ReLU, dropout,
    classifier."""

    num_outputs = None  # None: config.num_labels

    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__(config)
        self.distilbert = DistilBertModel(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, self.num_outputs or config.num_labels)
        self.dropout = Dropout(config.seq_classif_dropout)
        self.post_init()

    def classify(self, out):
        return self.classifier(self.dropout(F.relu(self.pre_classifier(out.last_hidden_state[:, 0]))))


class DistilBertForSequenceClassification(_DistilBertFirstTokenHead):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, position_ids=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **_):
        out = self.distilbert(input_ids, attention_mask, inputs_embeds, position_ids, output_hidden_states,
                              output_attentions)
        logits = self.classify(out)
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        return _outputs(out, loss=loss, logits=logits)


class DistilBertForMultipleChoice(_DistilBertFirstTokenHead):
    num_outputs = 1

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, position_ids=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **_):
        """Inputs are (batch, num_choices, seq_len); logits (batch, num_choices)."""
        choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        out = self.distilbert(*flatten_choices(input_ids, attention_mask, inputs_embeds, position_ids),
                              output_hidden_states, output_attentions)
        logits = self.classify(out).view(-1, choices)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return _outputs(out, loss=loss, logits=logits)


class DistilBertForTokenClassification(DistilBertPreTrainedModel):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__(config)
        self.distilbert = DistilBertModel(config)
        self.dropout = Dropout(config.dropout)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, position_ids=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **_):
        out = self.distilbert(input_ids, attention_mask, inputs_embeds, position_ids, output_hidden_states,
                              output_attentions)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = token_loss(logits, labels) if labels is not None else None
        return _outputs(out, loss=loss, logits=logits)


class DistilBertForQuestionAnswering(DistilBertPreTrainedModel):
    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__(config)
        if config.num_labels != 2:
            raise ValueError(f"DistilBertForQuestionAnswering needs config num_labels=2 (start and end logits), got "
                             f"{config.num_labels}; set num_labels (or id2label) to 2")
        self.distilbert = DistilBertModel(config)
        self.qa_outputs = nn.Linear(config.dim, config.num_labels)
        self.dropout = Dropout(config.qa_dropout)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, start_positions=None,
                end_positions=None, position_ids=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, **_):
        out = self.distilbert(input_ids, attention_mask, inputs_embeds, position_ids, output_hidden_states,
                              output_attentions)
        start, end, loss = span_outputs(self.qa_outputs(self.dropout(out.last_hidden_state)), start_positions,
                                        end_positions)
        return _outputs(out, loss=loss, start_logits=start, end_logits=end)


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"distilbert": (DistilBertConfig, {
    "base": DistilBertModel, "masked-lm": DistilBertForMaskedLM,
    "sequence-classification": DistilBertForSequenceClassification,
    "token-classification": DistilBertForTokenClassification,
    "question-answering": DistilBertForQuestionAnswering, "multiple-choice": DistilBertForMultipleChoice})}
