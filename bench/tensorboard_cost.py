"""What the per-call TensorBoard scalars (batch_loss, batch_accuracy, batch_learning_rate) cost a run:

    python bench/tensorboard_cost.py [--train-limit 20000] [--epochs 2] [--steps-per-execution 20] [--preset default]

One `trainer.task` run in-process on Debian's Fashion-MNIST files, with the Summaries observer's
per-call method timed from the inside (the scalar writes, the flush, the learning-rate lookup and any
gs:// sync it triggers). Prints the calls, the seconds spent in them, the training seconds, and their
ratio: the share of training time the live curves cost. Timing from the inside avoids comparing two
separate runs, whose throughput scatters by several percent on a shared machine.
"""

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "idx:/usr/share/datasets/fashion-mnist"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-execution", type=int, default=20)
    parser.add_argument("--preset", default="default")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from trainer import observers, task

    spent = []
    timed = observers.Summaries.on_batch_metrics

    def on_batch_metrics(self, *values):
        started = time.perf_counter()
        timed(self, *values)
        spent.append(time.perf_counter() - started)

    observers.Summaries.on_batch_metrics = on_batch_metrics
    with tempfile.TemporaryDirectory() as job_dir:
        code = task.main(["--dataset", FASHION, "--preset", args.preset, "--train-limit", str(args.train_limit),
                          "--epochs", str(args.epochs), "--steps-per-execution", str(args.steps_per_execution),
                          "--job-dir", job_dir])
        if code:
            return code
        with open(os.path.join(job_dir, "metrics.json")) as handle:
            train_seconds = json.load(handle)["train_seconds"]
    print(f"per-call scalars: {len(spent)} calls, {sum(spent):.3f} s in them "
          f"({1000 * sum(spent) / len(spent):.2f} ms each), of {train_seconds:.1f} s training: "
          f"{100 * sum(spent) / train_seconds:.2f}% of training time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
