"""`train_new_from_iterator`: a tokenizer with the same pipeline (normalizer, pre-tokenizer, decoder, special
tokens, post-processor) and a vocabulary trained afresh on a new corpus, as the reference does it."""
from __future__ import annotations

import json

from tokenizers import AddedToken, Tokenizer, pre_tokenizers, trainers

TRAINERS = {"BPE": trainers.BpeTrainer, "Unigram": trainers.UnigramTrainer, "WordLevel": trainers.WordLevelTrainer,
            "WordPiece": trainers.WordPieceTrainer}


def _emptied_model(model: dict, rename: dict, trainer_kwargs: dict) -> None:
    """Drop the vocabulary (and merges) from the model's JSON, keeping its settings; fill trainer_kwargs."""
    kind = model["type"]
    if kind not in TRAINERS:
        raise ValueError(f"train_new_from_iterator trains BPE, Unigram, WordLevel and WordPiece models; this "
                         f"tokenizer's model is {kind}")
    if kind == "Unigram":
        if model.get("unk_id") is not None:
            unk = rename.get(model["vocab"][model["unk_id"]][0], model["vocab"][model["unk_id"]][0])
            model["unk_id"], model["vocab"] = 0, [[unk, 0.0]]
            trainer_kwargs.setdefault("unk_token", unk)
    else:
        model["vocab"] = {}
    if kind == "BPE":
        model["merges"] = []
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key) is not None:
                trainer_kwargs.setdefault(key, model[key])
    if model.get("unk_token") in rename:
        model["unk_token"] = rename[model["unk_token"]]


def _is_byte_level(pre_tokenizer: dict | None) -> bool:
    if pre_tokenizer is None:
        return False
    parts = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer["type"] == "Sequence" else [pre_tokenizer]
    return any(p["type"] == "ByteLevel" for p in parts)


def _renumbered(post_processor: dict, engine: Tokenizer, rename: dict) -> dict:
    """The post-processor's special tokens (renamed) with their ids in the new vocabulary."""
    def token_id(token: str) -> int:
        index = engine.token_to_id(token)
        if index is None:
            raise ValueError(f"the post-processor uses the special token {token!r}, which the trained vocabulary "
                             "lacks; pass it in new_special_tokens")
        return index

    for entry in post_processor.get("special_tokens", {}).values():
        entry["tokens"] = [rename.get(t, t) for t in entry["tokens"]]
        entry["ids"] = [token_id(t) for t in entry["tokens"]]
    for key in ("cls", "sep"):
        if key in post_processor:
            token = rename.get(post_processor[key][0], post_processor[key][0])
            post_processor[key] = [token, token_id(token)]
    for inner in post_processor.get("processors", []):
        _renumbered(inner, engine, rename)
    return post_processor


def train_new_from_iterator(tok, text_iterator, vocab_size: int, length: int | None = None,
                            new_special_tokens: list | None = None, special_tokens_map: dict | None = None,
                            **trainer_kwargs):
    """A new tokenizer of `tok`'s class and settings, its vocabulary (`vocab_size` entries) trained on
    `text_iterator` (texts, or batches of texts). `special_tokens_map` renames special tokens ({old: new});
    `new_special_tokens` adds some; other kwargs go to the `tokenizers` trainer."""
    rename = dict(special_tokens_map or {})
    state = json.loads(tok._tokenizer.to_str())
    added, post_processor = state.pop("added_tokens"), state.pop("post_processor")
    _emptied_model(state["model"], rename, trainer_kwargs)
    engine = Tokenizer.from_str(json.dumps(state))
    specials = []
    for token in added:
        if state["model"]["type"] != "Unigram" and not token.get("special"):
            continue
        fields = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in token}
        specials.append(AddedToken(rename.get(token["content"], token["content"]), special=True, **fields))
    specials.extend(new_special_tokens or [])
    if _is_byte_level(state.get("pre_tokenizer")):
        trainer_kwargs.setdefault("initial_alphabet", pre_tokenizers.ByteLevel.alphabet())
    trainer = TRAINERS[state["model"]["type"]](vocab_size=vocab_size, special_tokens=specials, **trainer_kwargs)
    engine.train_from_iterator(text_iterator, length=length, trainer=trainer)
    if post_processor is not None:
        engine = Tokenizer.from_str(json.dumps({**json.loads(engine.to_str()),
                                                "post_processor": _renumbered(post_processor, engine, rename)}))
    return type(tok)(tokenizer_object=engine, **_settings(tok, rename, new_special_tokens))


def _settings(tok, rename: dict, new_special_tokens: list | None) -> dict:
    """tok's constructor settings with its named special tokens renamed and the new special tokens appended."""
    settings = {k: v for k, v in tok.init_kwargs.items() if not k.startswith("_")}
    for name, token in tok._special_tokens_map.items():
        if token is None:
            continue
        content = rename.get(str(token), str(token))
        settings[name] = AddedToken(content, single_word=token.single_word, lstrip=token.lstrip, rstrip=token.rstrip,
                                    normalized=token.normalized, special=True) \
            if isinstance(token, AddedToken) else content
    extra = [rename.get(str(t), str(t)) for t in tok.extra_special_tokens] + [str(t) for t in new_special_tokens or []]
    if extra:
        settings["extra_special_tokens"] = extra
    return settings
