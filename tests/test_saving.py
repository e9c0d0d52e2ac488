"""save_pretrained over an existing model: at every instant, and after a failure at any point, the directory loads
(in loom and in the reference) as the old model or the new one; file modes; push_to_hub; arguments never ignored."""
from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat
from types import SimpleNamespace

import pytest
import torch

import loom
from loomtest import TINY

# (max_shard_size of the model already in the directory, of the one saved over it): None writes one file
TRANSITIONS = {"single->single": (None, None), "sharded->single": ("20KB", None), "single->sharded": (None, "20KB"),
               "sharded->sharded same names": ("20KB", "20KB"), "sharded->sharded other count": ("40KB", "20KB")}
FS_CALLS = ("replace", "rename", "unlink", "remove", "link", "fsync")  # every step of a save that can fail


def _model(seed: int):
    torch.manual_seed(seed)
    return loom.LlamaForCausalLM(loom.LlamaConfig(**TINY["llama"]))


def _save(model, directory, shard_size, **kwargs):
    model.save_pretrained(directory, **({"max_shard_size": shard_size} if shard_size else {}), **kwargs)


def _which(directory, old, new) -> str:
    """'old' or 'new': the model that both loom and the reference load from `directory` (anything else fails)."""
    import transformers

    loaded = {"loom": loom.LlamaForCausalLM.from_pretrained(directory).state_dict(),
              "reference": transformers.LlamaForCausalLM.from_pretrained(directory).state_dict()}
    found = set()
    for library, state in loaded.items():
        match = [name for name, model in (("old", old), ("new", new))
                 if all(torch.equal(state[k], v) for k, v in model.state_dict().items())]
        assert match, f"{library} loads neither the old nor the new model from {sorted(os.listdir(directory))}"
        found.add(match[0])
    assert len(found) == 1, found
    return found.pop()


def _files(directory) -> set[str]:
    return set(os.listdir(directory))


@pytest.mark.parametrize("before,after", TRANSITIONS.values(), ids=TRANSITIONS)
def test_every_instant_of_a_resave_loads_old_or_new(tmp_path, monkeypatch, before, after):
    """A kill at any point of a save (simulated by copying the directory before each rename, link, delete and
    fsync the save makes) leaves a directory that loads as the old or the new model."""
    _check_every_instant(tmp_path, monkeypatch, before, after)


def test_every_instant_without_hard_links(tmp_path, monkeypatch):
    """On a filesystem without hard links, the live shards that new shards replace are kept by a copy instead."""
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    _check_every_instant(tmp_path, monkeypatch, "20KB", "20KB")


def _check_every_instant(tmp_path, monkeypatch, before, after):
    old, new, directory = _model(0), _model(1), tmp_path / "model"
    _save(new, tmp_path / "clean", after)
    _save(old, directory, before)
    snapshots = []

    def copy_first(fn):
        def call(*args, **kwargs):
            snapshot = tmp_path / f"instant-{len(snapshots)}"
            shutil.copytree(directory, snapshot)
            snapshots.append(snapshot)
            return fn(*args, **kwargs)
        return call

    with monkeypatch.context() as m:
        for name in FS_CALLS:
            m.setattr(os, name, copy_first(getattr(os, name)))
        _save(new, directory, after)
    assert len(snapshots) >= 4
    seen = [_which(s, old, new) for s in snapshots]
    assert seen[0] == "old" and seen == sorted(seen, key=["old", "new"].index), seen  # old, then new for good
    assert _which(directory, old, new) == "new"
    assert _files(directory) == _files(tmp_path / "clean")  # the old set's files and every temp file are gone


@pytest.mark.parametrize("before,after", TRANSITIONS.values(), ids=TRANSITIONS)
def test_a_failed_resave_leaves_a_loadable_model(tmp_path, monkeypatch, before, after):
    """An OSError (a full disk, an I/O error) at the k-th step of a save, for every k: the error reaches the caller,
    the directory loads as the old or the new model, and the next save cleans up what the failed one left."""
    old, new = _model(0), _model(1)
    _save(new, tmp_path / "clean", after)
    for k in itertools.count(1):
        directory = tmp_path / f"fail-at-{k}"
        _save(old, directory, before)
        calls, injected = itertools.count(1), []

        def fail_kth(name, fn):
            def call(*args, **kwargs):
                if next(calls) == k:
                    injected.append("fsync of the directory" if name == "fsync" and
                                    stat.S_ISDIR(os.fstat(args[0]).st_mode) else name)
                    raise OSError(errno.ENOSPC, "No space left on device (injected)")
                return fn(*args, **kwargs)
            return call

        with monkeypatch.context() as m:
            for name in FS_CALLS:
                m.setattr(os, name, fail_kth(name, getattr(os, name)))
            try:
                _save(new, directory, after)
                raised = False
            except OSError as e:
                assert "injected" in str(e)
                raised = True
        made = next(calls) - 1
        # the error reaches the caller, except where the save has another way: a copy for a hard link, and the
        # directory fsync (best effort: some filesystems refuse it)
        assert raised or not injected or injected[0] in ("link", "fsync of the directory"), injected
        assert _which(directory, old, new) in ("old", "new")
        _save(new, directory, after)
        assert _which(directory, old, new) == "new" and _files(directory) == _files(tmp_path / "clean")
        if made < k:
            break
    assert k > 6  # the loop went through every step of the save


def test_failed_write_leaves_the_old_model_untouched(tmp_path, monkeypatch):
    """The disk fills while the weights are written: not one byte of the old model changed."""
    old, new, directory = _model(0), _model(1), tmp_path / "model"
    _save(old, directory, "20KB")
    before = {f.name: f.read_bytes() for f in directory.iterdir()}
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        _save(new, directory, None)
    assert {f.name: f.read_bytes() for f in directory.iterdir()} == before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_mode_open_gives_them(tmp_path, umask, minilm_dir):
    """0666 less the umask, like the reference's open(..., "w"), not mkstemp's 0600."""
    tokenizer = loom.AutoTokenizer.from_pretrained(minilm_dir)
    previous = os.umask(umask)
    try:
        _save(_model(0), tmp_path, "20KB")
        tokenizer.save_pretrained(tmp_path)
        loom.GenerationConfig(max_new_tokens=3).save_pretrained(tmp_path, "other_generation_config.json")
    finally:
        os.umask(previous)
    modes = {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in tmp_path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "other_generation_config.json"} <= set(modes)
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))


# -- push_to_hub ----------------------------------------------------------------------------------------------------
@pytest.fixture
def hub_calls(monkeypatch):
    """huggingface_hub's HfApi with create_repo/upload_folder recorded instead of sent (there is no network)."""
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs, self.token))
        return SimpleNamespace(repo_id=f"me/{repo_id}")

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs, self.token))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_saved_files(tmp_path, hub_calls):
    directory = tmp_path / "tiny-llama"
    (directory / "unrelated").mkdir(parents=True)  # never uploaded: only what this save wrote goes up
    _save(_model(0), directory, "20KB", push_to_hub=True, private=True, token="hf_x", commit_message="first")
    (create, name, options, token), (upload, arguments, upload_token) = hub_calls
    assert (create, name, options, token) == ("create_repo", "tiny-llama", {"private": True, "exist_ok": True}, "hf_x")
    written = sorted(f.name for f in directory.iterdir() if f.is_file())
    assert upload == "upload_folder" and upload_token == "hf_x"
    assert {**arguments, "allow_patterns": sorted(arguments["allow_patterns"])} == {
        "repo_id": "me/tiny-llama", "folder_path": str(directory), "allow_patterns": written,
        "commit_message": "first", "create_pr": False}
    hub_calls.clear()
    _save(_model(0), directory, None, push_to_hub=True, repo_id="org/other")
    assert hub_calls[0][1] == "org/other" and hub_calls[1][1]["commit_message"] == "Upload model"
    assert sorted(hub_calls[1][1]["allow_patterns"]) == ["config.json", "generation_config.json", "model.safetensors"]


@pytest.mark.parametrize("what", ["tokenizer", "config", "generation config"])
def test_push_to_hub_of_tokenizer_and_configs(tmp_path, hub_calls, minilm_dir, what):
    thing, message, files = {
        "tokenizer": (loom.AutoTokenizer.from_pretrained(minilm_dir), "Upload tokenizer",
                      ["tokenizer.json", "tokenizer_config.json"]),
        "config": (loom.LlamaConfig(**TINY["llama"]), "Upload config", ["config.json"]),
        "generation config": (loom.GenerationConfig(max_new_tokens=3), "Upload config", ["generation_config.json"]),
    }[what]
    thing.save_pretrained(tmp_path / "repo", push_to_hub=True, token="hf_x")
    (create, name, _, token), (_, upload, _) = hub_calls
    assert (create, name, token) == ("create_repo", "repo", "hf_x")
    assert sorted(upload["allow_patterns"]) == files and upload["commit_message"] == message
    assert sorted(os.listdir(tmp_path / "repo")) == files
    with pytest.raises(TypeError, match="keyword arguments loom does not support: bogus; remove them"):
        thing.save_pretrained(tmp_path / "x", bogus=1)
    with pytest.raises(ValueError, match="commit_message only apply to an upload; pass push_to_hub=True"):
        thing.save_pretrained(tmp_path / "x", commit_message="m")


def test_save_arguments_are_honoured_or_refused(tmp_path, hub_calls):
    model = _model(0)
    with pytest.raises(TypeError, match="save_pretrained.* keyword arguments loom does not support: bogus, "
                                        "distributed_checkpoint; remove them"):
        model.save_pretrained(tmp_path, bogus=1, distributed_checkpoint=True)
    with pytest.raises(ValueError, match=r"save_pretrained\(\): repo_id, token only apply to an upload; pass "
                                         "push_to_hub=True"):
        model.save_pretrained(tmp_path, repo_id="me/x", token="hf_x")
    with pytest.raises(ValueError, match=r"save_function=\.\.\.\) is not supported"):
        model.save_pretrained(tmp_path, save_function=lambda obj, f: None)
    assert not hub_calls and not tmp_path.joinpath("config.json").exists()
    model.save_pretrained(tmp_path, save_function=torch.save, is_main_process=False, push_to_hub=True)
    assert not hub_calls and not tmp_path.joinpath("config.json").exists()  # not the main process: nothing at all


def test_parallel_save_refuses_to_push(tmp_path, hub_calls):
    from loom.distributed.checkpoint import save_pretrained_distributed

    with pytest.raises(ValueError, match="parallelised model does not push to the hub; save it, then upload"):
        save_pretrained_distributed(_model(0), tmp_path, push_to_hub=True)
    assert not hub_calls and not os.listdir(tmp_path)
