"""RoBERTa = BERT with positions counted from padding_idx + 1 over the real tokens only, its own LM head (dense, gelu,
LayerNorm, decoder with a bias tied to `lm_head.bias`) and classification head (dense + tanh on <s>), under the
`roberta.` prefix. XLM-RoBERTa and CamemBERT are the same network under their own names."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.bert import BertConfig, BertEmbeddings, BertForMultipleChoice, BertForQuestionAnswering, \
    BertForSequenceClassification, BertForTokenClassification, BertModel, BertPreTrainedModel, Dropout, \
    _BertHeadModel
from loom.models.common import token_loss
from loom.outputs import ModelOutput


class RobertaConfig(BertConfig):
    model_type = "roberta"
    defaults = {**BertConfig.defaults, "vocab_size": 50265, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
                "use_cache": True}


class RobertaEmbeddings(BertEmbeddings):
    def __init__(self, config: RobertaConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=self.padding_idx)

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds):
        if position_ids is None:
            T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            longest = self.max_positions - self.padding_idx - 1
            if T > longest:
                raise ValueError(f"sequence of {T} tokens is longer than RoBERTa's {longest} positions "
                                 f"(max_position_embeddings={self.max_positions} less padding_idx + 1); truncate the "
                                 "input (e.g. tokenizer(..., truncation=True))")
            if input_ids is not None:  # padding keeps position padding_idx; real tokens count on from it
                real = input_ids.ne(self.padding_idx).long()
                position_ids = real.cumsum(1) * real + self.padding_idx
            else:  # no way to tell padding in embeddings: every position is real
                position_ids = torch.arange(self.padding_idx + 1, T + self.padding_idx + 1,
                                            device=inputs_embeds.device)[None]
        return super().forward(input_ids, token_type_ids, position_ids, inputs_embeds)


class RobertaPreTrainedModel(BertPreTrainedModel):
    config_class = RobertaConfig
    base_model_prefix = "roberta"
    _keys_to_ignore_on_load_unexpected = (r"position_ids$", r"pooler\.")
    _tp_plan = {k.replace("bert.", "roberta.", 1): v for k, v in BertPreTrainedModel._tp_plan.items()}


class RobertaModel(RobertaPreTrainedModel, BertModel):
    embeddings_class = RobertaEmbeddings
    runs_as_decoder = False  # a decoder's positions would continue from the cache's length


class RobertaLMHead(nn.Module):
    def __init__(self, config: RobertaConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))  # the decoder's bias when tied, as in checkpoints

    def forward(self, h):
        return self.decoder(self.layer_norm(F.gelu(self.dense(h))))


class RobertaClassificationHead(nn.Module):
    """dense + tanh on the <s> token, then the label projection (RoBERTa has no pooler in its classifier)."""

    def __init__(self, config: RobertaConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    activation = staticmethod(torch.tanh)

    def forward(self, h):
        x = self.activation(self.dense(self.dropout(h[:, 0])))
        return self.out_proj(self.dropout(x))


class RobertaForMaskedLM(RobertaPreTrainedModel, _BertHeadModel):
    model_class = RobertaModel
    _tied_weights_keys = {"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
                          "lm_head.decoder.bias": "lm_head.bias"}

    def __init__(self, config: RobertaConfig) -> None:
        super().__init__(config)
        self.add_encoder(config)
        self.lm_head = RobertaLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None, output_attentions=None,
                **_):
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          output_hidden_states, output_attentions=output_attentions)
        logits = self.lm_head(out.last_hidden_state)
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class RobertaForSequenceClassification(RobertaPreTrainedModel, BertForSequenceClassification):
    model_class = RobertaModel
    add_pooling_layer = False

    def make_head(self, config):
        return RobertaClassificationHead(config)

    def classify(self, out):
        return self.classifier(out.last_hidden_state)


class RobertaForMultipleChoice(RobertaPreTrainedModel, BertForMultipleChoice):
    model_class = RobertaModel

    def __init__(self, config: RobertaConfig) -> None:
        super().__init__(config)
        self.dropout.p = config.hidden_dropout_prob  # RoBERTa's ignores classifier_dropout


class RobertaForTokenClassification(RobertaPreTrainedModel, BertForTokenClassification):
    model_class = RobertaModel


class RobertaForQuestionAnswering(RobertaPreTrainedModel, BertForQuestionAnswering):
    model_class = RobertaModel


ROBERTA_HEADS = {"base": RobertaModel, "masked-lm": RobertaForMaskedLM,
                 "sequence-classification": RobertaForSequenceClassification,
                 "token-classification": RobertaForTokenClassification,
                 "question-answering": RobertaForQuestionAnswering, "multiple-choice": RobertaForMultipleChoice,
                 "pretraining": RobertaForMaskedLM}  # the reference's AutoModelForPreTraining picks the MLM


def _renamed(name: str, config_class: type[RobertaConfig]) -> tuple[type[RobertaConfig], dict[str, type]]:
    """The RoBERTa classes under another family's names (`XLMRobertaForMaskedLM`, ...) and config class: the
    network and the checkpoint keys are RoBERTa's."""
    renamed = {cls: type(cls.__name__.replace("Roberta", name, 1), (cls,),
                         {"config_class": config_class, "__module__": __name__, "__doc__": cls.__doc__})
               for cls in set(ROBERTA_HEADS.values())}
    return config_class, {head: renamed[cls] for head, cls in ROBERTA_HEADS.items()}


class XLMRobertaConfig(RobertaConfig):
    model_type = "xlm-roberta"
    defaults = {**RobertaConfig.defaults, "vocab_size": 30522}


class CamembertConfig(RobertaConfig):
    model_type = "camembert"
    defaults = {**RobertaConfig.defaults, "vocab_size": 30522}


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"roberta": (RobertaConfig, ROBERTA_HEADS), "xlm-roberta": _renamed("XLMRoberta", XLMRobertaConfig),
               "camembert": _renamed("Camembert", CamembertConfig)}
