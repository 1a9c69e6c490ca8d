"""Checkpoints and the rules of resuming: which settings a checkpoint must share, where a run resumes,
end-of-epoch and mid-epoch saves, the per-epoch history beside them, and syncing a gs:// folder.

The checkpoint folder holds TensorFlow checkpoints (`ckpt-N`, N the global step; the last two kept),
`run_config.json` (the RESUME_KEYS settings of the run that made them) and `history.json` (one row per
completed epoch). Every worker restores from the chief's folder (`Outputs.restore_dir`), so all resume
from the same step; only the chief's saves land in the real folder.
"""

from __future__ import annotations

import json
import os
from typing import Any, List, Optional, Tuple

from trainer import atomic, model_folder
from trainer.config import RESUME_KEYS, Config, join_path
from trainer.errors import TrainerError, writing

# 2: the model holds no augmentation layers (augmentation runs in the input pipeline).
# 3: the checkpoint also holds the model's random-number states (Dropout's seed generator) and a
# mid-epoch stop's partial sums; an older one would resume with the masks of the run's first steps.
CHECKPOINT_FORMAT = 3
HISTORY_FILE = "history.json"
RUN_CONFIG_FILE = "run_config.json"
MAX_TO_KEEP = 2


def is_checkpoint_file(name: str) -> bool:
    """A name the trainer's checkpoints use in their folder (`ckpt-N.*`, TensorFlow's `checkpoint` index,
    history.json, run_config.json): the only files --no-resume and a checkpoint rotation ever delete."""
    return "/" not in name and (name.startswith("ckpt-") or name in ("checkpoint", HISTORY_FILE, RUN_CONFIG_FILE))


def resume_settings(config: Config) -> dict:
    values = config.to_dict()
    return {key: values[key] for key in RESUME_KEYS}


def _load_checkpoint_json(path: str, shown: str, default):
    """run_config.json (a JSON object) or history.json (a list of objects, each with an integer "epoch")
    beside a checkpoint being restored; `default` when missing. Anything else (a file cut short, a row
    without its epoch, a named pipe) is one TrainerError naming the file as the user knows it (`shown`)."""
    try:
        value = json.loads(atomic.read_regular_file(path, shown).decode("utf-8"))
    except FileNotFoundError:
        return default
    except OSError as error:
        raise TrainerError(f"{shown}: cannot read it ({error.strerror})") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TrainerError(f"{shown}: damaged, not valid JSON ({error}); pass --no-resume to start fresh or "
                           "use another --job-dir") from None
    if isinstance(default, dict):
        valid = isinstance(value, dict)
    else:
        valid = isinstance(value, list) and all(isinstance(row, dict) and isinstance(row.get("epoch"), int)
                                                for row in value)
    if not valid:
        what = "a JSON object" if isinstance(default, dict) else 'a list of rows, each with its "epoch"'
        raise TrainerError(f"{shown}: damaged, not {what}; pass --no-resume to start fresh or use another --job-dir")
    return value


def _read_json(path: str):
    """A local or gs:// JSON file's value, or None when it is missing or not JSON (a local file that is not
    a regular file, e.g. a named pipe, is a TrainerError: reading it could block forever)."""
    from trainer import storage

    try:
        if storage.is_gcs(path):
            text = storage.read_text(path)
        else:
            text = atomic.read_regular_file(path, path).decode("utf-8")
        return json.loads(text) if text is not None else None
    except (OSError, ValueError):
        return None


def finished_run(config: Config) -> dict:
    """The metrics of a run these folders already hold in full for these settings: a checkpoint of all
    --epochs (history.json), made with the same settings, metrics.json of that many epochs, and an exported
    model. Empty when anything is missing, so the run goes on (and redoes what is missing). Reads only, and
    needs no TensorFlow: a finished run is reported in the time it takes to read three small files."""

    if not config.resume:
        return {}
    history = _read_json(join_path(config.checkpoint_dir, HISTORY_FILE))
    saved = _read_json(join_path(config.checkpoint_dir, RUN_CONFIG_FILE))
    wanted = resume_settings(config)
    if not (isinstance(history, list) and history and isinstance(history[-1], dict) and
            history[-1].get("epoch") == config.epochs and isinstance(saved, dict) and
            all(saved.get(key) == wanted[key] for key in RESUME_KEYS)):
        return {}
    metrics = _read_json(join_path(config.job_dir, "metrics.json"))
    if not (isinstance(metrics, dict) and metrics.get("epochs_completed") == config.epochs and
            all((metrics.get("config") or {}).get(key) == wanted[key] for key in RESUME_KEYS)):
        return {}
    return metrics if model_folder.is_complete(config.model_dir) else {}


def epochs_beyond(config: Config) -> int:
    """The epochs the checkpoints of these settings already hold when that is more than --epochs (0 otherwise):
    resuming such a run cannot train to --epochs, only rewrite the outputs of a longer run."""
    if not config.resume:
        return 0
    history = _read_json(join_path(config.checkpoint_dir, HISTORY_FILE))
    saved = _read_json(join_path(config.checkpoint_dir, RUN_CONFIG_FILE))
    wanted = resume_settings(config)
    if not (isinstance(history, list) and history and isinstance(history[-1], dict) and isinstance(saved, dict)
            and all(saved.get(key) == wanted[key] for key in RESUME_KEYS)):
        return 0
    done = history[-1].get("epoch")
    return done if isinstance(done, int) and done > config.epochs else 0


class Checkpoints:
    """Owns one run's checkpoint folder. `checkpoint` is a tf.train.Checkpoint holding at least the
    tf.Variables `epoch` (epochs completed), `step` (steps into the next epoch) and `partial` (the partial
    sums of those steps, trainer.steps.PARTIAL_SUMS)."""

    def __init__(self, config: Config, outputs, checkpoint, steps_per_epoch: int, restorable=None, stash=None):
        """`restorable`: the part of `checkpoint` every checkpoint of these settings holds (default: all of
        it); `stash`: a trainer.steps.StatisticsStash saved with `checkpoint` when this replica count wrote it."""
        self.config, self.outputs, self.checkpoint = config, outputs, checkpoint
        self.restorable = restorable or checkpoint
        self.stash = stash
        self.steps_per_epoch = steps_per_epoch
        self._manager: Optional[Any] = None  # a tf.train.CheckpointManager once restore() has run

    def restore(self) -> List[dict]:
        """Resume from the latest checkpoint when allowed and return the history up to it; refuse one made
        with other settings; with --no-resume clear the folder. Call once, before any save."""
        import tensorflow as tf

        source = self.outputs.restore_dir
        state_file = os.path.join(source, "checkpoint") if source else ""
        if state_file and os.path.lexists(state_file):  # TensorFlow would wait for ever on a named pipe
            atomic.read_regular_file(state_file, f"--checkpoint-dir {self.config.checkpoint_dir}: checkpoint")
        latest = tf.train.latest_checkpoint(source) if source and os.path.isdir(source) else None
        if not self.config.resume and self.outputs.is_chief:
            self.clear()
        history = []
        if latest:
            self._refuse_other_settings(_load_checkpoint_json(
                os.path.join(source, RUN_CONFIG_FILE), join_path(self.config.checkpoint_dir, RUN_CONFIG_FILE), {}))
            self.restorable.restore(latest).assert_existing_objects_matched()
            if self.stash is not None:  # absent when another replica count wrote the checkpoint
                tf.train.Checkpoint(**{self.stash.key: self.stash.variables}).restore(latest).expect_partial()
            history = _load_checkpoint_json(os.path.join(source, HISTORY_FILE),
                                            join_path(self.config.checkpoint_dir, HISTORY_FILE), [])
            history = [row for row in history if row["epoch"] <= int(self.checkpoint.epoch.numpy())]
        elif self.outputs.is_chief:
            with writing(f"--checkpoint-dir {self.config.checkpoint_dir}: cannot write {RUN_CONFIG_FILE}"):
                atomic.write_json(os.path.join(self.outputs.checkpoint_dir, RUN_CONFIG_FILE),
                                         dict(resume_settings(self.config), checkpoint_format=CHECKPOINT_FORMAT))
            self.outputs.sync_checkpoints()  # with --no-resume this also removes a gs:// folder's old checkpoints
        self._manager = tf.train.CheckpointManager(self.checkpoint, self.outputs.checkpoint_dir,
                                                   max_to_keep=MAX_TO_KEEP)
        return history

    def _refuse_other_settings(self, saved: dict) -> None:
        made_with = saved.get("checkpoint_format", 1)
        if made_with < CHECKPOINT_FORMAT:
            raise TrainerError(f"--checkpoint-dir {self.config.checkpoint_dir}: holds a checkpoint of format "
                               f"{made_with} from an earlier version of the trainer (this one writes format "
                               f"{CHECKPOINT_FORMAT}, with the random-number state that makes a resume exact); pass "
                               "--no-resume to start fresh or use another --job-dir")
        wanted = resume_settings(self.config)
        differ = [key for key in RESUME_KEYS if key in saved and saved[key] != wanted[key]]
        if differ:
            changes = ", ".join(f"{key} {saved[key]!r} -> {wanted[key]!r}" for key in differ)
            raise TrainerError(f"--checkpoint-dir {self.config.checkpoint_dir}: holds a checkpoint of a run with other "
                               f"settings ({changes}); pass --no-resume to start fresh or use another --job-dir")

    def clear(self) -> None:
        folder = self.outputs.checkpoint_dir
        for name in os.listdir(folder):
            if is_checkpoint_file(name):
                os.remove(os.path.join(folder, name))

    @property
    def position(self) -> Tuple[int, int]:
        """(epochs completed, steps into the next epoch) of the restored or last saved state."""
        return int(self.checkpoint.epoch.numpy()), int(self.checkpoint.step.numpy())

    @property
    def carried(self) -> dict:
        """The partial sums of the steps before a mid-epoch position (zeros at an epoch's start)."""
        from trainer.steps import PARTIAL_SUMS

        return dict(zip(PARTIAL_SUMS, (float(value) for value in self.checkpoint.partial.numpy()), strict=True))

    @property
    def manager(self):
        if self._manager is None:
            raise RuntimeError("Checkpoints.restore() must run before a checkpoint is saved")
        return self._manager

    @property
    def latest(self) -> Optional[str]:
        """The latest checkpoint as the user knows it (its gs:// path when the folder is staged), or None."""
        return self._shown(self._manager.latest_checkpoint) if self._manager else None

    def _shown(self, path):
        staged = self.outputs.checkpoint_dir
        if path and self.config.checkpoint_dir != staged and path.startswith(staged):
            return self.config.checkpoint_dir.rstrip("/") + "/" + path[len(staged):].lstrip(os.sep)
        return path

    def save_mid_epoch(self, epoch: int, step: int, partial_sums: List[float]) -> str:
        """After a stop signal inside an epoch: the exact step, to resume from it, and the epoch's partial
        sums so far (trainer.steps.PARTIAL_SUMS)."""
        self.checkpoint.epoch.assign(epoch)
        self.checkpoint.step.assign(step)
        self.checkpoint.partial.assign(partial_sums)
        if self.stash is not None:
            self.stash.fill()
        with writing(f"--checkpoint-dir {self.config.checkpoint_dir}: cannot save the checkpoint of epoch {epoch + 1}, "
                     f"step {step}"):
            saved = self.manager.save(checkpoint_number=epoch * self.steps_per_epoch + step)
        self.outputs.sync_checkpoints()
        self.outputs.sync_logs()
        return self._shown(saved)

    def save_epoch(self, epoch: int, history: List[dict]) -> None:
        """After epoch `epoch` (0-based) completed: the checkpoint, then history.json, then the gs:// sync."""
        self.checkpoint.epoch.assign(epoch + 1)
        self.checkpoint.step.assign(0)
        self.checkpoint.partial.assign(self.checkpoint.partial.numpy() * 0.0)
        if self.stash is not None:
            self.stash.empty()
        with writing(f"--checkpoint-dir {self.config.checkpoint_dir}: cannot save the checkpoint of epoch {epoch + 1}",
                     f"the last saved one is kept: {self.latest or 'none yet'}"):
            self.manager.save(checkpoint_number=(epoch + 1) * self.steps_per_epoch)
            atomic.write_json(os.path.join(self.outputs.checkpoint_dir, HISTORY_FILE), history)
        self.outputs.sync_checkpoints()
