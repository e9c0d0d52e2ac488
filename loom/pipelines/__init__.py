"""Pipelines: `pipeline(task, model=...)` turns raw inputs into answers for a task (see registry.TASKS)."""
from loom.pipelines.base import Pipeline
from loom.pipelines.batching import Chunk
from loom.pipelines.factory import pipeline
from loom.pipelines.registry import ALIASES, TASKS

SUPPORTED_TASKS = TASKS

__all__ = ["ALIASES", "Chunk", "Pipeline", "SUPPORTED_TASKS", "TASKS", "pipeline"]
