"""The clock behind "training time to N% test accuracy", shared by bench/seed_baseline.py (Keras `fit`)
and bench/probes.py (this trainer), so that both sides are checked at the same points and timed alike.

The test accuracy is checked `per_epoch` times an epoch, after the step (or multi-step call) that crosses
each check point, until it first reaches the target; the checks' own time is excluded from the training
time. With `then_per_epoch`, checking goes on after the target at that rate (the accuracy-against-time
curve of the whole run); the time to the target is the same either way.
"""

import time


class AccuracyChecks:
    def __init__(self, target, per_epoch, measure, then_per_epoch=0):
        """`measure()` returns the current test accuracy; `target` may be None (time the epochs only)."""
        self.target, self.per_epoch, self.measure, self.then_per_epoch = target, per_epoch, measure, then_per_epoch
        self.train_seconds, self.reached, self.records, self.epoch_seconds = 0.0, None, [], []
        self.epoch, self.started, self.checking, self.next_check = 0, 0.0, 0.0, 1

    def begin_epoch(self, epoch):
        self.epoch, self.started, self.checking, self.next_check = epoch, time.perf_counter(), 0.0, 1

    def after_steps(self, steps_done, steps_per_epoch):
        """Check if a check point was crossed; returns True once the target has been reached."""
        per_epoch = self.per_epoch if self.reached is None else self.then_per_epoch
        due = self.next_check * steps_per_epoch / per_epoch if per_epoch else float("inf")
        if self.target is None or steps_done < due:
            return self.reached is not None
        trained = self.train_seconds + time.perf_counter() - self.started - self.checking
        began = time.perf_counter()
        accuracy = float(self.measure())
        self.checking += time.perf_counter() - began
        epochs = self.epoch + steps_done / steps_per_epoch
        self.records.append(dict(epochs=round(epochs, 3), train_seconds=round(trained, 2), accuracy=accuracy))
        print(f"check at epoch {epochs:.2f}, {trained:.1f} s of training: test accuracy {accuracy:.4f}", flush=True)
        if accuracy >= self.target and self.reached is None:
            self.reached = dict(seconds=trained, epochs=epochs)
            per_epoch, self.next_check = self.then_per_epoch, 1  # from here on the slower grid, if any
        while per_epoch and self.next_check * steps_per_epoch / per_epoch <= steps_done:
            self.next_check += 1
        return self.reached is not None

    def end_epoch(self, seconds=None):
        """Add the epoch's training time: `seconds` as the trainer measured it (checks included), or the
        time since begin_epoch; the checks' time is taken off either way."""
        if seconds is None:
            seconds = time.perf_counter() - self.started
        self.epoch_seconds.append(seconds - self.checking)
        self.train_seconds += seconds - self.checking

    def result(self):
        reached = self.reached or {}
        return dict(seconds_to_target=reached.get("seconds"), epochs_to_target=reached.get("epochs"),
                    checks=self.records, epoch_seconds=self.epoch_seconds)
