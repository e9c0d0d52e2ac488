"""Property tests: byte-level BPE round-trips any unicode, no input crashes, offsets slice back to token text."""
from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Added special tokens are matched in the raw text, before normalisation. Texts that contain them are generated on
# purpose, so that path is tried on every run rather than when Hypothesis happens to spell "[MASK]".
SPECIAL_TEXTS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]", "<|endoftext|>")
_PLAIN = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=50)
_WITH_SPECIALS = st.lists(st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=15),
                                    st.sampled_from(SPECIAL_TEXTS)), max_size=5).map("".join)


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
@given(st.one_of(_PLAIN, _WITH_SPECIALS))
@example("a[MASK]b")  # an added token is not lower-cased: it covers exactly its own text
@example("데")  # NFD splits a Hangul syllable into jamo, two tokens that both point at the one character
@example("本")  # BERT's normaliser pads a CJK character with spaces, which the pre-tokenizer then splits on
def test_offsets_slice_back_to_token_text(loom_tok, text):
    tok = loom_tok("minilm")
    added = {t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values() if not t.normalized}
    assert added == set(SPECIAL_TEXTS[:5])  # the strategy spells this tokenizer's specials
    out = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    assert all(0 <= start < end <= len(text) for start, end in out["offset_mapping"])
    for tokens, start, end in _overlapping_runs(out.tokens(), out["offset_mapping"]):
        piece = text[start:end]
        if tokens == [piece] and piece in added:
            continue  # matched in the raw text, before normalisation
        if tok.unk_token not in tokens:
            # the tokens spell the lower-cased, accent-stripped (NFD) form of the text they cover, without the spaces
            # the normaliser puts around CJK characters (whitespace is never part of a WordPiece token)
            spelled = "".join(t.removeprefix("##") for t in tokens)
            assert spelled == "".join(tok.backend_tokenizer.normalizer.normalize_str(piece).split())
    gpt = loom_tok("gpt2")
    out = gpt(text, return_offsets_mapping=True)
    for token, (start, end) in zip(out.tokens(), out["offset_mapping"]):
        # a byte-level token may hold part of a character: its bytes lie inside the characters it points at
        assert bytes(BYTE_OF[c] for c in token) in text[start:end].encode("utf-8")


def _overlapping_runs(tokens: list[str], offsets: list[tuple[int, int]]) -> list[tuple[list[str], int, int]]:
    """Consecutive tokens grouped while their spans overlap, with the span of each group. A group of several is one
    character that normalisation turned into more than one token."""
    runs = []
    for token, (start, end) in zip(tokens, offsets):
        if runs and start < runs[-1][2]:
            runs[-1] = (runs[-1][0] + [token], runs[-1][1], max(runs[-1][2], end))
        else:
            runs.append(([token], start, end))
    return runs


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
