"""The one exception type for faults a user can fix (bad file, missing folder, offline...).

`trainer.task` turns it into one line on stderr and exit code 1, with no traceback. `writing(what)`
turns the faults of writing outputs (a full disk, a vanished folder, TensorFlow's file errors) into one.
"""

import contextlib
import io
import os
import re
import sys
import tempfile
from typing import List, Optional


class TrainerError(Exception):
    """An expected fault found through I/O or TensorFlow; its message names the culprit."""


class TrainingDiverged(TrainerError):
    """The loss became NaN, infinite or impossibly large; `detail` says which loss, where and its value."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


class Interrupted(BaseException):
    """Training stopped by SIGTERM (exit 143) or Ctrl-C (exit 130). A BaseException, as KeyboardInterrupt
    is: code that catches Exception (a tuner recording a failed trial, a download's fault handler) must
    not turn a stop into something else."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ")  # absl's prefix (epoch seconds, then)


def require_tensorflow():
    """Import TensorFlow, or say which extra installs it (it is not a hard requirement of the package).

    The first import holds back what TensorFlow's C++ start-up writes to stderr below TF_CPP_MIN_LOG_LEVEL
    anyway: absl logs to stderr unfiltered until it is initialised (TF 2.21 prints its oneDNN notice twice
    that way, each after absl's own warning about it). Other lines are passed on."""
    if "tensorflow" in sys.modules:
        return _import_tensorflow()
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep clean
        return _import_tensorflow()
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            return _import_tensorflow()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in startup_lines_to_show(captured.read().decode(errors="replace")):
                print(line, file=sys.stderr)


def _import_tensorflow():
    try:
        import tensorflow
    except ModuleNotFoundError as error:
        if error.name != "tensorflow":
            raise
        raise TrainerError("TensorFlow is not installed: pip install 'mnist-trainer[cpu]' "
                           "(or [gpu] on a CUDA machine, [tpu] on a TPU VM)") from None
    return tensorflow


def startup_lines_to_show(text: str) -> List[str]:
    """The lines of TensorFlow's start-up output a user asked for: absl's log lines at or above
    TF_CPP_MIN_LOG_LEVEL (0 info, 1 warning, 2 error), and anything that is not an absl log line."""
    try:
        min_level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        min_level = 0
    shown = []
    for line in text.splitlines():
        match = _ABSL_LINE.match(line)
        if line != _ABSL_PREAMBLE and not (match and "IWEF".index(match.group(1)) < min_level):
            shown.append(line)
    return shown


def fault_reason(error: BaseException) -> str:
    """The part of an OSError's or TensorFlow error's text a user needs: 'No space left on device', not
    TensorFlow's function-node and op decorations, the temporary file names or request URLs."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(getattr(error, "message", "") or error).strip().splitlines()[0] if str(error).strip() else ""
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]", "", text)
    text = re.sub(r"https?://\S+", "(a request URL)", text).strip()
    return text.rsplit("; ", 1)[-1].strip() or type(error).__name__


def is_tensorflow_error(error: BaseException) -> bool:
    """A tf.errors.OpError, told apart without importing TensorFlow."""
    errors = sys.modules.get("tensorflow.python.framework.errors_impl")
    return errors is not None and isinstance(error, errors.OpError)


@contextlib.contextmanager
def writing(what: str, consequence: str = ""):
    """Raise TrainerError('WHAT: reason; CONSEQUENCE') for a fault while writing (e.g. what = '--model-dir X:
    cannot write the model', reason 'No space left on device'); other exceptions pass through as they are."""
    try:
        yield
    except Exception as error:
        if not (isinstance(error, (OSError, MemoryError)) or is_tensorflow_error(error)):
            raise
        raise TrainerError(f"{what}: {fault_reason(error)}" + (f"; {consequence}" if consequence else "")) from None


def unexpected_line(error: BaseException, job_dir: Optional[str] = None, program: str = "mnist-trainer") -> str:
    """The one line for an exception no handler expected: its type and message, and the file its full
    traceback was saved to (in `job_dir` when that is an existing local folder, else the temporary folder)."""
    import time
    import traceback

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    name = f"{program}-traceback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    folders = [tempfile.gettempdir()]
    if job_dir and "://" not in job_dir and os.path.isdir(job_dir):
        folders.insert(0, job_dir)
    saved = "(it could not be saved)"
    for folder in folders:
        try:
            with open(os.path.join(folder, name), "w", encoding="utf-8", errors="replace") as handle:
                handle.write(text)
            saved = f"the full traceback is in {os.path.join(folder, name)}"
            break
        except OSError:
            continue
    message = (str(error).strip().splitlines() or [""])[0][:300]
    return f"error: unexpected {type(error).__name__}" + (f": {message}" if message else "") + f"; {saved}"


class _ClosableStdout(io.TextIOWrapper):
    """Standard output that survives its reader going away (`... | head -1`): the first broken pipe sends the
    rest of the output to /dev/null and says so once on stderr, so the run goes on instead of dying mid-epoch."""

    closed_by_reader = False

    def _broken(self) -> None:
        if not self.closed_by_reader:
            self.closed_by_reader = True
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.buffer.fileno())  # what is still buffered then goes nowhere, quietly
                os.close(devnull)
            except (OSError, ValueError):
                pass
            print("note: standard output was closed by its reader; the run goes on without printing",
                  file=sys.stderr)

    def write(self, text: str) -> int:
        try:
            return super().write(text)
        except BrokenPipeError:
            self._broken()
            return len(text)

    def flush(self) -> None:
        try:
            super().flush()
        except BrokenPipeError:
            self._broken()
            super().flush()


def guard_stdout() -> None:
    """Put _ClosableStdout over the process's own standard output (not over a test's stand-in)."""
    if sys.stdout is not sys.__stdout__ or sys.stdout is None or isinstance(sys.stdout, _ClosableStdout):
        return
    try:
        sys.stdout.flush()
        buffer = sys.stdout.buffer
        buffer.fileno()
    except (AttributeError, OSError, ValueError):  # no real file behind it: nothing to guard
        return
    sys.stdout = _ClosableStdout(buffer, encoding=sys.stdout.encoding, errors="backslashreplace",
                                 line_buffering=True)
