"""Llama: grouped-query attention, RoPE, RMSNorm, SwiGLU. Mistral and Qwen2 subclass it and state their differences."""
from __future__ import annotations

import torch
from torch import nn

from loom.configuration import TOKEN_ID_TYPES, PretrainedConfig
from loom.modeling import PreTrainedModel
from loom.models.cache import Cache
from loom.models.common import (RMSNorm, activation, attention, causal_lm_loss, classification_loss, decoder_inputs,
                                fused_decode_attention, fused_decode_layer, maybe_checkpoint,
                                recording_attentions, token_loss)
from loom.models.heads import QuestionAnsweringHead, TokenClassificationHead
from loom.models.rope import RotaryEmbedding, apply_rotary
from loom.outputs import ModelOutput


class LlamaConfig(PretrainedConfig):
    model_type = "llama"
    defaults = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                    max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
                    pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                    attention_bias=False, attention_dropout=0.0, mlp_bias=False, pretraining_tp=1)
    field_types = {**TOKEN_ID_TYPES, "num_key_value_heads": (int, None), "head_dim": (int, None),
                   "attention_dropout": (float, None), "pretraining_tp": (int, None), "rope_theta": (float,),
                   "rope_parameters": (dict, None), "rope_scaling": (dict, None)}

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if getattr(self, "rope_parameters", None) is None and getattr(self, "rope_scaling", None) is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": getattr(self, "rope_theta", 10000.0)}


class LlamaAttention(nn.Module):
    """Grouped-query attention with RoPE. Variants set class attributes (biases, checkpoint names of a fused qkv or
    of the output projection) or the instance's `q_norm` / `k_norm` (per-head norms before RoPE), `scaling`,
    `softcap`, `use_rope`, and may override `project` (fused or normalised projections)."""
    q_bias = k_bias = v_bias = None  # None: follow config.attention_bias (Qwen2 forces q/k/v biases on)
    o_bias = None
    qkv_name: str | None = None  # the checkpoint's name for one fused [q; k; v] Linear (its `project` splits it)
    o_name = "o_proj"  # the checkpoint's name for the output projection

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.scaling: float | None = None  # None: head_dim ** -0.5
        self.softcap: float | None = None
        self.use_rope = True
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        pick = lambda b: config.attention_bias if b is None else b  # noqa: E731
        h, q_out, kv_out = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.qkv_name is None:
            self.q_proj = nn.Linear(h, q_out, bias=pick(self.q_bias))
            self.k_proj = nn.Linear(h, kv_out, bias=pick(self.k_bias))
            self.v_proj = nn.Linear(h, kv_out, bias=pick(self.v_bias))
        else:
            setattr(self, self.qkv_name, nn.Linear(h, q_out + 2 * kv_out, bias=pick(self.q_bias)))
        setattr(self, self.o_name, nn.Linear(q_out, h, bias=pick(self.o_bias)))

    def project(self, x):
        """Queries, keys and values as (B, T, heads, head_dim)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, cos, sin, mask, is_causal, cache: Cache | None, cache_position=None):
        B, T, _ = x.shape
        q, k, v = self.project(x)  # (B, T, heads, D)
        out = None
        if T == 1 and self.use_rope and self.softcap is None and not self.training and not is_causal:
            out = fused_decode_attention(q, k, v, cos, sin, mask, cache, self.layer_idx, cache_position,
                                         implementation=self.config._attn_implementation, scale=self.scaling)
        if out is None:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
            if self.use_rope:
                q, k = apply_rotary(q, k, cos, sin)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx, cache_position)
            out = attention(q, k, v, mask, is_causal, implementation=self.config._attn_implementation,
                            dropout=self.dropout if self.training else 0.0, scale=self.scaling, softcap=self.softcap)
            out = out.transpose(1, 2).reshape(B, T, -1)
        return getattr(self, self.o_name)(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        h, i, b = config.hidden_size, intermediate_size or config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.act_fn = activation(config.hidden_act)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block. Variants set `attention_class`, `norm_class`, `mlp_name` (the checkpoint's name for the
    feed-forward module) and `make_mlp` (e.g. a mixture of experts on some layers)."""
    attention_class = LlamaAttention
    norm_class = RMSNorm
    mlp_name = "mlp"

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = self.attention_class(config, layer_idx)
        setattr(self, self.mlp_name, self.make_mlp(config, layer_idx))
        self.input_layernorm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = self.norm_class(config.hidden_size, config.rms_norm_eps)

    def make_mlp(self, config: LlamaConfig, layer_idx: int) -> nn.Module:
        return LlamaMLP(config)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, cache_position=None):
        mlp = getattr(self, self.mlp_name)
        if x.shape[1] == 1 and cache is not None and not is_causal and not self.training and self._llama_shaped(mlp):
            attn = self.self_attn
            fused = fused_decode_layer(x, cos, sin, mask, cache, attn.layer_idx, cache_position, attn=attn, mlp=mlp,
                                       norms=(self.input_layernorm, self.post_attention_layernorm),
                                       implementation=attn.config._attn_implementation, scale=attn.scaling)
            if fused is not None:  # a decode step, in one kernel call up to the MLP's activation
                x, gate, up = fused
                return x + mlp.down_proj(mlp.act_fn(gate) * up)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, cache_position)
        return x + mlp(self.post_attention_layernorm(x))

    def _llama_shaped(self, mlp) -> bool:
        """Whether this layer computes Llama's own step (no variant changed a forward, the projections, the norms
        or RoPE), which is what `fused_decode_layer` replaces."""
        attn = self.self_attn
        return (type(self).forward is LlamaDecoderLayer.forward and type(attn).forward is LlamaAttention.forward
                and type(attn).project is LlamaAttention.project and type(mlp).forward is LlamaMLP.forward
                and attn.qkv_name is None and attn.o_name == "o_proj" and attn.use_rope and attn.q_norm is None
                and attn.softcap is None)


class LlamaPreTrainedModel(PreTrainedModel):
    config_class = LlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["LlamaDecoderLayer"]
    _tp_plan = {
        "model.embed_tokens": "embedding",
        "model.layers.*.self_attn.q_proj": "colwise",
        "model.layers.*.self_attn.k_proj": "colwise",
        "model.layers.*.self_attn.v_proj": "colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "lm_head": "colwise_rep",
    }


class LlamaModel(LlamaPreTrainedModel):
    """Embeddings, decoder layers, final norm. Variants override `layer_windows` (sliding-window layers),
    `rope_tables` (per-window RoPE), `embed` (scaled embeddings), the classes it builds or the final norm's name."""
    layer_class = LlamaDecoderLayer
    norm_class = RMSNorm
    norm_name = "norm"  # the checkpoint's name for the final norm
    causal = True  # False: every token attends both ways (a family run as an encoder)

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(self.layer_class(config, i) for i in range(config.num_hidden_layers))
        setattr(self, self.norm_name, self.norm_class(config.hidden_size, config.rms_norm_eps))
        self.rotary_emb = RotaryEmbedding(config, config.head_dim)
        self.windows = self.layer_windows()
        self.gradient_checkpointing = False
        self.post_init()

    def layer_windows(self) -> list[int | None]:
        """Each layer's sliding window (None: full attention). Llama has none (the reference ignores a
        `sliding_window` key on Llama); families with `layer_types` read them from the config."""
        if "layer_types" not in self.config_class.defaults:
            return [None] * self.config.num_hidden_layers
        window = self.config.sliding_window
        return [window if t == "sliding_attention" else None for t in self.config.layer_types]

    def rope_tables(self, position_ids, dtype) -> dict:
        """window -> (cos, sin); one table for every window unless a family rotates sliding layers differently."""
        tables = self.rotary_emb(position_ids, dtype)
        return dict.fromkeys(self.windows, tables)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, cache_position=None,
                return_dict=None, output_attentions=None, **_):
        inputs = decoder_inputs(self.config, self.embed, input_ids, inputs_embeds, attention_mask, past_key_values,
                                use_cache, cache_position, training=self.training, windows=self.windows,
                                causal=self.causal)
        x, cache, cache_position = inputs.x, inputs.cache, inputs.cache_position
        if position_ids is None:
            position_ids = cache_position[None].expand(x.shape[0], x.shape[1])
        rope = self.rope_tables(position_ids, x.dtype)
        if output_hidden_states is None:  # unset: the config's setting, as for output_attentions
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        hidden = [x] if output_hidden_states else None
        with recording_attentions(self.config, output_attentions) as attentions:
            for i, (layer, window) in enumerate(zip(self.layers, self.windows)):
                x = maybe_checkpoint(layer, self.gradient_checkpointing, x, *rope[window], *inputs.mask(i, window),
                                     cache, cache_position)
                if hidden is not None:
                    hidden.append(x)
        x = getattr(self, self.norm_name)(x)
        if hidden is not None:
            hidden[-1] = x
        return ModelOutput(last_hidden_state=x, past_key_values=cache if inputs.use_cache else None,
                           hidden_states=tuple(hidden) if hidden is not None else None,
                           attentions=tuple(attentions) if attentions is not None else None)


class LlamaForCausalLM(LlamaPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _can_generate = True
    model_class = LlamaModel
    lm_head_bias = False

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.model = self.model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=self.lm_head_bias)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's logits as the family returns them (soft-capped, scaled)."""
        return logits

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, cache_position=None,
                logits_to_keep: int = 0, return_dict=None, num_items_in_batch=None, output_attentions=None,
                shift_labels=None, **kwargs):
        """`shift_labels`: targets already shifted (position t predicts shift_labels[t]), as sequence/context
        parallel training hands them over; with labels, the loss then uses them unshifted."""
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_hidden_states, cache_position, output_attentions=output_attentions)
        h = out.last_hidden_state
        logits = self.finish_logits(self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h))
        loss = lm_loss(logits, labels, shift_labels, num_items_in_batch)
        return ModelOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                           hidden_states=out.hidden_states, attentions=out.attentions)


def lm_loss(logits: torch.Tensor, labels, shift_labels, num_items_in_batch) -> torch.Tensor | None:
    """A causal LM head's loss: None without labels; next-token loss on labels, or on pre-shifted shift_labels."""
    if labels is None:
        return None
    if shift_labels is None:
        return causal_lm_loss(logits, labels, num_items_in_batch)
    return token_loss(logits, shift_labels, num_items_in_batch)


def last_token_pool(logits: torch.Tensor, input_ids, pad_token_id) -> torch.Tensor:
    """Logits at each row's last non-padding token (the rightmost token that is not pad), as the reference does."""
    B = logits.shape[0]
    if input_ids is None or pad_token_id is None:
        last = torch.full((B,), logits.shape[1] - 1, device=logits.device)
    else:
        keep = (input_ids != pad_token_id).to(logits.device, torch.int32)
        idx = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
        last = (idx * keep).argmax(-1)
    return logits[torch.arange(B, device=logits.device), last]


class LlamaForSequenceClassification(LlamaPreTrainedModel):
    model_class = LlamaModel

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.model = self.model_class(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                output_attentions=None, **_):
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, False,
                         output_hidden_states, output_attentions=output_attentions)
        if input_ids is not None and input_ids.shape[0] > 1 and self.config.pad_token_id is None:
            raise ValueError("batches of more than one sequence need config.pad_token_id to find each row's last "
                             "token; set it (e.g. to the tokenizer's pad id)")
        logits = last_token_pool(self.score(out.last_hidden_state), input_ids, self.config.pad_token_id)
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class LlamaForTokenClassification(TokenClassificationHead, LlamaPreTrainedModel):
    model_class = LlamaModel


class LlamaForQuestionAnswering(QuestionAnsweringHead, LlamaPreTrainedModel):
    model_class = LlamaModel
    base_model_prefix = "transformer"  # the reference's name for this head's base model


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"llama": (LlamaConfig, {
    "base": LlamaModel, "causal-lm": LlamaForCausalLM, "sequence-classification": LlamaForSequenceClassification,
    "token-classification": LlamaForTokenClassification, "question-answering": LlamaForQuestionAnswering})}
