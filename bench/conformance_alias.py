"""Import alias for the conformance run: `import transformers` and `transformers.<path>` resolve to loom.

How submodule imports are handled:
  * `transformers.testing_utils` is test infrastructure (skip decorators, `torch_device`, temp-dir helpers), not the
    library under test: it is imported from the real package first and kept (with `utils.generic`, which it imports
    lazily); every other `transformers*` module is
    then dropped from `sys.modules`.
  * Every other `transformers[.a.b]` becomes a proxy module. An attribute is looked up in the loom module that the
    reference path maps to (`SUBMODULES` below, else `loom.a.b` when that exists), then in `loom` itself. So
    `from transformers.generation.logits_process import TopKLogitsWarper` finds loom's class wherever loom keeps it,
    and a name loom lacks fails as the reference's import would (`ImportError: cannot import name ...`).
  * A reference path with no loom counterpart (not mapped, no `loom.<path>`; e.g. the internals that the shared
    test helpers import at their top) is a proxy of `loom` alone, so its names are mostly `Missing` (below): the
    tests that use them fail, the others in the file still run.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
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
    "tokenization_utils_base": ("loom.tokenization", "loom.tokenization.protobuf"),
    "convert_slow_tokenizer": ("loom.tokenization.protobuf", "loom.tokenization"),
    "tokenization_utils_fast": "loom.tokenization",
    "tokenization_utils_tokenizers": "loom.tokenization",
    "utils.chat_template_utils": "loom.tokenization.tool_schema",
    "data.data_collator": ("loom.training.collators", "loom.training.seq_collators", "loom.training.plm_collator"),
    "data": ("loom.training.collators", "loom.training.seq_collators", "loom.training.plm_collator"),
    "trainer": "loom.training.trainer",
    "trainer_callback": "loom.training.callbacks",
    "trainer_utils": "loom.training",
    "training_args": "loom.training.arguments",
    "hf_argparser": "loom.training.argparser",
    "optimization": "loom.training.optimization",
    "models.auto": "loom.auto",
    "utils": ("loom.utils", "loom.availability", "loom.tokenization"),
    "pipelines": "loom.pipelines",
}
# testing_utils imports utils.generic lazily (its retry helper, at class-definition time of the model tests)
INFRASTRUCTURE = ("transformers.testing_utils", "transformers.utils.generic")


def _loom_modules(path: str) -> list[str]:
    """The loom modules that stand for `transformers.<path>`, then `loom` itself."""
    if not path:
        return ["loom"]
    targets = SUBMODULES.get(path, "loom." + path)
    return [t for t in ((targets,) if isinstance(targets, str) else targets) if _in_loom(t)] + ["loom"]


def _in_loom(module: str) -> bool:
    """Whether `module` exists in the loom being measured (an editable install's finder could otherwise supply
    a module of another checkout that this tree lacks)."""
    import loom

    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return False
    root = os.path.dirname(loom.__file__)
    return spec is not None and spec.origin is not None and os.path.abspath(spec.origin).startswith(root + os.sep)


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

    # mock.patch("transformers.a.b.name", ...) must patch the loom module whose code reads `name`, as patching the
    # reference's module does there: a plain value set on the proxy is set on the first loom module that defines
    # the name, and deleting it from the proxy (how mock restores a name the proxy did not hold) puts the original
    # back. Modules set on it (importlib binding a child package) stay on the proxy.
    def __setattr__(self, attr: str, value) -> None:
        owner = None if attr.startswith("_") or isinstance(value, types.ModuleType) else self._owner(attr)
        if owner is None:
            super().__setattr__(attr, value)
            return
        self.__dict__.setdefault("_patched", {}).setdefault(attr, (owner, vars(owner)[attr]))
        setattr(owner, attr, value)

    def __delattr__(self, attr: str) -> None:
        patched = self.__dict__.get("_patched", {})
        if attr in patched:
            owner, original = patched.pop(attr)
            setattr(owner, attr, original)
            return
        super().__delattr__(attr)

    def _owner(self, attr: str):
        for target in self._loom_targets:
            module = importlib.import_module(target)
            if attr in vars(module):
                return module
        return None


class Missing:
    """Stands for a name loom does not have; any use raises the ImportError the import would have raised."""

    def __init__(self, name: str, module: str):
        self._name, self._module = name, module

    def _fail(self, *args, **kwargs):
        raise ImportError(f"cannot import name {self._name!r} from {self._module!r} (loom has no such name)")

    __call__ = __iter__ = __bool__ = __enter__ = _fail

    def __mro_entries__(self, bases):
        # a test helper may subclass a missing name at import time: the class still defines, its use fails
        def refuse(cls, *args, **kwargs):
            self._fail()

        return (type(self._name, (), {"__new__": refuse, "__init_subclass__": classmethod(lambda cls, **kw: None)}),)

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Missing(f"{self._name}.{attr}", self._module)  # module-level constants read from it stay lazy

    def __getitem__(self, key):
        return Missing(f"{self._name}[{key!r}]", self._module)

    __lt__ = __le__ = __gt__ = __ge__ = __len__ = __contains__ = _fail


class AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers" and not fullname.startswith("transformers."):
            return None
        if fullname in INFRASTRUCTURE:
            return None
        parent, _, last = fullname.rpartition(".")
        if isinstance(sys.modules.get(parent), AliasModule) and not last.startswith("__"):
            # an attribute that is no module (mock.patch("transformers.x.logger.warning") tries to import
            # `transformers.x.logger` first): not a module here, so the caller falls back to getattr
            found = getattr(sys.modules[parent], last)
            if not isinstance(found, (Missing, types.ModuleType)):
                return None
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec):
        return AliasModule(spec.name, _loom_modules(spec.name.partition(".")[2]))

    def exec_module(self, module):
        pass


def lenient_reference() -> None:
    """The reference run gets the same leniency: a name the installed `transformers` lacks (the test files are
    from a slightly different version) imports as a Missing placeholder instead of failing the whole file."""
    import transformers

    lazy = type(transformers)

    class Lenient(lazy):
        def __getattr__(self, name: str):
            try:
                return lazy.__getattr__(self, name)
            except AttributeError:
                if name.startswith("__") or importlib.util.find_spec(f"{self.__name__}.{name}") is not None:
                    raise  # a submodule not imported yet: `from . import x` must go on to import it
                return Missing(name, self.__name__)

    transformers.__class__ = Lenient


def install() -> None:
    kept = {}
    for name in INFRASTRUCTURE:
        kept[name] = importlib.import_module(name)
    for name in [n for n in sys.modules if n == "transformers" or n.startswith("transformers.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, AliasFinder())
    sys.modules.update(kept)
    package = importlib.import_module("transformers")
    for name, module in kept.items():
        if name.count(".") == 1:  # a direct child: reachable as an attribute too
            setattr(package, name.rpartition(".")[2], module)
