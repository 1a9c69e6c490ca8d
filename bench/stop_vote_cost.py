"""What the training loop's stop vote costs: two MultiWorkerMirrored workers on 127.0.0.1 (one intra-op
thread each) call `StopSignal.should_stop()` (one all-reduce of a flag) many times and report the mean.

    python bench/stop_vote_cost.py [--votes 500]

The loop votes once per multi-step call (--steps-per-execution steps, 20 by default), so the cost per
training step is this figure divided by the steps per call. Run it under the machine's heavy-job lock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(votes: int) -> None:
    import tensorflow as tf

    from trainer.distribute import resolve_strategy
    from trainer.stopping import StopSignal

    tf.config.threading.set_intra_op_parallelism_threads(1)
    resolved = resolve_strategy("multi_worker", os.environ)
    with StopSignal(resolved.strategy, resolved.num_workers) as stop:
        for _ in range(20):  # tracing and warm-up
            stop.should_stop()
        started = time.perf_counter()
        for _ in range(votes):
            stop.should_stop()
        seconds = time.perf_counter() - started
    print(json.dumps(dict(task=resolved.task_id, votes=votes, ms_per_vote=round(1000 * seconds / votes, 3))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--votes", type=int, default=500)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        _worker(options.votes)
        return
    import socket

    sockets = [socket.socket() for _ in range(2)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    processes = []
    for index in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                                         "task": {"type": "worker", "index": index}}))
        processes.append(subprocess.Popen([sys.executable, __file__, "--worker", "--votes", str(options.votes)],
                                          env=env, stdout=subprocess.PIPE, text=True))
    for process in processes:
        out, _ = process.communicate()
        print(out.strip().splitlines()[-1] if out.strip() else f"worker exited {process.returncode}")


if __name__ == "__main__":
    main()
