"""KerasTuner search through the trainer on real digits: files, best trial, feeding it back, resume (and
its refusal when the settings differ), command-line errors before TensorFlow, one trial numbering, a
distributed search with a chief oracle and two workers on 127.0.0.1, and cloudml-hypertune reports."""

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import (
    ROOT_DIR,
    file_snapshot,
    main_in_fresh_interpreter,
    printed_command,
    read_metrics,
    run_cli,
    trainer_env,
)


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
    return job_dir, args, result.stdout, result.stderr


@pytest.mark.slow
def test_search_writes_its_files_and_reports_the_best_trial(search):
    job_dir, _, out, _ = search
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

    job_dir, _, _, _ = search
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(os.path.join(job_dir, "logs"))
    multiplexer.Reload()
    content = multiplexer.PluginRunToTagToContent("hparams")
    sessions = {run for run in content if run.startswith("trial_") and "/" not in run}
    with open(os.path.join(job_dir, "search_results.json")) as handle:
        ids = {row["trial_id"] for row in json.load(handle)["trials"]}
    assert ids == {1, 2, 3} and "." in content  # numbered as KerasTuner prints them, plus the experiment config
    assert sessions == {f"trial_{trial_id}" for trial_id in ids}  # one session per trial, the same ids
    for trial_id in ids:
        assert f"trial_{trial_id}/validation" in multiplexer.Runs()
        assert os.path.isdir(os.path.join(job_dir, "trials", f"trial_{trial_id}"))


def test_stdout_numbers_trials_as_search_results_does_and_has_no_escape_codes(search):
    job_dir, _, out, err = search
    with open(os.path.join(job_dir, "search_results.json")) as handle:
        results = json.load(handle)
    rows = {row["trial_id"]: row for row in results["trials"]}
    started = re.findall(r"^Search: Running Trial #(\d+)\n+--filters (\S+)  --dropout (\S+)$", out, re.M)
    assert [int(number) for number, _, _ in started] == [1, 2, 3]
    for number, filters, dropout in started:  # the values printed for trial N are trial N's in the file
        assert (rows[int(number)]["filters"], rows[int(number)]["dropout"]) == (filters, float(dropout))
    for number, score in re.findall(r"^Trial (\d+) Complete .*\nval_accuracy: (\S+)$", out, re.M):
        assert rows[int(number)]["val_accuracy"] == pytest.approx(float(score))
    table = re.findall(r"^(\d+) +(\S+) +(\S+) +\d+ +\S+ +([01]\.\d{4}) +COMPLETED$", out, re.M)
    assert {int(row[0]): (row[1], float(row[2])) for row in table} == {
        number: (row["filters"], row["dropout"]) for number, row in rows.items()}
    assert f"best trial {results['best_trial_id']}: val_accuracy {results['best_val_accuracy']:.4f}" in out
    assert "\x1b" not in out and "\x1b" not in err, "stdout is a pipe here: no terminal escape codes"


def changed(args, flag, value):
    """The search fixture's arguments with one flag's value replaced (None: the flag removed)."""
    index = args.index(flag)
    return args[:index] + args[index + 2:] if value is None else args[:index + 1] + [value] + args[index + 2:]


@pytest.mark.parametrize("change, named", [
    ({"--train-limit": "1000"}, "--train-limit 2500 -> 1000"),
    ({"--filter-choices": "16,32"}, "--filter-choices 16,32,64 -> 16,32"),
    ({"--tuner": "hyperband", "--max-trials": None, "--epochs": None}, "--tuner random -> hyperband"),
    ({"--dropout-range": "0.2:0.4"}, "--dropout-range 0.1:0.6:0.1 -> 0.2:0.4"),
])
def test_resume_with_other_settings_is_refused_and_changes_nothing(search, change, named):
    job_dir, args, _, _ = search
    args = args + ["--filter-choices", "16,32,64", "--dropout-range", "0.1:0.6:0.1", "--resume"]  # the defaults
    for flag, value in change.items():
        args = changed(args, flag, value)
    with open(os.path.join(job_dir, "best_hyperparameters.json"), "rb") as handle:
        best = handle.read()
    before = file_snapshot(job_dir)
    result = main_in_fresh_interpreter("tuning.task", args)
    assert result["code"] == 1, result
    assert result["err"].count("\n") == 1 and result["err"].startswith("error: --job-dir ")
    assert named in result["err"] and "other settings" in result["err"], result["err"]
    assert result["heavy"] == [], "refused before TensorFlow or KerasTuner is imported"
    with open(os.path.join(job_dir, "best_hyperparameters.json"), "rb") as handle:
        assert handle.read() == best
    assert file_snapshot(job_dir) == before


def test_gs_job_dir_is_refused_with_the_cloud_storage_mount_and_no_gs_folder(tmp_path):
    result = main_in_fresh_interpreter("tuning.task", ["--job-dir", "gs://my-bucket/search1"], cwd=str(tmp_path))
    assert result["code"] == 2
    assert "/gcs/my-bucket/search1" in result["err"].splitlines()[-1]
    assert os.listdir(tmp_path) == [], "nothing written, least of all ./gs:"


@pytest.mark.parametrize("case", ["bad dataset", "existing search"])
def test_command_line_errors_come_back_in_under_a_second_without_tensorflow(search, case):
    job_dir, args, _, _ = search
    if case == "bad dataset":
        result = main_in_fresh_interpreter("tuning.task", changed(args, "--dataset", "foo:bar"))
        assert result["code"] == 2 and "--dataset 'foo:bar'" in result["err"]
    else:  # found by looking at the folder: a fault found through I/O, exit 1 with one line
        result = main_in_fresh_interpreter("tuning.task", args)
        assert result["code"] == 1 and result["err"].startswith("error: ") and result["err"].count("\n") == 1
        assert "a search already exists there" in result["err"]
    assert result["seconds"] < 1.0, result
    assert result["heavy"] == [], result


@pytest.mark.parametrize("value, message", [
    ("0.6:0.1", "MIN 0.6 is above MAX 0.1"),
    ("0.3:0.3", "MIN and MAX are both 0.3"),
    ("0.1:1.2", "MAX 1.2 is not a dropout rate"),
    ("0.1:0.5:0", "STEP 0 must be positive"),
    ("0.1:0.5:x", "STEP 'x' is not a number"),
    ("0.1", "expected MIN:MAX or MIN:MAX:STEP"),
])
def test_dropout_range_errors_say_what_is_wrong(value, message):
    result = main_in_fresh_interpreter("tuning.task", ["--dropout-range", value, "--job-dir", "/tmp/unused"])
    assert result["code"] == 2 and f"argument --dropout-range: {message}" in result["err"], result["err"]


_COUNT_TRACES = """
import json, sys
from tuning import task
events = []

def profile(frame, event, arg):
    code = frame.f_code
    if event != "call":
        return
    if (code.co_name in ("train_steps", "predict") and code.co_filename.endswith("steps.py")  # once per tracing
            or code.co_name == "fit" and code.co_filename.endswith("hypermodel.py")):
        events.append(code.co_name)

sys.setprofile(profile)
code = task.main(sys.argv[1:])
sys.setprofile(None)
print(json.dumps(dict(code=code, events=events)))
"""


def test_a_trials_dropout_is_every_epochs_as_a_given_dropout_is(tmp_path):
    """The default recipe's plain first epochs have their own rate (0.4); a trial trains with the searched
    rate throughout, as its best_hyperparameters.json then does through `--hparams-file`."""
    import keras_tuner as kt

    from trainer.config import Config
    from tuning.hypermodel import TrainerHyperModel
    from tuning.space import DropoutRange, SearchSpace

    base = Config(job_dir=str(tmp_path))
    assert base.unaugmented_dropout != 0.3
    space = SearchSpace(dropout=DropoutRange(0.3, 0.5, 0.1))  # a fresh trial starts at MIN
    config = TrainerHyperModel(base, space, None, str(tmp_path)).trial_config(kt.HyperParameters(), trial_id="0")
    assert config.unaugmented_dropout == config.dropout == 0.3


@pytest.mark.slow
def test_each_trial_traces_its_step_functions_once_and_no_retracing_warning(digits_idx, tmp_path):
    """Hyperband with --max-epochs 3 runs 6 trials: more than the 5 tracings after which TensorFlow warns
    about retracing, which it counts across trials (a new model, so new functions, every trial)."""
    args = ["--tuner", "hyperband", "--max-epochs", "3", "--dataset", f"idx:{digits_idx}", "--train-limit", "500",
            "--preset", "seed", "--job-dir", str(tmp_path / "job")]
    result = subprocess.run([sys.executable, "-c", _COUNT_TRACES, *args], cwd=ROOT_DIR, env=trainer_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["code"] == 0
    trials = " ".join(report["events"]).split("fit")[1:]  # the Python bodies that ran, trial by trial
    assert len(trials) == 6
    assert all(sorted(trial.split()) == ["predict", "train_steps"] for trial in trials), report["events"]
    assert "retracing" not in result.stderr


@pytest.mark.slow
def test_best_hyperparameters_file_reproduces_the_configuration(search, digits_idx, tmp_path):
    job_dir, _, _, _ = search
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


@pytest.mark.slow
def test_the_searchs_closing_command_runs_as_printed_on_the_searchs_data(search, digits_idx):
    """The search ends naming the command that trains its best configuration; run as printed, it trains
    that configuration on the search's data (dataset, --train-limit, seed) for the preset's epochs into
    JOB_DIR/best, as --retrain would."""
    job_dir, _, out, _ = search
    argv = printed_command(out, r"train it with: (.+)$")
    result = subprocess.run(argv, cwd=ROOT_DIR, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(job_dir, "best_hyperparameters.json")) as handle:
        chosen = json.load(handle)
    metrics = read_metrics(os.path.join(job_dir, "best"))
    assert metrics["dataset"] == f"idx:{digits_idx}"
    assert metrics["config"]["train_limit"] == 2500 and metrics["config"]["preset"] == "seed"
    assert ",".join(map(str, metrics["config"]["filters"])) == chosen["filters"]
    assert metrics["config"]["dropout"] == chosen["dropout"] and metrics["epochs_completed"] == 10


@pytest.mark.slow
def test_existing_search_is_never_silently_reused_and_resume_redoes_nothing(search):
    job_dir, args, _, _ = search
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


@pytest.mark.slow
def test_hypertune_report_has_one_line_per_epoch(digits_idx, tmp_path):
    metric_file = tmp_path / "hypertune" / "output.metrics"
    result = run_cli(["--dataset", f"idx:{digits_idx}", "--train-limit", "1000", "--epochs", "3", "--preset", "seed",
                      "--job-dir", str(tmp_path / "run")], CLOUD_ML_HP_METRIC_FILE=str(metric_file))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in metric_file.read_text().splitlines()]
    history = read_metrics(str(tmp_path / "run"))["history"]
    assert [line["global_step"] for line in lines] == ["1", "2", "3"]
    assert [float(line["val_accuracy"]) for line in lines] == pytest.approx([row["val_accuracy"] for row in history])


@pytest.mark.slow
def test_retrain_exports_the_best_configuration_as_a_normal_run(search):
    job_dir, args, _, _ = search
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


@pytest.mark.slow
def test_two_searches_into_one_job_dir_one_proceeds_the_other_names_it(digits_idx, tmp_path):
    """The first search holds the job-dir lock from before TensorFlow loads; a second one started meanwhile
    is refused at once (nothing of the first is touched); killing the holder frees the folder."""
    import time

    job_dir = str(tmp_path / "job")
    args = ["--tuner", "random", "--max-trials", "2", "--epochs", "1", "--dataset", f"idx:{digits_idx}",
            "--train-limit", "600", "--preset", "seed", "--job-dir", job_dir]
    first = subprocess.Popen([sys.executable, "-m", "tuning.task", *args], cwd=ROOT_DIR, env=trainer_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock, deadline = os.path.join(job_dir, ".lock"), time.monotonic() + 60
        while not (os.path.isfile(lock) and os.path.getsize(lock)) and time.monotonic() < deadline:
            time.sleep(0.02)
        result = main_in_fresh_interpreter("tuning.task", args + ["--overwrite"])
        assert result["code"] == 1
        last = result["err"].strip().splitlines()[-1]
        assert f"--job-dir {job_dir}: another run is writing there (pid {first.pid} on " in last, result["err"]
        assert first.poll() is None, "the first search must be running on, untouched"
    finally:
        first.kill()
        first.wait(timeout=30)
    from trainer import joblock

    joblock.acquire(job_dir).release()  # a killed holder leaves no lock behind


@pytest.mark.slow
def test_a_diverging_trial_is_recorded_and_the_search_goes_on(digits_idx, tmp_path):
    job_dir = str(tmp_path / "job")
    result = tune(["--tuner", "random", "--max-trials", "1", "--epochs", "1", "--dataset", f"idx:{digits_idx}",
                   "--train-limit", "400", "--preset", "seed", "--learning-rate", "1e30", "--job-dir", job_dir])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial 1: training diverged (training loss" in result.stdout
    with open(os.path.join(job_dir, "search_results.json")) as handle:
        assert json.load(handle)["trials"][0]["val_accuracy"] == 0.0
