"""The model side of predict: the model folder (local, or gs:// downloaded once complete) checked before
TensorFlow loads it, its class names, how its training images are made, and the classification itself.

A model folder is checked before TensorFlow loads it, so that a damaged or foreign one is one line naming
the file at fault (trainer.model_folder): each file an export writes is there and not empty,
training_images.json (when there) is valid, class_names.json holds the names it records (ten, when it
records none), saved_model.pb parses and has the trainer's serving signature for that image shape and class
count, every variable reads back from variables/.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from trainer import storage
from trainer.errors import TrainerError, require_tensorflow
from trainer.model_folder import (
    DIGITS,
    TrainingImages,
    check_model_files,
    fault,
    load_serving,
    local_model_dir,
    read_class_names,
    read_training_images,
)


def missing_bucket(model_dir: str) -> Optional[str]:
    """What is wrong with a gs:// --model-dir that names no bucket (`gs://`, `gs:///model`), else None."""
    if storage.is_gcs(model_dir) and not model_dir[len("gs://"):].partition("/")[0]:
        return f"--model-dir {model_dir}: no bucket named (write gs://BUCKET/PATH, e.g. gs://my-bucket/runs/run1/model)"
    return None


class Model(NamedTuple):
    """A checked model folder: where it is on this machine, as the user named it, what it knows of its data."""

    local: str
    shown: str
    class_names: List[str]
    training: Optional[TrainingImages]  # None: exported before training_images.json, a digit model

    @property
    def shape(self) -> Tuple[int, int, int]:
        """The model's input: (height, width, channels)."""
        training = self.training or DIGITS
        return training.height, training.width, training.channels

    def serving(self):
        """The `serving_default` function, once saved_model.pb and variables/ are checked (imports TensorFlow)."""
        return load_serving(self.local, self.shown, self.training, len(self.class_names))


def open_model(model_dir: str) -> Model:
    """The model folder named by --model-dir, its files checked (no TensorFlow yet); faults are one line."""
    problem = missing_bucket(model_dir)
    if problem:
        raise TrainerError(problem)
    shown = model_dir.rstrip("/") if storage.is_gcs(model_dir) else model_dir  # faults name what was typed
    local = local_model_dir(model_dir)
    check_model_files(local, shown)
    training = read_training_images(local, shown)
    return Model(local, shown, read_class_names(local, shown, training), training)


Answer = Tuple[int, str, float]  # a class index, its name, its probability


def classify_top(serving, class_names: Sequence[str], images: np.ndarray, shown: str,
                 top: int = 1) -> List[List[Answer]]:
    """uint8 [N, H, W] or [N, H, W, 3], the model's input -> for each image its `top` most probable classes
    (at most the model's class count), the model's own answer (its `classes` output) first, then the others
    by probability, with the loaded `serving` function."""
    tf = require_tensorflow()
    try:
        outputs = serving(image=tf.constant(images))
    except tf.errors.OpError as error:
        raise fault(shown, f"the model failed on these images ({type(error).__name__})") from None
    classes = outputs["classes"].numpy()
    probabilities = outputs["probabilities"].numpy()
    answers = []
    for row, first in zip(probabilities, classes.astype(int), strict=True):
        runners_up = [int(k) for k in np.argsort(-row, kind="stable") if k != first][:top - 1]
        answers.append([(k, class_names[k], float(row[k])) for k in (first, *runners_up)])
    return answers


def classify(serving, class_names: Sequence[str], images: np.ndarray, shown: str) -> List[Answer]:
    """uint8 [N, H, W] or [N, H, W, 3], the model's input -> [(class index, class name, probability)] with the
    loaded `serving` function."""
    return [ranked[0] for ranked in classify_top(serving, class_names, images, shown)]
