"""The same training script under `python` (one process) and as two tensor-parallel ranks: same losses, and both
resume from their own checkpoint-2 to the same curve."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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
