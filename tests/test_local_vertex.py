"""`deploy.vertex train --local`: the request that --dry-run prints, run here the way Vertex AI runs it.

Real here: the request (google-cloud-aiplatform's CustomJob, built by the same code as submission), one
process per replica with Vertex AI's environment, real TensorFlow training on real MNIST digits (the
`digits_idx` fixture), MultiWorkerMirroredStrategy across those processes on 127.0.0.1, a real GCS API
server (fake-gcs-server) for the job's gs:// base_output_directory, kill -9 and SIGTERM.

Faked: only Google's endpoints. Vertex AI's control plane is the runner itself (there is no local Vertex
AI to ask), and Cloud Storage is fake-gcs-server reached through STORAGE_EMULATOR_HOST, exactly as the
trainer reaches Cloud Storage with credentials.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT_DIR, fake_gcs_server, main_in_fresh_interpreter, trainer_env, wait_for_line

pytestmark = pytest.mark.slow  # local Vertex AI jobs

COMMON = ["train", "--project", "demo", "--image", "img:cpu"]


@pytest.fixture(scope="module")
def bucket():
    """The jobs' bucket on this module's own fake-gcs-server (replicas find it through STORAGE_EMULATOR_HOST)."""
    with fake_gcs_server() as client:
        yield client.create_bucket("local-jobs")


def stored(bucket, prefix):
    return sorted(blob.name[len(prefix):] for blob in bucket.list_blobs(prefix=prefix))


def metrics_in(bucket, prefix):
    return json.loads(bucket.blob(prefix + "metrics.json").download_as_bytes())


def start_runner(args, log_path, cwd):
    """`python -m deploy.vertex ARGS` in the background, stdout and stderr into one log."""
    handle = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "deploy.vertex", *args], cwd=cwd, env=trainer_env(),
                            stdout=handle, stderr=subprocess.STDOUT)


def sigterm_runner(args, cwd, after_lines):
    """Start the runner, wait for each of `after_lines` in its log, SIGTERM it; assert it exits 143 within
    Vertex AI's 30 s and return its output."""
    log = str(cwd / "runner.log")
    runner = start_runner(args, log, cwd)
    try:
        for line in after_lines:
            wait_for_line(log, line, runner)
        runner.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert runner.wait(timeout=60) == 143, open(log).read()[-3000:]
    finally:
        runner.kill()
    assert time.monotonic() - signalled < 30
    return open(log).read()


def run_runner(args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "deploy.vertex", *args], cwd=cwd, env=trainer_env(),
                          capture_output=True, text=True, timeout=timeout)


def replica_pids(output):
    """{replica: pid of its latest start}, from the runner's 'started NAME (pid N)' lines."""
    return dict(re.findall(r"started (workerpool\d-\d+) \(pid (\d+)\)", output))


def assert_gone(pids):
    for name, pid in pids.items():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            continue
        status = open(f"/proc/{pid}/stat").read().split()[2] if os.path.exists(f"/proc/{pid}/stat") else "?"
        assert status == "Z", f"{name} (pid {pid}) is still running"


def assert_job_outputs(bucket, prefix):
    """What the AIP_* variables of a job with --job-dir gs://local-jobs/PREFIX put where."""
    names = stored(bucket, prefix)
    for expected in ("metrics.json", "model/saved_model.pb", "model/_SUCCESS", "plots/accuracy.png",
                     "plots/loss.png", "plots/confusion_matrix.png", "checkpoints/checkpoint"):
        assert expected in names, (expected, names)
    for run in ("train", "validation"):
        assert any(name.startswith(f"logs/{run}/events.out.tfevents") for name in names), names
    return names


# ---------------------------------------------------------------------------------- the request -> replicas

def test_each_replica_gets_vertex_ais_environment_from_the_dry_run_request(tmp_path):
    """No processes: the CustomJob printed by --dry-run, planned into replicas as the runner starts them."""
    from google.cloud.aiplatform_v1 import CustomJob, EnvVar

    from deploy import local
    from trainer.distribute import chief_of, cluster_config

    result = main_in_fresh_interpreter("deploy.vertex", [*COMMON, "--target", "multi-worker", "--workers", "2",
                                                         "--job-dir", "gs://bkt/run", "--timeout", "90m", "--dry-run",
                                                         "--", "--hparams-file", "/gcs/b/best.json", "--epochs", "2"])
    assert result["code"] == 0, result["err"]
    job = CustomJob.from_json(result["out"])
    job.job_spec.worker_pool_specs[1].container_spec.env = [EnvVar(name="DATA", value="idx:/gcs/b/digits")]
    runner_env = {"TF_CONFIG": "from the runner's shell", "AIP_MODEL_DIR": "gs://elsewhere/", "HOME": "/home/u"}
    options = local.Options(gcs_root=str(tmp_path / "fuse"))
    replicas = local.plan_replicas(job.job_spec, "local-1", options, runner_env, [1001, 1002, 1003])

    assert [r.name for r in replicas] == ["workerpool0-0", "workerpool1-0", "workerpool1-1"]
    args = list(job.job_spec.worker_pool_specs[0].container_spec.args)
    assert replicas[0].argv == [sys.executable, "-m", "trainer.task", "--hparams-file",
                                str(tmp_path / "fuse" / "b" / "best.json"), *args[2:]]
    worker = replicas[2].env
    spec = json.loads(worker["CLUSTER_SPEC"])
    assert spec["cluster"] == {"workerpool0": ["127.0.0.1:1001"], "workerpool1": ["127.0.0.1:1002", "127.0.0.1:1003"]}
    assert spec["task"] == {"type": "workerpool1", "index": 1, "trial": ""} and spec["environment"] == "cloud"
    assert spec["job"]["scheduling"]["timeout"] == "5400s", "the job spec as Vertex AI passes it"
    tf_config = json.loads(worker["TF_CONFIG"])
    assert tf_config["cluster"] == {"chief": ["127.0.0.1:1001"], "worker": ["127.0.0.1:1002", "127.0.0.1:1003"]}
    assert tf_config["task"] == {"type": "worker", "index": 1}
    assert cluster_config({"CLUSTER_SPEC": worker["CLUSTER_SPEC"]}) == {k: tf_config[k] for k in ("cluster", "task")}
    assert chief_of(json.loads(replicas[0].env["TF_CONFIG"]))[2], "workerpool0 is the chief"
    assert (worker["AIP_MODEL_DIR"], worker["AIP_CHECKPOINT_DIR"], worker["AIP_TENSORBOARD_LOG_DIR"]) == (
        "gs://bkt/run/model/", "gs://bkt/run/checkpoints/", "gs://bkt/run/logs/")
    assert worker["DATA"] == f"idx:{tmp_path}/fuse/b/digits" and "DATA" not in replicas[0].env
    assert worker["CLOUD_ML_JOB_ID"] == "local-1" and worker["PYTHONUNBUFFERED"] == "1"
    assert worker["HOME"] == "/home/u" and worker["PYTHONPATH"].split(os.pathsep)[0] == ROOT_DIR

    trial = local.plan_replicas(job.job_spec, "local-2", options, {}, [1, 2, 3], trial_id="7")[0].env
    assert trial["AIP_MODEL_DIR"] == "gs://bkt/run/7/model/"
    assert json.loads(trial["CLUSTER_SPEC"])["task"]["trial"] == "7"

    # all four pools: ps and evaluator by position; an evaluator is not part of TF_CONFIG's cluster
    pool = job.job_spec.worker_pool_specs[0]
    job.job_spec.worker_pool_specs = [pool, pool, pool, pool]
    evaluator = local.plan_replicas(job.job_spec, "local-3", options, {}, [1, 2, 3, 4])[3]
    assert json.loads(evaluator.env["TF_CONFIG"])["task"]["type"] == "evaluator"
    assert set(json.loads(evaluator.env["TF_CONFIG"])["cluster"]) == {"chief", "worker", "ps"}


def test_the_image_entry_point_is_the_dockerfiles():
    from deploy.local import IMAGE_ENTRYPOINT

    dockerfile = open(os.path.join(ROOT_DIR, "Dockerfile")).read()
    assert json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1)) == list(IMAGE_ENTRYPOINT)


def test_a_gpu_or_tpu_job_says_what_is_missing_and_what_runs_instead():
    from deploy import local, vertex

    cases = [("gpu-multi", [], "4 x NVIDIA_TESLA_T4 and this machine has no GPUs: the trainer's --strategy auto "
                                  "picks 'default' instead"),
             ("tpu-v5e", [], "4 x TPU_V5_LITEPOD and this machine has no TPU: the trainer's --strategy auto picks "
                             "'default' instead"),
             ("tpu-v3", ["--strategy", "tpu"], "8 x TPU_V3 and this machine has no TPU: the job asks for --strategy "
                                               "tpu itself (the trainer says whether it can run here)")]
    for target, flags, note in cases:
        args, module_args = vertex.parse([*COMMON, "--target", target, "--job-dir", "gs://bkt/r", "--local", "--",
                                          *flags], {})
        spec = vertex.build_job(args, module_args, None).job_spec  # what main hands the runner
        replicas = local.plan_replicas(spec, "j", local.Options(), {}, [1])
        assert local.accelerator_notes(spec, replicas, {}) == [
            f"workerpool0 asks for {note}; nothing else in the request changes"]


def small_job(*pool_commands):
    """A CustomJob with one worker pool per (container command, replica count), in that order."""
    from google.cloud.aiplatform_v1 import ContainerSpec, CustomJob, CustomJobSpec, MachineSpec, WorkerPoolSpec

    pools = [WorkerPoolSpec(machine_spec=MachineSpec(machine_type="n1-standard-4"), replica_count=count,
                            container_spec=ContainerSpec(image_uri="img", command=command))
             for command, count in pool_commands]
    return CustomJob(display_name="small", job_spec=CustomJobSpec(worker_pool_specs=pools))


STUBBORN = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))
print("up", flush=True)
time.sleep(60)
"""
OBEDIENT = """
import json, os, signal, sys, time
def stop(*_):
    print("got SIGTERM", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
if json.loads(os.environ["CLUSTER_SPEC"])["task"]["index"] == 1:  # the second replica of its pool fails
    time.sleep(1)
    print("error: broken on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(60)
"""


def test_a_failed_replica_stops_the_others_sigterm_then_sigkill_after_the_grace(capsys):
    """Real processes, no TensorFlow: workerpool1-1 fails; workerpool1-0 obeys SIGTERM, workerpool0-0
    ignores it and is killed once --stop-grace has passed."""
    from deploy import local

    job = small_job((["python", "-c", STUBBORN], 1), (["python", "-c", OBEDIENT], 2))
    started = time.monotonic()
    code = local.run_custom_job(job, local.Options(stop_grace=1.0), environ=dict(os.environ))
    out, err = capsys.readouterr()
    assert code == 1 and time.monotonic() - started < 20
    assert err.strip().splitlines()[-1] == ("error: the local job failed: workerpool1-1 exited with code 3 (error: "
                                            "broken on purpose)")
    assert "local job: workerpool1-1 failed, stopping the other replicas: SIGTERM to workerpool0-0, workerpool1-0 " \
           "(SIGKILL after 1 s)" in out
    assert "[workerpool1-0] got SIGTERM" in out and "[workerpool0-0] ignoring SIGTERM" in out
    assert "local job: SIGKILL to workerpool0-0 (still running after 1 s)" in out
    assert_gone(replica_pids(out))


def test_the_job_succeeds_with_workerpool0_peers_finishing_are_awaited_the_rest_stopped(capsys):
    from deploy import local

    finishing = "import time; time.sleep(1); print('done', flush=True)"
    job = small_job((["python", "-c", "print('chief done')"], 1), (["python", "-c", finishing], 1),
                    (["python", "-c", OBEDIENT], 1))
    code = local.run_custom_job(job, local.Options(stop_grace=3.0), environ=dict(os.environ))
    out, _ = capsys.readouterr()
    assert code == 0, out
    assert "[workerpool1-0] done" in out and "local job: workerpool1-0 exited 0" in out
    assert "local job: workerpool0 succeeded, so Vertex AI ends the job: SIGTERM to workerpool2-0" in out
    assert "[workerpool2-0] got SIGTERM" in out
    assert out.strip().splitlines()[-1].startswith("local job: succeeded in")


def test_ctrl_c_to_the_runner_is_sigterm_to_every_replica_and_exit_130(capsys):
    import threading

    from deploy import local

    job = small_job((["python", "-c", OBEDIENT], 1), (["python", "-c", OBEDIENT], 1))
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))  # the terminal's Ctrl-C, to the runner
    timer.start()
    try:
        code = local.run_custom_job(job, local.Options(stop_grace=5.0), environ=dict(os.environ))
    finally:
        timer.cancel()
    out, _ = capsys.readouterr()
    assert code == 130
    assert "local job: Ctrl-C received; forwarding SIGTERM, as Vertex AI does before a preemption" in out
    assert "[workerpool0-0] got SIGTERM" in out and "[workerpool1-0] got SIGTERM" in out
    assert_gone(replica_pids(out))


def test_a_command_missing_here_is_one_line(capsys):
    from deploy import local

    code = local.run_custom_job(small_job((["/no/such/entrypoint"], 1)), local.Options(), environ={})
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: cannot start workerpool0-0's command /no/such/entrypoint here (No such file or directory)"]


# ---------------------------------------------------------------------------------- real jobs

def test_multi_worker_job_survives_a_killed_worker_and_the_chief_fills_the_aip_folders(bucket, digits_idx, tmp_path):
    """Chief + 2 workers = 3 processes; kill -9 of a worker mid-run. As on Vertex AI, the peers then fail
    too (their collective is aborted once the coordination service misses the dead worker), each is
    restarted in place once, and all three resume from the chief's gs:// checkpoint."""
    log = str(tmp_path / "runner.log")
    runner = start_runner([*COMMON, "--target", "multi-worker", "--workers", "2", "--job-dir", "gs://local-jobs/mw",
                           "--local", "--restarts", "1", "--stop-grace", "10", "--", "--dataset", f"idx:{digits_idx}",
                           "--preset", "seed", "--train-limit", "2000", "--epochs", "2", "--batch-size", "48",
                           "--intra-op-threads", "1"], log, tmp_path)
    try:
        wait_for_line(log, "[workerpool1-1] epoch 1/2", runner)
        os.kill(int(replica_pids(open(log).read())["workerpool1-1"]), signal.SIGKILL)
        # On failure: every line of the runner's own (what failed first, and when), then the replicas' last lines.
        assert runner.wait(timeout=300) == 0, "\n".join(
            [line for line in open(log).read().splitlines() if line.startswith("local job:")]
            + [open(log).read()[-3000:]])
    finally:
        runner.kill()
    output = open(log).read()
    assert "local job: workerpool1-1 was killed by SIGKILL; its last lines:" in output
    assert "local job: restarting workerpool1-1 in place (restart 1 of 1)" in output
    assert len(re.findall(r"^\[workerpool\d-\d\] resuming from gs://local-jobs/mw/checkpoints/", output, re.M)) == 3
    pids = replica_pids(output)
    assert sorted(pids) == ["workerpool0-0", "workerpool1-0", "workerpool1-1"]
    assert len(set(re.findall(r"on (127\.0\.0\.1:\d+): python", output))) == 3, "restarted in place: same address"
    checksums = dict(re.findall(r"^\[(workerpool\d-\d)\] weights checksum (\w+)$", output, re.M))
    assert sorted(checksums) == sorted(pids) and len(set(checksums.values())) == 1, checksums
    assert re.findall(r"^\[(workerpool\d-\d)\] wrote gs://", output, re.M) == ["workerpool0-0"]
    assert "local job: succeeded in" in output.splitlines()[-1]
    names = assert_job_outputs(bucket, "mw/")
    assert {name.split("/")[0] for name in names} == {"metrics.json", "model", "model_summary.txt", "plots", "logs",
                                                      "checkpoints"}
    metrics = metrics_in(bucket, "mw/")
    assert metrics["strategy"] == "multi_worker" and metrics["num_replicas"] == 3
    assert metrics["initial_epoch"] >= 1 and metrics["epochs_completed"] == 2
    assert_gone(pids)


def test_a_replica_failing_at_run_time_fails_the_job_with_its_error_and_stops_the_others(bucket, tmp_path):
    result = main_in_fresh_interpreter("deploy.vertex", [
        *COMMON, "--target", "multi-worker", "--workers", "1", "--job-dir", "gs://local-jobs/fails", "--local",
        "--stop-grace", "5", "--", "--dataset", "idx:/missing/digits", "--preset", "seed", "--intra-op-threads", "1"],
        cwd=str(tmp_path))
    assert result["code"] == 1, result["out"][-2000:] + result["err"][-2000:]
    last = result["err"].strip().splitlines()[-1]
    assert re.fullmatch(r"error: the local job failed: workerpool\d-0 exited with code 1 \(error: /missing/digits: "
                        r"no such folder \(--dataset idx:/missing/digits\)\)", last), last
    assert "would be restarted in place (up to 5 times), then the whole job retried (up to 3 times)" in result["err"]
    assert result["heavy"] == [], "the runner itself never imports TensorFlow"
    assert_gone(replica_pids(result["out"]))


def test_sigterm_to_the_runner_stops_every_replica_143_and_the_same_command_resumes(bucket, digits_idx, tmp_path):
    args = [*COMMON, "--target", "cpu", "--job-dir", "gs://local-jobs/preempted", "--local", "--", "--dataset",
            f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "2000", "--epochs", "2", "--batch-size", "16"]
    output = sigterm_runner(args, tmp_path, ["[workerpool0-0] epoch 1/2"])
    assert "SIGTERM received; forwarding SIGTERM, as Vertex AI does before a preemption" in output
    assert "[workerpool0-0] stopped by SIGTERM" in output
    assert_gone(replica_pids(output))
    rerun = run_runner(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    metrics = metrics_in(bucket, "preempted/")
    assert metrics["initial_epoch"] >= 1 or metrics["initial_step"] > 0
    assert metrics["strategy"] == "default" and metrics["num_replicas"] == 1
    assert_job_outputs(bucket, "preempted/")  # a --target cpu job: everything where its AIP_* variables say


def test_sigterm_to_a_multi_worker_runner_stops_both_replicas_at_one_step_and_the_job_resumes(bucket, digits_idx,
                                                                                              tmp_path):
    """Vertex AI's preemption of a cluster, through the runner: SIGTERM forwarded to the chief and the worker
    inside epoch 2; both stop at the same step (exit 143), the runner prints its closing line and exits
    143 within Vertex AI's 30 s, no model is exported, and the same command resumes."""
    args = [*COMMON, "--target", "multi-worker", "--workers", "1", "--job-dir", "gs://local-jobs/mw-preempted",
            "--local", "--", "--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "3000",
            "--epochs", "2", "--batch-size", "32", "--intra-op-threads", "1"]
    output = sigterm_runner(args, tmp_path, ["[workerpool1-0] epoch 1/2", "[workerpool0-0] epoch 1/2"])
    stops = dict(re.findall(r"^\[(workerpool\d-0)\] stopped by SIGTERM at epoch 2, step (\d+)/84;", output, re.M))
    assert sorted(stops) == ["workerpool0-0", "workerpool1-0"] and len(set(stops.values())) == 1, output[-3000:]
    closing = output.strip().splitlines()[-1]
    assert re.fullmatch(r"local job: stopped by SIGTERM after \S+ \(exit codes: workerpool0-0 143, workerpool1-0 "
                        r"143\); rerun the same command to resume from the replicas' last checkpoint", closing), closing
    assert "SIGKILL to" not in output  # every replica stopped within the grace
    assert not [name for name in stored(bucket, "mw-preempted/") if name.startswith("model/")]
    assert_gone(replica_pids(output))
    rerun = run_runner(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert len(re.findall(r"^\[workerpool\d-0\] resuming from gs://local-jobs/mw-preempted/checkpoints/? at epoch 2, "
                          rf"step {stops['workerpool0-0']}$", rerun.stdout, re.M)) == 2, rerun.stdout[-3000:]
    metrics = metrics_in(bucket, "mw-preempted/")
    assert (metrics["initial_epoch"], metrics["initial_step"]) == (1, int(stops["workerpool0-0"]))
    assert metrics["num_replicas"] == 2 and metrics["epochs_completed"] == 2


def test_the_jobs_scheduling_timeout_is_honoured(bucket, digits_idx, tmp_path):
    started = time.monotonic()
    result = main_in_fresh_interpreter("deploy.vertex", [
        *COMMON, "--target", "cpu", "--job-dir", "gs://local-jobs/slow", "--local", "--timeout", "3s",
        "--stop-grace", "5", "--", "--dataset", f"idx:{digits_idx}", "--preset", "seed", "--epochs", "50"],
        cwd=str(tmp_path))
    assert result["code"] == 1 and time.monotonic() - started < 60
    assert result["err"].strip().splitlines()[-1] == (
        "error: the local job ran past its scheduling.timeout of 0:00:03, so Vertex AI would fail it too (raise "
        "--timeout, or shorten the run)")
    assert "local job: scheduling.timeout 0:00:03" in result["out"]
    assert_gone(replica_pids(result["out"]))
