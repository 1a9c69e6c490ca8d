"""The end of a run: the metrics.json dict, then plots, the TensorBoard image and the exported model."""

from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np

from trainer import atomic, export, plots
from trainer.config import Config
from trainer.errors import writing
from trainer.images import describe_images


def weights_checksum(model) -> str:
    """A short digest of every weight: equal on all workers of a synchronous run, printed at the end."""
    import hashlib

    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.asarray(weight.numpy(), dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def short_name(dataset: str) -> str:
    """`idx:/usr/share/datasets/fashion-mnist` -> `fashion-mnist` (and `folder:DIR` -> DIR's name), for plot
    titles."""
    for prefix in ("idx:", "folder:"):
        if dataset.startswith(prefix):
            return os.path.basename(dataset[len(prefix):].rstrip("/"))
    return dataset


def final_metrics(config: Config, resolved, splits, history: List[dict], test: Sequence[float],
                  position: dict, train_seconds: float, examples_trained: int) -> dict:
    """metrics.json: `test` is (test_loss, test_accuracy); `position` has epochs_completed, initial_epoch
    and initial_step. Only the two timing keys differ between runs with the same seed and data on a CPU."""
    import tensorflow as tf

    test_loss, test_accuracy = test
    return dict(
        test_accuracy=test_accuracy, test_loss=test_loss,
        validation_accuracy=history[-1]["val_accuracy"] if history else None,
        validation_loss=history[-1]["val_loss"] if history else None,
        epochs_completed=position["epochs_completed"], initial_epoch=position["initial_epoch"],
        initial_step=position["initial_step"],
        train_seconds=train_seconds,
        train_examples_per_second=examples_trained / train_seconds if train_seconds else None,
        num_replicas=resolved.num_replicas, strategy=resolved.name, dataset=splits.name,
        num_examples=dict(train=len(splits.train[0]), validation=len(splits.validation[0]), test=len(splits.test[0])),
        class_names=list(splits.class_names), history=history, config=config.to_dict(),
        tensorflow_version=tf.__version__,
    )


def write_outputs(config: Config, outputs, model, splits, metrics: dict, predictions: dict, summaries, log) -> None:
    """`predictions` holds the final model's classes for `validation` and `test`. Every worker exports
    (saving may involve collectives); only the chief's model, plots and metrics.json land."""
    val_images, val_labels = splits.validation
    misclassified = plots.misclassified_png(val_images, val_labels, predictions["validation"], splits.class_names)
    summaries.image("misclassified", misclassified, step=config.epochs)
    with writing(f"--model-dir {config.model_dir}: cannot write the model",
                 "the previous model there, if any, is untouched; the checkpoints are kept, so a rerun exports again"):
        export.export_model(model, outputs.model_dir, splits.class_names,
                            describe_images(splits.train[0], splits.class_names, splits.preprocess))
    if not outputs.is_chief:
        return
    outputs.publish_model()
    title = f"{short_name(splits.name)} test set: accuracy {metrics['test_accuracy']:.4f}"
    with writing(f"--job-dir {config.job_dir}: cannot write plots/ and metrics.json", "the model is exported"):
        plots.write_run_plots(outputs.plots_dir, metrics["history"], splits.test[1], predictions["test"],
                              splits.class_names, title, misclassified)
        atomic.write_json(outputs.metrics_path, metrics)
    outputs.publish_job_files()
    log(outputs.written_line())
