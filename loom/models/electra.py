"""ELECTRA = BERT's encoder under the `electra.` prefix, without a pooler, with embeddings of `embedding_size`
projected up to hidden_size (`embeddings_project`) when they differ. Heads: the discriminator (ElectraForPreTraining,
one replaced-token logit per token), the generator (ElectraForMaskedLM), a gelu classification head on the first
token, and a sequence summary for multiple choice."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.bert import BertConfig, BertEmbeddings, BertForMultipleChoice, BertForQuestionAnswering, \
    BertForTokenClassification, BertModel, BertPreTrainedModel, Dropout, _BertHeadModel
from loom.models.common import activation, token_loss
from loom.models.roberta import RobertaClassificationHead, RobertaForSequenceClassification
from loom.outputs import ModelOutput


class ElectraConfig(BertConfig):
    model_type = "electra"
    defaults = {**BertConfig.defaults, "embedding_size": 128, "hidden_size": 256, "num_attention_heads": 4,
                "intermediate_size": 1024, "summary_type": "first", "summary_use_proj": True,
                "summary_activation": "gelu", "summary_last_dropout": 0.1, "use_cache": True}


class ElectraEmbeddings(BertEmbeddings):
    def __init__(self, config: ElectraConfig) -> None:
        super().__init__(config, width=config.embedding_size)


class ElectraPreTrainedModel(BertPreTrainedModel):
    config_class = ElectraConfig
    base_model_prefix = "electra"
    _keys_to_ignore_on_load_unexpected = (r"position_ids$",)
    _tp_plan = {k.replace("bert.", "electra.", 1): v for k, v in BertPreTrainedModel._tp_plan.items()}


class ElectraModel(ElectraPreTrainedModel, BertModel):
    embeddings_class = ElectraEmbeddings

    def __init__(self, config: ElectraConfig, add_pooling_layer: bool = False) -> None:
        super().__init__(config, add_pooling_layer=False)  # ELECTRA has no pooler

    def add_variant_modules(self, config) -> None:
        if config.embedding_size != config.hidden_size:
            self.embeddings_project = nn.Linear(config.embedding_size, config.hidden_size)

    def embed(self, input_ids, token_type_ids, position_ids, inputs_embeds):
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        return self.embeddings_project(x) if hasattr(self, "embeddings_project") else x


class ElectraDiscriminatorPredictions(nn.Module):
    def __init__(self, config: ElectraConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = activation(config.hidden_act)
        self.dense_prediction = nn.Linear(config.hidden_size, 1)

    def forward(self, h):
        return self.dense_prediction(self.activation(self.dense(h))).squeeze(-1)


class ElectraGeneratorPredictions(nn.Module):
    def __init__(self, config: ElectraConfig) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)

    def forward(self, h):
        return self.LayerNorm(F.gelu(self.dense(h)))


class ElectraForPreTraining(ElectraPreTrainedModel, _BertHeadModel):
    """The discriminator: for each token, the logit that it was replaced by the generator."""

    model_class = ElectraModel

    def __init__(self, config: ElectraConfig) -> None:
        super().__init__(config)
        self.add_encoder(config)
        self.discriminator_predictions = ElectraDiscriminatorPredictions(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None, output_attentions=None,
                **_):
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          output_hidden_states, output_attentions=output_attentions)
        logits = self.discriminator_predictions(out.last_hidden_state)
        loss = None
        if labels is not None:  # over the attended tokens only, as the reference
            real = attention_mask.bool() if attention_mask is not None else torch.ones_like(logits, dtype=torch.bool)
            loss = F.binary_cross_entropy_with_logits(logits[real].float(), labels[real].float())
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class ElectraForMaskedLM(ElectraPreTrainedModel, _BertHeadModel):
    """The generator: predictions in embedding_size, decoded by the (tied) word embeddings."""

    model_class = ElectraModel
    _tied_weights_keys = {"generator_lm_head.weight": "electra.embeddings.word_embeddings.weight"}

    def __init__(self, config: ElectraConfig) -> None:
        super().__init__(config)
        self.add_encoder(config)
        self.generator_predictions = ElectraGeneratorPredictions(config)
        self.generator_lm_head = nn.Linear(config.embedding_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self):
        return self.generator_lm_head

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None, output_attentions=None,
                **_):
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          output_hidden_states, output_attentions=output_attentions)
        logits = self.generator_lm_head(self.generator_predictions(out.last_hidden_state))
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class ElectraClassificationHead(RobertaClassificationHead):
    activation = staticmethod(F.gelu)  # where RoBERTa has tanh


class ElectraForSequenceClassification(ElectraPreTrainedModel, RobertaForSequenceClassification):
    model_class = ElectraModel

    def make_head(self, config):
        return ElectraClassificationHead(config)


class ElectraSequenceSummary(nn.Module):
    """One vector per sequence as config.summary_* say: the first/last token or the mean, then an optional
    projection (to num_labels with summary_proj_to_labels), activation and dropouts."""

    def __init__(self, config: ElectraConfig) -> None:
        super().__init__()
        self.summary_type = getattr(config, "summary_type", "last")
        if self.summary_type not in ("first", "last", "mean", "cls_index"):
            raise ValueError(f"ElectraConfig.summary_type={self.summary_type!r} is not supported by loom; use "
                             "'first', 'last', 'mean' or 'cls_index'")
        self.summary = nn.Identity()
        if getattr(config, "summary_use_proj", False):
            to_labels = getattr(config, "summary_proj_to_labels", False) and config.num_labels > 0
            self.summary = nn.Linear(config.hidden_size, config.num_labels if to_labels else config.hidden_size)
        act = getattr(config, "summary_activation", None)
        self.activation = activation(act) if act else nn.Identity()
        self.first_dropout = Dropout(getattr(config, "summary_first_dropout", 0.0) or 0.0)
        self.last_dropout = Dropout(getattr(config, "summary_last_dropout", 0.0) or 0.0)

    def forward(self, h):
        if self.summary_type == "first":
            x = h[:, 0]
        elif self.summary_type == "mean":
            x = h.mean(dim=1)
        else:  # "last", and "cls_index" without an index, read the last position (padding included, as the reference)
            x = h[:, -1]
        return self.last_dropout(self.activation(self.summary(self.first_dropout(x))))


class ElectraForMultipleChoice(ElectraPreTrainedModel, BertForMultipleChoice):
    model_class = ElectraModel

    def __init__(self, config: ElectraConfig) -> None:
        super().__init__(config)
        self.reads_first_token = self.sequence_summary.summary_type == "first"

    def make_head(self, config):
        self.sequence_summary = ElectraSequenceSummary(config)
        return nn.Linear(config.hidden_size, 1)

    def classify(self, out):
        return self.classifier(self.sequence_summary(out.last_hidden_state))


class ElectraForTokenClassification(ElectraPreTrainedModel, BertForTokenClassification):
    model_class = ElectraModel


class ElectraForQuestionAnswering(ElectraPreTrainedModel, BertForQuestionAnswering):
    model_class = ElectraModel


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"electra": (ElectraConfig, {
    "base": ElectraModel, "pretraining": ElectraForPreTraining, "masked-lm": ElectraForMaskedLM,
    "sequence-classification": ElectraForSequenceClassification,
    "token-classification": ElectraForTokenClassification, "question-answering": ElectraForQuestionAnswering,
    "multiple-choice": ElectraForMultipleChoice})}
