"""In-process checks of the distributed pieces that need no process group: dims, plans, zig-zag, sampler, clipping."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.utils.data

import dist_helpers as H
from loom.distributed import DistributedSampler, ParallelDims, clip_grad_norm_, dcp_to_hf, resolve_plan, \
    setup_parallel, shard_batch_for_cp, zigzag_shard, zigzag_unshard
from loom.distributed.context_parallel import apply_cp
from loom.distributed.tensor_parallel import check_divisible, shard_bounds
from loom.models.llama import LlamaConfig, LlamaForCausalLM, LlamaModel


def tiny(**overrides):
    return LlamaForCausalLM(LlamaConfig(**{**H.TINY_LLAMA, **overrides}))


# -- dims ----------------------------------------------------------------------------------------------------------
def test_dims_fill_dp_shard_and_check_the_product():
    dims = ParallelDims(cp=2, tp=2, world_size=8)
    assert dims.shape == (1, 2, 2, 2) and dims.dp == 2
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by dp_replicate x cp x tp = 1 x 2 x 2 = 4"):
        ParallelDims(cp=2, tp=2, world_size=6)
    with pytest.raises(ValueError, match=r"= 8, but the world size is 4"):
        ParallelDims(dp_shard=2, cp=2, tp=2, world_size=4)
    with pytest.raises(ValueError, match=r"ParallelDims.tp must be a positive integer, got 0"):
        ParallelDims(tp=0)


def test_single_process_context_refuses_parallel_sizes(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    ctx = setup_parallel()
    assert not ctx.enabled and ctx.dp_size == ctx.cp_size == ctx.tp_size == 1
    with pytest.raises(ValueError, match="world size 1 is not divisible"):
        setup_parallel(tp_size=2)


# -- tensor-parallel plans -------------------------------------------------------------------------------------------
def test_plan_resolves_for_head_model_and_base_model():
    plan = resolve_plan(tiny())
    assert plan["model.layers.1.self_attn.k_proj"] == "colwise" and plan["lm_head"] == "colwise_rep"
    assert plan["model.embed_tokens"] == "embedding" and "model.norm" not in plan
    base = resolve_plan(LlamaModel(LlamaConfig(**H.TINY_LLAMA)))  # no "model." prefix on the base model's names
    assert base["layers.0.mlp.down_proj"] == "rowwise" and base["embed_tokens"] == "embedding"


def test_plan_errors_name_the_problem():
    class NoPlan(LlamaForCausalLM):
        _tp_plan = {}

    with pytest.raises(ValueError, match="NoPlan declares no tensor-parallel plan"):
        resolve_plan(NoPlan(LlamaConfig(**H.TINY_LLAMA)))
    with pytest.raises(ValueError, match="'diagonal' is not a known style"):
        resolve_plan(tiny(), {"lm_head": "diagonal"})
    with pytest.raises(ValueError, match="no module of LlamaForCausalLM matches"):
        resolve_plan(tiny(), {"decoder.*.fc": "colwise"})


def test_head_counts_must_divide_tp():
    with pytest.raises(ValueError, match="tensor parallel size 8 does not divide num_attention_heads=4"):
        check_divisible(tiny(), 8)
    with pytest.raises(ValueError, match="does not divide num_key_value_heads=2"):
        check_divisible(tiny(), 4)
    check_divisible(tiny(num_key_value_heads=4), 4)


def test_shard_bounds_follow_torch_chunk():
    for size, world in [(99, 2), (99, 4), (8, 4), (3, 4)]:
        pieces = torch.arange(size).chunk(world)
        for rank in range(world):
            start, stop = shard_bounds(size, rank, world)
            expected = pieces[rank].tolist() if rank < len(pieces) else []
            assert list(range(start, stop)) == expected


# -- context parallel -----------------------------------------------------------------------------------------------
def test_zigzag_pairs_early_and_late_chunks_and_round_trips():
    x = torch.arange(16).view(1, 16)
    parts = [zigzag_shard(x, r, 4) for r in range(4)]
    assert parts[0].tolist() == [[0, 1, 14, 15]] and parts[3].tolist() == [[6, 7, 8, 9]]
    assert torch.equal(zigzag_unshard(parts), x)
    with pytest.raises(ValueError, match="multiple of 2 x cp = 8, got 12"):
        zigzag_shard(torch.zeros(1, 12), 0, 4)


def test_cp_batch_shifts_labels_before_sharding():
    batch = {"input_ids": torch.arange(8).view(1, 8), "labels": torch.arange(100, 108).view(1, 8),
             "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    r0 = shard_batch_for_cp(batch, 0, 2)
    r1 = shard_batch_for_cp(batch, 1, 2)
    assert r0["input_ids"].tolist() == [[0, 1, 6, 7]] and r0["position_ids"].tolist() == [[0, 1, 6, 7]]
    # each token's label is the next token of the whole sequence, also at a chunk's end; the last one has none
    assert r0["shift_labels"].tolist() == [[101, 102, 107, -100]]
    assert r1["shift_labels"].tolist() == [[103, 104, 105, 106]]
    assert "attention_mask" not in r0 and "labels" not in r0
    batch["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="without padding"):
        shard_batch_for_cp(batch, 0, 2)


def test_cp_refuses_sliding_window_models():
    from loom.models.mistral import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(**{**H.TINY_LLAMA, "sliding_window": 4}))
    with pytest.raises(ValueError, match="does not support sliding-window attention"):
        apply_cp(model, None)


# -- sampler --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,replicas,shuffle,drop_last", [(10, 3, True, False), (10, 3, False, True),
                                                          (7, 4, True, False), (8, 2, True, True)])
def test_sampler_matches_torch_and_gives_distinct_samples(n, replicas, shuffle, drop_last):
    data = list(range(n))
    ours = [DistributedSampler(data, replicas, r, shuffle=shuffle, seed=5, drop_last=drop_last) for r in range(replicas)]
    theirs = [torch.utils.data.DistributedSampler(data, replicas, r, shuffle=shuffle, seed=5, drop_last=drop_last)
              for r in range(replicas)]
    for s in ours + theirs:
        s.set_epoch(2)
    assert [list(s) for s in ours] == [list(s) for s in theirs]
    assert len({len(s) for s in ours}) == 1
    seen = [i for s in ours for i in s]
    if drop_last:
        assert len(set(seen)) == len(seen)  # no sample on two ranks
    else:
        assert set(seen) == set(data)  # every sample somewhere; padding repeats the first ones


def test_sampler_epoch_changes_the_order_and_rank_is_checked():
    s = DistributedSampler(list(range(32)), 2, 0, seed=1)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    with pytest.raises(ValueError, match=r"rank must be in \[0, 1\], got 2"):
        DistributedSampler([1, 2], 2, 2)


# -- gradients and checkpoints -----------------------------------------------------------------------------------------
def test_clip_grad_norm_matches_torch_on_plain_tensors():
    a, b = tiny(), tiny()
    b.load_state_dict(a.state_dict())
    batch = H.collate(H.dataset(2))
    for m in (a, b):
        m(**batch, use_cache=False).loss.backward()
    ours = clip_grad_norm_(a, 0.1)
    theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
    torch.testing.assert_close(ours, theirs)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    next(a.parameters()).grad[0] = float("nan")
    with pytest.raises(RuntimeError, match="not finite"):
        clip_grad_norm_(a, 0.1, error_if_nonfinite=True)


def test_dcp_to_hf_rejects_a_directory_that_is_not_dcp(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a DCP checkpoint"):
        dcp_to_hf(tmp_path, tmp_path / "out")


def test_fsdp_cpu_offload_without_an_accelerator_is_a_clear_error():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has an accelerator, where offload is valid")
    with pytest.raises(ValueError, match="fsdp 'offload'.*needs an accelerator"):
        setup_parallel(fsdp="full_shard offload")


def test_launch_local_sets_torchrun_env_and_kills_ranks_at_the_deadline(tmp_path):
    from loom.distributed.launch import check_ranks, launch_local

    code = ("import os, time; print(os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['MASTER_PORT'], "
            "os.environ['EXTRA']); time.sleep(60 if os.environ['RANK'] == '1' else 0)")
    start = time.monotonic()
    results = launch_local(2, ["-c", code], env={"EXTRA": "x"}, timeout=5, log_dir=tmp_path, name="t")
    assert time.monotonic() - start < 30
    assert results[0].returncode == 0 and results[1].returncode == -9
    port = results[0].stdout.split()[2]
    assert results[0].stdout.split() == ["0", "2", port, "x"]
    assert (tmp_path / "t.rank1.log").read_text().startswith("1 2 ")
    with pytest.raises(RuntimeError, match=r"ranks \[1\] failed"):
        check_ranks(results, "sleepy")
    single = launch_local(1, ["-c", "import os; print('RANK' in os.environ)"], timeout=30)
    assert single[0].returncode == 0 and single[0].stdout.strip() == "False"


# -- exit with gloo -------------------------------------------------------------------------------------------------
def test_settle_waits_until_gloo_workers_are_blocked_for_several_polls(monkeypatch):
    import loom.distributed.mesh as mesh

    seen = iter([["R", "S"], ["S", "S"], ["S", "R"], ["S", "S"], ["S", "D"], ["S", "S"]])
    polls = []
    monkeypatch.setattr(mesh, "_gloo_worker_states", lambda: polls.append(1) or next(seen))
    assert mesh.settle_gloo_threads(limit_s=5.0)
    assert len(polls) == 6  # a running thread restarts the count; three blocked polls in a row end it
    monkeypatch.setattr(mesh, "_gloo_worker_states", lambda: ["R"])
    start = time.monotonic()
    assert not mesh.settle_gloo_threads(limit_s=0.05)  # a thread that never blocks: bounded wait, then exit anyway
    assert time.monotonic() - start < 2.0
    monkeypatch.setattr(mesh, "_gloo_worker_states", lambda: [])
    assert mesh.settle_gloo_threads()


_GLOO_THREADS = r"""
import os, sys
import torch, torch.distributed as dist
import loom.distributed.mesh as mesh
from torch.distributed._functional_collectives import all_gather_tensor
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
assert mesh.init_distributed() and mesh._settle_registered
out = all_gather_tensor(torch.arange(4.0), 0, dist.group.WORLD)
assert out.tolist() == [0.0, 1.0, 2.0, 3.0]
states = mesh._gloo_worker_states()
assert states and all(len(s) == 1 for s in states), states  # torch's worker threads are found by name
assert mesh.settle_gloo_threads(limit_s=10.0)
dist.destroy_process_group()
print("ok", len(states))
"""


def test_gloo_worker_threads_are_found_and_the_exit_handler_is_registered(tmp_path):
    """The exit handler keys on the names torch gives gloo's worker threads; if a torch release renamed them, loom
    would silently stop waiting for them, so this checks they are found in a real group."""
    import subprocess
    import sys

    from loom.distributed.launch import free_port

    script = tmp_path / "gloo_threads.py"
    script.write_text(_GLOO_THREADS)
    res = subprocess.run([sys.executable, str(script), str(free_port())], capture_output=True, text=True, timeout=120,
                         cwd=H.ROOT, env={**os.environ, "PYTHONPATH": str(H.ROOT)})
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stdout + res.stderr
