"""Multi-worker scaling on one machine: two MultiWorkerMirrored workers (one intra-op thread each) against
one worker with one thread, the same global batch and data. Prints examples/s for each and the ratio.

    python bench/multiworker_scaling.py [--train-limit 20000] [--epochs 3] [--batch-size 128]

Data: full Fashion-MNIST from Debian's dataset-fashion-mnist (IDX files), cut by --train-limit.
Throughput is training only (evaluation excluded): the trainer's own train_examples_per_second over all
epochs, and the last epoch's figure (after tracing and warm-up).
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def last_epoch_rate(log_text):
    rates = re.findall(r"^epoch \d+/\d+ .* ([\d,]+) examples/s", log_text, re.M)
    return float(rates[-1].replace(",", "")) if rates else float("nan")


def run(workers, common, scratch):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    job_dir = tempfile.mkdtemp(dir=scratch)
    ports = [free_port() for _ in range(workers)]
    processes, logs = [], []
    for index in range(workers):
        worker_env = dict(env)
        if workers > 1:
            worker_env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                                  "task": {"type": "worker", "index": index}})
        log = open(os.path.join(scratch, f"{os.path.basename(job_dir)}-{index}.log"), "w+")
        strategy = "multi_worker" if workers > 1 else "default"
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "trainer.task", *common, "--strategy", strategy, "--job-dir", job_dir,
             "--intra-op-threads", "1", "--inter-op-threads", "1"],
            cwd=ROOT, env=worker_env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    for process in processes:
        if process.wait(timeout=1800) != 0:
            logs[0].seek(0)
            raise SystemExit(f"a worker failed:\n{logs[0].read()[-3000:]}")
    logs[0].seek(0)
    with open(os.path.join(job_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    return metrics["train_examples_per_second"], last_epoch_rate(logs[0].read()), metrics["num_replicas"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="idx:/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    common = ["--dataset", args.dataset, "--train-limit", str(args.train_limit), "--epochs", str(args.epochs),
              "--batch-size", str(args.batch_size), "--preset", "seed", "--no-resume"]
    with tempfile.TemporaryDirectory() as scratch:
        one_all, one_last, _ = run(1, common, scratch)
        two_all, two_last, replicas = run(2, common, scratch)
    print(f"machine: {os.cpu_count()} cores; seed model, global batch {args.batch_size}, "
          f"{args.train_limit} examples x {args.epochs} epochs, one intra-op thread per worker")
    print(f"{'':28}{'all epochs':>14}{'last epoch':>14}")
    print(f"{'1 worker  (examples/s)':28}{one_all:>14,.0f}{one_last:>14,.0f}")
    print(f"{'2 workers (examples/s)':28}{two_all:>14,.0f}{two_last:>14,.0f}   ({replicas} replicas)")
    print(f"{'scaling (2 / 1)':28}{two_all / one_all:>14.2f}{two_last / one_last:>14.2f}")


if __name__ == "__main__":
    main()
