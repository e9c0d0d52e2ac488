"""BERT as a decoder (config.is_decoder): BertLMHeadModel against the reference on tiny random checkpoints: causal
logits and the shifted loss on a left-padded batch, cross-attention over encoder states (with their padding), cached
decode equal to the full forward, greedy and beam generate token-identical, the Auto class, saves both ways; and the
named errors for inputs a decoder or an encoder cannot take."""
from __future__ import annotations

import pytest
import torch

import loom
from loomtest import TINY, check_padded_and_generate

pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(tmp_path_factory, cls="BertLMHeadModel", **overrides):
    """A reference checkpoint whose every parameter is random (fresh biases are zeros and norms ones, which would hide
    a bias read from the wrong key), saved by the reference; returns (path, reference model in eval mode)."""
    import transformers

    config = transformers.BertConfig(**{**TINY["bert"], "is_decoder": True, **overrides})
    torch.manual_seed(0)
    ref = getattr(transformers, cls)(config).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_((1.0 if name.endswith("LayerNorm.weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp(cls)
    ref.save_pretrained(path)
    return path, ref


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path, ref = _checkpoint(tmp_path_factory)
    return path, ref, loom.AutoModelForCausalLM.from_pretrained(path)


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    path, ref = _checkpoint(tmp_path_factory, add_cross_attention=True)
    return path, ref, loom.BertLMHeadModel.from_pretrained(path)


def _ids(B=2, T=10, seed=1):
    return torch.randint(3, 99, (B, T), generator=torch.Generator().manual_seed(seed))


def _left_padded():
    ids, mask = _ids(), torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    return ids, mask


def _encoder_states():
    g = torch.Generator().manual_seed(3)
    states, mask = torch.randn(2, 6, TINY["bert"]["hidden_size"], generator=g), torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return states, mask


def test_auto_class_logits_and_shifted_loss_match_reference(decoder):
    _, ref, ours = decoder
    assert type(ours) is loom.BertLMHeadModel and ours.can_generate()
    ids, mask = _left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        b = ref(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    torch.testing.assert_close(a.logits[0, 3:], b.logits[0, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.logits[1], b.logits[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    assert "past_key_values" not in a  # labels turn the cache off, as in the reference
    # causal: a later token does not change an earlier position's logits
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[:, :5]).logits, ours(ids).logits[:, :5], atol=1e-5, rtol=1e-5)


def test_cached_decode_equals_full_forward(decoder):
    _, _, ours = decoder
    ids, mask = _left_padded()
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        first = ours(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        assert first.past_key_values.get_seq_length() == 6
        rest = ours(ids[:, 6:], attention_mask=mask, past_key_values=first.past_key_values)
    torch.testing.assert_close(rest.logits, full[:, 6:], atol=1e-5, rtol=1e-5)


def test_greedy_and_beam_generate_match_reference(decoder):
    _, ref, ours = decoder
    ids, mask = _left_padded()
    check_padded_and_generate(ours, ref, ids, mask, new_tokens=8)
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert ours.generate(ids[1:], **kw).tolist() == ref.generate(ids[1:], **kw).tolist()
        static = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                               eos_token_id=None, cache_implementation="static")
        assert static.tolist() == ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                               pad_token_id=0, eos_token_id=None).tolist()


def test_bidirectional_lm_head_generates_as_reference(tmp_path_factory):
    """is_decoder=False: the prompt attends both ways; each new token then reads the cache generate hands in (the
    reference's behaviour, which warns that the head wants is_decoder=True)."""
    path, ref = _checkpoint(tmp_path_factory, is_decoder=False)
    ours = loom.BertLMHeadModel.from_pretrained(path)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert ours.generate(_ids(), **kw).tolist() == ref.generate(_ids(), **kw).tolist()


def test_save_loads_in_reference_with_same_logits(decoder, cross, tmp_path):
    import transformers

    for _, _, ours in (decoder, cross):
        ours.save_pretrained(tmp_path)
        back = transformers.BertLMHeadModel.from_pretrained(tmp_path).eval()
        kwargs = {"encoder_hidden_states": _encoder_states()[0]} if ours.config.add_cross_attention else {}
        with torch.no_grad():
            torch.testing.assert_close(back(_ids(), **kwargs).logits, ours(_ids(), **kwargs).logits, atol=1e-5,
                                       rtol=1e-5)


def test_cross_attention_matches_reference_with_cache_and_attentions(cross):
    import transformers

    path, _, ours = cross
    ref = transformers.BertLMHeadModel.from_pretrained(path, attn_implementation="eager").eval()
    ids, mask = _left_padded()
    states, states_mask = _encoder_states()
    kw = dict(encoder_hidden_states=states, encoder_attention_mask=states_mask)
    with torch.no_grad():
        labels = ids.clone()
        labels[0, :4] = -100  # the logits at padded positions (which predict these) differ between eager and SDPA
        a = ours(ids, attention_mask=mask, output_attentions=True, labels=labels, **kw)
        b = ref(ids, attention_mask=mask, output_attentions=True, labels=labels, **kw)
        torch.testing.assert_close(a.logits[0, 3:], b.logits[0, 3:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.logits[1], b.logits[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
        assert len(a.attentions) == len(a.cross_attentions) == 2
        for x, y in zip(a.cross_attentions, b.cross_attentions):  # (B, H, T, 6): padded encoder keys get nothing
            assert x.shape == (2, 4, 10, 6) and not x[1, ..., 4:].any()
            torch.testing.assert_close(x[:, :, 3:], y[:, :, 3:], atol=1e-5, rtol=1e-5)
        for x, y in zip(a.attentions, b.attentions):
            torch.testing.assert_close(x[1], y[1], atol=1e-5, rtol=1e-5)
        first = ours(ids[:, :7], attention_mask=mask[:, :7], use_cache=True, **kw)
        rest = ours(ids[:, 7:], attention_mask=mask, past_key_values=first.past_key_values, **kw)
        torch.testing.assert_close(rest.logits, a.logits[:, 7:], atol=1e-5, rtol=1e-5)


def test_bad_decoder_inputs_are_named(decoder):
    _, _, ours = decoder
    with pytest.raises(ValueError, match="add_cross_attention=True needs is_decoder=True"):
        loom.BertModel(loom.BertConfig(**TINY["bert"], add_cross_attention=True))
    with pytest.raises(ValueError, match="no cross-attention layers.*add_cross_attention=True"):
        ours(_ids(), encoder_hidden_states=_encoder_states()[0])
    encoder = loom.BertModel(loom.BertConfig(**TINY["bert"]))
    with pytest.raises(ValueError, match="decoder's input .its cross-attention.; this model is an encoder"):
        encoder(_ids(), encoder_hidden_states=_encoder_states()[0])
    with torch.no_grad():
        past = ours(_ids(T=60), use_cache=True).past_key_values
        with pytest.raises(ValueError, match="65 tokens is longer than max_position_embeddings=64"):
            ours(_ids(T=5), past_key_values=past)


def test_generate_with_token_type_ids_matches_reference(decoder):
    """The prompt's segment ids reach the model; generated tokens take each row's last one (the reference's rule),
    under greedy, beam search and a padded batch."""
    _, ref, ours = decoder
    ids, mask = _left_padded()
    types = torch.zeros_like(ids)
    types[0, 7:] = 1
    for kw in (dict(), dict(num_beams=2), dict(attention_mask=mask)):
        kw.update(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, token_type_ids=types)
        with torch.no_grad():
            assert ours.generate(ids, **kw).tolist() == ref.generate(ids, **kw).tolist(), kw
        assert ours.generate(ids, **kw).tolist() != ours.generate(ids, **{**kw, "token_type_ids": None}).tolist()
    with pytest.raises(ValueError, match=r"token_type_ids must have shape \(2, 10\)"):
        ours.generate(ids, token_type_ids=types[:, :4], max_new_tokens=2)
    llama = loom.LlamaForCausalLM(loom.LlamaConfig(**TINY["llama"]))
    with pytest.raises(TypeError, match="got token_type_ids, which LlamaForCausalLM does not take"):
        llama.generate(ids, token_type_ids=types, max_new_tokens=2)
