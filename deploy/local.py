"""Run a Vertex AI custom job on this machine the way Vertex AI runs it (`deploy.vertex train --local`).

The input is the request itself: the CustomJob message that `--dry-run` prints and submission sends.
Every replica of every worker pool becomes a local process, all started at once, and each gets what
Vertex AI gives a replica:

- `CLUSTER_SPEC` in Vertex AI's format: `{"cluster": {"workerpool0": ["HOST:PORT"], "workerpool1": [...]},
  "environment": "cloud", "task": {"type": "workerpoolN", "index": I, "trial": ""}, "job": <the
  CustomJobSpec as JSON>}` (`trial` holds the trial's id in a tuning trial; Vertex AI's hosts listen on
  port 2222, each on its own machine);
- `TF_CONFIG` as Vertex AI derives it for TensorFlow: workerpool0 -> `chief`, workerpool1 -> `worker`,
  workerpool2 -> `ps`, workerpool3 -> `evaluator` (an evaluator is not part of `cluster`);
- `AIP_MODEL_DIR`, `AIP_CHECKPOINT_DIR`, `AIP_TENSORBOARD_LOG_DIR`: the request's base_output_directory
  plus `model/`, `checkpoints/`, `logs/` (for a tuning trial, base_output_directory/TRIAL_ID/...);
  `CLOUD_ML_JOB_ID`; the pool's own `env`.

Two rewrites, and only these: host names become 127.0.0.1 with free ports, and `/gcs/BUCKET/...` (Cloud
Storage FUSE) in args and env values becomes `GCS_ROOT/BUCKET/...`, a local folder. `gs://` stays as it
is: real Cloud Storage with credentials, or the emulator STORAGE_EMULATOR_HOST names in `environ` (one the
caller runs, or the one deploy/local_storage.py starts for the job). A container's
empty command is the project image's entry point (`python -m trainer.task`, the Dockerfile's ENTRYPOINT),
run from this checkout with this Python. A python_package_spec runs `python -m PYTHON_MODULE ARGS` with
`Options.python`, the interpreter of the virtual environment its sdist is installed in
(deploy/local_package.py), without PYTHONPATH and with PYTHONSAFEPATH=1, so the replicas import the
installed package and never this checkout.

Lifecycle, as on Vertex AI: the job succeeds when workerpool0's replicas exit 0; a replica that exits
non-zero is reported (its last lines) and, with `restarts`, restarted in place (same address, same
environment), else the other replicas are stopped (SIGTERM, SIGKILL after `stop_grace` seconds) and the
job fails. SIGTERM or Ctrl-C to the runner goes to every replica as SIGTERM. scheduling.timeout is
honoured. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Mapping, Optional, TextIO

from trainer.distribute import VERTEX_POOLS, attached_tpu, auto_choice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_ENTRYPOINT = ("python", "-m", "trainer.task")  # the Dockerfile's ENTRYPOINT
VERTEX_RESTARTS = 5  # per replica, before Vertex AI retries the whole job
VERTEX_JOB_RETRIES = 3
STOP_GRACE_SECONDS = 30.0  # Compute Engine's notice between SIGTERM and the stop of a preempted VM
TAIL_LINES = 10
# What the runner's own environment must not hand down: each replica gets its own.
VERTEX_VARIABLES = ("TF_CONFIG", "CLUSTER_SPEC", "AIP_", "CLOUD_ML_")


@dataclasses.dataclass
class Options:
    gcs_root: str = "local-gcs"  # where /gcs/BUCKET/... lands
    restarts: int = 0  # in-place restarts per replica (Vertex AI: up to 5)
    stop_grace: float = STOP_GRACE_SECONDS
    python: Optional[str] = None  # a python_package_spec job: the interpreter its sdist is installed for


@dataclasses.dataclass
class Replica:
    name: str  # workerpool1-0, as Vertex AI names the replica's logs
    pool: int
    index: int
    address: str
    argv: List[str]
    env: Dict[str, str]
    process: Optional[subprocess.Popen] = None
    readers: List[threading.Thread] = dataclasses.field(default_factory=list)
    tail: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    restarts: int = 0
    exit_code: Optional[int] = None  # set once it ended for good

    @property
    def started(self) -> subprocess.Popen:
        """The replica's process, once `LocalJob.start` has run."""
        if self.process is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self.process


def output_dirs(base_output_directory: str, trial_id: Optional[str] = None) -> Dict[str, str]:
    """The AIP_* folders Vertex AI derives from base_output_directory (per trial in a tuning job)."""
    base = base_output_directory.rstrip("/") + "/" + (f"{trial_id}/" if trial_id else "")
    return {"AIP_MODEL_DIR": base + "model/", "AIP_CHECKPOINT_DIR": base + "checkpoints/",
            "AIP_TENSORBOARD_LOG_DIR": base + "logs/"}


def map_gcs_fuse(value: str, gcs_root: str) -> str:
    """`/gcs/BUCKET/x` (alone or after `--flag=`, `idx:`...) -> `GCS_ROOT/BUCKET/x`."""
    root = os.path.abspath(gcs_root).rstrip("/") + "/"
    if value.startswith("/gcs/"):
        return root + value[len("/gcs/"):]
    for separator in ("=", ":"):
        head, found, tail = value.partition(separator + "/gcs/")
        if found:
            return head + separator + root + tail
    return value


def _tf_config(cluster: Dict[str, List[str]], pool: int, index: int) -> dict:
    tf_cluster = {VERTEX_POOLS[name]: hosts for name, hosts in cluster.items() if VERTEX_POOLS[name] != "evaluator"}
    return {"cluster": tf_cluster, "task": {"type": VERTEX_POOLS[f"workerpool{pool}"], "index": index},
            "environment": "cloud"}


def _command(pool_spec, python: Optional[str]) -> List[str]:
    if "python_package_spec" in pool_spec:  # what the executor image runs once the package is installed
        if not python:
            raise ValueError("a python_package_spec job needs Options.python: the interpreter its sdist is installed "
                             "for (deploy.local_package.install)")
        package = pool_spec.python_package_spec
        return [python, "-m", package.python_module, *package.args]
    command = list(pool_spec.container_spec.command) or list(IMAGE_ENTRYPOINT)
    if command[0] in ("python", "python3"):
        command[0] = sys.executable
    return command + list(pool_spec.container_spec.args)


def plan_replicas(spec, job_id: str, options: Options, environ: Mapping[str, str], ports: List[int],
                  trial_id: Optional[str] = None) -> List[Replica]:
    """One Replica per process Vertex AI would start for this CustomJobSpec, with its command and
    environment; `ports` gives each its port on 127.0.0.1, in pool order."""
    from google.protobuf import json_format

    pools = [(number, pool) for number, pool in enumerate(spec.worker_pool_specs) if pool.replica_count]
    free = iter(ports)
    cluster = {f"workerpool{number}": [f"127.0.0.1:{next(free)}" for _ in range(pool.replica_count)]
               for number, pool in pools}
    job = json_format.MessageToDict(type(spec).pb(spec))
    inherited = {key: value for key, value in environ.items() if not key.startswith(VERTEX_VARIABLES)}
    if any("python_package_spec" in pool for _, pool in pools):
        # the installed package, never this checkout: no PYTHONPATH, and not the working folder either
        inherited.pop("PYTHONPATH", None)
        inherited["PYTHONSAFEPATH"] = "1"
    else:
        inherited["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, environ.get("PYTHONPATH")]))
    base = spec.base_output_directory.output_uri_prefix
    replicas = []
    for number, pool in pools:
        argv = [map_gcs_fuse(arg, options.gcs_root) for arg in _command(pool, options.python)]
        own_env = {var.name: map_gcs_fuse(var.value, options.gcs_root) for var in pool.container_spec.env}
        for index in range(pool.replica_count):
            task = {"type": f"workerpool{number}", "index": index, "trial": trial_id or ""}
            env = dict(inherited, PYTHONUNBUFFERED="1", CLOUD_ML_JOB_ID=job_id,
                       CLUSTER_SPEC=json.dumps({"cluster": cluster, "environment": "cloud", "task": task, "job": job}),
                       TF_CONFIG=json.dumps(_tf_config(cluster, number, index)))
            if base:
                env.update(output_dirs(base, trial_id))
            env.update(own_env)
            replicas.append(Replica(f"workerpool{number}-{index}", number, index,
                                    cluster[f"workerpool{number}"][index], argv, env))
    return replicas


def _explicit_strategy(argv: List[str]) -> Optional[str]:
    for position, token in enumerate(argv):
        if token.startswith("--strategy="):
            return token.split("=", 1)[1]
        if token == "--strategy" and position + 1 < len(argv):
            return argv[position + 1]
    return None


def accelerator_notes(spec, replicas: List[Replica], environ: Mapping[str, str]) -> List[str]:
    """One line per pool whose accelerators this machine lacks: what is missing, what runs instead."""
    gpus = len(glob.glob("/dev/nvidia[0-9]*"))
    notes = []
    for number, pool in enumerate(spec.worker_pool_specs):
        machine = pool.machine_spec
        if not pool.replica_count or not machine.accelerator_count:
            continue
        kind = machine.accelerator_type.name
        on_tpu = kind.startswith("TPU")
        if (on_tpu and attached_tpu(environ)) or (not on_tpu and gpus >= machine.accelerator_count):
            continue
        first = next(replica for replica in replicas if replica.pool == number)
        have = ("no TPU" if on_tpu else f"{gpus or 'no'} GPU{'s' if gpus != 1 else ''}")
        asked = _explicit_strategy(first.argv)
        instead = (f"the job asks for --strategy {asked} itself (the trainer says whether it can run here)"
                   if asked and asked != "auto" else
                   f"the trainer's --strategy auto picks '{auto_choice(first.env, gpus)}' instead")
        notes.append(f"workerpool{number} asks for {machine.accelerator_count} x {kind} and this machine has "
                     f"{have}: {instead}; nothing else in the request changes")
    return notes


class LocalJob:
    """Start, watch, restart and stop the replicas; `run` returns the runner's exit code."""

    def __init__(self, replicas: List[Replica], options: Options, timeout: float = 0.0,
                 out: Optional[TextIO] = None, err: Optional[TextIO] = None):
        self.replicas = replicas
        self.options = options
        self.timeout = timeout
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.lock = threading.Lock()
        self.signalled: Optional[int] = None

    # ------------------------------------------------------------------ output
    def say(self, message: str, stream: Optional[TextIO] = None) -> None:
        with self.lock:
            print(f"local job: {message}", file=stream or self.out, flush=True)

    def fail(self, message: str) -> int:
        """The job's one closing error line (stderr), and the runner's exit code for it."""
        with self.lock:
            print(f"error: {message}", file=self.err, flush=True)
        return 1

    def _pump(self, replica: Replica, pipe, stream: TextIO) -> None:
        for line in iter(pipe.readline, ""):
            line = f"[{replica.name}] {line.rstrip()}"
            with self.lock:
                replica.tail.append(line)
                print(line, file=stream, flush=True)
        pipe.close()

    # ------------------------------------------------------------------ processes
    def start(self, replica: Replica) -> None:
        # A session of its own: a Ctrl-C at the terminal reaches the runner only, which forwards SIGTERM.
        replica.process = subprocess.Popen(replica.argv, env=replica.env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, encoding="utf-8", errors="replace", bufsize=1,
                                           start_new_session=True)
        replica.readers = [threading.Thread(target=self._pump, args=(replica, pipe, stream), daemon=True)
                           for pipe, stream in ((replica.process.stdout, self.out), (replica.process.stderr, self.err))]
        for reader in replica.readers:
            reader.start()
        shown = " ".join(["python" if replica.argv[0] == sys.executable else replica.argv[0], *replica.argv[1:]])
        self.say(f"started {replica.name} (pid {replica.started.pid}) on {replica.address}: {shown}")

    def _finish(self, replica: Replica) -> int:
        """The ended replica's exit code, once its output has been printed."""
        for reader in replica.readers:
            reader.join(timeout=5)
        return replica.started.returncode

    def running(self) -> List[Replica]:
        return [r for r in self.replicas if r.process is not None and r.started.poll() is None]

    def stop(self, replicas: List[Replica], grace: float, why: str) -> None:
        """SIGTERM to each replica's process group, SIGKILL to what is left after `grace` seconds."""
        if not replicas:
            return
        names = ", ".join(r.name for r in replicas)
        self.say(f"{why}: SIGTERM to {names} (SIGKILL after {grace:g} s)")
        self._signal(replicas, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(r.started.poll() is None for r in replicas):
            time.sleep(0.1)
        left = [r for r in replicas if r.started.poll() is None]
        if left:
            self.say(f"SIGKILL to {', '.join(r.name for r in left)} (still running after {grace:g} s)")
            self._signal(left, signal.SIGKILL)
        for replica in replicas:
            replica.started.wait()
            replica.exit_code = self._finish(replica)

    @staticmethod
    def _signal(replicas: List[Replica], signum: int) -> None:
        for replica in replicas:
            try:
                os.killpg(replica.started.pid, signum)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ the job
    def _on_signal(self, signum, frame):
        if self.signalled is not None:  # a second Ctrl-C: no more waiting
            self._signal(self.running(), signal.SIGKILL)
        self.signalled = signum

    def run(self) -> int:
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        started = time.monotonic()
        try:
            for replica in self.replicas:
                try:
                    self.start(replica)
                except OSError as error:  # a container command that does not exist on this machine
                    return self.fail(f"cannot start {replica.name}'s command {replica.argv[0]} here "
                                     f"({error.strerror or error})")
            return self._watch(started)
        finally:
            self.stop(self.running(), 0.0 if self.signalled else self.options.stop_grace, "the runner is ending")
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def _watch(self, started: float) -> int:
        primary = [r for r in self.replicas if r.pool == 0]
        while True:
            if self.signalled is not None:
                name = "SIGTERM" if self.signalled == signal.SIGTERM else "Ctrl-C"
                self.stop(self.running(), self.options.stop_grace,
                          f"{name} received; forwarding SIGTERM, as Vertex AI does before a preemption")
                codes = ", ".join(f"{r.name} {r.started.returncode}" for r in self.replicas if r.process is not None)
                self.say(f"stopped by {name} after {_seconds(time.monotonic() - started)} (exit codes: {codes}); "
                         "rerun the same command to resume from the replicas' last checkpoint")
                return 143 if self.signalled == signal.SIGTERM else 130
            if self.timeout and time.monotonic() - started > self.timeout:
                self.stop(self.running(), self.options.stop_grace,
                          f"the job reached its scheduling.timeout ({_seconds(self.timeout)})")
                return self.fail(f"the local job ran past its scheduling.timeout of {_seconds(self.timeout)}, so "
                                 "Vertex AI would fail it too (raise --timeout, or shorten the run)")
            for replica in self.replicas:
                if replica.exit_code is not None or replica.started.poll() is None:
                    continue
                code = self._finish(replica)
                if code == 0:
                    replica.exit_code = 0
                    self.say(f"{replica.name} exited 0")
                    continue
                failed = self._failed(replica, code)
                if failed is not None:
                    return failed
            if all(r.exit_code == 0 for r in primary):
                deadline = time.monotonic() + self.options.stop_grace  # peers finishing too: their last lines
                while self.running() and time.monotonic() < deadline:
                    time.sleep(0.1)
                for replica in self.replicas:
                    if replica.exit_code is None and replica.started.poll() is not None:
                        replica.exit_code = self._finish(replica)
                        self.say(f"{replica.name} exited {replica.exit_code}")
                self.stop(self.running(), self.options.stop_grace, "workerpool0 succeeded, so Vertex AI ends the job")
                self.say(f"succeeded in {_seconds(time.monotonic() - started)} (workerpool0 exited 0)")
                return 0
            time.sleep(0.2)

    def _failed(self, replica: Replica, code: int) -> Optional[int]:
        """Report a replica that exited non-zero; restart it, or stop the job (returns the exit code)."""
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        lines = "\n".join("    " + line for line in replica.tail) or "    (no output)"
        self.say(f"{replica.name} {how}; its last lines:\n{lines}", self.err)
        self.say(f"on Vertex AI this replica would be restarted in place (up to {VERTEX_RESTARTS} times), then the "
                 f"whole job retried (up to {VERTEX_JOB_RETRIES} times); --restarts N restarts it here", self.err)
        if replica.restarts < self.options.restarts:
            replica.restarts += 1
            replica.tail.clear()
            self.say(f"restarting {replica.name} in place (restart {replica.restarts} of {self.options.restarts})")
            self.start(replica)
            return None
        replica.exit_code = code
        ended = [r for r in self.replicas if r.exit_code is None and r.started.poll() not in (None, 0)]
        for other in ended:  # failed in the same moment: said, not restarted
            other.exit_code = self._finish(other)
            self.say(f"{other.name} ended too (exit code {other.exit_code})", self.err)
        self.stop(self.running(), self.options.stop_grace, f"{replica.name} failed, stopping the other replicas")
        culprit = next((line for line in reversed(replica.tail) if "error" in line.lower()), None)
        return self.fail(f"the local job failed: {replica.name} {how}"
                         + (f" ({culprit.split('] ', 1)[-1]})" if culprit else "")
                         + ("; its restarts are used up (--restarts)" if self.options.restarts else ""))


def _seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def free_ports(count: int) -> List[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (held together while chosen, so none repeats)."""
    import socket

    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def run_custom_job(job, options: Options, environ: Optional[Mapping[str, str]] = None,
                   out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    """Run a CustomJob message here; returns 0, 1 (a replica failed, or the timeout), 143 or 130."""
    environ = os.environ if environ is None else environ
    out = out or sys.stdout
    spec = job.job_spec
    count = sum(pool.replica_count for pool in spec.worker_pool_specs)
    # unique per run: a replica restarted within this job may take over the job dir's lock, no other run may
    job_id = datetime.datetime.now(datetime.timezone.utc).strftime("local-%Y%m%d%H%M%S-") + str(os.getpid())
    replicas = plan_replicas(spec, job_id, options, environ, free_ports(count))
    timeout = spec.scheduling.timeout.total_seconds()
    runner = LocalJob(replicas, options, timeout, out, err)
    runner.say(f"{job.display_name} ({job_id}): {count} replica(s) of the request, as local processes")
    if spec.base_output_directory.output_uri_prefix:
        dirs = output_dirs(spec.base_output_directory.output_uri_prefix)
        runner.say(" ".join(f"{key}={value}" for key, value in dirs.items()))
    runner.say(f"/gcs/ paths (Cloud Storage FUSE) map to {os.path.abspath(options.gcs_root)}/ here, a local folder "
               "apart from the gs:// bucket")
    if timeout:
        runner.say(f"scheduling.timeout {_seconds(timeout)}")
    for note in accelerator_notes(spec, replicas, environ):
        runner.say(f"note: {note}")
    return runner.run()
