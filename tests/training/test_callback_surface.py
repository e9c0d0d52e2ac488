"""The callback surface the reference's callback tests read: the handler's event methods, call_event and
callback_list, its warnings (a duplicate callback, no DefaultFlowCallback), TrainerControl's per-epoch and
per-training resets, TrainerState.compute_steps as the reference's, DEFAULT_CALLBACKS and TRAINER_STATE_NAME."""
from __future__ import annotations

import logging

from loom.training import TrainerState, TrainingArguments
from loom.training.callbacks import (CallbackHandler, DefaultFlowCallback, PrinterCallback, TrainerCallback,
                                     TrainerControl)
from loom.training.trainer import DEFAULT_CALLBACKS, TRAINER_STATE_NAME


class Recorder(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_push_begin(self, args, state, control, **kwargs):
        self.seen.append(("push", kwargs.get("note")))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(("log", logs))
        control.should_save = True
        return control


def _handler(callbacks):
    return CallbackHandler(callbacks, model=None, processing_class=None, optimizer=None, lr_scheduler=None)


def test_handler_events_call_event_and_callback_list(caplog):
    recorder = Recorder()
    handler = _handler([DefaultFlowCallback(), recorder])
    assert handler.callback_list == "DefaultFlowCallback\nRecorder"
    control = handler.call_event("on_log", None, TrainerState(), TrainerControl(), logs={"loss": 1.0})
    handler.on_push_begin(None, TrainerState(), control, note="n")
    assert recorder.seen == [("log", {"loss": 1.0}), ("push", "n")] and control.should_save
    try:
        handler.on_nothing
    except AttributeError as e:
        assert "on_nothing" in str(e)
    else:
        raise AssertionError("an unknown event is not an attribute")


def test_handler_warns_about_duplicates_and_a_missing_flow_callback(caplog):
    with caplog.at_level(logging.WARNING, logger="loom"):
        _handler([PrinterCallback()])
        assert "no DefaultFlowCallback" in caplog.text and "PrinterCallback" in caplog.text
        caplog.clear()
        _handler([DefaultFlowCallback(), Recorder, Recorder])
        assert "second Recorder" in caplog.text
        caplog.clear()
        _handler([DefaultFlowCallback(), Recorder])
        assert caplog.text == ""


def test_control_resets_and_compute_steps_match_reference():
    import transformers

    control = TrainerControl(should_epoch_stop=True, should_training_stop=True)
    control._new_epoch()
    assert not control.should_epoch_stop and control.should_training_stop
    control._new_training()
    assert not control.should_training_stop
    for kw in (dict(logging_steps=0.1, eval_steps=7, save_steps=0.25), dict(logging_steps=3, save_steps=0.33)):
        ours, ref = TrainerState(), transformers.TrainerState()
        ours.compute_steps(TrainingArguments(**kw), max_steps=101)
        ref.compute_steps(transformers.TrainingArguments(output_dir="unused", **kw), max_steps=101)
        assert (ours.logging_steps, ours.eval_steps, ours.save_steps) == \
            (ref.logging_steps, ref.eval_steps, ref.save_steps), kw
    assert DEFAULT_CALLBACKS == [DefaultFlowCallback] and TRAINER_STATE_NAME == "trainer_state.json"
