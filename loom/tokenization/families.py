"""Tokenizer families: what a `tokenizer_class` or `model_type` implies beyond the files themselves.

A family sets defaults the reference keeps in its per-model classes: special-token names, the model input names
(whether token_type_ids are returned), the padding side, and how legacy files convert. Everything in
tokenizer_config.json overrides these defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    model_input_names: tuple[str, ...] = ("input_ids", "attention_mask")
    padding_side: str = "right"
    special_tokens: dict[str, str] = field(default_factory=dict)
    # how a SentencePiece .model converts: "generic", "llama", "t5", "deberta-v2", "xlm-roberta", "camembert"
    spm_flavour: str = "generic"
    # the post-processor the family builds over legacy files once its special tokens have ids: "bert", "roberta",
    # "fairseq" (XLM-R, CamemBERT) or "t5"
    post_processor: str | None = None


_BERT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"}
_GPT2_TOKEN = "<|endoftext|>"
_ROBERTA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                     "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"}

FAMILIES = {
    "generic": Family("generic"),
    "bert": Family("bert", ("input_ids", "token_type_ids", "attention_mask"), special_tokens=_BERT_SPECIALS),
    "distilbert": Family("distilbert", special_tokens=_BERT_SPECIALS),
    "gpt2": Family("gpt2", special_tokens={"bos_token": _GPT2_TOKEN, "eos_token": _GPT2_TOKEN,
                                           "unk_token": _GPT2_TOKEN}),
    "llama": Family("llama", padding_side="left", spm_flavour="llama",
                    special_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "gemma": Family("gemma", padding_side="left",
                    special_tokens={"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
                                    "pad_token": "<pad>"}),
    "roberta": Family("roberta", special_tokens=_ROBERTA_SPECIALS, post_processor="roberta"),
    # WordPiece with RoBERTa's specials and pair layout; its unknown token stays BERT's
    "mpnet": Family("mpnet", special_tokens={**_ROBERTA_SPECIALS, "unk_token": "[UNK]"}, post_processor="roberta"),
    "deberta-v2": Family("deberta-v2", ("input_ids", "attention_mask", "token_type_ids"), spm_flavour="deberta-v2",
                         post_processor="bert", special_tokens={**_BERT_SPECIALS, "bos_token": "[CLS]",
                                                                "eos_token": "[SEP]"}),
    "xlm-roberta": Family("xlm-roberta", special_tokens=_ROBERTA_SPECIALS, spm_flavour="xlm-roberta",
                          post_processor="fairseq"),
    "camembert": Family("camembert", special_tokens=_ROBERTA_SPECIALS, spm_flavour="camembert",
                        post_processor="fairseq"),
    "t5": Family("t5", spm_flavour="t5", post_processor="t5",
                 special_tokens={"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}),
}

# tokenizer_class in tokenizer_config.json (without a "Fast" suffix) -> family
CLASS_FAMILIES = {
    "BertTokenizer": "bert", "ElectraTokenizer": "bert", "DistilBertTokenizer": "distilbert",
    "GPT2Tokenizer": "gpt2", "LlamaTokenizer": "llama", "CodeLlamaTokenizer": "llama", "GemmaTokenizer": "gemma",
    "RobertaTokenizer": "roberta", "XLMRobertaTokenizer": "xlm-roberta", "CamembertTokenizer": "camembert",
    "T5Tokenizer": "t5", "DebertaV2Tokenizer": "deberta-v2", "MPNetTokenizer": "mpnet",
    "PreTrainedTokenizer": "generic", "PreTrainedTokenizerFast": "generic", "TokenizersBackend": "generic",
}

# model_type in config.json -> family, used when tokenizer_config.json names no class
MODEL_TYPE_FAMILIES = {"bert": "bert", "electra": "bert", "distilbert": "distilbert", "gpt2": "gpt2",
                       "llama": "llama", "mistral": "llama", "roberta": "roberta", "xlm-roberta": "xlm-roberta",
                       "camembert": "camembert", "t5": "t5", "mpnet": "mpnet", "deberta-v2": "deberta-v2",
                       "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma", "gemma3": "gemma"}

# config.json keys that hold the longest input the model's positions allow, in order of preference
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# models whose position table starts after padding_idx + 1, so two positions are not usable
POSITION_OFFSET_MODELS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2, "bart": 2, "mbart": 2,
                          "mpnet": 2}


def family_for(tokenizer_class: str | None, model_type: str | None) -> Family:
    """The family of a tokenizer_class (preferred) or model_type; 'generic' when neither is known."""
    if tokenizer_class:
        name = CLASS_FAMILIES.get(tokenizer_class.removesuffix("Fast"))
        if name:
            return FAMILIES[name]
    return FAMILIES[MODEL_TYPE_FAMILIES.get(model_type or "", "generic")]


def model_max_length_from(tokenizer_config: dict, model_config: dict | None) -> int | None:
    """The tokenizer's length limit from its config, else from the model's positions; None if neither says."""
    value = tokenizer_config.get("model_max_length", tokenizer_config.get("max_len"))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e20:
        return int(value)
    if model_config:
        for key in POSITION_KEYS:
            positions = model_config.get(key)
            if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
                return positions - POSITION_OFFSET_MODELS.get(model_config.get("model_type", ""), 0)
    return None
