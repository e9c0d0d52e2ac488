"""A forward whose output_hidden_states is left unset reads config.output_hidden_states, as the reference's do;
an explicit argument wins. Checked against the reference's hidden states on the same checkpoint."""
from __future__ import annotations

import pytest
import torch

import loom
from loomtest import reference_checkpoint


@pytest.mark.parametrize("model_type,base", [("gpt2", "GPT2Model"), ("llama", "LlamaModel")])
def test_config_output_hidden_states(tmp_path_factory, model_type, base):
    path, ref = reference_checkpoint(tmp_path_factory, model_type, base, output_hidden_states=True)
    ours = getattr(loom, base).from_pretrained(path).eval()
    assert ours.config.output_hidden_states is True
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ours(ids).hidden_states, ref(ids).hidden_states
        assert len(got) == len(want) == ours.config.num_hidden_layers + 1
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert ours(ids, output_hidden_states=False).hidden_states is None
