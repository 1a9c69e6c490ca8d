"""Preemption on this machine: SIGTERM a run some seconds after a line, time signal-to-exit, rerun, and
compare the resumed run's weights checksum with an uninterrupted run of the same command.

    python bench/preemption.py --workers 1 --after 0.5 -- --preset default --train-limit 20000 --epochs 3
    python bench/preemption.py --workers 2 --after 1 -- --preset seed --train-limit 30000 --epochs 6
    python bench/preemption.py --vertex --after 1 -- --preset seed --train-limit 30000 --epochs 6

Workers run on 127.0.0.1 with TF_CONFIG and `--intra-op-threads 1`, with one --job-dir, as on Vertex AI.
Prints one JSON object: exit codes, seconds from the signal to each exit, the stop lines, whether a model
was exported before the rerun, and the checksums. `--vertex` runs a chief and a worker through the local
Vertex AI runner (`deploy.vertex train --target multi-worker --local`, SIGTERM to the runner) against a
fake-gcs-server bucket, as tests/test_local_vertex.py does. Run it under the machine's heavy-job lock.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = "idx:/usr/share/datasets/fashion-mnist"


def _free_ports(count: int) -> list:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _start(workers: int, job: str, args: list, logs: list) -> list:
    ports = _free_ports(workers)
    processes = []
    for index, log in enumerate(logs):
        env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")  # the same --job-dir, as on Vertex AI
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                                           "task": {"type": "worker", "index": index}})
        command = [sys.executable, "-m", "trainer.task", "--dataset", DATASET, "--intra-op-threads", "1",
                   "--job-dir", job, *args]
        processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log, "w"),
                                          stderr=subprocess.STDOUT))
    return processes


def _wait_line(log: str, prefix: str, process) -> None:
    while True:
        with open(log) as handle:
            if any(line.startswith(prefix) for line in handle):
                return
        if process.poll() is not None:
            raise SystemExit(f"{log}: ended ({process.returncode}) before {prefix!r}")
        time.sleep(0.02)


def _checksum(log: str) -> str:
    found = re.findall(r"^weights checksum (\w+)$", open(log).read(), re.M)
    return found[-1] if found else ""


def _through_vertex(after: float, args: list) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import fake_gcs_server

    epochs = args[args.index("--epochs") + 1]
    command = [sys.executable, "-m", "deploy.vertex", "train", "--project", "demo", "--image", "img:cpu", "--target",
               "multi-worker", "--workers", "1", "--job-dir", "gs://preemption/job", "--local", "--", "--dataset",
               DATASET, "--intra-op-threads", "1", *args]
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    report: dict = dict(through="deploy.vertex train --target multi-worker --workers 1 --local", args=args, after=after)
    with tempfile.TemporaryDirectory() as base, fake_gcs_server() as client:
        bucket = client.create_bucket("preemption")
        env["STORAGE_EMULATOR_HOST"] = os.environ["STORAGE_EMULATOR_HOST"]
        log = os.path.join(base, "runner.log")
        runner = subprocess.Popen(command, cwd=base, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        for replica in ("workerpool0-0", "workerpool1-0"):
            _wait_line(log, f"[{replica}] epoch 1/{epochs}", runner)
        time.sleep(after)
        signalled = time.monotonic()
        runner.send_signal(signal.SIGTERM)
        report["runner_exit_code"] = runner.wait()
        report["signal_to_exit_seconds"] = round(time.monotonic() - signalled, 2)
        lines = open(log).read().splitlines()
        report["stop_lines"] = [line for line in lines if "] stopped by" in line]
        report["closing_line"] = lines[-1]
        report["model_exported"] = any(blob.name.startswith("job/model/") for blob in bucket.list_blobs())
        rerun = subprocess.run(command, cwd=base, env=env, capture_output=True, text=True)
        report["rerun_exit_code"] = rerun.returncode
        report["resume_lines"] = [line for line in rerun.stdout.splitlines() if "] resuming from" in line]
        report["resumed"] = re.findall(r"^\[(workerpool\d-0)\] weights checksum (\w+)$", rerun.stdout, re.M)
    return report


def _through_workers(workers: int, after: float, uninterrupted: bool, args: list) -> dict:
    epochs = args[args.index("--epochs") + 1]
    base = tempfile.mkdtemp(prefix="preemption-")
    report: dict = dict(workers=workers, args=args, after=after)
    try:
        if uninterrupted:
            logs = [os.path.join(base, f"plain{i}.log") for i in range(workers)]
            assert [p.wait() for p in _start(workers, os.path.join(base, "plain"), args, logs)] == \
                [0] * workers, open(logs[0]).read()[-2000:]
            report["uninterrupted"] = [_checksum(log) for log in logs]
        job = os.path.join(base, "job")
        logs = [os.path.join(base, f"first{i}.log") for i in range(workers)]
        processes = _start(workers, job, args, logs)
        for log, process in zip(logs, processes, strict=True):
            _wait_line(log, f"epoch 1/{epochs}", process)
        time.sleep(after)
        signalled = time.monotonic()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        exits = []
        for process in processes:
            process.wait()
            exits.append(round(time.monotonic() - signalled, 2))
        report["exit_codes"] = [process.returncode for process in processes]
        report["signal_to_exit_seconds"] = exits
        report["stop_lines"] = [next((line.strip() for line in open(log) if line.startswith("stopped by")), None)
                                for log in logs]
        report["model_exported"] = os.path.exists(os.path.join(job, "model"))
        logs = [os.path.join(base, f"rerun{i}.log") for i in range(workers)]
        assert [p.wait() for p in _start(workers, job, args, logs)] == [0] * workers, open(logs[0]).read()[-2000:]
        report["resume_lines"] = [next((line.strip() for line in open(log) if line.startswith("resuming")), None)
                                  for log in logs]
        report["resumed"] = [_checksum(log) for log in logs]
        with open(os.path.join(job, "checkpoints", "history.json")) as handle:
            report["history"] = json.load(handle)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--after", type=float, default=0.5, help="seconds after epoch 1's line")
    parser.add_argument("--skip-uninterrupted", action="store_true")
    parser.add_argument("--vertex", action="store_true", help="through the local Vertex AI runner")
    parser.add_argument("trainer_args", nargs="*")
    options = parser.parse_args()
    if options.vertex:
        report = _through_vertex(options.after, options.trainer_args)
    else:
        report = _through_workers(options.workers, options.after, not options.skip_uninterrupted,
                                  options.trainer_args)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
