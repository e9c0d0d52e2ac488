"""BatchFeature: the dict an image processor returns (`pixel_values`), with attribute access and `.to()`."""
from __future__ import annotations

from collections import UserDict
from typing import Any


class BatchFeature(UserDict):
    """Model inputs made by a processor; tensors when built with return_tensors="pt", else numpy arrays/lists."""

    def __init__(self, data: dict[str, Any] | None = None, tensor_type: str | None = None) -> None:
        super().__init__(data or {})
        if tensor_type is not None:
            self.convert_to_tensors(tensor_type)

    def __getattr__(self, name: str) -> Any:
        if name == "data":
            raise AttributeError(name)
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no key {name!r}; it has {sorted(self.data)}") from None

    def convert_to_tensors(self, tensor_type: str | None = "pt") -> "BatchFeature":
        if tensor_type is None:
            return self
        if str(tensor_type) not in ("pt", "np"):
            raise ValueError(f"return_tensors={tensor_type!r} is not supported; use 'pt', 'np' or None")
        import numpy as np
        import torch

        for key, value in self.data.items():
            if isinstance(value, list) and value and hasattr(value[0], "shape"):
                value = np.stack([np.asarray(v) for v in value])
            if tensor_type == "pt" and not torch.is_tensor(value):
                value = torch.from_numpy(np.ascontiguousarray(value))
            elif tensor_type == "np" and torch.is_tensor(value):
                value = value.numpy()
            self.data[key] = value
        return self

    def to(self, *args: Any, **kwargs: Any) -> "BatchFeature":
        """Move tensors to a device and cast floating tensors to a dtype, like torch.Tensor.to."""
        import torch

        for key, value in self.data.items():
            if torch.is_tensor(value):
                if value.is_floating_point():
                    self.data[key] = value.to(*args, **kwargs)
                else:  # integer inputs keep their dtype; only the device applies
                    device = next((a for a in args if not isinstance(a, torch.dtype)), kwargs.get("device"))
                    if device is not None:
                        self.data[key] = value.to(device)
        return self
