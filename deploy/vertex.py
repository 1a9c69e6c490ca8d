"""`python -m deploy.vertex train|tune`: submit the trainer (or a search) to Vertex AI as one job.

    python -m deploy.vertex train --project P --region us-central1 --target gpu \\
        --image us-central1-docker.pkg.dev/P/mnist-trainer/trainer:gpu --job-dir gs://B/runs/run1 -- --epochs 20
    python -m deploy.vertex tune --service vertex --max-trials 12 --parallel-trials 3 ... -- --epochs 5
    python -m deploy.vertex tune --service keras-tuner --workers 3 ... -- --max-trials 12 --epochs 3

Code ships as the project's image (--image, a ContainerSpec) or as a Python package (--package: the
sdist built from setup.py is uploaded to --staging-bucket and run with python_module on an executor
image, by default the project's own image: Vertex AI's prebuilt TensorFlow images stop at 2.17).
--job-dir becomes the job's base_output_directory, so AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and
AIP_TENSORBOARD_LOG_DIR land in the trainer's layout. Flags after -- go to python -m trainer.task (or
tuning.task for a KerasTuner search) and are checked by that module's own parser before anything is
printed or submitted. A tpu-* job runs the same flags as any other. --dry-run prints the request body as JSON,
only the fields it sets, and needs no credentials or network. `--local` runs that very request on this
machine as Vertex AI would run it: a custom job (train, tune --service keras-tuner) as one process per
replica with Vertex AI's environment and lifecycle (deploy/local.py); a tuning-service job as its trials,
parameters sampled at random from the study spec (deploy/local_tuning.py); a --package job from its sdist
installed in a throw-away virtual environment (deploy/local_package.py). gs:// is Google Cloud Storage with
credentials, else a Cloud Storage emulator the runner starts for the job (deploy/local_storage.py;
--local-storage chooses). Try a job there before paying, with or without a Google account.
Exit codes: 0, 2 (command line, the flags after -- included), 1 (credentials, upload, API; with --local a
replica that failed, no trial that succeeded, or the timeout), 143 and 130 (--local stopped by SIGTERM or
Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import io
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence

from deploy.local import STOP_GRACE_SECONDS
from deploy.local_storage import CHOICES, DEFAULT_ROOT
from trainer import __version__
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

    @property
    def summary(self) -> str:
        machine = f"{self.workers + 1} x " if self.workers else ""
        machine += self.machine_type
        if self.accelerator_count:
            machine += f" + {self.accelerator_count} {self.accelerator_type}"
        return machine + (f" {self.tpu_topology}" if self.tpu_topology else "")


TARGETS = {
    "cpu": Target("n1-standard-8"),
    "gpu": Target("n1-standard-8", "NVIDIA_TESLA_T4", 1, variant="gpu"),
    "gpu-multi": Target("n1-standard-16", "NVIDIA_TESLA_T4", 4, variant="gpu"),  # auto -> MirroredStrategy
    "multi-worker": Target("n1-standard-8", workers=2),  # pool 0 chief + pool 1 workers -> MultiWorkerMirrored
    "tpu-v5e": Target("ct5lp-hightpu-4t", "TPU_V5_LITEPOD", 4, "2x2", variant="tpu"),
    "tpu-v3": Target("cloud-tpu", "TPU_V3", 8, variant="tpu"),  # legacy TPU VM pool
}
GPU_COUNTS = (1, 2, 4)  # NVIDIA T4s a Vertex AI machine takes
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TIMEOUT = 365 * 86400  # a year: far past any job, well inside the request's duration field
MAX_WORKERS = 1000  # replicas in a pool
MAX_TRIALS = 100_000
# The search flags of `tune`; with --service vertex their defaults, with keras-tuner they go to tuning.task.
TUNE_DEFAULTS = {"max_trials": 12, "parallel_trials": 3, "filter_choices": "16,32;32,64;64,128",
                 "dropout_range": "0.1:0.6"}


def duration(text: str) -> int:
    """`90`, `90s`, `30m`, `2h`, `1d` -> whole seconds (argparse type)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seconds or a number with s, m, h or d (e.g. 90m), got {text!r}") from None
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"expected a finite duration, got {text!r}")
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 second, got {text!r}")
    if seconds > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT // 86400} days (Vertex AI's own default "
                                         f"is 7), got {text!r}")
    return int(seconds)


def bounded_int(low: int, high: int):
    """argparse type: an integer in [low, high] (a value the request's integer fields can hold)."""
    def parse_int(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high:,}], got {text}")
        return value
    return parse_int


class HelpFormatter(argparse.HelpFormatter):
    """Each flag's default after its help, when it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _add_common_flags(parser: argparse.ArgumentParser, workers_help: str) -> None:
    parser.add_argument("--project", default=None, help="Google Cloud project (default: $GOOGLE_CLOUD_PROJECT)")
    parser.add_argument("--region", default="us-central1", help="Vertex AI region")
    parser.add_argument("--target", choices=sorted(TARGETS), default="cpu",
                        help="machine kind: " + "; ".join(f"{name}: {target.summary}" for name, target in
                                                          TARGETS.items()))
    parser.add_argument("--workers", type=bounded_int(1, MAX_WORKERS), default=None, help=workers_help)
    parser.add_argument("--machine-type", default=None, help="override the target's machine type")
    parser.add_argument("--accelerator-count", type=int, default=None,
                        help="GPUs per machine on gpu targets (1, 2 or 4 T4s); not for cpu or multi-worker, "
                             "fixed by the machine type on tpu targets")
    code = parser.add_mutually_exclusive_group(required=True)
    code.add_argument("--image", help="the project's image (ContainerSpec), e.g. REGION-docker.pkg.dev/P/R/trainer:gpu")
    code.add_argument("--package", action="store_true", help="ship the sdist of setup.py (PythonPackageSpec)")
    parser.add_argument("--executor-image", default=None,
                        help="with --package: the image that runs it (default: the project's image in Artifact "
                             f"Registry, REGION-docker.pkg.dev/PROJECT/mnist-trainer/trainer:VARIANT-{__version__}, "
                             "VARIANT cpu, gpu or tpu after --target)")
    parser.add_argument("--staging-bucket", default=None, help="with --package: gs:// folder for the sdist")
    parser.add_argument("--job-dir", required=True, help="gs:// folder: the job's base_output_directory")
    parser.add_argument("--display-name", default=None, help="default: mnist-COMMAND-TARGET-<UTC timestamp>")
    parser.add_argument("--service-account", default=None, help="the service account the job runs as")
    parser.add_argument("--tensorboard", default=None,
                        help="Vertex AI TensorBoard resource (projects/P/locations/R/tensorboards/ID); "
                             "needs --service-account")
    parser.add_argument("--timeout", type=duration, default=None, metavar="DURATION",
                        help="the job's scheduling.timeout (per trial in a tuning job): seconds, or a number with "
                             "s, m, h or d, e.g. 90m (default: Vertex AI's, 7 days)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the request body as JSON (only the fields it sets) and exit; no credentials "
                             "or network needed")


def _add_local_flags(parser: argparse.ArgumentParser):
    local = parser.add_argument_group("running the job here first (--local)")
    local.add_argument("--local", action="store_true",
                       help="run the very request on this machine as Vertex AI would: every replica of every pool a "
                            "local process on 127.0.0.1 with Vertex AI's CLUSTER_SPEC, TF_CONFIG and AIP_* variables "
                            "(gs:// as --local-storage says); a tuning-service job: its trials, parameters sampled at "
                            "random from the study spec; "
                            "--package: the sdist installed in a throw-away virtual environment first")
    local.add_argument("--local-gcs-root", default="local-gcs", metavar="DIR",
                       help="with --local: the folder that stands in for /gcs/ (Cloud Storage FUSE) paths, apart "
                            "from the gs:// buckets")
    local.add_argument("--local-storage", choices=CHOICES, default="auto",
                       help="with --local: what gs:// is. google: Google Cloud Storage with your credentials; "
                            "emulator: a Cloud Storage emulator (fake-gcs-server) the runner starts on 127.0.0.1, "
                            "creating the request's buckets, and stops when the job ends; auto: the emulator "
                            "STORAGE_EMULATOR_HOST names if set, else google when credentials exist, else emulator")
    local.add_argument("--local-buckets", default=DEFAULT_ROOT, metavar="DIR",
                       help="with --local and the runner's emulator: the folder that keeps its buckets, "
                            "gs://BUCKET/PATH as the file DIR/BUCKET/PATH")
    local.add_argument("--restarts", type=int, default=0, metavar="N",
                       help="with --local: restart a failed replica in place up to N times, as Vertex AI does (up "
                            "to 5); by default a failed replica stops the job")
    local.add_argument("--stop-grace", type=float, default=STOP_GRACE_SECONDS, metavar="SECONDS",
                       help="with --local: seconds between SIGTERM and SIGKILL when replicas are stopped (Compute "
                            "Engine gives a preempted VM 30)")
    return local


class CommandParser(argparse.ArgumentParser):
    """The top-level parser, which also knows its sub-commands' parsers (their usage goes with their errors)."""

    commands: Dict[str, argparse.ArgumentParser]


def build_parser() -> CommandParser:
    parser = CommandParser(prog="python -m deploy.vertex", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,tune}")
    train = commands.add_parser(
        "train", help="train once: a CustomJob running python -m trainer.task", formatter_class=HelpFormatter,
        description="Submit one training run to Vertex AI as a CustomJob. Flags after -- go to "
                    "python -m trainer.task and are checked by its parser first.")
    _add_common_flags(train, "with --target multi-worker: replicas in pool 1, beside the chief (default: 2)")
    _add_local_flags(train)
    tune = commands.add_parser(
        "tune", help="search hyperparameters: Vertex AI's tuning service, or a KerasTuner search as one CustomJob",
        formatter_class=HelpFormatter,
        description="Submit a hyperparameter search. --service vertex: a HyperparameterTuningJob whose trials "
                    "run python -m trainer.task (flags after -- go to it). --service keras-tuner: one CustomJob "
                    "running python -m tuning.task on a chief and --workers workers (flags after -- go to it). "
                    "Either way the flags after -- are checked by that module's parser first.")
    _add_common_flags(tune, "--service keras-tuner: tuner workers in pool 1 (default: 2); --service vertex: as "
                            "for train, per trial")
    _add_local_flags(tune).add_argument("--local-output", default="local-tuning", metavar="DIR",
        help="with --service vertex --local: the folder for each trial's metric file and the job's results "
             "(JOB_ID/tuning_job.json, JOB_ID/best_trial.json)")
    tune.add_argument("--service", choices=("vertex", "keras-tuner"), default="vertex",
                      help="Vertex AI's tuning service, or a KerasTuner search as one custom job")
    tune.add_argument("--max-trials", type=bounded_int(1, MAX_TRIALS), default=None,
                      help="trials in all (--service vertex: default 12; keras-tuner: passed to tuning.task)")
    tune.add_argument("--parallel-trials", type=bounded_int(1, MAX_TRIALS), default=None,
                      help="--service vertex: trials at a time (default 3); keras-tuner runs --workers at a time")
    tune.add_argument("--filter-choices", default=None,
                      help="--service vertex: --filters values, separated by ';' (default 16,32;32,64;64,128); "
                           "keras-tuner: pass tuning.task's --blocks and --filter-choices after --")
    tune.add_argument("--dropout-range", default=None,
                      help="MIN:MAX (continuous) or MIN:MAX:STEP (the rates on that grid) (--service vertex: "
                           "default 0.1:0.6; keras-tuner: passed to tuning.task)")
    parser.commands = {"train": train, "tune": tune}
    return parser


def _argparse_refusal(parse, argv: List[str]) -> Optional[str]:
    """Call an argparse-based `parse(argv)` quietly; the message it refuses argv with (its exit 2), or None."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(io.StringIO()):
            parse(argv)
    except SystemExit as exit_:
        if exit_.code == 0:  # --help or similar: the job would print it and stop
            return "a job that only prints help; run the module with --help here instead"
        lines = captured.getvalue().strip().splitlines() or [f"exit code {exit_.code}"]
        return lines[-1].split(": error: ", 1)[-1]
    return None


def _without_option(argv: List[str], option: str) -> List[str]:
    """argv without `option` (spelled out, abbreviated or with =VALUE) and its value."""
    kept, skip = [], False
    for token in argv:
        name = token.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) > 3 and name.startswith("--") and option.startswith(name):
            skip = "=" not in token
        else:
            kept.append(token)
    return kept


def check_passthrough(parser: argparse.ArgumentParser, args, passthrough: List[str]) -> List[str]:
    """Check the flags after -- with the parser of the module that will run them (TensorFlow-free, no I/O),
    before anything is printed or submitted; returns the module's arguments (a TPU job runs them as they
    are: the trainer's augmentation compiles under XLA)."""
    from trainer.config import build_parser as trainer_parser
    from trainer.config import parse_config

    def refuse(module: str, message: str):
        parser.error(f"flags after -- (for python -m {module}): {message}")

    if args.command == "tune" and args.service == "keras-tuner":
        from tuning.task import parse as tuning_parse

        job_dir = gcs_mount(args.job_dir.rstrip("/") + "/search")
        module_args = ["--job-dir", job_dir, *_search_flags(parser, args, passthrough), *passthrough]
        message = _argparse_refusal(tuning_parse, module_args)
        if message:
            refuse("tuning.task", message)
        if tuning_parse(module_args)[0].job_dir != job_dir:
            refuse("tuning.task", f"--job-dir is set from deploy's own --job-dir (to {job_dir}, the folder "
                                  "every worker shares)")
        return module_args

    module_args = list(passthrough) + (["--hypertune"] if args.command == "tune" else [])
    message = _argparse_refusal(trainer_parser().parse_args, module_args)
    if message:
        refuse("trainer.task", message)
    given = trainer_parser().parse_args(module_args)
    # --hparams-file is read where the job runs (e.g. a /gcs/ path), so the rest is checked without it.
    checked = _without_option(module_args, "--hparams-file") if given.hparams_file else module_args
    message = _argparse_refusal(lambda argv: parse_config(argv, {}), checked)
    if message:
        refuse("trainer.task", message)
    for name in ("job_dir", "model_dir", "checkpoint_dir", "log_dir"):
        path = getattr(given, name)
        if path and not path.startswith(("gs://", "/gcs/")):
            refuse("trainer.task", f"--{name.replace('_', '-')} {path} is on the replica's own disk, which is "
                                   "gone when the job ends; pass a gs:// or /gcs/ path, or leave it out (the "
                                   "outputs then go under deploy's --job-dir)")
    message = _too_deep(given.filters, checked) if given.filters and args.command == "train" else None
    if message:
        refuse("trainer.task", message)
    if args.command == "tune":
        for flag in ("filters", "dropout"):
            if getattr(given, flag) is not None:
                refuse("trainer.task", f"--{flag} is what the tuning service sets in every trial")
        for choice in args.filter_choices.split(";"):  # each trial's flags, as Vertex AI appends them
            message = _argparse_refusal(lambda argv: parse_config(argv, {}), checked + [
                "--filters", choice.strip(), "--dropout", str(args.dropout_range.low)])
            if message:
                parser.error(f"--filter-choices {choice.strip()!r}: {message}")
            message = _too_deep(tuple(int(value) for value in choice.split(",")), checked)
            if message:
                parser.error(f"--filter-choices {choice.strip()!r}: {message}")
    return module_args


def _search_flags(parser: argparse.ArgumentParser, args, passthrough: List[str]) -> List[str]:
    """With --service keras-tuner: deploy's search flags as tuning.task arguments (--max-trials,
    --dropout-range); those that have no meaning there are refused, as is one given twice."""
    if args.parallel_trials is not None:
        parser.error("--parallel-trials applies to --service vertex; a KerasTuner search runs one trial per tuner "
                     "worker at a time: set the parallelism with --workers")
    if args.filter_choices is not None:
        parser.error("--filter-choices (whole --filters values) applies to --service vertex; a KerasTuner search "
                     "chooses each block's filters on its own: pass tuning.task's --blocks and --filter-choices "
                     "after --")
    flags = []
    for name in ("max_trials", "dropout_range"):
        value = getattr(args, name)
        if value is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        if any(token.split("=", 1)[0] == flag for token in passthrough):
            parser.error(f"{flag} is given both before and after --; give it once")
        flags += [flag, str(value)]
    return flags


def _too_deep(filters, checked: List[str]) -> Optional[str]:
    """Why conv blocks `filters` do not fit the images (as the trainer would refuse them at its start in every
    replica or trial), or None; None too when the dataset's image size is not known before loading it (the
    trainer checks then)."""
    from trainer.config import parse_config
    from trainer.data import known_image_size
    from trainer.model import feature_map_sizes

    config = parse_config(checked, {})
    size = known_image_size(config.dataset)
    if size is None:
        return None
    try:
        feature_map_sizes(filters, size, convs_per_block=config.convs_per_block, padding=config.padding)
    except TrainerError as error:
        return str(error)
    return None


def parse(argv: Optional[Sequence[str]], environ: Mapping[str, str]):
    """The command line, every check that needs no I/O (exit 2): returns (args, the module's arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: List[str] = []
    if "--" in argv:
        passthrough = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    top = build_parser()
    args = top.parse_args(argv)
    parser = top.commands[args.command]  # errors show the subcommand's usage
    args.project = args.project or environ.get("GOOGLE_CLOUD_PROJECT")
    only_here = args.dry_run or getattr(args, "local", False)  # printed or run here: no project in the request
    if not args.project and not only_here:
        parser.error("--project is required (or set GOOGLE_CLOUD_PROJECT)")
    if not args.project and args.package and not args.executor_image:
        parser.error("--package without --executor-image runs the project's own image, which --project names "
                     "(or set GOOGLE_CLOUD_PROJECT)")
    if not args.job_dir.startswith("gs://"):
        parser.error(f"--job-dir must be a gs:// folder (Vertex AI writes there), got {args.job_dir}")
    _check_names(parser, args)
    if args.package and not (args.staging_bucket or "").startswith("gs://"):
        parser.error("--package needs --staging-bucket gs://BUCKET[/folder] for the sdist")
    from trainer.config import bucket_problem

    for flag, url in (("--job-dir", args.job_dir), ("--staging-bucket", args.staging_bucket)):
        problem = bucket_problem(url) if url and url.startswith("gs://") else None
        if problem:
            parser.error(f"{flag} {url}: {problem}")
    if args.tensorboard and not args.service_account:
        parser.error("--tensorboard needs --service-account: Vertex AI TensorBoard uploads with the job's "
                     "service account (one with roles/aiplatform.user and storage access)")
    _check_accelerators(parser, args, TARGETS[args.target])
    _check_local_flags(parser, args)
    if args.command == "tune":
        if args.dropout_range is not None:
            try:
                dropout_range(args.dropout_range)
            except argparse.ArgumentTypeError as error:
                parser.error(f"argument --dropout-range: {error}")
        if args.service == "vertex":
            for name, default in TUNE_DEFAULTS.items():
                if getattr(args, name) is None:
                    setattr(args, name, default)
            args.dropout_range = dropout_range(args.dropout_range)
        if args.service == "keras-tuner" and TARGETS[args.target].variant == "tpu":
            parser.error(f"--target {args.target}: a KerasTuner search trains every trial with TensorFlow's "
                         "default strategy, so the TPU would sit idle; use --target cpu or gpu")
    return args, check_passthrough(parser, args, passthrough)


REGION = re.compile(r"^[a-z]+(-[a-z0-9]+)+$")  # us-central1, europe-west4, northamerica-northeast1
MACHINE_TYPE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")  # n1-standard-8, ct5lp-hightpu-4t, cloud-tpu


def _check_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Values the request carries as they are (or builds image and endpoint names from): refused here when
    Vertex AI could only reject them, or (an empty one) when they would be left out of the request unseen."""
    for flag, value in (("--image", args.image), ("--executor-image", args.executor_image)):
        if value is not None and (not value.strip() or any(char.isspace() for char in value)):
            parser.error(f"{flag} {value!r}: not an image name (e.g. REGION-docker.pkg.dev/PROJECT/REPO/NAME:TAG)")
    if not REGION.match(args.region):
        parser.error(f"--region {args.region!r}: not a region name (e.g. us-central1)")
    if args.machine_type is not None and not MACHINE_TYPE.match(args.machine_type):
        parser.error(f"--machine-type {args.machine_type!r}: not a machine type (e.g. n1-standard-8); leave the "
                     "flag out for the target's own")


def _check_accelerators(parser: argparse.ArgumentParser, args: argparse.Namespace, target: Target) -> None:
    if args.accelerator_count is not None:
        if not target.accelerator_count:
            parser.error(f"--accelerator-count: --target {args.target} has no accelerators; for GPUs use "
                         "--target gpu or gpu-multi (with --workers N for GPU workers beside the chief)")
        if target.variant == "tpu" and args.accelerator_count != target.accelerator_count:
            parser.error(f"--accelerator-count: --target {args.target} is {target.accelerator_count} TPU chips, "
                         f"fixed by its machine type {target.machine_type}")
        if args.accelerator_count == 0:
            parser.error("--accelerator-count 0: for a machine without GPUs use --target cpu")
        if target.variant == "gpu" and args.accelerator_count not in GPU_COUNTS:
            counts = f"{', '.join(map(str, GPU_COUNTS[:-1]))} or {GPU_COUNTS[-1]}"
            parser.error(f"--accelerator-count: a machine takes {counts} NVIDIA T4s, got {args.accelerator_count}")


def _check_local_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if getattr(args, "local", False):
        if args.dry_run:
            parser.error("--local runs the job and --dry-run only prints it: choose one")
    elif args.restarts or args.local_gcs_root != "local-gcs" or args.stop_grace != STOP_GRACE_SECONDS or \
            getattr(args, "local_output", "local-tuning") != "local-tuning":
        parser.error("--restarts, --local-gcs-root, --stop-grace and --local-output apply to --local runs only")
    if not getattr(args, "local", False) and (args.local_storage != "auto" or args.local_buckets != DEFAULT_ROOT):
        parser.error("--local-storage and --local-buckets apply to --local runs only")
    if args.local_buckets != DEFAULT_ROOT and args.local_storage == "google":
        parser.error("--local-buckets is the emulator's folder: it does not go with --local-storage google")
    buckets, fuse = (os.path.abspath(folder) for folder in (args.local_buckets, args.local_gcs_root))
    if os.path.commonpath([buckets, fuse]) in (buckets, fuse):
        parser.error(f"--local-buckets ({args.local_buckets}) and --local-gcs-root ({args.local_gcs_root}) must be "
                     "separate folders: a file written through /gcs/ into the emulator's folder has no object "
                     "metadata, and the emulator then fails to list its bucket")
    if args.command == "tune" and args.service == "keras-tuner" and args.local_output != "local-tuning":
        parser.error("--local-output applies to --service vertex (a KerasTuner search writes into its job dir)")
    if args.restarts < 0 or not (math.isfinite(args.stop_grace) and args.stop_grace >= 0):
        parser.error(f"--restarts and --stop-grace must be 0 or more (and finite), got --restarts {args.restarts}, "
                     f"--stop-grace {args.stop_grace:g}")


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
        machine.accelerator_type = getattr(vertex.AcceleratorType, target.accelerator_type)
        machine.accelerator_count = target.accelerator_count if args.accelerator_count is None else \
            args.accelerator_count
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


def build_job(args, module_args: List[str], package_uri: Optional[str]):
    """The CustomJob or HyperparameterTuningJob message for these arguments (module_args: checked by
    `check_passthrough`)."""
    from google.cloud import aiplatform_v1 as vertex

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = args.display_name or f"mnist-{args.command}-{args.target}-{stamp}"
    keras_tuner = args.command == "tune" and args.service == "keras-tuner"
    module = "tuning.task" if keras_tuner else "trainer.task"
    spec = vertex.CustomJobSpec(worker_pool_specs=worker_pools(args, module, module_args, package_uri),
                                base_output_directory=vertex.GcsDestination(output_uri_prefix=args.job_dir))
    if args.timeout:
        spec.scheduling = vertex.Scheduling(timeout=datetime.timedelta(seconds=args.timeout))
    if args.service_account:
        spec.service_account = args.service_account
    if args.tensorboard:
        spec.tensorboard = args.tensorboard
    if args.command == "train" or keras_tuner:
        return vertex.CustomJob(display_name=name, job_spec=spec)
    dropout = args.dropout_range
    Spec = vertex.StudySpec.ParameterSpec
    if dropout.step:
        grid = Spec.DiscreteValueSpec(values=list(dropout.grid()))
        dropout_values: Dict[str, object] = dict(discrete_value_spec=grid)
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
    """The request body as the API receives it: only the fields it sets (protobuf's JSON form leaves out
    fields at their default, which are not sent either), enums by name."""
    from google.protobuf import json_format

    return json_format.MessageToJson(type(job).pb(job), indent=2)


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


def run_locally(args, job, archive: Optional[str], scratch: str) -> int:
    """The request run here (deploy/local.py): a custom job, or a tuning-service job's trials; a --package job's
    sdist installed first, as its executor image would install it."""
    from deploy.local import Options, run_custom_job
    from deploy.local_storage import gs_for_local_job

    tuning_service = args.command == "tune" and args.service == "vertex"
    prefix = "local tuning job" if tuning_service else "local job"

    def say(message: str) -> None:
        print(f"{prefix}: {message}", flush=True)

    options = Options(args.local_gcs_root, args.restarts, args.stop_grace)
    with gs_for_local_job(args.local_storage, args.local_buckets, job, say) as environ:
        if archive:
            from deploy.local_package import install

            options.python = install(archive, scratch, lambda message: print(f"local job: {message}", flush=True))
        if tuning_service:
            from deploy.local_tuning import run_tuning_job

            return run_tuning_job(job, options, args.local_output, environ)
        return run_custom_job(job, options, environ)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, module_args = parse(argv, os.environ)  # exits 2 on a command-line error
    try:
        package_uri = archive = None
        with tempfile.TemporaryDirectory() as scratch:
            if args.package:
                archive = build_sdist(scratch)
                package_uri = f"{args.staging_bucket.rstrip('/')}/mnist-trainer/{os.path.basename(archive)}"
                if not (args.dry_run or args.local):  # locally the archive is installed, not uploaded
                    from trainer.storage import upload_file
                    upload_file(archive, package_uri)
            job = build_job(args, module_args, package_uri)
            if args.dry_run:
                print(to_json(job))
                return 0
            if args.local:
                return run_locally(args, job, archive, scratch)
        created = submit(args, job)
    except TrainerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        from trainer.errors import unexpected_line

        print(unexpected_line(error, None, "deploy"), file=sys.stderr)
        return 1
    job_id = created.name.rsplit("/", 1)[-1]
    kind = "training" if "customJobs" in created.name else "hyperparameter tuning"
    print(f"submitted {kind} job {created.name}\n"
          f"  console: https://console.cloud.google.com/vertex-ai/locations/{args.region}/"
          f"{'training' if kind == 'training' else 'hyperparameter-tuning'}/{job_id}?project={args.project}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
