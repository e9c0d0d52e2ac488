"""GPT-NeoX (Pythia, GPT-NeoX-20B): LayerNorm blocks whose attention and MLP run in parallel
(`use_parallel_residual`, x + attn(ln1(x)) + mlp(ln2(x))) or in sequence, one fused `query_key_value` projection
whose rows hold [q; k; v] for each head in turn, partial rotary (`rotary_pct`, 0.25 by default) with base
`rotary_emb_base`, and the checkpoint's names: `gpt_neox.embed_in`, `final_layer_norm`, `embed_out`."""
from __future__ import annotations

from torch import nn

from loom.configuration import TOKEN_ID_TYPES, ConfigFieldError, PretrainedConfig
from loom.modeling import PreTrainedModel
from loom.models.common import (activation, causal_lm_loss, classification_loss, decoder_inputs, maybe_checkpoint,
                                recording_attentions)
from loom.models.heads import QuestionAnsweringHead, TokenClassificationHead
from loom.models.llama import LlamaAttention, last_token_pool
from loom.models.rope import RotaryEmbedding
from loom.outputs import ModelOutput


class GPTNeoXConfig(PretrainedConfig):
    model_type = "gpt_neox"
    defaults = dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                    intermediate_size=24576, hidden_act="gelu", attention_dropout=0.0, hidden_dropout=0.0,
                    classifier_dropout=0.1, max_position_embeddings=2048, initializer_range=0.02, layer_norm_eps=1e-5,
                    use_cache=True, bos_token_id=0, eos_token_id=2, tie_word_embeddings=False,
                    use_parallel_residual=True, rope_parameters=None, attention_bias=True)
    field_types = {**TOKEN_ID_TYPES, "rope_parameters": (dict, None), "rope_scaling": (dict, None),
                   "rotary_pct": (float,), "rotary_emb_base": (float,)}
    derived = ("head_dim", "num_key_value_heads")  # what loom's attention reads; GPT-NeoX has no such keys

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigFieldError(f"config hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                                   f"{self.num_attention_heads}; GPT-NeoX splits the hidden size evenly across the "
                                   "heads", "hidden_size")
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.num_key_value_heads = self.num_attention_heads  # one key/value head per query head, always
        # 5.x configs keep the rotary settings in rope_parameters; older ones (Pythia) in rotary_pct/rotary_emb_base
        params = dict(self.rope_parameters or getattr(self, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(self, "rotary_emb_base", 10000.0))
        params.setdefault("partial_rotary_factor", getattr(self, "rotary_pct", 0.25))
        params.setdefault("rope_type", params.pop("type", "default"))
        self.rope_parameters = params


class GPTNeoXAttention(LlamaAttention):
    qkv_name = "query_key_value"
    o_name = "dense"

    def project(self, x):
        B, T, _ = x.shape
        # rows come per head as [q_h; k_h; v_h], so a colwise tensor-parallel shard holds whole heads
        qkv = self.query_key_value(x).view(B, T, -1, 3 * self.head_dim)  # (B, T, heads, 3 D)
        return qkv.chunk(3, -1)


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_idx: int) -> None:
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_dropout = nn.Dropout(config.hidden_dropout)
        self.post_mlp_dropout = nn.Dropout(config.hidden_dropout)
        self.attention = GPTNeoXAttention(config, layer_idx)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, cache_position=None):
        attn = self.attention(self.input_layernorm(x), cos, sin, mask, is_causal, cache, cache_position)
        attn = self.post_attention_dropout(attn)
        if self.use_parallel_residual:  # both branches read x
            return self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(x))) + attn + x
        x = attn + x
        return self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(x))) + x


class GPTNeoXPreTrainedModel(PreTrainedModel):
    config_class = GPTNeoXConfig
    base_model_prefix = "gpt_neox"
    _no_split_modules = ["GPTNeoXLayer"]
    # old checkpoints (Pythia) carry the causal-mask and rotary buffers
    _keys_to_ignore_on_load_unexpected = (r"\.attention\.bias$", r"\.attention\.masked_bias$",
                                          r"\.rotary_emb\.inv_freq$")
    _tp_plan = {
        "gpt_neox.embed_in": "embedding",
        "gpt_neox.layers.*.attention.query_key_value": "colwise",
        "gpt_neox.layers.*.attention.dense": "rowwise",
        "gpt_neox.layers.*.mlp.dense_h_to_4h": "colwise",
        "gpt_neox.layers.*.mlp.dense_4h_to_h": "rowwise",
    }


class GPTNeoXModel(GPTNeoXPreTrainedModel):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__(config)
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.emb_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, config.head_dim)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_in

    def set_input_embeddings(self, value):
        self.embed_in = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, cache_position=None,
                return_dict=None, output_attentions=None, **_):
        inputs = decoder_inputs(self.config, self.embed_in, input_ids, inputs_embeds, attention_mask, past_key_values,
                                use_cache, cache_position, training=self.training)
        x, cache, cache_position, (mask, is_causal) = inputs.x, inputs.cache, inputs.cache_position, inputs.masks[None]
        if position_ids is None:
            position_ids = cache_position[None].expand(x.shape[0], x.shape[1])
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        x = self.emb_dropout(x)
        hidden = [x] if output_hidden_states else None
        with recording_attentions(self.config, output_attentions) as attentions:
            for layer in self.layers:
                x = maybe_checkpoint(layer, self.gradient_checkpointing, x, cos, sin, mask, is_causal, cache,
                                     cache_position)
                if hidden is not None:
                    hidden.append(x)
        x = self.final_layer_norm(x)
        if hidden is not None:
            hidden[-1] = x
        return ModelOutput(last_hidden_state=x, past_key_values=cache if inputs.use_cache else None,
                           hidden_states=tuple(hidden) if hidden is not None else None,
                           attentions=tuple(attentions) if attentions is not None else None)


class GPTNeoXForCausalLM(GPTNeoXPreTrainedModel):
    _tied_weights_keys = {"embed_out.weight": "gpt_neox.embed_in.weight"}
    _can_generate = True
    _tp_plan = {**GPTNeoXPreTrainedModel._tp_plan, "embed_out": "colwise_rep"}

    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__(config)
        self.gpt_neox = GPTNeoXModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # the reference's lm_head
        self.post_init()

    def get_output_embeddings(self):
        return self.embed_out

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, cache_position=None,
                logits_to_keep: int = 0, return_dict=None, num_items_in_batch=None, output_attentions=None, **_):
        out = self.gpt_neox(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                            output_hidden_states, cache_position, output_attentions=output_attentions)
        h = out.last_hidden_state
        logits = self.embed_out(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                           hidden_states=out.hidden_states, attentions=out.attentions)


class GPTNeoXForSequenceClassification(GPTNeoXPreTrainedModel):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__(config)
        self.gpt_neox = GPTNeoXModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                output_attentions=None, **_):
        if input_ids is not None and input_ids.shape[0] > 1 and self.config.pad_token_id is None:
            raise ValueError("batches of more than one sequence need config.pad_token_id to find each row's last "
                             "token; set it (e.g. to the tokenizer's pad id)")
        out = self.gpt_neox(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, False,
                            output_hidden_states, output_attentions=output_attentions)
        logits = last_token_pool(self.score(out.last_hidden_state), input_ids, self.config.pad_token_id)
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class GPTNeoXForTokenClassification(TokenClassificationHead, GPTNeoXPreTrainedModel):
    model_class = GPTNeoXModel
    head_name = "classifier"


class GPTNeoXForQuestionAnswering(QuestionAnsweringHead, GPTNeoXPreTrainedModel):
    model_class = GPTNeoXModel


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"gpt_neox": (GPTNeoXConfig, {
    "base": GPTNeoXModel, "causal-lm": GPTNeoXForCausalLM,
    "sequence-classification": GPTNeoXForSequenceClassification,
    "token-classification": GPTNeoXForTokenClassification, "question-answering": GPTNeoXForQuestionAnswering})}
