"""`python -m tuning.task`: KerasTuner search over the trainer's conv filters and dropout.

    python -m tuning.task --tuner random --max-trials 10 --epochs 3 --dataset idx:DIR --job-dir runs/search

The objective is validation accuracy (the test split is touched once, by --retrain). Writes under
--job-dir: the KerasTuner project (keras_tuner/), one folder per trial (trials/), TensorBoard logs with an
HParams view of all trials (logs/), best_hyperparameters.json (trainer flag names: pass it back with
`python -m trainer.task --hparams-file`), search_results.json; with --retrain a normal trainer run in best/.

A search records its settings in search_settings.json when it starts; --resume with other ones is
refused (exit 1) with one line naming each difference, and nothing in the folder changes. Every argument
and the look for an existing search are checked before TensorFlow or KerasTuner is imported.

Distributed search: set KERASTUNER_TUNER_ID / KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT, or run on
Vertex AI, where they are derived from CLUSTER_SPEC (pool 0 the chief oracle, pool 1 the tuner workers).
Exit codes as trainer.task: 0, 2 (command line), 1 (I/O or TensorFlow, one line on stderr).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from typing import List, Mapping, MutableMapping, Optional, Sequence

from trainer.atomic import read_regular_file
from trainer.config import MAX_CLUSTER_WAIT, MAX_EPOCHS, PRESETS, Config, HelpFormatter, image_size_flag
from trainer.errors import Interrupted, TrainerError
from tuning.space import SearchSpace, as_flags, dropout_range, trial_number

TUNERS = ("random", "hyperband", "bayesian")
PROJECT = "mnist_cnn"
HYPERBAND_MAX_EPOCHS = 9
MAX_SEARCH_TRIALS = 1_000_000
MAX_BLOCKS = 16  # far more conv blocks than 28x28 images take (each at least halves the feature map)
SETTINGS_FILE = "search_settings.json"
# What a search writes in its job dir (--overwrite deletes exactly these; best/ is a normal trainer run).
SEARCH_OUTPUTS = ("keras_tuner", "trials", "logs", SETTINGS_FILE, "best_hyperparameters.json",
                  "search_results.json")


def _int_list(text: str):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str):
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(value) and value > 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive finite numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tuning.task", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    search = parser.add_argument_group("search")
    search.add_argument("--tuner", choices=TUNERS, default="random", help="KerasTuner's search algorithm")
    search.add_argument("--max-trials", type=int, default=None,
                        help="trials for random and bayesian (default: 10); hyperband is bounded by --max-epochs")
    search.add_argument("--max-epochs", type=int, default=None,
                        help="hyperband: epochs of its longest trial (default: 9)")
    search.add_argument("--hyperband-factor", type=int, default=None,
                        help="hyperband: each bracket keeps 1/FACTOR of its trials for the next round (default: 3)")
    search.add_argument("--epochs", type=int, default=None,
                        help="epochs per trial (random, bayesian; default: 3); hyperband sets its own")
    search.add_argument("--blocks", type=int, default=2, help="conv blocks; each block's filters are searched")
    search.add_argument("--filter-choices", type=_int_list, default=(16, 32, 64),
                        help="filter counts each block chooses from (default: 16,32,64)")
    search.add_argument("--dropout-range", type=dropout_range, default="0.1:0.6:0.1",
                        help="MIN:MAX[:STEP]: dropout rates on a grid of STEP, or continuous without one")
    search.add_argument("--dense-units-choices", type=_int_list, default=(),
                        help="comma list: search the dense layer's units too (default: the preset's)")
    search.add_argument("--learning-rate-choices", type=_float_list, default=(),
                        help="comma list: search the learning rate too (default: the preset's)")
    search.add_argument("--cluster-wait", type=float, default=600.0, metavar="SECONDS",
                        help="distributed search: how long a tuner worker waits for the chief's oracle to answer "
                             "(0: forever)")
    search.add_argument("--resume", action="store_true",
                        help="continue the search already in --job-dir (refused if its settings differ)")
    search.add_argument("--overwrite", action="store_true", help="delete the search already in --job-dir")
    search.add_argument("--retrain", action="store_true",
                        help="train the best configuration with the trainer and export it to JOB_DIR/best")
    search.add_argument("--retrain-epochs", type=int, default=None,
                        help="epochs of the retraining (default: the preset's epochs)")

    data = parser.add_argument_group("data and fixed settings (as trainer.task)")
    data.add_argument("--dataset", default="mnist", help="a TFDS name, idx:FOLDER or folder:DIR, as trainer.task")
    data.add_argument("--data-dir", default=None, help="TFDS data folder (default: TFDS's own)")
    data.add_argument("--image-size", type=image_size_flag, default=None, metavar="H[xW]",
                      help="folder: only: the size images are resized to (default: the most common one)")
    data.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                      help="mirror training images while augmenting (default: by the data, as trainer.task)")
    data.add_argument("--train-limit", type=int, default=None,
                      help="use at most this many training examples (default: all)")
    data.add_argument("--validation-fraction", type=float, default=0.1,
                      help="share of the training split held out to score trials")
    data.add_argument("--preset", choices=sorted(PRESETS), default="default",
                      help="the recipe trials start from; the search replaces filters and dropout")
    data.add_argument("--batch-size", type=int, default=None, help="global batch size (default: from --preset)")
    data.add_argument("--learning-rate", type=float, default=None, help="Adam's learning rate (default: from --preset)")
    data.add_argument("--dense-units", type=int, default=None,
                      help="units of the hidden dense layer (default: from --preset)")
    data.add_argument("--seed", type=int, default=42, help="seeds the tuner, the split and every trial")
    data.add_argument("--job-dir", required=True,
                      help="local folder, shared by all workers of a distributed search (on Vertex AI the "
                           "Cloud Storage mount /gcs/BUCKET/...; gs:// URLs are refused)")
    return parser


def _check_tuner_options(parser: argparse.ArgumentParser, args) -> None:
    """Options of one tuner given to another are refused (never silently ignored); then the defaults."""
    if args.tuner == "hyperband" and args.max_trials is not None:
        parser.error("--max-trials does not apply to --tuner hyperband: bound it with --max-epochs "
                     "(and --hyperband-factor)")
    if args.tuner != "hyperband" and args.max_epochs is not None:
        parser.error("--max-epochs applies to --tuner hyperband only; use --epochs for trial length")
    if args.tuner != "hyperband" and args.hyperband_factor is not None:
        parser.error(f"--hyperband-factor applies to --tuner hyperband only, not --tuner {args.tuner}")
    if args.tuner == "hyperband" and args.epochs is not None:
        parser.error("--epochs does not apply to --tuner hyperband: it sets each trial's epochs itself, up to "
                     "--max-epochs")
    args.epochs = 3 if args.epochs is None else args.epochs
    args.hyperband_factor = 3 if args.hyperband_factor is None else args.hyperband_factor


def parse(argv: Optional[Sequence[str]]):
    """Every command-line check, without TensorFlow or KerasTuner; exits 2 (argparse style) on an error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_tuner_options(parser, args)
    if not (math.isfinite(args.cluster_wait) and 0 <= args.cluster_wait <= MAX_CLUSTER_WAIT):
        parser.error(f"--cluster-wait must be in [0, {MAX_CLUSTER_WAIT}] seconds (0: wait forever), got "
                     f"{args.cluster_wait:g}")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if not args.job_dir.strip():
        parser.error("--job-dir is empty; name the search's folder")
    if args.job_dir.startswith("gs://"):
        parser.error(f"--job-dir {args.job_dir}: KerasTuner needs a folder all workers share, not a gs:// URL; "
                     f"on Vertex AI pass the Cloud Storage mount {gcs_mount(args.job_dir)} (deploy.vertex tune "
                     "--service keras-tuner does)")
    for name, maximum in (("max_trials", MAX_SEARCH_TRIALS), ("max_epochs", MAX_EPOCHS), ("epochs", MAX_EPOCHS),
                          ("blocks", MAX_BLOCKS), ("retrain_epochs", MAX_EPOCHS), ("hyperband_factor", MAX_EPOCHS)):
        value = getattr(args, name)
        minimum = 2 if name == "hyperband_factor" else 1
        if value is not None and not minimum <= value <= maximum:
            parser.error(f"--{name.replace('_', '-')} must be in [{minimum}, {maximum:,}], got {value}")
    space = SearchSpace(blocks=args.blocks, filter_choices=args.filter_choices, dropout=args.dropout_range,
                        dense_units_choices=args.dense_units_choices,
                        learning_rate_choices=args.learning_rate_choices)
    preset = dict(PRESETS[args.preset])
    for key in ("batch_size", "learning_rate", "dense_units"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    preset["epochs"] = args.epochs
    try:
        base = Config(job_dir=args.job_dir, dataset=args.dataset, data_dir=args.data_dir, train_limit=args.train_limit,
                      validation_fraction=args.validation_fraction, seed=args.seed, preset=args.preset,
                      strategy="default", image_size=args.image_size, flip=args.flip, **preset)
    except ValueError as error:
        parser.error(str(error))
    from trainer.data import known_image_size

    size = known_image_size(base.dataset)
    if size is not None:  # else checked once the data is loaded
        try:
            check_blocks(args.blocks, base, size)
        except TrainerError as error:
            parser.error(str(error))
    return args, space, base


def check_blocks(blocks: int, base: Config, size) -> None:
    """A TrainerError when --blocks conv blocks do not fit images of `size` (height, width)."""
    from trainer.model import feature_map_sizes

    try:
        feature_map_sizes((1,) * blocks, tuple(size), convs_per_block=base.convs_per_block, padding=base.padding)
    except TrainerError:
        raise TrainerError(f"--blocks {blocks}: too many conv blocks for {size[0]}x{size[1]} images with --preset "
                           f"{base.preset} (--convs-per-block {base.convs_per_block}, --padding {base.padding})"
                           ) from None


def gcs_mount(url: str) -> str:
    """gs://BUCKET/path as Vertex AI jobs see it through Cloud Storage FUSE: /gcs/BUCKET/path."""
    return "/gcs/" + url[len("gs://"):]


def search_settings(args, space: SearchSpace, base: Config) -> dict:
    """What makes two searches comparable: the data, the fixed settings, the space, the tuner and its
    options, the trial length. Keys are flag names. --max-trials is the budget, so it is not here: a
    resumed random or bayesian search may be given more trials."""
    settings = {"--dataset": base.dataset, "--train-limit": base.train_limit,
                "--validation-fraction": base.validation_fraction, "--seed": base.seed, "--preset": base.preset,
                "--batch-size": base.batch_size, "--learning-rate": base.learning_rate,
                "--dense-units": base.dense_units, "--blocks": space.blocks,
                "--filter-choices": list(space.filter_choices), "--dropout-range": str(space.dropout),
                "--dense-units-choices": list(space.dense_units_choices),
                "--learning-rate-choices": list(space.learning_rate_choices), "--tuner": args.tuner}
    for flag, value in (("--image-size", base.image_size), ("--flip", base.flip)):
        if value is not None:  # recorded only when given, so searches made before these flags still compare
            settings[flag] = list(value) if isinstance(value, tuple) else value
    if args.tuner == "hyperband":
        settings.update({"--max-epochs": args.max_epochs or HYPERBAND_MAX_EPOCHS,
                         "--hyperband-factor": args.hyperband_factor})
    else:
        settings["--epochs"] = base.epochs
    return settings


def settings_differences(saved: dict, wanted: dict) -> list:
    """`--flag old -> new` for every setting both record that differs (settings of one tuner only, such as
    --max-epochs, are covered by the --tuner difference)."""
    def shown(value):
        if value is None:
            return "(unset)"
        if isinstance(value, list):
            return ",".join(map(str, value)) or "(none)"
        return str(value)

    return [f"{key} {shown(saved[key])} -> {shown(value)}" for key, value in wanted.items()
            if key in saved and saved[key] != value]


def distributed_environment(environ: Mapping[str, str]) -> dict:
    """KERASTUNER_* variables derived from Vertex AI's CLUSTER_SPEC (pool 0 chief oracle, pool 1 workers)."""
    if "KERASTUNER_ORACLE_IP" in environ or not environ.get("CLUSTER_SPEC"):
        return {}
    from trainer.distribute import check_cluster_shape

    try:
        spec = json.loads(environ["CLUSTER_SPEC"])
    except ValueError as error:
        raise TrainerError(f"CLUSTER_SPEC is not valid JSON ({error})") from None
    check_cluster_shape(spec, "CLUSTER_SPEC")
    cluster, task = spec.get("cluster", {}), spec.get("task", {})
    chief = (cluster.get("workerpool0") or [None])[0]
    if not chief or not cluster.get("workerpool1"):
        return {}
    host, _, port = chief.rpartition(":")
    tuner_id = "chief" if task.get("type") == "workerpool0" else f"tuner{int(task.get('index', 0))}"
    return {"KERASTUNER_TUNER_ID": tuner_id, "KERASTUNER_ORACLE_IP": host, "KERASTUNER_ORACLE_PORT": port or "2222"}


def wait_for_oracle(environ: Mapping[str, str], wait_seconds: float, log=print) -> None:
    """A tuner worker's wait for the chief's oracle (KERASTUNER_ORACLE_IP:PORT) to accept connections, at most
    `wait_seconds` (0: forever); KerasTuner's own client would wait silently with no limit."""
    import socket
    import time

    host, port = environ.get("KERASTUNER_ORACLE_IP", ""), environ.get("KERASTUNER_ORACLE_PORT", "")
    if not port.isdigit():
        raise TrainerError(f"KERASTUNER_ORACLE_PORT {port!r} is not a port number")
    what = f"the oracle at {host}:{port} (KERASTUNER_ORACLE_IP/PORT, run by the chief tuner)"
    started = time.monotonic()
    next_report = started + 10
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
            return
        except OSError:
            pass
        now = time.monotonic()
        if wait_seconds and now - started >= wait_seconds:
            raise TrainerError(f"{what} did not answer within {wait_seconds:g} s (--cluster-wait); check that the "
                               "chief runs, or raise --cluster-wait")
        if now >= next_report:
            log(f"waiting for {what} ({now - started:.0f} s)", flush=True)
            next_report = now + 30
        time.sleep(0.5)


def make_tuner(args, hypermodel, project_dir: str):
    import keras_tuner as kt

    ended = (kt.engine.trial.TrialStatus.COMPLETED, kt.engine.trial.TrialStatus.FAILED)
    common = dict(objective=kt.Objective("val_accuracy", direction="max"), seed=args.seed,
                  directory=os.path.dirname(project_dir), project_name=os.path.basename(project_dir),
                  overwrite=False)  # --overwrite empties the folder first: KerasTuner's own would race workers
    if args.tuner == "random":
        base, extra = kt.RandomSearch, dict(max_trials=args.max_trials or 10)
    elif args.tuner == "bayesian":
        base, extra = kt.BayesianOptimization, dict(max_trials=args.max_trials or 10)
    else:
        base, extra = kt.Hyperband, dict(max_epochs=args.max_epochs or HYPERBAND_MAX_EPOCHS,
                                         factor=args.hyperband_factor)

    def run_trial(self, trial, *fit_args, **fit_kwargs):  # trial folders are named by id
        return base.run_trial(self, trial, *fit_args, trial_id=trial.trial_id, **fit_kwargs)

    def reload(self):
        """KerasTuner's oracle saves oracle.json before it takes an ended trial off its list of running ones, and a
        distributed search's chief saves nothing after that: its oracle.json names the last trial as still
        running, and a reload queues it to run again. Trials that ended (trial.json says so) are not rerun."""
        base.reload(self)
        queue = getattr(self.oracle, "_retry_queue", None)
        if queue:
            queue[:] = [trial_id for trial_id in queue if self.oracle.trials[trial_id].status not in ended]

    Tuner = type("Tuner", (base,), {"run_trial": run_trial, "reload": reload})

    return Tuner(hypermodel, **common, **extra)


# What only a trainer run writes at the top of its job dir (a search's own runs live in best/ and trials/).
TRAINER_RUN_FILES = ("metrics.json", "model_summary.txt", "checkpoints", "model", "plots")


def trainer_run_files(job_dir: str) -> List[str]:
    """The trainer-run outputs at the top of `job_dir` (empty for a search's folder or a new one)."""
    return [name + ("/" if os.path.isdir(os.path.join(job_dir, name)) else "") for name in TRAINER_RUN_FILES
            if os.path.lexists(os.path.join(job_dir, name))]


def check_project_files(job_dir_flag: str, project_dir: str) -> None:
    """The KerasTuner files a resumed search reloads (oracle.json, each trial's trial.json) are whole JSON
    objects: a file cut short (a disk that filled, a copy interrupted) is named here, before TensorFlow loads."""
    import glob

    for path in [os.path.join(project_dir, "oracle.json"),
                 *sorted(glob.glob(os.path.join(project_dir, "trial_*", "trial.json")))]:
        try:
            valid = isinstance(json.loads(read_regular_file(path, f"--job-dir {job_dir_flag}: {path}").decode("utf-8")),
                               dict)
        except (OSError, ValueError):
            valid = False
        if not valid:
            raise TrainerError(f"--job-dir {job_dir_flag}: {path} is damaged (not a whole JSON object), so the "
                               "search cannot be resumed; --overwrite starts it over, or choose another --job-dir")


def check_job_dir(args, settings: dict, job_dir: str) -> None:
    """The chief's look at --job-dir before anything heavy is imported: an existing search is reused only
    with --resume and the same settings (else nothing there changes), or deleted with --overwrite. A folder
    holding the names a search writes (logs/, trials/...) but no search (neither search_settings.json nor
    oracle.json) is refused untouched: those files are someone else's."""
    import shutil

    project_dir = os.path.join(job_dir, "keras_tuner", PROJECT)
    settings_path = os.path.join(job_dir, SETTINGS_FILE)
    found = trainer_run_files(job_dir)
    if found:
        raise TrainerError(f"--job-dir {args.job_dir}: holds a trainer run ({', '.join(found)}), not a search; "
                           "a search needs a folder of its own: choose another --job-dir (nothing there was changed)")
    exists = os.path.exists(os.path.join(project_dir, "oracle.json"))
    named = [name + ("/" if os.path.isdir(os.path.join(job_dir, name)) else "") for name in SEARCH_OUTPUTS
             if os.path.lexists(os.path.join(job_dir, name))]
    if named and not (exists or os.path.lexists(settings_path)):
        raise TrainerError(f"--job-dir {args.job_dir}: holds {', '.join(named)} but no search (no {SETTINGS_FILE} or "
                           f"keras_tuner/{PROJECT}/oracle.json), files a search would mix with its own or, with "
                           "--overwrite, delete; choose another --job-dir (nothing there was changed)")
    if exists and not (args.resume or args.overwrite):
        raise TrainerError(f"--job-dir {args.job_dir}: a search already exists there ({project_dir}); pass "
                           "--resume to continue it, --overwrite to start over, or choose another --job-dir")
    if exists and args.resume:
        check_project_files(args.job_dir, project_dir)
        try:
            saved = json.loads(read_regular_file(settings_path, settings_path).decode("utf-8"))
        except FileNotFoundError:
            saved = None  # made before searches recorded their settings: nothing to compare
            print(f"note: {settings_path} is missing, so the search's settings cannot be checked; "
                  "recording the current ones", file=sys.stderr)
        except (OSError, ValueError) as error:
            raise TrainerError(f"{settings_path}: cannot read the search's settings ({error})") from None
        differences = settings_differences(saved, settings) if saved is not None else []
        if differences:
            raise TrainerError(f"--job-dir {args.job_dir}: the search there was made with other settings "
                               f"({'; '.join(differences)}); pass the same ones to resume it, --overwrite to "
                               "start over, or choose another --job-dir")
    if args.overwrite:
        for name in SEARCH_OUTPUTS:
            path = os.path.join(job_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(job_dir, exist_ok=True)
    from trainer.atomic import write_json

    write_json(settings_path, settings)


def quiet_cross_trial_retracing() -> None:
    """Every trial builds a new model, so the trainer's step functions are new `tf.function`s each time
    and each is traced once (tests/test_tuning.py counts it); TensorFlow's retracing detector keys on the
    Python code, not the function object, and so warns about tracing across trials. Drop that warning."""
    import logging

    class DropRetracing(logging.Filter):
        def filter(self, record):
            return "triggered tf.function retracing" not in record.getMessage()

    logging.getLogger("tensorflow").addFilter(DropRetracing())


def plain_keras_tuner_output() -> None:
    """KerasTuner takes any process that has IPython installed for a notebook and then "clears the cell"
    with terminal escape codes; outside IPython it means to print a blank line."""
    from keras_tuner.src import utils

    try:
        import IPython

        in_ipython = IPython.get_ipython() is not None
    except ImportError:
        in_ipython = False
    if not in_ipython:
        utils.IS_NOTEBOOK = False


def show_trial_values(tuner, space: SearchSpace, base: Config) -> None:
    """KerasTuner prints each trial's raw hyperparameters (with Hyperband's 0-based `tuner/trial_id`);
    print them as trainer flags instead, with trial numbers as KerasTuner prints them ("Trial #1")."""
    display = getattr(tuner.oracle, "_display", None)
    if display is None:  # a worker of a distributed search: the chief's oracle prints
        return

    def show(trial):
        hp = trial.hyperparameters
        flags = as_flags(space.values(hp.copy()), base)
        searched = ["filters", "dropout"] + [name for name, choices in (
            ("dense_units", space.dense_units_choices), ("learning_rate", space.learning_rate_choices)) if choices]
        line = "  ".join(f"--{name.replace('_', '-')} {flags[name]}" for name in searched)
        if "tuner/trial_id" in hp.values:
            line += (f"  (hyperband: continues trial {trial_number(hp.values['tuner/trial_id'])} for epochs "
                     f"{hp.values['tuner/initial_epoch'] + 1}-{hp.values['tuner/epochs']})")
        elif "tuner/epochs" in hp.values:
            line += f"  (hyperband: {hp.values['tuner/epochs']} epochs)"
        print(line)

    display.show_hyperparameter_table = show


def run(argv: Optional[Sequence[str]], environ: MutableMapping[str, str]) -> int:
    args, space, base = parse(argv)  # exits 2 on a command-line error
    from trainer.storage import deadline_problem

    problem = deadline_problem(environ)  # here, not in parse: deploy.vertex checks a remote job's flags with parse
    if problem:  # a search can read an idx:gs:// dataset
        build_parser().error(problem)
    environ.update(distributed_environment(environ))
    # KerasTuner's own convention (its public variables): the tuner whose id contains "chief" runs the oracle.
    distributed = "KERASTUNER_ORACLE_IP" in environ
    is_chief = not distributed or "chief" in environ.get("KERASTUNER_TUNER_ID", "")
    if args.tuner == "bayesian" and not all(importlib.util.find_spec(name) for name in ("scipy", "sklearn")):
        raise TrainerError("--tuner bayesian needs scipy and scikit-learn: pip install 'mnist-trainer[bayesian]'")
    job_dir = os.path.abspath(args.job_dir)
    project_dir = os.path.join(job_dir, "keras_tuner", PROJECT)
    try:
        os.makedirs(job_dir, exist_ok=True)
    except OSError as error:
        raise TrainerError(f"--job-dir {args.job_dir}: cannot make the folder ({error.strerror})") from None
    if distributed and not is_chief:
        wait_for_oracle(environ, args.cluster_wait)
    lock = None
    if is_chief:  # one search per job dir: the job dir is checked (and --overwrite applied) under the lock
        from trainer import joblock

        lock = joblock.acquire(job_dir)
    try:
        if is_chief:
            check_job_dir(args, search_settings(args, space, base), job_dir)
        return _search(args, space, base, job_dir, project_dir, is_chief)
    finally:
        if lock is not None:
            lock.release()


def _search(args, space, base, job_dir: str, project_dir: str, is_chief: bool) -> int:
    from trainer.errors import require_tensorflow

    require_tensorflow()
    quiet_cross_trial_retracing()
    plain_keras_tuner_output()
    from trainer import data as data_lib
    from tuning import report
    from tuning.hypermodel import TrainerHyperModel

    splits = data_lib.load_splits(base)  # once, shared by every trial of this process
    check_blocks(space.blocks, base, splits.shape[:2])
    hypermodel = TrainerHyperModel(base, space, splits, job_dir)
    tuner = make_tuner(args, hypermodel, project_dir)
    show_trial_values(tuner, space, base)
    tuner.search()
    if not is_chief:
        return 0
    retrain = retrain_argv(base, os.path.join(job_dir, report.BEST_FILE), job_dir, args.retrain_epochs)
    report.write_results(tuner, space, job_dir, retrain)
    if args.retrain:
        import shlex

        from trainer import task as trainer_task

        print(f"retraining the best configuration: {shlex.join(['python', '-m', 'trainer.task', *retrain])}",
              flush=True)
        return trainer_task.main(retrain)
    return 0


def retrain_argv(base, best_path: str, job_dir: str, epochs: Optional[int]) -> List[str]:
    """`python -m trainer.task` arguments that train the best configuration on the search's data, its
    settings and seed, for `epochs` (default: the preset's), into JOB_DIR/best: what --retrain runs and
    what the search's closing line tells to run."""
    from trainer.config import RECIPE, command_flags

    # The recipe comes from the file; the search's own strategy (one process per trial) is not the run's.
    data = command_flags(base, base.preset, skip=("strategy", *RECIPE))
    return ["--hparams-file", best_path, *data, "--epochs", str(epochs or PRESETS[base.preset]["epochs"]),
            "--job-dir", os.path.join(job_dir, "best"), "--no-resume"]


def _job_dir_given(argv: Optional[Sequence[str]]) -> Optional[str]:
    """--job-dir's value as written on the command line (for where an unexpected fault's traceback goes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for index, token in enumerate(argv):
        if token == "--job-dir" and index + 1 < len(argv):
            return argv[index + 1]
        if token.startswith("--job-dir="):
            return token.split("=", 1)[1]
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from trainer.errors import guard_stdout, unexpected_line

    guard_stdout()
    try:
        return run(argv, os.environ)
    except TrainerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        print(unexpected_line(error, _job_dir_given(argv), "tuning"), file=sys.stderr)
        return 1
    except Interrupted as stop:
        print(f"search stopped by {'SIGTERM' if stop.exit_code == 143 else 'interrupt'}; continue it with the same "
              "command and --resume (finished trials are kept)", file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
