"""The real TensorBoard server over a finished run: its HTTP API shows what the README promises."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import free_port


@pytest.fixture
def tensorboard(seed_run):
    job_dir, metrics, _ = seed_run
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", os.path.join(job_dir, "logs"),
                               "--port", str(port), "--host", "127.0.0.1", "--load_fast", "false",
                               "--reload_interval", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.read()

    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if {"train", "validation"} <= set(json.loads(get("/data/runs"))):
                    break
            except OSError:
                pass
            assert server.poll() is None, "tensorboard exited"
            assert time.monotonic() < deadline, "tensorboard never listed the train and validation runs"
            time.sleep(0.3)
        yield get, metrics
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_scalars_have_one_point_per_epoch_and_match_metrics(tensorboard):
    get, metrics = tensorboard
    epochs = [row["epoch"] for row in metrics["history"]]
    for run, tags in (("train", ("epoch_loss", "epoch_accuracy", "epoch_learning_rate",
                                 "epoch_examples_per_second")),
                      ("validation", ("epoch_loss", "epoch_accuracy"))):
        for tag in tags:
            points = json.loads(get(f"/data/plugin/scalars/scalars?run={run}&tag={tag}"))
            assert [step for _, step, _ in points] == epochs, (run, tag)
    validation = json.loads(get("/data/plugin/scalars/scalars?run=validation&tag=epoch_accuracy"))
    assert [round(value, 5) for _, _, value in validation] == \
        [round(row["val_accuracy"], 5) for row in metrics["history"]]


def test_misclassified_image_and_config_text_are_served(tensorboard):
    get, _ = tensorboard
    images = json.loads(get("/data/plugin/images/images?run=validation&tag=misclassified"))
    assert len(images) == 1
    assert get("/data/plugin/images/individualImage?" + images[0]["query"]).startswith(b"\x89PNG")
    text = json.loads(get("/data/plugin/text/text?run=train&tag=config"))
    assert "batch_size" in text[0]["text"] and "dropout" in text[0]["text"]
