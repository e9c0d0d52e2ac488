"""The task table: canonical task names, aliases, the model head each task needs, defaults, and task inference
from a checkpoint's `architectures`."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class TaskSpec:
    module: str
    class_name: str
    head: str  # a head name in a model file's MODEL_TYPES (loom.auto.model_table)
    default_model: str | None = None
    needs_tokenizer: bool = True
    needs_image_processor: bool = False

    def pipeline_class(self):
        return getattr(importlib.import_module(self.module), self.class_name)


TASKS: dict[str, TaskSpec] = {
    "feature-extraction": TaskSpec("loom.pipelines.feature_extraction", "FeatureExtractionPipeline", "base",
                                   MINILM),
    "sentence-similarity": TaskSpec("loom.pipelines.feature_extraction", "SentenceSimilarityPipeline", "base",
                                    MINILM),
    "text-classification": TaskSpec("loom.pipelines.text_classification", "TextClassificationPipeline",
                                    "sequence-classification"),
    "token-classification": TaskSpec("loom.pipelines.token_classification", "TokenClassificationPipeline",
                                     "token-classification"),
    "fill-mask": TaskSpec("loom.pipelines.fill_mask", "FillMaskPipeline", "masked-lm"),
    "question-answering": TaskSpec("loom.pipelines.question_answering", "QuestionAnsweringPipeline",
                                   "question-answering"),
    "zero-shot-classification": TaskSpec("loom.pipelines.zero_shot", "ZeroShotClassificationPipeline",
                                         "sequence-classification"),
    "text-generation": TaskSpec("loom.pipelines.text_generation", "TextGenerationPipeline", "causal-lm"),
    "image-classification": TaskSpec("loom.pipelines.image_classification", "ImageClassificationPipeline",
                                     "image-classification", needs_tokenizer=False, needs_image_processor=True),
}

ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification",
           "embeddings": "feature-extraction", "sentence-embeddings": "feature-extraction"}

# class-name ending of an `architectures` entry -> task, checked in order (longest endings first)
_ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForImageClassification", "image-classification"),
    ("Model", "feature-extraction"),
)


def known_tasks() -> str:
    names = sorted(TASKS) + [f"{a} (= {t})" for a, t in sorted(ALIASES.items())]
    return ", ".join(names)


def resolve_task(task: str) -> tuple[str, TaskSpec]:
    """(canonical name, spec) for a task name or alias; an error listing the known tasks otherwise."""
    if not isinstance(task, str):
        raise TypeError(f"task must be a string like 'text-classification', got {type(task).__name__}")
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise KeyError(f"unknown task {task!r}; loom knows: {known_tasks()}")
    return name, TASKS[name]


def task_for_architectures(architectures: list[str] | None, source: str) -> str:
    """The task a checkpoint was trained for, from its config's `architectures`."""
    for arch in architectures or []:
        for ending, task in _ARCHITECTURE_TASKS:
            if arch.endswith(ending):
                return task
    raise ValueError(f"cannot tell which task {source} is for (architectures={architectures}); pass the task, "
                     f"e.g. pipeline('text-classification', model=...). Known tasks: {known_tasks()}")
