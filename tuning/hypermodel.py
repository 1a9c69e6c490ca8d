"""A KerasTuner HyperModel whose trials are trainer runs.

`build(hp)` goes through `trainer.model.build_model`; `fit` runs the trainer's own loop, data pipeline and
(single-worker) strategy with the trial's values, and drives the callbacks KerasTuner passes in
(`set_model`, `on_epoch_end` with `val_accuracy`), so `get_best_models` and Hyperband work.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import keras_tuner as kt

from trainer.config import Config
from tuning.space import SearchSpace, trial_number


class TrainerHyperModel(kt.HyperModel):
    """Trials are trainer runs: same model code, same loop, same data splits (loaded once)."""

    def __init__(self, base: Config, space: SearchSpace, splits, job_dir: str, log=print):
        super().__init__(name="mnist_cnn")
        self.base, self.space, self.splits, self.job_dir, self.log = base, space, splits, job_dir, log

    def trial_config(self, hp: kt.HyperParameters, epochs: Optional[int] = None, trial_id: str = "") -> Config:
        """The trainer settings of one trial: JOB_DIR/trials/trial_N, TensorBoard runs in JOB_DIR/logs/trial_N,
        N the 1-based number KerasTuner prints ("Trial #N")."""
        name = f"trial_{trial_number(trial_id)}" if trial_id else "trial_build"
        values = self.space.values(hp)  # the searched dropout is every epoch's, as `--dropout` is
        return dataclasses.replace(self.base, **values, unaugmented_dropout=values["dropout"],
                                   epochs=epochs or self.base.epochs,
                                   job_dir=os.path.join(self.job_dir, "trials", name), model_dir="",
                                   log_dir=os.path.join(self.job_dir, "logs", name), checkpoint_dir="",
                                   resume=False, strategy="default", hypertune=False)

    def build(self, hp):
        from trainer.model import build_model

        return build_model(self.trial_config(hp), shape=self.splits.shape)

    def fit(self, hp, model, *args, callbacks: Sequence = (), epochs: Optional[int] = None, initial_epoch: int = 0,
            trial_id: str = "", **kwargs):
        import tensorflow as tf

        from trainer.distribute import Resolved
        from trainer.errors import TrainingDiverged
        from trainer.observers import KerasCallbacks
        from trainer.train import train_and_evaluate

        # Hyperband continues an earlier trial: its weights are in `model`; run the remaining epochs.
        continued = "tuner/trial_id" in hp.values
        run_epochs = (epochs or self.base.epochs) - (initial_epoch if continued else 0)
        config = self.trial_config(hp, epochs=max(1, run_epochs), trial_id=trial_id)
        resolved = Resolved(tf.distribute.get_strategy(), "default")  # one trial, one worker
        try:
            result = train_and_evaluate(config, splits=self.splits, resolved=resolved, log=self.log,
                                        observers=[KerasCallbacks(callbacks)], evaluate_and_export=False,
                                        initial_weights=model.get_weights() if continued else None)
        except TrainingDiverged as diverged:  # a bad corner of the search space, not a failed search
            self.log(f"trial {trial_number(trial_id)}: training diverged ({diverged.detail}); "
                     "recorded with val_accuracy 0")
            return {"val_accuracy": 0.0}
        return {"val_accuracy": result["val_accuracy"], "val_loss": result["val_loss"]}
