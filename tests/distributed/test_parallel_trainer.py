"""The same training script under `python` (one process) and as two tensor-parallel ranks: same losses, and both
resume from their own checkpoint-2 to the same curve. Resuming under torchrun: to a larger max_steps /
num_train_epochs, and at another world size with the same global batch (parallel_resume_script.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import dist_helpers as H

pytestmark = pytest.mark.timeout(300)


def test_train_script_gives_the_same_losses_with_python_and_two_tp_ranks(tmp_path):
    ckpt = H.make_checkpoint(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(H.ROOT), str(H.HERE)])}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    single = subprocess.run([sys.executable, str(H.HERE / "train_script.py"), "single", str(tmp_path), str(ckpt)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-3000:]
    H.launch(2, tmp_path, "tp", str(ckpt), "tp", script="train_script.py", timeout=200)
    one = json.loads((tmp_path / "single.json").read_text())
    two = json.loads((tmp_path / "tp.json").read_text())
    assert len(one["losses"]) == 4
    for a, b in zip(one["losses"], two["losses"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    assert one["resumed"] == pytest.approx(one["losses"], rel=1e-6) and two["resumed"] == pytest.approx(two["losses"],
                                                                                                        rel=1e-5)
    saved = tmp_path / "tp_run" / "checkpoint-4"
    assert (saved / "dcp" / ".metadata").is_file()
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    H.load_model(saved)  # the gathered weights load in one process


def test_lora_run_under_two_data_parallel_ranks_equals_one_process(tmp_path):
    """peft's LoRA through the same Trainer: a PeftModel replicated over 2 ranks (each half of the batch, adapter
    gradients synchronised) gives the one-process losses, and both resume from their checkpoint-2 to the same curve."""
    pytest.importorskip("peft")
    ckpt = H.make_checkpoint(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(H.ROOT), str(H.HERE)])}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    single = subprocess.run([sys.executable, str(H.HERE / "train_script.py"), "lora1", str(tmp_path), str(ckpt),
                             "lora"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-3000:]
    H.launch(2, tmp_path, "lora2", str(ckpt), "lora", script="train_script.py", timeout=200)
    one = json.loads((tmp_path / "lora1.json").read_text())
    two = json.loads((tmp_path / "lora2.json").read_text())
    assert len(one["losses"]) == 4 and one["losses"][-1] != one["losses"][0]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-5)
    assert two["resumed"] == pytest.approx(two["losses"], rel=1e-5)


def _run_resume_script(world: int, out, *args: str) -> dict:
    H.launch(world, out, *args, script="parallel_resume_script.py", timeout=200)
    return json.loads((out / f"{args[0]}_w{world}.json").read_text())


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Two FSDP ranks: one run to 8 steps (checkpoints 4 and 8), and runs to 4 steps / 1 epoch resumed to 8 / 2."""
    out = tmp_path_factory.mktemp("fsdp2")
    ckpt = H.make_checkpoint(out / "ckpt")
    return out, ckpt, _run_resume_script(2, out, "extend", str(ckpt), "fsdp")


def _same_losses(got: dict, expected: dict, rel: float) -> None:
    assert sorted(got, key=int) == sorted(expected, key=int)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=rel, abs=rel), step


def _same_weights(a, b, atol: float) -> None:
    from safetensors.torch import load_file

    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(left) == sorted(right)
    for name in left:
        torch.testing.assert_close(right[name], left[name], rtol=0, atol=atol, msg=name)


def test_finished_parallel_run_resumes_to_larger_max_steps_and_epochs(two_rank_runs):
    """Under two FSDP ranks, a finished run resumed with max_steps 4 -> 8 or num_train_epochs 1 -> 2 trains on and
    equals the uninterrupted 8-step run (losses and the saved weights)."""
    out, _, runs = two_rank_runs
    for name in ("steps", "epochs"):
        assert runs[name]["step"] == runs["full"]["step"] == 8, name
        _same_losses(runs[name]["losses"], runs["full"]["losses"], rel=1e-6)
        _same_weights(out / "full" / "checkpoint-8", out / name / "checkpoint-8", atol=1e-6)


def test_resume_at_another_world_size(two_rank_runs):
    """checkpoint-4 of the 2-rank FSDP run (per-device batch 2) resumes in one plain process (batch 4) and on 4 FSDP
    ranks (batch 1): the global batch is the same, so steps 5-8 and the final weights equal the 2-rank run's. A resume
    that changes the global batch is refused with a message naming world size, batch sizes and accumulation. The one
    process's own checkpoint-8 (no dcp/ folder) is refused by the 4 FSDP ranks, saying why, and resumes on 4
    replicated (plain data-parallel) ranks to the same steps 9-10 as in one process."""
    out, ckpt, runs = two_rank_runs
    source = str(out / "full" / "checkpoint-4")
    got = {world: _run_resume_script(world, out, "continue", str(ckpt), mode, source)
           for world, mode in ((1, "dp"), (4, "fsdp"))}  # in this order: 4 ranks use the one process's checkpoint
    for world, result in got.items():
        _same_losses(result["continued"]["losses"], runs["full"]["losses"], rel=1e-5)
        _same_weights(out / "full" / "checkpoint-8", out / f"continued_w{world}" / "checkpoint-8", atol=1e-5)
        expected = ("global batch size of 4 (per_device_train_batch_size 2 x gradient_accumulation_steps 1 x 2 "
                    "data-parallel ranks, world size 2)", f"this run's is 8 ({8 // world} x 1 x {world}, world size "
                    f"{world})", f"x {world} data-parallel ranks = 4")
        assert result["refused"] is not None and all(part in result["refused"] for part in expected), result["refused"]
    assert not (out / "continued_w1" / "checkpoint-8" / "dcp").exists()
    refused = got[4]["plain_refused"]
    assert refused is not None and "has no dcp/ folder" in refused and "resume it in one process" in refused, refused
    assert got[1]["beyond"]["step"] == got[4]["beyond"]["step"] == 10
    _same_losses(got[4]["beyond"]["losses"], got[1]["beyond"]["losses"], rel=1e-5)
