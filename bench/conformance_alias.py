"""Import alias for the conformance run: `import transformers` and `transformers.<path>` resolve to loom.

How submodule imports are handled:
  * `transformers.testing_utils` is test infrastructure (skip decorators, `torch_device`, temp-dir helpers), not the
    library under test: it is imported from the real package first and kept; every other `transformers*` module is
    then dropped from `sys.modules`.
  * Every other `transformers[.a.b]` becomes a proxy module. An attribute is looked up in the loom module that the
    reference path maps to (`SUBMODULES` below, else `loom.a.b` when that exists), then in `loom` itself. So
    `from transformers.generation.logits_process import TopKLogitsWarper` finds loom's class wherever loom keeps it,
    and a name loom lacks fails as the reference's import would (`ImportError: cannot import name ...`).
  * A reference path with no loom counterpart (not mapped, no `loom.<path>`) is a `ModuleNotFoundError`: the
    benchmark counts those tests as failing on a missing module.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

# reference module path (after "transformers.") -> loom module holding the same public names
SUBMODULES = {
    "configuration_utils": "loom.configuration",
    "modeling_utils": "loom.modeling",
    "modeling_outputs": "loom.outputs",
    "cache_utils": "loom.models.cache",
    "generation.configuration_utils": "loom.generation.config",
    "generation.logits_process": "loom.generation.logits_process",
    "generation.stopping_criteria": "loom.generation.stopping_criteria",
    "generation.streamers": "loom.generation.streamers",
    "tokenization_utils_base": "loom.tokenization",
    "tokenization_utils_fast": "loom.tokenization",
    "tokenization_utils_tokenizers": "loom.tokenization",
    "utils.chat_template_utils": "loom.tokenization.tool_schema",
    "data.data_collator": "loom.training.collators",
    "data": "loom.training.collators",
    "trainer": "loom.training.trainer",
    "trainer_callback": "loom.training.callbacks",
    "trainer_utils": "loom.training",
    "training_args": "loom.training.arguments",
    "hf_argparser": "loom.training.argparser",
    "optimization": "loom.training.optimization",
    "models.auto": "loom.auto",
    "pipelines": "loom.pipelines",
}
INFRASTRUCTURE = ("transformers.testing_utils",)


def _loom_module(path: str) -> str | None:
    """The loom module that stands for `transformers.<path>`, or None when loom has none."""
    if not path:
        return "loom"
    target = SUBMODULES.get(path, "loom." + path)
    try:
        return target if importlib.util.find_spec(target) is not None else None
    except ModuleNotFoundError:
        return None


class AliasModule(types.ModuleType):
    """A `transformers.*` module whose attributes are loom's."""

    def __init__(self, name: str, targets: list[str]):
        super().__init__(name)
        self.__path__ = []  # a package, so deeper submodule imports come back to the finder
        self._loom_targets = targets

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._loom_targets:
            module = importlib.import_module(target)
            try:
                return getattr(module, attr)
            except AttributeError:
                continue
        return Missing(attr, self.__name__)


class Missing:
    """Stands for a name loom does not have; any use raises the ImportError the import would have raised."""

    def __init__(self, name: str, module: str):
        self._name, self._module = name, module

    def _fail(self, *args, **kwargs):
        raise ImportError(f"cannot import name {self._name!r} from {self._module!r} (loom has no such name)")

    __call__ = __mro_entries__ = __iter__ = __bool__ = __enter__ = _fail

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        self._fail()


class AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers" and not fullname.startswith("transformers."):
            return None
        if fullname in INFRASTRUCTURE:
            return None
        if _loom_module(fullname.partition(".")[2]) is None:
            return None  # falls through to "No module named ..." (the real package is hidden below)
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec):
        loom_name = _loom_module(spec.name.partition(".")[2])
        return AliasModule(spec.name, [loom_name] + (["loom"] if loom_name != "loom" else []))

    def exec_module(self, module):
        pass


class _HideReal(importlib.abc.MetaPathFinder):
    """Stops the path finder from importing the real `transformers` modules that have no loom counterpart."""

    def find_spec(self, fullname, path=None, target=None):
        if (fullname == "transformers" or fullname.startswith("transformers.")) and fullname not in INFRASTRUCTURE:
            raise ModuleNotFoundError(f"No module named {fullname!r} (loom has no counterpart)", name=fullname)
        return None


def install() -> None:
    kept = {}
    for name in INFRASTRUCTURE:
        kept[name] = importlib.import_module(name)
    for name in [n for n in sys.modules if n == "transformers" or n.startswith("transformers.")]:
        del sys.modules[name]
    sys.meta_path[:0] = [AliasFinder(), _HideReal()]
    sys.modules.update(kept)
    package = importlib.import_module("transformers")
    for name, module in kept.items():
        setattr(package, name.rpartition(".")[2], module)
