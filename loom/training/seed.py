"""set_seed: one call that seeds python, numpy and torch (CPU and every GPU); enable_full_determinism adds
deterministic kernels."""
from __future__ import annotations

import os
import random


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed every generator a training run draws from; deterministic=True also asks torch for deterministic kernels."""
    import torch

    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def enable_full_determinism(seed: int) -> None:
    """set_seed plus deterministic kernels everywhere (TrainingArguments(full_determinism=True)): torch's
    deterministic algorithms, cuDNN without autotuning, and cuBLAS/CUDA settings that make GPU runs repeat."""
    import torch

    os.environ["CUDA_LAUNCH_BLOCKING"] = "1"
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    set_seed(seed, deterministic=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
