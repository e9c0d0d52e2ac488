"""Training: TrainingArguments, data collators, the Trainer, callbacks, optimizers and schedules.

Importing this package costs torch only; optuna, datasets, tensorboard and the trackers (wandb, mlflow, trackio) are
imported when a feature needs them.
"""
from loom.training.argparser import HfArgumentParser
from loom.training.arguments import TrainingArguments
from loom.training.callbacks import (DefaultFlowCallback, EarlyStoppingCallback, JsonLinesLoggerCallback,
                                     PrinterCallback, ProgressCallback, TensorBoardCallback, TrainerCallback,
                                     TrainerControl, TrainerState)
from loom.training.collators import (DataCollatorForLanguageModeling, DataCollatorForTokenClassification,
                                     DataCollatorWithPadding, default_data_collator)
from loom.training.data import LengthGroupedSampler
from loom.training.evaluation import EvalPrediction, PredictionOutput
from loom.training.integrations import MLflowCallback, TrackioCallback, WandbCallback
from loom.training.optimization import get_scheduler
from loom.training.seed import enable_full_determinism, set_seed
from loom.training.trainer import Trainer, TrainOutput

__all__ = ["DataCollatorForLanguageModeling", "DataCollatorForTokenClassification", "DataCollatorWithPadding",
           "DefaultFlowCallback", "EarlyStoppingCallback", "EvalPrediction", "HfArgumentParser",
           "JsonLinesLoggerCallback", "LengthGroupedSampler", "MLflowCallback", "PredictionOutput", "PrinterCallback",
           "ProgressCallback", "TensorBoardCallback", "TrackioCallback", "TrainOutput", "Trainer", "TrainerCallback",
           "TrainerControl", "TrainerState", "TrainingArguments", "WandbCallback", "default_data_collator",
           "enable_full_determinism", "get_scheduler", "set_seed"]
