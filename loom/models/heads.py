"""Token-classification and question-answering heads for the decoder families, as the reference's generic heads.

A family states one line per head, e.g.

    class Qwen2ForTokenClassification(TokenClassificationHead, Qwen2PreTrainedModel):
        model_class = Qwen2Model

The base model sits under `base_model_prefix` (`model` for most families; the reference keeps `transformer` for the
question-answering heads of Llama, Qwen2/3, Qwen3-MoE and SmolLM3, and GPT-2 and GPT-NeoX use their own), so that
checkpoint keys match one to one. The tensor-parallel plan follows the base model to that name.
"""
from __future__ import annotations

from torch import nn

from loom.models.common import span_outputs, token_loss
from loom.outputs import ModelOutput


class _DecoderHead:
    """Builds `model_class` under `base_model_prefix` and runs it without a cache."""
    model_class: type

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own = getattr(cls.model_class, "base_model_prefix", "") if hasattr(cls, "model_class") else ""
        if own and cls.base_model_prefix != own and getattr(cls, "_tp_plan", None):
            old, new = own + ".", cls.base_model_prefix + "."
            cls._tp_plan = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in cls._tp_plan.items()}

    def __init__(self, config) -> None:
        super().__init__(config)
        setattr(self, self.base_model_prefix, self.model_class(config))
        self.make_head(config)
        self.post_init()

    def encode(self, input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states,
               output_attentions):
        return getattr(self, self.base_model_prefix)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
            use_cache=False, output_hidden_states=output_hidden_states, output_attentions=output_attentions)


class TokenClassificationHead(_DecoderHead):
    """One label per token: dropout then a Linear named `head_name` (`score`; `classifier` for GPT-2 and
    GPT-NeoX). Dropout is config.classifier_dropout, else config.hidden_dropout, else 0.1, as in the reference."""
    head_name = "score"

    def make_head(self, config) -> None:
        p = next((v for v in (getattr(config, "classifier_dropout", None), getattr(config, "hidden_dropout", None))
                  if v is not None), 0.1)
        self.dropout = nn.Dropout(p)
        bias = getattr(config, "token_classification_bias", True)
        setattr(self, self.head_name, nn.Linear(config.hidden_size, config.num_labels, bias=bias))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                output_attentions=None, **_):
        out = self.encode(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states,
                          output_attentions)
        logits = getattr(self, self.head_name)(self.dropout(out.last_hidden_state))
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class QuestionAnsweringHead(_DecoderHead):
    """Start and end logits of an answer span from a Linear(hidden, 2) named `qa_outputs`."""

    def make_head(self, config) -> None:
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, start_positions=None, end_positions=None, use_cache=None,
                output_hidden_states=None, return_dict=None, output_attentions=None, **_):
        out = self.encode(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states,
                          output_attentions)
        start, end, loss = span_outputs(self.qa_outputs(out.last_hidden_state), start_positions, end_positions)
        return ModelOutput(loss=loss, start_logits=start, end_logits=end, hidden_states=out.hidden_states,
                           attentions=out.attentions)
