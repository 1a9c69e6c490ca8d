"""Helpers run as separate processes by bench/benchmark.py.

    python bench/probes.py ceiling --out F [-- TRAINER FLAGS]
                                                  the seed model's (or the flags' model's) train step in a
                                                  tight tf.function loop on in-memory tensors (no input
                                                  pipeline): examples/s
    python bench/probes.py to-accuracy --target 0.9 [--checks-per-epoch 4] [--then-checks-per-epoch 1]
                                       --out F -- TRAINER FLAGS
                                                  a whole trainer run that also checks the test accuracy
                                                  4 times an epoch (checks excluded from the time) until
                                                  it first reaches the target, then (optionally) once an
                                                  epoch to the end: the accuracy-against-time curve
    python bench/probes.py op-times --out F [--steps 100] [-- TRAINER FLAGS]
                                                  the same tight loop as `ceiling` under TensorFlow's
                                                  profiler: milliseconds per step of each op kernel, and
                                                  their sum against the step's wall time
    python bench/probes.py versus-fit --out F [--rounds 12] [--steps 100]
                                                  the seed model's train step as the trainer runs it
                                                  against Keras `fit` on the same model and data, in one
                                                  process, alternating calls of --steps steps: the step
                                                  loops compared without the host's drift between
                                                  processes (ratio per pair of calls)
    python bench/probes.py first-epoch --out F -- TRAINER FLAGS
                                                  a whole trainer run timing every multi-step call: what
                                                  the first epoch pays that later ones do not (the first
                                                  call: tracing and graph set-up; anything else shows as
                                                  slower later calls), and the time from process start
                                                  to the first step
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

STARTED = time.perf_counter()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checks import AccuracyChecks  # noqa: E402  (bench/checks.py; this script runs from bench/)


def _network(trainer_args, seed=None):
    """(config, model, Adam optimizer built for it) for the flags, with the trainer's own thread settings;
    the weights drawn after keras.utils.set_random_seed(seed) when a seed is given."""
    from trainer.config import parse_config
    from trainer.distribute import configure_host

    config = parse_config(trainer_args, {})
    configure_host(0, config.intra_op_threads, config.inter_op_threads)  # before TensorFlow starts
    import keras

    from trainer.model import build_model

    if seed is not None:
        keras.utils.set_random_seed(seed)
    model = build_model(config)
    optimizer = keras.optimizers.Adam(config.learning_rate)
    optimizer.build(model.trainable_variables)
    return config, model, optimizer


def ceiling(out, trainer_args, steps=300, profile=False):
    """Without trainer flags: the seed model (`--preset seed`); with them, the model and batch they set.
    With `profile`, the timed steps run under TensorFlow's profiler and the kernels' times are written too."""
    import numpy as np

    config, model, optimizer = _network(trainer_args or ["--preset", "seed"])
    batch_size = config.batch_size
    import tensorflow as tf

    from trainer.steps import make_train_function

    rng = np.random.default_rng(0)
    batch = (tf.constant(rng.random((batch_size, 28, 28, 1), dtype=np.float32)),
             tf.constant(rng.integers(0, 10, batch_size), dtype=tf.int32))
    # The trainer's own multi-step train function, fed one in-memory batch over and over.
    train_steps = make_train_function(tf.distribute.get_strategy(), model, optimizer, batch_size)
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())

    def run(n):
        return train_steps(iterator, n)[0]

    run(tf.constant(20)).numpy()  # trace and warm up
    with tempfile.TemporaryDirectory() as trace_dir:
        if profile:
            tf.profiler.experimental.start(trace_dir)
        started = time.perf_counter()
        run(tf.constant(steps)).numpy()
        seconds = time.perf_counter() - started
        kernels = {}
        if profile:
            tf.profiler.experimental.stop()
            kernels = kernel_milliseconds(trace_dir, steps)
    result = dict(examples_per_second=steps * batch_size / seconds, batch_size=batch_size,
                  parameters=model.count_params())
    if profile:
        result.update(step_milliseconds=1000 * seconds / steps, kernel_milliseconds=kernels)
        print(f"{1000 * seconds / steps:.2f} ms a step (profiled); its op kernels, ms a step:")
        for name, milliseconds in list(kernels.items())[:25]:
            print(f"{milliseconds:8.3f}  {name}")
        print(f"{sum(kernels.values()):8.3f}  all {len(kernels)} kernels")
    with open(out, "w") as handle:
        json.dump(result, handle)


def kernel_milliseconds(trace_dir, steps):
    """{op name: kernel type}: milliseconds a step, largest first, from the profiler's trace of the host's
    executor threads."""
    import glob
    from collections import Counter

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as handle:
        space.ParseFromString(handle.read())
    totals: Counter = Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and "/" in name:  # an op's kernel ("scope/op:KernelType"), not executor bookkeeping
                    op, kernel = name.rsplit(":", 1)
                    totals[f"{op.split('while/', 2)[-1]}: {kernel}"] += event.duration_ps
    return {name: picoseconds / 1e9 / steps for name, picoseconds in totals.most_common()}


def versus_fit(out, rounds=12, steps=100):
    """The trainer's multi-step train function and Keras `fit` (numpy arrays, batch 128, as the seed notebook
    calls it) training the same seed model on the same random images, one call of each in turn (the order
    alternating), so both meet the same host. Each `fit` call is one epoch of `steps` batches, its set-up
    included (a few percent of the call)."""
    import numpy as np

    config, model, optimizer = _network(["--preset", "seed"], seed=0)
    import tensorflow as tf

    from trainer.steps import make_train_function

    batch_size = config.batch_size
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    images = rng.random((steps * batch_size, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, steps * batch_size).astype(np.int32)
    iterator = iter(tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size).repeat().prefetch(2))
    train_steps = make_train_function(tf.distribute.get_strategy(), model, optimizer, batch_size)
    sides = dict(trainer=lambda: train_steps(iterator, tf.constant(steps))[0].numpy(),
                 fit=lambda: model.fit(images, labels, batch_size=batch_size, epochs=1, verbose=0))
    for run in sides.values():  # trace and warm up
        run()
    seconds: dict = {name: [] for name in sides}
    for index in range(rounds):
        for name in sorted(sides, reverse=index % 2 == 1):
            started = time.perf_counter()
            sides[name]()
            seconds[name].append(time.perf_counter() - started)
    ratios = [fit / trainer for fit, trainer in zip(seconds["fit"], seconds["trainer"], strict=True)]
    result = dict(trainer_examples_per_second=steps * batch_size / statistics.median(seconds["trainer"]),
                  fit_examples_per_second=steps * batch_size / statistics.median(seconds["fit"]),
                  ratios=[round(ratio, 3) for ratio in ratios], median_ratio=statistics.median(ratios))
    print(f"trainer {result['trainer_examples_per_second']:,.0f} examples/s, Keras fit "
          f"{result['fit_examples_per_second']:,.0f}; trainer over fit per pair of calls: median "
          f"{result['median_ratio']:.2f}x (from {min(ratios):.2f}x to {max(ratios):.2f}x, {rounds} pairs)")
    with open(out, "w") as handle:
        json.dump(result, handle)


def to_accuracy(out, target, checks_per_epoch, trainer_args, then_per_epoch=0):
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
            self.clock = AccuracyChecks(target, checks_per_epoch, self.test_accuracy, then_per_epoch)

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


def first_epoch(out, trainer_args):
    """Wall time of every multi-step call of every epoch, and the process's time to its first call."""
    from trainer.config import parse_config
    from trainer.observers import Observer
    from trainer.train import train_and_evaluate

    config = parse_config(trainer_args, os.environ)

    class Calls(Observer):
        def __init__(self):
            self.epochs, self.first_call_at = [], None

        def on_epoch_begin(self, epoch):
            self.epochs.append(dict(calls=[], cpu=[], started=time.perf_counter()))

        def on_chunk_begin(self, global_step):
            self.first_call_at = self.first_call_at or time.perf_counter() - STARTED
            self.began, self.cpu_began = time.perf_counter(), time.process_time()

        def on_chunk_end(self, global_step):
            self.epochs[-1]["calls"].append(time.perf_counter() - self.began)
            self.epochs[-1]["cpu"].append(time.process_time() - self.cpu_began)  # all threads: the work done

        def on_steps_end(self, epoch):
            self.epochs[-1]["seconds"] = time.perf_counter() - self.epochs[-1].pop("started")

    calls = Calls()
    train_and_evaluate(config, observers=[calls])
    epochs = []
    for number, epoch in enumerate(calls.epochs, 1):
        timed = epoch["calls"]
        typical = statistics.median(timed[1:])
        epochs.append(dict(epoch=number, seconds=round(epoch["seconds"], 3), calls=len(timed),
                           first_call=round(timed[0], 3), median_call=round(typical, 3),
                           calls_after_first=round(sum(timed[1:]), 3),
                           outside_calls=round(epoch["seconds"] - sum(timed), 3),
                           cpu_first_call=round(epoch["cpu"][0], 3),
                           cpu_calls_after_first=round(sum(epoch["cpu"][1:]), 3),
                           call_seconds=[round(seconds, 3) for seconds in timed]))
        print(f"epoch {number}: {epoch['seconds']:.2f} s; first call {timed[0]:.3f} s, median call {typical:.3f} s, "
              f"the other {len(timed) - 1} calls {sum(timed[1:]):.2f} s, outside the calls "
              f"{epoch['seconds'] - sum(timed):.2f} s; CPU time: first call {epoch['cpu'][0]:.2f} s, the others "
              f"{sum(epoch['cpu'][1:]):.2f} s", flush=True)
    with open(out, "w") as handle:
        json.dump(dict(first_call_after_start=round(calls.first_call_at, 2), epochs=epochs), handle, indent=1)
    print(f"first call {calls.first_call_at:.2f} s after the process started")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("probe", choices=("ceiling", "to-accuracy", "first-epoch", "versus-fit", "op-times"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--checks-per-epoch", type=int, default=4)
    parser.add_argument("--then-checks-per-epoch", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=12, help="versus-fit: pairs of calls")
    parser.add_argument("--steps", type=int, default=100, help="versus-fit: steps per call; op-times: steps profiled")
    argv = sys.argv[1:]
    trainer_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.probe == "ceiling":
        ceiling(args.out, trainer_args)
    elif args.probe == "op-times":
        ceiling(args.out, trainer_args, args.steps, profile=True)
    elif args.probe == "first-epoch":
        first_epoch(args.out, trainer_args)
    elif args.probe == "versus-fit":
        versus_fit(args.out, args.rounds, args.steps)
    else:
        to_accuracy(args.out, args.target, args.checks_per_epoch, trainer_args, args.then_checks_per_epoch)


if __name__ == "__main__":
    main()
