"""MPNet: BERT's post-LayerNorm encoder without token types, with RoBERTa-style positions (counted from
padding_idx + 1, padding keeps position padding_idx) and a T5-style relative position bias shared by all layers."""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from loom.configuration import TOKEN_ID_TYPES, PretrainedConfig
from loom.kernels import ops, policy
from loom.modeling import PreTrainedModel
from loom.models.bert import BertIntermediate, BertOutput, BertPooler, Dropout
from loom.models.common import attention, attention_mask_for, check_activation, check_inputs, classification_loss, \
    encoder_threads, key_lengths, maybe_checkpoint, recording_attentions, span_outputs, token_loss
from loom.models.distilbert import flatten_choices
from loom.outputs import ModelOutput

# the reference's MPNet embeddings use padding index 1 whatever config.pad_token_id says
PADDING_IDX = 1
# the reference buckets relative positions into 32 whatever config.relative_attention_num_buckets says (the config
# sets only the rows of the bias table)
NUM_BUCKETS, MAX_DISTANCE = 32, 128


class MPNetConfig(PretrainedConfig):
    model_type = "mpnet"
    defaults = dict(vocab_size=30527, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1, max_position_embeddings=512, initializer_range=0.02,
                    layer_norm_eps=1e-12, relative_attention_num_buckets=32, pad_token_id=1, bos_token_id=0,
                    eos_token_id=2, tie_word_embeddings=True)
    field_types = {**TOKEN_ID_TYPES}

    def __post_init__(self) -> None:
        check_activation(self)


def position_ids_from(input_ids: torch.Tensor) -> torch.Tensor:
    """Real tokens count up from PADDING_IDX + 1; padding tokens sit at PADDING_IDX."""
    real = input_ids.ne(PADDING_IDX).long()
    return torch.cumsum(real, dim=1) * real + PADDING_IDX


def relative_position_bucket(relative: torch.Tensor) -> torch.Tensor:
    """Bucket of each key-minus-query offset: half the buckets per direction, exact below 8, log-spaced up to 128."""
    half = NUM_BUCKETS // 2
    n = -relative
    bucket = (n < 0).long() * half
    n = n.abs()
    exact = half // 2
    log_spaced = exact + (torch.log(n.float() / exact) / math.log(MAX_DISTANCE / exact) * (half - exact)).long()
    return bucket + torch.where(n < exact, n, log_spaced.clamp(max=half - 1))


class MPNetEmbeddings(nn.Module):
    def __init__(self, config: MPNetConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=PADDING_IDX)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=PADDING_IDX)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.max_positions = config.max_position_embeddings

    def forward(self, input_ids, position_ids, inputs_embeds):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.shape[1]
        if position_ids is None:
            if input_ids is not None:
                position_ids = position_ids_from(input_ids)
            else:  # no ids, so no padding to see: sequential positions
                position_ids = torch.arange(PADDING_IDX + 1, T + PADDING_IDX + 1, device=x.device)[None]
        if T + PADDING_IDX + 1 > self.max_positions:
            raise ValueError(f"sequence of {T} tokens needs positions up to {T + PADDING_IDX}, beyond "
                             f"max_position_embeddings={self.max_positions}; truncate the input (e.g. "
                             f"tokenizer(..., truncation=True, max_length={self.max_positions - PADDING_IDX - 1}))")
        return self.dropout(self.LayerNorm(x + self.position_embeddings(position_ids)))


class KeyedBias(NamedTuple):
    """The relative position bias (1, H, T, T) with the padding as key counts (None: no padding), for
    loom::flash_attention; `mask` (B, 1, T, T) bools or None, to build the masked bias where that path does not run."""
    bias: torch.Tensor
    lens: torch.Tensor | None
    mask: torch.Tensor | None

    def masked(self) -> torch.Tensor:
        return self.bias if self.mask is None else self.bias.masked_fill(~self.mask, torch.finfo(self.bias.dtype).min)


class MPNetSelfAttention(nn.Module):
    def __init__(self, config: MPNetConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"config hidden_size={config.hidden_size} is not a multiple of num_attention_heads="
                             f"{config.num_attention_heads}")
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        h = config.hidden_size
        self.q, self.k, self.v, self.o = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.dropout = config.attention_probs_dropout_prob

    def forward(self, x, bias):
        """`bias`: (B|1, H, T, T), the relative position bias with the dtype's lowest value at masked keys, or a
        KeyedBias (the encoder's choice of loom::flash_attention, which skips padding keys instead of masking them)."""
        B, T, _ = x.shape
        q, k, v = (lin(x).view(B, T, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        p = self.dropout if self.training else 0.0
        if isinstance(bias, KeyedBias):
            if not p and policy.flash_applies(q, k, v, None, False, 0.0):
                out = ops.flash_attention(q, k, v, self.head_dim ** -0.5, False, bias.lens, bias.bias)
                return self.o(out.transpose(1, 2).reshape(B, T, -1))
            bias = bias.masked()
        out = attention(q, k, v, bias, False, implementation=self.config._attn_implementation, dropout=p)  # (B,H,T,D)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class MPNetAttention(nn.Module):
    def __init__(self, config: MPNetConfig) -> None:
        super().__init__()
        self.attn = MPNetSelfAttention(config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x, bias):
        return self.LayerNorm(self.dropout(self.attn(x, bias)) + x)


class MPNetLayer(nn.Module):
    def __init__(self, config: MPNetConfig) -> None:
        super().__init__()
        self.attention = MPNetAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, bias):
        a = self.attention(x, bias)
        return self.output(self.intermediate(a), a)


class MPNetEncoder(nn.Module):
    def __init__(self, config: MPNetConfig) -> None:
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(MPNetLayer(config) for _ in range(config.num_hidden_layers))
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets,
                                                    config.num_attention_heads)
        self.gradient_checkpointing = False

    def position_bias(self, T: int, device) -> torch.Tensor:
        pos = torch.arange(T, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None])  # (T, T), key minus query
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, H, T, T)

    def keyed(self, x, bias, mask, output_attentions) -> KeyedBias | None:
        """The bias for loom::flash_attention (policy.padded_flash_applies' conditions, checked before the layers
        make q, k and v): inference in eval mode, SDPA, not recording attentions, eager, and no padding or a
        right-padded batch whose rows each keep a key (the reference averages a row without keys)."""
        if (torch.is_grad_enabled() or self.training or self.config._attn_implementation != "sdpa"
                or output_attentions or getattr(self.config, "output_attentions", False) or not x.is_cpu
                or x.dtype not in policy.DTYPES or not policy.enabled() or not ops.eager_now()
                or not policy.plain(x)):
            return None
        if mask is None:
            return KeyedBias(bias, None, None)
        lens = key_lengths(mask, x.shape[0])
        return None if lens is None or not bool((lens > 0).all()) else KeyedBias(bias, lens, mask)

    def forward(self, x, mask, output_hidden_states=False, output_attentions=None):
        bias = self.position_bias(x.shape[1], x.device).to(x.dtype)
        keyed = self.keyed(x, bias, mask, output_attentions)
        if keyed is not None:
            bias = keyed
        elif mask is not None:  # the dtype's lowest value, as the reference: a row with no key left averages, not NaN
            bias = bias.masked_fill(~mask, torch.finfo(x.dtype).min)  # (B, H, T, T)
        hidden = [x] if output_hidden_states else None
        with recording_attentions(self.config, output_attentions) as attentions, \
                encoder_threads(self, x, mask, self.config) if keyed is not None else contextlib.nullcontext():
            for layer in self.layer:
                x = maybe_checkpoint(layer, self.gradient_checkpointing, x, bias)
                if hidden is not None:
                    hidden.append(x)
        return x, hidden, attentions


class MPNetPreTrainedModel(PreTrainedModel):
    config_class = MPNetConfig
    base_model_prefix = "mpnet"
    _no_split_modules = ["MPNetLayer"]
    _keys_to_ignore_on_load_unexpected = (r"position_ids$", r"pooler\.", r"lm_head\.decoder\.bias$")
    # the relative position bias table is (buckets, heads): split by columns, each rank looks up its own heads
    _tp_plan = {
        "mpnet.encoder.layer.*.attention.attn.q": "colwise",
        "mpnet.encoder.layer.*.attention.attn.k": "colwise",
        "mpnet.encoder.layer.*.attention.attn.v": "colwise",
        "mpnet.encoder.layer.*.attention.attn.o": "rowwise",
        "mpnet.encoder.layer.*.intermediate.dense": "colwise",
        "mpnet.encoder.layer.*.output.dense": "rowwise",
        "mpnet.encoder.relative_attention_bias": "colwise",
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MPNetLMHead):  # also when a checkpoint without the head leaves it to initialise
            module.bias.data.zero_()


class MPNetModel(MPNetPreTrainedModel):
    def __init__(self, config: MPNetConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = MPNetEmbeddings(config)
        self.encoder = MPNetEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **_):
        check_inputs(input_ids, inputs_embeds)
        x = self.embeddings(input_ids, position_ids, inputs_embeds)
        T = x.shape[1]
        mask, _ = attention_mask_for(attention_mask, T, 0, T, causal=False, device=x.device)
        x, hidden, attentions = self.encoder(x, mask, output_hidden_states, output_attentions)
        return ModelOutput(last_hidden_state=x, pooler_output=self.pooler(x) if self.pooler is not None else None,
                           hidden_states=tuple(hidden) if hidden is not None else None,
                           attentions=tuple(attentions) if attentions is not None else None)


def _outputs(out, **fields):
    return ModelOutput(**fields, hidden_states=out.hidden_states, attentions=out.attentions)


class MPNetLMHead(nn.Module):
    def __init__(self, config: MPNetConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # the bias lives here (the reference's checkpoints store `lm_head.bias`; its decoder.bias is a tied copy)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h):
        return F.linear(self.layer_norm(F.gelu(self.dense(h))), self.decoder.weight, self.bias)


class MPNetForMaskedLM(MPNetPreTrainedModel):
    _tied_weights_keys = {"lm_head.decoder.weight": "mpnet.embeddings.word_embeddings.weight"}

    def __init__(self, config: MPNetConfig) -> None:
        super().__init__(config)
        self.mpnet = MPNetModel(config, add_pooling_layer=False)
        self.lm_head = MPNetLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **_):
        out = self.mpnet(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                         output_hidden_states)
        logits = self.lm_head(out.last_hidden_state)
        loss = token_loss(logits, labels) if labels is not None else None
        return _outputs(out, loss=loss, logits=logits)


class MPNetClassificationHead(nn.Module):
    """The first (<s>) token through dropout, dense, tanh, dropout, out_proj."""

    def __init__(self, config: MPNetConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, h):
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(h[:, 0])))))


class MPNetForSequenceClassification(MPNetPreTrainedModel):
    def __init__(self, config: MPNetConfig) -> None:
        super().__init__(config)
        self.mpnet = MPNetModel(config, add_pooling_layer=False)
        self.classifier = MPNetClassificationHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **_):
        out = self.mpnet(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                         output_hidden_states)
        logits = self.classifier(out.last_hidden_state)
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        return _outputs(out, loss=loss, logits=logits)


class MPNetForMultipleChoice(MPNetPreTrainedModel):
    """Scores each choice from the pooler output; inputs are (batch, num_choices, seq_len)."""

    def __init__(self, config: MPNetConfig) -> None:
        super().__init__(config)
        self.mpnet = MPNetModel(config)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **_):
        choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        ids, mask, positions, embeds = flatten_choices(input_ids, attention_mask, position_ids, inputs_embeds)
        out = self.mpnet(ids, mask, positions, embeds, output_attentions, output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output)).view(-1, choices)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return _outputs(out, loss=loss, logits=logits)


class MPNetForTokenClassification(MPNetPreTrainedModel):
    def __init__(self, config: MPNetConfig) -> None:
        super().__init__(config)
        self.mpnet = MPNetModel(config, add_pooling_layer=False)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **_):
        out = self.mpnet(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                         output_hidden_states)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = token_loss(logits, labels) if labels is not None else None
        return _outputs(out, loss=loss, logits=logits)


class MPNetForQuestionAnswering(MPNetPreTrainedModel):
    def __init__(self, config: MPNetConfig) -> None:
        super().__init__(config)
        self.mpnet = MPNetModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **_):
        out = self.mpnet(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                         output_hidden_states)
        start, end, loss = span_outputs(self.qa_outputs(out.last_hidden_state), start_positions, end_positions)
        return _outputs(out, loss=loss, start_logits=start, end_logits=end)


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"mpnet": (MPNetConfig, {
    "base": MPNetModel, "masked-lm": MPNetForMaskedLM, "sequence-classification": MPNetForSequenceClassification,
    "token-classification": MPNetForTokenClassification, "question-answering": MPNetForQuestionAnswering,
    "multiple-choice": MPNetForMultipleChoice})}
