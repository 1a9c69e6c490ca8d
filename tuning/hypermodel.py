"""A KerasTuner HyperModel whose trials are trainer runs.

`build(hp)` goes through `trainer.model.build_model`; `fit` runs the trainer's own loop, data pipeline and
(single-worker) strategy with the trial's values, and drives the callbacks KerasTuner passes in
(`set_model`, `on_epoch_end` with `val_accuracy`), so `get_best_models` and Hyperband work.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Tuple

import keras_tuner as kt

from trainer.config import Config

# Hyperparameter names are the trainer's flag names, so best values can be passed straight back.
FILTERS, DROPOUT, DENSE_UNITS, LEARNING_RATE = "filters", "dropout", "dense_units", "learning_rate"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Filters per conv block chosen from `filter_choices`; dropout on a grid; optional extras."""

    blocks: int = 2
    filter_choices: Tuple[int, ...] = (16, 32, 64)
    dropout_min: float = 0.1
    dropout_max: float = 0.6
    dropout_step: float = 0.1
    dense_units_choices: Tuple[int, ...] = ()  # empty: not searched
    learning_rate_choices: Tuple[float, ...] = ()  # empty: not searched

    def values(self, hp: kt.HyperParameters) -> dict:
        """Declare (on first use) and read this space's values for one trial, as trainer settings."""
        filters = tuple(hp.Choice(f"filters_{block}", list(self.filter_choices)) for block in range(1, self.blocks + 1))
        values = {FILTERS: filters,
                  DROPOUT: round(hp.Float(DROPOUT, self.dropout_min, self.dropout_max, step=self.dropout_step), 4)}
        if self.dense_units_choices:
            values[DENSE_UNITS] = hp.Choice(DENSE_UNITS, list(self.dense_units_choices))
        if self.learning_rate_choices:
            values[LEARNING_RATE] = hp.Choice(LEARNING_RATE, list(self.learning_rate_choices))
        return values


def as_flags(values: dict, base: Config) -> dict:
    """A trial's full model settings as trainer flag values (JSON-friendly; filters as `--filters` takes them)."""
    flags = {"batch_size": base.batch_size, "learning_rate": base.learning_rate, "dense_units": base.dense_units,
             **values}
    flags[FILTERS] = ",".join(map(str, values[FILTERS]))
    return flags


class TrainerHyperModel(kt.HyperModel):
    """Trials are trainer runs: same model code, same loop, same data splits (loaded once)."""

    def __init__(self, base: Config, space: SearchSpace, splits, job_dir: str, log=print):
        super().__init__(name="mnist_cnn")
        self.base, self.space, self.splits, self.job_dir, self.log = base, space, splits, job_dir, log

    def trial_config(self, hp: kt.HyperParameters, epochs: Optional[int] = None, trial_id: str = "") -> Config:
        """The trainer settings of one trial: JOB_DIR/trials/trial_ID, TensorBoard runs in JOB_DIR/logs/trial_ID."""
        name = f"trial_{trial_id or 'build'}"
        return dataclasses.replace(self.base, **self.space.values(hp), epochs=epochs or self.base.epochs,
                                   job_dir=os.path.join(self.job_dir, "trials", name), model_dir="",
                                   log_dir=os.path.join(self.job_dir, "logs", name), checkpoint_dir="",
                                   resume=False, strategy="default", hypertune=False)

    def build(self, hp):
        from trainer.model import build_model

        return build_model(self.trial_config(hp))

    def fit(self, hp, model, *args, callbacks: Sequence = (), epochs: Optional[int] = None, initial_epoch: int = 0,
            trial_id: str = "", **kwargs):
        import tensorflow as tf

        from trainer.distribute import Resolved
        from trainer.observers import KerasCallbacks
        from trainer.train import train_and_evaluate

        # Hyperband continues an earlier trial: its weights are in `model`; run the remaining epochs.
        continued = "tuner/trial_id" in hp.values
        run_epochs = (epochs or self.base.epochs) - (initial_epoch if continued else 0)
        config = self.trial_config(hp, epochs=max(1, run_epochs), trial_id=trial_id)
        resolved = Resolved(tf.distribute.get_strategy(), "default")  # one trial, one worker
        result = train_and_evaluate(config, splits=self.splits, resolved=resolved, log=self.log,
                                    observers=[KerasCallbacks(callbacks)], evaluate_and_export=False,
                                    initial_weights=model.get_weights() if continued else None)
        return {"val_accuracy": result["val_accuracy"], "val_loss": result["val_loss"]}
