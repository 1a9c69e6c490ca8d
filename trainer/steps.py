"""Training state and step functions: what runs on the devices, and one epoch's loop of multi-step calls.

`build_state` makes the model, optimizer and checkpointed counters inside the strategy's scope;
`make_train_function` returns the distributed multi-step train function (a custom step with
`strategy.run` and `tf.nn.compute_average_loss`, because Keras 3 `fit` is broken under
MultiWorkerMirroredStrategy; the same step serves every strategy); `run_epoch` drives it over one
epoch in chunks of `steps_per_execution` steps, telling the observers after each chunk and checking
the stop signal between chunks. `bench/` reuses these functions.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence

import numpy as np

from trainer import data as data_lib
from trainer.config import Config
from trainer.images import MNIST_SHAPE, ImageShape

EVAL_BATCH_SIZE = 1000
# Keras clips probabilities to [1e-7, 1], so an honest cross-entropy never exceeds -ln(1e-7) = 16.1 per
# example: a mean above this means the arithmetic has broken down (the run has diverged).
DIVERGED_LOSS = 100.0


@dataclasses.dataclass
class TrainState:
    model: object
    optimizer: object
    epoch: object  # tf.Variable: epochs completed
    step: object  # tf.Variable: steps completed in the current epoch (non-zero only after a mid-epoch stop)
    partial: object  # tf.Variable: PARTIAL_SUMS of those steps, so a resumed epoch's figures cover all of it
    checkpoint: object  # tf.train.Checkpoint of all the above, the model's random-number states and the stash
    restorable: object  # the same without the stash: what every checkpoint of these settings must match
    stash: Optional["StatisticsStash"] = None


# What a mid-epoch checkpoint keeps of the interrupted epoch's steps, in this order.
PARTIAL_SUMS = ("loss_sum", "correct", "examples", "seconds")


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


def learning_rate_at(config: Config, steps_per_epoch: int):
    """`rate(step)`: the learning rate the optimizer applies at global step `step` (0-based), as a float."""
    schedule = learning_rate_schedule(config, steps_per_epoch)
    if not callable(schedule):
        return lambda step: float(schedule)
    return lambda step: float(schedule(step))


def build_state(config: Config, strategy, policy: str, steps_per_epoch: int,
                initial_weights: Optional[list] = None, shape: ImageShape = MNIST_SHAPE) -> TrainState:
    """Model (for `shape`'s images and classes), optimizer and counters, seeded and built inside the
    strategy's scope."""
    import keras
    import tensorflow as tf

    from trainer.model import batch_norm_momentum, build_model

    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = build_model(config, batch_norm_momentum(steps_per_epoch), shape)
        optimizer = make_optimizer(config, strategy, policy, steps_per_epoch)
        if policy == "mixed_float16":  # float16 gradients underflow without loss scaling
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        # Built inside the scope before the first step: otherwise a Keras 3 optimizer under a 2-replica
        # MirroredStrategy fails its first step ("You must feed a value for placeholder tensor").
        optimizer.build(model.trainable_variables)
        if initial_weights is not None:
            model.set_weights(initial_weights)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
        partial = tf.Variable(tf.zeros(len(PARTIAL_SUMS), tf.float64), trainable=False, name="epoch_partial_sums")
        stash = StatisticsStash.make(strategy, model)
    parts = dict(model=model, optimizer=optimizer, epoch=epoch, step=step, partial=partial,
                 random=random_states(model))
    restorable = tf.train.Checkpoint(**parts)
    checkpoint = tf.train.Checkpoint(**parts, **({stash.key: stash.variables} if stash else {}))
    return TrainState(model, optimizer, epoch, step, partial, checkpoint, restorable, stash)


# Variables --weight-decay leaves alone (Keras matches these patterns against variable names): shrinking a
# bias or a batch-norm scale or offset only shifts what the next layer sees.
NO_WEIGHT_DECAY = ("bias", "gamma", "beta")


def make_optimizer(config: Config, strategy, policy: str, steps_per_epoch: int):
    """Adam (AdamW with --weight-decay) on the run's learning-rate schedule; build it inside the strategy's
    scope."""
    optimizer = adam_class(strategy, policy)(learning_rate=learning_rate_schedule(config, steps_per_epoch),
                                             weight_decay=config.weight_decay or None)
    if config.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY))
    return optimizer


def set_regularisation(model, optimizer, dropout: float, weight_decay: float) -> None:
    """Set the model's dropout rate and the optimizer's weight decay (0: none) for the epochs ahead. Both are
    read when a train step is traced: make the train function after this call."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = dropout
    getattr(optimizer, "inner_optimizer", optimizer).weight_decay = weight_decay or None


def adam_class(strategy, policy: str = "float32"):
    """keras.optimizers.Adam, or for a multi-worker cluster in float32 an Adam whose train step sums the
    gradients over the replicas itself (`sum_gradients_early`), so that the sum of the last layers' gradients
    travels while back-propagation still computes the first layers'. Keras' own optimizer sends all gradients
    as one collective once the last of them is ready. With two workers the sums are the same numbers
    either way (one addition per value), so results do not change; with more, the ring's order of additions
    follows the packs, so a sum may differ from Keras' in its last bit."""
    import keras
    import tensorflow as tf

    if (not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or strategy.num_replicas_in_sync < 2
            or policy != "float32" or not hasattr(keras.optimizers.Adam, "_all_reduce_sum_gradients")):
        return keras.optimizers.Adam

    class AdamOfSummedGradients(keras.optimizers.Adam):
        """Adam for gradients the train step has already summed over the replicas."""

        sums_gradients_in_step = True

        def _all_reduce_sum_gradients(self, grads_and_vars):
            return list(grads_and_vars)

    return AdamOfSummedGradients


def gradient_packs(sizes: Sequence[int]) -> list:
    """Gradient indices grouped into all-reduce packs, last variable first: back-propagation computes the
    last layers' gradients first, so their pack can travel while the first layers' are computed. A pack
    closes once it holds a quarter of all the values (few collectives: each has a fixed cost)."""
    total, packs, current, held = sum(sizes), [], [], 0
    for index in reversed(range(len(sizes))):
        current.append(index)
        held += sizes[index]
        if 4 * held >= total:
            packs.append(current)
            current, held = [], 0
    return packs + ([current] if current else [])


def sum_gradients_early(gradients: list) -> list:
    """In replica context: each gradient summed over the replicas, in `gradient_packs` order (collectives
    launch in program order)."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    summed: list = [None] * len(gradients)
    for pack in gradient_packs([int(gradient.shape.num_elements()) for gradient in gradients]):
        values = context.all_reduce(tf.distribute.ReduceOp.SUM, [gradients[index] for index in pack])
        for index, value in zip(pack, values, strict=True):
            summed[index] = value
    return summed


def random_states(model) -> list:
    """The state variables of the model's Keras seed generators (Dropout draws its masks from one, and
    advances it on every training step). A Keras model's checkpoint holds its weights only: without these a
    resumed run would draw the masks of the run's first steps again, not those of the step it resumes at."""
    weights = {id(weight) for weight in model.weights}
    return [variable for variable in model.variables if id(variable) not in weights]


def _moving_statistics(model) -> list:
    import keras

    return [variable for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
            for variable in (layer.moving_mean, layer.moving_variance)]


class StatisticsStash:
    """Every replica's own batch-norm moving statistics, for a mid-epoch checkpoint.

    Each replica updates its statistics from its own shard until they are averaged at the epoch's end
    (`make_statistics_sync`); a checkpoint keeps one replica's copy. So that a run resumed mid-epoch goes on
    with every replica's own statistics, a mid-epoch stop gathers all of them into these variables (one
    all-gather), and a resume hands each replica its own row. The key names the replica count: a checkpoint
    resumed with another count finds no stash of its own and starts from the chief's statistics."""

    def __init__(self, strategy, statistics: list):
        import tensorflow as tf

        replicas = strategy.num_replicas_in_sync
        self.key = f"replica_statistics_{replicas}"
        self.held = tf.Variable(0, dtype=tf.int64, trainable=False, name="stash_held")  # 1 once filled
        self.rows = [tf.Variable(tf.zeros([replicas, *variable.shape], variable.dtype), trainable=False,
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA, name="stash")
                     for variable in statistics]
        self.variables = dict(held=self.held, rows=self.rows)

        def gather():
            context = tf.distribute.get_replica_context()
            for variable, rows in zip(statistics, self.rows, strict=True):
                rows.assign(context.all_gather(tf.identity(variable.value)[tf.newaxis], axis=0))

        def hand_out():
            context = tf.distribute.get_replica_context()
            for variable, rows in zip(statistics, self.rows, strict=True):
                variable.assign(tf.gather(rows, context.replica_id_in_sync_group))  # this replica's own copy

        self._gather = tf.function(lambda: strategy.run(gather))
        self._hand_out = tf.function(lambda: strategy.run(hand_out))

    @classmethod
    def make(cls, strategy, model) -> Optional["StatisticsStash"]:
        """Inside the strategy's scope; None when there is nothing per replica (one replica, no batch norm)."""
        statistics = _moving_statistics(model)
        return cls(strategy, statistics) if strategy.num_replicas_in_sync > 1 and statistics else None

    def fill(self) -> None:
        """Before a mid-epoch save (a collective: every worker calls it)."""
        self._gather()
        self.held.assign(1)

    def hand_out(self) -> None:
        """After restoring a mid-epoch checkpoint that holds a stash of this replica count."""
        if int(self.held.numpy()):
            self._hand_out()

    def empty(self) -> None:
        self.held.assign(0)


def make_train_function(strategy, model, optimizer, global_batch_size: int, jit_compile: Optional[bool] = None,
                        label_smoothing: float = 0.0):
    """`train_steps(iterator, num_steps)` -> (sum of per-example losses, number correct) over the steps;
    with `jit_compile` each replica's step is XLA-compiled; `label_smoothing` S > 0 trains towards
    (1 - S) one-hot + S / K (the reported loss is then the smoothed one)."""
    import keras
    import tensorflow as tf

    def per_example_loss(labels, probabilities):
        if not label_smoothing:
            return keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        targets = tf.one_hot(labels, probabilities.shape[-1], dtype=probabilities.dtype)
        return keras.losses.categorical_crossentropy(targets, probabilities, label_smoothing=label_smoothing)

    early_sums = getattr(optimizer, "sums_gradients_in_step", False)

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            per_example = per_example_loss(labels, probabilities)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
            scaled_loss = optimizer.scale_loss(loss)  # unchanged unless fp16 loss scaling is on
        gradients = tape.gradient(scaled_loss, model.trainable_variables)
        if early_sums:
            gradients = sum_gradients_early(gradients)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        correct = tf.cast(tf.equal(tf.argmax(probabilities, axis=-1, output_type=tf.int32), labels), tf.float32)
        return tf.reduce_sum(per_example), tf.reduce_sum(correct)

    # XLA compiles the step on each replica; the loop around it pulls from the input iterator, which XLA
    # cannot compile (on a TPU, TPUStrategy compiles what strategy.run runs in any case).
    step = tf.function(replica_step, jit_compile=True, autograph=False) if jit_compile else replica_step

    # Each replica adds its own (loss sum, number correct) into a sync-on-read variable: one all-reduce
    # when it is read after the call, instead of two cross-replica reductions (two collectives across
    # workers) on every step.
    with strategy.scope():
        totals = tf.Variable(tf.zeros(2), trainable=False, name="call_totals",
                             synchronization=tf.VariableSynchronization.ON_READ,
                             aggregation=tf.VariableAggregation.SUM)

    def replica_step_adding_up(images, labels):
        loss_sum, correct = step(images, labels)
        totals.assign_add(tf.stack([loss_sum, correct]))

    # Without AutoGraph: nothing here branches or loops on tensors in Python, and converting these functions
    # (rewriting their source) was about 40% of the first call's Python tracing.
    @tf.function(autograph=False)
    def train_steps(iterator, num_steps):
        def one_step(done):
            strategy.run(replica_step_adding_up, args=next(iterator))
            return done + 1

        strategy.run(lambda: totals.assign(tf.zeros(2)))
        tf.while_loop(lambda done: done < num_steps, one_step, [tf.zeros([], num_steps.dtype)])
        summed = totals.read_value()
        return summed[0], summed[1]

    return train_steps


def make_statistics_sync(strategy, model):
    """A function that sets every replica's batch-norm moving mean and variance to their mean over the
    replicas, or None when there is nothing to agree on (one replica, or no batch norm).

    Each replica updates these statistics from its own shard of every batch (Keras keeps them per replica;
    synchronising the batch statistics on every step would cost collectives per layer per step), so
    without this the workers of a cluster end with different models and the chief exports its own.
    Averaging once per epoch, before validation and checkpoints, costs one small all-reduce per epoch.
    """
    import tensorflow as tf

    statistics = _moving_statistics(model)
    if strategy.num_replicas_in_sync < 2 or not statistics:
        return None

    def replica_average():
        context = tf.distribute.get_replica_context()
        averaged = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                      [tf.identity(variable.value) for variable in statistics])
        for variable, value in zip(statistics, averaged, strict=True):
            variable.assign(value)  # no aggregation: sets this replica's own copy

    @tf.function
    def average():
        strategy.run(replica_average)

    return average


def make_predict_function(model, jit_compile: Optional[bool] = None):
    """float32 probabilities for float images [N, H, W, C] (the model's static input shape), inference mode."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)], autograph=False,
                 jit_compile=jit_compile)
    def predict(images):
        return tf.cast(model(images, training=False), tf.float32)

    return predict


def evaluate(predict, images: np.ndarray, labels: np.ndarray):
    """(loss, accuracy, predicted classes) over every example, computed locally and exactly."""
    probabilities = np.concatenate([predict(batch).numpy() for batch, _ in
                                    data_lib.eval_dataset(images, labels, EVAL_BATCH_SIZE)])
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    predictions = probabilities.argmax(axis=-1)
    return float(-np.log(picked).mean()), float((predictions == labels).mean()), predictions


class Diverged(Exception):
    """A NaN, infinite or impossibly large mean loss: the weights are lost."""

    def __init__(self, what: str, value: float, where: str):
        super().__init__(f"{what} {value:.4g} at {where}")
        self.what, self.value, self.where = what, value, where


def check_loss(value: float, what: str, where: str) -> None:
    if not (math.isfinite(value) and value <= DIVERGED_LOSS):
        raise Diverged(what, value, where)


@dataclasses.dataclass
class EpochResult:
    """One epoch's figures. After a mid-epoch resume, `loss_sum`, `correct` and `seconds` include the steps
    before the stop (the partial sums its checkpoint kept); `run_seconds` is this process's share."""
    first_step: int  # where this process started the epoch (non-zero when resuming mid-epoch)
    steps_done: int  # where it ended: steps_per_epoch, or earlier when stopped
    loss_sum: float
    correct: float
    seconds: float
    stopped: bool
    run_seconds: float = 0.0

    def examples(self, global_batch_size: int) -> int:
        """Examples the figures cover: every step of the epoch up to `steps_done`."""
        return self.steps_done * global_batch_size

    def run_examples(self, global_batch_size: int) -> int:
        """Examples this process trained."""
        return (self.steps_done - self.first_step) * global_batch_size

    def partial_sums(self, global_batch_size: int) -> list:
        """PARTIAL_SUMS, for a mid-epoch checkpoint."""
        return [self.loss_sum, self.correct, float(self.examples(global_batch_size)), self.seconds]


def run_epoch(train_steps, iterator, epoch: int, first_step: int, steps_per_epoch: int, steps_per_call: int,
              global_batch_size: int, observers, stop, carried: Optional[dict] = None) -> EpochResult:
    """Train one epoch (from `first_step`) in calls of up to `steps_per_call` steps; after each call the
    observers hear of it and the stop signal is checked (and voted on across workers). `carried`: the
    PARTIAL_SUMS of the steps before `first_step` (a mid-epoch resume). Raises Diverged."""
    import tensorflow as tf

    carried = carried or {}
    loss_sum, correct = carried.get("loss_sum", 0.0), carried.get("correct", 0.0)
    done, earlier_seconds, stopped = first_step, carried.get("seconds", 0.0), False
    started = time.perf_counter()
    while done < steps_per_epoch:
        global_step = epoch * steps_per_epoch + done
        chunk = observers.clip_chunk(global_step, min(steps_per_call, steps_per_epoch - done))
        observers.on_chunk_begin(global_step)
        chunk_loss, chunk_correct = train_steps(iterator, tf.constant(chunk))
        observers.on_chunk_end(global_step + chunk)
        check_loss(float(chunk_loss) / (chunk * global_batch_size), "training loss",
                   f"epoch {epoch + 1}, steps {done + 1}-{done + chunk} of {steps_per_epoch}")
        observers.on_batch_metrics(global_step + chunk, float(chunk_loss) / (chunk * global_batch_size),
                                   float(chunk_correct) / (chunk * global_batch_size))
        loss_sum, correct, done = loss_sum + float(chunk_loss), correct + float(chunk_correct), done + chunk
        observers.on_train_steps(epoch, done, steps_per_epoch, loss_sum / (done * global_batch_size))
        stopped = stop.should_stop()
        if stopped:
            break
    seconds = time.perf_counter() - started
    return EpochResult(first_step, done, loss_sum, correct, earlier_seconds + seconds, stopped, seconds)
