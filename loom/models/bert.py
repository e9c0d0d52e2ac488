"""BERT: bidirectional post-LayerNorm encoder with absolute positions and token types, plus the usual heads."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from loom.configuration import TOKEN_ID_TYPES, PretrainedConfig
from loom.kernels import linear_act
from loom.modeling import PreTrainedModel
from loom.models.cache import DynamicCache
from loom.models.common import activation, attention, attention_mask_for, causal_inputs, causal_lm_loss, \
    check_inputs, classification_loss, encoder_threads, maybe_checkpoint, recording_attentions, span_outputs, \
    token_loss
from loom.outputs import ModelOutput


class BertConfig(PretrainedConfig):
    model_type = "bert"
    defaults = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                    initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, classifier_dropout=None,
                    tie_word_embeddings=True, use_cache=True, add_cross_attention=False)
    field_types = {**TOKEN_ID_TYPES, "classifier_dropout": (float, None)}


class _CpuDropoutFunction(torch.autograd.Function):
    """Dropout's semantics (zero each element with probability p, scale the rest by 1/(1-p)) with the mask drawn by
    one uniform_ pass: torch's CPU dropout draws it with bernoulli_, which costs about twice as much, and dropout is
    a visible share of a CPU training step."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        # uniforms in fp32 whatever x's dtype, so the keep probability is exact under bf16 too; the scale is applied
        # in x's dtype, as torch's dropout does
        mask = torch.rand(x.shape, dtype=torch.float32).ge_(p).to(x.dtype).mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, with a cheaper mask on the CPU (accelerators keep torch's fused kernel)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    return _CpuDropoutFunction.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout (same module type and repr) running `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def _cpu_attention_with_dropout(q, k, v, mask, p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), masked) with dropout, @ v: what SDPA computes, written out for CPU training. With
    dropout SDPA takes its math path on the CPU, which scales q and k separately and runs a NaN-safe softmax (three
    extra passes over the scores). A query with nothing to attend to gets zeros, as from SDPA."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    probs = torch.softmax(scores if mask is None else scores.masked_fill(~mask, float("-inf")), dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # a fully masked row's softmax is NaN
    return torch.matmul(dropout(probs, p, True), v)


def absolute_positions(position_ids, x: torch.Tensor, max_positions: int) -> torch.Tensor:
    """Positions into an absolute position table for the (B, T, ...) embeddings `x` (0..T-1 unless given); a
    sequence longer than the table is an error naming max_position_embeddings."""
    T = x.shape[1]
    if T > max_positions:
        raise ValueError(f"sequence of {T} tokens is longer than max_position_embeddings={max_positions}; "
                         "truncate the input (e.g. tokenizer(..., truncation=True))")
    return torch.arange(T, device=x.device)[None] if position_ids is None else position_ids


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig, width: int | None = None) -> None:
        """`width`: the embedding size (default hidden_size; ELECTRA's are narrower and projected up)."""
        super().__init__()
        width = width or config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, width)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.max_positions = config.max_position_embeddings

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        position_ids = absolute_positions(position_ids, x, self.max_positions)
        if token_type_ids is None:
            types = self.token_type_embeddings.weight[0]
        else:
            types = self.token_type_embeddings(token_type_ids)
        x = x + types + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head attention: bidirectional (also ViT's: its configs add `qkv_bias`), causal with a key/value cache
    (config.is_decoder), or over an encoder's states (the cross-attention of a decoder with add_cross_attention)."""

    def __init__(self, config: BertConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size={config.hidden_size} is not a multiple of num_attention_heads="
                             f"{config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        bias = getattr(config, "qkv_bias", True)
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.dropout = config.attention_probs_dropout_prob

    def forward(self, x, mask=None, queries: slice | None = None, is_causal: bool = False, cache=None,
                cache_position=None, source=None):
        """`queries`: the positions that ask (default all); keys and values always come from every position of x,
        or of `source` (an encoder's states, for cross-attention). `cache` takes this layer's new keys and values
        and returns all of them (a decoder's self-attention)."""
        B, T, C = x.shape
        xq = x if queries is None else x[:, queries]
        if mask is not None and queries is not None:
            mask = mask[:, :, queries]
        source = x if source is None else source
        q, k, v = self.query(xq), self.key(source), self.value(source)
        # -1 heads: under tensor parallelism each rank holds only its share of the heads
        q, k, v = (t.view(B, t.shape[1], -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, cache_position)
        implementation = self.config._attn_implementation
        if self.training and self.dropout > 0.0 and x.device.type == "cpu" and implementation == "sdpa" and \
                not is_causal:
            out = _cpu_attention_with_dropout(q, k, v, mask, self.dropout)
        else:
            out = attention(q, k, v, mask, is_causal, implementation=implementation,
                            dropout=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, q.shape[2], -1)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, layer_idx)
        self.output = BertSelfOutput(config)

    def forward(self, x, mask, queries=None, *args):
        """`args`: BertSelfAttention's is_causal, cache, cache_position, source."""
        return self.output(self.self(x, mask, queries, *args), x if queries is None else x[:, queries])


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = activation(config.hidden_act)

    def forward(self, x):
        return linear_act(self.dense, self.intermediate_act_fn, x)


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        self.attention = BertAttention(config, layer_idx)
        if config.add_cross_attention:  # a decoder's attention over an encoder's states, after its own
            if not config.is_decoder:
                raise ValueError("add_cross_attention=True needs is_decoder=True: cross-attention belongs to a "
                                 "decoder (set both, or neither to use the model as an encoder)")
            self.crossattention = BertAttention(config, layer_idx)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, mask, queries=None, is_causal=False, cache=None, cache_position=None, encoder_states=None,
                encoder_mask=None):
        """`queries`: compute the output at these positions only (default all)."""
        a = self.attention(x, mask, queries, is_causal, cache, cache_position)
        if encoder_states is not None:
            if not hasattr(self, "crossattention"):
                raise ValueError("encoder_hidden_states were given but this model has no cross-attention layers: "
                                 "build it with config.add_cross_attention=True (and is_decoder=True)")
            a = self.crossattention(a, encoder_mask, None, False, None, None, encoder_states)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(BertLayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x, mask, output_hidden_states=False, keep_first: int | None = None, output_attentions=None,
                decoding: tuple = ()):
        """`keep_first`: how many leading positions of the output the caller reads (default all). The last layer then
        computes its output at these positions only: its keys and values still see every position, so the rows
        kept are exact, and a head that reads one token of T saves most of a layer, forward and backward.
        `decoding`: a decoder's (is_causal, cache, cache_position, encoder_states, encoder_mask), as BertLayer takes."""
        hidden = [x] if output_hidden_states else None
        last = len(self.layer) - 1
        with recording_attentions(self.config, output_attentions) as attentions:
            for i, layer in enumerate(self.layer):
                queries = slice(0, keep_first) if i == last and keep_first is not None else None
                x = maybe_checkpoint(layer, self.gradient_checkpointing, x, mask, queries, *decoding)
                if hidden is not None:
                    hidden.append(x)
        return x, hidden, attentions


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, h):
        return self.activation(self.dense(h[:, 0]))


class BertPreTrainedModel(PreTrainedModel):
    config_class = BertConfig
    base_model_prefix = "bert"
    _no_split_modules = ["BertLayer"]
    _keys_to_ignore_on_load_unexpected = (r"position_ids$", r"cls\.predictions\.decoder\.bias$", r"^cls\.seq_rel",
                                          r"pooler\.")
    _tp_plan = {
        "bert.encoder.layer.*.attention.self.query": "colwise",
        "bert.encoder.layer.*.attention.self.key": "colwise",
        "bert.encoder.layer.*.attention.self.value": "colwise",
        "bert.encoder.layer.*.attention.output.dense": "rowwise",
        "bert.encoder.layer.*.intermediate.dense": "colwise",
        "bert.encoder.layer.*.output.dense": "rowwise",
    }


class BertModel(BertPreTrainedModel):
    """The encoder; with config.is_decoder a causal decoder (key/value cache, and cross-attention over
    encoder_hidden_states when config.add_cross_attention), as the reference's BertModel."""

    embeddings_class = BertEmbeddings
    runs_as_decoder = True  # False for a variant whose decoder positions differ (RoBERTa's)

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        for key in ("is_decoder", "add_cross_attention") if not self.runs_as_decoder else ():
            if getattr(config, key, False):
                raise ValueError(f"{config._name_or_path or 'config'}: {key}=true asks for this encoder as a decoder "
                                 "(a causal-LM or encoder-decoder checkpoint); loom runs it bidirectionally only: set "
                                 "it to false to use it as an encoder")
        self.embeddings = self.embeddings_class(config)
        self.add_variant_modules(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def add_variant_modules(self, config) -> None:
        """Hook for a variant's extra modules between the embeddings and the encoder (ELECTRA's projection)."""

    def embed(self, input_ids, token_type_ids, position_ids, inputs_embeds):
        return self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_hidden_states=None, return_dict=None, *,
                keep_first: int | None = None, output_attentions=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, use_cache=None, cache_position=None, **_):
        """`keep_first` (internal, for heads, like causal LMs' `logits_to_keep`): how many leading positions of
        last_hidden_state the caller reads; only these are computed and returned (the pooler reads position 0). Ignored
        when hidden states or attentions are requested, so that every output keeps its full length, and in a
        decoder."""
        check_inputs(input_ids, inputs_embeds)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if encoder_hidden_states is not None and not self.config.is_decoder:
            raise ValueError("encoder_hidden_states are a decoder's input (its cross-attention); this model is an "
                             "encoder: build it with config.is_decoder=True and add_cross_attention=True")
        decoding, cache = (), None
        if self.config.is_decoder or past_key_values is not None:
            cache, position_ids, mask, decoding = self.decoder_inputs(
                T, device, attention_mask, position_ids, encoder_hidden_states, encoder_attention_mask,
                past_key_values, use_cache, cache_position)
            keep_first = None
        else:
            mask, _ = attention_mask_for(attention_mask, T, 0, T, causal=False, device=device)
        x = self.embed(input_ids, token_type_ids, position_ids, inputs_embeds)
        if output_hidden_states or output_attentions:
            keep_first = None
        with encoder_threads(self.encoder, x, mask, self.config) if not decoding else contextlib.nullcontext():
            x, hidden, attentions = self.encoder(x, mask, output_hidden_states, keep_first, output_attentions,
                                                 decoding)
        cross = None
        if attentions is not None and encoder_hidden_states is not None:  # each layer recorded itself, then cross
            attentions, cross = attentions[0::2], attentions[1::2]
        pooled = self.pooler(x) if self.pooler is not None else None
        return ModelOutput(last_hidden_state=x, pooler_output=pooled, past_key_values=cache,
                           hidden_states=tuple(hidden) if hidden is not None else None,
                           attentions=tuple(attentions) if attentions is not None else None,
                           cross_attentions=tuple(cross) if cross is not None else None)

    def decoder_inputs(self, T, device, attention_mask, position_ids, encoder_states, encoder_mask, cache, use_cache,
                       cache_position):
        """A decoder's (cache to return, position_ids, causal mask, the layers' decoding inputs) for T new tokens.
        An encoder handed a cache (generate's, for an LM head without is_decoder) writes into it and attends both ways,
        but returns none, as the reference."""
        use_cache = (self.config.use_cache if use_cache is None else use_cache) and self.config.is_decoder
        if use_cache and cache is None:
            cache = DynamicCache()
        cache_position, past, mask, is_causal = causal_inputs(cache, attention_mask, cache_position, T, device,
                                                              causal=self.config.is_decoder)
        if past is not None and past + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + T} tokens is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}; truncate the input or generate fewer tokens")
        if position_ids is None:
            position_ids = cache_position[None]
        if encoder_states is not None and encoder_mask is not None:
            encoder_mask, _ = attention_mask_for(encoder_mask, T, 0, encoder_states.shape[1], causal=False,
                                                 device=device)
        decoding = (is_causal, cache, cache_position, encoder_states, encoder_mask)
        return (cache if use_cache else None), position_ids, mask, decoding


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig, size: int | None = None) -> None:
        """`size`: the width it maps to (hidden_size; DeBERTa's legacy head maps to its embedding size)."""
        super().__init__()
        size = size or config.hidden_size
        self.dense = nn.Linear(config.hidden_size, size)
        self.transform_act_fn = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(size, eps=config.layer_norm_eps)

    def forward(self, h):
        return self.LayerNorm(self.transform_act_fn(self.dense(h)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h):
        return F.linear(self.transform(h), self.decoder.weight, self.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, h):
        return self.predictions(h)


class _BertHeadModel(BertPreTrainedModel):
    """A head over the encoder, which sits at `base_model_prefix` (`bert.`, `roberta.`, ...) as in checkpoints;
    variants set `model_class` and the prefix."""

    model_class = BertModel
    add_pooling_layer = False

    def add_encoder(self, config) -> None:
        setattr(self, self.base_model_prefix, self.model_class(config, add_pooling_layer=self.add_pooling_layer))

    def encode(self, *args, **kwargs):
        return getattr(self, self.base_model_prefix)(*args, **kwargs)


class BertForMaskedLM(_BertHeadModel):
    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.add_encoder(config)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None, output_attentions=None,
                **_):
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          output_hidden_states, output_attentions=output_attentions)
        logits = self.cls(out.last_hidden_state)
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                           attentions=out.attentions)


class BertLMHeadModel(_BertHeadModel):
    """BERT as a left-to-right language model (config.is_decoder=True): causal self-attention with a key/value cache,
    cross-attention over `encoder_hidden_states` when config.add_cross_attention, and the masked-LM head predicting
    the next token. Without is_decoder it attends both ways, as in the reference (which warns about it)."""

    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}
    _can_generate = True

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.add_encoder(config)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, labels=None,
                past_key_values=None, use_cache=None, output_hidden_states=None, cache_position=None,
                logits_to_keep: int = 0, return_dict=None, num_items_in_batch=None, output_attentions=None,
                shift_labels=None, **_):
        """`shift_labels`: targets already shifted (position t predicts shift_labels[t]), as under sequence
        parallelism; the loss then reads them instead of shifting `labels`."""
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          output_hidden_states, output_attentions=output_attentions,
                          encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                          past_key_values=past_key_values, use_cache=False if labels is not None else use_cache,
                          cache_position=cache_position)
        h = out.last_hidden_state
        logits = self.cls(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch) if shift_labels is None else \
                token_loss(logits, shift_labels, num_items_in_batch)
        return ModelOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                           hidden_states=out.hidden_states, attentions=out.attentions,
                           cross_attentions=out.cross_attentions)


class _BertWithHead(_BertHeadModel):
    """Shared body of the classification-style heads: the encoder, dropout, one Linear."""

    head_name = "classifier"

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.add_encoder(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p)
        setattr(self, self.head_name, self.make_head(config))
        self.post_init()

    def make_head(self, config):
        return nn.Linear(config.hidden_size, config.num_labels)


class BertForSequenceClassification(_BertWithHead):
    add_pooling_layer = True

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None,
                output_attentions=None, **_):
        # the pooler reads the first token only, so the last layer computes only that one
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          output_hidden_states, keep_first=1, output_attentions=output_attentions)
        logits = self.classify(out)
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                           attentions=out.attentions)

    def classify(self, out):
        return self.classifier(self.dropout(out.pooler_output))


class BertForTokenClassification(_BertWithHead):
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None, output_attentions=None,
                **_):
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          output_hidden_states, output_attentions=output_attentions)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                           attentions=out.attentions)


class BertForQuestionAnswering(_BertWithHead):
    head_name = "qa_outputs"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_hidden_states=None,
                return_dict=None, output_attentions=None, **_):
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          output_hidden_states, output_attentions=output_attentions)
        start, end, loss = span_outputs(self.qa_outputs(out.last_hidden_state), start_positions, end_positions)
        return ModelOutput(loss=loss, start_logits=start, end_logits=end, hidden_states=out.hidden_states,
                           attentions=out.attentions)


class BertForMultipleChoice(_BertWithHead):
    """Scores each of C choices: inputs are (B, C, T), logits (B, C)."""

    add_pooling_layer = True
    reads_first_token = True  # the classifier reads position 0 only, so the last layer computes only that row

    def make_head(self, config):
        return nn.Linear(config.hidden_size, 1)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None,
                output_attentions=None, **_):
        given = input_ids if input_ids is not None else inputs_embeds[..., 0] if inputs_embeds is not None else None
        if given is None or given.dim() != 3:
            raise ValueError(f"{type(self).__name__} takes input_ids of shape (batch, num_choices, seq_len) (or "
                             "inputs_embeds with a hidden dimension after those), got "
                             f"{None if given is None else tuple(given.shape)}; stack each example's choices")
        choices = given.shape[1]
        flat = [t.flatten(0, 1) if t is not None else None
                for t in (input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)]  # (B*C, T, ...)
        out = self.encode(*flat, output_hidden_states, keep_first=1 if self.reads_first_token else None,
                          output_attentions=output_attentions)
        logits = self.classify(out).view(-1, choices)
        loss = F.cross_entropy(logits.float(), labels.view(-1)) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)

    def classify(self, out):
        return self.classifier(self.dropout(out.pooler_output))


class BertOnlyNSPHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled):
        return self.seq_relationship(pooled)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, h, pooled):
        return self.predictions(h), self.seq_relationship(pooled)


class BertForNextSentencePrediction(_BertHeadModel):
    """Whether sentence B follows sentence A (label 0) or is random (label 1), from the pooled [CLS]."""

    add_pooling_layer = True

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.add_encoder(config)
        self.cls = BertOnlyNSPHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None,
                output_attentions=None, **_):
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          output_hidden_states, keep_first=1, output_attentions=output_attentions)
        logits = self.cls(out.pooler_output)
        loss = F.cross_entropy(logits.float(), labels.view(-1)) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class BertForPreTraining(_BertHeadModel):
    """Masked-LM and next-sentence heads together; the loss is their sum when both label sets are given."""

    add_pooling_layer = True
    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.add_encoder(config)
        self.cls = BertPreTrainingHeads(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, next_sentence_label=None, output_hidden_states=None,
                return_dict=None, output_attentions=None, **_):
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          output_hidden_states, output_attentions=output_attentions)
        prediction, relationship = self.cls(out.last_hidden_state, out.pooler_output)
        loss = None
        if labels is not None and next_sentence_label is not None:
            loss = token_loss(prediction, labels) + F.cross_entropy(relationship.float(), next_sentence_label.view(-1))
        return ModelOutput(loss=loss, prediction_logits=prediction, seq_relationship_logits=relationship,
                           hidden_states=out.hidden_states, attentions=out.attentions)


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"bert": (BertConfig, {
    "base": BertModel, "causal-lm": BertLMHeadModel, "masked-lm": BertForMaskedLM, "sequence-classification": BertForSequenceClassification,
    "token-classification": BertForTokenClassification, "question-answering": BertForQuestionAnswering,
    "multiple-choice": BertForMultipleChoice, "next-sentence-prediction": BertForNextSentencePrediction,
    "pretraining": BertForPreTraining})}
