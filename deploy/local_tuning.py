"""Run a Vertex AI HyperparameterTuningJob here (`deploy.vertex tune --service vertex --local`).

The input is the request itself, the message `--dry-run` prints and submission sends. Each trial is its
trial_job_spec run by the custom-job runner (`deploy.local`: one process per replica, Vertex AI's
environment, its lifecycle), as Vertex AI runs a trial:

- Trials are numbered from 1, as Vertex AI numbers them; at most `parallel_trial_count` run at once,
  `max_trial_count` in all.
- Each trial's parameters come from the study spec. Vertex AI's default search algorithm is a service of
  its own (Vizier); here every trial is random sampling from the spec instead, whatever the request's
  algorithm: DOUBLE in [min, max] on the spec's scale (linear, log, reverse log), INTEGER likewise and
  rounded, DISCRETE and CATEGORICAL one of their values. A sample that repeats an earlier trial's
  parameters is drawn again (up to 100 times), so trials differ while the space allows it.
- The parameters reach the trial as command-line arguments appended to every replica's args,
  `--PARAMETER_ID=VALUE`, as Vertex AI passes them (a DISCRETE value as a float, e.g. `--dropout=0.2`).
- The replicas get `AIP_MODEL_DIR` = base_output_directory/TRIAL_ID/model/ (and checkpoints/, logs/), and
  `"trial": "TRIAL_ID"` in CLUSTER_SPEC's task.
- The trial reports its metric with cloudml-hypertune, which appends JSON lines to CLOUD_ML_HP_METRIC_FILE
  (default /tmp/hypertune/output.metrics, one file per machine on Vertex AI). Here trials share a machine,
  so each trial's replicas get a file of their own under `output_dir` (a third local rewrite, beside
  host names and /gcs/). Once the trial ends, its measurement is read back as Vertex AI reads it: the last
  report of the study's metric (`LAST_MEASUREMENT`, the default), or the best one (`BEST_MEASUREMENT`).
- A trial that fails or reports no metric is INFEASIBLE with the reason; the others go on. The job
  succeeds when at least one trial succeeded (and fewer than max_failed_trial_count failed, when set).

At the end the runner prints a table of the trials and the best one, and writes the tuning job as the
API would return it (google-cloud-aiplatform's HyperparameterTuningJob with its Trial messages) and the
best trial as JSON. SIGTERM or Ctrl-C goes to every running trial's replicas as SIGTERM. Nothing here
imports TensorFlow.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import random
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, TextIO

if TYPE_CHECKING:
    from google.cloud.aiplatform_v1 import Trial

from deploy.local import LocalJob, Options, _seconds, free_ports, plan_replicas

METRIC_FILE = "output.metrics"  # cloudml-hypertune's file name, as on Vertex AI
RESAMPLES = 100


def _scaled(low: float, high: float, scale: str, rng: random.Random) -> float:
    if scale == "UNIT_LOG_SCALE" and low > 0:
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if scale == "UNIT_REVERSE_LOG_SCALE" and low > 0:  # dense near the top of the range
        return high + low - math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def sample(study_spec, rng: random.Random) -> Dict[str, object]:
    """One random point of the study spec: {parameter_id: value} (float, int or str by parameter type)."""
    point: Dict[str, object] = {}
    for parameter in study_spec.parameters:
        if parameter.conditional_parameter_specs:
            raise ValueError(f"parameter {parameter.parameter_id}: conditional parameter specs are not sampled locally")
        scale = parameter.scale_type.name
        kind = type(parameter).pb(parameter).WhichOneof("parameter_value_spec")
        if kind == "double_value_spec":
            spec = parameter.double_value_spec
            point[parameter.parameter_id] = _scaled(spec.min_value, spec.max_value, scale, rng)
        elif kind == "integer_value_spec":
            spec = parameter.integer_value_spec
            value = round(_scaled(spec.min_value, spec.max_value, scale, rng))
            point[parameter.parameter_id] = min(max(value, spec.min_value), spec.max_value)
        elif kind == "discrete_value_spec":
            point[parameter.parameter_id] = float(rng.choice(list(parameter.discrete_value_spec.values)))
        elif kind == "categorical_value_spec":
            point[parameter.parameter_id] = rng.choice(list(parameter.categorical_value_spec.values))
        else:
            raise ValueError(f"parameter {parameter.parameter_id} has no value spec")
    return point


def as_arguments(point: Dict[str, object]) -> List[str]:
    """The trial's parameters as Vertex AI appends them to the container's args."""
    return [f"--{name}={value}" for name, value in point.items()]


def read_measurement(path: str, metric_id: str, selection: str, maximize: bool) -> Optional[dict]:
    """The trial's measurement from its cloudml-hypertune file: {"value", "step"} of the last report of
    `metric_id` (or the best, for BEST_MEASUREMENT); None when it reported none."""
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    reports = []
    for line in lines:
        try:
            entry = json.loads(line)
            reports.append({"value": float(entry[metric_id]), "step": int(entry.get("global_step") or 0)})
        except (ValueError, KeyError, TypeError):
            continue  # another tag, or a line cut short
    if not reports:
        return None
    if selection == "BEST_MEASUREMENT":
        return (max if maximize else min)(reports, key=lambda report: report["value"])
    return reports[-1]


class TrialJob(LocalJob):
    """One trial's custom job: its lines say which trial, and its failure is the trial's, not the runner's."""

    def __init__(self, trial_id: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trial_id = trial_id
        self.failure: Optional[str] = None

    def say(self, message: str, stream: Optional[TextIO] = None) -> None:
        named = f"trial {self.trial_id} " in message  # names one of its replicas
        with self.lock:
            print(f"local tuning job: {'' if named else f'trial {self.trial_id}: '}{message}", file=stream or self.out,
                  flush=True)

    def fail(self, message: str) -> int:  # said once, by the tuning job, as the trial's infeasible_reason
        self.failure = message.replace("the local job failed: ", "", 1)
        return 1


class LocalTuningJob:
    """Schedule, run and measure the trials of one HyperparameterTuningJob message."""

    def __init__(self, job, options: Options, output_dir: str, environ: Mapping[str, str], out: TextIO, err: TextIO,
                 seed: Optional[int] = None):
        self.job, self.options, self.environ, self.out, self.err = job, options, environ, out, err
        self.job_id = datetime.datetime.now(datetime.timezone.utc).strftime("local-%Y%m%d%H%M%S-") + str(os.getpid())
        self.output_dir = os.path.abspath(os.path.join(output_dir, self.job_id))
        self.rng = random.Random(seed)
        self.metric = job.study_spec.metrics[0]
        self.maximize = self.metric.goal.name == "MAXIMIZE"
        self.trials: Dict[int, Trial] = {}
        self.points: Dict[int, Dict[str, object]] = {}  # trial id -> its parameters, typed as sampled
        self.running: Dict[int, tuple] = {}  # trial id -> (thread, TrialJob, started)
        self.signalled: Optional[int] = None
        self.lock = threading.Lock()

    def say(self, message: str, stream: Optional[TextIO] = None) -> None:
        with self.lock:
            print(f"local tuning job: {message}", file=stream or self.out, flush=True)

    def _new_point(self) -> Dict[str, object]:
        for _ in range(RESAMPLES):
            point = sample(self.job.study_spec, self.rng)
            if point not in self.points.values():
                return point
        return point  # the space is smaller than the trials asked for: a repeat, as random search would

    def start(self, trial_id: int) -> None:
        from google.cloud.aiplatform_v1 import Trial

        point = self._new_point()
        now = datetime.datetime.now(datetime.timezone.utc)
        trial = Trial(id=str(trial_id), state=Trial.State.ACTIVE, start_time=now,
                      parameters=[Trial.Parameter(parameter_id=name, value=value) for name, value in point.items()])
        self.trials[trial_id], self.points[trial_id] = trial, point
        spec = self.job.trial_job_spec
        count = sum(pool.replica_count for pool in spec.worker_pool_specs)
        replicas = plan_replicas(spec, f"{self.job_id}-trial{trial_id}", self.options, self.environ, free_ports(count),
                                 trial_id=str(trial_id))
        metric_file = os.path.join(self.output_dir, f"trial_{trial_id}", METRIC_FILE)
        os.makedirs(os.path.dirname(metric_file), exist_ok=True)
        for replica in replicas:
            replica.name = f"trial {trial_id} {replica.name}"
            replica.argv += as_arguments(point)
            replica.env["CLOUD_ML_HP_METRIC_FILE"] = metric_file
        runner = TrialJob(trial_id, replicas, self.options, spec.scheduling.timeout.total_seconds(), self.out, self.err)
        self.say(f"trial {trial_id} starts: {' '.join(as_arguments(point))} (AIP_MODEL_DIR="
                 f"{replicas[0].env.get('AIP_MODEL_DIR', 'unset')}, CLOUD_ML_HP_METRIC_FILE={metric_file})")
        codes: List[int] = []
        thread = threading.Thread(target=lambda: codes.append(runner.run()), daemon=True)
        thread.start()
        self.running[trial_id] = (thread, runner, time.monotonic(), codes, metric_file)

    def finish(self, trial_id: int) -> None:
        from google.cloud.aiplatform_v1 import Measurement, Trial

        thread, runner, started, codes, metric_file = self.running.pop(trial_id)
        thread.join()
        trial = self.trials[trial_id]
        trial.end_time = datetime.datetime.now(datetime.timezone.utc)
        seconds = time.monotonic() - started
        code = codes[0] if codes else 1
        measured = read_measurement(metric_file, self.metric.metric_id,
                                    self.job.study_spec.measurement_selection_type.name, self.maximize)
        if code == 0 and measured is not None:
            trial.state = Trial.State(Trial.State.SUCCEEDED)
            trial.final_measurement = Measurement(
                step_count=measured["step"], elapsed_duration=datetime.timedelta(seconds=seconds),
                metrics=[Measurement.Metric(metric_id=self.metric.metric_id, value=measured["value"])])
            self.say(f"trial {trial_id} succeeded in {_seconds(seconds)}: {self.metric.metric_id} "
                     f"{measured['value']:.4f} (step {measured['step']}, read from {metric_file})")
            return
        trial.state = Trial.State(Trial.State.INFEASIBLE)
        if code == 0:
            trial.infeasible_reason = (f"the trial exited 0 but reported no {self.metric.metric_id} to "
                                       f"CLOUD_ML_HP_METRIC_FILE ({metric_file}): report it with cloudml-hypertune")
        else:
            trial.infeasible_reason = runner.failure or f"the trial ended with exit code {code}"
        self.say(f"trial {trial_id} failed after {_seconds(seconds)}: {trial.infeasible_reason}", self.err)

    def _on_signal(self, signum, frame):
        self.signalled = signum
        for _, runner, *_ in list(self.running.values()):
            runner._on_signal(signum, frame)  # SIGTERM to its replicas (a second signal: SIGKILL)

    def run(self) -> int:
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._schedule()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def _schedule(self) -> int:
        job = self.job
        started = time.monotonic()
        self.say(f"{job.display_name} ({self.job_id}): {job.max_trial_count} trial(s), at most "
                 f"{job.parallel_trial_count} at once; parameters by random sampling from the study spec (Vertex "
                 f"AI's own search algorithm is a service); metric {self.metric.metric_id} "
                 f"({self.metric.goal.name.lower()})")
        next_id, failed = 1, 0
        limit = job.max_failed_trial_count
        while next_id <= job.max_trial_count or self.running:
            if self.signalled is not None:
                stopped = sorted(self.running)
                for trial_id in stopped:
                    self.finish(trial_id)
                name = "SIGTERM" if self.signalled == signal.SIGTERM else "Ctrl-C"
                self.say(f"{name} received: trial(s) {', '.join(map(str, stopped)) or 'none'} stopped (SIGTERM to "
                         f"their replicas), {job.max_trial_count - next_id + 1} not started", self.err)
                return 143 if self.signalled == signal.SIGTERM else 130
            while (next_id <= job.max_trial_count and len(self.running) < job.parallel_trial_count
                   and not (limit and failed >= limit)):
                self.start(next_id)
                next_id += 1
            for trial_id, (thread, *_rest) in list(self.running.items()):
                if not thread.is_alive():
                    self.finish(trial_id)
                    failed += self.trials[trial_id].state.name == "INFEASIBLE"
            if limit and failed >= limit and not self.running:
                break
            time.sleep(0.2)
        return self._report(time.monotonic() - started, failed)

    def _best(self):
        done = [trial for trial in self.trials.values() if trial.state.name == "SUCCEEDED"]
        if not done:
            return None
        value = lambda trial: trial.final_measurement.metrics[0].value  # noqa: E731
        return (max if self.maximize else min)(done, key=value)

    def _report(self, seconds: float, failed: int) -> int:
        from google.cloud.aiplatform_v1 import JobState

        from deploy.vertex import to_json

        best = self._best()
        limit = self.job.max_failed_trial_count
        succeeded = best is not None and not (limit and failed >= limit)
        self.print_table(best)
        result = type(self.job).deserialize(type(self.job).serialize(self.job))
        result.name = self.job_id
        result.trials = [self.trials[trial_id] for trial_id in sorted(self.trials)]
        result.state = JobState.JOB_STATE_SUCCEEDED if succeeded else JobState.JOB_STATE_FAILED
        os.makedirs(self.output_dir, exist_ok=True)
        job_path = os.path.join(self.output_dir, "tuning_job.json")
        with open(job_path, "w") as handle:
            handle.write(to_json(result) + "\n")
        if best is None:
            self.say(f"wrote {job_path}")
            print(f"error: the local tuning job failed: none of its {len(self.trials)} trial(s) succeeded (the "
                  "reasons are above and in tuning_job.json)", file=self.err, flush=True)
            return 1
        point = self.points[int(best.id)]
        best_path = os.path.join(self.output_dir, "best_trial.json")
        with open(best_path, "w") as handle:
            json.dump({"trial_id": best.id, "metric_id": self.metric.metric_id,
                       "value": best.final_measurement.metrics[0].value, "parameters": point,
                       "args": as_arguments(point)}, handle, indent=2)
            handle.write("\n")
        self.say(f"best trial {best.id}: {self.metric.metric_id} {best.final_measurement.metrics[0].value:.4f} "
                 f"with {' '.join(as_arguments(point))}")
        self.say(f"wrote {job_path} and {best_path}")
        if not succeeded:
            print(f"error: the local tuning job failed: {failed} trial(s) failed, the request's "
                  f"max_failed_trial_count is {limit}", file=self.err, flush=True)
            return 1
        self.say(f"succeeded in {_seconds(seconds)}: {len(self.trials) - failed} of {len(self.trials)} trial(s)")
        return 0

    def print_table(self, best) -> None:
        names = [parameter.parameter_id for parameter in self.job.study_spec.parameters]
        header = ["trial", "state", *names, self.metric.metric_id, "step", "seconds"]
        rows = []
        for trial_id in sorted(self.trials):
            trial = self.trials[trial_id]
            point = self.points[trial_id]
            measured = trial.final_measurement.metrics[0].value if trial.final_measurement.metrics else None
            elapsed = (trial.end_time - trial.start_time).total_seconds() if trial.end_time else 0
            rows.append([trial.id + (" *" if trial is best else ""), trial.state.name,
                         *(_shown(point.get(name)) for name in names),
                         f"{measured:.4f}" if measured is not None else "-",
                         str(trial.final_measurement.step_count) if measured is not None else "-", f"{elapsed:.0f}"])
        widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
        with self.lock:
            for row in [header, *rows]:
                cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                print("  ".join(cells).rstrip(), file=self.out)
            self.out.flush()


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def run_tuning_job(job, options: Options, output_dir: str, environ: Optional[Mapping[str, str]] = None,
                   out: Optional[TextIO] = None, err: Optional[TextIO] = None, seed: Optional[int] = None) -> int:
    """Run a HyperparameterTuningJob message here; returns 0, 1 (no trial succeeded, or too many failed),
    143 or 130."""
    environ = os.environ if environ is None else environ
    runner = LocalTuningJob(job, options, output_dir, environ, out or sys.stdout, err or sys.stderr, seed)
    return runner.run()
