"""The real TensorBoard server over a finished run: its HTTP API shows what the README promises."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import free_port


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_misclassified_image_and_config_text_are_served(tensorboard):
    get, _ = tensorboard
    images = json.loads(get("/data/plugin/images/images?run=validation&tag=misclassified"))
    assert len(images) == 1
    assert get("/data/plugin/images/individualImage?" + images[0]["query"]).startswith(b"\x89PNG")
    text = json.loads(get("/data/plugin/text/text?run=train&tag=config"))
    assert "batch_size" in text[0]["text"] and "dropout" in text[0]["text"]


@pytest.mark.slow
def test_batch_scalars_have_one_point_per_call_and_add_up_to_the_epoch_loss(tensorboard):
    """What a user watching a run live sees: batch_* points after every multi-step call, x = global step."""
    get, metrics = tensorboard
    steps_per_epoch = metrics["num_examples"]["train"] // metrics["config"]["batch_size"]
    per_call = metrics["config"]["steps_per_execution"]
    ends = [end for end in range(per_call, steps_per_epoch, per_call)] + [steps_per_epoch]
    calls = [epoch * steps_per_epoch + end for epoch in range(len(metrics["history"])) for end in ends]
    points = {tag: json.loads(get(f"/data/plugin/scalars/scalars?run=train&tag={tag}"))
              for tag in ("batch_loss", "batch_accuracy", "batch_learning_rate")}
    for tag, series in points.items():
        assert [step for _, step, _ in series] == calls, tag
    losses = [value for _, _, value in points["batch_loss"]]
    sizes = [end - start for start, end in zip([0] + ends[:-1], ends, strict=True)] * len(metrics["history"])
    for epoch, row in enumerate(metrics["history"]):
        chunk = slice(epoch * len(ends), (epoch + 1) * len(ends))
        weighted = sum(loss * size for loss, size in zip(losses[chunk], sizes[chunk], strict=False)) / steps_per_epoch
        assert abs(weighted - row["loss"]) < 1e-4 * max(1.0, row["loss"]), (epoch, weighted, row["loss"])
    assert all(0.0 <= value <= 1.0 for _, _, value in points["batch_accuracy"])
    assert {round(value, 9) for _, _, value in points["batch_learning_rate"]} == {metrics["config"]["learning_rate"]}
