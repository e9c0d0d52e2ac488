"""The reporting callbacks under the module path of the reference's `transformers.integrations`, so that
`from transformers.integrations import WandbCallback` ports as `from loom.integrations import WandbCallback`."""
from loom.training.callbacks import TensorBoardCallback
from loom.training.integrations import MLflowCallback, TrackioCallback, WandbCallback, rewrite_logs

__all__ = ["MLflowCallback", "TensorBoardCallback", "TrackioCallback", "WandbCallback", "rewrite_logs"]
