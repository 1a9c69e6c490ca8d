"""An image -> the uint8 input the model takes ([H, W] grey, [H, W, 3] colour), the way its training images
were made.

The model folder's training_images.json says how (`TrainingImages`): the model's height, width and
channels, and whether its training images were resized from files of other sizes ("resize") or came at
its size ("frame"), then, for the latter, their background polarity and level, the object's size in the
frame and how it is centred.

A colour model, and any "resize" model, takes the image as the folder reader made its training images:
the whole picture resized to the model's size (`trainer.images.to_model_pixels`), grey or colour as the
model is; no object is looked for. A grey "frame" model (MNIST, Fashion-MNIST, EMNIST, KMNIST...) takes an
image that already looks like its training data (its size, grey, the background of the training images'
polarity) unchanged. Any other is cleaned up (trainer.predict.cleanup: the object's strength against its
background; when the training objects fill the frame, as garments do, the background is read from the
image's border and the object's shading kept in proportion) and re-framed at the model's size as the
training images are framed:

- "mass" (MNIST's digits): the object's box scaled to fit `object_side` (20) pixels a side, aspect kept,
  placed so its centre of mass sits at the frame's centre;
- "box" (Fashion-MNIST's garments): the box scaled so its longest side is `object_side` (28) pixels
  (within the frame), its centre at the frame's centre (half a pixel below and right of it for an odd
  margin, as theirs);

then drawn light on dark or dark on light as the training images' background is. A model folder without
training_images.json (exported before the file existed) is a 28x28 digit model: every image, 28x28 or not,
is cleaned up and framed as MNIST's digits are (`to_mnist`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from trainer.images import to_model_pixels
from trainer.model_folder import DIGITS, TrainingImages
from trainer.predict.cleanup import BLANK, MIN_INK_CONTRAST, MIN_INK_PIXELS, Blank, ink, object_filling_the_frame
from trainer.predict.reading import image_to_rgb, open_image

FILLS_FRAME = 0.85  # training objects this large a share of the frame's side are read as filling it (garments)
DIGIT_FRAME = (DIGITS.height, DIGITS.width)


# ------------------------------------------------------------------------------------------ framing

def _crop_to_object(strength: np.ndarray) -> np.ndarray:
    """Object strength [H, W] in 0..1 -> grey 0..255, cropped to the box of what is at least a tenth of its peak."""
    gray = strength.astype(np.float32) * 255.0
    mask = gray > 0.1 * gray.max()
    if not mask.any():
        raise Blank(BLANK)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _scaled(crop: np.ndarray, side: int, frame_shape: Tuple[int, int]) -> np.ndarray:
    """The crop resized so its longest side is `side` pixels (aspect kept), or less where the frame
    (height, width) is narrower than that."""
    from PIL import Image

    scale = side / max(crop.shape)
    if crop.shape[0] * scale > frame_shape[0] or crop.shape[1] * scale > frame_shape[1]:
        scale = min(frame_shape[0] / crop.shape[0], frame_shape[1] / crop.shape[1])
    height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    resized = np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32)
    resized = np.clip(resized, 0, 255)
    if resized.sum() == 0:
        raise Blank(BLANK)
    return resized


def _paste(resized: np.ndarray, top: int, left: int, frame_shape: Tuple[int, int]) -> np.ndarray:
    """`resized` on a black canvas of `frame_shape` (height, width) at (top, left), clipped at the edges,
    brightest pixel 255."""
    height, width = resized.shape
    frame_height, frame_width = frame_shape
    canvas = np.zeros(frame_shape, dtype=np.float32)
    src_top, src_left = max(0, -top), max(0, -left)
    dst_top, dst_left = max(0, top), max(0, left)
    rows_n = min(height - src_top, frame_height - dst_top)
    cols_n = min(width - src_left, frame_width - dst_left)
    canvas[dst_top:dst_top + rows_n, dst_left:dst_left + cols_n] = \
        resized[src_top:src_top + rows_n, src_left:src_left + cols_n]
    return np.round(canvas * (255.0 / canvas.max())).astype(np.uint8)


def centre_like_mnist(strength: np.ndarray, side: int = DIGITS.object_side,
                      frame_shape: Tuple[int, int] = DIGIT_FRAME) -> np.ndarray:
    """Object strength [H, W] in 0..1 -> uint8 `frame_shape` (28x28): box scaled to fit side x side, centre of
    mass at the frame's centre."""
    resized = _scaled(_crop_to_object(strength), side, frame_shape)
    height, width = resized.shape
    total = resized.sum()
    centre_row = (resized.sum(axis=1) * np.arange(height)).sum() / total
    centre_col = (resized.sum(axis=0) * np.arange(width)).sum() / total
    return _paste(resized, int(round(frame_shape[0] / 2 - centre_row)), int(round(frame_shape[1] / 2 - centre_col)),
                  frame_shape)


def fill_frame(strength: np.ndarray, side: Optional[int] = None,
               frame_shape: Tuple[int, int] = DIGIT_FRAME) -> np.ndarray:
    """Object strength [H, W] in 0..1 -> uint8 `frame_shape` (28x28): box scaled so its longest side is `side`
    (the frame's longest side when None), box centred."""
    resized = _scaled(_crop_to_object(strength), side or max(frame_shape), frame_shape)
    height, width = resized.shape
    # an odd margin puts its extra pixel above and left, as Fashion-MNIST's garments have it
    return _paste(resized, -(-(frame_shape[0] - height) // 2), -(-(frame_shape[1] - width) // 2), frame_shape)


def frame(strength: np.ndarray, training: TrainingImages) -> np.ndarray:
    """Object strength [H, W] in 0..1 -> uint8 [height, width] framed and drawn as the training images are."""
    frame_shape = (training.height, training.width)
    if training.centring == "mass":
        framed = centre_like_mnist(strength, training.object_side, frame_shape)
    else:
        framed = fill_frame(strength, training.object_side, frame_shape)
    return framed if training.background == "dark" else 255 - framed


# ---------------------------------------------------------------------- like the training images?

def _ring(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])


def as_trained(image, rgb: np.ndarray, training: TrainingImages) -> Optional[np.ndarray]:
    """The image's pixels as uint8 [height, width] when it already looks like a grey model's training images
    (their size, grey and opaque, its border on the side of mid-grey their background is); else None."""
    size = (training.width, training.height)
    if image.size != size or rgb.shape[:2] != size[::-1]:
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


def resizes(training: TrainingImages) -> bool:
    """Whether images go to this model resized whole, as the folder reader made its training images (colour
    models and "resize" models), rather than cleaned up and framed."""
    return training.channels == 3 or training.preprocess == "resize"


def to_model_input(image, training: Optional[TrainingImages]) -> np.ndarray:
    """A decoded PIL image -> uint8 [H, W] (grey) or [H, W, 3] (colour) as the model's training images were
    made (see the module's docstring); `training` None is a digit model exported without
    training_images.json. Raises Blank."""
    rgb = image_to_rgb(image)
    if training is not None:
        if resizes(training):
            return to_model_pixels(rgb, training.height, training.width, training.channels)
        pixels = as_trained(image, rgb, training)
        if pixels is not None:
            return pixels
    training = training or DIGITS
    if training.object_side >= FILLS_FRAME * max(training.height, training.width):
        return frame(object_filling_the_frame(rgb), training)
    return frame(ink(rgb), training)


def to_mnist(image) -> np.ndarray:
    """A PIL image -> uint8 [28, 28], white on black, framed as MNIST's digits. Raises Blank if nothing is there."""
    return frame(ink(image_to_rgb(image)), DIGITS)


def load_image(path: str, training: Optional[TrainingImages] = None) -> np.ndarray:
    """One image file -> the model's uint8 input for a model trained on images like `training` (None: 28x28
    digits, every image cleaned up); any fault is a TrainerError naming the file."""
    image = open_image(path)
    try:
        return to_model_input(image, training)
    except Blank as error:
        raise Blank(f"{path}: {error}") from None
    finally:
        image.close()
