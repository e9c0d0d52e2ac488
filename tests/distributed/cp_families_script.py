"""Context parallelism (cp=2, torchrun) on decoder families whose attention differs from Llama's (q/k norms,
fused or whole-projection norms, partial rotary, NoPE, attention scale): rank 0 saves each checkpoint's loss and
gradients to OUT_DIR/cp_families.pt for tests/distributed/test_cp_families.py. `python cp_families_script.py X OUT CKPT...`
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import dist_helpers as H
from loom import AutoModelForCausalLM
from loom.distributed import setup_parallel


def main() -> None:
    out, results = Path(sys.argv[2]), {}
    ctx = setup_parallel(cp_size=2)
    batch = H.collate(H.dataset(2))
    for path in sys.argv[3:]:
        model = ctx.wrap_model(AutoModelForCausalLM.from_pretrained(path).train())
        loss = ctx.compute_loss(model, ctx.prepare_batch(batch), ctx.count_tokens([batch]))
        loss.backward()
        ctx.sync_gradients(model)
        results[path] = {"loss": ctx.reduce_loss(loss).detach(), "grads": H.full_grads(model)}
    if dist.get_rank() == 0:
        torch.save(results, out / "cp_families.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
