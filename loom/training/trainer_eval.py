"""Evaluation and prediction for the Trainer: batches stream through the model, outputs are reduced and kept on
the CPU (or, with batch_eval_metrics, handed to compute_metrics one batch at a time)."""
from __future__ import annotations

import time

import torch
from torch import nn

from loom.training.data import check_batch, move_to
from loom.training.evaluation import (Accumulator, BatchList, EvalLoopOutput, EvalPrediction, LossMean,
                                     PredictionOutput, to_numpy)


class EvaluationMixin:
    """evaluate / predict / evaluation_loop / prediction_step of the Trainer."""

    # -- evaluation and prediction -------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Loss and compute_metrics over the eval set, streamed batch by batch; logged and returned."""
        loader = self.get_eval_dataloader(eval_dataset)
        self.callback_handler.eval_dataloader = loader
        start = time.perf_counter()
        output = self.evaluation_loop(loader, "evaluation", ignore_keys=ignore_keys,
                                      metric_key_prefix=metric_key_prefix)
        metrics = {**output.metrics, **_speed(metric_key_prefix, start, output.num_samples, len(loader))}
        self.log(metrics)
        self._event("on_evaluate", metrics=metrics)
        return metrics

    def predict(self, test_dataset, ignore_keys: list[str] | None = None,
                metric_key_prefix: str = "test") -> PredictionOutput:
        """Predictions (after preprocess_logits_for_metrics), labels if present, and metrics."""
        loader = self.get_test_dataloader(test_dataset)
        start = time.perf_counter()
        output = self.evaluation_loop(loader, "prediction", ignore_keys=ignore_keys,
                                      metric_key_prefix=metric_key_prefix, keep_predictions=True)
        metrics = {**output.metrics, **_speed(metric_key_prefix, start, output.num_samples, len(loader))}
        self._event("on_predict", metrics=metrics)
        return PredictionOutput(output.predictions, output.label_ids, metrics)

    def evaluation_loop(self, dataloader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval",
                        keep_predictions: bool = False) -> EvalLoopOutput:
        """Run the model over batches; keep per-batch reduced predictions on the CPU, or none with
        batch_eval_metrics."""
        args = self.args
        loss_only = args.prediction_loss_only if prediction_loss_only is None else prediction_loss_only
        loss_only = loss_only or (self.compute_metrics is None and not keep_predictions)
        streaming = args.batch_eval_metrics and self.compute_metrics is not None and not keep_predictions
        model = self.model
        was_training = model.training
        full_eval = torch.bfloat16 if args.bf16_full_eval else torch.float16 if args.fp16_full_eval else None
        if full_eval is not None and not was_training:
            # outside training the model itself is cast (faster, half the memory), as the reference does
            model.to(full_eval)
        model.eval()
        expected = len(dataloader.dataset) if hasattr(dataloader, "dataset") else 0
        collect = Accumulator if args.eval_do_concat_batches else BatchList
        kept = {"predictions": collect(expected), "label_ids": collect(expected)}
        kept.update({name: collect(expected) for name, wanted in (("inputs", "inputs"), ("losses", "loss"))
                     if wanted in args.include_for_metrics})
        mean_loss, num_samples = LossMean(skip_nonfinite=args.logging_nan_inf_filter), 0
        metrics: dict[str, float] = {}
        batches = list(dataloader) if isinstance(dataloader, list) else dataloader
        total = len(batches)
        main_input = getattr(model, "main_input_name", "input_ids")
        for i, batch in enumerate(batches):
            check_batch(batch, description)
            batch = move_to(batch, args.device)
            loss, logits, label = self.prediction_step(model, batch, loss_only, ignore_keys)
            size = _batch_size(batch)
            num_samples += size
            mean_loss.add(loss, size)
            if loss_only:
                continue
            if self.preprocess_logits_for_metrics is not None and logits is not None:
                logits = self.preprocess_logits_for_metrics(logits, label)
            step = {"predictions": logits, "label_ids": label, "inputs": batch.get(main_input),
                    "losses": None if loss is None else loss.float().repeat(size)}
            if streaming:
                metrics = self.compute_metrics(EvalPrediction(**{k: to_numpy(step[k]) for k in kept}),
                                               compute_result=i == total - 1)
            else:
                for name, store in kept.items():
                    store.add(step[name])
            self._event("on_prediction_step")
        model.train(was_training)
        results = {name: store.result() for name, store in kept.items()}
        predictions, label_ids = results["predictions"], results["label_ids"]
        if not loss_only and not streaming and self.compute_metrics is not None and predictions is not None \
                and label_ids is not None:
            metrics = self.compute_metrics(EvalPrediction(**results))
        metrics = dict(metrics or {})
        if mean_loss.result() is not None:
            metrics["loss"] = mean_loss.result()
        metrics = {k if k.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{k}": _scalar(v)
                   for k, v in metrics.items()}
        return EvalLoopOutput(predictions, label_ids, metrics, num_samples)

    def prediction_step(self, model: nn.Module, inputs: dict, prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """(loss, logits, labels) of one batch without gradients."""
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        labels = None
        if has_labels:
            found = tuple(inputs[k] for k in self.label_names)
            labels = found[0] if len(found) == 1 else found
        forward = self._forward_model if model is self.model else model
        smoothed = has_labels and bool(self.args.label_smoothing_factor)
        with torch.no_grad(), self.autocast():
            if smoothed:  # the eval loss is the (label-smoothed) training loss, as the reference computes it
                loss, outputs = self.compute_loss(forward, inputs, return_outputs=True)
            else:
                outputs = forward(**inputs)
        # a model returning a tuple puts the loss first when it is given labels (the reference's convention)
        loss_first = has_labels and not smoothed and not isinstance(outputs, dict)
        if not smoothed:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs[0] if loss_first else None
        loss = loss.detach().mean() if loss is not None else None
        if prediction_loss_only:
            return loss, None, None
        ignore = set(ignore_keys or ()) | {"loss", "past_key_values", "hidden_states", "attentions"}
        if isinstance(outputs, dict):
            values = tuple(v for k, v in outputs.items() if k not in ignore)
        else:
            values = tuple(outputs[1:] if loss_first else outputs)
        logits = values[0] if len(values) == 1 else values
        return loss, logits, labels


def _batch_size(batch: dict) -> int:
    for v in batch.values():
        if torch.is_tensor(v) and v.dim() > 0:
            return v.shape[0]
    return 1


def _scalar(v):
    return v.item() if hasattr(v, "item") and getattr(v, "size", 1) == 1 else v


def _speed(prefix: str, start: float, samples: int, steps: int) -> dict[str, float]:
    runtime = time.perf_counter() - start
    return {f"{prefix}_runtime": runtime, f"{prefix}_samples_per_second": samples / runtime if runtime else 0.0,
            f"{prefix}_steps_per_second": steps / runtime if runtime else 0.0}
