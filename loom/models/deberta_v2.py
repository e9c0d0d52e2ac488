"""DeBERTa-v2 (and v3, which uses the same model_type): a post-LayerNorm encoder whose attention adds
content-to-position and position-to-content terms over (log-bucketed) relative positions, with an optional
convolution after the first layer, and its heads."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loom.configuration import TOKEN_ID_TYPES, PretrainedConfig
from loom.modeling import PreTrainedModel
from loom.models.bert import BertIntermediate, BertOutput, BertPredictionHeadTransform, BertSelfOutput, Dropout, \
    absolute_positions
from loom.models.common import activation, check_activation, check_inputs, classification_loss, maybe_checkpoint, \
    recording_attentions, span_outputs, token_loss
from loom.outputs import ModelOutput

POSITION_ATTENTION_TYPES = ("c2p", "p2c")


class DebertaV2Config(PretrainedConfig):
    model_type = "deberta-v2"
    defaults = dict(vocab_size=128100, hidden_size=1536, num_hidden_layers=24, num_attention_heads=24,
                    intermediate_size=6144, hidden_act="gelu", hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=0,
                    initializer_range=0.02, layer_norm_eps=1e-7, relative_attention=False, max_relative_positions=-1,
                    pad_token_id=0, position_biased_input=True, pos_att_type=None, pooler_dropout=0.0,
                    pooler_hidden_act="gelu", legacy=True, tie_word_embeddings=True, use_cache=False)
    # keys the reference reads only when present (v3 checkpoints set most of them)
    field_types = {**TOKEN_ID_TYPES, "pos_att_type": (str, list[str], None), "pooler_hidden_size": (int,),
                   "position_buckets": (int,), "share_att_key": (bool,), "norm_rel_ebd": (str,),
                   "conv_kernel_size": (int,), "conv_act": (str,), "conv_groups": (int,), "embedding_size": (int,),
                   "attention_head_size": (int,), "cls_dropout": (float, None)}

    def __post_init__(self) -> None:
        if isinstance(self.pos_att_type, str):  # the older "p2c|c2p" spelling, stored as a list (as the reference)
            self.pos_att_type = [t.strip() for t in self.pos_att_type.lower().split("|")]
        if getattr(self, "pooler_hidden_size", None) is None:
            self.pooler_hidden_size = self.hidden_size
        for key in ("hidden_act", "pooler_hidden_act", "conv_act"):
            if hasattr(self, key):
                check_activation(self, key)
        super().__post_init__()


def relative_span(config) -> int:
    """How many relative distances each side the position embeddings cover: position_buckets when set, otherwise
    max_relative_positions (max_position_embeddings when that is unset)."""
    buckets = getattr(config, "position_buckets", -1)
    return buckets if buckets > 0 else max_relative_positions(config)


def max_relative_positions(config) -> int:
    return config.max_relative_positions if config.max_relative_positions >= 1 else config.max_position_embeddings


def log_bucket_positions(rel: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """Distances within buckets/2 stay exact; longer ones share buckets that widen logarithmically up to
    max_position. The float32 arithmetic is the reference's, so that the ceilings land in the same buckets."""
    mid = buckets // 2
    near = (rel < mid) & (rel > -mid)
    dist = torch.where(near, torch.full_like(rel, mid - 1), rel.abs())
    growth = torch.log(torch.tensor((max_position - 1) / mid))
    far = torch.ceil(torch.log(dist / mid) / growth * (mid - 1)) + mid
    return torch.where(dist <= mid, rel.to(far.dtype), far * torch.sign(rel)).long()


def relative_positions(T: int, config, device) -> torch.Tensor:
    """(T, T) query position minus key position, log-bucketed when the config has position_buckets."""
    pos = torch.arange(T, device=device)
    rel = pos[:, None] - pos[None, :]
    buckets = getattr(config, "position_buckets", -1)
    if buckets > 0:
        rel = log_bucket_positions(rel, buckets, max_relative_positions(config))
    return rel


class DebertaV2Embeddings(nn.Module):
    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        size = getattr(config, "embedding_size", config.hidden_size)
        self.word_embeddings = nn.Embedding(config.vocab_size, size, padding_idx=config.pad_token_id)
        # v3 checkpoints add no absolute positions: relative attention alone places the tokens
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, size) \
            if config.position_biased_input else None
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, size) if config.type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(size, config.hidden_size, bias=False) if size != config.hidden_size else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.max_positions = config.max_position_embeddings

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds, mask):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(absolute_positions(position_ids, x, self.max_positions))
        if self.token_type_embeddings is not None:
            types = self.token_type_embeddings.weight[0] if token_type_ids is None else \
                self.token_type_embeddings(token_type_ids)
            x = x + types
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.LayerNorm(x)
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)  # padding positions start as zeros
        return self.dropout(x)


class DisentangledSelfAttention(nn.Module):
    """softmax((q k + c2p + p2c) / sqrt(d * n), masked) v, where c2p reads each query against the key's relative
    position embedding, p2c each key against the query's, and n counts the terms summed (1 + the pos_att_type)."""

    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        self.config = config
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size={config.hidden_size} is not a multiple of num_attention_heads="
                             f"{config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "attention_head_size", config.hidden_size // config.num_attention_heads)
        inner = self.num_heads * self.head_dim
        self.query_proj = nn.Linear(config.hidden_size, inner)
        self.key_proj = nn.Linear(config.hidden_size, inner)
        self.value_proj = nn.Linear(config.hidden_size, inner)
        self.types = [t for t in POSITION_ATTENTION_TYPES if t in (config.pos_att_type or ())]
        self.relative = config.relative_attention
        self.share_att_key = getattr(config, "share_att_key", False)
        if self.relative:
            self.span = relative_span(config)
            self.pos_dropout = Dropout(config.hidden_dropout_prob)
            if not self.share_att_key:
                if "c2p" in self.types:
                    self.pos_key_proj = nn.Linear(config.hidden_size, inner)
                if "p2c" in self.types:
                    self.pos_query_proj = nn.Linear(config.hidden_size, inner)
        # the reference counts the position terms in the scale even when relative_attention is off
        self.scale = 1.0 / math.sqrt(self.head_dim * (1 + len(self.types)))
        self.dropout = config.attention_probs_dropout_prob

    def _heads(self, x):  # (..., T, H*D) -> (..., H, T, D); -1: a tensor-parallel rank holds only its heads
        return x.unflatten(-1, (-1, self.head_dim)).transpose(-3, -2)

    def position_bias(self, q, k, rel_pos, rel_embeddings):
        """(B, H, T, T) c2p + p2c terms, already scaled."""
        rel = self.pos_dropout(rel_embeddings[: 2 * self.span])
        B, H, T, _ = q.shape
        score = 0
        if "c2p" in self.types:
            pos_k = self._heads((self.key_proj if self.share_att_key else self.pos_key_proj)(rel))  # (H, 2S, D)
            index = (rel_pos + self.span).clamp(0, 2 * self.span - 1).expand(B, H, T, T)
            score = score + torch.matmul(q, pos_k.transpose(-1, -2)).gather(-1, index)
        if "p2c" in self.types:
            pos_q = self._heads((self.query_proj if self.share_att_key else self.pos_query_proj)(rel))  # (H, 2S, D)
            index = (self.span - rel_pos).clamp(0, 2 * self.span - 1).expand(B, H, T, T)
            score = score + torch.matmul(k, pos_q.transpose(-1, -2)).gather(-1, index).transpose(-1, -2)
        return score * self.scale

    def forward(self, x, mask, rel_pos, rel_embeddings, attentions: list | None):
        """`mask`: None, or (additive (B, 1, 1, T) key mask with the dtype's lowest value at padding, (B, 1, T, 1)
        bool, True at real queries)."""
        q, k, v = (self._heads(proj(x)) for proj in (self.query_proj, self.key_proj, self.value_proj))  # (B, H, T, D)
        keys, queries = mask if mask is not None else (None, None)
        bias = keys
        if self.relative and self.types:
            bias = self.position_bias(q, k, rel_pos, rel_embeddings)
            if keys is not None:
                bias = bias + keys  # a masked key stays at the lowest value
        p = self.dropout if self.training else 0.0
        # SDPA gives the reference's eager values here (its only implementation); "eager" writes the math out
        eager = attentions is not None or self.config._attn_implementation == "eager"
        if not eager:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=self.scale)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            probs = (scores if bias is None else scores + bias).softmax(-1)
            if queries is not None:
                probs = torch.where(queries, probs, 1.0 / probs.shape[-1])
            if attentions is not None:
                attentions.append(probs)
            out = torch.matmul(F.dropout(probs, p, self.training), v)
        if queries is not None and not eager:
            # the reference masks a padding query's whole row, so it averages every value, whatever q and k are
            out = torch.where(queries, out, v.mean(-2, keepdim=True))
        return out.transpose(1, 2).flatten(2)


class DebertaV2Attention(nn.Module):
    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        self.self = DisentangledSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, mask, rel_pos, rel_embeddings, attentions):
        return self.output(self.self(x, mask, rel_pos, rel_embeddings, attentions), x)


class DebertaV2Layer(nn.Module):
    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        self.attention = DebertaV2Attention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, mask, rel_pos, rel_embeddings, attentions=None):
        a = self.attention(x, mask, rel_pos, rel_embeddings, attentions)
        return self.output(self.intermediate(a), a)


class ConvLayer(nn.Module):
    """DeBERTa-v2's convolution over the embeddings, added to the first layer's output."""

    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        size = config.conv_kernel_size
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, size, padding=(size - 1) // 2,
                              groups=getattr(config, "conv_groups", 1))
        self.conv_act = activation(getattr(config, "conv_act", "tanh"))
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, embedded, layer_out, keep):
        out = self.conv(embedded.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        if keep is not None:
            out = out.masked_fill(~keep[..., None], 0.0)
        out = self.LayerNorm(layer_out + self.conv_act(self.dropout(out)))
        return out if keep is None else out * keep[..., None].to(out.dtype)


class DebertaV2Encoder(nn.Module):
    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(DebertaV2Layer(config) for _ in range(config.num_hidden_layers))
        if config.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * relative_span(config), config.hidden_size)
        norms = [n.strip() for n in getattr(config, "norm_rel_ebd", "none").lower().split("|")]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if "layer_norm" in norms \
            else None
        self.conv = ConvLayer(config) if getattr(config, "conv_kernel_size", 0) > 0 else None
        self.gradient_checkpointing = False

    def relative_embeddings(self):
        if not self.config.relative_attention:
            return None
        rel = self.rel_embeddings.weight
        return self.LayerNorm(rel) if self.LayerNorm is not None else rel

    def forward(self, x, keep, output_hidden_states=False, output_attentions=None):
        """`keep`: (B, T) bool, True at real tokens, or None when nothing is padded."""
        T = x.shape[1]
        mask = None
        if keep is not None:  # no query attends to padding; a padding query attends evenly to all (the reference's)
            keys = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill_(~keep, torch.finfo(x.dtype).min)
            mask = (keys[:, None, None, :], keep[:, None, :, None])  # (B, 1, 1, T), (B, 1, T, 1)
        rel_pos = relative_positions(T, self.config, x.device) if self.config.relative_attention else None
        rel_embeddings = self.relative_embeddings()
        hidden = [x] if output_hidden_states else None
        embedded = x
        with recording_attentions(self.config, output_attentions) as attentions:
            for i, layer in enumerate(self.layer):
                x = maybe_checkpoint(layer, self.gradient_checkpointing, x, mask, rel_pos, rel_embeddings, attentions)
                if i == 0 and self.conv is not None:
                    x = self.conv(embedded, x, keep)
                if hidden is not None:
                    hidden.append(x)
        return x, hidden, attentions


class DebertaV2PreTrainedModel(PreTrainedModel):
    config_class = DebertaV2Config
    base_model_prefix = "deberta"
    _no_split_modules = ["DebertaV2Layer"]
    # v3 checkpoints carry absolute position embeddings that position_biased_input=false leaves unused
    _keys_to_ignore_on_load_unexpected = (r"position_embeddings", r"position_ids$", r"^mask_predictions\.")
    # the position projections (or, with share_att_key, the key/query projections) map the shared relative
    # embeddings to each rank's own heads, so c2p and p2c stay per head
    _tp_plan = {
        "deberta.encoder.layer.*.attention.self.query_proj": "colwise",
        "deberta.encoder.layer.*.attention.self.key_proj": "colwise",
        "deberta.encoder.layer.*.attention.self.value_proj": "colwise",
        "deberta.encoder.layer.*.attention.self.pos_key_proj": "colwise",
        "deberta.encoder.layer.*.attention.self.pos_query_proj": "colwise",
        "deberta.encoder.layer.*.attention.output.dense": "rowwise",
        "deberta.encoder.layer.*.intermediate.dense": "colwise",
        "deberta.encoder.layer.*.output.dense": "rowwise",
    }


class DebertaV2Model(DebertaV2PreTrainedModel):
    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__(config)
        self.embeddings = DebertaV2Embeddings(config)
        self.encoder = DebertaV2Encoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_hidden_states=None, return_dict=None, output_attentions=None, **_):
        check_inputs(input_ids, inputs_embeds)
        keep = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be (batch, sequence) with 1 at real tokens, got shape "
                                 f"{tuple(attention_mask.shape)}")
            if not bool(attention_mask.all()):
                keep = attention_mask.bool()
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, keep)
        x, hidden, attentions = self.encoder(x, keep, output_hidden_states, output_attentions)
        return ModelOutput(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None,
                           attentions=tuple(attentions) if attentions is not None else None)


class LegacyDebertaV2LMPredictionHead(nn.Module):
    """BERT's head; the decoder's bias is `bias` when the embeddings are tied (one tensor, saved as `bias`)."""

    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config, getattr(config, "embedding_size", config.hidden_size))
        self.decoder = nn.Linear(getattr(config, "embedding_size", config.hidden_size), config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h):
        return self.decoder(self.transform(h))


class LegacyDebertaV2OnlyMLMHead(nn.Module):
    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        self.predictions = LegacyDebertaV2LMPredictionHead(config)

    def forward(self, h):
        return self.predictions(h)


class DebertaV2LMPredictionHead(nn.Module):
    """The original DeBERTa head (legacy=false): its logits read the word embeddings directly."""

    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h, word_embeddings):
        return F.linear(self.LayerNorm(self.transform_act_fn(self.dense(h))), word_embeddings.weight, self.bias)


class DebertaV2OnlyMLMHead(nn.Module):
    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        self.lm_head = DebertaV2LMPredictionHead(config)

    def forward(self, h, word_embeddings):
        return self.lm_head(h, word_embeddings)


class DebertaV2ForMaskedLM(DebertaV2PreTrainedModel):
    _tied_weights_keys = {"cls.predictions.decoder.weight": "deberta.embeddings.word_embeddings.weight",
                          "cls.predictions.decoder.bias": "cls.predictions.bias"}

    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__(config)
        self.legacy = config.legacy
        self.deberta = DebertaV2Model(config)
        if self.legacy:
            self.cls = LegacyDebertaV2OnlyMLMHead(config)
        else:
            self._tied_weights_keys = {}
            self.lm_predictions = DebertaV2OnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder if self.legacy else None

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """As every model, and the head's own bias (tied to the decoder's) grows with the vocabulary too."""
        emb = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        head = self.cls.predictions if self.legacy else self.lm_predictions.lm_head
        grown = head.bias.new_zeros(emb.num_embeddings)
        n = min(grown.shape[0], head.bias.shape[0])
        grown[:n] = head.bias.detach()[:n]
        head.bias = nn.Parameter(grown)
        self.tie_weights()
        return emb

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None, output_attentions=None,
                **_):
        out = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states, output_attentions=output_attentions)
        h = out.last_hidden_state
        logits = self.cls(h) if self.legacy else self.lm_predictions(h, self.deberta.embeddings.word_embeddings)
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class ContextPooler(nn.Module):
    """The first token, dropout, dense, then pooler_hidden_act."""

    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.pooler_hidden_size, config.pooler_hidden_size)
        self.dropout = Dropout(config.pooler_dropout)
        self.act = activation(config.pooler_hidden_act)

    def forward(self, h):
        return self.act(self.dense(self.dropout(h[:, 0])))


def sequence_classification_loss(config, logits, labels):
    """The reference's DeBERTa loss: without a problem_type, one label means regression, integer labels below zero
    are skipped, and labels shaped like the logits are soft targets; otherwise as every other family."""
    if config.problem_type is not None:
        return classification_loss(config, logits, labels)
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.view(-1).to(labels.dtype), labels.view(-1))
    if labels.dim() == 1 or labels.shape[-1] == 1:
        labels = labels.view(-1)
        kept = labels >= 0
        if not bool(kept.any()):
            return logits.new_zeros(())
        return F.cross_entropy(logits[kept].float(), labels[kept].long())
    return -(logits.log_softmax(-1) * labels).sum(-1).mean()


class _PooledHead(DebertaV2PreTrainedModel):
    """DeBERTa, the context pooler, dropout (cls_dropout, else hidden_dropout_prob), one Linear."""

    outputs = None  # classifier width; None: num_labels

    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__(config)
        self.deberta = DebertaV2Model(config)
        self.pooler = ContextPooler(config)
        self.classifier = nn.Linear(config.hidden_size, self.outputs or config.num_labels)
        p = getattr(config, "cls_dropout", None)
        self.dropout = Dropout(config.hidden_dropout_prob if p is None else p)
        self.post_init()

    def pooled_logits(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                      output_hidden_states, output_attentions):
        out = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states, output_attentions=output_attentions)
        return self.classifier(self.dropout(self.pooler(out.last_hidden_state))), out


class DebertaV2ForSequenceClassification(_PooledHead):
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None,
                output_attentions=None, **_):
        logits, out = self.pooled_logits(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                         output_hidden_states, output_attentions)
        loss = sequence_classification_loss(self.config, logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class DebertaV2ForMultipleChoice(_PooledHead):
    outputs = 1

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None,
                output_attentions=None, **_):
        """Inputs are (batch, choices, T); each choice is scored on its own, then softmaxed across choices."""
        choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        flat = [t.flatten(0, 1) if t is not None else None
                for t in (input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)]
        logits, out = self.pooled_logits(*flat, output_hidden_states, output_attentions)
        logits = logits.view(-1, choices)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class DebertaV2ForTokenClassification(DebertaV2PreTrainedModel):
    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__(config)
        self.deberta = DebertaV2Model(config)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None, output_attentions=None,
                **_):
        out = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states, output_attentions=output_attentions)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class DebertaV2ForQuestionAnswering(DebertaV2PreTrainedModel):
    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__(config)
        self.deberta = DebertaV2Model(config)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_hidden_states=None,
                return_dict=None, output_attentions=None, **_):
        out = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states, output_attentions=output_attentions)
        start, end, loss = span_outputs(self.qa_outputs(out.last_hidden_state), start_positions, end_positions)
        return ModelOutput(loss=loss, start_logits=start, end_logits=end, hidden_states=out.hidden_states,
                           attentions=out.attentions)


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"deberta-v2": (DebertaV2Config, {
    "base": DebertaV2Model, "masked-lm": DebertaV2ForMaskedLM,
    "sequence-classification": DebertaV2ForSequenceClassification,
    "token-classification": DebertaV2ForTokenClassification, "question-answering": DebertaV2ForQuestionAnswering,
    "multiple-choice": DebertaV2ForMultipleChoice})}
