"""An image -> the uint8 [28, 28] input the model takes, the way its training images were made.

The model folder's training_images.json says how (`TrainingImages`: background polarity and level, the
object's size in the frame, how it is centred). An image that already looks like the training data (28x28,
grey, the background of the training images' polarity) goes to the model unchanged. Any other is cleaned
up (trainer.predict.cleanup: the object's strength against its background; when the training objects fill
the frame, as garments do, the background is read from the image's border and the object's shading kept in
proportion) and re-framed as the training images are framed:

- "mass" (MNIST's digits): the object's box scaled to fit `object_side` (20) pixels a side, aspect kept,
  placed in 28x28 so its centre of mass sits at the centre;
- "box" (Fashion-MNIST's garments): the box scaled so its longest side is `object_side` (28) pixels,
  its centre at the frame's centre (half a pixel below and right of it for an odd margin, as theirs);

then drawn light on dark or dark on light as the training images' background is. A model folder without
training_images.json (exported before the file existed) is a digit model: every image, 28x28 or not, is
cleaned up and framed as MNIST's digits are (`to_mnist`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from trainer.images import IMAGE_SIZE
from trainer.model_folder import TrainingImages
from trainer.predict.cleanup import BLANK, MIN_INK_CONTRAST, MIN_INK_PIXELS, Blank, ink, object_filling_the_frame
from trainer.predict.reading import image_to_rgb, open_image

DIGITS = TrainingImages(background="dark", background_level=0, object_side=20, centring="mass")  # MNIST's
FILLS_FRAME = 0.85  # training objects this large a share of the frame's side are read as filling it (garments)


# ------------------------------------------------------------------------------------------ framing

def _crop_to_object(strength: np.ndarray) -> np.ndarray:
    """Object strength [H, W] in 0..1 -> grey 0..255, cropped to the box of what is at least a tenth of its peak."""
    gray = strength.astype(np.float32) * 255.0
    mask = gray > 0.1 * gray.max()
    if not mask.any():
        raise Blank(BLANK)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _scaled(crop: np.ndarray, side: int) -> np.ndarray:
    """The crop resized so its longest side is `side` pixels (aspect kept)."""
    from PIL import Image

    scale = side / max(crop.shape)
    height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    resized = np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32)
    resized = np.clip(resized, 0, 255)
    if resized.sum() == 0:
        raise Blank(BLANK)
    return resized


def _paste(resized: np.ndarray, top: int, left: int) -> np.ndarray:
    """`resized` on a black 28x28 canvas at (top, left), clipped at the edges, brightest pixel 255."""
    height, width = resized.shape
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    src_top, src_left = max(0, -top), max(0, -left)
    dst_top, dst_left = max(0, top), max(0, left)
    rows_n = min(height - src_top, IMAGE_SIZE - dst_top)
    cols_n = min(width - src_left, IMAGE_SIZE - dst_left)
    canvas[dst_top:dst_top + rows_n, dst_left:dst_left + cols_n] = \
        resized[src_top:src_top + rows_n, src_left:src_left + cols_n]
    return np.round(canvas * (255.0 / canvas.max())).astype(np.uint8)


def centre_like_mnist(strength: np.ndarray, side: int = 20) -> np.ndarray:
    """Object strength [H, W] in 0..1 -> uint8 [28, 28]: box scaled to fit side x side, centre of mass at the centre."""
    resized = _scaled(_crop_to_object(strength), side)
    height, width = resized.shape
    total = resized.sum()
    centre_row = (resized.sum(axis=1) * np.arange(height)).sum() / total
    centre_col = (resized.sum(axis=0) * np.arange(width)).sum() / total
    return _paste(resized, int(round(IMAGE_SIZE / 2 - centre_row)), int(round(IMAGE_SIZE / 2 - centre_col)))


def fill_frame(strength: np.ndarray, side: int = IMAGE_SIZE) -> np.ndarray:
    """Object strength [H, W] in 0..1 -> uint8 [28, 28]: box scaled so its longest side is `side`, box centred."""
    resized = _scaled(_crop_to_object(strength), side)
    height, width = resized.shape
    # an odd margin puts its extra pixel above and left, as Fashion-MNIST's garments have it
    return _paste(resized, -(-(IMAGE_SIZE - height) // 2), -(-(IMAGE_SIZE - width) // 2))


def frame(strength: np.ndarray, training: TrainingImages) -> np.ndarray:
    """Object strength [H, W] in 0..1 -> uint8 [28, 28] framed and drawn as the training images are."""
    if training.centring == "mass":
        framed = centre_like_mnist(strength, training.object_side)
    else:
        framed = fill_frame(strength, training.object_side)
    return framed if training.background == "dark" else 255 - framed


# ---------------------------------------------------------------------- like the training images?

def _ring(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])


def as_trained(image, rgb: np.ndarray, training: TrainingImages) -> Optional[np.ndarray]:
    """The image's pixels as uint8 [28, 28] when it already looks like the training images (their size,
    grey and opaque, its border on the side of mid-grey their background is); else None."""
    if image.size != (IMAGE_SIZE, IMAGE_SIZE) or rgb.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        return None
    if "A" in image.mode or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return None
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        return None
    pixels = np.round(rgb[..., 0]).astype(np.uint8)
    border = float(np.median(_ring(pixels)))
    if abs(border - training.background_level) > abs(border - (255 - training.background_level)):
        return None
    if int((np.abs(pixels.astype(np.float32) - border) >= MIN_INK_CONTRAST).sum()) < MIN_INK_PIXELS:
        raise Blank(BLANK)
    return pixels


def to_model_input(image, training: Optional[TrainingImages]) -> np.ndarray:
    """A decoded PIL image -> uint8 [28, 28] as the model's training images were made (see the module's
    docstring); `training` None is a digit model exported without training_images.json. Raises Blank."""
    rgb = image_to_rgb(image)
    if training is not None:
        pixels = as_trained(image, rgb, training)
        if pixels is not None:
            return pixels
    training = training or DIGITS
    if training.object_side >= FILLS_FRAME * IMAGE_SIZE:
        return frame(object_filling_the_frame(rgb), training)
    return frame(ink(rgb), training)


def to_mnist(image) -> np.ndarray:
    """A PIL image -> uint8 [28, 28], white on black, framed as MNIST's digits. Raises Blank if nothing is there."""
    return frame(ink(image_to_rgb(image)), DIGITS)


def load_image(path: str, training: Optional[TrainingImages] = None) -> np.ndarray:
    """One image file -> uint8 [28, 28] for a model trained on images like `training` (None: digits, every
    image cleaned up); any fault is a TrainerError naming the file."""
    image = open_image(path)
    try:
        return to_model_input(image, training)
    except Blank as error:
        raise Blank(f"{path}: {error}") from None
    finally:
        image.close()
