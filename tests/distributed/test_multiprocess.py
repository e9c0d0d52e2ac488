"""Multi-process runs (gloo, CPU) compared with the same computation in one process.

Three launches, each running several scenarios in one process group to keep the suite fast: quad (4 ranks), pair
(2 ranks; resumes quad's DCP checkpoint, ends with an injected fault) and cube (8 = dp2 x tp2 x cp2).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import dist_helpers as H
from loom.distributed import dcp_to_hf, load_dcp, setup_parallel

pytestmark = pytest.mark.timeout(400)
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_ckpts")
    gpt2, bert = H.make_family_checkpoints(root)
    return {"base": H.make_checkpoint(root / "base"), "kv4": H.make_checkpoint(root / "kv4", num_key_value_heads=4),
            "kv1": H.make_checkpoint(root / "kv1", num_key_value_heads=1), "dcp": root / "dcp", "gpt2": gpt2,
            "bert": bert}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ckpts):
    """Launch each suite lazily, once; a test whose result is missing fails with the ranks' output."""
    out = tmp_path_factory.mktemp("dist_out")
    done: dict[str, object] = {}
    args = [str(ckpts[k]) for k in ("base", "kv4", "kv1", "dcp", "gpt2", "bert")]
    worlds = {"quad": 4, "pair": 2, "cube": 8}

    def get(suite: str):
        if suite not in done:
            if suite == "pair":
                get("quad")  # pair resumes quad's checkpoint
            done[suite] = H.launch(worlds[suite], out, suite, *args, check=False, timeout=300)
        return done[suite]

    def result(suite: str, name: str):
        results = get(suite)
        path = out / f"{name}.pt"
        if not path.is_file():
            logs = "\n".join(f"--- rank {r} (rc {res.returncode}) ---\n{res.stdout[-3000:]}"
                             for r, res in enumerate(results))
            raise AssertionError(f"suite {suite} did not produce {name}:\n{logs}")
        return torch.load(path, weights_only=False)

    result.out = out
    result.get = get
    return result


def single_process_model(path):
    return H.load_model(path)


def reference_forward_backward(path):
    model = single_process_model(path)
    out = model(**H.collate(H.dataset(2)), use_cache=False)
    out.loss.backward()
    return model, out


_REFERENCE: dict = {}


def reference_training(path, steps: range, micro_batch: int, accum: int, n_data: int = 40):
    """Single-process training with the same loop; cached, callers must not modify what it returns."""
    key = (str(path), steps.start, steps.stop, micro_batch, accum, n_data)
    if key not in _REFERENCE:
        _REFERENCE[key] = _train_single(path, steps, micro_batch, accum, n_data)
    return _REFERENCE[key]


def _train_single(path, steps, micro_batch, accum, n_data):
    ctx = setup_parallel()
    model = ctx.wrap_model(single_process_model(path))
    opt = H.optimizer_for(model)
    return H.train(ctx, model, opt, H.dataset(n_data), steps, micro_batch, accum), model, opt


# -- tensor parallel ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp,ckpt,suite", [(2, "base", "pair"), (4, "kv4", "quad")])
def test_tp_logits_and_grads_match_single_process(runs, ckpts, tp, ckpt, suite):
    got = runs(suite, f"tp{tp}")
    model, ref = reference_forward_backward(ckpts[ckpt])
    torch.testing.assert_close(got["logits"], ref.logits.detach(), **TOL)
    torch.testing.assert_close(got["loss"], ref.loss.detach(), **TOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tp,suite", [(2, "pair"), (4, "quad")])
def test_tp_ranks_hold_only_their_shard(runs, tp, suite):
    cfg = H.TINY_LLAMA
    for rank in range(tp):
        shapes = runs(suite, f"tp{tp}_shapes.rank{rank}")
        assert shapes["q"] == (cfg["hidden_size"] // tp, cfg["hidden_size"])
        assert shapes["o"] == (cfg["hidden_size"], cfg["hidden_size"] // tp)
        vocab_rows = -(-cfg["vocab_size"] // tp)  # vocabulary 99 splits unevenly, as torch.chunk splits it
        assert shapes["embed"][0] == min(vocab_rows, cfg["vocab_size"] - rank * vocab_rows)
        assert shapes["lm_head"] == shapes["embed"]


def test_tp_gpt2_and_bert_match_single_process(runs, ckpts):
    """GPT-2: transposed weights sliced on load, head tied to an unsplit embedding; BERT: padded encoder."""
    got = runs("pair", "tp2_families")
    ref = H.family_outputs(ckpts["gpt2"], ckpts["bert"])
    torch.testing.assert_close(got["gpt2"], ref["gpt2"], **TOL)
    torch.testing.assert_close(got["bert"], ref["bert"], **TOL)


def test_grad_clipping_under_tp_uses_the_global_norm(runs, ckpts):
    got = runs("pair", "tp2")
    model, _ = reference_forward_backward(ckpts["base"])
    ref_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    torch.testing.assert_close(got["norm"].float(), ref_norm, **TOL)
    assert float(got["norm"]) > 0.05  # the clip was active
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["clipped"][name], p.grad, **TOL)


def test_save_pretrained_after_tp_loads_in_one_process(runs, ckpts):
    runs("pair", "tp2")
    saved = H.load_model(runs.out / "tp2_saved")
    original = H.load_model(ckpts["base"])
    assert json.loads((runs.out / "tp2_saved" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for (name, a), (_, b) in zip(saved.state_dict().items(), original.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


# -- context parallel -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cp,suite", [(2, "pair"), (4, "quad")])
def test_ring_attention_matches_full_attention(runs, cp, suite):
    got = runs(suite, f"ring{cp}")
    q, k, v = (got[n].clone().requires_grad_() for n in ("q", "k", "v"))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.backward(got["dout"])
    torch.testing.assert_close(got["out"], ref.detach(), **TOL)
    for name, mine, theirs in zip("qkv", got["grads"], (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(mine, theirs, **TOL, msg=lambda m: f"d{name}: {m}")


def test_cp_model_loss_and_grads_match_full_sequence(runs, ckpts):
    got = runs("pair", "cp2_model")
    model, ref = reference_forward_backward(ckpts["base"])
    torch.testing.assert_close(got["loss"], ref.loss.detach(), **TOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, **TOL, msg=lambda m: f"{name}: {m}")


# -- FSDP, DCP, 3-D ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world,suite", [(2, "pair"), (4, "quad")])
def test_fsdp_losses_match_single_process_with_same_global_batch(runs, ckpts, world, suite):
    got = runs(suite, f"fsdp{world}")
    ref_losses, model, _ = reference_training(ckpts["base"], range(5), micro_batch=4, accum=2)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), **TOL)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(got["state"][name], p, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    total = sum(p.numel() for p in model.parameters())
    assert got["local_numel"] <= total / world + 2 * world * len(list(model.parameters()))  # padding of shards


def test_fsdp_bf16_mixed_precision_computes_in_bf16_and_keeps_fp32_master(runs, ckpts):
    got = runs("pair", "fsdp_bf16")
    assert got["compute_dtypes"] == {(torch.bfloat16, torch.bfloat16)}
    assert got["master_dtypes"] == {torch.float32} and got["grad_dtypes"] == {torch.float32}
    ref_losses, _, _ = reference_training(ckpts["base"], range(3), micro_batch=4, accum=2)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=2e-2, atol=0)
    assert got["losses"] != ref_losses  # bf16 compute really happened (fp32 would match to ~1e-6)


def test_hsdp_losses_match_single_process(runs, ckpts):
    """dp_replicate 2 x dp_shard 2: shards within a replica pair, gradients summed across pairs."""
    got = runs("quad", "hsdp2x2")
    ref_losses, model, _ = reference_training(ckpts["base"], range(5), micro_batch=4, accum=2)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), **TOL)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(got["state"][name], p, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    total = sum(p.numel() for p in model.parameters())
    assert got["local_numel"] <= total / 2 + 4 * len(list(model.parameters()))  # half a model per rank, plus padding


def test_dcp_resumes_at_two_ranks_and_one(runs, ckpts):
    ref_losses, _, _ = reference_training(ckpts["base"], range(5), micro_batch=4, accum=2)
    saved_at_4 = runs("quad", "fsdp4")["losses"]
    torch.testing.assert_close(torch.tensor(saved_at_4), torch.tensor(ref_losses), **TOL)
    at_2 = runs("pair", "resume2")
    assert at_2["extra"] == {"step": 3}
    torch.testing.assert_close(torch.tensor(at_2["losses"]), torch.tensor(ref_losses[3:]), **TOL)
    ctx = setup_parallel()
    model = single_process_model(ckpts["base"])
    opt = H.optimizer_for(model)
    extra = load_dcp(ckpts["dcp"], model, opt)
    at_1 = H.train(ctx, model, opt, H.dataset(40), range(extra["step"], 5), micro_batch=4, accum=2)
    torch.testing.assert_close(torch.tensor(at_1), torch.tensor(ref_losses[3:]), **TOL)


def test_dcp_to_hf_equals_single_process_state(runs, ckpts, tmp_path):
    runs("quad", "fsdp4")
    _, ref_model, _ = reference_training(ckpts["base"], range(3), micro_batch=4, accum=2)
    out = dcp_to_hf(ckpts["dcp"], tmp_path / "hf")
    converted = H.load_model(out)
    ref_state = ref_model.state_dict()
    assert set(converted.state_dict()) == set(ref_state)
    for name, t in converted.state_dict().items():
        torch.testing.assert_close(t, ref_state[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_dp2_tp2_cp2_loss_curve_equals_single_process(runs, ckpts):
    got = runs("cube", "cube")
    assert got["dims"] == (1, 2, 2, 2)
    ref_losses, _, _ = reference_training(ckpts["base"], range(3), micro_batch=4, accum=1, n_data=12)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), **TOL)


# -- bad input and faults ------------------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors_on_every_rank(runs):
    for rank in range(2):
        errors = runs("pair", f"errors.rank{rank}")
        assert "does not divide num_key_value_heads=1" in errors["kv_heads"]
        assert "the world size is 2" in errors["dims"] or "not divisible" in errors["dims"]
        assert "multiple of 2 x cp = 4, got 14" in errors["seq_len"]
        assert "saved from another model" in errors["other_model"]
        assert "intermediate_size" not in errors["other_model"] and "mlp" in errors["other_model"]


def test_a_failing_rank_stops_the_others_in_bounded_time(runs):
    results = runs.get("pair")
    assert results[1].returncode == 1 and "injected fault on rank 1" in results[1].stdout
    assert results[0].returncode not in (0, -9), "rank 0 should fail with an error, not succeed or hang"
    fault = runs("pair", "fault.rank0")
    assert fault["error"] is not None and fault["seconds"] < 60
