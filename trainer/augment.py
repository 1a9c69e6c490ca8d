"""Training-time augmentation as plain, XLA-compilable tensor ops: random shifts of up to 2 pixels at 28x28
(scaled with the image size: `max_shift`) and, where a mirrored image keeps its class, horizontal flips.

Keras' RandomTranslation uses ImageProjectiveTransformV3, which XLA cannot compile, so it could not run
on a TPU. Here a batch is zero-padded by the largest shift on each side and every example takes its own
H x W window through two batched gathers (static shapes throughout); flips are a per-example select. The
randomness is stateless: it comes only from a seed pair the input pipeline derives from (seed, epoch,
batch), so a resumed run sees exactly the batches an uninterrupted one would. It runs in the host's
tf.data pipeline (what Keras advises for TPUs); the model, the export and evaluation never augment.
"""

from __future__ import annotations

MAX_SHIFT = 2  # pixels, at REFERENCE_SIDE
REFERENCE_SIDE = 28


def max_shift(height: int, width: int) -> int:
    """The largest shift for images of this size: MAX_SHIFT at 28 pixels, in proportion to the shorter side
    (rounded, at least 1): 2 at 32, 3 at 36 to 48, 5 at 64."""
    side = min(height, width)
    return max(1, (2 * MAX_SHIFT * side + REFERENCE_SIDE) // (2 * REFERENCE_SIDE))


def batch_seed(seed: int, epoch: int, batch_index):
    """The stateless seed pair of one batch: batch_index counts the epoch's batches over all pipelines."""
    import tensorflow as tf

    counter = tf.cast(epoch, tf.int64) * (1 << 32) + tf.cast(batch_index, tf.int64)
    return tf.stack([tf.constant(seed, tf.int64), counter])


def shift_and_flip(images, seed, flip: bool = False, max_shift: int = MAX_SHIFT):
    """images float [B, H, W, C] (static shape) -> each example shifted by its own (dy, dx) in
    [-max_shift, max_shift], the uncovered border zero; with `flip`, each mirrored left-right with
    probability 1/2. `seed` is a [2] integer tensor."""
    import tensorflow as tf

    batch, height, width, _ = images.shape
    offsets = tf.random.stateless_uniform([batch, 2], seed=seed, minval=0, maxval=2 * max_shift + 1, dtype=tf.int32,
                                           alg="philox")
    padded = tf.pad(images, [[0, 0], [max_shift, max_shift], [max_shift, max_shift], [0, 0]])
    rows = offsets[:, :1] + tf.range(height)[tf.newaxis]  # [B, H]: the padded rows each example keeps
    cols = offsets[:, 1:] + tf.range(width)[tf.newaxis]  # [B, W]
    shifted = tf.gather(padded, rows, axis=1, batch_dims=1)  # [B, H, W + 2 * max_shift, C]
    shifted = tf.gather(shifted, cols, axis=2, batch_dims=1)  # [B, H, W, C]
    if flip:
        mirror = tf.random.stateless_uniform([batch], seed=seed[::-1], dtype=tf.float32, alg="philox") < 0.5
        shifted = tf.where(mirror[:, tf.newaxis, tf.newaxis, tf.newaxis], tf.reverse(shifted, axis=[2]), shifted)
    return shifted


ERASE_PROBABILITY = 0.5
ERASE_AREA = (0.02, 0.25)  # fraction of the image a rectangle covers
ERASE_ASPECT = (0.3, 3.3)  # its height over its width


def random_erase(images, seed):
    """images float [B, H, W, C] in [0, 1] (static shape) -> each example, with probability ERASE_PROBABILITY,
    has one rectangle of its own (area and aspect drawn from ERASE_AREA and ERASE_ASPECT, anywhere in the
    frame) replaced by uniform noise: the network must not rely on any one part of an object. `seed` is a
    [2] integer tensor; the draws are stateless, as the shifts are."""
    import math

    import tensorflow as tf

    batch, height, width, channels = images.shape
    draws = tf.random.stateless_uniform([batch, 5], seed=tf.random.experimental.stateless_fold_in(seed, 1),
                                        dtype=tf.float32)
    area = float(height * width) * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * draws[:, 0])
    aspect = tf.exp(math.log(ERASE_ASPECT[0]) + (math.log(ERASE_ASPECT[1]) - math.log(ERASE_ASPECT[0])) * draws[:, 1])
    box_h = tf.clip_by_value(tf.round(tf.sqrt(area * aspect)), 1.0, float(height))
    box_w = tf.clip_by_value(tf.round(tf.sqrt(area / aspect)), 1.0, float(width))
    top = tf.floor(draws[:, 2] * (float(height) - box_h + 1.0))
    left = tf.floor(draws[:, 3] * (float(width) - box_w + 1.0))
    erase = draws[:, 4] < ERASE_PROBABILITY
    rows = tf.range(height, dtype=tf.float32)[tf.newaxis]  # [1, H]
    cols = tf.range(width, dtype=tf.float32)[tf.newaxis]
    in_rows = (rows >= top[:, tf.newaxis]) & (rows < (top + box_h)[:, tf.newaxis])  # [B, H]
    in_cols = (cols >= left[:, tf.newaxis]) & (cols < (left + box_w)[:, tf.newaxis])  # [B, W]
    mask = in_rows[:, :, tf.newaxis] & in_cols[:, tf.newaxis, :] & erase[:, tf.newaxis, tf.newaxis]  # [B, H, W]
    noise = tf.random.stateless_uniform([batch, height, width, channels],
                                        seed=tf.random.experimental.stateless_fold_in(seed, 2), dtype=images.dtype)
    return tf.where(mask[..., tf.newaxis], noise, images)
