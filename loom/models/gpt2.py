"""GPT-2: learned positions, pre-LayerNorm blocks, fused qkv. Checkpoints store the Conv1D weights as (in, out);
loom keeps plain nn.Linear (so quantization and tensor parallel see ordinary Linears) and flips them on load/save."""
from __future__ import annotations

import torch
from torch import nn

from loom.configuration import TOKEN_ID_TYPES, PretrainedConfig
from loom.modeling import PreTrainedModel
from loom.models.common import activation, attention, classification_loss, decoder_inputs, \
    maybe_checkpoint, recording_attentions
from loom.models.heads import QuestionAnsweringHead, TokenClassificationHead
from loom.models.llama import last_token_pool, lm_loss
from loom.outputs import ModelOutput


class GPT2Config(PretrainedConfig):
    model_type = "gpt2"
    attribute_map = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                     "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
    defaults = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                    activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                    layer_norm_epsilon=1e-5, initializer_range=0.02, scale_attn_weights=True, use_cache=True,
                    bos_token_id=50256, eos_token_id=50256, scale_attn_by_inverse_layer_idx=False,
                    reorder_and_upcast_attn=False, tie_word_embeddings=True, summary_type="cls_index",
                    summary_use_proj=True, summary_activation=None, summary_proj_to_labels=True,
                    summary_first_dropout=0.1)
    field_types = {**TOKEN_ID_TYPES, "n_inner": (int, None)}


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        h = config.n_embd
        self.num_heads, self.head_dim, self.layer_idx = config.n_head, h // config.n_head, layer_idx
        self.scale = (self.head_dim ** -0.5) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)
        self.c_attn = nn.Linear(h, 3 * h)
        self.c_proj = nn.Linear(h, h)
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, mask, is_causal, cache, cache_position=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, cache_position)
        out = attention(q, k, v, mask, is_causal, implementation=self.config._attn_implementation,
                        dropout=self.attn_dropout if self.training else 0.0, scale=self.scale)
        return self.resid_dropout(self.c_proj(out.transpose(1, 2).reshape(B, T, C)))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.act = activation(config.activation_function)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x, mask, is_causal, cache=None, cache_position=None):
        x = x + self.attn(self.ln_1(x), mask, is_causal, cache, cache_position)
        return x + self.mlp(self.ln_2(x))


class GPT2PreTrainedModel(PreTrainedModel):
    config_class = GPT2Config
    base_model_prefix = "transformer"
    _no_split_modules = ["GPT2Block"]
    _transposed_checkpoint_weights = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                      "mlp.c_proj.weight")
    _keys_to_ignore_on_load_unexpected = (r"\.attn\.masked_bias$", r"\.attn\.bias$")
    _tp_plan = {
        "transformer.h.*.mlp.c_fc": "colwise",
        "transformer.h.*.mlp.c_proj": "rowwise",
    }


class GPT2Model(GPT2PreTrainedModel):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, use_cache=None, output_hidden_states=None,
                cache_position=None, return_dict=None, output_attentions=None, **_):
        inputs = decoder_inputs(self.config, self.wte, input_ids, inputs_embeds, attention_mask, past_key_values,
                                use_cache, cache_position, training=self.training)
        x, cache, cache_position, past = inputs.x, inputs.cache, inputs.cache_position, inputs.past
        (mask, is_causal), T = inputs.masks[None], x.shape[1]
        if past is None and not torch.compiler.is_compiling():
            past = int(cache_position[0])  # a static cache's positions are a tensor; eagerly, read one for the check
        if past is not None and past + T > self.config.n_positions:
            raise ValueError(f"sequence of {past + T} tokens is longer than this model's n_positions="
                             f"{self.config.n_positions}; truncate the input")
        if position_ids is None:
            position_ids = cache_position[None]
        x = x + self.wpe(position_ids)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)
        x = self.drop(x)
        if output_hidden_states is None:  # unset: the config's setting, as for output_attentions
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        hidden = [x] if output_hidden_states else None
        with recording_attentions(self.config, output_attentions) as attentions:
            for block in self.h:
                x = maybe_checkpoint(block, self.gradient_checkpointing, x, mask, is_causal, cache, cache_position)
                if hidden is not None:
                    hidden.append(x)
        x = self.ln_f(x)
        if hidden is not None:
            hidden[-1] = x
        return ModelOutput(last_hidden_state=x, past_key_values=cache if inputs.use_cache else None,
                           hidden_states=tuple(hidden) if hidden is not None else None,
                           attentions=tuple(attentions) if attentions is not None else None)


class GPT2LMHeadModel(GPT2PreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _can_generate = True
    _tp_plan = {**GPT2PreTrainedModel._tp_plan, "lm_head": "colwise_rep"}

    def __init__(self, config: GPT2Config) -> None:
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None,
                cache_position=None, logits_to_keep: int = 0, return_dict=None, num_items_in_batch=None,
                output_attentions=None, shift_labels=None, **_):
        out = self.transformer(input_ids, past_key_values, attention_mask, token_type_ids, position_ids,
                               inputs_embeds, use_cache, output_hidden_states, cache_position,
                               output_attentions=output_attentions)
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = lm_loss(logits, labels, shift_labels, num_items_in_batch)
        return ModelOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                           hidden_states=out.hidden_states, attentions=out.attentions)


class GPT2SequenceSummary(nn.Module):
    """One vector per sequence (config.summary_type: the "last", "first" or "mean" position, or "cls_index": the
    token at `cls_index`, by default the last), then dropout, an optional projection (to num_labels when
    summary_proj_to_labels) and an optional tanh."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.summary_type = config.summary_type
        if self.summary_type not in ("last", "first", "mean", "cls_index"):
            raise ValueError(f"summary_type={self.summary_type!r} is not supported; use 'last', 'first', 'mean' or "
                             "'cls_index'")
        width = config.num_labels if config.summary_proj_to_labels and config.num_labels > 0 else config.n_embd
        self.summary = nn.Linear(config.n_embd, width) if config.summary_use_proj else nn.Identity()
        self.activation = activation(config.summary_activation) if config.summary_activation else nn.Identity()
        self.first_dropout = nn.Dropout(config.summary_first_dropout) if config.summary_first_dropout else nn.Identity()
        last = getattr(config, "summary_last_dropout", 0.0)
        self.last_dropout = nn.Dropout(last) if last else nn.Identity()

    def forward(self, hidden: torch.Tensor, cls_index: torch.LongTensor | None = None) -> torch.Tensor:
        # "last" / "first" / "mean" read dimension 1, as the reference does (the positions of a (B, T, H) input)
        if self.summary_type == "last":
            out = hidden[:, -1]
        elif self.summary_type == "first":
            out = hidden[:, 0]
        elif self.summary_type == "mean":
            out = hidden.mean(dim=1)
        else:
            if cls_index is None:
                cls_index = torch.full(hidden.shape[:-2], hidden.shape[-2] - 1, dtype=torch.long,
                                       device=hidden.device)
            index = cls_index[..., None, None].expand(*cls_index.shape, 1, hidden.shape[-1])  # (..., 1, H)
            out = hidden.gather(-2, index).squeeze(-2)
        return self.last_dropout(self.activation(self.summary(self.first_dropout(out))))


class GPT2DoubleHeadsModel(GPT2PreTrainedModel):
    """GPT-2 with the language-model head and a multiple-choice head that scores each choice at its `mc_token_ids`
    position. Inputs may carry a choices dimension, (batch, num_choices, seq); it is folded into the batch for the
    transformer and restored in the logits (hidden states and attentions stay per folded row)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _can_generate = True

    def __init__(self, config: GPT2Config) -> None:
        super().__init__(config)
        config.num_labels = 1  # one score per choice, as the reference sets it
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.multiple_choice_head = GPT2SequenceSummary(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, mc_token_ids=None, labels=None, mc_labels=None,
                use_cache=None, output_hidden_states=None, cache_position=None, return_dict=None,
                output_attentions=None, **_):
        shape = (input_ids if input_ids is not None else inputs_embeds[..., 0]).shape  # (..., T)
        flat = [None if t is None else t.reshape(-1, *t.shape[len(shape) - 1:])
                for t in (input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)]
        out = self.transformer(flat[0], past_key_values, flat[1], flat[2], flat[3], flat[4], use_cache,
                               output_hidden_states, cache_position, output_attentions=output_attentions)
        hidden = out.last_hidden_state.reshape(*shape, -1)  # (..., T, H)
        logits = self.lm_head(hidden)
        mc_logits = self.multiple_choice_head(hidden, mc_token_ids).squeeze(-1)
        mc_loss = (nn.functional.cross_entropy(mc_logits.reshape(-1, mc_logits.shape[-1]), mc_labels.reshape(-1))
                   if mc_labels is not None else None)
        loss = None
        if labels is not None:  # next-token loss over every position, -100 ignored
            shifted = logits[..., :-1, :].reshape(-1, logits.shape[-1])
            loss = nn.functional.cross_entropy(shifted, labels.to(logits.device)[..., 1:].reshape(-1))
        return ModelOutput(loss=loss, mc_loss=mc_loss, logits=logits, mc_logits=mc_logits,
                           past_key_values=out.past_key_values, hidden_states=out.hidden_states,
                           attentions=out.attentions)


class GPT2ForSequenceClassification(GPT2PreTrainedModel):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None,
                return_dict=None, output_attentions=None, **_):
        if input_ids is not None and input_ids.shape[0] > 1 and self.config.pad_token_id is None:
            raise ValueError("batches of more than one sequence need config.pad_token_id to find each row's last "
                             "token; set it (e.g. to the tokenizer's pad id)")
        out = self.transformer(input_ids, None, attention_mask, token_type_ids, position_ids, inputs_embeds, False,
                               output_hidden_states, output_attentions=output_attentions)
        logits = last_token_pool(self.score(out.last_hidden_state), input_ids, self.config.pad_token_id)
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class GPT2ForTokenClassification(TokenClassificationHead, GPT2PreTrainedModel):
    model_class = GPT2Model
    head_name = "classifier"


class GPT2ForQuestionAnswering(QuestionAnsweringHead, GPT2PreTrainedModel):
    model_class = GPT2Model


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"gpt2": (GPT2Config, {
    "base": GPT2Model, "causal-lm": GPT2LMHeadModel, "sequence-classification": GPT2ForSequenceClassification,
    "token-classification": GPT2ForTokenClassification, "question-answering": GPT2ForQuestionAnswering,
    "double-heads": GPT2DoubleHeadsModel})}
