"""Recipe options: the seed preset stays the notebook's network exactly; batch norm with warm-up evaluates
well after one epoch; the cosine schedule and the profiler do what their flags say."""

import glob
import os

import pytest

from helpers import read_metrics, run_task
from trainer.config import Config


def test_seed_preset_is_exactly_the_notebook_network():
    import keras

    from trainer.model import build_model

    model = build_model(Config(job_dir="/tmp/x", preset="seed"))
    layers = [(type(layer).__name__, getattr(layer, "filters", None) or getattr(layer, "units", None) or
               getattr(layer, "rate", None)) for layer in model.layers]
    assert layers == [("InputLayer", None), ("Conv2D", 32), ("MaxPooling2D", None), ("Conv2D", 64),
                      ("MaxPooling2D", None), ("Flatten", None), ("Dense", 128), ("Dropout", 0.5), ("Dense", 10)]
    assert model.count_params() == 225_034
    assert all(layer.padding == "valid" and layer.kernel_size == (3, 3) for layer in model.layers
               if isinstance(layer, keras.layers.Conv2D))


@pytest.mark.slow
def test_batch_norm_with_warmup_evaluates_well_after_the_first_epoch(digits_idx, tmp_path):
    """Moving averages that lag behind (momentum 0.99) make a warmed-up model evaluate near chance."""
    job_dir = str(tmp_path / "bn")
    code, _, err = run_task(["--dataset", f"idx:{digits_idx}", "--batch-norm", "--lr-schedule", "cosine",
                             "--warmup-epochs", "1", "--learning-rate", "3e-3", "--epochs", "3", "--job-dir", job_dir])
    assert code == 0, err
    history = read_metrics(job_dir)["history"]
    assert history[0]["val_accuracy"] > 0.8, history[0]
    rates = [row["learning_rate"] for row in history]  # each epoch's starting rate
    assert rates[0] == pytest.approx(3e-4) and rates[1] == pytest.approx(3e-3), "warm-up from a tenth to the peak"
    assert rates[1] > rates[2] > 0, "cosine decay after the warm-up; the last epoch starts above 0"


def test_profile_steps_write_a_tensorboard_profile(digits_idx, tmp_path):
    job_dir = str(tmp_path / "profiled")
    code, _, err = run_task(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "1500",
                             "--epochs", "1", "--profile-steps", "2,5", "--job-dir", job_dir])
    assert code == 0, err
    assert glob.glob(os.path.join(job_dir, "logs", "plugins", "profile", "*", "*.xplane.pb"))


@pytest.mark.parametrize("shape", [(32, 7, 7, 8), (32, 16)])
def test_fused_batch_norm_trains_like_keras_batch_norm(shape):
    """The default network's batch norm runs TensorFlow's fused kernel in training (about 1.5x faster steps on
    a 2-core CPU); outputs, gradients and moving statistics must be the stock Keras layer's."""
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer.model import fused_batch_norm_layer

    x = tf.constant(np.random.default_rng(0).normal(2.0, 3.0, shape).astype("float32"))
    results = []
    for layer in (keras.layers.BatchNormalization(momentum=0.8), fused_batch_norm_layer()(momentum=0.8)):
        layer.build(shape)
        layer.gamma.assign(tf.linspace(0.5, 1.5, shape[-1]))
        layer.beta.assign(tf.linspace(-1.0, 1.0, shape[-1]))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * tf.cos(y))
        gradients = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([y, *gradients, layer.moving_mean, layer.moving_variance, layer(x, training=False)])
    for stock, fused in zip(*results, strict=True):
        np.testing.assert_allclose(np.asarray(fused), np.asarray(stock), rtol=1e-4, atol=1e-4)


def test_exported_keras_file_of_the_default_network_needs_nothing_from_this_package(tmp_path, digits):
    import keras
    import numpy as np

    from trainer.export import export_model
    from trainer.model import build_model, fused_batch_norm_layer

    model = build_model(Config(job_dir="/tmp/x"))
    assert any(isinstance(layer, fused_batch_norm_layer()) for layer in model.layers)
    pixels = digits[0][:64].astype("float32")[..., None] / 255.0
    model(pixels, training=True)  # moves the statistics away from their initial values
    export_model(model, str(tmp_path / "model"), [str(d) for d in range(10)])
    loaded = keras.saving.load_model(str(tmp_path / "model" / "model.keras"))
    assert {type(layer) for layer in loaded.layers if "bn" in layer.name} == {keras.layers.BatchNormalization}
    np.testing.assert_allclose(loaded.predict(pixels, verbose=0), model.predict(pixels, verbose=0), atol=1e-6)


def test_unaugmented_epochs_leave_the_first_epochs_plain():
    config = Config(job_dir="/tmp/x", augment="shift", unaugmented_epochs=2)
    assert [config.augment_at(epoch) for epoch in range(4)] == ["none", "none", "shift", "shift"]
    assert Config(job_dir="/tmp/x", preset="seed").augment_at(0) == "none"


def test_the_unaugmented_epochs_train_with_their_own_dropout_and_no_label_smoothing_or_weight_decay():
    config = Config(job_dir="/tmp/x", unaugmented_epochs=2, unaugmented_dropout=0.4, dropout=0.2,
                    label_smoothing=0.1, weight_decay=0.05)
    phases = [config.regularisation_at(epoch) for epoch in (0, 1, 2, 19)]
    assert phases == [(0.4, 0.0, 0.0)] * 2 + [(0.2, 0.1, 0.05)] * 2
    assert Config(job_dir="/tmp/x", preset="seed").regularisation_at(0) == (0.5, 0.0, 0.0)


_SWITCH_BASE = ["--train-limit", "1000", "--epochs", "2", "--unaugmented-epochs", "1", "--unaugmented-dropout", "0.4",
                "--dropout", "0.4", "--label-smoothing", "0", "--weight-decay", "0"]


@pytest.fixture(scope="module")
def unregularised_history(digits_idx, tmp_path_factory):
    """Two epochs, the first unaugmented, with no setting of the second epoch's own."""
    job_dir = str(tmp_path_factory.mktemp("unregularised"))
    code, _, err = run_task(["--dataset", f"idx:{digits_idx}", *_SWITCH_BASE, "--job-dir", job_dir])
    assert code == 0, err
    return read_metrics(job_dir)["history"]


@pytest.mark.parametrize("later", [["--dropout", "0.1"], ["--label-smoothing", "0.1"], ["--weight-decay", "0.05"]])
def test_the_regularisation_of_the_later_epochs_leaves_the_unaugmented_ones_alone(later, unregularised_history,
                                                                                 digits_idx, tmp_path):
    """Two runs that differ only in a setting of the augmented epochs: the unaugmented first epoch is the
    same to the last digit, and the second epoch (where the setting applies) is not."""
    code, _, err = run_task(["--dataset", f"idx:{digits_idx}", *_SWITCH_BASE, *later, "--job-dir", str(tmp_path)])
    assert code == 0, err
    history = read_metrics(str(tmp_path))["history"]
    assert history[0] == unregularised_history[0]
    assert history[1]["loss"] != unregularised_history[1]["loss"]


def test_a_given_dropout_is_every_epochs_unless_the_unaugmented_rate_is_given_too(tmp_path):
    from trainer.config import parse_config

    def rates(*args):
        config = parse_config(["--job-dir", str(tmp_path), *args], {})
        return config.unaugmented_dropout, config.dropout

    assert rates() == (0.4, 0.2)  # the default preset: heavier dropout on the plain first epochs
    assert rates("--dropout", "0.3") == (0.3, 0.3)
    assert rates("--dropout", "0.3", "--unaugmented-dropout", "0.5") == (0.5, 0.3)
    assert rates("--unaugmented-dropout", "0.1") == (0.1, 0.2)
    assert rates("--preset", "seed") == (0.5, 0.5)
    hparams = tmp_path / "best.json"
    hparams.write_text('{"dropout": 0.25}')  # a search's best trial, which trained with one rate throughout
    assert rates("--hparams-file", str(hparams)) == (0.25, 0.25)
