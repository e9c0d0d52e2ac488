"""The reference's string enums for TrainingArguments values (`IntervalStrategy.STEPS`, `OptimizerNames.ADAMW_TORCH`,
...), for scripts that compare or pass them. They subclass str, so a member equals its value: TrainingArguments keeps
plain strings and `args.eval_strategy == IntervalStrategy.STEPS` holds either way. An unknown value is a ValueError
that lists the valid ones."""
from __future__ import annotations

import enum


class ExplicitEnum(str, enum.Enum):
    """A str enum whose unknown values fail with the list of valid ones."""

    @classmethod
    def _missing_(cls, value):
        raise ValueError(f"{value!r} is not a valid {cls.__name__}; choose one of {[m.value for m in cls]}")

    def __str__(self) -> str:
        return self.value


IntervalStrategy = ExplicitEnum("IntervalStrategy", [("NO", "no"), ("STEPS", "steps"), ("EPOCH", "epoch")])
SaveStrategy = ExplicitEnum("SaveStrategy", [("NO", "no"), ("STEPS", "steps"), ("EPOCH", "epoch"), ("BEST", "best")])
HubStrategy = ExplicitEnum("HubStrategy", [("END", "end"), ("EVERY_SAVE", "every_save"),
                                           ("CHECKPOINT", "checkpoint"), ("ALL_CHECKPOINTS", "all_checkpoints")])
SchedulerType = ExplicitEnum("SchedulerType", [
    ("LINEAR", "linear"), ("COSINE", "cosine"), ("COSINE_WITH_RESTARTS", "cosine_with_restarts"),
    ("POLYNOMIAL", "polynomial"), ("CONSTANT", "constant"), ("CONSTANT_WITH_WARMUP", "constant_with_warmup"),
    ("INVERSE_SQRT", "inverse_sqrt"), ("REDUCE_ON_PLATEAU", "reduce_lr_on_plateau"),
    ("COSINE_WITH_MIN_LR", "cosine_with_min_lr"), ("COSINE_WARMUP_WITH_MIN_LR", "cosine_warmup_with_min_lr"),
    ("WARMUP_STABLE_DECAY", "warmup_stable_decay"), ("GREEDY", "greedy")])
# every optimizer name the reference accepts (loom's TrainingArguments says which of them it runs)
OptimizerNames = ExplicitEnum("OptimizerNames", [(name.upper(), name) for name in (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad")] + [
    ("ADAMW_BNB", "adamw_bnb_8bit"), ("ADAMW_8BIT", "adamw_8bit"), ("ADEMAMIX_8BIT", "ademamix_8bit"),
    ("LION_8BIT", "lion_8bit"), ("LION", "lion_32bit"), ("PAGED_ADAMW", "paged_adamw_32bit"),
    ("PAGED_ADAMW_8BIT", "paged_adamw_8bit"), ("PAGED_ADEMAMIX", "paged_ademamix_32bit"),
    ("PAGED_ADEMAMIX_8BIT", "paged_ademamix_8bit"), ("PAGED_LION", "paged_lion_32bit"),
    ("PAGED_LION_8BIT", "paged_lion_8bit"), ("RMSPROP", "rmsprop"), ("RMSPROP_BNB", "rmsprop_bnb"),
    ("RMSPROP_8BIT", "rmsprop_bnb_8bit"), ("RMSPROP_32BIT", "rmsprop_bnb_32bit")] + [(name.upper(), name) for name in (
    "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw",
    "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw")])
