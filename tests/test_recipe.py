"""Recipe options: the seed preset stays the notebook's network exactly; batch norm with warm-up evaluates
well after one epoch; the cosine schedule and the profiler do what their flags say."""

import glob
import os

import pytest

from conftest import read_metrics, run_task
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
