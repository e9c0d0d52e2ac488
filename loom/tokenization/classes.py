"""The reference's per-family tokenizer class names (`BertTokenizer`, `GPT2TokenizerFast`, `LlamaTokenizer`, ...).

Each is loom's fast tokenizer with its family's defaults (special tokens, model inputs, padding side), built from a
`tokenizer.json` / `tokenizers.Tokenizer`, or from the family's own vocabulary files as its reference constructor
takes them: `BertTokenizer(vocab_file)` (WordPiece vocab.txt), `GPT2Tokenizer(vocab_file, merges_file)` (byte-level
BPE), `LlamaTokenizer(vocab_file)` (a SentencePiece model). In the reference 5.x the `...Fast` names are the same
classes; here too.
"""
from __future__ import annotations

import os

from .families import CLASS_FAMILIES, FAMILIES, Family
from .loading import SPM_FILES, _finish_family, _legacy_engine
from .tokenizer import PreTrainedTokenizerFast

# the file format each family's `vocab_file` argument holds
_WORDPIECE, _BPE, _SPM = "vocab.txt", "vocab.json", SPM_FILES[0]
_VOCAB_FORMATS = {"bert": _WORDPIECE, "distilbert": _WORDPIECE, "mpnet": _WORDPIECE, "gpt2": _BPE, "roberta": _BPE,
                  "llama": _SPM, "t5": _SPM, "xlm-roberta": _SPM, "camembert": _SPM, "deberta-v2": _SPM}


class _GivenFiles:
    """The vocabulary files passed to a constructor, under the names the legacy-file loader asks for."""

    def __init__(self, files: dict[str, str | os.PathLike | None], source: str) -> None:
        self.files, self.source = {k: v for k, v in files.items() if v is not None}, source

    def get(self, name: str):
        from pathlib import Path

        value = self.files.get(name)
        return Path(value) if value is not None else None


class FamilyTokenizer(PreTrainedTokenizerFast):
    """Base of the per-family classes: `family` names the defaults to apply."""

    family: Family = FAMILIES["generic"]

    def __init__(self, vocab_file: str | os.PathLike | None = None, merges_file: str | os.PathLike | None = None,
                 tokenizer_file: str | os.PathLike | None = None, tokenizer_object=None, **kwargs) -> None:
        defaults = {"model_input_names": list(self.family.model_input_names), "padding_side": self.family.padding_side,
                    **self.family.special_tokens}
        kwargs = {**defaults, **kwargs}
        if "_engine" not in kwargs and tokenizer_object is None and tokenizer_file is None:
            kwargs["_engine"] = self._engine_from_files(vocab_file, merges_file, kwargs)
        super().__init__(tokenizer_object=tokenizer_object, tokenizer_file=tokenizer_file, **kwargs)

    @classmethod
    def _engine_from_files(cls, vocab_file, merges_file, init: dict):
        if vocab_file is None:
            raise ValueError(f"{cls.__name__} needs vocab_file= (its vocabulary file), tokenizer_file= (a "
                             "tokenizer.json) or tokenizer_object=; to load a model's tokenizer use "
                             f"{cls.__name__}.from_pretrained(path_or_id)")
        vocab_format = _VOCAB_FORMATS.get(cls.family.name, _WORDPIECE)
        if vocab_format == _BPE and merges_file is None:
            raise ValueError(f"{cls.__name__} needs merges_file= beside vocab_file= (byte-level BPE)")
        files = _GivenFiles({vocab_format: vocab_file, "merges.txt": merges_file}, str(vocab_file))
        engine, _ = _legacy_engine(files, cls.family, init)
        _finish_family(engine, cls.family, init)
        return engine


def _family_class(name: str) -> type:
    family = FAMILIES[CLASS_FAMILIES[name]]
    doc = f"The reference's `{name}`: loom's fast tokenizer with the {family.name} family's defaults."
    return type(name, (FamilyTokenizer,), {"family": family, "__doc__": doc, "__module__": __name__})


CLASS_NAMES = [name for name, family in CLASS_FAMILIES.items() if family != "generic"]
TOKENIZER_CLASSES = {name: _family_class(name) for name in CLASS_NAMES}
globals().update(TOKENIZER_CLASSES)
globals().update({name + "Fast": cls for name, cls in TOKENIZER_CLASSES.items()})
__all__ = sorted([*TOKENIZER_CLASSES, *(name + "Fast" for name in TOKENIZER_CLASSES)])
