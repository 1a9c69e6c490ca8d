"""The training loop: a custom loop under a tf.distribute strategy, with metrics, TensorBoard and checkpoints.

`train_and_evaluate(config)` is the whole run: strategy -> output folders -> data -> model -> epochs ->
test evaluation -> exports. A custom loop (`strategy.run`, `tf.nn.compute_average_loss`) rather than
`model.fit`, because Keras 3 `fit` is broken under MultiWorkerMirroredStrategy; the same loop serves
every strategy. Tests pass `splits` and `resolved` to bypass loading and strategy resolution.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import List, Optional, Sequence

import numpy as np

from trainer import data as data_lib
from trainer import export
from trainer.config import Config
from trainer.errors import Interrupted, TrainerError, require_tensorflow
from trainer.outputs import Outputs, prepare_outputs

# Settings a checkpoint must share with the run that resumes from it (epochs may grow; hardware may change).
RESUME_KEYS = ("dataset", "train_limit", "validation_fraction", "seed", "filters", "dense_units", "dropout",
               "batch_size", "learning_rate", "convs_per_block", "padding", "batch_norm", "lr_schedule",
               "warmup_epochs", "augment")
HISTORY_FILE = "history.json"
RUN_CONFIG_FILE = "run_config.json"
EVAL_BATCH_SIZE = 1000
DIVERGED_LOSS = 100.0


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checks it between steps, saves and exits 143 / 130."""

    def __init__(self):
        self.exit_code: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
                self._previous[signum] = signal.signal(signum, self._handler(code))
        return self

    def _handler(self, code):
        def handle(signum, frame):
            self.exit_code = code
        return handle

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class Profiler:
    """--profile-steps START,END: a TensorFlow profile of those (1-based, global) steps in the log dir."""

    def __init__(self, steps, log_dir: str):
        self.steps, self.log_dir, self.running = steps, log_dir, False

    def clip(self, completed: int, chunk: int) -> int:
        """Shorten a multi-step chunk so that the profile starts and stops exactly at START and END."""
        for boundary in (self.steps or ()):
            edge = boundary - 1 if boundary == self.steps[0] else boundary
            if completed < edge < completed + chunk:
                chunk = edge - completed
        return chunk

    def before(self, completed: int):
        if self.steps and not self.running and self.steps[0] <= completed + 1 <= self.steps[1]:
            import tensorflow as tf
            tf.profiler.experimental.start(self.log_dir)
            self.running = True

    def after(self, completed: int):
        if self.running and completed >= self.steps[1]:
            import tensorflow as tf
            tf.profiler.experimental.stop()
            self.running = False


class Progress:
    """A one-line progress bar, only when stdout is a terminal (it is erased before the epoch line)."""

    def __init__(self, epoch: int, epochs: int, steps: int):
        self.enabled = sys.stdout.isatty()
        self.epoch, self.epochs, self.steps = epoch, epochs, steps

    def update(self, done: int, loss: float):
        if self.enabled:
            width = 30
            filled = int(width * done / max(self.steps, 1))
            sys.stdout.write(f"\repoch {self.epoch}/{self.epochs} [{'=' * filled}{'.' * (width - filled)}] "
                             f"{done}/{self.steps} loss {loss:.4f}")
            sys.stdout.flush()

    def close(self):
        if self.enabled:
            sys.stdout.write("\r" + " " * 80 + "\r")
            sys.stdout.flush()


def _json_load(path: str, default):
    if os.path.isfile(path):
        with open(path) as handle:
            return json.load(handle)
    return default


def _resume_settings(config: Config) -> dict:
    values = config.to_dict()
    return {key: values[key] for key in RESUME_KEYS}


def _clear_checkpoints(checkpoint_dir: str) -> None:
    for name in os.listdir(checkpoint_dir):
        if name.startswith("ckpt-") or name in ("checkpoint", HISTORY_FILE, RUN_CONFIG_FILE):
            os.remove(os.path.join(checkpoint_dir, name))


def _restore(config: Config, outputs: Outputs, checkpoint) -> List[dict]:
    """Resume from the latest checkpoint when allowed; refuse one made with other model or data settings.

    Every worker restores from the chief's folder (`config.checkpoint_dir`), so all resume from the same
    step; non-chief workers then save to their own scratch folders.
    """
    import tensorflow as tf

    source = outputs.restore_dir
    latest = tf.train.latest_checkpoint(source) if source and os.path.isdir(source) else None
    if not config.resume and outputs.is_chief:
        _clear_checkpoints(outputs.checkpoint_dir)
    if latest:
        saved = _json_load(os.path.join(source, RUN_CONFIG_FILE), {})
        wanted = _resume_settings(config)
        differ = [key for key in RESUME_KEYS if key in saved and saved[key] != wanted[key]]
        if differ:
            changes = ", ".join(f"{key} {saved[key]!r} -> {wanted[key]!r}" for key in differ)
            raise TrainerError(f"--checkpoint-dir {config.checkpoint_dir}: holds a checkpoint of a run with other settings "
                               f"({changes}); pass --no-resume to start fresh or use another --job-dir")
        checkpoint.restore(latest).assert_existing_objects_matched()
        history = _json_load(os.path.join(source, HISTORY_FILE), [])
        return [row for row in history if row["epoch"] <= int(checkpoint.epoch.numpy())]
    if outputs.is_chief:
        export.write_json_atomic(os.path.join(outputs.checkpoint_dir, RUN_CONFIG_FILE), _resume_settings(config))
        outputs.sync_checkpoints()  # with --no-resume this also removes a gs:// folder's old checkpoints
    return []


def learning_rate_schedule(config: Config, steps_per_epoch: int):
    """A constant rate, or linear warm-up then cosine decay to zero over the whole run (per step)."""
    if config.lr_schedule == "constant" and not config.warmup_epochs:
        return config.learning_rate
    import keras

    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.lr_schedule == "constant":
        return keras.optimizers.schedules.PiecewiseConstantDecay([warmup], [config.learning_rate / 10,
                                                                            config.learning_rate])
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate / 10 if warmup else config.learning_rate,
        decay_steps=max(1, total - warmup), alpha=0.0,
        warmup_target=config.learning_rate if warmup else None, warmup_steps=warmup)


def hypertune_reporter(config: Config):
    """cloudml-hypertune's reporter when Vertex AI's tuning service drives the run (one instance per run:
    version 0.1.0.dev6 rewrites its whole file from memory on every report)."""
    if not config.hypertune:
        return None
    try:
        import hypertune
    except ModuleNotFoundError:
        raise TrainerError("--hypertune (or CLOUD_ML_HP_METRIC_FILE) needs cloudml-hypertune: "
                           "pip install 'mnist-trainer[cloud]'") from None
    return hypertune.HyperTune()


def weights_checksum(model) -> str:
    """A short digest of every weight: equal on all workers of a synchronous run, printed at the end."""
    import hashlib

    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.asarray(weight.numpy(), dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def _check_finite(value: float, what: str, where: str, config: Config, manager) -> None:
    """A diverged mean loss ends the run (exit 1) before anything is saved or exported: the weights are
    lost, and a model that answers one class for everything must never replace a good one. Diverged means
    NaN, infinite, or above DIVERGED_LOSS: Keras clips probabilities to [1e-7, 1], so an honest
    cross-entropy never exceeds -ln(1e-7) = 16.1 per example."""
    if math.isfinite(value) and value <= DIVERGED_LOSS:
        return
    kept = manager.latest_checkpoint or "none yet"
    raise TrainerError(f"training diverged: {what} {value:.4g} at {where}; nothing was "
                       f"exported and the last good checkpoint is kept ({kept}); the likely cause is a learning rate "
                       f"too high for this model (--learning-rate {config.learning_rate:g}): lower it and rerun with "
                       "--no-resume")


def _epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.4f}  accuracy {row['accuracy']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_accuracy {row['val_accuracy']:.4f}  "
            f"{row['examples_per_second']:,.0f} examples/s  {row['seconds']:.1f} s")


def _short_name(dataset: str) -> str:
    """`idx:/usr/share/datasets/fashion-mnist` -> `fashion-mnist`, for plot titles."""
    return os.path.basename(dataset[len("idx:"):].rstrip("/")) if dataset.startswith("idx:") else dataset


def evaluate(predict, images: np.ndarray, labels: np.ndarray):
    """(loss, accuracy, predicted classes) over every example, computed locally and exactly."""
    probabilities = np.concatenate([predict(batch).numpy() for batch, _ in
                                    data_lib.eval_dataset(images, labels, EVAL_BATCH_SIZE)])
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    predictions = probabilities.argmax(axis=-1)
    return float(-np.log(picked).mean()), float((predictions == labels).mean()), predictions


@dataclasses.dataclass
class RunHooks:
    """Extras for runs driven by other code: Keras callbacks (on_epoch_begin; on_train_batch_end after each
    multi-step call, logs `steps_done` and `steps_per_epoch`; on_epoch_end with the history row plus
    `seconds` of training, which includes the time spent in the callbacks), starting weights (Hyperband
    continues earlier trials), and for search trials no test evaluation or export (the test split is kept
    for the final retraining)."""

    callbacks: Sequence = ()
    initial_weights: Optional[list] = None
    evaluate_and_export: bool = True


def train_and_evaluate(config: Config, splits: Optional[data_lib.Splits] = None, resolved=None,
                       log=print, environ=None, hooks: Optional[RunHooks] = None) -> dict:
    """Train, evaluate on the test split once, export; returns the metrics written to metrics.json.

    `environ` (default os.environ) supplies TF_CONFIG, CLUSTER_SPEC and TPU_NAME; tests may pass `splits`
    and an already `resolved` strategy instead. With `hooks` that skip evaluation, returns the history and
    the best validation figures.
    """
    require_tensorflow()
    import keras

    from trainer.model import check_fits

    check_fits(config)  # a model too deep for 28x28 fails before any I/O-heavy work
    if resolved is None:
        from trainer.distribute import configure_host, resolve_strategy

        configure_host(config.cpu_devices, config.intra_op_threads, config.inter_op_threads)
        resolved = resolve_strategy(config.strategy, os.environ if environ is None else environ, config.tpu)
    from trainer.distribute import mixed_precision_policy

    policy = mixed_precision_policy(config.mixed_precision, resolved)
    keras.mixed_precision.set_global_policy(policy)
    try:
        return _run(config, splits, resolved, policy, log, hooks)
    finally:
        keras.mixed_precision.set_global_policy("float32")  # process-wide: leave it as found


def _run(config: Config, splits, resolved, policy: str, log, hooks) -> dict:
    if resolved.name == "tpu" and config.augment != "none":
        # Keras' RandomTranslation/RandomFlip use ImageProjectiveTransformV3, which XLA (every TPU step)
        # cannot compile in TensorFlow 2.20 (tensorflow/tensorflow#100865): refuse before any work.
        raise TrainerError(f"--augment {config.augment} cannot run on a TPU (XLA has no kernel for the image "
                           "transform it uses in TensorFlow 2.20); pass --augment none")
    if config.batch_size % resolved.num_replicas:
        raise TrainerError(f"--batch-size {config.batch_size} is not divisible by the {resolved.num_replicas} "
                           f"replicas of the {resolved.name} strategy")
    outputs = prepare_outputs(config, resolved.is_chief, resolved.task_id)
    try:
        return _train(config, splits, resolved, policy, log, outputs, hooks)
    finally:
        outputs.close()


def _train(config: Config, splits, resolved, policy: str, log, outputs: Outputs, hooks: Optional[RunHooks]) -> dict:
    import keras
    import tensorflow as tf

    from trainer.model import batch_norm_momentum, build_model

    strategy = resolved.strategy
    splits = splits or data_lib.load_splits(config)
    train_images, train_labels = splits.train
    steps = data_lib.steps_per_epoch(len(train_images), config.batch_size)
    if steps < 1:
        raise TrainerError(f"--batch-size {config.batch_size} is larger than the {len(train_images)} training "
                           "examples; lower it or raise --train-limit")
    log(f"dataset {splits.name}: {len(train_images)} train, {len(splits.validation[0])} validation, "
        f"{len(splits.test[0])} test examples; strategy {resolved.name} with {resolved.num_replicas} "
        f"replica(s){', ' + policy if policy != 'float32' else ''}; {steps} steps of {config.batch_size} per epoch")

    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = build_model(config, batch_norm_momentum(steps))
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate_schedule(config, steps))
        if policy == "mixed_float16":  # float16 gradients underflow without loss scaling
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        # Built inside the scope before the first step, or a 2-replica MirroredStrategy fails (DESIGN.md).
        optimizer.build(model.trainable_variables)
        if hooks and hooks.initial_weights is not None:
            model.set_weights(hooks.initial_weights)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var, step=step_var)
    history = _restore(config, outputs, checkpoint)
    manager = tf.train.CheckpointManager(checkpoint, outputs.checkpoint_dir, max_to_keep=2)
    initial_epoch, initial_step = int(epoch_var.numpy()), int(step_var.numpy())
    if initial_epoch or initial_step:
        log(f"resuming from {config.checkpoint_dir} at epoch {initial_epoch + 1}, step {initial_step}")

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=config.batch_size)
            scaled_loss = optimizer.scale_loss(loss)  # unchanged unless fp16 loss scaling is on
        gradients = tape.gradient(scaled_loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        correct = tf.cast(tf.equal(tf.argmax(probabilities, axis=-1, output_type=tf.int32), labels), tf.float32)
        return tf.reduce_sum(per_example), tf.reduce_sum(correct)

    @tf.function
    def train_steps(iterator, num_steps):
        loss_sum, correct = tf.constant(0.0), tf.constant(0.0)
        for _ in tf.range(num_steps):
            per_replica_loss, per_replica_correct = strategy.run(replica_step, args=next(iterator))
            loss_sum += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)
            correct += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_correct, axis=None)
        return loss_sum, correct

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)], autograph=False)
    def predict(images):
        return tf.cast(model(images, training=False), tf.float32)

    @tf.function(autograph=False)
    def workers_stopping(local_flag):
        """How many replicas saw a stop signal: all workers must agree on the step they stop at."""
        flags = strategy.run(lambda: tf.identity(local_flag))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, flags, axis=None)

    def should_stop() -> bool:
        local = stop.exit_code is not None
        if resolved.num_workers > 1:
            return float(workers_stopping(tf.constant(1.0 if local else 0.0))) > 0
        return local

    train_writer = tf.summary.create_file_writer(os.path.join(outputs.log_dir, "train"))
    validation_writer = tf.summary.create_file_writer(os.path.join(outputs.log_dir, "validation"))
    with train_writer.as_default():
        config_table = "\n".join(f"| {key} | {value} |" for key, value in sorted(config.to_dict().items()))
        tf.summary.text("config", "| setting | value |\n|---|---|\n" + config_table, step=initial_epoch)

    train_seconds, examples_trained, val_predictions = 0.0, 0, None
    train_tensors = data_lib.TrainTensors(train_images, train_labels)
    callbacks = list(hooks.callbacks) if hooks else []
    for callback in callbacks:
        callback.set_model(model)
        callback.on_train_begin()
    reporter = hypertune_reporter(config)
    profiler = Profiler(config.profile_steps, outputs.log_dir)
    with StopRequest() as stop:
        for epoch in range(initial_epoch, config.epochs):
            skip = initial_step if epoch == initial_epoch else 0
            distributed = strategy.distribute_datasets_from_function(
                lambda context, epoch=epoch, skip=skip: data_lib.train_dataset(
                    train_tensors, config.batch_size, config.seed, epoch, context, skip))
            iterator = iter(distributed)
            progress = Progress(epoch + 1, config.epochs, steps)
            done, loss_sum, correct, stopping = skip, 0.0, 0.0, False
            for callback in callbacks:
                callback.on_epoch_begin(epoch)
            started = time.perf_counter()
            while done < steps:
                chunk = profiler.clip(epoch * steps + done, min(config.steps_per_execution, steps - done))
                profiler.before(epoch * steps + done)
                chunk_loss, chunk_correct = train_steps(iterator, tf.constant(chunk))
                profiler.after(epoch * steps + done + chunk)
                _check_finite(float(chunk_loss) / (chunk * config.batch_size), "training loss",
                              f"epoch {epoch + 1}, steps {done + 1}-{done + chunk} of {steps}", config, manager)
                loss_sum, correct, done = loss_sum + float(chunk_loss), correct + float(chunk_correct), done + chunk
                progress.update(done, loss_sum / ((done - skip) * config.batch_size))
                for callback in callbacks:  # per call of --steps-per-execution steps, as Keras does
                    callback.on_train_batch_end(done - 1, logs=dict(steps_done=done, steps_per_epoch=steps))
                stopping = should_stop()
                if stopping:
                    stop.exit_code = stop.exit_code or 143  # a peer worker was told to stop
                    break
            seconds = time.perf_counter() - started
            progress.close()
            examples = (done - skip) * config.batch_size
            train_seconds += seconds
            examples_trained += examples
            if stopping and done < steps:
                epoch_var.assign(epoch)
                step_var.assign(done)
                saved = manager.save(checkpoint_number=epoch * steps + done)
                outputs.sync_checkpoints()
                outputs.sync_logs()
                reason = "SIGTERM" if stop.exit_code == 143 else "interrupt"
                raise Interrupted(stop.exit_code, f"stopped by {reason} at epoch {epoch + 1}, step {done}/{steps}; "
                                                  f"checkpoint {saved}; rerun the same command to resume")

            val_loss, val_accuracy, val_predictions = evaluate(predict, *splits.validation)
            _check_finite(val_loss, "validation loss", f"the end of epoch {epoch + 1}", config, manager)
            row = dict(epoch=epoch + 1, loss=loss_sum / examples, accuracy=correct / examples,
                       val_loss=val_loss, val_accuracy=val_accuracy,
                       learning_rate=float(optimizer.learning_rate.numpy()))
            timing = dict(examples_per_second=examples / seconds, seconds=seconds)
            with train_writer.as_default():
                for tag, value in (("epoch_loss", row["loss"]), ("epoch_accuracy", row["accuracy"]),
                                   ("epoch_learning_rate", row["learning_rate"]),
                                   ("epoch_examples_per_second", timing["examples_per_second"])):
                    tf.summary.scalar(tag, value, step=epoch + 1)
            with validation_writer.as_default():
                tf.summary.scalar("epoch_loss", val_loss, step=epoch + 1)
                tf.summary.scalar("epoch_accuracy", val_accuracy, step=epoch + 1)
            train_writer.flush()
            validation_writer.flush()
            outputs.sync_logs()  # live progress in (Vertex) TensorBoard reading the gs:// log dir
            history.append(row)
            epoch_var.assign(epoch + 1)
            step_var.assign(0)
            manager.save(checkpoint_number=(epoch + 1) * steps)
            export.write_json_atomic(os.path.join(outputs.checkpoint_dir, HISTORY_FILE), history)
            outputs.sync_checkpoints()
            log(_epoch_line({**row, **timing}, config.epochs))  # printed once the epoch is safely saved
            if reporter:
                reporter.report_hyperparameter_tuning_metric(
                    hyperparameter_metric_tag="val_accuracy", metric_value=val_accuracy, global_step=epoch + 1)
            for callback in callbacks:
                callback.on_epoch_end(epoch, logs={**row, "seconds": seconds})
            if stopping:  # the signal came during the epoch's last chunk: saved, stop here
                reason = "SIGTERM" if stop.exit_code == 143 else "interrupt"
                raise Interrupted(stop.exit_code, f"stopped by {reason} after epoch {epoch + 1}; checkpoint "
                                                  f"{manager.latest_checkpoint}; rerun the same command to resume")

    profiler.after(float("inf"))  # END beyond the last step: stop with the training
    for callback in callbacks:
        callback.on_train_end()
    if hooks and not hooks.evaluate_and_export:
        best = max(history, key=lambda row: row["val_accuracy"]) if history else {}
        return dict(history=history, val_accuracy=best.get("val_accuracy"), val_loss=best.get("val_loss"),
                    train_seconds=train_seconds)
    test_loss, test_accuracy, test_predictions = evaluate(predict, *splits.test)
    log(f"test_loss {test_loss:.4f}  test_accuracy {test_accuracy:.4f}  ({len(splits.test[0])} test examples)")
    log(f"weights checksum {weights_checksum(model)}")
    metrics = dict(
        test_accuracy=test_accuracy, test_loss=test_loss,
        validation_accuracy=history[-1]["val_accuracy"] if history else None,
        validation_loss=history[-1]["val_loss"] if history else None,
        epochs_completed=int(epoch_var.numpy()), initial_epoch=initial_epoch, initial_step=initial_step,
        train_seconds=train_seconds,
        train_examples_per_second=examples_trained / train_seconds if train_seconds else None,
        num_replicas=resolved.num_replicas, strategy=resolved.name, dataset=splits.name,
        num_examples=dict(train=len(train_images), validation=len(splits.validation[0]), test=len(splits.test[0])),
        class_names=list(splits.class_names), history=history, config=config.to_dict(),
        tensorflow_version=tf.__version__,
    )

    val_images, val_labels = splits.validation
    if val_predictions is None:  # nothing left to train after a resume: predict once here
        _, _, val_predictions = evaluate(predict, val_images, val_labels)
    misclassified = export.misclassified_png(val_images, val_labels, val_predictions, splits.class_names)
    with validation_writer.as_default():
        tf.summary.image("misclassified", tf.image.decode_png(misclassified)[tf.newaxis], step=config.epochs)
    validation_writer.flush()
    outputs.sync_logs()
    # Every worker exports (saving may involve collectives); only the chief's lands in the real model dir.
    export.export_model(model, outputs.model_dir, splits.class_names)
    if outputs.is_chief:
        outputs.publish_model()
        pngs = export.curve_pngs(history)
        matrix = export.confusion_matrix(splits.test[1], test_predictions)
        pngs["confusion_matrix.png"] = export.confusion_png(
            matrix, splits.class_names, f"{_short_name(splits.name)} test set: accuracy {test_accuracy:.4f}")
        pngs["misclassified.png"] = misclassified
        export.write_plots(outputs.plots_dir, pngs)
        export.write_json_atomic(outputs.metrics_path, metrics)
        outputs.publish_job_files()
        log(f"wrote {outputs.shown('model_dir')}, metrics.json and plots/ in {outputs.shown('job_dir')}, "
            f"logs in {outputs.shown('log_dir')}")
    return metrics
