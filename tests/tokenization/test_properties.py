"""Property tests: byte-level BPE round-trips any unicode, no input crashes, offsets slice back to token text."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(st.text(max_size=60))
def test_byte_level_bpe_round_trip(loom_tok, text):
    for name in ("gpt2", "llama3"):
        tok = loom_tok(name)
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@SETTINGS
@given(st.text(max_size=40), st.text(max_size=40))
def test_no_input_crashes(loom_tok, first, second):
    for name in ("minilm", "spm_unigram", "spm_bpe_llama"):
        tok = loom_tok(name)
        out = tok([first, second], [second, first], truncation=True, max_length=8, padding=tok.pad_token is not None,
                  return_offsets_mapping=True)
        assert all(len(ids) <= 8 for ids in out["input_ids"])
        tok.decode(out["input_ids"][0])


@SETTINGS
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=50))
def test_offsets_slice_back_to_token_text(loom_tok, text):
    tok = loom_tok("minilm")
    out = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    for token, (start, end) in zip(out.tokens(), out["offset_mapping"]):
        piece = text[start:end]
        assert 0 <= start < end <= len(text)
        if token != tok.unk_token:
            # the token is the lower-cased, accent-stripped form of the text it covers
            assert token.removeprefix("##") == tok.backend_tokenizer.normalizer.normalize_str(piece)
    gpt = loom_tok("gpt2")
    out = gpt(text, return_offsets_mapping=True)
    for token, (start, end) in zip(out.tokens(), out["offset_mapping"]):
        # a byte-level token may hold part of a character: its bytes lie inside the characters it points at
        assert bytes(BYTE_OF[c] for c in token) in text[start:end].encode("utf-8")


def _byte_level_alphabet() -> dict[str, int]:
    # GPT-2's printable stand-ins for the 256 byte values
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_OF = _byte_level_alphabet()
