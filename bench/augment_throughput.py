"""Training throughput of the default recipe's augmentation, in alternating rounds:

    python bench/augment_throughput.py [--rounds 3] [--arms pipeline,keras-layer,pipeline-xla] [--train-limit 20000]
                                       [--epochs 2] [--out bench/results/augment.md]

Arms, each a whole `python -m trainer.task` run in its own process on Debian's Fashion-MNIST files:
  pipeline      the trainer as it is: random shifts in the tf.data pipeline (trainer/augment.py)
  keras-layer   the way it was done before: Keras' RandomTranslation layer inside the model (same shift
                range, zero fill) and no pipeline augmentation; the model is wrapped here, in the bench only
  pipeline-xla  the trainer with --jit-compile on (XLA-compiled train step on this CPU)
The arm order rotates every round. Figures: train_examples_per_second from metrics.json (all epochs, the
first one's tracing included) and the last epoch's examples/s from the epoch line.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "idx:/usr/share/datasets/fashion-mnist"
ARMS = {"pipeline": [], "keras-layer": ["--augment", "none"], "pipeline-xla": ["--jit-compile", "on"]}


def keras_layer_run(trainer_args):
    """Run the trainer with RandomTranslation prepended to the model (called in a child process)."""
    sys.path.insert(0, ROOT)
    import keras

    from trainer import model as model_lib
    from trainer import task

    build = model_lib.build_model

    def with_keras_shifts(config, bn_momentum=0.9):
        inner = build(config, bn_momentum)
        inputs = keras.Input(shape=(28, 28, 1), name="image")
        shifted = keras.layers.RandomTranslation(2 / 28, 2 / 28, fill_mode="constant", seed=config.seed)(inputs)
        return keras.Model(inputs, inner(shifted), name="mnist_cnn_keras_shifts")

    model_lib.build_model = with_keras_shifts
    return task.main(trainer_args)


def run_arm(arm, args, scratch):
    job_dir = os.path.join(scratch, f"{arm}-{len(os.listdir(scratch))}")
    flags = ["--dataset", FASHION, "--train-limit", str(args.train_limit), "--epochs", str(args.epochs),
             "--job-dir", job_dir, *ARMS[arm]]
    command = ([sys.executable, __file__, "_keras_layer", *flags] if arm == "keras-layer"
               else [sys.executable, "-m", "trainer.task", *flags])
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{result.stderr[-2000:]}")
    with open(os.path.join(job_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    last = re.findall(r"([\d,]+) examples/s", result.stdout)[-1]
    return dict(overall=metrics["train_examples_per_second"], last_epoch=float(last.replace(",", "")),
                test_accuracy=metrics["test_accuracy"])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_keras_layer":
        sys.exit(keras_layer_run(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "augment.md"))
    args = parser.parse_args()
    arms = [arm for arm in args.arms.split(",") if arm in ARMS]
    results = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            order = arms[round_ % len(arms):] + arms[:round_ % len(arms)]
            for arm in order:
                figures = run_arm(arm, args, scratch)
                results[arm].append(figures)
                print(f"round {round_ + 1} {arm:13s} {figures['overall']:7,.0f} ex/s overall, "
                      f"{figures['last_epoch']:7,.0f} last epoch, test accuracy {figures['test_accuracy']:.4f}",
                      flush=True)
    lines = [f"# Augmentation throughput ({args.rounds} rounds, --train-limit {args.train_limit}, --epochs "
             f"{args.epochs}, default recipe)", "", "| arm | overall ex/s (median; per round) | last epoch ex/s "
             "(median; per round) | test accuracy |", "|---|---|---|---|"]
    for arm in arms:
        overall = [row["overall"] for row in results[arm]]
        last = [row["last_epoch"] for row in results[arm]]
        lines.append(f"| {arm} | {statistics.median(overall):,.0f}; {', '.join(f'{v:,.0f}' for v in overall)} | "
                     f"{statistics.median(last):,.0f}; {', '.join(f'{v:,.0f}' for v in last)} | "
                     f"{results[arm][0]['test_accuracy']:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
