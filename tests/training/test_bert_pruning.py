"""BERT's last layer computes only the positions its head reads (`keep_first`): the same loss, logits and
gradients as the full computation, and the full outputs whenever hidden states are requested."""
from __future__ import annotations

import pytest
import torch

from tests.training.conftest import tiny_bert


def _batch(padded: bool) -> dict:
    g = torch.Generator().manual_seed(5)
    B, T = 3, 9
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:
        mask[1, 6:] = 0  # padding keys, so the sliced attention mask is exercised
        mask[2, 3:] = 0
    return dict(input_ids=torch.randint(3, 99, (B, T), generator=g), attention_mask=mask,
                token_type_ids=torch.randint(0, 2, (B, T), generator=g), labels=torch.tensor([0, 1, 1]))


def _rows_seen_by_last_ffn(model) -> list[int]:
    """How many positions the last layer's feed-forward ran on, per forward: proves the pruning happened."""
    seen = []
    last = model.bert.encoder.layer[-1].intermediate.dense
    last.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[1]))
    return seen


def _loss_logits_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_pruned_last_layer_gives_the_full_gradients(padded, checkpointing):
    """Train mode, dropout off: every parameter's gradient matches the unpruned run (hidden states requested turns
    the pruning off) to fp32 rounding; only GEMM summation order can differ."""
    model = tiny_bert(num_hidden_layers=3).train()
    if checkpointing:
        model.bert.encoder.gradient_checkpointing = True
    seen = _rows_seen_by_last_ffn(model)
    batch = _batch(padded)
    loss, logits, grads = _loss_logits_grads(model, batch)
    full_loss, full_logits, full_grads = _loss_logits_grads(model, batch, output_hidden_states=True)
    T = batch["input_ids"].shape[1]
    # forward (and, with checkpointing, its recomputation in backward) on 1 row pruned, T rows full
    assert set(seen) == {1, T} and seen[0] == 1 and seen[-1] == T
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits, full_logits, rtol=1e-6, atol=1e-7)
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the last layer's query, feed-forward and output weights do get gradients (from the rows kept)
    last = "bert.encoder.layer.2."
    for part in ("attention.self.query.weight", "intermediate.dense.weight", "output.dense.weight"):
        assert grads[last + part].abs().sum() > 0


def test_keep_first_returns_the_rows_kept_and_hidden_states_keep_full_length():
    model = tiny_bert(head="BertModel").eval()
    batch = _batch(padded=True)
    del batch["labels"]
    with torch.no_grad():
        full = model(**batch)
        kept = model(**batch, keep_first=3)
        with_hidden = model(**batch, output_hidden_states=True, keep_first=1)
    torch.testing.assert_close(kept.last_hidden_state, full.last_hidden_state[:, :3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kept.pooler_output, full.pooler_output, rtol=1e-6, atol=1e-6)
    # requesting hidden states turns the pruning off: every output has its full length, as without the option
    T = batch["input_ids"].shape[1]
    assert with_hidden.last_hidden_state.shape[1] == T
    assert all(h.shape[1] == T for h in with_hidden.hidden_states)
    torch.testing.assert_close(with_hidden.last_hidden_state, full.last_hidden_state)
    torch.testing.assert_close(with_hidden.pooler_output, full.pooler_output)


def test_sequence_classification_with_dropout_trains_pruned_and_follows_the_seed():
    """With dropout on, the pruned last layer draws masks for the rows it computes only, so the random stream differs
    from the unpruned run's (no bitwise comparison is possible); what must hold is that the run is reproducible from
    the seed and that the dropout is live (train and eval outputs differ)."""
    model = tiny_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
    batch = _batch(padded=True)
    torch.manual_seed(11)
    first = _loss_logits_grads(model, batch)
    torch.manual_seed(11)
    second = _loss_logits_grads(model, batch)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[2][n], second[2][n]) for n in first[2])
    with torch.no_grad():
        assert not torch.equal(model.eval()(**batch).logits, first[1])
