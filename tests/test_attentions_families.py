"""Every registered family against the reference (fp32, the TINY checkpoints, padded batches): output_attentions=True
returns the reference's eager attention probabilities (sliding-window and soft-capped layers included), under
"eager" and under "sdpa" alike, and attn_implementation really picks the computation. Families come from the model
files' MODEL_TYPES, so a new family is covered once it has a TINY config."""
from __future__ import annotations

import pytest
import torch

import loom
from loom.auto import model_table
from loomtest import TINY, is_decoder_family, reference_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is many times faster on shared cores
FAMILIES = sorted(model_table())
T = 12  # past every TINY sliding window (4, 5; ModernBERT's +-4), so the windows bind


def _head(model_type: str) -> str:
    heads = model_table()[model_type][1]
    return (heads["causal-lm"] if is_decoder_family(heads) else heads["base"]).__name__


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(model_type, checkpoint directory, the reference loaded with eager attention, its inputs)."""
    import transformers

    model_type = request.param
    path, _ = reference_checkpoint(tmp_path_factory, model_type, _head(model_type))
    ref = getattr(transformers, _head(model_type)).from_pretrained(path, attn_implementation="eager").eval()
    return model_type, path, ref, _inputs(model_type)


def _inputs(model_type: str) -> dict:
    """A batch of 2 whose row 0 is padded: on the left for a decoder, on the right for an encoder (ViT: pixels)."""
    if model_type == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))}
    ids = torch.randint(3, 99, (2, T), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if is_decoder_family(model_table()[model_type][1]):
        mask[0, :3] = 0
    else:
        mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _main(out):
    return out.logits if "logits" in out else out.last_hidden_state


def _real(inputs) -> torch.Tensor | slice:
    """Where outputs are compared between eager and SDPA: a padded query that may attend to nothing gets SDPA's zeros
    but eager's average of every value (in the reference too), so only real positions."""
    return inputs["attention_mask"].bool() if "attention_mask" in inputs else slice(None)


def _load(model_type, path, **kw):
    return getattr(loom, _head(model_type)).from_pretrained(path, **kw)


def _implementations(config) -> tuple[str, ...]:
    """Soft-capped scores (Gemma 2) exist only in the eager math: "sdpa" is refused there, as in the reference."""
    return ("eager",) if getattr(config, "attn_logit_softcapping", None) is not None else ("eager", "sdpa")


def test_output_attentions_match_reference(family):
    model_type, path, ref, inputs = family
    with torch.no_grad():
        want = ref(**inputs, output_attentions=True)
        for impl in _implementations(ref.config):
            ours = _load(model_type, path, attn_implementation=impl)
            got = ours(**inputs, output_attentions=True)
            where = slice(None) if impl == "eager" else _real(inputs)  # the reference's outputs are eager's
            torch.testing.assert_close(_main(got)[where], _main(want)[where], atol=1e-5, rtol=1e-5)
            assert len(got.attentions) == len(want.attentions) == ours.config.num_hidden_layers, impl
            for layer, (a, b) in enumerate(zip(got.attentions, want.attentions)):
                assert a.shape == b.shape == (2, ours.config.num_attention_heads, *b.shape[-2:]), (impl, layer)
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{impl} layer {layer}: {m}")


def test_asking_for_attentions_leaves_the_outputs_unchanged(family):
    """Under "sdpa" the probabilities are computed eagerly for that forward only: the outputs, padded positions
    included, stay those of SDPA, and the next plain forward returns no attentions."""
    model_type, path, ref, inputs = family
    ours = _load(model_type, path, attn_implementation=_implementations(ref.config)[-1])
    with torch.no_grad():
        plain, asked = ours(**inputs), ours(**inputs, output_attentions=True)
        again = ours(**inputs)
    torch.testing.assert_close(_main(asked), _main(plain), atol=1e-5, rtol=1e-5)
    assert asked.attentions is not None and again.get("attentions") is None
    assert ours.config._attn_implementation == _implementations(ref.config)[-1]


def test_attn_implementation_picks_the_computation(family, monkeypatch):
    """Eager and SDPA agree at every real position, and each really runs: "eager" never calls SDPA, "sdpa" calls it
    (or loom's fused attention kernel, which takes SDPA's place for whole sequences without a mask) once per layer.
    A soft-capped family refuses "sdpa" and stays eager."""
    from loom.kernels import ops

    model_type, path, ref, inputs = family
    calls = []
    sdpa, fused = torch.nn.functional.scaled_dot_product_attention, ops.flash_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    monkeypatch.setattr(ops, "flash_attention", lambda *a: calls.append(1) or fused(*a))
    outputs, counts = {}, {}
    model = _load(model_type, path, attn_implementation="eager")
    if _implementations(ref.config) == ("eager",):
        with pytest.raises(ValueError, match="attn_implementation='sdpa' cannot soft-cap.*use attn_implementation="
                                             "'eager'"):
            model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "eager"
        return
    for impl in ("sdpa", "eager", "sdpa"):
        model.set_attn_implementation(impl)
        assert model.config._attn_implementation == impl
        calls.clear()
        with torch.no_grad():
            outputs[impl] = _main(model(**inputs))[_real(inputs)]
        counts[impl] = len(calls)
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], atol=1e-5, rtol=1e-5)
    assert (counts["eager"], counts["sdpa"]) == (0, model.config.num_hidden_layers)


def test_every_family_is_covered():
    assert set(FAMILIES) <= set(TINY)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_head_returns_its_encoders_attentions(model_type):
    """Each head hands output_attentions=True to its base model and returns what it recorded (the base model's
    values are checked against the reference above). Multiple-choice heads flatten their choices into the batch."""
    config = loom.AutoConfig.for_model(model_type, **{**TINY[model_type], "pad_token_id": 0})
    ids = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(0))
    for head, cls in model_table()[model_type][1].items():
        torch.manual_seed(0)
        model = cls(config).eval()
        inputs = _inputs(model_type) if model_type == "vit" else {"input_ids": ids}
        base_inputs = inputs
        if head == "multiple-choice":
            inputs = {"input_ids": ids[:, None].expand(2, 3, 6)}
            base_inputs = {"input_ids": inputs["input_ids"].reshape(6, 6)}
        base = model if head == "base" else getattr(model, model.base_model_prefix)
        with torch.no_grad():
            got = model(**inputs, output_attentions=True).attentions
            want = base(**base_inputs, output_attentions=True).attentions
        assert len(got) == config.num_hidden_layers, head
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, msg=lambda m: f"{head}: {m}")
