"""`python -m deploy.vertex train|tune`: submit the trainer (or a search) to Vertex AI as one job.

    python -m deploy.vertex train --project P --region us-central1 --target gpu \\
        --image us-central1-docker.pkg.dev/P/mnist-trainer/trainer:gpu --job-dir gs://B/runs/run1 -- --epochs 20
    python -m deploy.vertex tune --service vertex --max-trials 12 --parallel-trials 3 ... -- --epochs 5
    python -m deploy.vertex tune --service keras-tuner --workers 3 ... -- --max-trials 12 --epochs 3

Code ships as the project's image (`--image`, a ContainerSpec) or as a Python package (`--package`: the
sdist built from setup.py is uploaded to --staging-bucket and run with `python_module` on an executor
image, by default the project's own image: Vertex AI's prebuilt TensorFlow images stop at 2.17).
`--job-dir` becomes the job's base_output_directory, so AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and
AIP_TENSORBOARD_LOG_DIR land in the trainer's layout. Flags after `--` go to the trainer (or to
tuning.task). `--dry-run` prints the exact request body as JSON and needs no credentials or network.
Exit codes: 0, 2 (command line), 1 (credentials, upload, API).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import os
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence

from trainer.errors import TrainerError
from tuning.space import dropout_range
from tuning.task import gcs_mount

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Target:
    machine_type: str
    accelerator_type: str = "ACCELERATOR_TYPE_UNSPECIFIED"
    accelerator_count: int = 0
    tpu_topology: str = ""
    variant: str = "cpu"  # which image build: cpu, gpu or tpu
    workers: int = 0  # extra pool of workers (multi-worker)


TARGETS = {
    "cpu": Target("n1-standard-8"),
    "gpu": Target("n1-standard-8", "NVIDIA_TESLA_T4", 1, variant="gpu"),
    "gpu-multi": Target("n1-standard-16", "NVIDIA_TESLA_T4", 4, variant="gpu"),  # auto -> MirroredStrategy
    "multi-worker": Target("n1-standard-8", workers=2),  # pool 0 chief + pool 1 workers -> MultiWorkerMirrored
    "tpu-v5e": Target("ct5lp-hightpu-4t", "TPU_V5_LITEPOD", 4, "2x2", variant="tpu"),
    "tpu-v3": Target("cloud-tpu", "TPU_V3", 8, variant="tpu"),  # legacy TPU VM pool
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.vertex", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("command", choices=("train", "tune"))
    parser.add_argument("--project", default=os.environ.get("GOOGLE_CLOUD_PROJECT"),
                        help="Google Cloud project (default: GOOGLE_CLOUD_PROJECT)")
    parser.add_argument("--region", default="us-central1")
    parser.add_argument("--target", choices=sorted(TARGETS), default="cpu")
    parser.add_argument("--workers", type=int, default=None,
                        help="replicas in pool 1 (multi-worker training, keras-tuner workers)")
    parser.add_argument("--machine-type", default=None, help="override the target's machine type")
    parser.add_argument("--accelerator-count", type=int, default=None, help="override the target's count")
    code = parser.add_mutually_exclusive_group(required=True)
    code.add_argument("--image", help="the project's image (ContainerSpec), e.g. REGION-docker.pkg.dev/P/R/trainer:gpu")
    code.add_argument("--package", action="store_true", help="ship the sdist of setup.py (PythonPackageSpec)")
    parser.add_argument("--executor-image", default=None,
                        help="with --package: the image that runs it (default: the project's image in Artifact "
                             "Registry, REGION-docker.pkg.dev/PROJECT/mnist-trainer/trainer:VARIANT)")
    parser.add_argument("--staging-bucket", default=None, help="with --package: gs:// folder for the sdist")
    parser.add_argument("--job-dir", required=True, help="gs:// folder: the job's base_output_directory")
    parser.add_argument("--display-name", default=None)
    parser.add_argument("--service-account", default=None)
    parser.add_argument("--tensorboard", default=None,
                        help="Vertex AI TensorBoard resource (projects/P/locations/R/tensorboards/ID); "
                             "needs --service-account")
    parser.add_argument("--service", choices=("vertex", "keras-tuner"), default="vertex",
                        help="tune: Vertex AI's tuning service, or a KerasTuner search as one custom job")
    parser.add_argument("--max-trials", type=int, default=12, help="tune --service vertex")
    parser.add_argument("--parallel-trials", type=int, default=3, help="tune --service vertex")
    parser.add_argument("--filter-choices", default="16,32;32,64;64,128",
                        help="tune --service vertex: --filters values, separated by ';'")
    parser.add_argument("--dropout-range", type=dropout_range, default="0.1:0.6",
                        help="tune --service vertex: MIN:MAX (continuous) or MIN:MAX:STEP (the rates on that grid)")
    parser.add_argument("--dry-run", action="store_true", help="print the request body as JSON and exit")
    return parser


def parse(argv: Optional[Sequence[str]]):
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: List[str] = []
    if "--" in argv:
        passthrough = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.project:
        parser.error("--project is required (or set GOOGLE_CLOUD_PROJECT)")
    if not args.job_dir.startswith("gs://"):
        parser.error(f"--job-dir must be a gs:// folder (Vertex AI writes there), got {args.job_dir}")
    if args.package and not (args.staging_bucket or "").startswith("gs://"):
        parser.error("--package needs --staging-bucket gs://BUCKET[/folder] for the sdist")
    if args.tensorboard and not args.service_account:
        parser.error("--tensorboard needs --service-account: Vertex AI TensorBoard uploads with the job's "
                     "service account (one with roles/aiplatform.user and storage access)")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    return args, passthrough


def default_image(args, variant: str) -> str:
    from trainer import __version__

    return f"{args.region}-docker.pkg.dev/{args.project}/mnist-trainer/trainer:{variant}-{__version__}"


def build_sdist(out_dir: str) -> str:
    """`python setup.py sdist` into out_dir; returns the archive's path."""
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", out_dir], cwd=ROOT,
                            capture_output=True, text=True)
    archives = glob.glob(os.path.join(out_dir, "*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise TrainerError(f"building the sdist failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
    return archives[0]


def worker_pools(args, module: str, module_args: List[str], package_uri: Optional[str]) -> list:
    from google.cloud import aiplatform_v1 as vertex

    target = TARGETS[args.target]
    machine = vertex.MachineSpec(machine_type=args.machine_type or target.machine_type)
    if target.accelerator_count:
        machine.accelerator_type = vertex.AcceleratorType[target.accelerator_type]
        machine.accelerator_count = args.accelerator_count or target.accelerator_count
    if target.tpu_topology:
        machine.tpu_topology = target.tpu_topology
    if package_uri:
        code = dict(python_package_spec=vertex.PythonPackageSpec(
            executor_image_uri=args.executor_image or default_image(args, target.variant),
            package_uris=[package_uri], python_module=module, args=module_args))
    else:
        command = [] if module == "trainer.task" else ["python", "-m", module]  # the image's entry point is the trainer
        code = dict(container_spec=vertex.ContainerSpec(image_uri=args.image, command=command, args=module_args))
    pools = [vertex.WorkerPoolSpec(machine_spec=machine, replica_count=1, **code)]
    workers = args.workers if args.workers is not None else target.workers
    if args.command == "tune" and args.service == "keras-tuner":
        workers = args.workers or 2
    if workers:
        pools.append(vertex.WorkerPoolSpec(machine_spec=machine, replica_count=workers, **code))
    return pools


def build_job(args, passthrough: List[str], package_uri: Optional[str]):
    """The CustomJob or HyperparameterTuningJob message for these arguments."""
    from google.cloud import aiplatform_v1 as vertex

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = args.display_name or f"mnist-{args.command}-{args.target}-{stamp}"
    if args.command == "tune" and args.service == "keras-tuner":
        module, module_args = "tuning.task", ["--job-dir", gcs_mount(args.job_dir.rstrip("/") + "/search"),
                                              *passthrough]
    else:
        module, module_args = "trainer.task", list(passthrough)
        if args.command == "tune":
            module_args.append("--hypertune")
    spec = vertex.CustomJobSpec(worker_pool_specs=worker_pools(args, module, module_args, package_uri),
                                base_output_directory=vertex.GcsDestination(output_uri_prefix=args.job_dir))
    if args.service_account:
        spec.service_account = args.service_account
    if args.tensorboard:
        spec.tensorboard = args.tensorboard
    if args.command == "train" or args.service == "keras-tuner":
        return vertex.CustomJob(display_name=name, job_spec=spec)
    dropout = args.dropout_range
    Spec = vertex.StudySpec.ParameterSpec
    if dropout.step:
        dropout_values = dict(discrete_value_spec=Spec.DiscreteValueSpec(values=list(dropout.grid())))
    else:
        dropout_values = dict(double_value_spec=Spec.DoubleValueSpec(min_value=dropout.low, max_value=dropout.high),
                              scale_type=Spec.ScaleType.UNIT_LINEAR_SCALE)
    parameters = [
        Spec(parameter_id="filters", categorical_value_spec=Spec.CategoricalValueSpec(
            values=[choice.strip() for choice in args.filter_choices.split(";")])),
        Spec(parameter_id="dropout", **dropout_values),
    ]
    study = vertex.StudySpec(metrics=[vertex.StudySpec.MetricSpec(
        metric_id="val_accuracy", goal=vertex.StudySpec.MetricSpec.GoalType.MAXIMIZE)], parameters=parameters)
    return vertex.HyperparameterTuningJob(display_name=name, study_spec=study, max_trial_count=args.max_trials,
                                          parallel_trial_count=args.parallel_trials, trial_job_spec=spec)


def to_json(job) -> str:
    return type(job).to_json(job, use_integers_for_enums=False, indent=2)


def submit(args, job):
    import google.auth
    import google.auth.exceptions
    from google.api_core import exceptions
    from google.cloud import aiplatform_v1 as vertex

    try:
        credentials, _ = google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        raise TrainerError("no Google Cloud credentials: run `gcloud auth application-default login` or set "
                           "GOOGLE_APPLICATION_CREDENTIALS (or use --dry-run to only print the job)") from None
    client = vertex.JobServiceClient(credentials=credentials,
                                     client_options={"api_endpoint": f"{args.region}-aiplatform.googleapis.com"})
    parent = f"projects/{args.project}/locations/{args.region}"
    try:
        if isinstance(job, vertex.HyperparameterTuningJob):
            created = client.create_hyperparameter_tuning_job(parent=parent, hyperparameter_tuning_job=job)
        else:
            created = client.create_custom_job(parent=parent, custom_job=job)
    except exceptions.GoogleAPICallError as error:
        raise TrainerError(f"Vertex AI refused the job in {parent}: {type(error).__name__} "
                           f"{getattr(error, 'code', '')} {getattr(error, 'message', '')}".strip()) from None
    return created


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, passthrough = parse(argv)  # exits 2 on a command-line error
    try:
        package_uri = None
        with tempfile.TemporaryDirectory() as scratch:
            if args.package:
                archive = build_sdist(scratch)
                package_uri = f"{args.staging_bucket.rstrip('/')}/mnist-trainer/{os.path.basename(archive)}"
                if not args.dry_run:
                    from trainer.storage import upload_file
                    upload_file(archive, package_uri)
        job = build_job(args, passthrough, package_uri)
        if args.dry_run:
            print(to_json(job))
            return 0
        created = submit(args, job)
    except TrainerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    job_id = created.name.rsplit("/", 1)[-1]
    kind = "training" if "customJobs" in created.name else "hyperparameter tuning"
    print(f"submitted {kind} job {created.name}\n"
          f"  console: https://console.cloud.google.com/vertex-ai/locations/{args.region}/"
          f"{'training' if kind == 'training' else 'hyperparameter-tuning'}/{job_id}?project={args.project}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
