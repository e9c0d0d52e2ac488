"""Uploading to the Hugging Face Hub through `huggingface_hub`: `push_to_hub` on models, configs, tokenizers and
processors (PushToHubMixin), and the pieces the Trainer's pushes share with it.

Every push first checks that an upload can happen at all (not offline, a token available) and fails before any
work when it cannot. A push saves the object into a temporary folder and uploads that folder in one commit, with a
README.md model card (the repo's own card when it has one, else a new one) carrying the given tags.
"""
from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

from loom.utils import require

# save_pretrained's default shard size in push_to_hub (the reference's)
PUSH_SHARD_SIZE = "50GB"


def check_can_push(what: str, token=None) -> None:
    """Raise, naming `what` asked for the upload, when nothing can be uploaded: offline mode, or no token."""
    from loom.hub import _offline

    if _offline():
        raise RuntimeError(f"{what}: HF_HUB_OFFLINE is set, so nothing can be uploaded to the Hugging Face Hub. "
                           "Unset HF_HUB_OFFLINE to push, or save locally (save_pretrained / push_to_hub=False)")
    hf = require("huggingface_hub", what)
    if token is False or (not isinstance(token, str) and hf.get_token() is None):
        raise ValueError(f"{what}: no Hugging Face token, so the upload would be refused. Pass token='hf_...', set "
                         "HF_TOKEN, or log in with `hf auth login`")


def create_repo(repo_id: str, *, token=None, private: bool | None = None) -> str:
    """Create the repo if it does not exist; returns its full id ('user/name')."""
    if not isinstance(repo_id, str) or not repo_id.strip("/ "):
        raise ValueError(f"repo_id={repo_id!r} is not a repository name; pass 'name' or 'org/name'")
    hf = require("huggingface_hub", "push_to_hub")
    return hf.HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id


def commit_folder(folder: Path, repo_id: str, *, message: str, description: str | None = None, token=None,
                  create_pr: bool = False, revision: str | None = None):
    """Upload every file under `folder` (same relative paths) as one commit; returns the CommitInfo."""
    hf = require("huggingface_hub", "push_to_hub")
    api = hf.HfApi(token=token)
    operations = [hf.CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
                  for path in sorted(folder.rglob("*")) if path.is_file()]
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.create_commit(repo_id, operations, commit_message=message, commit_description=description,
                             create_pr=create_pr, revision=revision)


def tagged_card(repo_id: str, tags: list[str] | None, token=None):
    """The repo's model card with `tags` added, or a new card (library_name: transformers, whose formats loom
    writes) when the repo has none."""
    hf = require("huggingface_hub", "push_to_hub")
    from huggingface_hub.errors import EntryNotFoundError

    try:
        card = hf.ModelCard.load(repo_id, token=token)
    except EntryNotFoundError:
        data = hf.ModelCardData(library_name="transformers", tags=[])
        card = hf.ModelCard.from_template(data, model_description="This model was saved with loom in the formats "
                                                                  "of `transformers`, which loads it as well.")
    card.data.tags = list(card.data.tags or [])
    card.data.tags += [t for t in (tags or []) if t not in card.data.tags]
    return card


def default_commit_message(obj) -> str:
    """'Upload model' / 'config' / 'tokenizer' / 'processor' by what the object is (its classes' names, so that a
    LlamaForCausalLM is a model, as in save_pretrained(push_to_hub=True))."""
    names = [cls.__name__ for cls in type(obj).__mro__]
    for word, message in (("Model", "Upload model"), ("Config", "Upload config"), ("Tokenizer", "Upload tokenizer"),
                          ("Processor", "Upload processor")):
        if any(word in name for name in names):
            return message
    return f"Upload {type(obj).__name__}"


class PushToHubMixin:
    """`push_to_hub` for any class with `save_pretrained(folder)`: models, configs, tokenizers, processors."""

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str | None = PUSH_SHARD_SIZE,
                    tags: list[str] | None = None):
        """Save this object into a temporary folder and upload it to the hub repo `repo_id` (created if needed) in
        one commit, with a README.md model card carrying `tags`. Returns huggingface_hub's CommitInfo."""
        what = f"{type(self).__name__}.push_to_hub"
        check_can_push(what, token)
        save_kwargs = {}
        if "max_shard_size" in inspect.signature(self.save_pretrained).parameters:
            save_kwargs["max_shard_size"] = max_shard_size or PUSH_SHARD_SIZE
        elif max_shard_size not in (None, PUSH_SHARD_SIZE):
            raise ValueError(f"{what}: max_shard_size applies to model weights; {type(self).__name__} has none, so "
                             "drop the argument")
        if isinstance(tags, str):
            tags = [tags]
        token = token if isinstance(token, str) else None
        repo_id = create_repo(repo_id, token=token, private=private)
        card = tagged_card(repo_id, tags, token)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **save_kwargs)
            card.save(os.path.join(folder, "README.md"))
            return commit_folder(Path(folder), repo_id, message=commit_message or default_commit_message(self),
                                 description=commit_description, token=token, create_pr=create_pr,
                                 revision=revision)
