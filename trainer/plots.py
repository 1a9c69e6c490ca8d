"""The run's plots as PNG bytes: training curves, the test confusion matrix, misclassified examples (also
shown in TensorBoard), and writing them into plots/."""

from __future__ import annotations

import io
import os
from typing import Dict, List, Sequence

import numpy as np

from trainer import atomic
from trainer.images import NUM_CLASSES


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


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
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
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.8, rows * 2.0), squeeze=False,
                                layout="constrained")
    for slot, axis in enumerate(axes.flat):
        axis.axis("off")
        if slot < len(wrong):
            index = wrong[slot]
            axis.imshow(images[index], cmap="gray")
            axis.set_title(f"{class_names[labels[index]]} -> {class_names[predictions[index]]}", fontsize=8)
    if not len(wrong):
        figure.text(0.5, 0.5, "no misclassified examples", ha="center", va="center")
    figure.suptitle("Misclassified validation examples (true -> predicted)", fontsize=9)
    return _figure_png(figure)


def write_run_plots(plots_dir: str, history: List[Dict[str, float]], test_labels: np.ndarray,
                    test_predictions: np.ndarray, class_names: Sequence[str], title: str,
                    misclassified: bytes) -> None:
    """Every plot of a finished run into plots/: accuracy.png, loss.png, confusion_matrix.png (titled
    `title`) and the already drawn misclassified.png."""
    pngs = curve_pngs(history)
    matrix = confusion_matrix(test_labels, test_predictions, len(class_names))
    pngs["confusion_matrix.png"] = confusion_png(matrix, class_names, title)
    pngs["misclassified.png"] = misclassified
    write_plots(plots_dir, pngs)


def write_plots(plots_dir: str, pngs: Dict[str, bytes]) -> None:
    os.makedirs(plots_dir, exist_ok=True)
    for name, data in pngs.items():
        atomic.write_bytes(os.path.join(plots_dir, name), data)
