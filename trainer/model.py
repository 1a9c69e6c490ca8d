"""build_model(config): the seed CNN, parameterised by conv filters, dense units and dropout.

Conv2D(f, 3, relu) + MaxPool(2) per entry of `filters`, then Flatten, Dense(dense_units, relu),
Dropout(dropout), Dense(10, softmax). Input named `image`: float32 [N, 28, 28, 1] in [0, 1].
The model knows nothing about data or strategies; build it inside `strategy.scope()`.
"""

from __future__ import annotations

from typing import Sequence

from trainer.errors import TrainerError

IMAGE_SIZE = 28
NUM_CLASSES = 10


def feature_map_sizes(filters: Sequence[int], size: int = IMAGE_SIZE) -> list:
    """Spatial size after each conv (valid 3x3) + pool (2x2) block; raises when a block has nothing left."""
    sizes = []
    for block, _ in enumerate(filters, start=1):
        after_conv = size - 2
        if after_conv < 2:
            raise TrainerError(f"--filters {','.join(map(str, filters))}: {len(filters)} conv blocks are too "
                               f"deep for {IMAGE_SIZE}x{IMAGE_SIZE} images (block {block} gets a {size}x{size} "
                               f"input; at most {max_blocks()} blocks fit)")
        size = after_conv // 2
        sizes.append(size)
    return sizes


def max_blocks(size: int = IMAGE_SIZE) -> int:
    blocks = 0
    while size - 2 >= 2:
        size = (size - 2) // 2
        blocks += 1
    return blocks


def build_model(config):
    """A Keras Functional model; the output layer computes in float32 whatever the policy."""
    import keras

    feature_map_sizes(config.filters)  # a clear error before Keras reports a negative dimension
    inputs = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), name="image")
    x = inputs
    for block, filters in enumerate(config.filters, start=1):
        x = keras.layers.Conv2D(filters, 3, activation="relu", name=f"conv{block}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{block}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(config.dense_units, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(config.dropout, seed=config.seed, name="dropout")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")
