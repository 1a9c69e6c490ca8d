"""Everything that reacts to the training loop, behind one protocol the loop calls without naming them.

The loop calls, in this order: `on_train_begin(model, initial_epoch)`; per epoch `on_epoch_begin(epoch)`,
then per multi-step call `clip_chunk` / `on_chunk_begin(global_step)` / `on_chunk_end(global_step)` /
`on_batch_metrics(global_step, loss, accuracy)` (the call's own means, once its loss is known to be
finite) / `on_train_steps(epoch, steps_done, steps_per_epoch, mean_loss)` (the epoch's mean so far), then
`on_steps_end(epoch)` when the epoch's steps are over (complete or stopped), and
`on_epoch_end(epoch, row, timing)` once the epoch is evaluated and saved; `on_train_end()` after the last
epoch. Epochs are 0-based here, as in Keras.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, List, Optional


class Observer:
    """No-op base: subclasses override what they need."""

    def on_train_begin(self, model, initial_epoch: int) -> None: ...

    def on_epoch_begin(self, epoch: int) -> None: ...

    def clip_chunk(self, global_step: int, chunk: int) -> int:
        return chunk

    def on_chunk_begin(self, global_step: int) -> None: ...

    def on_chunk_end(self, global_step: int) -> None: ...

    def on_batch_metrics(self, global_step: int, loss: float, accuracy: float) -> None: ...

    def on_train_steps(self, epoch: int, steps_done: int, steps_per_epoch: int, mean_loss: float) -> None: ...

    def on_steps_end(self, epoch: int) -> None: ...

    def on_epoch_end(self, epoch: int, row: dict, timing: dict) -> None: ...

    def on_train_end(self) -> None: ...


class Observers(Observer):
    """Several observers called in order (a chunk is clipped by each in turn)."""

    def __init__(self, observers: Iterable[Observer]):
        self.observers: List[Observer] = [observer for observer in observers if observer is not None]

    def clip_chunk(self, global_step: int, chunk: int) -> int:
        for observer in self.observers:
            chunk = observer.clip_chunk(global_step, chunk)
        return chunk


def _fan_out(name: str):
    def call(self, *args):
        for observer in self.observers:
            getattr(observer, name)(*args)
    call.__name__ = name
    return call


for _name in ("on_train_begin", "on_epoch_begin", "on_chunk_begin", "on_chunk_end", "on_batch_metrics",
              "on_train_steps", "on_steps_end", "on_epoch_end", "on_train_end"):
    setattr(Observers, _name, _fan_out(_name))


def epoch_line(row: dict, timing: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.4f}  accuracy {row['accuracy']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_accuracy {row['val_accuracy']:.4f}  "
            f"{timing['examples_per_second']:,.0f} examples/s  {timing['seconds']:.1f} s")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


def progress_line(epoch: int, epochs: int, steps_done: int, steps_per_epoch: int, mean_loss: float,
                  eta: Optional[float], width: int = 30) -> str:
    """`epoch 2/20 [=====.....] 140/421 loss 0.3127 ETA 0:41` (no ETA before the pace is known)."""
    filled = int(width * steps_done / max(steps_per_epoch, 1))
    return (f"epoch {epoch + 1}/{epochs} [{'=' * filled}{'.' * (width - filled)}] {steps_done}/{steps_per_epoch} "
            f"loss {mean_loss:.4f}" + (f" ETA {_clock(eta)}" if eta is not None else ""))


class Console(Observer):
    """The epoch line once an epoch is saved. While an epoch trains: on a terminal a one-line progress bar
    with the time left (erased before the epoch line); in a log (Vertex AI, a pipe) the same as a line every
    `every` seconds, so only long epochs print it. The time left is paced from the epoch's first multi-step
    call on (the first one may include tracing)."""

    def __init__(self, epochs: int, log=print, width: int = 30, every: float = 60.0):
        self.epochs, self.log, self.width, self.every = epochs, log, width, every
        self.enabled = sys.stdout.isatty()
        self._pace_from: Optional[tuple] = None
        self._last_line = 0.0

    def on_epoch_begin(self, epoch):
        self._pace_from, self._last_line = None, time.monotonic()

    def on_train_steps(self, epoch, steps_done, steps_per_epoch, mean_loss):
        now = time.monotonic()
        eta = None
        if self._pace_from is None:
            self._pace_from = (now, steps_done)
        elif steps_done > self._pace_from[1] and now > self._pace_from[0]:
            pace = (steps_done - self._pace_from[1]) / (now - self._pace_from[0])
            eta = (steps_per_epoch - steps_done) / pace
        line = progress_line(epoch, self.epochs, steps_done, steps_per_epoch, mean_loss, eta, self.width)
        if self.enabled:
            sys.stdout.write("\r" + line)
            sys.stdout.flush()
        elif eta is not None and steps_done < steps_per_epoch and now - self._last_line >= self.every:
            self.log(line)
            self._last_line = now

    def on_steps_end(self, epoch):
        if self.enabled:
            sys.stdout.write("\r" + " " * 100 + "\r")
            sys.stdout.flush()

    def on_epoch_end(self, epoch, row, timing):
        self.log(epoch_line(row, timing, self.epochs))


class Summaries(Observer):
    """TensorBoard: run folders `train` and `validation`.

    `train`: `batch_loss`, `batch_accuracy`, `batch_learning_rate` after every multi-step call (x axis: the
    global step; the means over the call's steps, and the rate of its last step), then per epoch (x axis:
    the epoch) `epoch_loss`, `epoch_accuracy`, `epoch_learning_rate` (the rate the epoch started with),
    `epoch_examples_per_second`, and the settings as text `config`. `validation`: `epoch_loss`,
    `epoch_accuracy` and, from the end of the run, the image `misclassified`. Event files are flushed after
    every call, so a local TensorBoard follows the run live; `sync` (the upload of a staged gs:// log dir)
    runs at most every SYNC_SECONDS during an epoch and at every epoch's end.
    """

    SYNC_SECONDS = 30.0

    def __init__(self, log_dir: str, config_dict: dict, sync=lambda: None, learning_rate_at=None):
        import tensorflow as tf

        self.config_dict, self.sync, self.learning_rate_at = config_dict, sync, learning_rate_at
        self.train = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
        self.validation = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))
        self.synced = time.monotonic()

    def on_train_begin(self, model, initial_epoch):
        import tensorflow as tf

        table = "\n".join(f"| {key} | {value} |" for key, value in sorted(self.config_dict.items()))
        with self.train.as_default():
            tf.summary.text("config", "| setting | value |\n|---|---|\n" + table, step=initial_epoch)

    def on_batch_metrics(self, global_step, loss, accuracy):
        import tensorflow as tf

        with self.train.as_default():
            tf.summary.scalar("batch_loss", loss, step=global_step)
            tf.summary.scalar("batch_accuracy", accuracy, step=global_step)
            if self.learning_rate_at is not None:
                tf.summary.scalar("batch_learning_rate", self.learning_rate_at(global_step - 1), step=global_step)
        self.train.flush()
        if time.monotonic() - self.synced >= self.SYNC_SECONDS:
            self._sync()

    def _sync(self) -> None:
        self.sync()
        self.synced = time.monotonic()

    def on_epoch_end(self, epoch, row, timing):
        import tensorflow as tf

        with self.train.as_default():
            for tag, value in (("epoch_loss", row["loss"]), ("epoch_accuracy", row["accuracy"]),
                               ("epoch_learning_rate", row["learning_rate"]),
                               ("epoch_examples_per_second", timing["examples_per_second"])):
                tf.summary.scalar(tag, value, step=epoch + 1)
        with self.validation.as_default():
            tf.summary.scalar("epoch_loss", row["val_loss"], step=epoch + 1)
            tf.summary.scalar("epoch_accuracy", row["val_accuracy"], step=epoch + 1)
        self.train.flush()
        self.validation.flush()
        self._sync()  # live progress in (Vertex) TensorBoard reading a gs:// log dir

    def image(self, tag: str, png: bytes, step: int) -> None:
        import tensorflow as tf

        with self.validation.as_default():
            tf.summary.image(tag, tf.image.decode_png(png)[tf.newaxis], step=step)
        self.validation.flush()
        self.sync()


class Hypertune(Observer):
    """Reports val_accuracy every epoch through cloudml-hypertune (Vertex AI's tuning service). One
    instance per run: version 0.1.0.dev6 rewrites its whole file from memory on every report."""

    def __init__(self):
        from trainer.errors import TrainerError

        try:
            import hypertune
        except ModuleNotFoundError:
            raise TrainerError("--hypertune (or CLOUD_ML_HP_METRIC_FILE) needs cloudml-hypertune: "
                               "pip install 'mnist-trainer[cloud]'") from None
        self.reporter = hypertune.HyperTune()

    def on_epoch_end(self, epoch, row, timing):
        self.reporter.report_hyperparameter_tuning_metric(
            hyperparameter_metric_tag="val_accuracy", metric_value=row["val_accuracy"], global_step=epoch + 1)


class KerasCallbacks(Observer):
    """Keras callbacks driven as `fit` would (KerasTuner relies on set_model and on_epoch_end with
    `val_accuracy`): on_train_batch_end after each multi-step call with logs `steps_done` and
    `steps_per_epoch`; on_epoch_end with the history row plus `seconds` of training."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def on_train_begin(self, model, initial_epoch):
        for callback in self.callbacks:
            callback.set_model(model)
            callback.on_train_begin()

    def on_epoch_begin(self, epoch):
        for callback in self.callbacks:
            callback.on_epoch_begin(epoch)

    def on_train_steps(self, epoch, steps_done, steps_per_epoch, mean_loss):
        for callback in self.callbacks:
            logs = dict(steps_done=steps_done, steps_per_epoch=steps_per_epoch)
            callback.on_train_batch_end(steps_done - 1, logs=logs)

    def on_epoch_end(self, epoch, row, timing):
        for callback in self.callbacks:
            callback.on_epoch_end(epoch, logs={**row, "seconds": timing["seconds"]})

    def on_train_end(self):
        for callback in self.callbacks:
            callback.on_train_end()


class Profiler(Observer):
    """--profile-steps START,END: a TensorFlow profile of those (1-based, global) steps in the log dir."""

    def __init__(self, steps, log_dir: str):
        self.steps, self.log_dir, self.running = steps, log_dir, False

    def clip_chunk(self, global_step, chunk):
        """Shorten a multi-step call so that the profile starts and stops exactly at START and END."""
        for boundary in (self.steps or ()):
            edge = boundary - 1 if boundary == self.steps[0] else boundary
            if global_step < edge < global_step + chunk:
                chunk = edge - global_step
        return chunk

    def on_chunk_begin(self, global_step):
        if self.steps and not self.running and self.steps[0] <= global_step + 1 <= self.steps[1]:
            import tensorflow as tf
            tf.profiler.experimental.start(self.log_dir)
            self.running = True

    def on_chunk_end(self, global_step):
        if self.running and global_step >= self.steps[1]:
            import tensorflow as tf
            tf.profiler.experimental.stop()
            self.running = False

    def on_train_end(self):
        self.on_chunk_end(float("inf"))  # END beyond the last step: stop with the training


def for_run(config, log_dir: str, sync_logs, learning_rate_at, log, extra: Iterable[Observer] = ()):
    """A run's observers, in the order they are told: TensorBoard summaries, the console, hypertune when
    asked, the profiler, then `extra` (Keras callbacks, a tuner's). Returns (summaries, all of them)."""
    summaries = Summaries(log_dir, config.to_dict(), sync_logs, learning_rate_at)
    observers = Observers([summaries, Console(config.epochs, log), *([Hypertune()] if config.hypertune else []),
                           Profiler(config.profile_steps, log_dir), *extra])
    return summaries, observers
