"""push_to_hub on models, configs, tokenizers and processors: the commit huggingface_hub is asked to make (files,
paths, message, branch, PR), the model card it carries, and the errors before any work when nothing can be pushed."""
from __future__ import annotations

import json

import pytest
import torch

import loom
from tests.loomtest import TINY


def _model():
    torch.manual_seed(0)
    return loom.LlamaForCausalLM(loom.LlamaConfig(**TINY["llama"]))


def _card(files: dict):
    from huggingface_hub import ModelCard

    return ModelCard(files["README.md"].decode())


def test_model_push_uploads_what_save_pretrained_writes(fake_hub, tmp_path):
    model = _model()
    info = model.push_to_hub("tiny-llama", token="hf_x", private=True, max_shard_size="20KB", tags=["demo"],
                             commit_description="first upload")
    assert info.commit_url == "https://huggingface.co/me/tiny-llama/commit/0"
    assert fake_hub.calls[0] == ("create_repo", "tiny-llama", {"private": True, "exist_ok": True, "token": "hf_x"})
    (commit,) = fake_hub.commits
    assert (commit["repo_id"], commit["message"], commit["commit_description"], commit["create_pr"],
            commit["revision"]) == ("me/tiny-llama", "Upload model", "first upload", False, None)
    local = tmp_path / "local"
    model.save_pretrained(local, max_shard_size="20KB")
    expected = {f.name for f in local.iterdir()}
    assert "model.safetensors.index.json" in expected  # sharded: max_shard_size reached save_pretrained
    assert set(commit["files"]) == expected | {"README.md"}
    card = _card(commit["files"])
    assert card.data.library_name == "transformers" and card.data.tags == ["demo"]
    uploaded = tmp_path / "uploaded"  # what the hub repo now holds loads as the same model
    uploaded.mkdir()
    for name, data in commit["files"].items():
        (uploaded / name).write_bytes(data)
    reloaded = loom.LlamaForCausalLM.from_pretrained(uploaded)
    torch.testing.assert_close(reloaded.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_push_to_a_branch_or_a_pull_request(fake_hub):
    from huggingface_hub import ModelCard, ModelCardData

    fake_hub.card = ModelCard.from_template(ModelCardData(library_name="transformers", tags=["kept"]))
    loom.LlamaConfig(**TINY["llama"]).push_to_hub("org/cfg", token="hf_x", revision="dev", tags=["new", "kept"],
                                                  commit_message="config only")
    assert fake_hub.method("create_branch") == [("create_branch", "org/cfg", {"branch": "dev", "exist_ok": True})]
    (commit,) = fake_hub.commits
    assert (commit["message"], commit["revision"]) == ("config only", "dev")
    assert set(commit["files"]) == {"config.json", "README.md"}
    assert _card(commit["files"]).data.tags == ["kept", "new"]  # the repo's card, tagged
    fake_hub.commits.clear()
    loom.GenerationConfig(max_new_tokens=3).push_to_hub("org/gen", token="hf_x", create_pr=True,
                                                        revision="refs/pr/1")
    assert len(fake_hub.method("create_branch")) == 1  # a PR ref is not a branch to create
    (commit,) = fake_hub.commits
    assert commit["create_pr"] is True and commit["message"] == "Upload config"
    assert json.loads(commit["files"]["generation_config.json"])["max_new_tokens"] == 3


def test_tokenizer_and_processor_push(fake_hub, minilm_dir):
    from loom.processing.auto import ProcessorMixin

    tokenizer = loom.AutoTokenizer.from_pretrained(minilm_dir)
    tokenizer.push_to_hub("tok", token="hf_x")
    processor = ProcessorMixin(image_processor=loom.ViTImageProcessor(), tokenizer=tokenizer)
    processor.push_to_hub("proc", token="hf_x")
    tok_commit, proc_commit = fake_hub.commits
    assert tok_commit["message"] == "Upload tokenizer"
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= set(tok_commit["files"])
    assert proc_commit["message"] == "Upload processor"
    assert {"preprocessor_config.json", "processor_config.json", "tokenizer.json"} <= set(proc_commit["files"])
    with pytest.raises(ValueError, match="max_shard_size applies to model weights; .*drop the argument"):
        tokenizer.push_to_hub("tok", token="hf_x", max_shard_size="1GB")


def test_nothing_is_pushed_offline_or_without_a_token(fake_hub, monkeypatch):
    import huggingface_hub

    model = _model()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"LlamaForCausalLM.push_to_hub: HF_HUB_OFFLINE is set, so nothing can be "
                                           "uploaded.*Unset HF_HUB_OFFLINE"):
        model.push_to_hub("tiny", token="hf_x")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="LlamaForCausalLM.push_to_hub: no Hugging Face token.*token='hf_...', set "
                                         "HF_TOKEN, or log in"):
        model.push_to_hub("tiny")
    with pytest.raises(ValueError, match="repo_id='' is not a repository name"):
        model.push_to_hub("", token="hf_x")
    assert fake_hub.calls == []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")  # a logged-in user needs no token=
    model.config.push_to_hub("tiny")
    assert fake_hub.calls[0] == ("create_repo", "tiny", {"private": None, "exist_ok": True, "token": None})
