"""KerasTuner search through the trainer on real digits: files, best trial, feeding it back, resume,
a distributed search with a chief oracle and two workers on 127.0.0.1, and cloudml-hypertune reports."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT_DIR, free_port, read_metrics, run_cli, trainer_env


def tune(args, timeout=600, **env):
    return subprocess.run([sys.executable, "-m", "tuning.task", *args], cwd=ROOT_DIR, env=trainer_env(**env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def search(digits_idx, tmp_path_factory):
    job_dir = str(tmp_path_factory.mktemp("search") / "job")
    args = ["--tuner", "random", "--max-trials", "3", "--epochs", "1", "--dataset", f"idx:{digits_idx}",
            "--train-limit", "2500", "--preset", "seed", "--job-dir", job_dir]
    result = tune(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return job_dir, args, result.stdout


def test_search_writes_its_files_and_reports_the_best_trial(search):
    job_dir, _, out = search
    with open(os.path.join(job_dir, "search_results.json")) as handle:
        results = json.load(handle)
    trials = results["trials"]
    assert len(trials) == 3 and all(row["status"] == "COMPLETED" for row in trials)
    best = max(trials, key=lambda row: row["val_accuracy"])
    assert results["best_trial_id"] == best["trial_id"]
    assert results["best_val_accuracy"] == best["val_accuracy"]
    with open(os.path.join(job_dir, "best_hyperparameters.json")) as handle:
        chosen = json.load(handle)
    assert chosen["filters"] == best["filters"] and chosen["dropout"] == best["dropout"]
    assert os.path.isfile(os.path.join(job_dir, "keras_tuner", "mnist_cnn", "oracle.json"))
    assert "trial_id" in out and "val_accuracy" in out  # the printed table
    assert not os.path.exists(os.path.join(job_dir, "best")), "without --retrain the test split stays untouched"


def test_hparams_view_lists_every_trial(search):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    job_dir, _, _ = search
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(os.path.join(job_dir, "logs"))
    multiplexer.Reload()
    content = multiplexer.PluginRunToTagToContent("hparams")
    sessions = [run for run in content if run.startswith("trial_") and "/" not in run]
    assert len(sessions) == 3 and "." in content  # one session per trial, plus the experiment config
    assert any(run.endswith("/validation") for run in multiplexer.Runs())


def test_best_hyperparameters_file_reproduces_the_configuration(search, digits_idx, tmp_path):
    job_dir, _, _ = search
    with open(os.path.join(job_dir, "best_hyperparameters.json")) as handle:
        chosen = json.load(handle)
    result = run_cli(["--dataset", f"idx:{digits_idx}", "--train-limit", "1000", "--epochs", "1",
                      "--hparams-file", os.path.join(job_dir, "best_hyperparameters.json"),
                      "--job-dir", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr
    config = read_metrics(str(tmp_path / "run"))["config"]
    assert ",".join(map(str, config["filters"])) == chosen["filters"]
    assert config["dropout"] == chosen["dropout"] and config["learning_rate"] == chosen["learning_rate"]
    assert config["epochs"] == 1  # an explicit flag beats the file


def test_existing_search_is_never_silently_reused_and_resume_redoes_nothing(search):
    job_dir, args, _ = search
    again = tune(args)
    assert again.returncode == 1
    assert "a search already exists there" in again.stderr and "--resume" in again.stderr
    resumed = tune(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1/1" not in resumed.stdout, "a finished search must not train again"
    with open(os.path.join(job_dir, "search_results.json")) as handle:
        assert len(json.load(handle)["trials"]) == 3


def test_hyperband_refuses_max_trials():
    result = tune(["--tuner", "hyperband", "--max-trials", "5", "--job-dir", "/tmp/unused"])
    assert result.returncode == 2 and "--max-trials does not apply to --tuner hyperband" in result.stderr


def test_distributed_search_chief_and_two_workers(digits_idx, tmp_path):
    job_dir = str(tmp_path / "job")
    port = str(free_port())
    args = ["--tuner", "random", "--max-trials", "4", "--epochs", "1", "--dataset", f"idx:{digits_idx}",
            "--train-limit", "1500", "--preset", "seed", "--job-dir", job_dir]
    processes = []
    for tuner_id in ("chief", "tuner0", "tuner1"):
        log = open(tmp_path / f"{tuner_id}.log", "w")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "tuning.task", *args], cwd=ROOT_DIR, stdout=log, stderr=subprocess.STDOUT,
            env=trainer_env(KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP="127.0.0.1",
                            KERASTUNER_ORACLE_PORT=port)))
    try:
        codes = [process.wait(timeout=300) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    logs = {name: (tmp_path / f"{name}.log").read_text()[-2000:] for name in ("chief", "tuner0", "tuner1")}
    assert codes == [0, 0, 0], logs
    with open(os.path.join(job_dir, "search_results.json")) as handle:
        trials = json.load(handle)["trials"]
    assert len(trials) == 4 and len({row["trial_id"] for row in trials}) == 4
    assert all(row["status"] == "COMPLETED" for row in trials)
    trained = [log.count("epoch 1/1") for log in (open(tmp_path / f"{n}.log").read() for n in ("tuner0", "tuner1"))]
    assert sum(trained) == 4, "every trial ran exactly once, on the workers"


def test_hypertune_report_has_one_line_per_epoch(digits_idx, tmp_path):
    metric_file = tmp_path / "hypertune" / "output.metrics"
    result = run_cli(["--dataset", f"idx:{digits_idx}", "--train-limit", "1000", "--epochs", "3", "--preset", "seed",
                      "--job-dir", str(tmp_path / "run")], CLOUD_ML_HP_METRIC_FILE=str(metric_file))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in metric_file.read_text().splitlines()]
    history = read_metrics(str(tmp_path / "run"))["history"]
    assert [line["global_step"] for line in lines] == ["1", "2", "3"]
    assert [float(line["val_accuracy"]) for line in lines] == pytest.approx([row["val_accuracy"] for row in history])


def test_retrain_exports_the_best_configuration_as_a_normal_run(search):
    job_dir, args, _ = search
    result = tune(args + ["--resume", "--retrain", "--retrain-epochs", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(job_dir, "best_hyperparameters.json")) as handle:
        chosen = json.load(handle)
    metrics = read_metrics(os.path.join(job_dir, "best"))
    assert ",".join(map(str, metrics["config"]["filters"])) == chosen["filters"]
    assert metrics["epochs_completed"] == 2 and 0 < metrics["test_accuracy"] <= 1
    assert os.path.isfile(os.path.join(job_dir, "best", "model", "saved_model.pb"))


def test_vertex_cluster_spec_becomes_keras_tuner_roles():
    from tuning.task import distributed_environment

    spec = {"cluster": {"workerpool0": ["cmle-chief:2222"], "workerpool1": ["w0:2222", "w1:2222"]},
            "task": {"type": "workerpool1", "index": 1}}
    assert distributed_environment({"CLUSTER_SPEC": json.dumps(spec)}) == {
        "KERASTUNER_TUNER_ID": "tuner1", "KERASTUNER_ORACLE_IP": "cmle-chief", "KERASTUNER_ORACLE_PORT": "2222"}
    spec["task"] = {"type": "workerpool0", "index": 0}
    assert distributed_environment({"CLUSTER_SPEC": json.dumps(spec)})["KERASTUNER_TUNER_ID"] == "chief"
    assert distributed_environment({}) == {}
