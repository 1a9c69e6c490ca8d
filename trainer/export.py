"""Exports: SavedModel with a uint8 serving signature, a .keras copy, metrics.json, plots. All atomic.

A model folder is written beside its destination under a temporary name and swapped in whole, so an
interrupted export never leaves half a model where a good one was.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from typing import Dict, List, Sequence

import numpy as np

from trainer.errors import TrainerError
from trainer.joblock import process_alive

CLASS_NAMES_FILE = "class_names.json"
KERAS_FILE = "model.keras"


def _readable(path: str, directory: bool = False) -> None:
    """mkstemp/mkdtemp make owner-only files; give finished outputs the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def _replace_dir(staged: str, final: str) -> None:
    """Swap a finished folder into place; the old one is removed only after the new one is in."""
    final = final.rstrip("/")
    previous = None
    if os.path.exists(final):
        if not is_model_folder(final):
            raise foreign_model_dir(final)
        previous = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.replaced-{os.getpid()}")
        os.replace(final, previous)
    os.replace(staged, final)
    if previous:
        shutil.rmtree(previous, ignore_errors=True)


# What an export writes into a model folder (`_SUCCESS` comes with a gs:// publish).
EXPORT_NAMES = {"saved_model.pb", "fingerprint.pb", "variables", "assets", KERAS_FILE, CLASS_NAMES_FILE, "_SUCCESS"}


def is_exported_model(names) -> bool:
    """Folder entries (relative paths) that only an export (or a publish cut short) could have made."""
    return all(name.split("/")[0] in EXPORT_NAMES for name in names)


def is_model_folder(path: str) -> bool:
    """True when `path` is absent, empty or holds only what an export writes: the only folders export replaces."""
    if not os.path.isdir(path):
        return not os.path.exists(path)
    return is_exported_model(os.listdir(path))


def foreign_model_dir(shown: str) -> TrainerError:
    """The refusal of a --model-dir that holds something an export would have to delete."""
    return TrainerError(f"--model-dir {shown}: holds files that are not a model exported by this trainer; the "
                        "export would delete them, so choose an empty or new folder")


_DEBRIS = (re.compile(r"^\.(?P<base>.+)\.(?P<kind>partial)-(?P<pid>\d{1,7})-[a-z0-9_]{8}$"),
           re.compile(r"^\.(?P<base>.+)\.(?P<kind>replaced)-(?P<pid>\d{1,7})$"))


def remove_export_debris(model_dir: str) -> List[str]:
    """Remove what an export killed part-way left beside `model_dir` when process PID is gone:
    `.NAME.partial-PID-XXXXXXXX` staging folders and `.NAME.replaced-PID` swapped-out models (one whose
    replacement never arrived is put back instead). Returns the removed names."""
    model_dir = os.path.abspath(model_dir.rstrip("/"))
    parent, base = os.path.split(model_dir)
    removed = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
        match = _DEBRIS[0].match(name) or _DEBRIS[1].match(name)
        if not match or match["base"] != base:
            continue
        pid, path = int(match["pid"]), os.path.join(parent, name)
        if pid != os.getpid() and process_alive(pid):
            continue  # another live process's export in progress
        if match["kind"] == "replaced" and not is_model_folder(path):
            continue  # not what an export swapped out: leave it alone
        if match["kind"] == "replaced" and not os.path.exists(model_dir):
            os.replace(path, model_dir)  # killed between the two renames: the previous model comes back
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    return removed


def write_json_atomic(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handle, staged = tempfile.mkstemp(prefix=".partial-", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(handle, "w") as out:
        json.dump(payload, out, indent=2, sort_keys=True)
        out.write("\n")
    _readable(staged)
    os.replace(staged, path)


def serving_signature():
    """The one input of `serving_default`: raw uint8 pixels, any batch size."""
    import tensorflow as tf

    return [tf.TensorSpec([None, 28, 28], tf.uint8, name="image")]


def serving_function(model):
    """The `serving_default` computation: uint8 images [N, 28, 28] -> classes and probabilities."""
    import tensorflow as tf

    def serve(image):
        pixels = tf.cast(image, tf.float32)[..., tf.newaxis] / 255.0
        probabilities = model(pixels, training=False)
        return {"classes": tf.argmax(probabilities, axis=-1, output_type=tf.int64), "probabilities": probabilities}

    return serve


def export_model(model, model_dir: str, class_names: Sequence[str]) -> None:
    """SavedModel (`serving_default`: uint8 image [N,28,28] -> classes [N] int64, probabilities [N,10])."""
    import keras
    import tensorflow as tf

    model_dir = os.path.abspath(model_dir.rstrip("/"))
    parent = os.path.dirname(model_dir)
    os.makedirs(parent, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=f".{os.path.basename(model_dir)}.partial-{os.getpid()}-", dir=parent)
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(name="serving_default", fn=serving_function(model), input_signature=serving_signature())
        archive.write_out(staged, verbose=False)
        from trainer.model import stock_model

        stock_model(model).save(os.path.join(staged, KERAS_FILE))
        with open(os.path.join(staged, CLASS_NAMES_FILE), "w") as out:
            json.dump(list(class_names), out)
        _readable(staged, directory=True)
        _replace_dir(staged, model_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def load_class_names(model_dir: str) -> List[str]:
    path = os.path.join(model_dir, CLASS_NAMES_FILE)
    if os.path.isfile(path):
        with open(path) as handle:
            return json.load(handle)
    return [str(d) for d in range(10)]


# ---------------------------------------------------------------------------------------------- plots

def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(figure)
    return buffer.getvalue()


def curve_pngs(history: List[Dict[str, float]]) -> Dict[str, bytes]:
    """accuracy.png and loss.png: train vs validation per epoch, as the seed notebook shows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    pngs = {}
    for metric in ("accuracy", "loss"):
        figure, axes = plt.subplots(figsize=(6, 4))
        axes.plot(epochs, [row[metric] for row in history], marker="o", label="train")
        axes.plot(epochs, [row[f"val_{metric}"] for row in history], marker="o", label="validation")
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axes.set_ylabel(metric)
        axes.set_title(f"Model {metric}")
        axes.grid(alpha=0.3)
        axes.legend()
        pngs[f"{metric}.png"] = _figure_png(figure)
    return pngs


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int = 10) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predictions.astype(np.int64)), 1)
    return matrix


def confusion_png(matrix: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """Counts of (true, predicted) pairs, readable at 10 classes: counts in 10 pt, labels upright when
    they are short (digits), a colour bar that says what its colours count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 7))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04).set_label("test examples", fontsize=11)
    ticks = np.arange(len(class_names))
    upright = max(len(name) for name in class_names) <= 3
    axes.set_xticks(ticks, labels=class_names, rotation=0 if upright else 35, ha="center" if upright else "right",
                    fontsize=11)
    axes.set_yticks(ticks, labels=class_names, fontsize=11)
    axes.set_xlabel("predicted", fontsize=11)
    axes.set_ylabel("true", fontsize=11)
    axes.set_title(title, fontsize=12)
    threshold = matrix.max() / 2 if matrix.size else 0
    size = 10 if len(class_names) <= 10 else 8
    for row in range(matrix.shape[0]):
        for col in range(matrix.shape[1]):
            axes.text(col, row, str(matrix[row, col]), ha="center", va="center", fontsize=size,
                      color="white" if matrix[row, col] > threshold else "black")
    return _figure_png(figure)


def misclassified_png(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                      class_names: Sequence[str], limit: int = 25) -> bytes:
    """A grid of up to `limit` wrongly classified images, each titled 'true -> predicted'."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrong = np.flatnonzero(labels != predictions)[:limit]
    columns = 5
    rows = max(1, int(np.ceil(len(wrong) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.8, rows * 2.0), squeeze=False)
    for slot, axis in enumerate(axes.flat):
        axis.axis("off")
        if slot < len(wrong):
            index = wrong[slot]
            axis.imshow(images[index], cmap="gray")
            axis.set_title(f"{class_names[labels[index]]} -> {class_names[predictions[index]]}", fontsize=8)
    if not len(wrong):
        axes.flat[0].text(0.5, 0.5, "no misclassified examples", ha="center")
    figure.suptitle("Misclassified validation examples (true -> predicted)", fontsize=9)
    return _figure_png(figure)


def write_plots(plots_dir: str, pngs: Dict[str, bytes]) -> None:
    os.makedirs(plots_dir, exist_ok=True)
    for name, data in pngs.items():
        handle, staged = tempfile.mkstemp(prefix=".partial-", dir=plots_dir)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        _readable(staged)
        os.replace(staged, os.path.join(plots_dir, name))
