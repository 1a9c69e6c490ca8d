"""Strategies and fault tolerance with real processes: MirroredStrategy over logical CPU devices,
MultiWorkerMirroredStrategy with two processes on 127.0.0.1, kill -9 and SIGTERM with resume.

Strategy, device and thread settings are process-wide, so every training here runs in a subprocess.
No TPU exists here: only the detection and the clear failure are tested.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import (
    ROOT_DIR,
    free_port,
    read_metrics,
    run_cli,
    run_task,
    signal_after_first_epoch,
    start_cli,
    wait_for_line,
)
from trainer.distribute import attached_tpu, chief_of, cluster_config


def checksum(output):
    found = re.findall(r"^weights checksum (\w+)$", output, re.M)
    assert found, output[-2000:]
    return found[-1]


def tf_config(ports, index, kind="worker"):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                       "task": {"type": kind, "index": index}})


# ---------------------------------------------------------------------------------- resolution (no training)

def test_cluster_spec_from_vertex_ai_becomes_a_tf_config():
    spec = {"cluster": {"workerpool0": ["chief:2222"], "workerpool1": ["w0:2222", "w1:2222"]},
            "environment": "cloud", "task": {"type": "workerpool1", "index": 1}}
    config = cluster_config({"CLUSTER_SPEC": json.dumps(spec)})
    assert config["cluster"] == {"chief": ["chief:2222"], "worker": ["w0:2222", "w1:2222"]}
    assert chief_of(config) == ("worker", 1, False)
    assert chief_of({"cluster": config["cluster"], "task": {"type": "chief", "index": 0}})[2] is True


def test_worker_0_is_chief_when_there_is_no_chief_and_single_task_is_no_cluster():
    config = cluster_config({"TF_CONFIG": tf_config([1, 2], 0)})
    assert chief_of(config) == ("worker", 0, True)
    assert cluster_config({"TF_CONFIG": tf_config([1], 0)}) is None
    assert cluster_config({}) is None


def test_cluster_wait_names_the_peers_that_never_started_and_a_task_outside_its_cluster():
    """The port probe alone (no TensorFlow): a peer waiting for its cluster (its beacon answers) counts as
    started, one whose port is closed is named with its address once the wait is over; a TF_CONFIG whose
    task is not in its cluster is refused."""
    from trainer.distribute import _Beacon, wait_for_peers
    from trainer.errors import TrainerError

    up, down, own = free_port(), free_port(), free_port()
    with _Beacon(f"127.0.0.1:{up}"):
        config = {"cluster": {"chief": [f"127.0.0.1:{up}"], "worker": [f"127.0.0.1:{own}", f"127.0.0.1:{down}"]},
                  "task": {"type": "worker", "index": 0}}
        lines = []
        with pytest.raises(TrainerError) as error:
            wait_for_peers(config, 1.5, lines.append)
    assert str(error.value).startswith(f"the cluster did not start within 1.5 s (--cluster-wait): not started: "
                                       f"worker 1 (127.0.0.1:{down}); ")
    assert len(lines) == 1 and re.fullmatch(rf"waiting for the cluster to start \(\d s\): not started: worker 1 "
                                            rf"\(127\.0\.0\.1:{down}\) \(giving up after 1\.5 s, --cluster-wait\)",
                    lines[0])
    config["task"]["index"] = 2
    with pytest.raises(TrainerError, match=r"this task \(worker 2\) is not in its cluster \(chief x1, worker x2\)"):
        wait_for_peers(config, 1)


def test_a_peer_port_held_by_another_program_is_named_and_the_wait_stays_bounded():
    """Something that accepts connections but is no trainer (here a silent listener and a talkative one) would
    pass a bare port probe and then block TensorFlow's start for ever; the wait names it and gives up."""
    import socket
    import threading

    from trainer.distribute import wait_for_peers
    from trainer.errors import TrainerError

    def talk(server):
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            connection.close()

    with socket.create_server(("127.0.0.1", 0)) as silent, socket.create_server(("127.0.0.1", 0)) as talker:
        threading.Thread(target=talk, args=(talker,), daemon=True).start()
        ports = [free_port(), silent.getsockname()[1], talker.getsockname()[1]]
        config = {"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                  "task": {"type": "worker", "index": 0}}
        started = time.monotonic()
        with pytest.raises(TrainerError) as error:
            wait_for_peers(config, 2, lambda line: None)
    assert time.monotonic() - started < 10
    foreign = "something that is not a TensorFlow worker holds this port"
    assert f"worker 1 (127.0.0.1:{ports[1]}: {foreign})" in str(error.value)
    assert f"worker 2 (127.0.0.1:{ports[2]}: {foreign})" in str(error.value)


def test_tpu_detection_is_instant_and_finds_nothing_here():
    started = time.monotonic()
    assert attached_tpu({}) is None
    assert attached_tpu({"TPU_NAME": "my-tpu"}) == "my-tpu"
    assert time.monotonic() - started < 0.5


def test_auto_picks_default_here_quickly():
    import tensorflow  # noqa: F401  (its import time is not the detection's)

    from trainer.distribute import resolve_strategy

    started = time.monotonic()
    resolved = resolve_strategy("auto", {})
    assert resolved.name == "default" and resolved.num_replicas == 1 and resolved.is_chief
    assert time.monotonic() - started < 2


def test_auto_choice_without_a_tpu():
    """(Building a MultiWorkerMirroredStrategy waits for its peers, so the choice is tested on its own here
    and through real workers started with --strategy auto below.)"""
    from trainer.distribute import auto_choice

    assert auto_choice({"TF_CONFIG": tf_config([1, 2], 1)}, num_gpus=0) == "multi_worker"
    assert auto_choice({}, num_gpus=2) == "mirrored"
    assert auto_choice({}, num_gpus=1) == "default"


def test_strategy_tpu_without_a_tpu_is_one_clear_error(tmp_path):
    code, _, err = run_task(["--strategy", "tpu", "--dataset", "idx:/nowhere", "--job-dir", str(tmp_path)])
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: --strategy tpu: cannot reach TPU") and "Traceback" not in err


# ---------------------------------------------------------------------------------- training

@pytest.mark.slow
def test_mirrored_over_two_cpu_devices_matches_the_default_strategy(digits_idx, seed_run, tmp_path):
    _, default_metrics, _ = seed_run  # the same data, seed and recipe under the default strategy
    job_dir = str(tmp_path / "mirrored")
    result = run_cli(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--epochs", "6",
                      "--strategy", "mirrored", "--cpu-devices", "2", "--job-dir", job_dir])
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(job_dir)
    assert metrics["num_replicas"] == 2 and metrics["strategy"] == "mirrored"
    assert metrics["test_accuracy"] > 0.93
    assert abs(metrics["test_accuracy"] - default_metrics["test_accuracy"]) < 0.03


def _start_workers(digits_idx, job_dirs, extra, logs, tmp_dirs, strategy="multi_worker", preset="seed"):
    ports = [free_port(), free_port()]
    return [start_cli(["--dataset", f"idx:{digits_idx}", "--preset", preset, "--job-dir", job_dirs[i],
                       "--strategy", strategy, "--intra-op-threads", "1", *extra], logs[i],
                      TF_CONFIG=tf_config(ports, i), TMPDIR=tmp_dirs[i])
            for i in range(2)]


def _shared_job(tmp_path):
    """One --job-dir for both workers (the same command on each, as Vertex AI runs it); a TMPDIR each."""
    tmp_dirs = [str(tmp_path / "tmp0"), str(tmp_path / "tmp1")]
    for folder in tmp_dirs:
        os.makedirs(folder)
    return [str(tmp_path / "job")] * 2, tmp_dirs


def _rerun_resumes_with_equal_checksums(digits_idx, job_dirs, extra, tmp_dirs, tmp_path, preset="seed"):
    """Rerun both workers with the same command after a stop; returns the chief's metrics."""
    logs = [str(tmp_path / "b0.log"), str(tmp_path / "b1.log")]
    assert _wait(_start_workers(digits_idx, job_dirs, extra, logs, tmp_dirs, preset=preset)) == [0, 0]
    outputs = [open(log).read() for log in logs]
    assert all("resuming from" in output for output in outputs)
    assert checksum(outputs[0]) == checksum(outputs[1])
    return read_metrics(job_dirs[0])


def _wait(processes, timeout=300):
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise AssertionError("a worker hung") from None
    return codes


@pytest.mark.slow
def test_multi_worker_two_processes_agree_and_only_the_chief_writes(digits_idx, tmp_path):
    """The default recipe, batch norm included: each worker's moving statistics come from its own shard
    until they are averaged after every epoch, so equal checksums prove the averaging."""
    job_dirs = [str(tmp_path / "chief_job"), str(tmp_path / "worker_job")]
    logs = [str(tmp_path / "w0.log"), str(tmp_path / "w1.log")]
    tmp_dirs = [str(tmp_path / "tmp0"), str(tmp_path / "tmp1")]
    for folder in tmp_dirs:
        os.makedirs(folder)
    extra = ["--epochs", "2", "--train-limit", "2000"]
    assert _wait(_start_workers(digits_idx, job_dirs, extra, logs, tmp_dirs, "auto", preset="default")) == [0, 0]
    outputs = [open(log).read() for log in logs]
    assert checksum(outputs[0]) == checksum(outputs[1])
    metrics = read_metrics(job_dirs[0])
    assert metrics["num_replicas"] == 2 and metrics["strategy"] == "multi_worker"  # what auto chose
    assert os.path.isfile(os.path.join(job_dirs[0], "model", "saved_model.pb"))
    assert not os.path.exists(os.path.join(job_dirs[1], "model"))
    assert not os.path.exists(os.path.join(job_dirs[1], "metrics.json"))
    assert os.listdir(tmp_dirs[1]) == [], "the worker's scratch folders must be deleted"


@pytest.mark.slow
def test_two_workers_summing_gradients_early_train_the_weights_keras_own_all_reduce_trains(tmp_path):
    """The two-worker train step sums the gradients itself, last layer first in packs, so the sums travel
    during back-propagation; Keras' optimizer would send them all at once. Both from the same start on each
    worker's own data: the same weights to the bit, and the two workers agree."""
    ports = [free_port(), free_port()]
    outs = [str(tmp_path / f"worker{index}.json") for index in range(2)]
    env = dict(os.environ, PYTHONPATH=ROOT_DIR, TF_CPP_MIN_LOG_LEVEL="2")
    processes = [subprocess.Popen([sys.executable, os.path.join(ROOT_DIR, "tests", "gradient_sums_worker.py"), out],
                                  env=dict(env, TF_CONFIG=tf_config(ports, index)), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for index, out in enumerate(outs)]
    logs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [log[-2000:] for log in logs]
    results = [json.load(open(out)) for out in outs]
    for result in results:
        assert result["early"]["early"] and not result["keras"]["early"]  # the two paths really differ
        assert result["early"]["weights"] == result["keras"]["weights"]
        assert result["early"]["loss_sum"] == result["keras"]["loss_sum"]
    assert results[0]["early"]["weights"] == results[1]["early"]["weights"]


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_the_rerun_resumes_mid_epoch(digits_idx, tmp_path):
    job_dir = str(tmp_path / "job")
    args = ["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--epochs", "2", "--batch-size", "16",
            "--train-limit", "1500", "--job-dir", job_dir]
    log = str(tmp_path / "first.log")
    process = signal_after_first_epoch(args, log, signal.SIGTERM, epochs=2)
    signalled = time.monotonic()
    assert process.wait(timeout=30) == 143
    assert time.monotonic() - signalled < 10
    assert "stopped by SIGTERM at epoch 2" in open(log).read()
    result = run_cli(args)
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(job_dir)
    assert metrics["initial_epoch"] == 1 and metrics["initial_step"] >= 1 and metrics["epochs_completed"] == 2


def test_resuming_with_other_model_settings_is_refused(digits_idx, tmp_path):
    job_dir = str(tmp_path / "job")
    base = ["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "600", "--job-dir", job_dir]
    assert run_task(base + ["--epochs", "1"])[0] == 0
    code, _, err = run_task(base + ["--epochs", "2", "--dropout", "0.3"])
    assert code == 1 and "dropout 0.5 -> 0.3" in err and "--no-resume" in err
    code, out, err = run_task(base + ["--epochs", "1", "--dropout", "0.3", "--no-resume"])
    assert code == 0, err
    assert read_metrics(job_dir)["initial_epoch"] == 0


def test_a_checkpoint_of_an_older_format_is_refused_with_one_line(digits_idx, tmp_path):
    """A checkpoint without the random-number state (format 2) cannot resume exactly: one line, exit 1."""
    job_dir = str(tmp_path / "job")
    base = ["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "600", "--job-dir", job_dir]
    assert run_task(base + ["--epochs", "1"])[0] == 0
    run_config = os.path.join(job_dir, "checkpoints", "run_config.json")
    saved = json.load(open(run_config))
    assert saved["checkpoint_format"] == 3
    json.dump(dict(saved, checkpoint_format=2), open(run_config, "w"))
    code, _, err = run_task(base + ["--epochs", "2"])
    assert code == 1 and err.count("\n") == 1, err
    assert f"--checkpoint-dir {job_dir}/checkpoints: holds a checkpoint of format 2" in err and "--no-resume" in err
    assert run_task(base + ["--epochs", "2", "--no-resume"])[0] == 0


def _history(job_dir):
    return json.load(open(os.path.join(job_dir, "checkpoints", "history.json")))


@pytest.mark.slow
def test_a_mid_epoch_resume_is_bit_exact_and_its_epoch_row_covers_the_whole_epoch(digits_idx, tmp_path):
    """The default recipe (dropout, batch norm, random shifts), its second epoch already past the unaugmented
    one (shifts, its own dropout, label smoothing, weight decay): the same run uninterrupted, and stopped by
    SIGTERM inside epoch 2 then rerun, end with the same weights; epoch 2's row (training loss and accuracy
    over all of its steps, validation) is the same in both."""
    args = ["--dataset", f"idx:{digits_idx}", "--preset", "default", "--epochs", "2", "--batch-size", "32",
            "--train-limit", "3000", "--intra-op-threads", "1", "--unaugmented-epochs", "1"]
    plain = run_cli(args + ["--job-dir", str(tmp_path / "plain")])
    assert plain.returncode == 0, plain.stderr
    job = ["--job-dir", str(tmp_path / "job")]
    log = str(tmp_path / "first.log")
    process = signal_after_first_epoch(args + job, log, signal.SIGTERM, epochs=2)
    assert process.wait(timeout=30) == 143
    stop = re.search(r"^stopped by SIGTERM at epoch 2, step (\d+)/(\d+); checkpoint ", open(log).read(), re.M)
    assert stop and 0 < int(stop.group(1)) < int(stop.group(2)), open(log).read()[-2000:]
    rerun = run_cli(args + job)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {tmp_path / 'job'}/checkpoints at epoch 2, step {stop.group(1)}" in rerun.stdout
    assert checksum(rerun.stdout) == checksum(plain.stdout)
    assert _history(str(tmp_path / "job")) == _history(str(tmp_path / "plain"))
    metrics = read_metrics(str(tmp_path / "job"))
    assert metrics["history"] == read_metrics(str(tmp_path / "plain"))["history"]
    assert (metrics["initial_epoch"], metrics["initial_step"]) == (1, int(stop.group(1)))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["seed", "default"])
def test_sigterm_to_both_workers_mid_epoch_stops_them_at_one_step_and_the_resume_is_bit_exact(digits_idx,
                                                                                               tmp_path, preset):
    """Vertex AI's preemption of a cluster: SIGTERM to every worker inside epoch 2. Both stop at the same
    step with a checkpoint, exit 143 well within Vertex AI's 30 s and export nothing; rerun, they end with
    the weights of an uninterrupted run. The default recipe adds batch norm, whose moving statistics each
    worker keeps for its own shard until the epoch's end: they must survive the stop too."""
    extra = ["--epochs", "2", "--batch-size", "32", "--train-limit", "2000"]
    plain_dirs, plain_tmp = _shared_job(tmp_path / "plain")
    plain_logs = [str(tmp_path / "p0.log"), str(tmp_path / "p1.log")]
    assert _wait(_start_workers(digits_idx, plain_dirs, extra, plain_logs, plain_tmp, preset=preset)) == [0, 0]
    job_dirs, tmp_dirs = _shared_job(tmp_path)
    logs = [str(tmp_path / "a0.log"), str(tmp_path / "a1.log")]
    processes = _start_workers(digits_idx, job_dirs, extra, logs, tmp_dirs, preset=preset)
    for log, process in zip(logs, processes, strict=True):
        wait_for_line(log, "epoch 1/2", process)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert _wait(processes, timeout=60) == [143, 143]
    assert time.monotonic() - signalled < 30
    stops = [re.findall(r"^stopped by SIGTERM at epoch 2, step (\d+)/56; ", open(log).read(), re.M) for log in logs]
    assert stops[0] and stops[0] == stops[1], [open(log).read()[-1500:] for log in logs]
    assert not os.path.exists(os.path.join(job_dirs[0], "model"))
    metrics = _rerun_resumes_with_equal_checksums(digits_idx, job_dirs, extra, tmp_dirs, tmp_path, preset)
    assert (metrics["initial_epoch"], metrics["initial_step"]) == (1, int(stops[0][0]))
    assert checksum(open(str(tmp_path / "b0.log")).read()) == checksum(open(plain_logs[0]).read())
    assert metrics["history"] == read_metrics(plain_dirs[0])["history"]


@pytest.mark.slow
def test_multi_worker_sigterm_to_one_worker_at_start_up_stops_both_then_both_resume(digits_idx, tmp_path):
    """SIGTERM reaches one worker while it starts (TensorFlow loading, the cluster forming): it must not
    leave alone (its peer would wait in a collective), so both stop at the first vote, step 20 of
    epoch 1, with a checkpoint and exit 143."""
    job_dirs, tmp_dirs = _shared_job(tmp_path)
    extra = ["--epochs", "2", "--batch-size", "32", "--train-limit", "1500"]
    logs = [str(tmp_path / "a0.log"), str(tmp_path / "a1.log")]
    processes = _start_workers(digits_idx, job_dirs, extra, logs, tmp_dirs)
    time.sleep(2)
    assert all(process.poll() is None for process in processes)
    processes[1].send_signal(signal.SIGTERM)
    assert _wait(processes, timeout=120) == [143, 143]
    assert all("stopped by SIGTERM at epoch 1, step 20/" in open(log).read() for log in logs)
    metrics = _rerun_resumes_with_equal_checksums(digits_idx, job_dirs, extra, tmp_dirs, tmp_path)
    assert (metrics["initial_epoch"], metrics["initial_step"]) == (0, 20)
    assert metrics["epochs_completed"] == 2 and metrics["num_replicas"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1], ids=["leader", "non-leader"])
def test_kill_9_of_one_worker_stops_the_other_with_one_line_and_a_rerun_resumes(digits_idx, tmp_path, victim):
    """A worker dies (kill -9: a crash or a preemption without notice) after epoch 1's checkpoint. The
    survivor must not wait forever in a collective: it exits 1 within 60 s (TensorFlow's
    coordination service notices within about 10 s, at once when the connection is reset) with one line
    naming the lost task, no traceback. Worker 0 is the leader: it hosts the coordination service, so
    its death and a non-leader's reach the survivor differently. Rerunning both resumes from epoch 1."""
    job_dirs, tmp_dirs = _shared_job(tmp_path)
    extra = ["--epochs", "4", "--batch-size", "32", "--train-limit", "3000"]
    logs = [str(tmp_path / "a0.log"), str(tmp_path / "a1.log")]
    processes = _start_workers(digits_idx, job_dirs, extra, logs, tmp_dirs)
    for log, process in zip(logs, processes, strict=True):
        wait_for_line(log, "epoch 1/4", process)  # both have saved epoch 1
    processes[victim].kill()
    killed = time.monotonic()
    survivor = 1 - victim
    assert processes[survivor].wait(timeout=90) == 1
    assert time.monotonic() - killed < 60
    processes[victim].wait()
    output = open(logs[survivor]).read()
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"lost a peer: worker {victim} " in errors[0], output[-3000:]
    assert "epoch 4/4" not in output
    metrics = _rerun_resumes_with_equal_checksums(digits_idx, job_dirs, extra, tmp_dirs, tmp_path)
    assert metrics["initial_epoch"] >= 1 and metrics["epochs_completed"] == 4


@pytest.mark.slow
def test_a_worker_whose_peer_never_starts_gives_up_after_cluster_wait(digits_idx, tmp_path):
    """Without --cluster-wait TensorFlow would wait for a missing peer forever (and ignore SIGTERM while it
    waits). Nothing listens on the peer's port here: the worker reports progress, then exits 1 naming it,
    and leaves no job folder behind."""
    ports = [free_port(), free_port()]
    job_dir = str(tmp_path / "lone")
    started = time.monotonic()
    result = run_cli(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--job-dir", job_dir,
                      "--cluster-wait", "6"], timeout=90, TF_CONFIG=tf_config(ports, 0))
    out, err = result.stdout, result.stderr
    assert result.returncode == 1, err
    assert "waiting for the cluster to start" in out and f"worker 1 (127.0.0.1:{ports[1]})" in out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the cluster did not start within 6 s (--cluster-wait): not started: worker 1 "
                      f"(127.0.0.1:{ports[1]}); check those replicas' logs, or raise --cluster-wait when replicas "
                      "start far apart"], err
    assert time.monotonic() - started < 60
    assert not os.path.exists(job_dir)


@pytest.mark.slow
def test_bf16_mixed_precision_compiles_trains_and_serves_float32(digits_idx, tmp_path):
    import numpy as np
    import tensorflow as tf

    job_dir = str(tmp_path / "bf16")
    result = run_cli(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--epochs", "2",
                      "--mixed-precision", "bf16", "--jit-compile", "on", "--job-dir", job_dir])
    assert result.returncode == 0, result.stderr
    assert "mixed_bfloat16, XLA;" in result.stdout  # the policy TPUs use, compiled as on a TPU
    assert read_metrics(job_dir)["test_accuracy"] > 0.85
    serving = tf.saved_model.load(os.path.join(job_dir, "model")).signatures["serving_default"]
    outputs = serving(image=tf.zeros([2, 28, 28], tf.uint8))
    assert outputs["probabilities"].dtype == tf.float32
    np.testing.assert_allclose(outputs["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-3)
