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
