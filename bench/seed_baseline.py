"""The seed notebook's recipe, faithfully: Keras Sequential, numpy arrays, `model.fit(batch_size=128)`
with validation_split=0.1, Adam 1e-3, then evaluate and save. The baseline of bench/benchmark.py.

    python bench/seed_baseline.py --epochs 2 --out result.json
    python bench/seed_baseline.py --until-accuracy 0.9 [--checks-per-epoch 4] --out result.json
    python bench/seed_baseline.py --until-accuracy 0.9 --then-checks-per-epoch 1 --epochs 10 --out result.json

Reports training examples/s with validation excluded (timed from each epoch's start to the start of
its validation pass; over all epochs and per epoch) or, with --until-accuracy, the training time until
the test accuracy first reaches the target; the test accuracy is checked --checks-per-epoch times an
epoch, the same points as bench/probes.py checks the trainer at, and the checks' time is excluded.
With --then-checks-per-epoch, training goes on to --epochs after the target, checked that often (the
accuracy-against-time curve). Seeded (--seed, the trainer's default 42) with
keras.utils.set_random_seed, as a careful user would: the same curve in every run.
"""

import argparse
import gzip
import json
import os
import struct

import numpy as np
from checks import AccuracyChecks  # bench/checks.py (this script runs from bench/)

FASHION = "/usr/share/datasets/fashion-mnist"


def read_idx(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as handle:
        raw = handle.read()
    magic, count = struct.unpack(">II", raw[:8])
    return np.frombuffer(raw[16:], np.uint8).reshape(count, 28, 28) if magic == 2051 else \
        np.frombuffer(raw[8:], np.uint8)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=FASHION)
    parser.add_argument("--epochs", type=int, default=None,
                        help="default 2, or with --until-accuracy as many as it takes (at most 100)")
    parser.add_argument("--until-accuracy", type=float, default=None)
    parser.add_argument("--checks-per-epoch", type=int, default=4)
    parser.add_argument("--then-checks-per-epoch", type=int, default=0,
                        help="after the target: train on to --epochs, checking this often (0: stop at the target)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-path", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    x_train = read_idx(os.path.join(args.data, "train-images-idx3-ubyte.gz")).astype("float32")[..., None] / 255.0
    y_train = read_idx(os.path.join(args.data, "train-labels-idx1-ubyte.gz"))
    x_test = read_idx(os.path.join(args.data, "t10k-images-idx3-ubyte.gz")).astype("float32")[..., None] / 255.0
    y_test = read_idx(os.path.join(args.data, "t10k-labels-idx1-ubyte.gz"))

    keras.utils.set_random_seed(args.seed)  # weights, shuffling and dropout
    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        keras.layers.Conv2D(32, (3, 3), activation="relu"),
        keras.layers.MaxPooling2D((2, 2)),
        keras.layers.Conv2D(64, (3, 3), activation="relu"),
        keras.layers.MaxPooling2D((2, 2)),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    clock = AccuracyChecks(args.until_accuracy, args.checks_per_epoch,
                           lambda: model.evaluate(x_test, y_test, batch_size=1000, verbose=0)[1],
                           args.then_checks_per_epoch)

    class Timing(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.in_epoch = False

        def on_epoch_begin(self, epoch, logs=None):
            clock.begin_epoch(epoch)
            self.in_epoch = True

        def on_train_batch_end(self, batch, logs=None):
            if clock.after_steps(batch + 1, self.params["steps"]) and not args.then_checks_per_epoch:
                self.model.stop_training = True

        def on_test_begin(self, logs=None):
            if self.in_epoch:  # the validation pass at the end of an epoch
                clock.end_epoch()
                self.in_epoch = False

    epochs = args.epochs or (2 if args.until_accuracy is None else 100)
    model.fit(x_train, y_train, batch_size=128, epochs=epochs, validation_split=0.1, callbacks=[Timing()], verbose=2)
    test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    model.save(args.model_path or os.path.join(os.path.dirname(os.path.abspath(args.out)), "seed_model.keras"))
    train_examples = int(len(x_train) * 0.9)
    with open(args.out, "w") as handle:
        json.dump(dict(test_accuracy=test_accuracy, train_seconds=clock.train_seconds,
                       examples_per_second=train_examples * epochs / clock.train_seconds
                       if args.until_accuracy is None else None,
                       epoch_examples_per_second=[train_examples / seconds for seconds in clock.epoch_seconds],
                       **clock.result()), handle)


if __name__ == "__main__":
    main()
