"""SIGTERM and Ctrl-C in every phase of a run, each with a deliberate outcome.

`RunSignals` (installed by `trainer.task` around the whole run) records the signal and acts by phase:
  start      (before the first training step) a single process stops at once: Interrupted is raised
             from the handler; in a cluster the signal is only recorded, and the first vote of the
             training loop stops every worker together (one that left alone would strand its peers;
             but a worker still waiting for peers that never started leaves 20 s after the signal:
             `trainer.distribute.wait_for_peers`);
  training   the flag is checked between multi-step calls and after each epoch's validation (see
             `StopSignal`);
  finishing  (test evaluation, export, upload) the run completes its outputs first (seconds; Vertex AI
             allows 30 s between SIGTERM and SIGKILL, and an export cut short by SIGKILL leaves the
             previous model untouched), then `trainer.task` exits 143/130. A second signal to a single
             process stops it at once, in any phase.

`StopSignal` is the training loop's view: in a cluster every worker must stop at the same step (a worker
that runs one more step than its peers waits forever in a collective), so `should_stop` is a vote: the
flags are all-reduced and everybody stops when anybody was told to. Code that drives the loop without
`trainer.task` (the tuner, tests) gets handlers of its own from StopSignal for the loop's duration.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Dict, Optional

from trainer.errors import Interrupted

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
NAMES = {143: "SIGTERM", 130: "interrupt"}


class RunSignals:
    """Process-wide: the signal received (exit code) and the phase it arrived in."""

    current: Optional["RunSignals"] = None

    def __init__(self, single_process: bool):
        self.single_process = single_process
        self.exit_code: Optional[int] = None
        self.phase = "start"
        self._previous: Dict[int, Any] = {}  # signal number -> the handler it had before

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum, code in EXIT_CODES.items():
                self._previous[signum] = signal.signal(signum, self._handle(code))
            RunSignals.current = self
        return self

    def reclaim(self) -> None:
        """Point SIGTERM and SIGINT at this record again. Creating a MultiWorkerMirroredStrategy replaces the
        process's SIGTERM handler with TensorFlow's own (its preemption notifier, which only records the
        signal for a PreemptionCheckpointHandler); Python still lists its handler, so without this a worker
        would never hear SIGTERM and train on to the end."""
        if self._previous and threading.current_thread() is threading.main_thread():
            for signum, code in EXIT_CODES.items():
                signal.signal(signum, self._handle(code))

    def _handle(self, code: int):
        def handle(signum, frame):
            first = self.exit_code is None
            self.exit_code = code
            if self.single_process and (self.phase == "start" or not first):
                self.phase = "stopped"
                if first:
                    raise Interrupted(code, f"stopped by {NAMES[code]} before training started; nothing was saved")
                raise Interrupted(code, f"stopped by a second {NAMES[code]}; the outputs of this run may be "
                                        "incomplete (an export cut short leaves the previous model untouched), "
                                        "the checkpoints are kept: rerun the same command to finish")
        return handle

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if RunSignals.current is self:
            RunSignals.current = None


class StopSignal:
    """Use as a context manager around the epochs. Under `RunSignals` it reads that record (a signal
    during start-up counts) and moves the phase on; without one (the tuner, tests) it installs a
    record-only RunSignals of its own for the loop's duration, whose handlers are restored on exit."""

    def __init__(self, strategy=None, num_workers: int = 1):
        self._outer = RunSignals.current
        self._run = self._outer or RunSignals(single_process=False)  # records; the loop acts between calls
        self._vote = _make_vote(strategy) if num_workers > 1 else None

    @property
    def exit_code(self) -> Optional[int]:
        return self._run.exit_code

    @exit_code.setter
    def exit_code(self, code: Optional[int]) -> None:
        self._run.exit_code = code

    def __enter__(self):
        if self._outer is None:
            self._run.__enter__()
        else:
            self._run.reclaim()
        self._run.phase = "training"
        return self

    def __exit__(self, *exc):
        if self._run.phase == "training":
            self._run.phase = "finishing"
        if self._outer is None:
            self._run.__exit__(*exc)

    def request(self, exit_code: int = 143) -> None:
        """Ask for a stop as a signal would (tests, and code that embeds the loop)."""
        self.exit_code = exit_code

    def should_stop(self) -> bool:
        """This process's flag, or in a cluster whether any worker's flag is set (a collective: every
        worker must call it at the same step). A peer's stop counts as SIGTERM here."""
        import tensorflow as tf

        local = self.exit_code is not None
        if self._vote is not None:
            stopping = float(self._vote(tf.constant(1.0 if local else 0.0))) > 0
        else:
            stopping = local
        if stopping and self.exit_code is None:
            self.exit_code = 143
        return stopping

    @property
    def reason(self) -> str:
        return "SIGTERM" if self.exit_code == 143 else "interrupt"


def _make_vote(strategy):
    import tensorflow as tf

    @tf.function(autograph=False)
    def workers_stopping(local_flag):
        """How many replicas saw a stop signal."""
        flags = strategy.run(lambda: tf.identity(local_flag))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, flags, axis=None)

    return workers_stopping
