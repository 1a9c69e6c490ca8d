"""`python -m trainer.predict --model-dir DIR image.png ...`: one line per image, class, name, probability.

Images are brought to MNIST's form first, whatever they are: a scan, a phone photo of a digit on paper
(uneven lighting, noise, coloured ink, JPEG), a transparent canvas export, white on black or black on white.

1. Read: EXIF orientation applied, 16-bit grey scaled to 8 bits, transparency composited over a background
   that contrasts with the ink (black ink on alpha 0 goes over white), large photos reduced to at most
   `WORK_SIDE` pixels a side.
2. Separate ink from background: each colour channel's background (the paper and its lighting gradient)
   is a quadratic surface fitted through the paper's level in overlapping windows (a high percentile, so
   ink covering most of a window does not count), then subtracted. Both polarities are tried (dark ink on
   light paper, light on dark); the right one leaves most pixels within the noise of the paper and none
   beyond it. The ink's contrast is its largest difference from the background in any channel, so blue,
   red or pencil ink all count.
3. Threshold: Otsu's method on the (lightly smoothed) contrast, never below a noise floor measured on
   the image itself; specks far smaller than the main strokes are dropped. Grey levels are kept: contrast
   is ramped from the noise floor to the ink's typical contrast, so strokes stay anti-aliased as in MNIST.
   No ink at all (blank paper, one colour) is an error, never a class.
4. As MNIST was made: the ink's bounding box scaled to fit 20x20 (aspect kept), placed in 28x28 so its
   centre of mass sits at the centre, white on black.

`--model-dir gs://...` is read through `trainer.storage` (downloaded once into the local cache) and only
when its `_SUCCESS` object says the model is complete. `--show PATH` writes the 28x28 inputs as one PNG.

A model folder is checked before TensorFlow loads it, so that a damaged or foreign one is one line naming the
file at fault: each file an export writes is there and not empty, class_names.json is ten names,
saved_model.pb parses and has the trainer's serving signature, every variable reads back from variables/.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from trainer.errors import TrainerError, require_tensorflow
from trainer.images import IMAGE_SIZE
from trainer.model_folder import check_model_files, fault, load_serving, local_model_dir, read_class_names

WORK_SIDE = 512  # photos are reduced to this many pixels a side at most before the ink is looked for
# Pillow's own limit, here applied to the pixels decoded (a JPEG decodes at down to 1/8 scale, so a 200-megapixel
# photo is read): 9000x9000 RGBA, 81M pixels, decodes in about 1.3 s and at most 0.7 GB
MAX_DECODED_PIXELS = 89_478_485
MIN_NOISE_FLOOR = 12.0  # grey levels: contrast below this is never ink, even on a perfectly flat image
MIN_INK_CONTRAST = 32.0  # grey levels: ink fainter than this against its background is "no ink"
MIN_INK_PIXELS = 6  # fewer pixels above the threshold than this is no ink
SPECK_FRACTION = 0.05  # connected pieces of ink smaller than this share of the largest piece are dropped
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class NoInk(TrainerError):
    """The image has nothing that stands out from its background."""


# ------------------------------------------------------------------------------------------ reading

def _reduce(image):
    """Shrink a large image to at most WORK_SIDE a side (JPEG already decodes smaller: see `load_image`)."""
    if image.mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    factor = -(-max(image.size) // WORK_SIDE)
    return image.reduce(factor) if factor > 1 else image


def _upright_turn(image):
    """The transpose that shows `image` upright by its EXIF orientation tag (how the camera was held), or None."""
    from PIL import ExifTags, Image

    turns = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}
    return turns.get(image.getexif().get(ExifTags.Base.Orientation, 1))


def _has_alpha(image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Put transparent pixels on a background that contrasts with the ink (white under dark ink)."""
    weight = alpha.sum()
    if weight == 0:
        return np.full_like(rgb, 255.0)  # nothing opaque: nothing to see
    ink_luma = float((rgb @ LUMA * alpha).sum() / weight)
    background = 255.0 if ink_luma < 128 else 0.0
    return rgb * alpha[..., None] + background * (1.0 - alpha[..., None])


def image_to_rgb(image) -> np.ndarray:
    """A PIL image -> float32 [H, W, 3] in 0..255, opaque, at most WORK_SIDE a side."""
    turn = _upright_turn(image)
    image = _reduce(image)  # first: ImageOps.exif_transpose copied the whole image, turned or not
    if turn is not None:
        image = image.transpose(turn)
    if image.mode in ("I", "F"):
        gray = np.asarray(image, dtype=np.float32)
        if gray.max() > 255:
            gray = gray * (255.0 / 65535.0)  # 16-bit samples
        elif image.mode == "F" and gray.max() <= 1.0:
            gray = gray * 255.0
        return np.repeat(np.clip(gray, 0, 255)[..., None], 3, axis=2)
    if _has_alpha(image):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        return _composite(rgba[..., :3], rgba[..., 3] / 255.0)
    return np.asarray(image.convert("RGB"), dtype=np.float32)


# ------------------------------------------------------------------------- ink versus background

def _block_mean(plane: np.ndarray, side: int) -> np.ndarray:
    """Average-pool a plane down to at most `side` pixels a side (for the background fit)."""
    from PIL import Image

    height, width = plane.shape
    scale = min(1.0, side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (width, height):
        return plane
    return np.asarray(Image.fromarray(plane.astype(np.float32)).resize(size, Image.Resampling.BOX), dtype=np.float32)


def _quadratic_terms(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[N, 6] terms of a quadratic surface at positions y, x (each scaled to -1..1 across the image)."""
    y, x = np.ravel(y), np.ravel(x)
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)


def _grid(height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return 2 * y / max(height - 1, 1) - 1, 2 * x / max(width - 1, 1) - 1


def noise_sigma(plane: np.ndarray) -> float:
    """The pixel noise of a plane, from differences of pixels 3 apart in a row (3, because JPEG smooths
    noise over neighbours); their lower quartile, which pairs of paper pixels reach even around much ink."""
    differences = np.abs(plane[:, 3:] - plane[:, :-3])
    # |difference| of two equal-noise pixels is half-normal with scale sigma*sqrt(2); its quartile is 0.3186x that
    return float(np.percentile(differences, 25)) / (0.3186 * np.sqrt(2)) if differences.size else 0.0


def background(plane: np.ndarray, dark_ink: bool = True) -> np.ndarray:
    """The smooth background of one channel (paper and its lighting) under ink darker (or lighter) than it.

    The paper's level is read in 12x12 overlapping squares a third of the image's length a side, as their
    90th percentile (10th for light ink): where ink covers less than 90% of a window, that is paper, a
    little above its middle. A quadratic surface is fitted through those levels and refitted without the
    windows far from it, then lowered onto the middle of the pixels near it (the paper's own).
    """
    from numpy.lib.stride_tricks import sliding_window_view

    flip = 1.0 if dark_ink else -1.0
    small = flip * _block_mean(plane, 64)
    height, width = small.shape
    side = -(-max(height, width) // 3)
    window = (min(side, height), min(side, width))
    tops = np.unique(np.linspace(0, height - window[0], 12).round().astype(int))
    lefts = np.unique(np.linspace(0, width - window[1], 12).round().astype(int))
    windows = sliding_window_view(small, window)[tops][:, lefts]
    level = np.percentile(windows.reshape(len(tops), len(lefts), -1), 90, axis=-1).ravel()
    y, x = _grid(height, width)
    centre_y = np.array([y[top:top + window[0], 0].mean() for top in tops])
    centre_x = np.array([x[0, left:left + window[1]].mean() for left in lefts])
    terms = _quadratic_terms(*np.meshgrid(centre_y, centre_x, indexing="ij"))
    keep = np.ones(level.shape, dtype=bool)
    for _ in range(3):  # windows that read ink anyway (a bold stroke, a speck) are dropped
        coefficients = np.linalg.lstsq(terms[keep], level[keep], rcond=None)[0]
        residual = level - terms @ coefficients
        keep = np.abs(residual) <= 3 * max(1.4826 * float(np.median(np.abs(residual[keep]))), 0.5)
    residual = small - (_quadratic_terms(y, x) @ coefficients).reshape(small.shape)
    noise = noise_sigma(small)
    paper = residual[(residual >= -6 * noise - 1) & (residual <= 3 * noise + 1)]
    coefficients[0] += float(np.median(paper)) if paper.size else 0.0
    return flip * (_quadratic_terms(*_grid(*plane.shape)) @ coefficients).reshape(plane.shape).astype(np.float32)


def _box3(plane: np.ndarray) -> np.ndarray:
    padded = np.pad(plane, 1, mode="edge")
    height, width = plane.shape
    total = np.zeros_like(plane)
    for r in range(3):
        for c in range(3):
            total += padded[r:r + height, c:c + width]
    return total / 9.0


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a boolean mask by `radius` pixels (a square neighbourhood)."""
    out = mask
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
        length = out.shape[axis]
        out = np.logical_or.reduce([np.take(padded, np.arange(s, s + length), axis=axis)
                                    for s in range(2 * radius + 1)])
    return out


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The level that best splits `values` into two classes (Otsu's method: maximal between-class variance)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_below = np.cumsum(counts)
    weight_above = weight_below[-1] - weight_below
    mass_below = np.cumsum(counts * centres)
    mean_below = mass_below / np.maximum(weight_below, 1)
    mean_above = (mass_below[-1] - mass_below) / np.maximum(weight_above, 1)
    between = weight_below * weight_above * (mean_below - mean_above) ** 2
    return float(edges[1:][int(np.argmax(between))])


def _components(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """8-connected pieces of a mask: (label image, 0 = none; pixel count per label, index 0 unused)."""
    parent: List[int] = [0]

    def find(label: int) -> int:
        while parent[label] != label:
            parent[label] = parent[parent[label]]
            label = parent[label]
        return label

    labels = np.zeros(mask.shape, dtype=np.int32)
    previous: List[Tuple[int, int, int]] = []  # (start, end, label) runs of the row above
    for row in range(mask.shape[0]):
        line = np.concatenate([[False], mask[row], [False]])
        changes = np.flatnonzero(line[1:] != line[:-1])
        runs = []
        for start, end in zip(changes[::2], changes[1::2], strict=False):
            touching = [find(label) for s, e, label in previous if s <= end and e >= start]
            if touching:
                label = min(touching)
                for other in touching:
                    parent[other] = label
            else:
                label = len(parent)
                parent.append(label)
            labels[row, start:end] = label
            runs.append((start, end, label))
        previous = runs
    roots = np.array([find(label) for label in range(len(parent))], dtype=np.int32)
    labels = roots[labels]
    return labels, np.bincount(labels.ravel(), minlength=len(parent))


def ink(rgb: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3] 0..255 -> ink strength [H, W] in 0..1 (0 = background), anti-aliased.

    Raises NoInk when nothing stands out from the background.
    """
    luma = rgb @ LUMA
    noise = noise_sigma(luma)
    # Polarity (dark ink on light paper, or the reverse): under the right one most pixels lie within the
    # noise of the background (the paper) and hardly any beyond it on the side away from the ink; under the
    # wrong one the background is dragged towards the ink, and the ink lies beyond the paper.
    band = max(4 * noise, MIN_NOISE_FLOOR)
    score = {}
    for dark in (True, False):
        away_from_ink = (luma - background(luma, dark)) * (1 if dark else -1)
        score[dark] = int((np.abs(away_from_ink) <= band).sum()) - int((away_from_ink > band).sum())
    dark = score[True] >= score[False]
    residual = np.stack([rgb[..., c] - background(rgb[..., c], dark) for c in range(3)], axis=-1)
    contrast = np.clip(((-1.0 if dark else 1.0) * residual).max(axis=-1), 0, None)
    smooth = _box3(contrast)
    floor = max(MIN_NOISE_FLOOR, 4.0 * noise)
    mask = smooth > max(otsu_threshold(smooth), floor)
    if mask.sum() < MIN_INK_PIXELS or float(np.percentile(contrast[mask], 90)) < MIN_INK_CONTRAST:
        raise NoInk("no ink found: the image is blank or a single colour")
    labels, sizes = _components(mask)
    sizes[0] = 0
    kept = np.isin(labels, np.flatnonzero(sizes >= SPECK_FRACTION * sizes.max()))
    top = float(np.percentile(contrast[kept], 75))
    strength = np.clip((contrast - floor) / max(top - floor, 1.0), 0, 1)
    return (strength * _dilate(kept, 2)).astype(np.float32)


# ------------------------------------------------------------------------------ MNIST's framing

def centre_like_mnist(strength: np.ndarray) -> np.ndarray:
    """Ink strength [H, W] in 0..1 -> uint8 [28, 28]: box scaled to fit 20x20, centre of mass at the centre."""
    from PIL import Image

    gray = strength.astype(np.float32) * 255.0
    mask = gray > 0.1 * gray.max()
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    scale = 20.0 / max(crop.shape)
    height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    resized = np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32)
    resized = np.clip(resized, 0, 255)
    total = resized.sum()
    if total == 0:
        raise NoInk("no ink found: the image is blank or a single colour")
    centre_row = (resized.sum(axis=1) * np.arange(height)).sum() / total
    centre_col = (resized.sum(axis=0) * np.arange(width)).sum() / total
    top = int(round(IMAGE_SIZE / 2 - centre_row))
    left = int(round(IMAGE_SIZE / 2 - centre_col))
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    # Paste with clipping, in case the centre of mass pushes part of the box off the canvas.
    src_top, src_left = max(0, -top), max(0, -left)
    dst_top, dst_left = max(0, top), max(0, left)
    rows_n = min(height - src_top, IMAGE_SIZE - dst_top)
    cols_n = min(width - src_left, IMAGE_SIZE - dst_left)
    canvas[dst_top:dst_top + rows_n, dst_left:dst_left + cols_n] = \
        resized[src_top:src_top + rows_n, src_left:src_left + cols_n]
    return np.round(canvas * (255.0 / canvas.max())).astype(np.uint8)


def to_mnist(image) -> np.ndarray:
    """A PIL image -> uint8 [28, 28], white ink on black, as MNIST was made. Raises NoInk if blank."""
    return centre_like_mnist(ink(image_to_rgb(image)))


@contextlib.contextmanager
def _own_pixel_limit():
    """Pillow's decompression-bomb check off while an image is opened: `load_image` applies the same limit
    itself, to the pixels it will decode (a JPEG's after `draft`), and names the size. (Pillow's limit is a
    module global: this is for one thread at a time, as the command runs.)"""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _open_for_decoding(path: str):
    """The image at `path`, opened (not decoded), a JPEG set to decode at 1/2, 1/4 or 1/8 scale when large;
    refused when what would be decoded is more than MAX_DECODED_PIXELS."""
    from PIL import Image

    image = Image.open(path)
    factor = max(image.size) // WORK_SIDE
    if factor > 1:  # JPEG only: other formats decode whole, whatever is asked
        image.draft(image.mode, (image.size[0] // factor, image.size[1] // factor))
    width, height = image.size
    if width * height > MAX_DECODED_PIXELS:
        image.close()
        raise TrainerError(f"{path}: refused: {width:,}x{height:,} pixels to decode, more than the "
                           f"{MAX_DECODED_PIXELS:,} allowed (a decompression bomb?)")
    return image


def load_image(path: str) -> np.ndarray:
    """One image file -> uint8 [28, 28]; any fault is a TrainerError naming the file."""
    from PIL import UnidentifiedImageError

    try:
        with _own_pixel_limit():
            with _open_for_decoding(path) as image:
                image.verify()  # every chunk's checksum, for PNG (decoding alone skips the pixel data's)
            with _open_for_decoding(path) as image:
                image.load()
                return to_mnist(image)
    except FileNotFoundError:
        raise TrainerError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TrainerError(f"{path}: a folder, not an image file") from None
    except NoInk as error:
        raise TrainerError(f"{path}: {error}") from None
    except TrainerError:  # refused by its size, already naming the file
        raise
    except UnidentifiedImageError:
        raise TrainerError(f"{path}: not a readable image (an unknown format, or a corrupt header)") from None
    except MemoryError:
        raise TrainerError(f"{path}: too large to decode in memory") from None
    except Exception as error:  # Pillow reports corrupt data as OSError, SyntaxError, ValueError, zlib.error...
        raise TrainerError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None


def classify(serving, class_names: Sequence[str], images: np.ndarray, shown: str) -> List[Tuple[int, str, float]]:
    """uint8 [N, 28, 28] -> [(class index, class name, probability)] with the loaded `serving` function."""
    tf = require_tensorflow()
    try:
        outputs = serving(image=tf.constant(images))
    except tf.errors.OpError as error:
        raise fault(shown, f"the model failed on these images ({type(error).__name__})") from None
    classes = outputs["classes"].numpy()
    probabilities = outputs["probabilities"].numpy()
    return [(int(c), class_names[int(c)], float(probabilities[i, c])) for i, c in enumerate(classes)]


class Result(NamedTuple):
    """One image's outcome: what the model saw and said, or why it could not look."""

    path: str
    pixels: Optional[np.ndarray] = None  # uint8 [28, 28], the model's input
    error: Optional[TrainerError] = None
    class_index: int = -1
    name: str = ""
    probability: float = 0.0


def predict(model_dir: str, paths: Sequence[str]) -> List[Result]:
    """One Result per path, in order; a bad image is a Result with its error, the others are still classified."""
    from trainer import storage

    shown = model_dir.rstrip("/") if storage.is_gcs(model_dir) else model_dir  # faults name what was typed
    local = local_model_dir(model_dir)
    check_model_files(local, shown)
    class_names = read_class_names(local, shown)
    loaded = []
    for path in paths:
        try:
            loaded.append(Result(path, pixels=load_image(path)))
        except TrainerError as error:
            loaded.append(Result(path, error=error))
    good = [result.pixels for result in loaded if result.pixels is not None]
    answers = iter(classify(load_serving(local, shown), class_names, np.stack(good), shown) if good else [])
    results = []
    for result in loaded:
        if result.pixels is not None:
            class_index, name, probability = next(answers)
            result = result._replace(class_index=class_index, name=name, probability=probability)
        results.append(result)
    return results


def write_show(path: str, images: np.ndarray, captions: Sequence[str], zoom: int = 4, per_row: int = 10) -> None:
    """The 28x28 inputs as the model saw them, zoomed, in a grid, each captioned, as one PNG."""
    from PIL import Image, ImageDraw

    tile, caption_height, gap = IMAGE_SIZE * zoom, 14, 4
    rows = -(-len(images) // per_row)
    columns = min(len(images), per_row)
    sheet = Image.new("L", (columns * (tile + gap) + gap, rows * (tile + caption_height + gap) + gap), 96)
    draw = ImageDraw.Draw(sheet)
    for i, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        left = gap + (i % per_row) * (tile + gap)
        top = gap + (i // per_row) * (tile + caption_height + gap)
        sheet.paste(Image.fromarray(pixels).resize((tile, tile), Image.Resampling.NEAREST), (left, top))
        draw.text((left + 1, top + tile + 1), caption, fill=255)
    try:
        sheet.save(path, format="PNG")
    except (OSError, ValueError) as error:
        raise TrainerError(f"--show {path}: cannot write it ({error})") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.predict",
                                     description="Classify images of digits (photos, scans, canvas exports) "
                                                 "with an exported model.")
    parser.add_argument("--model-dir", required=True,
                        help="a run's model/ folder (SavedModel), local or gs://BUCKET/.../model")
    parser.add_argument("--show", metavar="PNG",
                        help="also write the 28x28 inputs the model saw (one tile per readable image, in order, "
                             "captioned 'number: class probability') to this PNG file")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...), any size, colour or polarity")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if args.show and not os.path.isdir(os.path.dirname(os.path.abspath(args.show))):
            raise TrainerError(f"--show {args.show}: its folder does not exist")
        results = predict(args.model_dir, args.images)
    except TrainerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for result in results:
        if result.error:
            print(f"error: {result.error}", file=sys.stderr, flush=True)
        else:
            index = result.class_index
            label = f"{index} ({result.name})" if result.name != str(index) else str(index)
            print(f"{result.path}\t{label}\t{result.probability:.4f}", flush=True)
    seen = [(number, result, result.pixels) for number, result in enumerate(results, start=1)
            if result.pixels is not None]
    if args.show and seen:
        try:
            write_show(args.show, np.stack([pixels for _, _, pixels in seen]),
                       [f"{number}: {result.name[:12]} {result.probability:.0%}" for number, result, _ in seen])
        except TrainerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0 if len(seen) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
