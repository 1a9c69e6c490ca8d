"""The run's plots as PNG bytes: training curves, the test confusion matrix, misclassified examples (also
shown in TensorBoard), and writing them into plots/. Any number of classes (the confusion matrix stays
readable from 2 to 100) and any image size, grey or colour."""

from __future__ import annotations

import io
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from trainer import atomic


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


COUNTS_UP_TO = 20  # classes: with more, the cells are too small for their counts (their colour tells)
MAX_FIGURE_INCHES = 16.0  # the confusion matrix grows with its classes up to this width
NAME_CHARS = 24  # a longer class name is cut to this many characters in a plot's labels


def short(name: str, chars: int = NAME_CHARS) -> str:
    """`name`, cut to `chars` characters when longer: its start and its end, an ellipsis between (names of one
    dataset often differ only at the end)."""
    if len(name) <= chars:
        return name
    tail = (chars - 1) // 2
    return name[:chars - 1 - tail] + "\u2026" + name[len(name) - tail:]


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: Optional[int] = None) -> np.ndarray:
    """Counts of (true, predicted) pairs, [num_classes, num_classes] (by default 1 + the largest class seen)."""
    labels, predictions = labels.astype(np.int64), predictions.astype(np.int64)
    if num_classes is None:
        num_classes = int(max(labels.max(initial=0), predictions.max(initial=0))) + 1
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def confusion_layout(classes: int) -> Tuple[Tuple[float, float], float]:
    """The confusion matrix's figure size (inches) and label font size (points) for `classes` classes: 8x7 and
    11 pt up to 10 classes; then a figure growing with the classes up to MAX_FIGURE_INCHES wide, and labels
    about half a cell high (a cell is about 0.7 of the figure's height over the classes)."""
    if classes <= 10:
        return (8.0, 7.0), 11.0
    width = min(MAX_FIGURE_INCHES, 2.5 + 0.28 * classes)
    cell_points = 0.7 * (width - 1) * 72 / classes
    return (width, width - 1), float(np.clip(round(0.55 * cell_points, 1), 5.0, 11.0))


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str):
    """The confusion matrix as a matplotlib figure: counts in each cell up to COUNTS_UP_TO classes (10 pt up to
    10), labels upright when they are short (digits, letters), turned when long (35 degrees up to 10 classes,
    upright on end beyond), cut to NAME_CHARS characters; a colour bar that says what its colours count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = len(class_names)
    figsize, fontsize = confusion_layout(classes)
    figure, axes = plt.subplots(figsize=figsize)
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04).set_label("test examples", fontsize=11)
    ticks = np.arange(classes)
    names = [short(name) for name in class_names]
    upright = max(len(name) for name in names) <= 3
    rotation, align = (0, "center") if upright else (35, "right") if classes <= 10 else (90, "center")
    axes.set_xticks(ticks, labels=names, rotation=rotation, ha=align, fontsize=fontsize)
    axes.set_yticks(ticks, labels=names, fontsize=fontsize)
    axes.set_xlabel("predicted", fontsize=11)
    axes.set_ylabel("true", fontsize=11)
    axes.set_title(title, fontsize=12)
    if classes <= COUNTS_UP_TO:
        threshold = matrix.max() / 2 if matrix.size else 0
        size = 10 if classes <= 10 else 7
        for row in range(matrix.shape[0]):
            for col in range(matrix.shape[1]):
                axes.text(col, row, str(matrix[row, col]), ha="center", va="center", fontsize=size,
                          color="white" if matrix[row, col] > threshold else "black")
    return figure


def confusion_png(matrix: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """The confusion matrix (`confusion_figure`) as PNG bytes."""
    return _figure_png(confusion_figure(matrix, class_names, title))


def _caption(true: str, predicted: str) -> str:
    """'true -> predicted' on one line when it fits a tile (Fashion-MNIST's names do), else on two, each name cut."""
    caption = f"{true} -> {predicted}"
    return caption if len(caption) <= 26 else f"{short(true, 22)}\n-> {short(predicted, 22)}"


def misclassified_png(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                      class_names: Sequence[str], limit: int = 25) -> bytes:
    """A grid of up to `limit` wrongly classified images (uint8 [N, H, W] grey or [N, H, W, 3] colour, any
    size), each titled 'true -> predicted'."""
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
            image = images[index]
            if image.ndim == 3 and image.shape[-1] == 1:
                image = image[..., 0]
            axis.imshow(image, cmap="gray" if image.ndim == 2 else None)
            axis.set_title(_caption(class_names[labels[index]], class_names[predictions[index]]), fontsize=8)
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
