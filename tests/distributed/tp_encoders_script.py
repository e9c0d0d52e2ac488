"""`tp_plan="auto"` on encoder families whose attention carries per-head position terms (MPNet's relative bias,
DeBERTa's disentangled c2p/p2c) or packed projections (ModernBERT), on 2 ranks: rank 0 saves each checkpoint's last
hidden states on a padded batch, and its sharded parameters gathered back to full tensors, to
OUT_DIR/tp_encoders.pt for tests/test_encoder_tp.py. `python tp_encoders_script.py X OUT CKPT...`."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from loom import AutoModel


def main() -> None:
    out, results = Path(sys.argv[2]), {}
    batch = torch.load(out / "batch.pt", weights_only=True)
    for path in sys.argv[3:]:
        model = AutoModel.from_pretrained(path, tp_plan="auto").eval()
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        gathered = {k: v.full_tensor() for k, v in model.state_dict().items() if isinstance(v, DTensor)}
        results[path] = {"hidden": hidden, "gathered": gathered}
    if dist.get_rank() == 0:
        torch.save(results, out / "tp_encoders.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
