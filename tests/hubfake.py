"""A stand-in for the Hugging Face Hub's server side (there is no network here): huggingface_hub's own HfApi and
ModelCard run, with only the methods that would send a request replaced by ones that record what was asked."""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace


@dataclass
class FakeHub:
    calls: list = field(default_factory=list)  # (method name, repo_id, keyword arguments), in order
    commits: list = field(default_factory=list)  # {"repo_id", "message", "files": {path_in_repo: bytes}, ...}
    card: object = None  # the model card the repo already has (None: it has none)

    def method(self, name: str):
        return [c for c in self.calls if c[0] == name]


def _read(source) -> bytes:
    return Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)


def install_fake_hub(monkeypatch) -> FakeHub:
    """Patch huggingface_hub for one test (the `fake_hub` fixture of conftest.py) and unset HF_HUB_OFFLINE."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    hub = FakeHub()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def create_repo(self, repo_id, **kwargs):
        hub.calls.append(("create_repo", repo_id, {**kwargs, "token": self.token}))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        hub.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        # the files are read now: a push uploads from a temporary folder that is gone afterwards
        files = {op.path_in_repo: _read(op.path_or_fileobj) for op in operations}
        hub.calls.append(("create_commit", repo_id, {**kwargs, "token": self.token}))
        hub.commits.append({"repo_id": repo_id, "message": kwargs.get("commit_message"), "files": files,
                            "token": self.token, **kwargs})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")

    def upload_folder(self, *, repo_id, folder_path, run_as_future=False, **kwargs):
        root = Path(folder_path)
        ignored = kwargs.get("ignore_patterns") or []
        files = {}
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and not any(Path(rel).match(p) or Path(rel.split("/")[0]).match(p) for p in ignored):
                files[f"{kwargs['path_in_repo']}/{rel}" if kwargs.get("path_in_repo") else rel] = path.read_bytes()
        hub.calls.append(("upload_folder", repo_id, {**kwargs, "token": kwargs.get("token", self.token)}))
        hub.commits.append({"repo_id": repo_id, "message": kwargs.get("commit_message"), "files": files,
                            "token": self.token, **kwargs})
        info = SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")
        if not run_as_future:
            return info
        future = Future()
        future.set_result(info)
        return future

    load_local = huggingface_hub.ModelCard.load

    def load_card(repo_id, token=None, **kwargs):
        if Path(repo_id).is_file():  # a local README.md: no request involved
            return load_local(repo_id, token=token, **kwargs)
        hub.calls.append(("load_card", repo_id, {"token": token}))
        if hub.card is None:
            raise EntryNotFoundError(f"{repo_id} has no README.md")
        return hub.card

    for name, fn in (("create_repo", create_repo), ("create_branch", create_branch),
                     ("create_commit", create_commit), ("upload_folder", upload_folder)):
        monkeypatch.setattr(huggingface_hub.HfApi, name, fn)
    monkeypatch.setattr(huggingface_hub.ModelCard, "load", staticmethod(load_card))
    return hub
