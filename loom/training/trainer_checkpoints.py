"""Checkpoint saving and exact restoring for the Trainer (the file layout and atomic writes live in checkpoints.py)."""
from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import torch

from loom.distributed.checkpoint import load_dcp, model_class_name
from loom.training import checkpoints as ckpt
from loom.training.callbacks import ExportableState, TrainerState


class CheckpointMixin:
    """_save_checkpoint / _load_checkpoint / _load_model_weights of the Trainer."""

    def _resolve_checkpoint(self, value) -> Path | None:
        if value is None or value is False:
            return None
        if value is True:
            found = ckpt.latest_checkpoint(self.args.output_dir or ".")
            if found is None:
                raise FileNotFoundError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no "
                                        "checkpoint-N folder; pass a path or start without resuming")
            value = found
        path = Path(value)
        _refuse_model_only(path)
        ckpt.check_complete(path)
        return path

    def _save_checkpoint(self) -> Path:
        step = self.state.global_step
        root = Path(self.args.output_dir or "trainer_output")
        final = root / f"{ckpt.PREFIX}-{step}"
        if self.state.best_global_step == step:
            self.state.best_model_checkpoint = str(final)
        # every rank takes part (DCP shards, gathering the weights); the main process writes the folder
        self.checkpoints.begin(self.model, self.optimizer, root / f".dcp-staging-{step}")
        if self.parallel.is_main_process:
            ckpt.write_checkpoint(root, step, self._write_checkpoint_files)
            keep = {final}
            if self.state.best_model_checkpoint:
                keep.add(Path(self.state.best_model_checkpoint))
            ckpt.rotate(root, self.args.save_total_limit, keep)
        self.checkpoints.end()
        return final

    def _keep_only_best_checkpoint(self) -> None:
        """With save_total_limit=1 the run ends with the best checkpoint alone: during training the latest is kept
        beside it for resuming, at the end it goes (the reference's rule)."""
        best = self.state.best_model_checkpoint
        if self.args.save_total_limit != 1 or best is None or not self.args.should_save:
            return
        for path in ckpt.list_checkpoints(self.args.output_dir):
            if path.resolve() != Path(best).resolve():
                shutil.rmtree(path, ignore_errors=True)

    def _write_checkpoint_files(self, folder: Path) -> None:
        self.checkpoints.write_model(self.model, folder)
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(folder)
        if not self.args.save_only_model:
            self.checkpoints.write_optimizer(self.optimizer, folder)
            ckpt.save_torch(self.lr_scheduler.state_dict(), folder / "scheduler.pt")
            ckpt.save_torch(ckpt.rng_state(), folder / "rng_state.pth")
            if self.scaler is not None:
                ckpt.save_torch(self.scaler.state_dict(), folder / "scaler.pt")
        spe = self._data_shape["steps_per_epoch"] or self.state.max_steps
        position = {**self._data_shape, "epoch": self.state.global_step // spe,
                    "steps_in_epoch": self.state.global_step % spe, "pending_loss": self._pending_loss.item(),
                    "pending_steps": self._pending_steps, "model_class": model_class_name(self.model),
                    "model_format": "save_pretrained" if hasattr(self.model, "save_pretrained") else "state_dict"}
        ckpt.save_json(position, folder / "data_state.json")
        ckpt.save_json(self.args.to_dict(), folder / "training_args.json")
        self.state.stateful_callbacks = {name: states[0] if len(states) == 1 else states
                                         for name, states in self._stateful_callbacks(lambda cb: cb.state()).items()}
        ckpt.save_json(dataclasses.asdict(self.state), folder / "trainer_state.json")

    def _stateful_callbacks(self, value) -> dict[str, list]:
        """value(callback) for each ExportableState callback and the control flags, grouped by class name."""
        found: dict[str, list] = {}
        for cb in self.callback_handler.callbacks + [self.control]:
            if isinstance(cb, ExportableState):
                found.setdefault(type(cb).__name__, []).append(value(cb))
        return found

    def _restore_callback_states(self, saved: dict, path: Path) -> None:
        """Put the checkpoint's callback states (early-stopping patience, control flags) back into this run's
        callbacks of the same class, in order. A stateful callback the checkpoint has no state for is an error (it
        would silently start fresh); saved states without a callback here are ignored with a warning."""
        live = self._stateful_callbacks(lambda cb: cb)
        for name, callbacks in live.items():
            states = saved.get(name)
            states = [] if states is None else states if isinstance(states, list) else [states]
            if len(states) != len(callbacks):
                raise ValueError(f"checkpoint {path} holds the state of {len(states)} {name} callback(s) but this run "
                                 f"has {len(callbacks)}; resume with the callbacks of the run that wrote it")
            for cb, state in zip(callbacks, states):
                cb.load_state(state)
        dropped = sorted(set(saved) - set(live))
        if dropped:
            warnings.warn(f"checkpoint {path} holds state for callbacks this run does not have ({', '.join(dropped)}); "
                          "it is ignored", stacklevel=3)
        self.control._new_step()

    def _load_callback_state(self) -> None:
        """With args.restore_callback_states_from_checkpoint, restore the callbacks' states from self.state (as
        read from a checkpoint's trainer_state.json; the reference's name)."""
        if self.args.restore_callback_states_from_checkpoint:
            self._restore_callback_states(self.state.stateful_callbacks, Path("trainer_state.json"))

    def _load_checkpoint(self, path: Path) -> dict:
        """Restore model, optimizer, scheduler, state and data position; returns the RNG states to set later."""
        position = json.loads((path / "data_state.json").read_text(encoding="utf-8"))
        self._check_data_position(position, path)
        if position.get("model_class") != model_class_name(self.model):
            raise ValueError(f"checkpoint {path} holds a {position.get('model_class')}, not a "
                             f"{model_class_name(self.model)}; pass the matching checkpoint")
        self._load_model_and_optimizer(path)
        self.lr_scheduler.load_state_dict(ckpt.load_torch(path / "scheduler.pt"))
        if self.scaler is not None:
            if not (path / "scaler.pt").is_file():
                raise FileNotFoundError(f"checkpoint {path} has no scaler.pt but this run uses fp16")
            self.scaler.load_state_dict(ckpt.load_torch(path / "scaler.pt"))
        saved = TrainerState.load_from_json(path / "trainer_state.json")
        for name in ("global_step", "epoch", "log_history", "best_metric", "best_global_step",
                     "best_model_checkpoint", "total_flos", "num_input_tokens_seen"):
            setattr(self.state, name, getattr(saved, name))
        self._restore_callback_states(saved.stateful_callbacks, path)
        self._pending_loss = torch.tensor(position["pending_loss"], device=self.args.device)
        self._pending_steps = position["pending_steps"]
        return ckpt.load_torch(path / "rng_state.pth")

    def _check_data_position(self, saved: dict, path: Path) -> None:
        """The checkpoint's step must mean the same place in the data order here. Every optimizer step takes the next
        global batch (per-device batch x accumulation x data-parallel ranks) of the epoch's order, however it is
        split over ranks, so world size, per-device batch and accumulation may change as long as that product does
        not (DCP reshards the model and optimizer state)."""
        now = self._data_shape
        if saved.get("global_batch_size") != now["global_batch_size"]:
            raise ValueError(
                f"checkpoint {path} was written with a global batch size of {_batch_split(saved, True)}, but this "
                f"run's is {_batch_split(now, False)}. A run resumes at another world size only with the same global "
                f"batch size: set per_device_train_batch_size x gradient_accumulation_steps x "
                f"{now['data_parallel_size']} data-parallel ranks = {saved.get('global_batch_size')}")
        mismatched = {k: (saved.get(k), now[k]) for k in ("num_examples", "steps_per_epoch", "data_seed",
                                                          "dataloader_drop_last") if saved.get(k) != now[k]}
        if mismatched:
            details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"checkpoint {path} was written by a run with a different data order ({details}); "
                             "resume with the same dataset, seed and dataloader_drop_last")

    def _load_model_and_optimizer(self, path: Path) -> None:
        if (path / "dcp" / ".metadata").is_file():
            # a checkpoint written under parallelism: the sharded state reshards to this model at any world size
            load_dcp(path / "dcp", self.model, self.optimizer)
            return
        self._load_model_weights(path)
        try:
            self.optimizer.load_state_dict(ckpt.load_torch(path / "optimizer.pt"))
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"{path / 'optimizer.pt'} does not fit this model's optimizer ({e}); resume with the "
                             "same model and optim argument") from None

    def _load_model_weights(self, path: Path) -> None:
        """The checkpoint's weights into the live model, as the checkpoint strategy reads them."""
        self.checkpoints.load_model_weights(self.model, Path(path), self._load_weight_files)

    def _load_weight_files(self, path: Path) -> None:
        """Copy the checkpoint's weights into the live model (same parameter objects, so the optimizer keeps them)."""
        from safetensors.torch import load_file

        from loom.adapters import ADAPTER_WEIGHTS, load_adapter_checkpoint_

        if (path / ADAPTER_WEIGHTS).is_file() and not any(path.glob("model*.safetensors")):
            return load_adapter_checkpoint_(self.model, path)  # a PeftModel's checkpoint holds its adapters only
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("model*.safetensors")):
            tensors.update(load_file(f))
        expected = self.model.checkpoint_state_dict() if hasattr(self.model, "checkpoint_state_dict") else \
            self.model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        shapes = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
        if missing or unexpected or shapes:
            raise ValueError(f"checkpoint {path} holds the weights of another model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, shape mismatch {shapes[:5]}); pass a checkpoint of "
                             "this model")
        flipped = getattr(self.model, "_transposed_checkpoint_weights", ())
        state = {k: (t.t() if any(k.endswith(s) for s in flipped) else t) for k, t in tensors.items()}
        self.model.load_state_dict(state, strict=False)

    def save_model(self, output_dir: str | None = None) -> None:
        """Write the model (and the tokenizer/processor) with save_pretrained (a plain module: its weights)."""
        folder = Path(output_dir or self.args.output_dir or "trainer_output")
        if self.parallel.enabled:
            self.parallel.save_pretrained(self.model, folder)  # every rank helps gather the weights
        else:
            ckpt.save_model_files(self.model, folder)
        if self.parallel.is_main_process and self.processing_class is not None and \
                hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(folder)


def _refuse_model_only(path: Path) -> None:
    """A save_only_model checkpoint has no optimizer, scheduler or RNG state: say so instead of listing files."""
    args_file = path / "training_args.json"
    if (path / "optimizer.pt").is_file() or not args_file.is_file():
        return
    if json.loads(args_file.read_text(encoding="utf-8")).get("save_only_model"):
        raise ValueError(f"checkpoint {path} was written with save_only_model=True: it holds the model weights but no "
                         "optimizer, scheduler or RNG state, so training cannot resume from it. Load the weights with "
                         "from_pretrained and start a new run, or save with save_only_model=False to resume")


def _batch_split(shape: dict, full: bool) -> str:
    """'4 (per_device_train_batch_size 2 x gradient_accumulation_steps 1 x 2 data-parallel ranks, world size 2)'."""
    b, ga, dp = shape.get("train_batch_size"), shape.get("gradient_accumulation_steps"), shape.get("data_parallel_size")
    parts = f"per_device_train_batch_size {b} x gradient_accumulation_steps {ga} x {dp} data-parallel ranks" if full \
        else f"{b} x {ga} x {dp}"
    return f"{shape.get('global_batch_size')} ({parts}, world size {shape.get('world_size')})"
