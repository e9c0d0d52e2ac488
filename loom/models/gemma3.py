"""Gemma 3 (text; model_type gemma3_text) = Gemma 2 with a (1 + w) RMSNorm over each query and key head before RoPE,
RoPE per layer type (sliding layers: `rope_local_base_freq`, unscaled; global layers: `rope_theta` with the
checkpoint's scaling; 5.x nests both in `rope_parameters`), five sliding layers to one global by default
(`sliding_window_pattern`, or `layer_types`), no soft-capping by default (the reference ignores
`attn_logit_softcapping` here) and SDPA as its default attention. `use_bidirectional_attention` (EmbeddingGemma)
makes it an encoder."""
from __future__ import annotations

from loom.models.gemma import GemmaRMSNorm
from loom.models.gemma2 import (Gemma2Attention, Gemma2Config, Gemma2DecoderLayer, Gemma2ForCausalLM,
                                Gemma2ForSequenceClassification, Gemma2Model, Gemma2PreTrainedModel)
from loom.models.rope import RotaryEmbedding


class Gemma3TextConfig(Gemma2Config):
    model_type = "gemma3_text"
    defaults = {**Gemma2Config.defaults, "vocab_size": 262208, "max_position_embeddings": 131072,
                "final_logit_softcapping": None, "attn_logit_softcapping": None, "use_bidirectional_attention": False,
                "rope_parameters": None}
    field_types = {**Gemma2Config.field_types, "rope_local_base_freq": (float,), "sliding_window_pattern": (int,)}
    eager_by_default = False

    def __post_init__(self) -> None:
        if self.layer_types is None:  # legacy configs: every sliding_window_pattern-th layer is global
            pattern = getattr(self, "sliding_window_pattern", 6)
            self.layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                for i in range(self.num_hidden_layers)]
        self.rope_parameters = self._per_layer_type_rope()
        super().__post_init__()

    def _per_layer_type_rope(self) -> dict:
        """{"sliding_attention": ..., "full_attention": ...} from 5.x rope_parameters or the legacy rope_theta,
        rope_local_base_freq and rope_scaling keys (folded in and dropped, as the reference does; scaling applies
        to the global layers only)."""
        legacy = {key: self.__dict__.pop(key, None) for key in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
        rope = dict(self.rope_parameters or {})
        full = {**(rope.get("full_attention") or {"rope_type": "default"}), **(legacy["rope_scaling"] or {})}
        full.setdefault("rope_theta", legacy["rope_theta"] or 1_000_000.0)
        local = dict(rope.get("sliding_attention") or {"rope_type": "default"})
        local.setdefault("rope_theta", legacy["rope_local_base_freq"] or 10_000.0)
        return {**rope, "sliding_attention": local, "full_attention": full}


class Gemma3Attention(Gemma2Attention):
    def __init__(self, config: Gemma3TextConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.softcap = None
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    attention_class = Gemma3Attention


class Gemma3PreTrainedModel(Gemma2PreTrainedModel):
    config_class = Gemma3TextConfig
    _no_split_modules = ["Gemma3DecoderLayer"]


class Gemma3TextModel(Gemma3PreTrainedModel, Gemma2Model):
    """With `use_bidirectional_attention` (EmbeddingGemma) an encoder: every layer attends both ways, sliding layers
    to the keys less than sliding_window // 2 + 1 positions away on either side, as the reference."""
    layer_class = Gemma3DecoderLayer
    runs_bidirectional = True

    @property
    def causal(self) -> bool:
        return not self.config.use_bidirectional_attention

    def layer_windows(self) -> list[int | None]:
        windows = super().layer_windows()
        if self.causal:
            return windows
        return [None if w is None else w // 2 + 1 for w in windows]

    def __init__(self, config: Gemma3TextConfig) -> None:
        super().__init__(config)
        rope = config.rope_parameters
        self.rotary_emb = RotaryEmbedding(config, config.head_dim, params=rope["full_attention"])
        self.rotary_emb_local = RotaryEmbedding(config, config.head_dim, params=rope["sliding_attention"])

    def rope_tables(self, position_ids, dtype) -> dict:
        """Global layers (window None) rotate with the global RoPE, sliding layers with the local one."""
        full = self.rotary_emb(position_ids, dtype)
        local = self.rotary_emb_local(position_ids, dtype) if any(w is not None for w in self.windows) else None
        return {w: full if w is None else local for w in self.windows}


class Gemma3ForCausalLM(Gemma3PreTrainedModel, Gemma2ForCausalLM):
    model_class = Gemma3TextModel


class Gemma3TextForSequenceClassification(Gemma3PreTrainedModel, Gemma2ForSequenceClassification):
    model_class = Gemma3TextModel


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"gemma3_text": (Gemma3TextConfig, {
    "base": Gemma3TextModel, "causal-lm": Gemma3ForCausalLM,
    "sequence-classification": Gemma3TextForSequenceClassification})}
