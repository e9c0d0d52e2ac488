"""ViT: a pre-LayerNorm encoder over 16x16 image patches with a learned [CLS] token, and its classification head.

Parameter names are the ones checkpoints store (`vit.encoder.layer.0.attention.attention.query.weight`), so a
reference checkpoint loads without a key map.
"""
from __future__ import annotations

import torch
from torch import nn

from loom.configuration import PretrainedConfig
from loom.modeling import PreTrainedModel
from loom.models.bert import BertIntermediate, BertSelfAttention
from loom.models.common import activation, classification_loss, maybe_checkpoint, recording_attentions
from loom.outputs import ModelOutput


class ViTConfig(PretrainedConfig):
    model_type = "vit"
    defaults = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    initializer_range=0.02, layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                    qkv_bias=True, encoder_stride=16, pooler_output_size=None, pooler_act="tanh",
                    tie_word_embeddings=False)
    field_types = {"image_size": (int, list[int], tuple),
                   "patch_size": (int, list[int], tuple), "pooler_output_size": (int, None)}

    def __post_init__(self) -> None:
        if not self.pooler_output_size:
            self.pooler_output_size = self.hidden_size


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.image_size, self.patch_size = _pair(config.image_size), _pair(config.patch_size)
        self.num_channels = config.num_channels
        self.num_patches = (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=self.patch_size,
                                    stride=self.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels but the model expects "
                             f"num_channels={self.num_channels}")
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # (B, patches, C)


class ViTEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig, use_mask_token: bool = False) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if use_mask_token else None
        self.patch_embeddings = ViTPatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.patch_embeddings.num_patches + 1,
                                                            config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.patch_size = self.patch_embeddings.patch_size
        self.image_size = self.patch_embeddings.image_size

    def interpolated_positions(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings resized (bicubic) to another image size, for fine-tuning at higher resolution."""
        n = self.position_embeddings.shape[1] - 1
        side = int(n ** 0.5)
        new_h, new_w = height // self.patch_size[0], width // self.patch_size[1]
        if (new_h, new_w) == (side, side):
            return self.position_embeddings
        dim = self.position_embeddings.shape[-1]
        grid = self.position_embeddings[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False)
        return torch.cat((self.position_embeddings[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)

    def forward(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding: bool = False):
        B, _, H, W = pixel_values.shape
        x = self.patch_embeddings(pixel_values)
        if bool_masked_pos is not None:
            mask = bool_masked_pos.unsqueeze(-1).type_as(x)
            x = x * (1.0 - mask) + self.mask_token.expand(B, x.shape[1], -1) * mask
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        if interpolate_pos_encoding:
            x = x + self.interpolated_positions(H, W)
        else:
            if (H, W) != self.image_size:
                raise ValueError(f"image of {H}x{W} pixels does not match the model's image_size "
                                 f"{self.image_size[0]}x{self.image_size[1]}; resize it (the image processor does) "
                                 "or pass interpolate_pos_encoding=True")
            x = x + self.position_embeddings
        return self.dropout(x)


class ViTSelfOutput(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h):
        return self.dropout(self.dense(h))


class ViTAttention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.output = ViTSelfOutput(config)

    def forward(self, x):
        return self.output(self.attention(x))


class ViTOutput(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.dropout(self.dense(h)) + residual


class ViTLayer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.attention = ViTAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = ViTOutput(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        x = self.attention(self.layernorm_before(x)) + x
        return self.output(self.intermediate(self.layernorm_after(x)), x)


class ViTEncoder(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(ViTLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x, output_hidden_states=False, output_attentions=None):
        hidden = [x] if output_hidden_states else None
        with recording_attentions(self.config, output_attentions) as attentions:
            for layer in self.layer:
                x = maybe_checkpoint(layer, self.gradient_checkpointing, x)
                if hidden is not None:
                    hidden.append(x)
        return x, hidden, attentions


class ViTPooler(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size)
        self.activation = activation(config.pooler_act)

    def forward(self, h):
        return self.activation(self.dense(h[:, 0]))


class ViTPreTrainedModel(PreTrainedModel):
    config_class = ViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    _no_split_modules = ["ViTEmbeddings", "ViTLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight.data, mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, ViTEmbeddings):
            nn.init.trunc_normal_(module.position_embeddings.data, mean=0.0, std=std)
            nn.init.trunc_normal_(module.cls_token.data, mean=0.0, std=std)
            if module.mask_token is not None:
                module.mask_token.data.zero_()
        else:
            super()._init_weights(module)


class ViTModel(ViTPreTrainedModel):
    def __init__(self, config: ViTConfig, add_pooling_layer: bool = True, use_mask_token: bool = False) -> None:
        super().__init__(config)
        self.embeddings = ViTEmbeddings(config, use_mask_token=use_mask_token)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None,
                output_hidden_states=None, return_dict=None, output_attentions=None, **_):
        if pixel_values is None:
            raise ValueError("ViT needs pixel_values (B, C, H, W); an image processor makes them from images")
        # the patch projection's dtype wins, so fp32 pixels work with a bf16 model
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        x = self.embeddings(pixel_values, bool_masked_pos, bool(interpolate_pos_encoding))
        x, hidden, attentions = self.encoder(x, output_hidden_states, output_attentions)
        x = self.layernorm(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        return ModelOutput(last_hidden_state=x, pooler_output=pooled,
                           hidden_states=tuple(hidden) if hidden is not None else None,
                           attentions=tuple(attentions) if attentions is not None else None)


class ViTForImageClassification(ViTPreTrainedModel):
    _keys_to_ignore_on_load_unexpected = (r"^vit\.pooler\.",)

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 \
            else nn.Identity()
        self.post_init()

    def forward(self, pixel_values=None, labels=None, interpolate_pos_encoding=None, output_hidden_states=None,
                return_dict=None, output_attentions=None, **_):
        out = self.vit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                       output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        logits = self.classifier(out.last_hidden_state[:, 0])
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


# the registry (loom.auto), the top-level exports and the test tables are derived from this
MODEL_TYPES = {"vit": (ViTConfig, {"base": ViTModel, "image-classification": ViTForImageClassification})}
