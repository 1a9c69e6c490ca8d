"""Images as every part of the trainer sees them: uint8 [N, H, W] (grey) or [N, H, W, 3] (colour), their
shape and number of classes read from the data (`ImageShape`). IMAGE_SIZE and NUM_CLASSES are MNIST's
format: what a model folder without a recorded shape was trained on.

`describe_images` reads from a training set how its images are made (the export records it beside the
model, so that predict can bring other images to the same form). `to_model_pixels` is the one resize both the
folder reader (training images of any size) and predict (any image) use, so the two make the same pixels.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

IMAGE_SIZE = 28
NUM_CLASSES = 10
MIN_SIDE, MAX_SIDE = 4, 1024  # pixels a side of a training image: from tiny icons to large photos


class ImageShape(NamedTuple):
    """What a model is built for: its input images' height, width and channels (1 or 3), and its classes."""

    height: int
    width: int
    channels: int
    num_classes: int

    @property
    def input_shape(self) -> tuple:
        return (self.height, self.width, self.channels)

    def text(self) -> str:
        """e.g. '32x32x3 images, 10 classes'."""
        return f"{self.height}x{self.width}x{self.channels} images, {self.num_classes} classes"


MNIST_SHAPE = ImageShape(IMAGE_SIZE, IMAGE_SIZE, 1, NUM_CLASSES)


def image_shape(images: np.ndarray, num_classes: int) -> ImageShape:
    """The ImageShape of uint8 images [N, H, W] (grey) or [N, H, W, 3]."""
    channels = 1 if images.ndim == 3 else int(images.shape[3])
    return ImageShape(int(images.shape[1]), int(images.shape[2]), channels, num_classes)


def luminance(images: np.ndarray) -> np.ndarray:  # float32 [..., H, W]
    """[..., H, W] grey images as they are; [..., H, W, 3] colour ones as float32 0.299 R + 0.587 G + 0.114 B."""
    if images.ndim == 4:
        return np.asarray(images, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.asarray(images, dtype=np.float32)

DESCRIBED_EXAMPLES = 10_000  # the statistics are read from at most this many training images (the first ones)
PRESENT = 0.1 * 255  # a pixel this far from the background level is part of the object


def describe_images(images: np.ndarray, class_names: Optional[Sequence[str]] = None,
                    preprocess: str = "frame") -> dict:
    """uint8 [N, H, W] or [N, H, W, 3] training images -> how they are made, from their statistics (of the
    luminance, for colour images):

    - `background`: "dark" or "light", and `background_level`, the median of the outermost ring of pixels;
    - `object_side`: the median longest side, in pixels, of the box around each image's object (the pixels
      at least PRESENT from the background level): MNIST's digits 20, Fashion-MNIST's garments 28;
    - `centring`: "mass" when the objects' centres of mass sit nearer the frame's centre than their boxes'
      centres do (MNIST's digits, centred by mass), else "box" (Fashion-MNIST's garments, boxes centred);
      `mass_offset` and `box_offset` are those median distances in pixels;
    - `height`, `width`, `channels` (1 or 3): the model's input; `class_names` when given;
    - `preprocess`: "resize" when the training images were resized from files of other sizes (a folder of
      images), "frame" when they came at the model's size (TFDS, IDX).
    """
    channels = 1 if images.ndim == 3 else int(images.shape[3])
    pixels = luminance(images[:DESCRIBED_EXAMPLES])
    count, height, width = pixels.shape
    ring = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]], axis=1)
    level = float(np.median(ring))
    weight = np.abs(pixels - level)
    present = weight >= PRESENT
    has_object = np.asarray(present.any(axis=(1, 2)))
    rows, cols = np.asarray(present.any(axis=2))[has_object], np.asarray(present.any(axis=1))[has_object]
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
        height=int(height), width=int(width), channels=channels,
        **({} if class_names is None else dict(class_names=[str(name) for name in class_names])),
        preprocess=preprocess,
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
