"""An FP8 block-scale checkpoint loaded with `tp_plan="auto"` (torchrun, 2 ranks): each rank dequantizes its shard.
Rank 0 saves the logits, greedy tokens and each rank's local q_proj/o_proj weight shapes to OUT_DIR/fp8_tp.pt for
tests/quantization/test_fp8.py. `python fp8_tp_script.py X OUT CKPT`."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from loom import AutoModelForCausalLM


def _local_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.to_local().shape) if hasattr(t, "to_local") else tuple(t.shape)


def main() -> None:
    out, path = Path(sys.argv[2]), sys.argv[3]
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto").eval()
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    attn = model.model.layers[0].self_attn
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, {"q_proj": _local_shape(attn.q_proj.weight),
                                    "o_proj": _local_shape(attn.o_proj.weight)})
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "tokens": tokens, "shapes": shapes}, out / "fp8_tp.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
