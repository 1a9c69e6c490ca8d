"""The stop signal: SIGTERM / Ctrl-C set a flag that the loop checks between multi-step calls.

In a cluster every worker must stop at the same step (a worker that runs one more step than its peers
waits forever in a collective), so `should_stop` is a vote: the flags are all-reduced and everybody
stops when anybody was told to.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class StopSignal:
    """Use as a context manager around the epochs; handlers are restored on exit."""

    def __init__(self, strategy=None, num_workers: int = 1):
        self.exit_code: Optional[int] = None
        self._previous = {}
        self._vote = _make_vote(strategy) if num_workers > 1 else None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum, code in EXIT_CODES.items():
                self._previous[signum] = signal.signal(signum, self._handler(code))
        return self

    def _handler(self, code: int):
        def handle(signum, frame):
            self.exit_code = code
        return handle

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

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
