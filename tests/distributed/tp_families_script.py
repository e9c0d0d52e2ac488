"""`tp_plan="auto"` on every decoder family (torchrun, 2 ranks): rank 0 saves each checkpoint's logits and greedy
tokens to OUT_DIR/tp_families.pt for tests/test_families.py. `python tp_families_script.py X OUT CKPT...`."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from loom import AutoModelForCausalLM


def main() -> None:
    out, results = Path(sys.argv[2]), {}
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    for path in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto").eval()
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        results[path] = {"logits": logits, "tokens": tokens}
    if dist.get_rank() == 0:
        torch.save(results, out / "tp_families.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
