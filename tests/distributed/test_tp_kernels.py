"""Tensor parallel with loom's kernels on (2 processes): logits within 1e-5 of one process, identical greedy tokens,
Trainer.evaluate and a FakeTensorMode forward work. DTensor weights and the AsyncCollectiveTensor inputs of the TP
styles never reach the C kernels (they once segfaulted there)."""
from __future__ import annotations

import pytest
import torch

import dist_helpers as H
from loom import LlamaForCausalLM, Trainer, TrainingArguments

pytestmark = pytest.mark.timeout(300)


def test_tp_auto_inference_matches_one_process(tmp_path):
    ckpt = H.make_checkpoint(tmp_path / "ckpt")
    results = H.launch(2, tmp_path, "tp", str(ckpt), script="tp_inference_script.py", timeout=240, check=False)
    assert all(r.returncode == 0 for r in results), "\n".join(r.stdout[-3000:] for r in results)
    got = torch.load(tmp_path / "tp_inference.pt", weights_only=False)

    model = LlamaForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7, 11], [1, 8, 2, 6, 4, 10]])
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(got["logits"], logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got["tokens"], model.generate(ids, max_new_tokens=8, do_sample=False))
    assert got["fake_shape"] == (1, 4, H.TINY_LLAMA["vocab_size"])
    assert "already tensor-parallel over 2 ranks" in got["mismatch"] and "tp_size=2" in got["mismatch"]
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "one"), per_device_eval_batch_size=2, report_to=[])
    assert got["eval_loss"] == pytest.approx(Trainer(model=model, args=args, eval_dataset=data).evaluate()["eval_loss"],
                                             rel=1e-5)
