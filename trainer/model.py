"""build_model(config, shape): the seed CNN, parameterised by conv filters, dense units and dropout.

Conv2D(f, 3, relu) (x convs_per_block) + MaxPool(2) per entry of `filters`, then Flatten,
Dense(dense_units, relu), Dropout(dropout), Dense(K, softmax); optional batch normalisation.
Augmentation is not part of the model: it happens in the input pipeline (trainer.augment), so the
exported model never augments. Input named `image`: float32 [N, H, W, C] in [0, 1], where H, W, C and the
number of classes K come from the data (`images.ImageShape`; MNIST's 28x28x1 and 10 by default).
The model knows nothing about data or strategies; build it inside `strategy.scope()`.
"""

from __future__ import annotations

import os
from typing import Sequence, Tuple

from trainer.errors import TrainerError
from trainer.images import MNIST_SHAPE, ImageShape


def _after_block(size: int, shrink: int) -> int:
    return (size - shrink) // 2


def feature_map_sizes(filters: Sequence[int], size=MNIST_SHAPE.height, convs_per_block: int = 1,
                      padding: str = "valid") -> list:
    """Spatial size after each block (3x3 convs, then a 2x2 pool); raises when a block has nothing left.
    `size` is the input's side, or its (height, width); the sizes returned are (height, width) pairs then."""
    shrink = 2 * convs_per_block if padding == "valid" else 0
    square = isinstance(size, int)
    height, width = (size, size) if square else size
    first = (height, width)
    sizes: list = []
    for block, _ in enumerate(filters, start=1):
        if min(height, width) - shrink < 2:
            shown = f"{first[0]}x{first[1]}"
            raise TrainerError(f"--filters {','.join(map(str, filters))}: {len(filters)} conv blocks are too "
                               f"deep for {shown} images (block {block} gets a {height}x{width} "
                               f"input; at most {max_blocks(min(first), shrink)} blocks fit with "
                               f"--padding {padding} and --convs-per-block {convs_per_block})")
        height, width = _after_block(height, shrink), _after_block(width, shrink)
        sizes.append(height if square else (height, width))
    return sizes


def max_blocks(size: int = MNIST_SHAPE.height, shrink: int = 2) -> int:
    """How many conv blocks fit an input whose shorter side is `size`."""
    blocks = 0
    while size - shrink >= 2:
        size = (size - shrink) // 2
        blocks += 1
    return blocks


def check_fits(config, replicas: int = 1, shape: ImageShape = MNIST_SHAPE) -> None:
    """The network fits the data's images, and its training needs fit this machine's memory (before
    allocating)."""
    feature_map_sizes(config.filters, (shape.height, shape.width), convs_per_block=config.convs_per_block,
                      padding=config.padding)
    needed = training_memory_bytes(config, config.batch_size // max(replicas, 1), shape)
    available = physical_memory()
    if available and needed > available:
        gib = 1024 ** 3
        raise TrainerError(f"the model is too large for this machine: --filters {','.join(map(str, config.filters))} "
                           f"--dense-units {config.dense_units} --batch-size {config.batch_size} need about "
                           f"{needed / gib:,.1f} GiB for weights, optimizer state and activations ({shape.text()}), "
                           f"and the machine has {available / gib:,.1f} GiB; lower them")


def physical_memory() -> int:
    """Bytes of RAM (0 when the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def training_memory_bytes(config, batch_size: int, shape: ImageShape = MNIST_SHAPE) -> int:
    """A lower estimate of what one replica's training step holds, float32: each weight four times (the
    weight, its gradient, Adam's two moments) and each layer's activations about twice (forward output and
    its gradient; three times with batch norm). Real use is higher, so only a model that cannot fit is refused."""
    size: Tuple[int, int] = (shape.height, shape.width)
    channels, weights, activations, classes = shape.channels, 0, 0, shape.num_classes
    per_activation = 3 if config.batch_norm else 2
    sizes = feature_map_sizes(config.filters, size, convs_per_block=config.convs_per_block, padding=config.padding)
    for filters, pooled in zip(config.filters, sizes, strict=True):
        for _ in range(config.convs_per_block):
            size = size if config.padding == "same" else (size[0] - 2, size[1] - 2)
            weights += 9 * channels * filters + filters
            activations += batch_size * size[0] * size[1] * filters * per_activation
            channels = filters
        size = pooled
    flat = size[0] * size[1] * channels
    weights += flat * config.dense_units + config.dense_units + config.dense_units * classes + classes
    activations += batch_size * (flat + config.dense_units * per_activation + classes)
    return 4 * (4 * weights + activations)


def batch_norm_momentum(steps_per_epoch: int) -> float:
    """0.9, lowered for short epochs so the moving averages follow the weights by the epoch's end.

    With 28 steps an epoch and a warming-up learning rate, momentum 0.9 still left the averages behind
    the weights: the model evaluated at chance after epoch 1 while training accuracy was 73%.
    """
    return max(0.5, min(0.9, 1.0 - 8.0 / max(steps_per_epoch, 1)))


_FUSED_BATCH_NORM = None


def fused_batch_norm_layer():
    """keras.layers.BatchNormalization whose training step runs TensorFlow's fused kernel.

    Keras 3 normalises with moments and a chain of element-wise ops, each a pass over the activations
    and each differentiated on its own; TensorFlow's FusedBatchNormV3 does the forward pass and the
    gradient in one kernel each (XLA compiles it too). On a 2-core CPU the default network's training step
    ran about 1.5x faster with it (bench/results/recipe.md). Same variables, same moving-average update
    (biased batch variance, as Keras keeps it), and inference is the stock layer's code, so checkpoints of
    either layer restore into the other; export saves stock layers (`stock_model`).
    """
    global _FUSED_BATCH_NORM
    if _FUSED_BATCH_NORM is not None:
        return _FUSED_BATCH_NORM
    import keras
    import tensorflow as tf

    class FusedBatchNormalization(keras.layers.BatchNormalization):
        def call(self, inputs, training=None, mask=None):
            rank = len(inputs.shape)
            # Keras 3.13 has no batch renormalisation (no `renorm` attribute): the fused path then
            # applies whenever the other conditions hold.
            if (not (training and self.trainable) or mask is not None or getattr(self, "renorm", False)
                    or getattr(self, "synchronized", False) or rank not in (2, 4) or self.axis not in (-1, rank - 1)):
                return super().call(inputs, training=training, mask=mask)
            x = tf.cast(inputs, tf.float32)  # as the stock layer: statistics in float32 whatever the policy
            if rank == 2:
                x = x[:, tf.newaxis, tf.newaxis, :]
            channels = x.shape[-1]
            gamma = self.gamma if self.scale else tf.ones([channels], tf.float32)
            beta = self.beta if self.center else tf.zeros([channels], tf.float32)
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, tf.cast(gamma, tf.float32), tf.cast(beta, tf.float32), epsilon=self.epsilon, is_training=True)
            # The kernel returns the Bessel-corrected variance for the moving average; Keras keeps the biased one.
            count = tf.cast(tf.size(x) // channels, tf.float32)
            variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
            mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            if rank == 2:
                y = y[:, 0, 0, :]
            return tf.cast(y, self.compute_dtype)

    _FUSED_BATCH_NORM = FusedBatchNormalization
    return FusedBatchNormalization


def stock_model(model):
    """The same network and weights with stock Keras layers only (what model.keras holds, so that
    `keras.saving.load_model` needs nothing from this package)."""
    import keras

    fused = fused_batch_norm_layer()
    if not any(isinstance(layer, fused) for layer in model.layers):
        return model

    def clone(layer):
        if isinstance(layer, fused):
            return keras.layers.BatchNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def build_model(config, bn_momentum: float = 0.9, shape: ImageShape = MNIST_SHAPE):
    """A Keras Functional model for `shape`'s images and classes; the output layer computes in float32
    whatever the policy.

    With the seed's settings (one valid conv per block, no batch norm) this is exactly
    the seed notebook's network. Batch normalisation uses momentum 0.9 so that its moving averages keep
    up in short runs (with 0.99 a warmed-up model can evaluate at chance after the first epoch); the
    trainer lowers it further for short epochs (see `batch_norm_momentum`).
    """
    import keras

    check_fits(config, shape=shape)  # a clear error before Keras reports a negative dimension
    batch_norm = fused_batch_norm_layer() if config.batch_norm else None
    inputs = keras.Input(shape=shape.input_shape, name="image")
    x = inputs
    for block, filters in enumerate(config.filters, start=1):
        for conv in range(1, config.convs_per_block + 1):
            name = f"conv{block}" if config.convs_per_block == 1 else f"conv{block}_{conv}"
            if batch_norm is not None:
                x = keras.layers.Conv2D(filters, 3, padding=config.padding, use_bias=False, name=name)(x)
                x = batch_norm(momentum=bn_momentum, name=f"{name}_bn")(x)
                x = keras.layers.Activation("relu", name=f"{name}_relu")(x)
            else:
                x = keras.layers.Conv2D(filters, 3, padding=config.padding, activation="relu", name=name)(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{block}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    if batch_norm is not None:
        x = keras.layers.Dense(config.dense_units, use_bias=False, name="dense")(x)
        x = batch_norm(momentum=bn_momentum, name="dense_bn")(x)
        x = keras.layers.Activation("relu", name="dense_relu")(x)
    else:
        x = keras.layers.Dense(config.dense_units, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(config.dropout, seed=config.seed, name="dropout")(x)
    outputs = keras.layers.Dense(shape.num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")


def summary(model) -> list:
    """The model as a Keras user reads it: a headline with the parameter counts, then one row per layer
    (name, type, output shape without the batch, parameters)."""
    import math

    trainable = sum(math.prod(weight.shape) for weight in model.trainable_weights)
    total = sum(math.prod(weight.shape) for weight in model.weights)
    rows = [("layer", "type", "output shape", "parameters")]
    for layer in model.layers:
        rows.append((layer.name, type(layer).__name__, str(tuple(layer.output.shape[1:])),
                     f"{layer.count_params():,}"))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return [f"model {model.name}: {len(model.layers)} layers, {total:,} parameters ({trainable:,} trainable)",
            *table]
