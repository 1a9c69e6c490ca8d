"""Helpers run as separate processes by bench/benchmark.py.

    python bench/probes.py ceiling --out F        the seed model's train step in a tight tf.function loop
                                                  on in-memory tensors (no input pipeline): examples/s
    python bench/probes.py to-accuracy --target 0.9 --out F -- TRAINER FLAGS
                                                  a trainer run that checks the test accuracy after each
                                                  epoch (check excluded from the time) and stops at the target
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def ceiling(out, steps=300, batch_size=128):
    import numpy as np

    from trainer.config import Config
    from trainer.distribute import configure_host

    config = Config(job_dir="/tmp/unused", preset="seed")
    configure_host(0, config.intra_op_threads, config.inter_op_threads)  # the trainer's own thread settings
    import keras
    import tensorflow as tf

    from trainer.model import build_model

    model = build_model(config)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((batch_size, 28, 28, 1), dtype=np.float32))
    labels = tf.constant(rng.integers(0, 10, batch_size), dtype=tf.int32)

    @tf.function
    def run(n):
        for _ in tf.range(n):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, model(images, training=True)))
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    run(tf.constant(20)).numpy()  # trace and warm up
    started = time.perf_counter()
    run(tf.constant(steps)).numpy()
    seconds = time.perf_counter() - started
    with open(out, "w") as handle:
        json.dump(dict(examples_per_second=steps * batch_size / seconds), handle)


def to_accuracy(out, target, trainer_args):
    import keras

    from trainer.config import parse_config
    from trainer.train import RunHooks, train_and_evaluate

    config = parse_config(trainer_args, os.environ)
    from trainer import data as data_lib

    splits = data_lib.load_splits(config)
    test_images = splits.test[0].astype("float32")[..., None] / 255.0

    class Target(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.train_seconds, self.reached_at, self.accuracy = 0.0, None, []

        def on_epoch_end(self, epoch, logs=None):
            self.train_seconds += logs["seconds"]
            predictions = self.model.predict(test_images, batch_size=1000, verbose=0).argmax(axis=1)
            accuracy = float((predictions == splits.test[1]).mean())
            self.accuracy.append(accuracy)
            if accuracy >= target and self.reached_at is None:
                self.reached_at = self.train_seconds

    callback = Target()
    metrics = train_and_evaluate(config, splits=splits, hooks=RunHooks(callbacks=[callback]))
    with open(out, "w") as handle:
        json.dump(dict(seconds_to_target=callback.reached_at, test_accuracy_per_epoch=callback.accuracy,
                       test_accuracy=metrics["test_accuracy"], train_seconds=metrics["train_seconds"],
                       epochs=metrics["epochs_completed"]), handle)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("probe", choices=("ceiling", "to-accuracy"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--target", type=float, default=0.9)
    argv = sys.argv[1:]
    trainer_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.probe == "ceiling":
        ceiling(args.out)
    else:
        to_accuracy(args.out, args.target, trainer_args)


if __name__ == "__main__":
    main()
