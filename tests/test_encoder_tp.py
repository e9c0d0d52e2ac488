"""tp_plan="auto" on the encoders whose attention has per-head position terms: MPNet (a relative position bias
table with one column per head) and DeBERTa-v2/v3 (position projections of shared relative embeddings, in both the
shared-key and the separate-projection layouts), and on ModernBERT, whose fused q|k|v and input|gate projections
are split block by block. Two gloo processes must give one process's hidden states, and their sharded parameters
must gather back to the checkpoint's tensors."""
from __future__ import annotations

import sys

import pytest
import torch

import loom
from loom.distributed.tensor_parallel import resolve_plan
from loomtest import TINY
from test_distilbert_mpnet import reference_checkpoint

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "distributed"))
import dist_helpers as H  # noqa: E402

EVEN = dict(intermediate_size=40)  # DTensor's shards of an odd width would differ in size between the ranks
CHECKPOINTS = {  # name -> (model_type, reference class, config overrides)
    "mpnet": ("mpnet", "MPNetModel", EVEN),
    "deberta-v3": ("deberta-v2", "DebertaV2Model", EVEN),
    "deberta-separate": ("deberta-v2", "DebertaV2Model",
                         dict(EVEN, share_att_key=False, position_buckets=-1, max_relative_positions=6,
                              pos_att_type=["c2p", "p2c"], norm_rel_ebd="none")),
    "modernbert": ("modernbert", "ModernBertModel", {}),
}


def _batch() -> dict:
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_plan_splits_every_projection_and_the_per_head_tables(tmp_path_factory, name):
    model_type, cls, overrides = CHECKPOINTS[name]
    path, _ = reference_checkpoint(tmp_path_factory, model_type, cls, **overrides)
    model = loom.AutoModel.from_pretrained(path)
    plan = resolve_plan(model)
    layers = model.config.num_hidden_layers
    if model_type == "mpnet":
        assert plan.pop("encoder.relative_attention_bias") == "colwise"
        assert len(plan) == 6 * layers
    elif model_type == "modernbert":
        assert sorted(set(plan.values())) == ["packed_colwise:2", "packed_colwise:3", "rowwise"]
        assert len(plan) == 4 * layers
    else:
        separate = 2 if not model.config.share_att_key else 0
        assert len(plan) == (6 + separate) * layers
    assert sum(style == "rowwise" for style in plan.values()) == 2 * layers


@pytest.mark.timeout(300)
def test_tp_auto_on_two_processes_equals_one(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_encoders")
    batch = _batch()
    torch.save(batch, root / "batch.pt")
    paths = {name: str(reference_checkpoint(tmp_path_factory, t, cls, **kw)[0])
             for name, (t, cls, kw) in CHECKPOINTS.items()}
    H.launch(2, root, "encoders", *paths.values(), script="tp_encoders_script.py", timeout=240)
    got = torch.load(root / "tp_encoders.pt", weights_only=True)
    for name, path in paths.items():
        one = loom.AutoModel.from_pretrained(path)
        with torch.no_grad():
            want = one(**batch).last_hidden_state
        keep = batch["attention_mask"].bool()
        torch.testing.assert_close(got[path]["hidden"][keep], want[keep], atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
        full = one.state_dict()
        assert got[path]["gathered"], name
        for key, value in got[path]["gathered"].items():
            assert torch.equal(value, full[key]), f"{name}: {key} gathers to a different tensor"


def test_packed_style_needs_its_block_count():
    model = loom.AutoModel.from_config(loom.AutoConfig.for_model("modernbert", **TINY["modernbert"]))
    with pytest.raises(ValueError, match="packed_colwise:N"):
        resolve_plan(model, {"layers.*.attn.Wqkv": "packed_colwise"})
