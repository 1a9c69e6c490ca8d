"""Deploy: Vertex AI job bodies checked by the real google-cloud-aiplatform types, the sdist and the
Dockerfile's install and entry commands in fresh virtual environments, hadolint, and the Colab notebook
run headless on CPU.

Not real here: Google's endpoints (no network), a Docker engine and a TPU. The job bodies are built,
printed and parsed exactly as they would be sent; the image's commands run in a fresh venv instead of a
container; the notebook takes its CPU branch (the TPU branch is the same cells with tensorflow-tpu).
"""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from helpers import ROOT_DIR, main_in_fresh_interpreter

TARGETS = ("cpu", "gpu", "gpu-multi", "multi-worker", "tpu-v5e", "tpu-v3")


def vertex(args):
    from deploy import vertex as vertex_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = vertex_cli.main(args)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def trainer_parses(args):
    from trainer.config import build_parser

    return build_parser().parse_args(args)  # raises SystemExit(2) on anything trainer.task would refuse


def output_only_or_empty(message_type, payload, path=""):
    """Fields of a job's JSON that the API marks OUTPUT_ONLY (google.api.field_behavior) or that carry no
    value, found by walking the JSON along the message's own descriptor."""
    from google.api import field_behavior_pb2

    descriptor = message_type.pb().DESCRIPTOR if hasattr(message_type, "pb") else message_type
    found = []
    for key, value in payload.items():
        field = next(f for f in descriptor.fields if f.json_name == key)
        behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
        if field_behavior_pb2.OUTPUT_ONLY in behaviors or value in ("", [], {}, None, False, 0, "0"):
            found.append(path + key)
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in value if isinstance(value, list) else [value]:
                found += output_only_or_empty(field.message_type, item, f"{path}{key}.")
    return found


COMMON = ["--project", "my-project", "--region", "us-central1", "--job-dir", "gs://my-bucket/runs/r1", "--dry-run"]


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_dry_run_is_a_valid_custom_job(target):
    from google.cloud.aiplatform_v1 import CustomJob

    code, out, err = vertex(["train", "--target", target, "--image", "us-docker.pkg.dev/p/r/trainer:x", *COMMON,
                             "--", "--epochs", "3", "--batch-size", "256"])
    assert code == 0, err
    job = CustomJob.from_json(out)  # unknown fields would raise
    if target not in ("cpu", "multi-worker"):
        assert re.search(r'"acceleratorType": "[A-Z][A-Z_0-9]+"', out), "enums are printed by name"
    pools = job.job_spec.worker_pool_specs
    assert job.job_spec.base_output_directory.output_uri_prefix == "gs://my-bucket/runs/r1"
    assert len(pools) == (2 if target == "multi-worker" else 1)
    assert pools[0].replica_count == 1
    if target == "multi-worker":
        assert pools[1].replica_count == 2
    machine = pools[0].machine_spec
    expected = {"gpu": ("NVIDIA_TESLA_T4", 1), "gpu-multi": ("NVIDIA_TESLA_T4", 4),
                "tpu-v5e": ("TPU_V5_LITEPOD", 4), "tpu-v3": ("TPU_V3", 8)}.get(target)
    if expected:
        assert (machine.accelerator_type.name, machine.accelerator_count) == expected
    if target == "tpu-v5e":
        assert machine.machine_type == "ct5lp-hightpu-4t" and machine.tpu_topology == "2x2"
    for pool in pools:
        assert pool.container_spec.image_uri.endswith("trainer:x")
        args = trainer_parses(list(pool.container_spec.args))
        assert args.augment is None, "every target, TPUs included, runs the default recipe as it is"
    assert output_only_or_empty(CustomJob, json.loads(out)) == [], "only the fields the request sets"


def test_package_dry_run_uses_a_python_package_spec_on_the_project_image():
    from google.cloud.aiplatform_v1 import CustomJob

    code, out, err = vertex(["train", "--target", "gpu", "--package", "--staging-bucket", "gs://my-bucket/staging",
                             *COMMON, "--", "--epochs", "2"])
    assert code == 0, err
    spec = CustomJob.from_json(out).job_spec.worker_pool_specs[0].python_package_spec
    assert spec.python_module == "trainer.task"
    assert re.fullmatch(r"gs://my-bucket/staging/mnist-trainer/mnist-trainer-[\d.]+\.tar\.gz", spec.package_uris[0])
    assert spec.executor_image_uri.startswith("us-central1-docker.pkg.dev/my-project/mnist-trainer/trainer:gpu-")
    trainer_parses(list(spec.args))


def test_vertex_tuning_job_searches_filters_and_dropout_on_val_accuracy():
    from google.cloud.aiplatform_v1 import HyperparameterTuningJob

    code, out, err = vertex(["tune", "--service", "vertex", "--image", "img:cpu", "--max-trials", "8",
                             "--parallel-trials", "2", *COMMON, "--", "--epochs", "4"])
    assert code == 0, err
    job = HyperparameterTuningJob.from_json(out)
    assert output_only_or_empty(HyperparameterTuningJob, json.loads(out)) == []
    assert job.max_trial_count == 8 and job.parallel_trial_count == 2
    assert [m.metric_id for m in job.study_spec.metrics] == ["val_accuracy"]
    assert job.study_spec.metrics[0].goal.name == "MAXIMIZE"
    params = {p.parameter_id: p for p in job.study_spec.parameters}
    assert set(params) == {"filters", "dropout"}
    args = list(job.trial_job_spec.worker_pool_specs[0].container_spec.args)
    assert "--hypertune" in args
    for filters in params["filters"].categorical_value_spec.values:  # how Vertex AI appends trial values
        trainer_parses(args + [f"--filters={filters}", f"--dropout={params['dropout'].double_value_spec.max_value}"])


def test_vertex_tuning_dropout_range_takes_a_step_and_shares_tuning_tasks_messages():
    from google.cloud.aiplatform_v1 import HyperparameterTuningJob

    code, out, err = vertex(["tune", "--service", "vertex", "--image", "img:cpu", "--dropout-range", "0.1:0.5:0.1",
                             *COMMON])
    assert code == 0, err
    dropout = {p.parameter_id: p for p in HyperparameterTuningJob.from_json(out).study_spec.parameters}["dropout"]
    assert list(dropout.discrete_value_spec.values) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    code, _, err = vertex(["tune", "--service", "vertex", "--image", "img:cpu", "--dropout-range", "0.6:0.1", *COMMON])
    assert code == 2 and "argument --dropout-range: MIN 0.6 is above MAX 0.1" in err  # as tuning.task says it


def test_keras_tuner_search_is_one_custom_job_chief_plus_workers():
    from google.cloud.aiplatform_v1 import CustomJob

    from tuning.task import build_parser as tuning_parser

    code, out, err = vertex(["tune", "--service", "keras-tuner", "--workers", "3", "--image", "img:cpu", *COMMON,
                             "--", "--max-trials", "12", "--epochs", "2"])
    assert code == 0, err
    pools = CustomJob.from_json(out).job_spec.worker_pool_specs
    assert [pool.replica_count for pool in pools] == [1, 3]
    for pool in pools:
        assert list(pool.container_spec.command) == ["python", "-m", "tuning.task"]
        args = tuning_parser().parse_args(list(pool.container_spec.args))
        assert args.job_dir == "/gcs/my-bucket/runs/r1/search"  # the bucket as Vertex AI mounts it: shared


@pytest.mark.parametrize("command, flags, message", [
    ("train", ["--epochs", "-5"], "flags after -- (for python -m trainer.task): --epochs must be at least 1, got -5"),
    ("train", ["--bogus", "1"], "flags after -- (for python -m trainer.task): unrecognized arguments: --bogus 1"),
    ("train", ["--dropout", "1.5"], "flags after -- (for python -m trainer.task): --dropout must be in [0, 1)"),
    ("train", ["--hparams-file", "/gcs/b/best.json", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    ("tune --service keras-tuner", ["--tuner", "hyperband", "--max-trials", "5"],
     "flags after -- (for python -m tuning.task): --max-trials does not apply to --tuner hyperband"),
    ("tune --service keras-tuner", ["--dropout-range", "0.5:0.2"], "MIN 0.5 is above MAX 0.2"),
    ("tune --service vertex", ["--epochs", "0"], "flags after -- (for python -m trainer.task): --epochs must be"),
    ("tune --service vertex", ["--dropout", "0.3"], "--dropout is what the tuning service sets in every trial"),
])
def test_bad_flags_after_the_double_dash_exit_2_before_anything_is_printed(command, flags, message):
    result = main_in_fresh_interpreter("deploy.vertex", [*command.split(), "--image", "img:x", *COMMON, "--", *flags])
    assert result["code"] == 2 and result["out"] == ""
    assert message in result["err"].splitlines()[-1], result["err"]
    assert result["heavy"] == [], "checked without importing TensorFlow"


def test_a_dry_run_checks_and_prints_without_importing_tensorflow():
    result = main_in_fresh_interpreter("deploy.vertex", ["tune", "--service", "keras-tuner", "--image", "img:x",
                                                         *COMMON, "--", "--tuner", "hyperband", "--max-epochs", "4"])
    assert result["code"] == 0, result["err"]
    assert json.loads(result["out"])["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]["command"][-1] == "tuning.task"
    assert result["heavy"] == []


@pytest.mark.parametrize("flags, accelerators, message", [
    (["--target", "gpu", "--accelerator-count", "2"], ("NVIDIA_TESLA_T4", 2), None),
    (["--target", "gpu-multi", "--accelerator-count", "1"], ("NVIDIA_TESLA_T4", 1), None),
    (["--target", "gpu", "--accelerator-count", "0"], None, "--accelerator-count 0: for a machine without GPUs use "
                                                            "--target cpu"),
    (["--target", "gpu", "--accelerator-count", "3"], None, "a machine takes 1, 2 or 4 NVIDIA T4s, got 3"),
    (["--target", "cpu", "--accelerator-count", "1"], None, "--target cpu has no accelerators"),
    (["--target", "multi-worker", "--accelerator-count", "2"], None, "--target multi-worker has no accelerators"),
    (["--target", "tpu-v5e", "--accelerator-count", "8"], None, "--target tpu-v5e is 4 TPU chips"),
    (["--target", "tpu-v5e", "--accelerator-count", "4"], ("TPU_V5_LITEPOD", 4), None),
])
def test_accelerator_count_is_honoured_where_it_fits_and_refused_elsewhere(flags, accelerators, message):
    from google.cloud.aiplatform_v1 import CustomJob

    code, out, err = vertex(["train", *flags, "--image", "img:x", *COMMON])
    if message:
        assert code == 2 and out == "" and message in err.splitlines()[-1], err
    else:
        assert code == 0, err
        machine = CustomJob.from_json(out).job_spec.worker_pool_specs[0].machine_spec
        assert (machine.accelerator_type.name, machine.accelerator_count) == accelerators


@pytest.mark.parametrize("flags", [[], ["--augment", "shift-flip"], ["--preset", "seed"]])
def test_tpu_jobs_run_the_flags_as_given(flags):
    """The augmentation compiles under XLA now (tests/test_xla.py): nothing is added or refused for a TPU."""
    from google.cloud.aiplatform_v1 import CustomJob

    code, out, err = vertex(["train", "--target", "tpu-v3", "--image", "img:x", *COMMON, "--", *flags])
    assert code == 0, err
    assert list(CustomJob.from_json(out).job_spec.worker_pool_specs[0].container_spec.args) == flags


def test_train_and_tune_have_their_own_help_with_defaults_and_one_description():
    tuning_only = ("--service", "--max-trials", "--parallel-trials", "--filter-choices", "--dropout-range")
    train = main_in_fresh_interpreter("deploy.vertex", ["train", "--help"])
    tune = main_in_fresh_interpreter("deploy.vertex", ["tune", "--help"])
    assert train["code"] == tune["code"] == 0 and train["heavy"] == tune["heavy"] == []
    train_flags, tune_flags = (set(re.findall(r"--[a-z][a-z-]*", result["out"])) for result in (train, tune))
    assert train_flags.isdisjoint(tuning_only) and tune_flags.issuperset(tuning_only)
    for help_text in (train["out"], tune["out"]):
        assert "(default: us-central1)" in " ".join(help_text.split())
        assert "(default: cpu)" in " ".join(help_text.split())
    assert " ".join(train["out"].split()).count("Submit one training run to Vertex AI") == 1
    assert "Submit one training run" not in tune["out"] and "Submit a hyperparameter search" in tune["out"]


@pytest.mark.parametrize("args, message", [
    (["train", "--image", "i", "--job-dir", "gs://bkt/r", "--project", "p", "--tensorboard", "tb"],
     "--tensorboard needs --service-account"),
    (["train", "--image", "i", "--job-dir", "/local/run", "--project", "p"], "--job-dir must be a gs:// folder"),
    (["train", "--package", "--job-dir", "gs://bkt/r", "--project", "p"], "--package needs --staging-bucket"),
    (["train", "--image", "i", "--job-dir", "gs://bkt/r"], "--project is required"),
    (["train", "--package", "--staging-bucket", "gs://b/s", "--job-dir", "gs://bkt/r", "--dry-run"],
     "--package without --executor-image runs the project's own image, which --project names"),
    (["train", "--image", "i", "--job-dir", "gs://bkt/r", "--project", "p", "--local", "--dry-run"],
     "--local runs the job and --dry-run only prints it: choose one"),
    (["train", "--image", "i", "--job-dir", "gs://bkt/r", "--project", "p", "--restarts", "2"],
     "--restarts, --local-gcs-root, --stop-grace and --local-output apply to --local runs only"),
    (["tune", "--service", "keras-tuner", "--image", "i", "--job-dir", "gs://bkt/r", "--project", "p", "--local",
      "--local-output", "o"],
     "--local-output applies to --service vertex (a KerasTuner search writes into its job dir)"),
    (["train", "--image", "i", "--job-dir", "gs://bkt/r", "--project", "p", "--local", "--restarts", "-1"],
     "--restarts and --stop-grace must be 0 or more"),
    (["train", "--image", "i", "--job-dir", "gs://bkt/r", "--project", "p", "--timeout", "0"],
     "argument --timeout: must be at least 1 second, got '0'"),
    (["tune", "--image", "i", "--job-dir", "gs://bkt/r", "--project", "p", "--timeout", "soon"],
     "argument --timeout: expected seconds or a number with s, m, h or d (e.g. 90m), got 'soon'"),
])
def test_bad_command_lines_exit_2(args, message, monkeypatch):
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    code, _, err = vertex(args)
    assert code == 2 and message in err


def test_a_dry_run_with_an_image_needs_no_project(monkeypatch):
    """The printed request names no project when the image is given, so --dry-run prints it without one."""
    from google.cloud.aiplatform_v1 import CustomJob

    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    code, out, err = vertex(["train", "--image", "img:1", "--job-dir", "gs://bkt/r", "--dry-run"])
    assert code == 0, err
    assert CustomJob.from_json(out).job_spec.worker_pool_specs[0].container_spec.image_uri == "img:1"


@pytest.mark.parametrize("command", ["train", "tune --service vertex", "tune --service keras-tuner"])
def test_timeout_is_the_jobs_scheduling_timeout(command):
    """Per trial in a tuning-service job: the trial job spec carries it."""
    code, out, err = vertex([*command.split(), "--image", "img:x", "--timeout", "90m", *COMMON])
    assert code == 0, err
    payload = json.loads(out)
    spec = payload.get("trialJobSpec") or payload["jobSpec"]
    assert spec["scheduling"] == {"timeout": "5400s"}
    code, out, _ = vertex([*command.split(), "--image", "img:x", *COMMON])
    assert "scheduling" not in out, "left to Vertex AI's default (7 days) when not given"


def test_without_credentials_submission_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    code, _, err = vertex(["train", "--image", "i", "--job-dir", "gs://bkt/r", "--project", "p"])
    assert code == 1
    assert err.strip().splitlines() == [err.strip().splitlines()[-1]]
    assert err.startswith("error: no Google Cloud credentials") and "Traceback" not in err


def test_hadolint_passes_on_the_dockerfile():
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    result = subprocess.run([hadolint, os.path.join(ROOT_DIR, "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def fresh_venv(path):
    """A new virtual environment that sees this environment's installed packages through a .pth file:
    pip in it resolves the project's requirements against them instead of downloading a second copy of
    TensorFlow, but the project itself must install into it from its sdist or source."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "outer.pth"), "w") as handle:
        handle.write(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_dockerfile_install_and_entry_commands_work_in_a_fresh_venv(tmp_path, digits_idx):
    dockerfile = open(os.path.join(ROOT_DIR, "Dockerfile")).read()
    install = re.search(r'pip install --no-cache-dir "\.\[\$\{VARIANT\},([a-z,]+)\]"', dockerfile)
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    assert install and entry == ["python", "-m", "trainer.task"]
    context = tmp_path / "context"  # what COPY puts in the image
    for name in ("setup.py", "README.md", "LICENSE"):
        os.makedirs(context, exist_ok=True)
        shutil.copy(os.path.join(ROOT_DIR, name), context / name)
    for package in ("trainer", "tuning", "deploy"):
        shutil.copytree(os.path.join(ROOT_DIR, package), context / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.ipynb"))
    python = fresh_venv(tmp_path / "venv")
    env = dict(os.environ, PYTHONPATH="")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-cache-dir", f".[cpu,{install.group(1)}]"],
                   check=True, env=env, cwd=context)
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run([str(python), *entry[1:], "--dataset", f"idx:{digits_idx}", "--train-limit", "600",
                             "--epochs", "1", "--job-dir", str(home / "run")], capture_output=True, text=True,
                            env=env, cwd=home, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.isfile(home / "run" / "model" / "saved_model.pb")


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom_on_cpu(tmp_path, digits_idx, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    path = os.path.join(ROOT_DIR, "deploy", "colab_tpu.ipynb")
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    python = fresh_venv(tmp_path / "venv")
    jupyter = tmp_path / "jupyter"
    subprocess.run([str(python), "-m", "ipykernel", "install", "--prefix", str(jupyter), "--name", "fresh"],
                   check=True, capture_output=True)
    job_dir = tmp_path / "job"
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter / "share" / "jupyter"))
    monkeypatch.setenv("MNIST_TRAINER_SOURCE", ROOT_DIR)  # GitHub cannot be reached here
    monkeypatch.setenv("MNIST_TRAINER_DATASET", f"idx:{digits_idx}")
    monkeypatch.setenv("MNIST_TRAINER_JOB_DIR", str(job_dir))
    monkeypatch.setenv("MNIST_TRAINER_ARGS", "--epochs 1 --train-limit 1000 --preset seed")
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    monkeypatch.chdir(tmp_path)
    client = NotebookClient(notebook, kernel_name="fresh", timeout=600)
    try:
        client.execute()
        outputs = ["".join(o.get("text", "") for o in cell.get("outputs", [])) for cell in notebook.cells
                   if cell.cell_type == "code"]
        install = outputs[1].strip().splitlines()
        assert install[0].startswith("installing: ") and install[-1].startswith("installed: mnist-trainer 0.")
        assert len(install) == 2, "pip's own output shows only when it fails (no CompletedProcess either)"
        assert "NOTE: no TPU attached" in outputs[2] and "test_accuracy" in outputs[2]
        images = [o for o in notebook.cells[4].outputs if "image/png" in o.get("data", {})]
        assert len(images) == 3  # accuracy, loss, confusion matrix
        tensorboard = json.dumps(notebook.cells[5].outputs)
        assert "ERROR" not in tensorboard and ("Launching TensorBoard" in tensorboard or "iframe" in tensorboard)
    finally:
        from tensorboard import manager

        for info in manager.get_all():
            if str(job_dir) in info.logdir:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(info.pid, 15)
