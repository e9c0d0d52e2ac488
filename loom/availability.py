"""`is_<package>_available()`: the reference's checks for optional packages, for scripts that branch on them.

Each looks the package up without importing it (no import cost, no side effects) and caches the answer.
"""
from __future__ import annotations

import functools
import importlib.util

# public function name -> the import name it checks
PACKAGES = {
    "is_torch_available": "torch", "is_tokenizers_available": "tokenizers",
    "is_sentencepiece_available": "sentencepiece", "is_protobuf_available": "google.protobuf",
    "is_accelerate_available": "accelerate", "is_datasets_available": "datasets", "is_peft_available": "peft",
    "is_bitsandbytes_available": "bitsandbytes", "is_hqq_available": "hqq", "is_optimum_quanto_available":
    "optimum.quanto", "is_vision_available": "PIL", "is_tensorboard_available": "tensorboard",
}


@functools.cache
def package_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing, or a broken install
        return False


def _checker(function_name: str, package: str):
    def check() -> bool:
        return package_available(package)

    check.__name__ = check.__qualname__ = function_name
    check.__doc__ = f"Whether `{package}` can be imported."
    return check


globals().update({name: _checker(name, package) for name, package in PACKAGES.items()})
__all__ = sorted(PACKAGES)
