"""A `datasets.Dataset` as the Trainer's train/eval data: unused columns removed by the dataset, torch format."""
from __future__ import annotations

import datasets
import pytest

from loom.training import Trainer
from tests.training.conftest import cls_rows, tiny_bert


def _as_hf(rows: list[dict]) -> datasets.Dataset:
    """The rows as a datasets.Dataset of plain lists, plus two columns the model's forward does not take."""
    return datasets.Dataset.from_dict({
        "input_ids": [r["input_ids"].tolist() for r in rows],
        "attention_mask": [r["attention_mask"].tolist() for r in rows],
        "label": [r["label"] for r in rows],
        "text": [f"example {i}" for i in range(len(rows))],
        "idx": list(range(len(rows))),
    })


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trains_and_evaluates_like_the_same_rows_as_a_list(args_for):
    rows, held_out = cls_rows(24), cls_rows(8, seed=5)
    args = args_for(max_steps=4, per_device_train_batch_size=6, per_device_eval_batch_size=4)
    on_list = Trainer(tiny_bert(), args, train_dataset=rows, eval_dataset=held_out)
    on_list.train()
    on_hf = Trainer(tiny_bert(), args, train_dataset=_as_hf(rows), eval_dataset=_as_hf(held_out))
    on_hf.train()
    assert len(_losses(on_hf)) == 4
    assert _losses(on_hf) == _losses(on_list)
    assert on_hf.evaluate()["eval_loss"] == pytest.approx(on_list.evaluate()["eval_loss"], abs=1e-6)

    prepared = on_hf.get_train_dataloader().dataset
    assert sorted(prepared.column_names) == ["attention_mask", "input_ids", "label"]
    assert prepared.format["type"] == "torch"
    assert sorted(on_hf.train_dataset.column_names) == ["attention_mask", "idx", "input_ids", "label", "text"]
    predicted = on_hf.predict(_as_hf(held_out))
    assert predicted.predictions.shape == (8, 2) and predicted.label_ids.tolist() == [r["label"] for r in held_out]


def test_keeps_columns_without_remove_unused_columns(args_for):
    args = args_for(max_steps=1, remove_unused_columns=False)
    trainer = Trainer(tiny_bert(), args, train_dataset=_as_hf(cls_rows(8)))
    prepared = trainer.get_train_dataloader().dataset
    assert "text" in prepared.column_names and "idx" in prepared.column_names
    row = prepared[0]
    assert row["input_ids"].dtype.is_floating_point is False and isinstance(row["text"], str)


def test_no_usable_column_is_an_error(args_for):
    data = datasets.Dataset.from_dict({"sentence": ["a", "b"], "score": [1, 2]})
    with pytest.raises(ValueError, match=r"none of the train_dataset columns .*remove_unused_columns=False"):
        Trainer(tiny_bert(), args_for(max_steps=1), train_dataset=data).train()
