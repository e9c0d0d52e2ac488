"""Tokenization on the Rust `tokenizers` engine with the reference's interface and files.

`AutoTokenizer.from_pretrained(path_or_id)` loads tokenizer.json, or converts legacy files (WordPiece vocab.txt,
byte-level BPE vocab.json + merges.txt, SentencePiece .model) to an equivalent engine pipeline, and returns a
`PreTrainedTokenizerFast`. Calls return a `BatchEncoding`. `get_json_schema(func)` turns a typed, documented Python
function into the tool schema chat templates read (`apply_chat_template(tools=[func])` does it for you).

model_max_length rule: the `model_max_length` keyword if given; else tokenizer_config.json's model_max_length
unless it is the reference's "no limit" sentinel (values >= 1e20, e.g. 1e30); else the model's position limit from
config.json (max_position_embeddings, n_positions, ... minus the position offset of RoBERTa-like models); else
the limit is unknown: `tok.model_max_length` holds the sentinel int(1e30) for compatibility, and any call that
would need it (truncation or padding="max_length" without max_length) raises a ValueError instead of silently
not truncating.

Differences from the reference, on purpose: a max_length too short for the special tokens raises a ValueError
(the reference silently skips truncation); unknown keyword arguments to a call raise a TypeError; tokenizer.json is
used as written (the reference rebuilds some classes' pipelines from their vocabulary).
"""
from .arguments import PaddingStrategy, TensorType, TruncationStrategy
from .auto import AutoTokenizer
from .batch_encoding import BatchEncoding, CharSpan, TokenSpan
from .classes import TOKENIZER_CLASSES
from .protobuf import import_protobuf, import_protobuf_decode_error
from .tokenizer import PreTrainedTokenizerFast
from .tool_schema import DocstringParsingException, TypeHintParsingException, get_json_schema

__all__ = ["AutoTokenizer", "BatchEncoding", "CharSpan", "DocstringParsingException", "PaddingStrategy",
           "PreTrainedTokenizerFast", "TensorType", "TruncationStrategy",
           "TokenSpan", "TypeHintParsingException", "get_json_schema", "import_protobuf",
           "import_protobuf_decode_error",
           *TOKENIZER_CLASSES, *(name + "Fast" for name in TOKENIZER_CLASSES)]
globals().update(TOKENIZER_CLASSES)
globals().update({name + "Fast": cls for name, cls in TOKENIZER_CLASSES.items()})
