"""`deploy.vertex tune --local` (both services) and `--package --local`: the request, run here.

Real here: the requests (google-cloud-aiplatform's HyperparameterTuningJob and CustomJob, built by the same
code as submission and --dry-run), one process per replica, real TensorFlow and KerasTuner training on real
MNIST digits (`digits_idx`), KerasTuner's chief oracle and workers talking over 127.0.0.1, cloudml-hypertune
writing each trial's metric file, a real sdist pip-installed into a new virtual environment, and a real GCS
API server (fake-gcs-server) for the jobs' gs:// base_output_directory.

Faked: only Google's endpoints. The tuning service's search algorithm is random sampling from the study
spec (there is no local Vizier), and Vertex AI's control plane is the runner itself.
"""

import json
import math
import os
import random
import re
import time

import pytest

from helpers import fake_gcs_server, main_in_fresh_interpreter

pytestmark = pytest.mark.slow  # local Vertex AI tuning and package jobs

COMMON = ["--project", "demo", "--image", "img:cpu"]
SMALL = ["--preset", "seed", "--epochs", "1", "--intra-op-threads", "1"]


@pytest.fixture(scope="module")
def bucket():
    with fake_gcs_server() as client:
        yield client.create_bucket("local-tuning")


def stored(bucket, prefix):
    return sorted(blob.name[len(prefix):] for blob in bucket.list_blobs(prefix=prefix))


# ---------------------------------------------------------------------------------- in-process pieces

def study(*parameters):
    from google.cloud.aiplatform_v1 import StudySpec

    return StudySpec(metrics=[StudySpec.MetricSpec(metric_id="val_accuracy",
                                                   goal=StudySpec.MetricSpec.GoalType.MAXIMIZE)],
                     parameters=list(parameters))


def test_random_sampling_honours_each_parameter_type_and_scale():
    from google.cloud.aiplatform_v1 import StudySpec

    from deploy.local_tuning import as_arguments, sample

    Spec = StudySpec.ParameterSpec
    spec = study(
        Spec(parameter_id="lr_log", double_value_spec=Spec.DoubleValueSpec(min_value=1e-4, max_value=1e-1),
             scale_type=Spec.ScaleType.UNIT_LOG_SCALE),
        Spec(parameter_id="lr_linear", double_value_spec=Spec.DoubleValueSpec(min_value=1e-4, max_value=1e-1),
             scale_type=Spec.ScaleType.UNIT_LINEAR_SCALE),
        Spec(parameter_id="momentum", double_value_spec=Spec.DoubleValueSpec(min_value=0.01, max_value=0.99),
             scale_type=Spec.ScaleType.UNIT_REVERSE_LOG_SCALE),
        Spec(parameter_id="units", integer_value_spec=Spec.IntegerValueSpec(min_value=16, max_value=256),
             scale_type=Spec.ScaleType.UNIT_LOG_SCALE),
        Spec(parameter_id="dropout", discrete_value_spec=Spec.DiscreteValueSpec(values=[0.1, 0.2, 0.4])),
        Spec(parameter_id="filters", categorical_value_spec=Spec.CategoricalValueSpec(values=["16,32", "32,64"])))
    rng = random.Random(0)
    points = [sample(spec, rng) for _ in range(400)]
    assert all(1e-4 <= p["lr_log"] <= 1e-1 and 1e-4 <= p["lr_linear"] <= 1e-1 for p in points)
    geometric_middle = math.sqrt(1e-4 * 1e-1)
    below = lambda name: sum(p[name] < geometric_middle for p in points) / len(points)  # noqa: E731
    assert 0.4 < below("lr_log") < 0.6 and below("lr_linear") < 0.05, "log scale: half the draws below 3.2e-3"
    mirrored_middle = 0.99 + 0.01 - math.sqrt(0.01 * 0.99)  # 0.90: a linear draw lands above it 1 time in 10
    above = sum(p["momentum"] > mirrored_middle for p in points) / len(points)
    assert 0.4 < above < 0.6, "reverse log: dense at the top"
    assert all(isinstance(p["units"], int) and 16 <= p["units"] <= 256 for p in points)
    assert {p["dropout"] for p in points} == {0.1, 0.2, 0.4} and {p["filters"] for p in points} == {"16,32", "32,64"}
    point = dict(points[0], units=64, dropout=0.2, filters="16,32")
    assert as_arguments(point)[3:] == ["--units=64", "--dropout=0.2", "--filters=16,32"]


def test_a_trials_metric_is_read_from_its_hypertune_file_as_vertex_reads_it(tmp_path, monkeypatch):
    """cloudml-hypertune itself writes the file; the last report counts, or the best with BEST_MEASUREMENT."""
    import hypertune

    from deploy.local_tuning import read_measurement

    path = str(tmp_path / "hypertune" / "output.metrics")
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", path)
    reporter = hypertune.HyperTune()
    for step, value in enumerate([0.5, 0.8, 0.7], start=1):
        reporter.report_hyperparameter_tuning_metric(hyperparameter_metric_tag="val_accuracy", metric_value=value,
                                                     global_step=step)
        reporter.report_hyperparameter_tuning_metric(hyperparameter_metric_tag="val_loss", metric_value=1 / value,
                                                     global_step=step)
    assert read_measurement(path, "val_accuracy", "MEASUREMENT_SELECTION_TYPE_UNSPECIFIED", True) == {
        "value": 0.7, "step": 3}
    assert read_measurement(path, "val_accuracy", "BEST_MEASUREMENT", True) == {"value": 0.8, "step": 2}
    assert read_measurement(path, "val_loss", "BEST_MEASUREMENT", False)["step"] == 2
    assert read_measurement(path, "f1", "LAST_MEASUREMENT", True) is None
    assert read_measurement(str(tmp_path / "missing"), "val_accuracy", "LAST_MEASUREMENT", True) is None


# A trial stand-in without TensorFlow: reports 1 - dropout through cloudml-hypertune, unless told to forget.
REPORTER = """
import sys, hypertune
values = dict(arg[2:].split("=", 1) for arg in sys.argv[1:] if arg.startswith("--") and "=" in arg)
if "--forget" not in sys.argv:
    hypertune.HyperTune().report_hyperparameter_tuning_metric(
        hyperparameter_metric_tag="val_accuracy", metric_value=1 - float(values["dropout"]), global_step=1)
print("trial ran with", values, flush=True)
"""


def reporter_job(max_trials, parallel, *args):
    from google.cloud.aiplatform_v1 import (
        ContainerSpec,
        CustomJobSpec,
        GcsDestination,
        HyperparameterTuningJob,
        MachineSpec,
        StudySpec,
        WorkerPoolSpec,
    )

    Spec = StudySpec.ParameterSpec
    pool = WorkerPoolSpec(machine_spec=MachineSpec(machine_type="n1-standard-4"), replica_count=1,
                          container_spec=ContainerSpec(image_uri="img", command=["python", "-c", REPORTER], args=args))
    return HyperparameterTuningJob(
        display_name="reporter", max_trial_count=max_trials, parallel_trial_count=parallel,
        study_spec=study(Spec(parameter_id="dropout", discrete_value_spec=Spec.DiscreteValueSpec(
            values=[0.1, 0.2, 0.3, 0.4]))),
        trial_job_spec=CustomJobSpec(worker_pool_specs=[pool],
                                     base_output_directory=GcsDestination(output_uri_prefix="gs://b/t")))


def test_a_trial_that_reports_no_metric_is_infeasible_and_fails_the_job(tmp_path, capsys):
    from deploy import local
    from deploy.local_tuning import run_tuning_job

    code = run_tuning_job(reporter_job(2, 2, "--forget"), local.Options(stop_grace=1.0), str(tmp_path),
                          environ=dict(os.environ), seed=1)
    out, err = capsys.readouterr()
    assert code == 1
    assert err.strip().splitlines()[-1] == ("error: the local tuning job failed: none of its 2 trial(s) succeeded "
                                            "(the reasons are above and in tuning_job.json)")
    assert re.search(r"trial 1 failed after 0:00:0\d: the trial exited 0 but reported no val_accuracy to "
                     r"CLOUD_ML_HP_METRIC_FILE \(.*/trial_1/output.metrics\): report it with cloudml-hypertune", err)
    from google.cloud.aiplatform_v1 import HyperparameterTuningJob

    (job_dir,) = os.listdir(tmp_path)
    saved = HyperparameterTuningJob.from_json(open(tmp_path / job_dir / "tuning_job.json").read())
    assert saved.state.name == "JOB_STATE_FAILED" and [t.state.name for t in saved.trials] == ["INFEASIBLE"] * 2


def test_trials_run_at_most_parallel_at_once_each_with_its_own_metric_file(tmp_path, capsys):
    """Four cheap trials, two at a time: distinct parameters (the space holds four), numbered from 1,
    each measured from its own file, the best one reported."""
    from deploy import local
    from deploy.local_tuning import run_tuning_job

    code = run_tuning_job(reporter_job(4, 2), local.Options(), str(tmp_path), environ=dict(os.environ), seed=3)
    out, _ = capsys.readouterr()
    assert code == 0, out
    events = re.findall(r"^local tuning job: trial (\d) (starts|succeeded)", out, re.M)
    running, most = 0, 0
    for _, event in events:
        running += 1 if event == "starts" else -1
        most = max(most, running)
    assert most == 2 and [trial for trial, event in events if event == "starts"] == ["1", "2", "3", "4"]
    dropouts = re.findall(r"^local tuning job: trial \d starts: --dropout=(\S+)", out, re.M)
    assert sorted(dropouts) == ["0.1", "0.2", "0.3", "0.4"]
    files = re.findall(r"read from (\S+)\)", out)
    assert len(set(files)) == 4 and all(f.endswith(f"/trial_{n}/output.metrics") for n, f in
                                        zip(re.findall(r"trial (\d) succeeded", out), files, strict=False))
    best = dropouts.index("0.1") + 1
    assert f"local tuning job: best trial {best}: val_accuracy 0.9000 with --dropout=0.1" in out


def test_ctrl_c_to_the_tuning_runner_is_sigterm_to_every_running_trial_and_exit_130(tmp_path, capsys):
    import signal
    import threading

    from google.cloud.aiplatform_v1 import ContainerSpec

    from deploy import local
    from deploy.local_tuning import run_tuning_job

    waiting = ("import signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *_: (print('got SIGTERM', flush=True), sys.exit(143)))\n"
               "print('up', flush=True)\ntime.sleep(60)\n")
    job = reporter_job(3, 2)
    job.trial_job_spec.worker_pool_specs[0].container_spec = ContainerSpec(image_uri="img",
                                                                           command=["python", "-c", waiting])
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    try:
        code = run_tuning_job(job, local.Options(stop_grace=5.0), str(tmp_path), environ=dict(os.environ))
    finally:
        timer.cancel()
    out, err = capsys.readouterr()
    assert code == 130 and time.monotonic() - started < 15
    assert "local tuning job: Ctrl-C received: trial(s) 1, 2 stopped (SIGTERM to their replicas), 1 not started" in err
    assert "[trial 1 workerpool0-0] got SIGTERM" in out and "[trial 2 workerpool0-0] got SIGTERM" in out
    assert "trial 3 starts" not in out, "no trial starts after the signal"
    for pid in re.findall(r"started trial \d workerpool0-0 \(pid (\d+)\)", out):
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


# ---------------------------------------------------------------------------------- real jobs

def test_keras_tuner_search_runs_as_one_local_job_chief_and_two_workers_share_the_folder(digits_idx, tmp_path):
    """chief oracle + 2 tuner workers; the search folder is /gcs/BUCKET/... mapped to --local-gcs-root."""
    started = time.monotonic()
    result = main_in_fresh_interpreter("deploy.vertex", [
        "tune", "--service", "keras-tuner", "--workers", "2", *COMMON, "--job-dir", "gs://kts/search1", "--local",
        "--local-gcs-root", str(tmp_path / "fuse"), "--stop-grace", "10", "--", "--dataset", f"idx:{digits_idx}",
        "--train-limit", "1000", "--max-trials", "3", "--epochs", "1", "--preset", "seed"], cwd=str(tmp_path))
    output = result["out"]
    assert result["code"] == 0, output[-3000:] + result["err"][-3000:]
    assert "local job: succeeded in" in output.splitlines()[-1]
    search = tmp_path / "fuse" / "kts" / "search1" / "search"
    best = json.loads((search / "best_hyperparameters.json").read_text())
    results = json.loads((search / "search_results.json").read_text())
    assert sorted(row["trial_id"] for row in results["trials"]) == [1, 2, 3]
    assert {row["status"] for row in results["trials"]} == {"COMPLETED"}
    assert best["filters"] == next(r["filters"] for r in results["trials"] if r["trial_id"] == results["best_trial_id"])
    assert sorted(os.listdir(search / "trials")) == ["trial_1", "trial_2", "trial_3"]
    # every trial ran exactly once, on a worker: three one-epoch trainings between them, none on the chief
    trained = re.findall(r"^\[(workerpool\d-\d)\] epoch 1/1 ", output, re.M)
    assert len(trained) == 3 and set(trained) <= {"workerpool1-0", "workerpool1-1"}, trained
    assert time.monotonic() - started < 180


def test_a_distributed_search_resumed_with_more_trials_runs_only_the_new_ones(digits_idx, tmp_path):
    """chief oracle + 1 tuner worker, 2 trials; then --resume --max-trials 3 runs trial 3 alone: the finished
    trials are neither trained again nor reported again, and the final table keeps their figures."""
    def tune(*extra):
        return main_in_fresh_interpreter("deploy.vertex", [
            "tune", "--service", "keras-tuner", "--workers", "1", *COMMON, "--job-dir", "gs://kts/resumed", "--local",
            "--local-gcs-root", str(tmp_path / "fuse"), "--stop-grace", "10", "--", "--dataset", f"idx:{digits_idx}",
            "--train-limit", "1000", "--preset", "seed", "--epochs", "1", *extra], cwd=str(tmp_path))

    first = tune("--max-trials", "2")
    assert first["code"] == 0, first["out"][-3000:] + first["err"][-3000:]
    results_path = tmp_path / "fuse" / "kts" / "resumed" / "search" / "search_results.json"
    before = {row["trial_id"]: row for row in json.loads(results_path.read_text())["trials"]}
    assert sorted(before) == [1, 2]

    second = tune("--max-trials", "3", "--resume")
    output = second["out"]
    assert second["code"] == 0, output[-3000:] + second["err"][-3000:]
    assert len(re.findall(r"^\[workerpool1-0\] epoch 1/1 ", output, re.M)) == 1, output[-3000:]
    assert re.findall(r"Running Trial #(\d+)", output) == ["3"], output[-3000:]
    assert re.findall(r"Trial (\d+) Complete", output) == ["3"], output[-3000:]
    after = {row["trial_id"]: row for row in json.loads(results_path.read_text())["trials"]}
    assert sorted(after) == [1, 2, 3] and {row["status"] for row in after.values()} == {"COMPLETED"}
    assert all(after[trial] == before[trial] for trial in (1, 2)), (before, after)


def test_vertex_tuning_service_runs_three_trials_two_at_a_time(bucket, digits_idx, tmp_path):
    from google.cloud.aiplatform_v1 import HyperparameterTuningJob

    result = main_in_fresh_interpreter("deploy.vertex", [
        "tune", "--service", "vertex", *COMMON, "--job-dir", "gs://local-tuning/t1", "--max-trials", "3",
        "--parallel-trials", "2", "--local", "--local-output", str(tmp_path / "results"), "--", "--dataset",
        f"idx:{digits_idx}", "--train-limit", "1000", *SMALL], cwd=str(tmp_path))
    output = result["out"]
    assert result["code"] == 0, output[-3000:] + result["err"][-3000:]
    assert result["heavy"] == [], "the runner itself never imports TensorFlow"
    starts = re.findall(r"^local tuning job: trial (\d) starts: (--filters=\S+ --dropout=\S+) \(AIP_MODEL_DIR=(\S+),",
                        output, re.M)
    assert [s[0] for s in starts] == ["1", "2", "3"] and len({s[1] for s in starts}) == 3
    assert [s[2] for s in starts] == [f"gs://local-tuning/t1/{n}/model/" for n in (1, 2, 3)]
    lines = output.splitlines()
    third = next(i for i, line in enumerate(lines) if line.startswith("local tuning job: trial 3 starts"))
    assert any(re.match(r"local tuning job: trial [12] succeeded", line) for line in lines[:third]), "2 at a time"
    # the trainer got the parameters as Vertex AI passes them, and reported through its own metric file
    measured = {}
    for trial, value, path in re.findall(r"^local tuning job: trial (\d) succeeded in \S+: val_accuracy (\S+) "
                                         r"\(step 1, read from (\S+)\)", output, re.M):
        last = json.loads(open(path).read().splitlines()[-1])
        assert float(last["val_accuracy"]) == pytest.approx(float(value), abs=1e-4)
        measured[trial] = float(value)
    assert len(measured) == 3
    for trial, flags, _ in starts:
        assert re.search(rf"^\[trial {trial} workerpool0-0\] epoch 1/1 .* val_accuracy {measured[trial]:.4f}",
                         output, re.M)
        assert f"--hypertune {flags}" in output, "parameters appended after the request's args"
        assert "model/saved_model.pb" in stored(bucket, f"t1/{trial}/"), f"trial {trial}'s AIP_MODEL_DIR"
    best_id = max(measured, key=measured.get)
    assert re.search(rf"^{best_id} \*\s+SUCCEEDED", output, re.M), "the table marks the best trial"
    (job_dir,) = os.listdir(tmp_path / "results")
    saved = HyperparameterTuningJob.from_json(open(tmp_path / "results" / job_dir / "tuning_job.json").read())
    assert saved.state.name == "JOB_STATE_SUCCEEDED" and [t.id for t in saved.trials] == ["1", "2", "3"]
    assert {t.id: t.final_measurement.metrics[0].value for t in saved.trials} == pytest.approx(measured)
    best = json.load(open(tmp_path / "results" / job_dir / "best_trial.json"))
    assert best["trial_id"] == best_id and best["value"] == pytest.approx(measured[best_id])


def test_package_job_installs_the_sdist_in_a_fresh_venv_and_trains(bucket, digits_idx, tmp_path):
    result = main_in_fresh_interpreter("deploy.vertex", [
        "train", "--package", "--staging-bucket", "gs://local-tuning/staging", "--project", "demo", "--job-dir",
        "gs://local-tuning/pkg", "--local", "--", "--dataset", f"idx:{digits_idx}", "--train-limit", "600", *SMALL],
        cwd=str(tmp_path))
    output = result["out"]
    assert result["code"] == 0, output[-3000:] + result["err"][-3000:]
    venv = re.search(r"^local job: installing mnist-trainer-[\d.]+\.tar\.gz into a throw-away virtual environment "
                     r"(\S+/venv) \(--system-site-packages", output, re.M).group(1)
    assert f"local job: the replicas import the installed package: {venv}/lib/" in output
    assert re.search(rf"started workerpool0-0 \(pid \d+\) on \S+: {venv}/bin/python -m trainer.task --dataset", output)
    assert "[workerpool0-0] wrote gs://local-tuning/pkg/model/" in output
    assert {"metrics.json", "model/saved_model.pb"} <= set(stored(bucket, "pkg/"))
    assert stored(bucket, "staging/") == [], "locally the sdist is installed, not uploaded"
    assert not os.path.exists(venv), "the virtual environment is thrown away"


def test_a_package_replica_sees_the_installed_package_only():
    """No PYTHONPATH to this checkout and no working folder on sys.path: what runs is what pip installed."""
    from google.cloud.aiplatform_v1 import CustomJobSpec, MachineSpec, PythonPackageSpec, WorkerPoolSpec

    from deploy import local

    pool = WorkerPoolSpec(machine_spec=MachineSpec(machine_type="n1-standard-4"), replica_count=1,
                          python_package_spec=PythonPackageSpec(executor_image_uri="img", package_uris=["gs://b/p.tgz"],
                                                                python_module="trainer.task", args=["--epochs", "1"]))
    spec = CustomJobSpec(worker_pool_specs=[pool])
    (replica,) = local.plan_replicas(spec, "j", local.Options(python="/venv/bin/python"),
                                     {"PYTHONPATH": "/checkout", "HOME": "/h"}, [1])
    assert replica.argv == ["/venv/bin/python", "-m", "trainer.task", "--epochs", "1"]
    assert "PYTHONPATH" not in replica.env and replica.env["PYTHONSAFEPATH"] == "1"
    with pytest.raises(ValueError, match="needs Options.python"):
        local.plan_replicas(spec, "j", local.Options(), {}, [1])
