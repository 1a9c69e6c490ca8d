"""The image format every part of the trainer agrees on: MNIST-format square grayscale images and their
number of classes. Data checks its files against it, the model takes it as input, the export serves it.

`describe_images` reads from a training set how its images are made (the export records it beside the
model, so that predict can bring other images to the same form). `to_model_pixels` is the one resize both the
folder reader (training images of any size) and predict (any image) use, so the two make the same pixels.
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 28
NUM_CLASSES = 10

DESCRIBED_EXAMPLES = 10_000  # the statistics are read from at most this many training images (the first ones)
PRESENT = 0.1 * 255  # a pixel this far from the background level is part of the object


def describe_images(images: np.ndarray) -> dict:
    """uint8 [N, H, W] training images -> how they are made, from their statistics:

    - `background`: "dark" or "light", and `background_level`, the median of the outermost ring of pixels;
    - `object_side`: the median longest side, in pixels, of the box around each image's object (the pixels
      at least PRESENT from the background level): MNIST's digits 20, Fashion-MNIST's garments 28;
    - `centring`: "mass" when the objects' centres of mass sit nearer the frame's centre than their boxes'
      centres do (MNIST's digits, centred by mass), else "box" (Fashion-MNIST's garments, boxes centred);
      `mass_offset` and `box_offset` are those median distances in pixels.
    """
    pixels = np.asarray(images[:DESCRIBED_EXAMPLES], dtype=np.float32)
    count, height, width = pixels.shape
    ring = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]], axis=1)
    level = float(np.median(ring))
    weight = np.abs(pixels - level)
    present = weight >= PRESENT
    has_object = present.any(axis=(1, 2))
    rows, cols = present.any(axis=2)[has_object], present.any(axis=1)[has_object]
    weight = weight[has_object]

    def extent(lines: np.ndarray):
        first = lines.argmax(axis=1)
        last = lines.shape[1] - 1 - lines[:, ::-1].argmax(axis=1)
        return first, last

    top, bottom = extent(rows)
    left, right = extent(cols)
    sides = np.maximum(bottom - top + 1, right - left + 1)
    total = weight.sum(axis=(1, 2))
    mass_row = (weight.sum(axis=2) * np.arange(height)).sum(axis=1) / total
    mass_col = (weight.sum(axis=1) * np.arange(width)).sum(axis=1) / total
    centre_row, centre_col = (height - 1) / 2, (width - 1) / 2
    mass_offset = float(np.median(np.hypot(mass_row - centre_row, mass_col - centre_col))) if len(total) else 0.0
    box_offset = float(np.median(np.hypot((top + bottom) / 2 - centre_row, (left + right) / 2 - centre_col))) \
        if len(total) else 0.0
    return dict(
        background="dark" if level < 128 else "light",
        background_level=int(round(level)),
        object_side=int(np.median(sides)) if len(sides) else min(height, width),
        centring="mass" if mass_offset <= box_offset else "box",
        mass_offset=round(mass_offset, 3),
        box_offset=round(box_offset, 3),
        examples_described=int(count),
    )


def to_model_pixels(rgb: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """An opaque image, float or uint8 [H, W, 3] in 0..255 (`trainer.predict.reading.image_to_rgb` makes one
    from any decoded file) -> the model's uint8 input: [height, width] when `channels` is 1 (luminance,
    ITU-R 601: 0.299 R + 0.587 G + 0.114 B), else [height, width, 3]. Resized with Pillow's bilinear filter,
    which averages over the whole source area when it shrinks (no aliasing), the aspect ratio not kept."""
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    pixels = np.clip(np.rint(np.asarray(rgb, dtype=np.float32)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if channels == 1:
        image = image.convert("L")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
