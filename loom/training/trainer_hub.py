"""The Trainer's side of the Hugging Face Hub: the repo kept in sync with output_dir, pushes on every checkpoint
save as `hub_strategy` says, `push_to_hub` at the end, and `create_model_card`.

hub_strategy (the reference's): "end" pushes only from save_model()/push_to_hub(); "every_save" also pushes the
model files of each checkpoint; "checkpoint" adds the latest checkpoint folder as last-checkpoint/ (to resume from);
"all_checkpoints" adds every checkpoint folder under its own name. Checkpoint pushes run in the background; a push
still running when the next save comes is not doubled unless hub_always_push=True, and training waits for the
pushes (and raises their errors) when it ends. Whether a push can happen at all (online, a token) is checked when
the Trainer is built, before any training.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from loom.hub_push import check_can_push, create_repo

HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
NOT_PUSHED = ["_*", "checkpoint-*"]  # of output_dir: temp files and the checkpoint folders
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "training_args.json")


def hub_setting(args, name: str, default=None):
    """A hub_* TrainingArguments field (an enum's value as its string); `default` when the field is absent."""
    value = getattr(args, name, default)
    return getattr(value, "value", value)


class HubMixin:
    """init_hf_repo / push_to_hub / create_model_card of the Trainer, and the pushes that follow checkpoint saves."""

    hub_model_id: str | None = None
    _saving_for_push = False

    def _init_hub(self) -> None:
        self.hub_model_id = None
        self._push_jobs: list = []
        if not hub_setting(self.args, "push_to_hub", False):
            return
        strategy = hub_setting(self.args, "hub_strategy", "every_save")
        if strategy not in HUB_STRATEGIES:
            raise ValueError(f"hub_strategy={strategy!r} is not supported; use one of {', '.join(HUB_STRATEGIES)}")
        check_can_push("TrainingArguments(push_to_hub=True)", hub_setting(self.args, "hub_token"))
        self.init_hf_repo()

    def _output_dir(self) -> Path:
        return Path(self.args.output_dir or "trainer_output")

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create (or find) the repo `hub_model_id` (default: output_dir's name) that pushes go to."""
        if not self.args.should_save:
            return
        name = hub_setting(self.args, "hub_model_id") or self._output_dir().absolute().name
        self.hub_model_id = create_repo(name, token=token if token is not None else hub_setting(self.args, "hub_token"),
                                        private=private if private is not None else
                                        hub_setting(self.args, "hub_private_repo"))

    def create_model_card(self, language: str | None = None, license: str | None = None,
                          tags: str | list[str] | None = None, model_name: str | None = None,
                          finetuned_from: str | None = None, tasks: str | list[str] | None = None,
                          dataset_tags: str | list[str] | None = None, dataset: str | list[str] | None = None,
                          dataset_args: str | list[str] | None = None) -> None:
        """Write output_dir/README.md: a draft model card from what the Trainer knows (see model_card.py). Tags of
        a card already there are kept."""
        from loom.training.model_card import write_model_card

        if not self.args.should_save:
            return
        path = self._output_dir() / "README.md"
        if path.is_file() and tags is not None:
            from huggingface_hub import ModelCard

            tags = [tags] if isinstance(tags, str) else list(tags)
            tags += [t for t in ModelCard.load(path).data.tags or [] if t not in tags]
        write_model_card(self, path, model_name=model_name, tags=tags, finetuned_from=finetuned_from, tasks=tasks,
                         dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args, language=language,
                         license=license)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Save the model and processing class into output_dir, write the model card (`kwargs` go to
        create_model_card) and upload output_dir (not its checkpoints) to `hub_model_id`. Returns the CommitInfo,
        or a Future of it with blocking=False."""
        from loom.utils import require

        token = token if token is not None else hub_setting(self.args, "hub_token")
        check_can_push("Trainer.push_to_hub", token)
        self._event("on_push_begin")
        model_name = kwargs.pop("model_name", None)
        if model_name is None:
            model_name = (hub_setting(self.args, "hub_model_id") or self._output_dir().name).split("/")[-1]
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self._saving_for_push = True  # a flag, not an argument: a subclass's save_model may not take one
        try:
            self.save_model()
        finally:
            self._saving_for_push = False
        if not self.args.should_save:
            return None
        model_tags = getattr(self.model, "model_tags", None)
        if model_tags:
            tags = kwargs.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            kwargs["tags"] = tags + [t for t in model_tags if t not in tags]
        self.create_model_card(model_name=model_name, **kwargs)
        self._finish_current_push()
        api = require("huggingface_hub", "Trainer.push_to_hub").HfApi(token=token)
        return api.upload_folder(repo_id=self.hub_model_id, folder_path=str(self._output_dir()),
                                 commit_message=commit_message, run_as_future=not blocking,
                                 ignore_patterns=NOT_PUSHED,
                                 revision=revision if revision is not None else hub_setting(self.args, "hub_revision"))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the model (and processing class); with push_to_hub=True also push it ("Model save")."""
        super().save_model(output_dir)
        if hub_setting(self.args, "push_to_hub", False) and not (_internal_call or self._saving_for_push):
            self.push_to_hub(commit_message="Model save", revision=hub_setting(self.args, "hub_revision"))

    def _save_checkpoint(self) -> Path:
        path = super()._save_checkpoint()
        if hub_setting(self.args, "push_to_hub", False):
            self._push_from_checkpoint(path)
        return path

    def _push_from_checkpoint(self, folder: Path) -> None:
        """Copy the checkpoint's model files into output_dir and push it in the background, plus the checkpoint
        folder itself for the "checkpoint" and "all_checkpoints" strategies."""
        from loom.utils import require

        strategy = hub_setting(self.args, "hub_strategy", "every_save")
        if not self.args.should_save or strategy == "end":
            return
        if not hub_setting(self.args, "hub_always_push", False) and any(not job.done() for job in self._push_jobs):
            return
        self._event("on_push_begin")
        output = self._output_dir()
        for name in _model_files(folder):
            shutil.copy(folder / name, output / name)
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(output)
        step_wise = self.args.save_strategy == "steps"
        message = f"Training in progress, {'step' if step_wise else 'epoch'} " \
                  f"{self.state.global_step if step_wise else int(self.state.epoch or 0)}"
        api = require("huggingface_hub", "push_to_hub=True").HfApi(token=hub_setting(self.args, "hub_token"))
        revision = hub_setting(self.args, "hub_revision")
        jobs = [api.upload_folder(repo_id=self.hub_model_id, folder_path=str(output), commit_message=message,
                                  run_as_future=True, ignore_patterns=NOT_PUSHED, revision=revision)]
        if strategy in ("checkpoint", "all_checkpoints"):
            jobs.append(api.upload_folder(repo_id=self.hub_model_id, folder_path=str(folder),
                                          path_in_repo="last-checkpoint" if strategy == "checkpoint" else folder.name,
                                          commit_message=f"{message}, checkpoint", run_as_future=True,
                                          revision=revision))
        self._push_jobs += jobs

    def _finish_current_push(self) -> None:
        """Wait for the background pushes; an upload that failed raises here."""
        jobs, self._push_jobs = self._push_jobs, []
        for job in jobs:
            job.result()


def _model_files(folder: Path) -> list[str]:
    """The files of a checkpoint that make up the model (config, weights and their shards, training arguments)."""
    names = [name for name in MODEL_FILES if (folder / name).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names += sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    return names
