"""Photo clean-up: which pixels are the object (ink on paper, a garment on a backdrop) and how strongly.

1. Separate the object from the background: each colour channel's background (the paper and its lighting
   gradient) is a quadratic surface fitted through the paper's level in overlapping windows (a high
   percentile, so ink covering most of a window does not count), then subtracted. Both polarities are tried
   (dark on light, light on dark); the right one leaves most pixels within the noise of the background and
   none beyond it. The contrast is the largest difference from the background in any channel, so blue, red
   or pencil ink all count.
2. Threshold: Otsu's method on the (lightly smoothed) contrast, never below a noise floor measured on the
   image itself; specks far smaller than the main piece are dropped. Grey levels are kept: contrast is
   ramped from the noise floor to the object's typical contrast, so edges stay anti-aliased. Nothing at all
   (blank paper, one colour) is `Blank`, never a class.

An object that may fill the frame and touch its edges (a garment: `object_filling_the_frame`) defeats the
windows of step 1, which would take it for the paper: its background is fitted through the image's border
instead, and its contrast kept in proportion (its shading is part of it).
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

from trainer.errors import TrainerError

MIN_NOISE_FLOOR = 12.0  # grey levels: contrast below this is never the object, even on a perfectly flat image
MIN_INK_CONTRAST = 32.0  # grey levels: an object fainter than this against its background is "nothing there"
MIN_INK_PIXELS = 6  # fewer pixels above the threshold than this is nothing there
SPECK_FRACTION = 0.05  # connected pieces smaller than this share of the largest piece are dropped
RING_SHARE = 28  # a frame-filling object's background is read in a border ring 1/RING_SHARE of the shorter side
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
BLANK = "nothing to classify: the image is blank or a single colour"


class Blank(TrainerError):
    """The image has nothing that stands out from its background."""


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
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-6:  # one level (or levels too close for `bins` bins of their own): nothing to split
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

    Raises Blank when nothing stands out from the background.
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
        raise Blank(BLANK)
    labels, sizes = _components(mask)
    sizes[0] = 0
    kept = np.isin(labels, np.flatnonzero(sizes >= SPECK_FRACTION * sizes.max()))
    top = float(np.percentile(contrast[kept], 75))
    strength = np.clip((contrast - floor) / max(top - floor, 1.0), 0, 1)
    return (strength * _dilate(kept, 2)).astype(np.float32)



# ------------------------------------------------------------------- objects that fill the frame

def border_background(plane: np.ndarray) -> Tuple[np.ndarray, float]:
    """The smooth background of one channel behind an object that may fill most of the frame (a garment), and
    the background's noise: a quadratic surface fitted through the outermost ring of pixels, the ring's pixels
    on the object (where it touches the edge) dropped as outliers, starting from the ring's median; the noise
    is the spread of the ring's background pixels about it (the object's own texture would count as noise in
    `noise_sigma`)."""
    small = _block_mean(plane, 64)
    height, width = small.shape
    side = max(1, min(height, width) // RING_SHARE)
    ring = np.zeros(small.shape, dtype=bool)
    ring[:side], ring[-side:], ring[:, :side], ring[:, -side:] = True, True, True, True
    y, x = _grid(height, width)
    values, terms = small[ring], _quadratic_terms(y[ring], x[ring])
    level = float(np.median(values))
    spread = max(1.4826 * float(np.median(np.abs(values - level))), 0.5)
    keep = np.abs(values - level) <= 3 * spread
    coefficients = np.array([level, 0, 0, 0, 0, 0], dtype=np.float64)
    for _ in range(3):
        if keep.sum() < 2 * terms.shape[1]:
            break  # too little of the ring is background to fit a surface: its median level stands
        coefficients = np.linalg.lstsq(terms[keep], values[keep], rcond=None)[0]
        residual = values - terms @ coefficients
        keep = np.abs(residual) <= 3 * max(1.4826 * float(np.median(np.abs(residual[keep]))), 0.5)
    residual = values - terms @ coefficients
    noise = 1.4826 * float(np.median(np.abs(residual[keep]))) if keep.any() else 0.0
    return (_quadratic_terms(*_grid(*plane.shape)) @ coefficients).reshape(plane.shape).astype(np.float32), noise


def object_filling_the_frame(rgb: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3] 0..255 -> the strength [H, W] in 0..1 of an object that may fill most of the frame
    and touch its edges (a garment): the background is read from the border (`border_background`), the
    object's side of it is the side most pixels beyond the noise lie on, and the contrast is kept in
    proportion (a garment's shading is part of it, unlike a pen's). Raises Blank when nothing stands out."""
    luma = rgb @ LUMA
    surface, noise = border_background(luma)
    floor = max(MIN_NOISE_FLOOR, 4.0 * noise)
    away = luma - surface
    dark = int((away < -floor).sum()) >= int((away > floor).sum())
    residual = np.stack([rgb[..., c] - border_background(rgb[..., c])[0] for c in range(3)], axis=-1)
    contrast = np.clip(((-1.0 if dark else 1.0) * residual).max(axis=-1), 0, None)
    mask = _box3(contrast) > floor
    if mask.sum() < MIN_INK_PIXELS or float(np.percentile(contrast[mask], 90)) < MIN_INK_CONTRAST:
        raise Blank(BLANK)
    labels, sizes = _components(mask)
    sizes[0] = 0
    kept = np.isin(labels, np.flatnonzero(sizes >= SPECK_FRACTION * sizes.max()))
    quiet = 2.0 * noise
    peak = float(np.percentile(contrast[kept], 99))
    strength = np.clip((contrast - quiet) / max(peak - quiet, 1.0), 0, 1)
    return (strength * _dilate(kept, 2)).astype(np.float32)
