"""Data collators: padding, causal and masked language modelling (80/10/10), token classification, default."""
from __future__ import annotations

import pytest
import torch

from loom.training import (DataCollatorForLanguageModeling, DataCollatorForTokenClassification,
                           DataCollatorWithPadding, default_data_collator)


@pytest.fixture(scope="module")
def tokenizers(minilm_dir):
    import transformers

    import loom

    return loom.AutoTokenizer.from_pretrained(minilm_dir), transformers.AutoTokenizer.from_pretrained(minilm_dir)


TEXTS = ["a short one", "a somewhat longer sentence with more words in it", "mid length text here"]


def test_padding_collator_matches_reference(tokenizers):
    import transformers

    ours, ref = tokenizers
    feats = [{**ours(t), "label": i} for i, t in enumerate(TEXTS)]
    batch = DataCollatorWithPadding(ours, pad_to_multiple_of=8)(feats)
    expected = transformers.DataCollatorWithPadding(ref, pad_to_multiple_of=8)(
        [{**ref(t), "label": i} for i, t in enumerate(TEXTS)])
    assert set(batch) == set(expected) and "labels" in batch
    for k in batch:
        torch.testing.assert_close(batch[k], expected[k], rtol=0, atol=0)
    assert batch["input_ids"].shape[1] % 8 == 0


def test_mlm_collator_matches_reference_under_same_seed(tokenizers):
    import transformers

    ours, ref = tokenizers
    texts = TEXTS * 20
    torch.manual_seed(0)
    batch = DataCollatorForLanguageModeling(ours, mlm_probability=0.3)([ours(t) for t in texts])
    torch.manual_seed(0)
    expected = transformers.DataCollatorForLanguageModeling(ref, mlm_probability=0.3)([ref(t) for t in texts])
    torch.testing.assert_close(batch["input_ids"], expected["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(batch["labels"], expected["labels"], rtol=0, atol=0)


def test_mlm_80_10_10_rule(tokenizers):
    ours, _ = tokenizers
    ids = [[ours.cls_token_id] + list(range(1000, 1400)) + [ours.sep_token_id]] * 50
    torch.manual_seed(1)
    batch = DataCollatorForLanguageModeling(ours, mlm_probability=0.5)(ids)
    original = torch.tensor(ids)
    targets = batch["labels"] != -100
    assert not targets[:, 0].any() and not targets[:, -1].any(), "special tokens are never targets"
    assert torch.equal(batch["labels"][targets], original[targets])
    assert abs(targets.float().mean().item() - 0.5 * 400 / 402) < 0.02
    n = targets.sum().item()
    masked = (batch["input_ids"] == ours.mask_token_id) & targets
    kept = (batch["input_ids"] == original) & targets
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.02  # (plus the rare random draw equal to the original)
    assert torch.equal(batch["input_ids"][~targets], original[~targets])


def test_causal_collator_ignores_padding(tokenizers):
    ours, _ = tokenizers
    batch = DataCollatorForLanguageModeling(ours, mlm=False)([ours(t) for t in TEXTS])
    expected = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    assert torch.equal(batch["labels"], expected) and (batch["labels"] == -100).any()


def test_token_classification_pads_labels(tokenizers):
    ours, _ = tokenizers
    feats = [{**ours(t), "labels": list(range(len(ours(t)["input_ids"])))} for t in TEXTS]
    batch = DataCollatorForTokenClassification(ours)(feats)
    lengths = [len(f["input_ids"]) for f in feats]
    for row, n in zip(batch["labels"], lengths):
        assert row[:n].tolist() == list(range(n)) and (row[n:] == -100).all()
    assert batch["labels"].shape == batch["input_ids"].shape


def test_default_collator():
    feats = [{"x": [1.0, 2.0], "label": 1, "text": "dropped"}, {"x": [3.0, 4.0], "label": 0, "text": "b"}]
    batch = default_data_collator(feats)
    assert set(batch) == {"x", "labels"} and batch["labels"].dtype == torch.long
    assert batch["x"].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match="cannot stack field 'x'"):
        default_data_collator([{"x": [1]}, {"x": [1, 2]}])
