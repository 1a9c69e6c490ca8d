"""Helpers run as separate processes by bench/benchmark.py.

    python bench/probes.py ceiling --out F [-- TRAINER FLAGS]
                                                  the seed model's (or the flags' model's) train step in a
                                                  tight tf.function loop on in-memory tensors (no input
                                                  pipeline): examples/s
    python bench/probes.py to-accuracy --target 0.9 [--checks-per-epoch 4] --out F -- TRAINER FLAGS
                                                  a whole trainer run that also checks the test accuracy
                                                  4 times an epoch (checks excluded from the time) until
                                                  it first reaches the target
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checks import AccuracyChecks  # noqa: E402  (bench/checks.py; this script runs from bench/)


def ceiling(out, trainer_args, steps=300):
    """Without trainer flags: the seed model (`--preset seed`); with them, the model and batch they set."""
    import numpy as np

    from trainer.config import parse_config
    from trainer.distribute import configure_host

    config = parse_config(trainer_args or ["--preset", "seed"], {})
    batch_size = config.batch_size
    configure_host(0, config.intra_op_threads, config.inter_op_threads)  # the trainer's own thread settings
    import keras
    import tensorflow as tf

    from trainer.model import build_model
    from trainer.steps import make_train_function

    model = build_model(config)
    optimizer = keras.optimizers.Adam(config.learning_rate)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    batch = (tf.constant(rng.random((batch_size, 28, 28, 1), dtype=np.float32)),
             tf.constant(rng.integers(0, 10, batch_size), dtype=tf.int32))
    # The trainer's own multi-step train function, fed one in-memory batch over and over.
    train_steps = make_train_function(tf.distribute.get_strategy(), model, optimizer, batch_size)
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())

    def run(n):
        return train_steps(iterator, n)[0]

    run(tf.constant(20)).numpy()  # trace and warm up
    started = time.perf_counter()
    run(tf.constant(steps)).numpy()
    seconds = time.perf_counter() - started
    with open(out, "w") as handle:
        json.dump(dict(examples_per_second=steps * batch_size / seconds, batch_size=batch_size,
                       parameters=model.count_params()), handle)


def to_accuracy(out, target, checks_per_epoch, trainer_args):
    """Checks the test accuracy `checks_per_epoch` times an epoch (at the end of the multi-step call that
    crosses each check point) until it reaches the target, then trains on to the end of the run; the
    checks' time is excluded from the training time."""
    from trainer.config import parse_config
    from trainer.observers import Observer
    from trainer.train import train_and_evaluate

    config = parse_config(trainer_args, os.environ)
    from trainer import data as data_lib

    splits = data_lib.load_splits(config)
    test_images = splits.test[0].astype("float32")[..., None] / 255.0

    class Target(Observer):
        def __init__(self):
            self.clock = AccuracyChecks(target, checks_per_epoch, self.test_accuracy)

        def on_train_begin(self, model, initial_epoch):
            self.model = model

        def test_accuracy(self):
            predictions = self.model.predict(test_images, batch_size=1000, verbose=0).argmax(axis=1)
            return (predictions == splits.test[1]).mean()

        def on_epoch_begin(self, epoch):
            self.clock.begin_epoch(epoch)

        def on_train_steps(self, epoch, steps_done, steps_per_epoch, mean_loss):
            self.clock.after_steps(steps_done, steps_per_epoch)

        def on_epoch_end(self, epoch, row, timing):
            self.clock.end_epoch(timing["seconds"])

    target_observer = Target()
    metrics = train_and_evaluate(config, splits=splits, observers=[target_observer])
    clock = target_observer.clock
    with open(out, "w") as handle:
        json.dump(dict(**clock.result(), test_accuracy=metrics["test_accuracy"], train_seconds=clock.train_seconds,
                       epochs=metrics["epochs_completed"]), handle)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("probe", choices=("ceiling", "to-accuracy"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--checks-per-epoch", type=int, default=4)
    argv = sys.argv[1:]
    trainer_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.probe == "ceiling":
        ceiling(args.out, trainer_args)
    else:
        to_accuracy(args.out, args.target, args.checks_per_epoch, trainer_args)


if __name__ == "__main__":
    main()
