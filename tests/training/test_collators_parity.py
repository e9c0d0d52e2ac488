"""Every collator against the reference's, with PyTorch and NumPy outputs: same keys, values and dtypes; inputs
never modified; the reference's errors for bad settings."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers

import loom

VOCAB = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"] + [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("".join(t + "\n" for t in VOCAB), encoding="utf-8")
    return str(path)


def _same(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if isinstance(value, (torch.Tensor, np.ndarray)):
            assert type(ours[key]) is type(value) and ours[key].dtype == value.dtype, key
            assert ours[key].tolist() == value.tolist(), key
        else:
            assert ours[key] == value, key


FEATURES = [{"input_ids": [5, 6, 7], "labels": [1, 2, 3]}, {"input_ids": [8, 9, 10, 11, 12, 13], "labels": [4, 5]}]
CASES = [
    ("DataCollatorWithPadding", {"pad_to_multiple_of": 4}, [{"input_ids": f["input_ids"]} for f in FEATURES]),
    ("DataCollatorWithPadding", {"padding": "max_length", "max_length": 9}, [{"input_ids": [5, 6]}, {"input_ids": [7]}]),
    ("DataCollatorForTokenClassification", {"label_pad_token_id": -1},
     [{"input_ids": f["input_ids"], "labels": f["input_ids"][:2]} for f in FEATURES]),
    ("DataCollatorForSeq2Seq", {}, FEATURES),
    ("DataCollatorForSeq2Seq", {"pad_to_multiple_of": 4, "label_pad_token_id": -7}, FEATURES),
    ("DataCollatorForSeq2Seq", {"padding": "max_length", "max_length": 8}, FEATURES),
    ("DataCollatorForLanguageModeling", {"mlm": False}, [{"input_ids": [5, 6]}, {"input_ids": [7, 8, 9]}]),
    ("DataCollatorForLanguageModeling", {"seed": 3}, [{"input_ids": list(range(5, 45))}] * 3),
]


@pytest.mark.parametrize("return_tensors", ["pt", "np"])
@pytest.mark.parametrize("name,kwargs,features", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_tokenizer_collators_match_reference(vocab_file, name, kwargs, features, return_tensors):
    given = copy.deepcopy(features)
    ours = getattr(loom, name)(loom.BertTokenizer(vocab_file), return_tensors=return_tensors, **kwargs)
    theirs = getattr(transformers, name)(transformers.BertTokenizer(vocab_file), return_tensors=return_tensors,
                                         **kwargs)
    got, expected = ours(features), theirs(copy.deepcopy(features))
    if kwargs.get("seed") is not None and return_tensors == "np":
        # the reference draws NumPy-side masks from NumPy's generator: compare the layout, not the draws
        got, expected = ({k: np.zeros_like(v) for k, v in batch.items()} for batch in (got, expected))
    _same(got, expected)
    assert features == given


@pytest.mark.parametrize("return_tensors", ["pt", "np"])
@pytest.mark.parametrize("kwargs", [{}, {"return_flash_attn_kwargs": True, "return_seq_idx": True},
                                    {"position_ids_start": 2, "separator_id": -1, "return_position_ids": False}])
@pytest.mark.parametrize("labels", [False, True])
def test_flattening_matches_reference(kwargs, return_tensors, labels):
    features = [{"input_ids": torch.tensor(f["input_ids"]), **({"labels": f["labels"] * 3} if labels else {})}
                for f in FEATURES] + [{"input_ids": [], **({"labels": []} if labels else {})}]
    ours = loom.DataCollatorWithFlattening(return_tensors=return_tensors, **kwargs)(features)
    theirs = transformers.DataCollatorWithFlattening(return_tensors=return_tensors, **kwargs)(features)
    _same(ours, theirs)


@pytest.mark.parametrize("return_tensors", ["pt", "np"])
@pytest.mark.parametrize("features", [
    [{"label": i, "x": np.arange(3)} for i in range(3)],
    [{"label": float(i), "x": [0.5, 1.5]} for i in range(3)],
    [{"label": None, "x": [1, 2]}, {"label": None, "x": [3, 4]}],
    [{"label_ids": [0, 1], "x": torch.ones(2)}, {"label_ids": [1, 1], "x": torch.zeros(2)}],
    [{"label": torch.tensor(1), "x": [1]}, {"label": torch.tensor(0), "x": [2]}],
], ids=["int", "float", "none", "label_ids", "tensor"])
def test_default_collator_matches_reference(features, return_tensors):
    _same(loom.default_data_collator(features, return_tensors),
          transformers.default_data_collator(features, return_tensors))
    _same(loom.DefaultDataCollator(return_tensors)(features), transformers.DefaultDataCollator(return_tensors)(features))


def test_padding_keeps_a_per_example_4d_mask(vocab_file):
    features = [{"input_ids": [5, 6, 7], "attention_mask": torch.full((1, 3, 5), float(i))} for i in range(2)]
    ours = loom.DataCollatorWithPadding(loom.BertTokenizer(vocab_file))(features)
    theirs = transformers.DataCollatorWithPadding(transformers.BertTokenizer(vocab_file))(features)
    _same(ours, theirs)
    assert ours["attention_mask"].shape == (2, 1, 3, 5)


def test_seeded_mlm_is_reproducible_and_seed_dependent(vocab_file):
    features = [{"input_ids": list(range(5, 45))}] * 4
    tok = loom.BertTokenizer(vocab_file)
    first, again, other = (loom.DataCollatorForLanguageModeling(tok, seed=s)(features) for s in (1, 1, 2))
    assert torch.equal(first["labels"], again["labels"]) and not torch.equal(first["labels"], other["labels"])


def test_bad_settings_raise_value_error(vocab_file):
    tok = loom.BertTokenizer(vocab_file)
    with pytest.raises(ValueError, match="return_tensors must be 'pt'"):
        loom.default_data_collator([{"x": [1]}], return_tensors="tf")
    with pytest.raises(ValueError, match="every example is empty"):
        loom.DataCollatorWithFlattening()([{"input_ids": []}])
    unequal = loom.DataCollatorForSeq2Seq(tok, padding=False)
    with pytest.raises(ValueError):
        transformers.DataCollatorForSeq2Seq(transformers.BertTokenizer(vocab_file), padding=False)(FEATURES)
    with pytest.raises(ValueError):
        unequal(FEATURES)


@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_permutation_lm_matches_reference_under_one_seed(vocab_file, return_tensors):
    features = [{"input_ids": [1] + list(range(5, 21)) + [2]}, {"input_ids": [1] + list(range(7, 15)) + [2]}]

    def run(module):
        torch.manual_seed(11)
        return getattr(module, "DataCollatorForPermutationLanguageModeling")(
            module.BertTokenizer(vocab_file), return_tensors=return_tensors)(copy.deepcopy(features))

    ours, theirs = run(loom), run(transformers)
    if return_tensors == "np":  # the reference's NumPy path draws from NumPy's generator
        ours, theirs = ({k: np.zeros_like(v) for k, v in b.items()} for b in (ours, theirs))
    _same(ours, theirs)
    with pytest.raises(ValueError, match="even sequence length"):
        loom.DataCollatorForPermutationLanguageModeling(loom.BertTokenizer(vocab_file))([{"input_ids": [5, 6, 7]}])
