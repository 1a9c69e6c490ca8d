"""The story of a run: strategy -> outputs -> data -> model -> epochs -> test evaluation -> exports.

`train_and_evaluate(config)` is the whole run. The pieces live apart: step functions and one epoch's loop
in `trainer.steps`, resume rules and saves in `trainer.checkpoints`, everything that reacts to the loop
(console, TensorBoard, hypertune, Keras callbacks, profiler) in `trainer.observers`, the stop signal in
`trainer.stopping`, the end of a run in `trainer.finish`. Tests pass `splits` and `resolved` to bypass
loading and strategy resolution; other code passes `observers`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Sequence

from trainer import data as data_lib
from trainer import finish
from trainer import model as model_lib
from trainer import observers as observers_lib
from trainer import steps as steps_lib
from trainer.checkpoints import Checkpoints
from trainer.config import Config
from trainer.errors import Interrupted, TrainerError, TrainingDiverged, require_tensorflow
from trainer.outputs import Outputs, prepare_outputs
from trainer.stopping import StopSignal


@dataclasses.dataclass(frozen=True)
class Extras:
    """What code that drives the trainer may add: observers (after the trainer's own), starting weights
    (Hyperband continues earlier trials), and for search trials no test evaluation or export (the test
    split is kept for the final retraining)."""

    observers: Sequence[observers_lib.Observer] = ()
    initial_weights: Optional[list] = None
    evaluate_and_export: bool = True
    jit_compile: Optional[bool] = None  # the resolved --jit-compile


def train_and_evaluate(config: Config, splits: Optional[data_lib.Splits] = None, resolved=None, log=print,
                       environ=None, observers: Sequence[observers_lib.Observer] = (),
                       initial_weights: Optional[list] = None, evaluate_and_export: bool = True) -> dict:
    """Train, evaluate on the test split once, export; returns the metrics written to metrics.json.

    `environ` (default os.environ) supplies TF_CONFIG, CLUSTER_SPEC and TPU_NAME; tests may pass `splits`
    and an already `resolved` strategy instead. Without `evaluate_and_export`, returns the history and the
    best validation figures.
    """
    require_tensorflow()
    import keras

    known_size = data_lib.known_image_size(config.dataset)
    if known_size is not None:  # a model too deep for a known image size fails before any I/O-heavy work
        model_lib.feature_map_sizes(config.filters, known_size, convs_per_block=config.convs_per_block,
                                    padding=config.padding)
    from trainer import distribute

    if resolved is None:
        resolved = distribute.set_up(config, os.environ if environ is None else environ, log)
    policy, jit_compile = distribute.precision_and_compilation(config, resolved)
    extras = Extras(tuple(observers), initial_weights, evaluate_and_export, jit_compile)
    keras.mixed_precision.set_global_policy(policy)
    try:
        return _run(config, splits, resolved, policy, log, extras)
    finally:
        keras.mixed_precision.set_global_policy("float32")  # process-wide: leave it as found


def _run(config: Config, splits, resolved, policy: str, log, extras: Extras) -> dict:
    if config.batch_size % resolved.num_replicas:
        raise TrainerError(f"--batch-size {config.batch_size} is not divisible by the {resolved.num_replicas} "
                           f"replicas of the {resolved.name} strategy")
    outputs = prepare_outputs(config, resolved.is_chief, resolved.task_id)
    try:
        return _train(config, splits, resolved, policy, log, outputs, extras)
    except BaseException:
        outputs.close()
        outputs.remove_unused_folders()  # a run that failed before writing anything leaves no empty folders
        raise
    finally:
        outputs.close()


def _train(config: Config, splits, resolved, policy: str, log, outputs: Outputs, extras: Extras) -> dict:
    """The story of a run, once the outputs are ready."""
    splits = splits or data_lib.load_splits(config)
    shape = splits.shape
    # a model too deep for the data's images, or too large for the machine, fails before building it
    model_lib.check_fits(config, resolved.num_replicas, shape)
    steps = data_lib.steps_per_epoch(len(splits.train[0]), config.batch_size)
    if steps < 1:
        raise TrainerError(f"--batch-size {config.batch_size} is larger than the {len(splits.train[0])} training "
                           "examples; lower it or raise --train-limit")
    if config.profile_steps and config.profile_steps[0] > steps * config.epochs:
        raise TrainerError(f"--profile-steps {config.profile_steps[0]},{config.profile_steps[1]}: this run has only "
                           f"{steps * config.epochs} steps ({config.epochs} epoch(s) of {steps}), so nothing would be "
                           "profiled; choose steps within the run")
    log(f"dataset {splits.name}: {shape.text()}; {len(splits.train[0])} train, {len(splits.validation[0])} "
        f"validation, {len(splits.test[0])} test examples; strategy {resolved.name} with {resolved.num_replicas} "
        f"replica(s){', ' + policy if policy != 'float32' else ''}{', XLA' if extras.jit_compile else ''}; "
        f"{steps} steps of {config.batch_size} per epoch")

    state = steps_lib.build_state(config, resolved.strategy, policy, steps, extras.initial_weights, shape)
    log(outputs.write_model_summary(model_lib.summary(state.model)))
    checkpoints = Checkpoints(config, outputs, state.checkpoint, steps, state.restorable, state.stash)
    history = checkpoints.restore()
    initial_epoch, initial_step = checkpoints.position
    if initial_step and state.stash is not None:
        state.stash.hand_out()  # every replica's own batch-norm statistics, as at the stop
    if initial_epoch or initial_step:
        log(f"resuming from {config.checkpoint_dir} at epoch {initial_epoch + 1}, step {initial_step}")
    predict = steps_lib.make_predict_function(state.model, extras.jit_compile)
    learning_rate_at = steps_lib.learning_rate_at(config, steps)
    summaries, observers = observers_lib.for_run(config, outputs.log_dir, outputs.sync_logs, learning_rate_at, log,
                                                 extras.observers)
    try:
        trained = _fit(config, splits, resolved, state, checkpoints, history, observers, predict, extras.jit_compile,
                       learning_rate_at)
    except steps_lib.Diverged as diverged:
        raise TrainingDiverged(f"training diverged: {diverged}; nothing was exported and the last good checkpoint "
                               f"is kept ({checkpoints.latest or 'none yet'}); the likely cause is a learning rate "
                               f"too high for this model (--learning-rate {config.learning_rate:g}): lower it and "
                               "rerun with --no-resume", str(diverged)) from None
    except Exception as error:
        _raise_if_peer_lost(error, resolved, checkpoints)
        raise
    if not extras.evaluate_and_export:
        best = max(history, key=lambda row: row["val_accuracy"]) if history else {}
        return dict(history=history, val_accuracy=best.get("val_accuracy"), val_loss=best.get("val_loss"),
                    train_seconds=trained["seconds"])
    position = dict(epochs_completed=checkpoints.position[0], initial_epoch=initial_epoch, initial_step=initial_step)
    return _evaluate_and_export(config, splits, resolved, state, predict, history, position, trained, outputs,
                                summaries, log)


def _raise_if_peer_lost(error: BaseException, resolved, checkpoints: Checkpoints) -> None:
    """In a cluster, a collective that failed because another worker died becomes one line naming it.
    TensorFlow notices within about 10 s (its coordination service's heartbeat timeout) or at once when the
    peer's connection is reset; every collective of this process fails from then on, so it must exit."""
    if resolved.num_workers < 2:
        return
    from trainer.distribute import lost_peer

    # writing() turns a failed checkpoint save into a TrainerError; the TensorFlow error is its context
    for candidate in (error, error.__context__):
        lost = lost_peer(candidate, (resolved.task_type, resolved.task_id)) if candidate is not None else None
        if lost:
            raise TrainerError(f"lost a peer: {lost} (it crashed, was killed or preempted), so this worker stops "
                               f"too; rerun the whole cluster (Vertex AI restarts the replica) to resume from "
                               f"{checkpoints.latest or 'the start (no checkpoint yet)'}") from None


def _fit(config: Config, splits, resolved, state, checkpoints, history, observers, predict, jit_compile,
         learning_rate_at) -> dict:
    """The epochs: train, validate, save, tell the observers; raises Interrupted after a stop signal."""
    initial_epoch, initial_step = checkpoints.position
    steps = checkpoints.steps_per_epoch
    train_steps, regularisation = None, None
    sync_statistics = steps_lib.make_statistics_sync(resolved.strategy, state.model)
    train_tensors = data_lib.TrainTensors(*splits.train)
    trained: Dict[str, Any] = dict(seconds=0.0, examples=0, val_predictions=None)
    observers.on_train_begin(state.model, initial_epoch)
    epochs = [(epoch, data_lib.epoch_augment(config, splits, epoch)) for epoch in range(initial_epoch, config.epochs)]
    iterator = iter(resolved.strategy.distribute_datasets_from_function(  # one iterator for all the epochs
        lambda context: data_lib.run_dataset(train_tensors, config.batch_size, config.seed, epochs, context,
                                             initial_step))) if epochs else None
    with StopSignal(resolved.strategy, resolved.num_workers) as stop:
        for epoch in range(initial_epoch, config.epochs):
            first = initial_step if epoch == initial_epoch else 0
            if config.regularisation_at(epoch) != regularisation:  # the first epoch, and where the phase changes
                regularisation = dropout, label_smoothing, weight_decay = config.regularisation_at(epoch)
                steps_lib.set_regularisation(state.model, state.optimizer, dropout, weight_decay)
                train_steps = steps_lib.make_train_function(resolved.strategy, state.model, state.optimizer,
                                                            config.batch_size, jit_compile, label_smoothing)
            observers.on_epoch_begin(epoch)
            carried = checkpoints.carried if first else None  # the figures of the steps before a mid-epoch stop
            result = steps_lib.run_epoch(train_steps, iterator, epoch, first, steps, config.steps_per_execution,
                                         config.batch_size, observers, stop, carried)
            observers.on_steps_end(epoch)
            examples = result.examples(config.batch_size)  # the whole epoch's, across a mid-epoch resume
            trained["seconds"] += result.run_seconds
            trained["examples"] += result.run_examples(config.batch_size)
            if result.stopped and result.steps_done < steps:  # each replica's statistics kept as they are
                saved = checkpoints.save_mid_epoch(epoch, result.steps_done, result.partial_sums(config.batch_size))
                raise Interrupted(stop.exit_code, f"stopped by {stop.reason} at epoch {epoch + 1}, step "
                                                  f"{result.steps_done}/{steps}; checkpoint {saved}; rerun the same "
                                                  "command to resume")
            if sync_statistics is not None:  # every replica the same model before validation and saving
                sync_statistics()
            val_loss, val_accuracy, trained["val_predictions"] = steps_lib.evaluate(predict, *splits.validation)
            steps_lib.check_loss(val_loss, "validation loss", f"the end of epoch {epoch + 1}")
            row = dict(epoch=epoch + 1, loss=result.loss_sum / examples, accuracy=result.correct / examples,
                       val_loss=val_loss, val_accuracy=val_accuracy,
                       learning_rate=learning_rate_at(epoch * steps))  # the rate the epoch started with
            history.append(row)
            checkpoints.save_epoch(epoch, history)
            observers.on_epoch_end(epoch, row, dict(examples_per_second=examples / result.seconds,
                                                    seconds=result.seconds))  # the epoch line: once it is saved
            # The signal came during the epoch's last call, or during its validation (a vote in a cluster:
            # every worker reaches this point): the epoch is saved, stop here.
            if result.stopped or stop.should_stop():
                raise Interrupted(stop.exit_code, f"stopped by {stop.reason} after epoch {epoch + 1}; checkpoint "
                                                  f"{checkpoints.latest}; rerun the same command to resume")
    observers.on_train_end()
    return trained


def _evaluate_and_export(config: Config, splits, resolved, state, predict, history, position: dict, trained: dict,
                         outputs: Outputs, summaries, log) -> dict:
    test_loss, test_accuracy, test_predictions = steps_lib.evaluate(predict, *splits.test)
    log(f"test_loss {test_loss:.4f}  test_accuracy {test_accuracy:.4f}  ({len(splits.test[0])} test examples)")
    log(f"weights checksum {finish.weights_checksum(state.model)}")
    metrics = finish.final_metrics(config, resolved, splits, history, (test_loss, test_accuracy), position,
                                   trained["seconds"], trained["examples"])
    val_predictions = trained["val_predictions"]
    if val_predictions is None:  # nothing left to train after a resume: predict once here
        val_predictions = steps_lib.evaluate(predict, *splits.validation)[2]
    finish.write_outputs(config, outputs, state.model, splits, metrics,
                         dict(validation=val_predictions, test=test_predictions), summaries, log)
    return metrics
