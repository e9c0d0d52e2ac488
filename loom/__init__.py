"""loom: the core workflows of Hugging Face `transformers`, compact and fast.

Public names are exported lazily (PEP 562) so that `import loom` costs almost nothing beyond `import torch`
being deferred too: each name is imported from its module on first access.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {}


def _export(module: str, *names: str) -> None:
    for name in names:
        _EXPORTS[name] = module


_export("loom.configuration", "PretrainedConfig", "PreTrainedConfig")
_export("loom.auto", "AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM",
        "AutoModelForSequenceClassification", "AutoModelForTokenClassification", "AutoModelForQuestionAnswering",
        "AutoModelForImageClassification", "AutoModelForMultipleChoice", "AutoModelForNextSentencePrediction",
        "AutoModelForPreTraining", "get_values",
        *(f"{task}_MAPPING{names}" for task in ("MODEL", *(f"MODEL_FOR_{t}" for t in (
            "CAUSAL_LM", "MASKED_LM", "SEQUENCE_CLASSIFICATION", "TOKEN_CLASSIFICATION", "QUESTION_ANSWERING",
            "MULTIPLE_CHOICE", "NEXT_SENTENCE_PREDICTION", "PRETRAINING", "IMAGE_CLASSIFICATION")))
          for names in ("", "_NAMES")))
_export("loom.modeling", "PreTrainedModel")
_export("loom.outputs", "ModelOutput")
_export("loom.models.cache", "Cache", "DynamicCache", "StaticCache", "CacheLayerMixin", "DynamicLayer", "StaticLayer",
        "DynamicIndexedLayer", "StaticSlidingWindowLayer")
_export("loom.tokenization", "AutoTokenizer", "PreTrainedTokenizerFast", "BatchEncoding", "TensorType")
_export("loom.tokenization.classes", *(f"{family}Tokenizer{fast}" for family in (
    "Bert", "Electra", "DistilBert", "GPT2", "Llama", "CodeLlama", "Roberta", "XLMRoberta", "Camembert", "T5",
    "DebertaV2", "MPNet") for fast in ("", "Fast")))
_export("loom.generation.config", "GenerationConfig")
_export("loom.generation.logits_process", "LogitsProcessor", "LogitsProcessorList", "MinLengthLogitsProcessor",
        "MinNewTokensLengthLogitsProcessor", "RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor",
        "NoBadWordsLogitsProcessor", "ForcedBOSTokenLogitsProcessor", "ForcedEOSTokenLogitsProcessor",
        "SuppressTokensLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper",
        "MinPLogitsWarper", "TypicalLogitsWarper")
_export("loom.generation.warpers", "EpsilonLogitsWarper", "EtaLogitsWarper", "TopHLogitsWarper")
_export("loom.generation.constraints", "SequenceBiasLogitsProcessor", "PrefixConstrainedLogitsProcessor",
        "EncoderRepetitionPenaltyLogitsProcessor", "EncoderNoRepeatNGramLogitsProcessor",
        "ExponentialDecayLengthPenalty", "InfNanRemoveLogitsProcessor", "LogitNormalization",
        "SuppressTokensAtBeginLogitsProcessor")
_export("loom.generation.guidance", "ClassifierFreeGuidanceLogitsProcessor",
        "UnbatchedClassifierFreeGuidanceLogitsProcessor")
_export("loom.generation.watermarking", "WatermarkingConfig", "SynthIDTextWatermarkingConfig",
        "WatermarkLogitsProcessor", "SynthIDTextWatermarkLogitsProcessor")
_export("loom.generation.stopping_criteria", "StoppingCriteria", "StoppingCriteriaList", "MaxLengthCriteria",
        "MaxTimeCriteria", "EosTokenCriteria", "StopStringCriteria")
_export("loom.generation.streamers", "TextStreamer", "TextIteratorStreamer", "AsyncTextIteratorStreamer")
_export("loom.training.enums", "IntervalStrategy", "SaveStrategy", "HubStrategy", "SchedulerType", "OptimizerNames")
_export("loom.pipelines", "pipeline", "Pipeline")
_export("loom.processing", "AutoProcessor", "AutoImageProcessor", "ViTImageProcessor")
_export("loom.training", "Trainer", "TrainingArguments", "TrainerCallback", "TrainerState", "TrainerControl",
        "EarlyStoppingCallback", "HfArgumentParser", "DataCollatorWithPadding", "DataCollatorForLanguageModeling",
        "DataCollatorForTokenClassification", "default_data_collator", "get_scheduler", "set_seed",
        "enable_full_determinism", "DefaultFlowCallback", "PrinterCallback", "ProgressCallback")
_export("loom.training.optimization", "get_constant_schedule", "get_constant_schedule_with_warmup",
        "get_linear_schedule_with_warmup", "get_cosine_schedule_with_warmup",
        "get_cosine_with_hard_restarts_schedule_with_warmup", "get_polynomial_decay_schedule_with_warmup",
        "get_inverse_sqrt_schedule", "get_wsd_schedule")
_export("loom.training.adafactor", "Adafactor", "AdafactorSchedule")
_export("loom.availability", "is_torch_available", "is_tokenizers_available", "is_sentencepiece_available",
        "is_datasets_available", "is_bitsandbytes_available", "is_vision_available", "is_tensorboard_available")
_export("loom.training.collators", "DefaultDataCollator")
_export("loom.training.seq_collators", "DataCollatorForSeq2Seq", "DataCollatorWithFlattening")
_export("loom.training.plm_collator", "DataCollatorForPermutationLanguageModeling")
_export("loom.quantization", "AwqConfig", "BitsAndBytesConfig", "CompressedTensorsConfig", "FineGrainedFP8Config",
        "GPTQConfig", "TorchAoConfig", "WeightOnlyConfig", "quantize_")


def _model_names() -> dict:
    """Config and model classes come from the model files' MODEL_TYPES tables (imports torch and the families)."""
    return importlib.import_module("loom.auto").public_model_names()


def __getattr__(name: str):
    if name == "__all__":
        return sorted(set(_EXPORTS) | set(_model_names()))
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif name[:1].isupper() and name in _model_names():
        value = _model_names()[name]
    else:
        raise AttributeError(f"module 'loom' has no attribute {name!r}")
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__getattr__("__all__")))
