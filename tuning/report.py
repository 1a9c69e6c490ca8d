"""After a search: a table of trials, best_hyperparameters.json, search_results.json, a TensorBoard HParams view."""

from __future__ import annotations

import os
from typing import List

from trainer.atomic import write_json
from tuning.space import DROPOUT, as_flags, trial_number

BEST_FILE = "best_hyperparameters.json"
RESULTS_FILE = "search_results.json"


def _trial_rows(tuner) -> list:
    space, base = tuner.hypermodel.space, tuner.hypermodel.base
    rows = []
    for trial_id, trial in tuner.oracle.trials.items():
        hp = trial.hyperparameters.copy()
        flags = as_flags(space.values(hp), base)
        rows.append(dict(trial_id=trial_number(trial_id), status=str(trial.status), val_accuracy=trial.score, **flags))
    return sorted(rows, key=lambda row: (row["val_accuracy"] is None, -(row["val_accuracy"] or 0.0)))


def print_table(rows: list) -> None:
    columns = ["trial_id", "filters", DROPOUT, "dense_units", "learning_rate", "val_accuracy", "status"]
    table = [[str(row[c]) if c != "val_accuracy" or row[c] is None else f"{row[c]:.4f}" for c in columns]
             for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) if table else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_hparams_view(rows: list, log_dir: str) -> None:
    """HParams plugin data: the search's config at logs/, each trial's values in logs/trial_ID."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hparams

    names = ["filters", DROPOUT, "dense_units", "learning_rate", "batch_size"]
    domains = {name: sorted({row[name] for row in rows}) for name in names}
    declared = [hparams.HParam(name, hparams.Discrete(values)) for name, values in domains.items()]
    metrics = [hparams.Metric("epoch_accuracy", group="validation", display_name="val_accuracy"),
               hparams.Metric("epoch_loss", group="validation", display_name="val_loss")]
    with tf.summary.create_file_writer(log_dir).as_default():
        hparams.hparams_config(hparams=declared, metrics=metrics)
    for row in rows:
        with tf.summary.create_file_writer(os.path.join(log_dir, f"trial_{row['trial_id']}")).as_default():
            hparams.hparams({name: row[name] for name in names}, trial_id=str(row["trial_id"]))


def write_results(tuner, space, job_dir: str, retrain: List[str]) -> str:
    """Print the table and write the result files; returns the best_hyperparameters.json path. The closing
    line tells how to train the best configuration: `python -m trainer.task RETRAIN`."""
    import shlex

    rows = _trial_rows(tuner)
    print_table(rows)
    best_trial = tuner.oracle.get_best_trials(1)[0]
    best = as_flags(space.values(best_trial.hyperparameters.copy()), tuner.hypermodel.base)
    best_path = os.path.join(job_dir, BEST_FILE)
    write_json(best_path, best)
    write_json(os.path.join(job_dir, RESULTS_FILE),
                      {"objective": "val_accuracy", "best_trial_id": trial_number(best_trial.trial_id),
                       "best_val_accuracy": best_trial.score, "trials": rows})
    write_hparams_view(rows, os.path.join(job_dir, "logs"))
    print(f"best trial {trial_number(best_trial.trial_id)}: val_accuracy {best_trial.score:.4f}; wrote {best_path}; "
          f"train it with: {shlex.join(['python', '-m', 'trainer.task', *retrain])}", flush=True)
    return best_path
