"""`python -m tuning.task`: KerasTuner search over the trainer's conv filters and dropout.

    python -m tuning.task --tuner random --max-trials 10 --epochs 3 --dataset idx:DIR --job-dir runs/search

The objective is validation accuracy (the test split is touched once, by --retrain). Writes under
--job-dir: the KerasTuner project (keras_tuner/), one folder per trial (trials/), TensorBoard logs with an
HParams view of all trials (logs/), best_hyperparameters.json (trainer flag names: pass it back with
`python -m trainer.task --hparams-file`), search_results.json; with --retrain a normal trainer run in best/.

Distributed search: set KERASTUNER_TUNER_ID / KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT, or run on
Vertex AI, where they are derived from CLUSTER_SPEC (pool 0 the chief oracle, pool 1 the tuner workers).
Exit codes as trainer.task: 0, 2 (command line), 1 (I/O or TensorFlow, one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Mapping, MutableMapping, Optional, Sequence

from trainer.config import PRESETS, Config
from trainer.errors import TrainerError

TUNERS = ("random", "hyperband", "bayesian")
PROJECT = "mnist_cnn"


def _int_list(text: str):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str):
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tuning.task", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    search = parser.add_argument_group("search")
    search.add_argument("--tuner", choices=TUNERS, default="random")
    search.add_argument("--max-trials", type=int, default=None,
                        help="trials for random and bayesian (default 10); hyperband is bounded by --max-epochs")
    search.add_argument("--max-epochs", type=int, default=None, help="hyperband: epochs of its longest trial (default 9)")
    search.add_argument("--hyperband-factor", type=int, default=3)
    search.add_argument("--epochs", type=int, default=3, help="epochs per trial (random, bayesian)")
    search.add_argument("--blocks", type=int, default=2, help="conv blocks; each block's filters are searched")
    search.add_argument("--filter-choices", type=_int_list, default=(16, 32, 64))
    search.add_argument("--dropout-range", default="0.1:0.6:0.1", help="MIN:MAX:STEP")
    search.add_argument("--dense-units-choices", type=_int_list, default=(), help="search dense units too")
    search.add_argument("--learning-rate-choices", type=_float_list, default=(), help="search the learning rate too")
    search.add_argument("--resume", action="store_true", help="continue the search already in --job-dir")
    search.add_argument("--overwrite", action="store_true", help="delete the search already in --job-dir")
    search.add_argument("--retrain", action="store_true",
                        help="train the best configuration with the trainer and export it to JOB_DIR/best")
    search.add_argument("--retrain-epochs", type=int, default=None, help="default: the preset's epochs")

    data = parser.add_argument_group("data and fixed settings (as trainer.task)")
    data.add_argument("--dataset", default="mnist")
    data.add_argument("--data-dir", default=None)
    data.add_argument("--train-limit", type=int, default=None)
    data.add_argument("--validation-fraction", type=float, default=0.1)
    data.add_argument("--preset", choices=sorted(PRESETS), default="default")
    data.add_argument("--batch-size", type=int, default=None)
    data.add_argument("--learning-rate", type=float, default=None)
    data.add_argument("--dense-units", type=int, default=None)
    data.add_argument("--seed", type=int, default=42)
    data.add_argument("--job-dir", required=True, help="local folder, shared by all workers of a distributed search")
    return parser


def parse(argv: Optional[Sequence[str]]):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tuner == "hyperband" and args.max_trials is not None:
        parser.error("--max-trials does not apply to --tuner hyperband: bound it with --max-epochs "
                     "(and --hyperband-factor)")
    if args.tuner != "hyperband" and args.max_epochs is not None:
        parser.error("--max-epochs applies to --tuner hyperband only; use --epochs for trial length")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    try:
        low, high, step = (float(v) for v in args.dropout_range.split(":"))
    except ValueError:
        parser.error(f"--dropout-range: expected MIN:MAX:STEP such as 0.1:0.6:0.1, got {args.dropout_range!r}")
    if not (0 <= low < high < 1 and step > 0):
        parser.error(f"--dropout-range: need 0 <= MIN < MAX < 1 and STEP > 0, got {args.dropout_range}")
    for name in ("max_trials", "max_epochs", "epochs", "blocks", "retrain_epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    from tuning.hypermodel import SearchSpace

    space = SearchSpace(blocks=args.blocks, filter_choices=args.filter_choices, dropout_min=low, dropout_max=high,
                        dropout_step=step, dense_units_choices=args.dense_units_choices,
                        learning_rate_choices=args.learning_rate_choices)
    preset = dict(PRESETS[args.preset])
    for key in ("batch_size", "learning_rate", "dense_units"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    preset["epochs"] = args.epochs
    try:
        base = Config(job_dir=args.job_dir, dataset=args.dataset, data_dir=args.data_dir, train_limit=args.train_limit,
                      validation_fraction=args.validation_fraction, seed=args.seed, preset=args.preset,
                      strategy="default", **preset)
    except ValueError as error:
        parser.error(str(error))
    return args, space, base


def distributed_environment(environ: Mapping[str, str]) -> dict:
    """KERASTUNER_* variables derived from Vertex AI's CLUSTER_SPEC (pool 0 chief oracle, pool 1 workers)."""
    if "KERASTUNER_ORACLE_IP" in environ or not environ.get("CLUSTER_SPEC"):
        return {}
    spec = json.loads(environ["CLUSTER_SPEC"])
    cluster, task = spec.get("cluster", {}), spec.get("task", {})
    chief = (cluster.get("workerpool0") or [None])[0]
    if not chief or not cluster.get("workerpool1"):
        return {}
    host, _, port = chief.rpartition(":")
    tuner_id = "chief" if task.get("type") == "workerpool0" else f"tuner{int(task.get('index', 0))}"
    return {"KERASTUNER_TUNER_ID": tuner_id, "KERASTUNER_ORACLE_IP": host, "KERASTUNER_ORACLE_PORT": port or "2222"}


def make_tuner(args, hypermodel, project_dir: str, overwrite: bool):
    import keras_tuner as kt

    common = dict(objective=kt.Objective("val_accuracy", direction="max"), seed=args.seed,
                  directory=os.path.dirname(project_dir), project_name=os.path.basename(project_dir),
                  overwrite=overwrite)
    if args.tuner == "random":
        base, extra = kt.RandomSearch, dict(max_trials=args.max_trials or 10)
    elif args.tuner == "bayesian":
        try:
            import scipy  # noqa: F401
            import sklearn  # noqa: F401
        except ModuleNotFoundError:
            raise TrainerError("--tuner bayesian needs scipy and scikit-learn: "
                               "pip install 'mnist-trainer[bayesian]'") from None
        base, extra = kt.BayesianOptimization, dict(max_trials=args.max_trials or 10)
    else:
        base, extra = kt.Hyperband, dict(max_epochs=args.max_epochs or 9, factor=args.hyperband_factor)

    class Tuner(base):
        def run_trial(self, trial, *fit_args, **fit_kwargs):  # trial folders are named by id
            return super().run_trial(trial, *fit_args, trial_id=trial.trial_id, **fit_kwargs)

    return Tuner(hypermodel, **common, **extra)


def run(argv: Optional[Sequence[str]], environ: MutableMapping[str, str]) -> int:
    args, space, base = parse(argv)  # exits 2 on a command-line error
    environ.update(distributed_environment(environ))
    # KerasTuner's own convention (its public variables): the tuner whose id contains "chief" runs the oracle.
    distributed = "KERASTUNER_ORACLE_IP" in environ
    is_chief = not distributed or "chief" in environ.get("KERASTUNER_TUNER_ID", "")
    job_dir = os.path.abspath(args.job_dir)
    project_dir = os.path.join(job_dir, "keras_tuner", PROJECT)
    if is_chief and os.path.exists(os.path.join(project_dir, "oracle.json")) and not (args.resume or args.overwrite):
        raise TrainerError(f"--job-dir {args.job_dir}: a search already exists there ({project_dir}); pass "
                           "--resume to continue it, --overwrite to start over, or choose another --job-dir")
    os.makedirs(job_dir, exist_ok=True)

    from trainer import data as data_lib
    from tuning import report
    from tuning.hypermodel import TrainerHyperModel

    splits = data_lib.load_splits(base)  # once, shared by every trial of this process
    hypermodel = TrainerHyperModel(base, space, splits, job_dir)
    tuner = make_tuner(args, hypermodel, project_dir, overwrite=args.overwrite and is_chief)
    tuner.search()
    if not is_chief:
        return 0
    best = report.write_results(tuner, space, job_dir)
    if args.retrain:
        from trainer import task as trainer_task

        retrain = ["--hparams-file", best, "--dataset", base.dataset, "--preset", base.preset, "--seed",
                   str(base.seed), "--validation-fraction", str(base.validation_fraction),
                   "--job-dir", os.path.join(job_dir, "best"), "--no-resume"]
        retrain += ["--epochs", str(args.retrain_epochs or PRESETS[base.preset]["epochs"])]
        retrain += ["--data-dir", base.data_dir] if base.data_dir else []
        retrain += ["--train-limit", str(base.train_limit)] if base.train_limit else []
        print(f"retraining the best configuration: python -m trainer.task {' '.join(retrain)}", flush=True)
        return trainer_task.main(retrain)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return run(argv, os.environ)
    except TrainerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
