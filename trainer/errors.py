"""The one exception type for faults a user can fix (bad file, missing folder, offline...).

`trainer.task` turns it into one line on stderr and exit code 1, with no traceback.
"""


class TrainerError(Exception):
    """An expected fault found through I/O or TensorFlow; its message names the culprit."""


class TrainingDiverged(TrainerError):
    """The loss became NaN, infinite or impossibly large; `detail` says which loss, where and its value."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


class Interrupted(Exception):
    """Training stopped by SIGTERM (exit 143) or Ctrl-C (exit 130) after saving a checkpoint."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def require_tensorflow():
    """Import TensorFlow, or say which extra installs it (it is not a hard requirement of the package)."""
    try:
        import tensorflow
    except ModuleNotFoundError as error:
        if error.name != "tensorflow":
            raise
        raise TrainerError("TensorFlow is not installed: pip install 'mnist-trainer[cpu]' "
                           "(or [gpu] on a CUDA machine, [tpu] on a TPU VM)") from None
    return tensorflow
