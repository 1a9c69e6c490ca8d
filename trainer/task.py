"""Entry point: `python -m trainer.task [flags]` -> Config -> train_and_evaluate.

No TensorFlow import at module level: `--help` and command-line errors (exit 2) come back at once.
Exit codes: 0 success, 2 bad command line, 1 a fault found through I/O or TensorFlow (one line on
stderr naming the culprit), 143 after SIGTERM and 130 after Ctrl-C (a checkpoint saved in both cases).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from trainer.config import parse_config
from trainer.errors import Interrupted, TrainerError, guard_stdout, unexpected_line


def _quiet_tensorflow() -> None:
    """TensorFlow's C++ start-up chatter hides the trainer's own lines; users can override this."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _line_buffered() -> None:
    """Progress lines reach a log file or pipe as they are printed, not in 8 KiB blocks at exit."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # not when a test has swapped in a StringIO
            stream.reconfigure(line_buffering=True, errors="backslashreplace")


def _single_process(environ) -> bool:
    from trainer.distribute import cluster_config

    try:
        return cluster_config(environ) is None
    except TrainerError:
        return True  # a malformed TF_CONFIG is reported once training starts


def _failure(error: BaseException) -> Optional[str]:
    """The one line for a fault TensorFlow or the machine raised outside the places that name their
    culprit themselves (out of memory while training, a device error); None for anything else."""
    from trainer.errors import fault_reason, is_tensorflow_error

    if isinstance(error, MemoryError) or type(error).__name__ == "ResourceExhaustedError":
        return (f"out of memory while training ({fault_reason(error)}); lower --batch-size, --filters or "
                "--dense-units")
    if is_tensorflow_error(error):
        return f"TensorFlow failed: {type(error).__name__}: {fault_reason(error)}"
    return None


def _already_complete(config) -> bool:
    """Whether these folders hold this very run in full (said on stdout; nothing is rewritten); a TrainerError
    when they hold more epochs than --epochs."""
    from trainer.checkpoints import finished_run
    done = finished_run(config)
    if done:
        print(f"this run is already complete: {config.epochs}/{config.epochs} epochs, test_accuracy "
              f"{done.get('test_accuracy', float('nan')):.4f}; its model is in {config.model_dir}, "
              f"metrics.json and plots/ in {config.job_dir}, logs in {config.log_dir}. Nothing was "
              "rewritten: pass a larger --epochs to train on, or --no-resume to start again")
        return True
    from trainer.checkpoints import epochs_beyond
    beyond = epochs_beyond(config)
    if beyond:
        raise TrainerError(f"--checkpoint-dir {config.checkpoint_dir}: this run already trained {beyond} "
                           f"epochs, more than --epochs {config.epochs}; nothing was changed: pass --epochs "
                           f"{beyond} or more to go on, or --no-resume to start again")
    return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    _line_buffered()
    guard_stdout()
    try:
        config = parse_config(argv, os.environ)  # exits 2 on a syntax or range error
    except TrainerError as error:  # --hparams-file could not be read
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        print(unexpected_line(error, None, "trainer"), file=sys.stderr)
        return 1
    _quiet_tensorflow()
    from trainer.distribute import prepare_tpu_environment

    prepare_tpu_environment(config.strategy, config.tpu)  # before anything imports TensorFlow
    from trainer.stopping import NAMES, RunSignals

    signals = RunSignals(single_process=_single_process(os.environ))
    try:
        with signals:
            if config.dataset_kind == "tfds":
                from trainer.data import check_tfds_offline
                check_tfds_offline(config.dataset, config.data_dir)  # before the heavy imports
            elif config.dataset_kind == "folder":
                from trainer.image_folder import scan_folder
                scan_folder(config.folder_dir)  # its layout, before the heavy imports
            if _already_complete(config):
                return 0
            from trainer.train import train_and_evaluate
            metrics = train_and_evaluate(config, environ=os.environ)
            if config.preset == "quick":
                from trainer.config import full_recipe_hint

                trained = metrics["epochs_completed"] - metrics["initial_epoch"]
                print(full_recipe_hint(config, metrics["train_seconds"] / trained if trained else None))
    except TrainerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        return stop.exit_code
    except Exception as error:
        line = _failure(error)
        print(f"error: {line}" if line else unexpected_line(error, config.job_dir, "trainer"), file=sys.stderr)
        return 1
    if signals.exit_code is not None:  # it came after training: the outputs were completed first
        print(f"stopped by {NAMES[signals.exit_code]} after training had ended; the test evaluation and export were "
              "completed first, so this run's outputs are complete", file=sys.stderr)
        return signals.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
