"""PreTrainedTokenizerFast: the reference's tokenizer interface over a `tokenizers.Tokenizer` engine.

The engine does all per-token work (normalise, split, model, special tokens, truncation); this class keeps the
special-token bookkeeping, checks arguments, and turns engine output into model inputs (see encoding.py).
"""
from __future__ import annotations

import copy
import os
from typing import Any

from tokenizers import AddedToken, Tokenizer

from ..hub_push import PushToHubMixin
from . import chat, encoding, saving
from . import padding as padding_ops
from .arguments import VERY_LARGE_INTEGER, batch_inputs, resolve_strategy
from .batch_encoding import BatchEncoding, check_tensor_type
from .convert import special_tokens_processor

SPECIAL_TOKENS_ATTRIBUTES = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                             "mask_token"]
_CALL_OPTIONS = ("return_token_type_ids", "return_attention_mask", "return_overflowing_tokens",
                 "return_special_tokens_mask", "return_offsets_mapping", "return_length", "verbose",
                 "split_special_tokens", "pad_to_multiple_of", "padding_side", "stride", "is_split_into_words",
                 "add_special_tokens", "return_tensors", "padding", "truncation", "max_length")


def _to_list(ids):
    if hasattr(ids, "tolist"):  # torch.Tensor, numpy array or scalar
        return ids.tolist()
    return ids


def _token_property(name: str) -> property:
    def get(self) -> str | None:
        value = self._special_tokens_map.get(name)
        return None if value is None else str(value)

    def set(self, value) -> None:
        if value is not None and not isinstance(value, (str, AddedToken)):
            raise TypeError(f"{name} must be a str, an AddedToken or None, got {type(value).__name__}")
        self._special_tokens_map[name] = value

    return property(get, set, doc=f"The {name.replace('_', ' ')} (a str), or None when the tokenizer has none.")


def _id_property(name: str) -> property:
    def get(self) -> int | None:
        value = self._special_tokens_map.get(name)
        return None if value is None else self.convert_tokens_to_ids(str(value))

    def set(self, value) -> None:
        self._special_tokens_map[name] = None if value is None else self.convert_ids_to_tokens(int(value))

    return property(get, set, doc=f"Id of the {name.replace('_', ' ')}, or None.")


class PreTrainedTokenizerFast(PushToHubMixin):
    """A tokenizer with the reference's public interface, backed by the Rust `tokenizers` engine."""

    SPECIAL_TOKENS_ATTRIBUTES = SPECIAL_TOKENS_ATTRIBUTES
    model_input_names: list[str] = ["input_ids", "attention_mask"]
    padding_side: str = "right"
    truncation_side: str = "right"
    is_fast = True

    def __init__(self, tokenizer_object: Tokenizer | None = None, tokenizer_file: str | os.PathLike | None = None,
                 **kwargs):
        engine = kwargs.pop("_engine", None)
        if engine is None and tokenizer_object is not None:
            engine = copy.deepcopy(tokenizer_object)
        if engine is None and tokenizer_file is not None:
            from .loading import load_engine_file

            engine = load_engine_file(tokenizer_file)
        if engine is None:
            raise ValueError("PreTrainedTokenizerFast needs tokenizer_object= (a tokenizers.Tokenizer) or "
                             "tokenizer_file= (a tokenizer.json path); to load a model's tokenizer use "
                             "AutoTokenizer.from_pretrained(path_or_id)")
        self._tokenizer: Tokenizer = engine
        self._engine_truncation = None
        self._tokenizer_class = kwargs.pop("_tokenizer_class", None)
        kwargs.pop("_source_file", None)
        if "additional_special_tokens" in kwargs and "extra_special_tokens" not in kwargs:
            kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
        self.init_kwargs = dict(kwargs)
        self._take_settings(kwargs)
        self._take_special_tokens(kwargs)
        self._ensure_special_tokens_in_engine()
        if self._explicit_bos_eos or self._tokenizer.post_processor is None:
            self.update_post_processor()

    # construction helpers
    def _take_settings(self, kwargs: dict) -> None:
        self.name_or_path = str(kwargs.pop("name_or_path", ""))
        limit = kwargs.pop("model_max_length", None)
        self.model_max_length = int(limit) if limit is not None and limit < VERY_LARGE_INTEGER else VERY_LARGE_INTEGER
        for key in ("padding_side", "truncation_side"):
            value = kwargs.pop(key, getattr(type(self), key))
            if value not in ("left", "right"):
                raise ValueError(f"{key} must be 'left' or 'right', got {value!r}")
            setattr(self, key, value)
        self.model_input_names = list(kwargs.pop("model_input_names", type(self).model_input_names))
        self.clean_up_tokenization_spaces = bool(kwargs.pop("clean_up_tokenization_spaces", False))
        self.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = bool(
            kwargs.pop("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        self.split_special_tokens = bool(kwargs.pop("split_special_tokens", False))
        template = kwargs.pop("chat_template", None)
        if isinstance(template, (list, tuple)):  # saved as [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}
        self.chat_template = template
        self._explicit_bos_eos = "add_bos_token" in kwargs or "add_eos_token" in kwargs
        self._add_bos_token = bool(kwargs.pop("add_bos_token", False))
        self._add_eos_token = bool(kwargs.pop("add_eos_token", False))
        self._pad_token_type_id = 0
        self.verbose = kwargs.pop("verbose", False)

    def _take_special_tokens(self, kwargs: dict) -> None:
        self._special_tokens_map: dict[str, Any] = dict.fromkeys(SPECIAL_TOKENS_ATTRIBUTES)
        self._extra_special_tokens: list = []
        self._model_specific: list[str] = []
        for key in list(kwargs):
            value = kwargs[key]
            if key in SPECIAL_TOKENS_ATTRIBUTES:
                if value is not None and not isinstance(value, (str, AddedToken)):
                    raise TypeError(f"{key} must be a str or an AddedToken, got {type(value).__name__}")
                self._special_tokens_map[key] = kwargs.pop(key)
            elif key == "extra_special_tokens":
                value = kwargs.pop(key)
                if isinstance(value, dict):  # named model-specific tokens, e.g. {"image_token": "<image>"}
                    for name, token in value.items():
                        self._add_model_specific(name, token)
                elif value is not None:
                    self._extra_special_tokens = list(value)
            elif key.endswith("_token") and isinstance(value, (str, AddedToken)):
                self._add_model_specific(key, kwargs.pop(key))
        self._init_extra = kwargs  # settings loom does not use (do_lower_case, ...), kept for save_pretrained

    def _add_model_specific(self, name: str, token) -> None:
        self._special_tokens_map[name] = token
        if name not in self._model_specific:
            self._model_specific.append(name)

    def _ensure_special_tokens_in_engine(self) -> None:
        # every special token must match as one unit in text, so it has to be an added token of the engine
        present = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        missing = []
        for token in [*self._special_tokens_map.values(), *self._extra_special_tokens]:
            if token is None or str(token) in present:
                continue
            if isinstance(token, str):
                token = AddedToken(token, special=True, normalized=False)
            elif not token.special:
                token = AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip,
                                   rstrip=token.rstrip, normalized=token.normalized, special=True)
            missing.append(token)
            present.add(str(token))
        if missing:
            self._tokenizer.add_special_tokens(missing)

    # loading and saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *init_inputs,
                        **kwargs) -> "PreTrainedTokenizerFast":
        """Load a tokenizer from a model directory or hub id (tokenizer.json, or legacy files converted)."""
        from .loading import load_pretrained

        if kwargs.get("gguf_file") is not None:  # a GGUF's metadata (loom/tokenization/gguf.py)
            from .gguf import load_gguf_tokenizer

            engine, init = load_gguf_tokenizer(pretrained_model_name_or_path, **kwargs)
        else:
            kwargs.pop("gguf_file", None)
            engine, init = load_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(_engine=engine, **init)

    def train_new_from_iterator(self, text_iterator, vocab_size: int, length: int | None = None,
                                new_special_tokens: list | None = None, special_tokens_map: dict | None = None,
                                **kwargs) -> "PreTrainedTokenizerFast":
        """A tokenizer with this one's pipeline and settings and a vocabulary trained on `text_iterator`."""
        from .training import train_new_from_iterator

        return train_new_from_iterator(self, text_iterator, vocab_size, length=length,
                                       new_special_tokens=new_special_tokens, special_tokens_map=special_tokens_map,
                                       **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, legacy_format: bool | None = None,
                        filename_prefix: str | None = None, push_to_hub: bool = False, **kwargs) -> tuple[str, ...]:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (when there is a template);
        push_to_hub=True then uploads them (`repo_id`, `commit_message`, `private`, `token`, `create_pr`)."""
        return saving.save_pretrained(self, save_directory, legacy_format=legacy_format,
                                      filename_prefix=filename_prefix, push_to_hub=push_to_hub, **kwargs)

    # special tokens
    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens that are set, as strings."""
        return {k: str(v) for k, v in self._special_tokens_map.items() if v is not None}

    @property
    def extra_special_tokens(self) -> list[str]:
        return [str(t) for t in self._extra_special_tokens]

    @extra_special_tokens.setter
    def extra_special_tokens(self, tokens) -> None:
        self._extra_special_tokens = list(tokens or [])

    @property
    def extra_special_tokens_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.extra_special_tokens)

    additional_special_tokens = extra_special_tokens  # the reference's older name
    additional_special_tokens_ids = extra_special_tokens_ids

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens then extra ones, without duplicates."""
        seen: dict[str, None] = {}
        for token in [*self._special_tokens_map.values(), *self._extra_special_tokens]:
            if token is not None:
                seen.setdefault(str(token))
        return list(seen)

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def __getattr__(self, name: str):
        # model-specific named tokens from the config, e.g. tok.image_token / tok.image_token_id
        specific = self.__dict__.get("_model_specific", ())
        base = name.removesuffix("_id")
        if base in specific:
            value = self._special_tokens_map[base]
            if value is None:
                return None
            return str(value) if base == name else self.convert_tokens_to_ids(str(value))
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def add_special_tokens(self, special_tokens_dict: dict, replace_extra_special_tokens: bool = True) -> int:
        """Set named special tokens (and extra ones) and add them to the vocabulary; returns how many are new."""
        to_add = []
        for key, value in dict(special_tokens_dict).items():
            if key in ("additional_special_tokens", "extra_special_tokens"):
                if not isinstance(value, (list, tuple)) or not all(isinstance(t, (str, AddedToken)) for t in value):
                    raise TypeError(f"{key} must be a list of str or AddedToken, got {value!r}")
                tokens = [AddedToken(t, special=True, normalized=False) if isinstance(t, str) else t for t in value]
                if replace_extra_special_tokens:
                    self._extra_special_tokens = list(tokens)
                else:
                    known = set(self.extra_special_tokens)
                    self._extra_special_tokens += [t for t in tokens if str(t) not in known]
                to_add += tokens
            elif key in self._special_tokens_map:
                if not isinstance(value, (str, AddedToken)):
                    raise TypeError(f"{key} must be a str or an AddedToken, got {type(value).__name__}")
                token = AddedToken(value, special=True, normalized=False) if isinstance(value, str) else value
                self._special_tokens_map[key] = token
                to_add.append(token)
            else:
                raise ValueError(f"{key!r} is not a special token name; use one of "
                                 f"{[*self._special_tokens_map, 'extra_special_tokens']}")
        return self.add_tokens(to_add, special_tokens=True)

    def add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        """Add tokens that match as whole units in text; returns how many were not in the vocabulary yet."""
        if not new_tokens:
            return 0
        if not isinstance(new_tokens, (list, tuple)):
            new_tokens = [new_tokens]
        for token in new_tokens:
            if not isinstance(token, (str, AddedToken)):
                raise TypeError(f"add_tokens takes str or tokenizers.AddedToken values, got {type(token).__name__}")
        if special_tokens:
            return self._tokenizer.add_special_tokens(list(new_tokens))
        return self._tokenizer.add_tokens(list(new_tokens))

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos_token = bool(value)
        self.update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos_token = bool(value)
        self.update_post_processor()

    def update_post_processor(self) -> None:
        """Rebuild the engine's post-processor from add_bos_token/add_eos_token and the bos/eos tokens."""
        bos = (self.bos_token, self.bos_token_id) if self._add_bos_token and self.bos_token is not None else None
        eos = (self.eos_token, self.eos_token_id) if self._add_eos_token and self.eos_token is not None else None
        self._tokenizer.post_processor = special_tokens_processor(bos, eos)

    # vocabulary
    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` engine."""
        return self._tokenizer

    @property
    def decoder(self):
        return self._tokenizer.decoder

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __bool__(self) -> bool:
        return True

    def get_vocab(self) -> dict[str, int]:
        """Token -> id for the whole vocabulary, added tokens included."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return self._tokenizer.get_added_tokens_decoder()

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self.added_tokens_decoder.items())}

    def get_added_vocab(self) -> dict[str, int]:
        return self.added_tokens_encoder

    @property
    def pad_token_type_id(self) -> int:
        return self._pad_token_type_id

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """How many special tokens the post-processor puts around one sequence (or a pair)."""
        return self._tokenizer.num_special_tokens_to_add(pair)

    @property
    def max_len_single_sentence(self) -> int:
        return self.model_max_length - self.num_special_tokens_to_add(pair=False)

    @property
    def max_len_sentences_pair(self) -> int:
        return self.model_max_length - self.num_special_tokens_to_add(pair=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int] | None:
        """Id of a token (the unk id when it is unknown), or ids of a list of tokens."""
        if tokens is None:
            return None
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            if index is None:
                unk = self._special_tokens_map.get("unk_token")
                return None if unk is None else self._tokenizer.token_to_id(str(unk))
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        """Token string of an id, or of each id in a list (special tokens dropped on request)."""
        ids = _to_list(ids)
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        """1 for special tokens and 0 for others, for ids that already contain special tokens."""
        if not already_has_special_tokens:
            raise NotImplementedError("get_special_tokens_mask needs already_has_special_tokens=True; to mark the "
                                      "special tokens a call adds, use tok(..., return_special_tokens_mask=True)")
        if token_ids_1 is not None:
            raise ValueError("token_ids_1 cannot be given when the ids already hold special tokens")
        special = set(self.all_special_ids)
        return [1 if int(i) in special else 0 for i in token_ids_0]

    # encoding
    def __call__(self, text=None, text_pair=None, text_target=None, text_pair_target=None,
                 add_special_tokens: bool = True, padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, stride: int = 0, is_split_into_words: bool = False,
                 pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                 return_tensors: str | None = None, return_token_type_ids: bool | None = None,
                 return_attention_mask: bool | None = None, return_overflowing_tokens: bool = False,
                 return_special_tokens_mask: bool = False, return_offsets_mapping: bool = False,
                 return_length: bool = False, verbose: bool = True, tokenizer_kwargs: dict | None = None,
                 **kwargs) -> BatchEncoding:
        """Tokenize one text, a pair, or a batch of either into model inputs (see the reference's __call__)."""
        options = dict(add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                       max_length=max_length, stride=stride, is_split_into_words=is_split_into_words,
                       pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
                       return_tensors=return_tensors, return_token_type_ids=return_token_type_ids,
                       return_attention_mask=return_attention_mask,
                       return_overflowing_tokens=return_overflowing_tokens,
                       return_special_tokens_mask=return_special_tokens_mask,
                       return_offsets_mapping=return_offsets_mapping, return_length=return_length,
                       split_special_tokens=kwargs.pop("split_special_tokens", self.split_special_tokens))
        max_target_length = kwargs.pop("max_target_length", None)
        options.update(tokenizer_kwargs or {})
        unknown = [k for k in kwargs if k not in _CALL_OPTIONS]
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown} for the tokenizer call")
        options.update(kwargs)
        options.pop("verbose", None)
        if text is None and text_target is None:
            raise ValueError("You need to specify either `text` or `text_target`: got text=None")
        out = None
        if text is not None:
            out = self._encode(text, text_pair, "text", **options)
        if text_target is not None:
            if max_target_length is not None:
                options["max_length"] = max_target_length
            target = self._encode(text_target, text_pair_target, "text_target", **options)
            if out is None:
                return target
            out["labels"] = target["input_ids"]
        return out

    def _encode(self, text, text_pair, name: str, *, padding, truncation, max_length, pad_to_multiple_of,
                stride, is_split_into_words, return_tensors, **options) -> BatchEncoding:
        return_tensors = check_tensor_type(return_tensors)
        strategy = resolve_strategy(self, padding, truncation, max_length, pad_to_multiple_of, stride)
        inputs, is_batched = batch_inputs(text, text_pair, is_split_into_words, name)
        if strategy.truncation is not None and options["add_special_tokens"] and inputs:
            self._check_room_for_specials(strategy.max_length, any(isinstance(x, tuple) for x in inputs))
        return encoding.encode_inputs(self, inputs, is_batched, strategy, stride=stride,
                                      is_split_into_words=is_split_into_words,
                                      pad_to_multiple_of=pad_to_multiple_of, return_tensors=return_tensors,
                                      **options)

    def _check_room_for_specials(self, max_length: int, pair: bool) -> None:
        # the engine silently skips truncation when max_length cannot even hold the special tokens
        needed = self.num_special_tokens_to_add(pair)
        if max_length < needed:
            raise ValueError(f"max_length={max_length} is shorter than the {needed} special tokens added to each "
                             f"{'pair' if pair else 'sequence'}; use max_length >= {needed} or "
                             "add_special_tokens=False")

    def encode(self, text, text_pair=None, add_special_tokens: bool = True, padding: bool | str = False,
               truncation: bool | str | None = None, max_length: int | None = None, stride: int = 0,
               padding_side: str | None = None, return_tensors: str | None = None, **kwargs):
        """Token ids of one text (or pair); a batch gives a list of id lists."""
        return self(text, text_pair, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                    max_length=max_length, stride=stride, padding_side=padding_side, return_tensors=return_tensors,
                    **kwargs)["input_ids"]

    def encode_plus(self, text, text_pair=None, **kwargs) -> BatchEncoding:
        """Same as calling the tokenizer on one text or pair (kept for code written against older versions)."""
        return self(text, text_pair, **kwargs)

    def batch_encode_plus(self, batch_text_or_text_pairs, **kwargs) -> BatchEncoding:
        """Same as calling the tokenizer on a batch; items may be texts or (text, text_pair) tuples."""
        return self(list(batch_text_or_text_pairs), **kwargs)

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False, **kwargs) -> list[str]:
        """Token strings of a text (no special tokens unless asked)."""
        # asking for offsets keeps the engine's encodings from the first pass (see encoding.py)
        options = {"return_offsets_mapping": True, **kwargs}
        return self(text, pair, add_special_tokens=add_special_tokens, **options).encodings[0].tokens

    def pad(self, encoded_inputs, padding: bool | str = True, max_length: int | None = None,
            pad_to_multiple_of: int | None = None, padding_side: str | None = None,
            return_attention_mask: bool | None = None, return_tensors: str | None = None,
            verbose: bool = True) -> BatchEncoding:
        """Pad already-encoded features (one dict, a dict of lists, or a list of dicts) to one length."""
        return padding_ops.pad(self, encoded_inputs, padding=padding, max_length=max_length,
                           pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
                           return_attention_mask=return_attention_mask, return_tensors=return_tensors)

    # decoding
    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
               **kwargs) -> str | list[str]:
        """Text of a list of ids (a batch of lists gives a list of texts)."""
        token_ids = _to_list(token_ids)
        if isinstance(token_ids, dict):
            token_ids = _to_list(token_ids["input_ids"])
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if not isinstance(token_ids, (list, tuple)):
            raise TypeError(f"decode takes token ids (a list of int, a tensor or an array), got "
                            f"{type(token_ids).__name__}")
        if token_ids and isinstance(token_ids[0], (list, tuple)):
            return self.batch_decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces)
        text = self._tokenizer.decode([int(i) for i in token_ids], skip_special_tokens=skip_special_tokens)
        return self._clean_up(text, clean_up_tokenization_spaces)

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None, **kwargs) -> list[str]:
        """Texts of a batch of id lists."""
        sequences = _to_list(sequences)
        if not sequences:
            return []
        if not isinstance(sequences[0], (list, tuple)):
            sequences = [sequences]
        texts = self._tokenizer.decode_batch([[int(i) for i in s] for s in sequences],
                                             skip_special_tokens=skip_special_tokens)
        return [self._clean_up(t, clean_up_tokenization_spaces) for t in texts]

    def _clean_up(self, text: str, clean_up: bool | None) -> str:
        clean_up = self.clean_up_tokenization_spaces if clean_up is None else clean_up
        # the clean-up was written for WordPiece; on BPE it deletes real spaces, so the reference skips it there
        if clean_up and (type(self._tokenizer.model).__name__ != "BPE"
                         or self.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output):
            return self.clean_up_tokenization(text)
        return text

    @staticmethod
    def clean_up_tokenization(text: str) -> str:
        """Remove the spaces WordPiece decoding leaves before punctuation and English contractions."""
        for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(before, after)
        return text

    # chat templates
    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The Jinja template to use: an explicit one, a named one, or the tokenizer's default."""
        return chat.select_template(self, chat_template, tools)

    def apply_chat_template(self, conversation, tools: list | None = None, documents: list | None = None,
                            chat_template: str | None = None, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = True,
                            padding: bool | str = False, truncation: bool = False, max_length: int | None = None,
                            return_tensors: str | None = None, return_dict: bool = True,
                            return_assistant_tokens_mask: bool = False, tokenizer_kwargs: dict | None = None,
                            **kwargs):
        """Render a conversation with the chat template (sandboxed Jinja) and optionally tokenize it."""
        return chat.apply_chat_template(
            self, conversation, tools=tools, documents=documents, chat_template=chat_template,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            tokenize=tokenize, padding=padding, truncation=truncation, max_length=max_length,
            return_tensors=return_tensors, return_dict=return_dict,
            return_assistant_tokens_mask=return_assistant_tokens_mask, tokenizer_kwargs=tokenizer_kwargs,
            **kwargs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name_or_path='{self.name_or_path}', vocab_size={self.vocab_size}, "
                f"model_max_length={self.model_max_length}, padding_side='{self.padding_side}', "
                f"truncation_side='{self.truncation_side}', special_tokens={self.special_tokens_map})")


for _name in SPECIAL_TOKENS_ATTRIBUTES:
    setattr(PreTrainedTokenizerFast, _name, _token_property(_name))
    setattr(PreTrainedTokenizerFast, f"{_name}_id", _id_property(_name))
