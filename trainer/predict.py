"""`python -m trainer.predict --model-dir DIR image.png ...`: one line per image, class, name, probability.

Images of any size, colour or polarity are brought to MNIST's form first: grayscale, white on black,
the object's bounding box scaled to fit 20x20 (aspect kept), then placed in 28x28 so its centre of
mass sits at the centre.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from trainer.errors import TrainerError, require_tensorflow


def to_mnist(image) -> np.ndarray:
    """A PIL image -> uint8 [28, 28], white object on black, as MNIST was made."""
    from PIL import Image

    gray = np.asarray(image.convert("L"), dtype=np.float32)
    def border(pixels):
        return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])

    if np.median(border(gray)) > 127:  # dark ink on a light background: invert
        gray = 255.0 - gray
    gray = np.clip(gray - np.median(border(gray)), 0, 255)  # background to exactly black
    mask = gray > 0.1 * gray.max() if gray.max() > 0 else np.zeros_like(gray, dtype=bool)
    if not mask.any():
        return np.zeros((28, 28), dtype=np.uint8)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    scale = 20.0 / max(crop.shape)
    height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    resized = np.asarray(Image.fromarray(crop).resize((width, height), Image.LANCZOS), dtype=np.float32)
    resized = np.clip(resized, 0, 255)
    total = resized.sum()
    if total == 0:
        return np.zeros((28, 28), dtype=np.uint8)
    centre_row = (resized.sum(axis=1) * np.arange(height)).sum() / total
    centre_col = (resized.sum(axis=0) * np.arange(width)).sum() / total
    top = int(round(14 - centre_row))
    left = int(round(14 - centre_col))
    canvas = np.zeros((28, 28), dtype=np.float32)
    # Paste with clipping, in case the centre of mass pushes part of the box off the canvas.
    src_top, src_left = max(0, -top), max(0, -left)
    dst_top, dst_left = max(0, top), max(0, left)
    rows_n = min(height - src_top, 28 - dst_top)
    cols_n = min(width - src_left, 28 - dst_left)
    canvas[dst_top:dst_top + rows_n, dst_left:dst_left + cols_n] = \
        resized[src_top:src_top + rows_n, src_left:src_left + cols_n]
    peak = canvas.max()
    return np.round(canvas * (255.0 / peak)).astype(np.uint8) if peak > 0 else canvas.astype(np.uint8)


def load_images(paths: Sequence[str]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    batch = []
    for path in paths:
        try:
            with Image.open(path) as image:
                batch.append(to_mnist(image))
        except FileNotFoundError:
            raise TrainerError(f"{path}: no such file") from None
        except (UnidentifiedImageError, OSError) as error:
            raise TrainerError(f"{path}: not a readable image ({error})") from None
    return np.stack(batch)


def predict(model_dir: str, paths: Sequence[str]):
    """[(path, class index, class name, probability)] for each image."""
    from trainer.export import load_class_names

    if not os.path.isfile(os.path.join(model_dir, "saved_model.pb")):
        raise TrainerError(f"--model-dir {model_dir}: no saved_model.pb there (point it at a run's model/ folder)")
    images = load_images(paths)
    tf = require_tensorflow()

    serving = tf.saved_model.load(model_dir).signatures["serving_default"]
    outputs = serving(image=tf.constant(images))
    classes = outputs["classes"].numpy()
    probabilities = outputs["probabilities"].numpy()
    names = load_class_names(model_dir)
    return [(path, int(c), names[int(c)], float(probabilities[i, c])) for i, (path, c) in
            enumerate(zip(paths, classes))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.predict",
                                     description="Classify images with an exported model.")
    parser.add_argument("--model-dir", required=True, help="a run's model/ folder (SavedModel)")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...), any size, colour or polarity")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        results = predict(args.model_dir, args.images)
    except TrainerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path, index, name, probability in results:
        label = f"{index} ({name})" if name != str(index) else str(index)
        print(f"{path}\t{label}\t{probability:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
