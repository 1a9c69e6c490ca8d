"""End-to-end training on real data: accuracy, exported artifacts, TensorBoard logs, determinism
(trainer.predict has test_predict.py)."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import (
    ROOT_DIR,
    file_snapshot,
    main_in_fresh_interpreter,
    printed_command,
    read_metrics,
    run_task,
    trainer_env,
)

TIMING_KEYS = {"train_seconds", "train_examples_per_second"}


def test_seed_recipe_learns_real_digits(seed_run):
    job_dir, metrics, out = seed_run
    assert metrics["test_accuracy"] > 0.93, metrics["test_accuracy"]
    assert metrics["epochs_completed"] == 6 and metrics["initial_epoch"] == 0
    assert metrics["num_examples"] == {"train": 3600, "validation": 400, "test": 1000}
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 6 and "val_accuracy" in epoch_lines[-1] and "examples/s" in epoch_lines[-1]


def test_metrics_json_keeps_its_contract(seed_run):
    _, metrics, _ = seed_run
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0
    assert metrics["train_seconds"] > 0 and metrics["train_examples_per_second"] > 0
    assert metrics["num_replicas"] == 1
    assert metrics["strategy"] == "default"  # "auto" was asked; the resolved name is recorded
    assert metrics["dataset"].startswith("idx:")
    assert metrics["config"]["preset"] == "seed" and metrics["config"]["filters"] == [32, 64]
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3, 4, 5, 6]


def test_saved_model_serves_uint8_images_and_agrees_with_metrics(seed_run, digits):
    import tensorflow as tf

    job_dir, metrics, _ = seed_run
    model_dir = os.path.join(job_dir, "model")
    assert os.path.isfile(os.path.join(model_dir, "saved_model.pb"))
    serving = tf.saved_model.load(model_dir).signatures["serving_default"]
    images, labels = digits[0][4000:], digits[1][4000:]  # the held-out test split
    outputs = serving(image=tf.constant(images))
    assert outputs["probabilities"].shape == (1000, 10) and outputs["classes"].dtype.is_integer
    np.testing.assert_allclose(outputs["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)
    accuracy = float((outputs["classes"].numpy() == labels).mean())
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)


def test_keras_file_reloads_with_the_same_predictions(seed_run, digits):
    import keras

    job_dir, _, _ = seed_run
    model = keras.saving.load_model(os.path.join(job_dir, "model", "model.keras"))
    pixels = digits[0][4000:4100].astype("float32")[..., None] / 255.0
    accuracy = float((model.predict(pixels, verbose=0).argmax(axis=1) == digits[1][4000:4100]).mean())
    assert accuracy > 0.9


def test_outputs_are_readable_by_others_as_the_umask_allows(seed_run):
    """Temporary-file staging must not leave owner-only modes (TensorBoard or a serving container often
    runs as another user)."""
    import stat

    job_dir, _, _ = seed_run
    umask = os.umask(0)
    os.umask(umask)
    for path in ("metrics.json", "plots/accuracy.png", "model"):
        mode = stat.S_IMODE(os.stat(os.path.join(job_dir, path)).st_mode)
        expected = (0o777 if path == "model" else 0o666) & ~umask
        assert mode == expected, (path, oct(mode))


def test_plots_are_real_pngs(seed_run):
    from PIL import Image

    job_dir, _, _ = seed_run
    for name in ("accuracy.png", "loss.png", "confusion_matrix.png", "misclassified.png"):
        with Image.open(os.path.join(job_dir, "plots", name)) as image:
            assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200


def _tags(event_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(event_dir, size_guidance={"tensors": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_logs_have_the_documented_runs_and_tags(seed_run):
    import tensorflow as tf

    job_dir, metrics, _ = seed_run
    train = _tags(os.path.join(job_dir, "logs", "train"))
    validation = _tags(os.path.join(job_dir, "logs", "validation"))
    for tag in ("epoch_loss", "epoch_accuracy", "epoch_learning_rate", "epoch_examples_per_second", "config"):
        assert tag in train.Tags()["tensors"], tag
    for tag in ("epoch_loss", "epoch_accuracy", "misclassified"):
        assert tag in validation.Tags()["tensors"], tag
    accuracy = [event.step for event in validation.Tensors("epoch_accuracy")]
    assert accuracy == [1, 2, 3, 4, 5, 6]
    last = float(tf.make_ndarray(validation.Tensors("epoch_accuracy")[-1].tensor_proto))
    assert last == pytest.approx(metrics["history"][-1]["val_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_fashion_mnist_seed_recipe_on_real_debian_files(fashion_dir, tmp_path):
    job_dir = str(tmp_path / "fashion")
    code, out, err = run_task(["--dataset", f"idx:{fashion_dir}", "--preset", "seed", "--train-limit", "10000",
                               "--epochs", "3", "--job-dir", job_dir])
    assert code == 0, err
    with open(os.path.join(job_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    assert metrics["test_accuracy"] > 0.78, metrics["test_accuracy"]
    assert metrics["num_examples"]["test"] == 10000
    assert metrics["class_names"][0] == "T-shirt/top"  # names come with the dataset, for plots and predict


@pytest.mark.slow
def test_same_seed_same_data_gives_identical_metrics(digits_idx, tmp_path):
    """Two separate processes, same flags: metrics.json differs only in its timing keys."""
    job_dir = str(tmp_path / "same")
    args = [sys.executable, "-m", "trainer.task", "--dataset", f"idx:{digits_idx}", "--preset", "seed",
            "--train-limit", "2000", "--epochs", "2", "--job-dir", job_dir, "--no-resume"]
    runs = []
    for _ in range(2):
        result = subprocess.run(args, cwd=ROOT_DIR, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        with open(os.path.join(job_dir, "metrics.json")) as handle:
            runs.append({k: v for k, v in json.load(handle).items() if k not in TIMING_KEYS})
    assert runs[0] == runs[1]


def test_export_is_atomic_a_failed_export_keeps_the_good_model(seed_run, tmp_path, monkeypatch):
    """A fault injected into the last step of export (the .keras save) must leave the old model whole."""
    import shutil

    import keras

    from trainer import export

    job_dir, _, _ = seed_run
    model_dir = str(tmp_path / "model")
    shutil.copytree(os.path.join(job_dir, "model"), model_dir)
    before = sorted(os.path.relpath(p, model_dir) for p in glob.glob(model_dir + "/**", recursive=True))
    model = keras.saving.load_model(os.path.join(model_dir, "model.keras"))

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export.export_model(model, model_dir, [str(d) for d in range(10)])
    after = sorted(os.path.relpath(p, model_dir) for p in glob.glob(model_dir + "/**", recursive=True))
    assert after == before
    assert os.listdir(tmp_path) == ["model"], "no partial folder may be left behind"


def test_rerunning_a_finished_run_reports_it_and_rewrites_nothing(seed_run, digits_idx):
    job_dir, metrics, _ = seed_run
    before = file_snapshot(job_dir)
    run = main_in_fresh_interpreter("trainer.task", ["--dataset", f"idx:{digits_idx}", "--preset", "seed",
                                                     "--epochs", "6", "--job-dir", job_dir])
    assert run["code"] == 0, run["err"]
    assert "this run is already complete: 6/6 epochs" in run["out"]
    assert f"test_accuracy {metrics['test_accuracy']:.4f}" in run["out"]
    assert "epoch 1/" not in run["out"] and "resuming" not in run["out"]
    assert run["heavy"] == [], "reported from the files alone, without loading TensorFlow"
    assert file_snapshot(job_dir) == before


def test_a_run_that_fails_before_training_leaves_no_empty_folders(tmp_path, monkeypatch):
    from trainer.data import _reachable

    monkeypatch.chdir(tmp_path)
    cases = [["--dataset", "idx:/no/such/folder"],  # default job dir: runs/<timestamp>
             ["--dataset", "idx:/no/such/folder", "--job-dir", str(tmp_path / "new" / "job")]]
    if not _reachable("storage.googleapis.com"):  # offline TFDS (the machines this suite runs on)
        cases.append(["--dataset", "mnist", "--data-dir", str(tmp_path / "tfds"), "--job-dir", str(tmp_path / "job")])
    for args in cases:
        code, _, err = run_task(args)
        assert code == 1 and err.startswith("error: "), err
        assert os.listdir(tmp_path) == [], (args, os.listdir(tmp_path))
    existing = tmp_path / "mine"
    existing.mkdir()
    code, _, _ = run_task(["--dataset", "idx:/no/such/folder", "--job-dir", str(existing / "job")])
    assert code == 1 and os.listdir(tmp_path) == ["mine"], "a folder the user made is kept"



@pytest.mark.slow
def test_the_quick_presets_closing_command_runs_as_printed(digits_idx, tmp_path):
    """The quick preset's last line names the full recipe's command on the same data and settings; run as
    printed, it trains all 20 epochs of the default recipe with those settings into the printed job dir."""
    job_dir = tmp_path / "quick run"
    code, out, err = run_task(["--preset", "quick", "--dataset", f"idx:{digits_idx}", "--train-limit", "400",
                               "--batch-size", "64", "--epochs", "1", "--job-dir", str(job_dir)])
    assert code == 0, err
    assert "quick preset: 1 epoch of the default recipe" in out
    argv = printed_command(out, r"for the full recipe run `([^`]+)`")
    result = subprocess.run(argv, cwd=ROOT_DIR, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    full = str(job_dir) + "-full"
    metrics = read_metrics(full)
    assert metrics["epochs_completed"] == 20 and metrics["config"]["preset"] == "default"
    assert metrics["config"]["train_limit"] == 400 and metrics["config"]["batch_size"] == 64
    assert metrics["dataset"] == f"idx:{digits_idx}"


def test_a_run_prints_its_model_summary_and_keeps_the_layer_table(seed_run):
    import keras

    job_dir, _, out = seed_run
    model = keras.saving.load_model(os.path.join(job_dir, "model", "model.keras"))
    headline = (f"model mnist_cnn: {len(model.layers)} layers, {model.count_params():,} parameters "
                f"({model.count_params():,} trainable)")
    assert f"{headline}; layers in {os.path.join(job_dir, 'model_summary.txt')}" in out.splitlines()
    with open(os.path.join(job_dir, "model_summary.txt")) as handle:
        table = handle.read().splitlines()
    assert table[0] == headline and table[1].split() == ["layer", "type", "output", "shape", "parameters"]
    assert [row.split()[0] for row in table[2:]] == [layer.name for layer in model.layers]
    assert "(5, 5, 64)" in "\n".join(table), "the second conv block's output of the seed network"
