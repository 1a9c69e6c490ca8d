"""Each piece of the training loop on its own, in seconds and without a full training run: the train
function, one epoch's loop with a stop signal, the checkpointing rules, the TensorBoard observer, the
metrics.json builder, and the package's shape (short functions, no import cycles). Real TensorFlow, real
digits, real checkpoints and event files throughout."""

import ast
import glob
import json
import os

import numpy as np
import pytest

from helpers import ROOT_DIR

DOCUMENTED_METRICS = ("test_accuracy", "test_loss", "validation_accuracy", "validation_loss", "epochs_completed",
                      "initial_epoch", "initial_step", "train_seconds", "train_examples_per_second", "num_replicas",
                      "strategy", "dataset", "num_examples", "class_names", "history", "config", "tensorflow_version")


@pytest.fixture(scope="module")
def tiny(digits, tmp_path_factory):
    """A small seed-style network, its optimizer and the trainer's train function, on 64 real digits."""
    import tensorflow as tf

    from trainer import steps
    from trainer.config import Config

    config = Config(job_dir=str(tmp_path_factory.mktemp("tiny")), preset="seed", filters=(8,), dense_units=16,
                    batch_size=32, learning_rate=5e-3, dropout=0.0)
    strategy = tf.distribute.get_strategy()
    state = steps.build_state(config, strategy, "float32", steps_per_epoch=10)
    images, labels = digits
    batch = (tf.constant(images[:32, ..., None] / 255.0, tf.float32), tf.constant(labels[:32], tf.int32))
    train_steps = steps.make_train_function(strategy, state.model, state.optimizer, config.batch_size)
    return config, state, train_steps, iter(tf.data.Dataset.from_tensors(batch).repeat())


def test_gradients_are_summed_last_layer_first_in_a_few_packs():
    """Back-propagation computes the last layers' gradients first, so their pack is sent first; the seed
    network's dense and output gradients make one pack, its convolutions' the other."""
    from trainer.steps import gradient_packs

    seed_sizes = [288, 32, 18432, 64, 204800, 128, 1280, 10]  # conv1, conv2, dense, output (kernel, bias)
    assert gradient_packs(seed_sizes) == [[7, 6, 5, 4], [3, 2, 1, 0]]
    assert gradient_packs([5, 5, 5, 5]) == [[3], [2], [1], [0]]
    assert sorted(sum(gradient_packs([1, 2, 3, 100, 4]), [])) == [0, 1, 2, 3, 4]  # every gradient once


def test_the_train_function_lowers_the_loss(tiny):
    import tensorflow as tf

    config, _, train_steps, iterator = tiny
    first = float(train_steps(iterator, tf.constant(1))[0]) / config.batch_size
    train_steps(iterator, tf.constant(40))
    loss, correct = (float(v) for v in train_steps(iterator, tf.constant(1)))
    assert loss / config.batch_size < first / 2, (first, loss / config.batch_size)
    assert correct >= 0.8 * config.batch_size


def test_weight_decay_shrinks_the_kernels_and_leaves_biases_and_batch_norm_alone(tmp_path):
    """AdamW's decoupled decay: with zero gradients Adam moves nothing, so after one step each conv and dense
    kernel is exactly (1 - learning rate x W) times what it was; biases, gamma and beta are unchanged."""
    import tensorflow as tf

    from trainer import steps
    from trainer.config import Config

    config = Config(job_dir=str(tmp_path), preset="seed", filters=(8,), dense_units=16, batch_norm=True,
                    learning_rate=0.01, weight_decay=0.1)
    state = steps.build_state(config, tf.distribute.get_strategy(), "float32", steps_per_epoch=10)
    variables = state.model.trainable_variables
    before = [v.numpy().copy() for v in variables]
    state.optimizer.apply_gradients(zip([tf.zeros_like(v) for v in variables], variables, strict=True))
    kinds = {}
    for variable, old in zip(variables, before, strict=True):
        name = variable.path.rsplit("/", 1)[-1]
        factor = 1.0 if name in steps.NO_WEIGHT_DECAY else 1.0 - 0.01 * 0.1
        np.testing.assert_allclose(variable.numpy(), old * factor, rtol=1e-6, err_msg=variable.path)
        kinds[name] = kinds.get(name, 0) + 1
    assert kinds["kernel"] == 3 and kinds["gamma"] == 2 and kinds["bias"] == 1  # conv, dense, output


def test_label_smoothing_trains_towards_the_smoothed_targets(tiny):
    """The smoothed cross-entropy of the trainer's step, checked against its definition on a fresh model:
    -sum((1 - S) * onehot + S / K) * log(p)), and 0 smoothing is the plain sparse cross-entropy."""
    import tensorflow as tf

    from trainer import steps

    config, _, _, iterator = tiny
    images, labels = next(iterator)
    for smoothing in (0.0, 0.1):
        state = steps.build_state(config, tf.distribute.get_strategy(), "float32", steps_per_epoch=10)
        probabilities = state.model(images, training=False).numpy()  # dropout is 0: the same as in training
        targets = np.eye(10)[labels.numpy()] * (1 - smoothing) + smoothing / 10
        expected = float(-(targets * np.log(np.clip(probabilities, 1e-7, 1))).sum())
        train_steps = steps.make_train_function(tf.distribute.get_strategy(), state.model, state.optimizer,
                                                config.batch_size, label_smoothing=smoothing)
        batches = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
        loss_sum = float(train_steps(batches, tf.constant(1))[0])
        assert abs(loss_sum - expected) < 1e-3 * expected, (smoothing, loss_sum, expected)


def test_run_epoch_stops_after_the_call_in_which_the_signal_came(tiny):
    from trainer import steps
    from trainer.observers import Observer, Observers
    from trainer.stopping import StopSignal

    config, _, train_steps, iterator = tiny
    stop, seen = StopSignal(), []

    class SignalAfterSecondCall(Observer):
        def on_train_steps(self, epoch, steps_done, steps_per_epoch, mean_loss):
            seen.append(steps_done)
            if len(seen) == 2:
                stop.request(143)

    result = steps.run_epoch(train_steps, iterator, epoch=0, first_step=0, steps_per_epoch=10, steps_per_call=3,
                             global_batch_size=config.batch_size, observers=Observers([SignalAfterSecondCall()]),
                             stop=stop)
    assert result.stopped and result.steps_done == 6 and seen == [3, 6]
    assert result.examples(config.batch_size) == 6 * config.batch_size and result.loss_sum > 0
    assert stop.reason == "SIGTERM"


def test_a_diverged_loss_is_raised_not_trained_on():
    from trainer import steps

    steps.check_loss(16.0, "training loss", "epoch 1")
    for value in (float("nan"), float("inf"), 1e30):
        with pytest.raises(steps.Diverged, match="training loss .* at epoch 1, steps 1-20 of 40"):
            steps.check_loss(value, "training loss", "epoch 1, steps 1-20 of 40")


def _checkpoints(job_dir, **settings):
    import tensorflow as tf

    from trainer.checkpoints import Checkpoints
    from trainer.config import Config
    from trainer.outputs import prepare_outputs

    config = Config(job_dir=job_dir, preset="seed", dataset="idx:/data", **settings)
    outputs = prepare_outputs(config)
    counters = tf.train.Checkpoint(epoch=tf.Variable(0, dtype=tf.int64), step=tf.Variable(0, dtype=tf.int64),
                                   partial=tf.Variable(tf.zeros(4, tf.float64)))
    return Checkpoints(config, outputs, counters, steps_per_epoch=5), outputs


def test_checkpoints_trim_history_to_the_checkpoint_and_refuse_other_settings(tmp_path):
    from trainer.errors import TrainerError

    job_dir = str(tmp_path / "job")
    checkpoints, outputs = _checkpoints(job_dir)
    try:
        assert checkpoints.restore() == [] and checkpoints.position == (0, 0)
        history = [dict(epoch=1, val_accuracy=0.5), dict(epoch=2, val_accuracy=0.6)]
        checkpoints.save_epoch(1, history)  # epoch index 1 done: two epochs completed
        # history.json says three epochs, as after a crash between the history write and the next save
        with open(os.path.join(job_dir, "checkpoints", "history.json"), "w") as handle:
            json.dump(history + [dict(epoch=3, val_accuracy=0.7)], handle)
    finally:
        outputs.close()

    checkpoints, outputs = _checkpoints(job_dir)
    try:
        assert checkpoints.restore() == history and checkpoints.position == (2, 0)
    finally:
        outputs.close()

    checkpoints, outputs = _checkpoints(job_dir, dropout=0.3)
    try:
        expected = (r"holds a checkpoint of a run with other settings "
                    r"\(dropout 0.5 -> 0.3, unaugmented_dropout 0.5 -> 0.3\)")
        with pytest.raises(TrainerError, match=expected):
            checkpoints.restore()
    finally:
        outputs.close()
    assert sorted(os.listdir(os.path.join(job_dir, "checkpoints")))[:2] == ["checkpoint", "ckpt-10.data-00000-of-00001"]

    run_config = os.path.join(job_dir, "checkpoints", "run_config.json")
    with open(run_config) as handle:
        saved = json.load(handle)
    assert saved.pop("checkpoint_format") == 3
    with open(run_config, "w") as handle:  # as an earlier trainer wrote it, without checkpoint_format
        json.dump(saved, handle)
    checkpoints, outputs = _checkpoints(job_dir)
    try:
        with pytest.raises(TrainerError, match="holds a checkpoint of format 1 from an earlier version of the "
                                               "trainer .*; pass --no-resume to start fresh or use another --job-dir"):
            checkpoints.restore()
    finally:
        outputs.close()


def test_the_summaries_observer_writes_the_documented_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer import plots
    from trainer.observers import Summaries

    summaries = Summaries(str(tmp_path), {"epochs": 2, "dataset": "mnist"})
    summaries.on_train_begin(None, 0)
    for epoch in range(2):
        row = dict(epoch=epoch + 1, loss=1.0 / (epoch + 1), accuracy=0.5 + epoch / 10, val_loss=1.2, val_accuracy=0.6,
                   learning_rate=1e-3)
        summaries.on_epoch_end(epoch, row, dict(examples_per_second=1000.0, seconds=1.0))
    png = plots.misclassified_png(np.zeros((2, 28, 28), np.uint8), np.array([1, 2]), np.array([2, 1]),
                                   list("0123456789"))
    summaries.image("misclassified", png, step=2)

    train = EventAccumulator(str(tmp_path / "train")).Reload()
    validation = EventAccumulator(str(tmp_path / "validation")).Reload()
    assert set(train.Tags()["tensors"]) == {"epoch_loss", "epoch_accuracy", "epoch_learning_rate",
                                             "epoch_examples_per_second", "config"}
    assert set(validation.Tags()["tensors"]) == {"epoch_loss", "epoch_accuracy", "misclassified"}
    import tensorflow as tf

    losses = [(event.step, float(tf.make_ndarray(event.tensor_proto))) for event in train.Tensors("epoch_loss")]
    assert losses == [(1, 1.0), (2, 0.5)]
    assert b"| dataset | mnist |" in tf.make_ndarray(train.Tensors("config")[0].tensor_proto).item()


def test_final_metrics_has_every_documented_key(tmp_path):
    import tensorflow as tf

    from trainer.config import Config
    from trainer.data import Splits
    from trainer.distribute import Resolved
    from trainer.finish import final_metrics

    arrays = (np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int64))
    splits = Splits("mnist", tuple("0123456789"), arrays, arrays, arrays)
    history = [dict(epoch=1, val_accuracy=0.9, val_loss=0.3)]
    metrics = final_metrics(Config(job_dir=str(tmp_path)), Resolved(tf.distribute.get_strategy(), "default"), splits,
                            history, (0.25, 0.91), dict(epochs_completed=1, initial_epoch=0, initial_step=0),
                            train_seconds=2.0, examples_trained=1000)
    assert set(DOCUMENTED_METRICS) <= set(metrics)
    assert metrics["train_examples_per_second"] == 500.0 and metrics["validation_accuracy"] == 0.9
    assert metrics["strategy"] == "default" and metrics["num_replicas"] == 1
    json.dumps(metrics)  # all of it goes into metrics.json


def test_trainer_modules_import_one_way():
    """Trainer modules import one way, lazy imports inside functions included (a cycle would show as a
    module reachable from itself). Function length is a lint rule (ruff's statement cap)."""
    imports = {}
    for path in sorted(glob.glob(os.path.join(ROOT_DIR, "trainer", "*.py"))):
        module = os.path.basename(path)[:-3]
        tree = ast.parse(open(path).read())
        imports[module] = {alias.name if node.module == "trainer" else node.module.split(".")[1]
                           for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                           and node.module.startswith("trainer") for alias in node.names}

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in imports.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert [module for module in imports if module in reachable(module)] == []


def test_the_misclassified_grid_has_no_blank_band():
    """The title sits just above the grid: no run of empty rows taller than a small gap anywhere."""
    import io

    from PIL import Image

    from trainer import plots

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = np.arange(40) % 10
    png = plots.misclassified_png(images, labels, (labels + 1) % 10, [f"class {i}" for i in range(10)])
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    longest = current = 0
    for blank in (pixels > 250).all(axis=1):
        current = current + 1 if blank else 0
        longest = max(longest, current)
    assert longest < 0.03 * pixels.shape[0], f"a blank band of {longest} rows in {pixels.shape[0]}"



def test_a_long_epoch_shows_the_time_left(monkeypatch):
    """In a log (not a terminal) a long epoch prints its progress with the time left every `every` seconds,
    paced from the epoch's first call on; a short epoch prints nothing but its epoch line."""
    from trainer import observers

    clock = iter([0.0, 10.0, 20.0, 30.0, 100.0])
    monkeypatch.setattr(observers.time, "monotonic", lambda: next(clock))
    lines = []
    console = observers.Console(epochs=20, log=lines.append, every=15)
    console.enabled = False
    console.on_epoch_begin(1)                                    # t=0
    console.on_train_steps(1, 20, 420, 0.5)                      # t=10: the pace starts here
    console.on_train_steps(1, 120, 420, 0.4)                     # t=20: 100 steps in 10 s, 300 left
    console.on_train_steps(1, 220, 420, 0.3)                     # t=30: the last line was 10 s ago
    assert lines == ["epoch 2/20 [========......................] 120/420 loss 0.4000 ETA 30 s"]
    console.on_train_steps(1, 320, 420, 0.3)                     # t=100: 300 steps in 90 s, 100 left
    assert lines[-1] == "epoch 2/20 [======================........] 320/420 loss 0.3000 ETA 30 s"
    assert len(lines) == 2
    assert observers.progress_line(0, 3, 10, 1000, 1.0, 95.0).endswith("10/1000 loss 1.0000 ETA 1:35")
    assert observers.progress_line(0, 3, 0, 10, 1.0, None).endswith("0/10 loss 1.0000")
